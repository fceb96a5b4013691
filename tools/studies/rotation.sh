#!/usr/bin/env bash
# Why rotation hurts in Figure 5 (docs/findings.md, "Why rotation hurts"):
# is it the invariance the loss asks for, or training on turned images?
#
#   tools/studies/rotation.sh SUBSET OUT
#
# SUBSET is the CIFAR-10 subset of tools/data/cifar10_subset.py (train/,
# test/); OUT a folder for the runs, the turned copies and the scores. The
# study trains, at the findings' CPU scale, three seeds each:
#   - Figure 5's pairs: crop alone, crop then rotation, rotation alone, on
#     view 2, view 1 unaugmented (`ablate augment`);
#   - the crop-alone cell's configuration on a copy of the training images
#     in which half are turned by a quarter turn or more, each fixed once
#     (tools/data/rotated_copy.py): the turned images without the invariance;
#   - the same for the full `cifar10-fast` augmentation: the base, the base
#     with rotation on both views (`ablate transform`'s rotation row), and
#     the base on the turned copy;
# then scores every run and the random-init encoder by kNN (k 200, t 0.1)
# three ways: upright bank and queries, bank and queries each turned by
# 0-3 quarter turns, and an upright bank with turned queries. About 50
# minutes on 2 cores; run it again after a stop and finished runs and
# scores are read back.
set -euo pipefail
. "$(dirname "$0")/common.sh" "$@"
mkdir -p "$OUT/evals"
R=$OUT/turned
copy() {  # copy SOURCE NAME UPRIGHT SEED; the list is written last, so a copy without it was cut short
    [ -f "$R/$2/orientations.csv" ] && return
    rm -rf "${R:?}/$2"
    "$PYTHON" tools/data/rotated_copy.py "$1" "$R/$2" --upright "$3" --seed "$4"
}
copy "$S/train" train-half 0.5 0
copy "$S/train" train-any 0.25 1
copy "$S/test" test-any 0.25 2

"$SIMCLR" ablate augment "${BASE[@]}" --ops random-resized-crop,rotation --seeds 0,1,2 --output "$OUT/pairs"
"$SIMCLR" ablate transform "${BASE[@]}" --transformations grayscale,rotation --seeds 0,1,2 --output "$OUT/transform"
# The turned copy, trained with the crop cell's and the base's configurations.
for pair in data-half:pairs/random-resized-crop base-data-half:transform/transform-grayscale; do
    IFS=: read -r name cell <<< "$pair"
    for seed in 0 1 2; do
        [ -f "$OUT/$name/seed-$seed/summary.json" ] && continue
        rm -rf "$OUT/$name/seed-$seed"
        "$SIMCLR" train --config "$OUT/$cell/seed-0/config.toml" --data "$R/train-half" --seed "$seed" \
            --output "$OUT/$name/seed-$seed"
    done
done

EVALS=("upright:$S/train:$S/test" "any:$R/train-any:$R/test-any" "rotated-queries:$S/train:$R/test-any")
score() {  # score NAME ARGS...: kNN of one encoder on the three evaluations
    local name=$1 label bank queries
    shift
    for eval in "${EVALS[@]}"; do
        IFS=: read -r label bank queries <<< "$eval"
        [ -f "$OUT/evals/$name.$label.json" ] && continue
        "$SIMCLR" eval knn "$@" --train "$bank" --test "$queries" --device cpu \
            --output "$OUT/evals/$name.$label.json" > /dev/null
    done
}
for run in "$OUT"/pairs/*/seed-* "$OUT"/transform/transform-{grayscale,rotation}/seed-* "$OUT"/data-half/seed-* \
           "$OUT"/base-data-half/seed-*; do
    score "$(echo "${run#"$OUT"/}" | tr / _)" --checkpoint "$run/checkpoint.safetensors"
done
# The random-init encoders of the runs' seeds, built as the runs' configuration builds its network and
# centre views (read from a run's config.toml, not written again here).
read -ra network < <("$PYTHON" tools/studies/network_flags.py "$OUT/pairs/random-resized-crop/seed-0/config.toml")
for seed in 0 1 2; do
    score "random-init_seed-$seed" --random-init --seed "$seed" "${network[@]}"
done

"$PYTHON" - "$OUT/evals" <<'PY'
import json, pathlib, statistics, sys
rows = [
    ("random-init", "random init"),
    ("pairs_random-resized-crop", "crop (view 2)"),
    ("pairs_random-resized-crop+rotation", "crop, then rotation (view 2)"),
    ("pairs_rotation", "rotation alone (view 2)"),
    ("data-half", "crop (view 2), half the images turned"),
    ("transform_transform-grayscale", "cifar10-fast (both views)"),
    ("transform_transform-rotation", "cifar10-fast, then rotation p 0.5 (both views)"),
    ("base-data-half", "cifar10-fast, half the images turned"),
]
evals = ["upright", "any", "rotated-queries"]
folder = pathlib.Path(sys.argv[1])
lines = ["run," + ",".join(f"{e}_mean,{e}_std" for e in evals)]
print(f"{'training':<48}" + "".join(f"{e:>18}" for e in evals))
for key, label in rows:
    cells, csv = [], [label]
    for e in evals:
        top1 = [json.loads(p.read_text())["top1"] * 100 for p in sorted(folder.glob(f"{key}_seed-*.{e}.json"))]
        mean, std = statistics.mean(top1), statistics.stdev(top1)
        cells.append(f"{mean:6.1f}% ± {std:.1f} ({len(top1)})")
        csv += [f"{mean:.2f}", f"{std:.2f}"]
    print(f"{label:<48}" + "".join(f"{c:>18}" for c in cells))
    lines.append(",".join(csv))
(folder.parent / "rotation.csv").write_text("\n".join(lines) + "\n")
print(f"written: {folder.parent / 'rotation.csv'}")
PY
