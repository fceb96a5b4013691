#!/usr/bin/env bash
# Semi-supervised learning (the paper's Table 7, section 6 and appendix B.5):
# with a fraction of the labels, is a SimCLR encoder fine-tuned ahead of the
# same network trained from scratch on those labels, and what do frozen
# features give with them? (docs/findings.md, "Semi-supervised learning")
#
#   tools/studies/semi.sh SUBSET OUT
#
# SUBSET is the CIFAR-10 subset of tools/data/cifar10_subset.py (train/,
# test/); OUT a folder for the runs and the scores. At the findings' CPU
# scale the study pretrains the `cifar10-fast` recipe on the training
# images (three seeds), then, for 1%, 10% and 100% of each class's labels
# (drawn with the seed, the same images for every method of a seed):
#   - supervised: the network from random init fine-tuned on the labels,
#     as `eval finetune` fine-tunes (crop and flip, Nesterov SGD, the
#     paper's epochs): training from scratch on the same labels;
#   - random init, linear: a linear classifier on the untrained network;
#   - SimCLR kNN and linear on frozen h, with only the labelled images;
#   - SimCLR fine-tuned, with a random head (the paper) and with a linear
#     probe's head first (LP-FT);
#   - SimCLR fine-tuned from the projection head's first layer, kept and
#     trained with the encoder (SimCLR v2, arXiv 2006.10029, section 2);
#   the last two not at 100% unless FULL_LABEL_EXTRAS=1 (a quarter of an
#   hour a run here; they go last, head:1 for every seed first);
# then, at 1% and 10%, the three fine-tuned rows again at base rates 0.2 and
# 0.8 besides the paper's 0.05 (the rate is scaled by the batch, here 50
# images at 1%: the paper's rule gives a peak of 0.01 where its ImageNet
# runs had 0.8). Every score on all the test images. About an hour on 2
# cores; run it again after a stop and finished runs and scores are read
# back.
#
# PRETRAIN_EPOCHS (10, the findings' base) pretrains longer; HEAD_LAYERS (2,
# the paper's) pretrains with a deeper projection head (SimCLR v2's 3);
# FRACTIONS ("0.01 0.1 1") evaluates only those; RATE_SWEEP=0
# leaves out the rates. The rows from random init do not depend on the
# pretraining: copied from another OUT's evals/ (`supervised_*`,
# `random-init-linear_*`), they are read back, not trained again.
set -euo pipefail
. "$(dirname "$0")/common.sh" "$@"
SEEDS=(0 1 2)
PRETRAIN_EPOCHS=${PRETRAIN_EPOCHS:-10}
HEAD_LAYERS=${HEAD_LAYERS:-2}
read -ra FRACTIONS <<< "${FRACTIONS:-0.01 0.1 1}"
BASE+=(--set "model.head.layers=$HEAD_LAYERS")
mkdir -p "$OUT/evals"

for seed in "${SEEDS[@]}"; do
    run=$OUT/pretrain/seed-$seed
    if [ -f "$run/summary.json" ]; then
        grep -qx "epochs = $PRETRAIN_EPOCHS" "$run/config.toml" ||
            { echo "semi.sh: $run was not pretrained for PRETRAIN_EPOCHS=$PRETRAIN_EPOCHS epochs" >&2; exit 1; }
        grep -qx "layers = $HEAD_LAYERS" "$run/config.toml" ||
            { echo "semi.sh: $run was not pretrained with HEAD_LAYERS=$HEAD_LAYERS" >&2; exit 1; }
        continue
    fi
    rm -rf "$run"
    "$SIMCLR" train "${BASE[@]}" --epochs "$PRETRAIN_EPOCHS" --seed "$seed" --output "$run"
done
# The random-init network is the runs' own, untrained (read from a run's config.toml).
read -ra network < <("$PYTHON" tools/studies/network_flags.py "$OUT/pretrain/seed-0/config.toml")

evaluate() {  # evaluate NAME FRACTION SEED PROTOCOL ARGS...: one score, kept as evals/NAME_FRACTION_seed-SEED.json
    local name=$1 fraction=$2 seed=$3 protocol=$4
    shift 4
    local json=$OUT/evals/${name}_${fraction}_seed-$seed.json
    [ -f "$json" ] && return
    "$SIMCLR" eval "$protocol" "$@" --fraction "$fraction" --seed "$seed" --train "$S/train" --test "$S/test" \
        --device cpu --subset-file "$OUT/evals/${name}_${fraction}_seed-$seed.labelled.txt" --output "$json"
}
# The small fractions for every seed first, then the full labels (most of the time).
for fraction in "${FRACTIONS[@]}"; do
    for seed in "${SEEDS[@]}"; do
        checkpoint=(--checkpoint "$OUT/pretrain/seed-$seed/checkpoint.safetensors")
        evaluate random-init-linear "$fraction" "$seed" linear --random-init "${network[@]}"
        evaluate simclr-knn "$fraction" "$seed" knn "${checkpoint[@]}"
        evaluate simclr-linear "$fraction" "$seed" linear "${checkpoint[@]}"
        evaluate supervised "$fraction" "$seed" finetune --random-init "${network[@]}"
        evaluate simclr-finetune "$fraction" "$seed" finetune "${checkpoint[@]}"
        [ "$fraction" = 1 ] && continue
        evaluate simclr-lp-ft "$fraction" "$seed" finetune "${checkpoint[@]}" --head-init linear-probe
        evaluate simclr-finetune-head1 "$fraction" "$seed" finetune "${checkpoint[@]}" --layer head:1
    done
done
[[ "${FULL_LABEL_EXTRAS:-0}" = 1 && " ${FRACTIONS[*]} " = *" 1 "* ]] && for extra in head1 lp-ft; do
    for seed in "${SEEDS[@]}"; do
        checkpoint=(--checkpoint "$OUT/pretrain/seed-$seed/checkpoint.safetensors")
        case $extra in
            head1) evaluate simclr-finetune-head1 1 "$seed" finetune "${checkpoint[@]}" --layer head:1 ;;
            lp-ft) evaluate simclr-lp-ft 1 "$seed" finetune "${checkpoint[@]}" --head-init linear-probe ;;
        esac
    done
done
# Fine-tuning's rate, at 1% and 10% (seconds a run; the full labels take minutes).
[ "${RATE_SWEEP:-1}" = 0 ] || for fraction in 0.01 0.1; do
    for seed in "${SEEDS[@]}"; do
        checkpoint=(--checkpoint "$OUT/pretrain/seed-$seed/checkpoint.safetensors")
        for rate in 0.2 0.8; do
            evaluate "supervised@$rate" "$fraction" "$seed" finetune --random-init "${network[@]}" --learning-rate "$rate"
            evaluate "simclr-finetune@$rate" "$fraction" "$seed" finetune "${checkpoint[@]}" --learning-rate "$rate"
            evaluate "simclr-lp-ft@$rate" "$fraction" "$seed" finetune "${checkpoint[@]}" --head-init linear-probe \
                --learning-rate "$rate"
        done
    done
done
# Every method of a seed labelled the same images.
for fraction in 0.01 0.1 1; do
    for seed in "${SEEDS[@]}"; do
        lists=("$OUT"/evals/*_"${fraction}"_seed-"$seed".labelled.txt)
        for list in "${lists[@]}"; do
            cmp -s "$list" "${lists[0]}" || { echo "semi.sh: $list and ${lists[0]} label different images" >&2; exit 1; }
        done
    done
done

"$PYTHON" - "$OUT/evals" <<'PY'
import json, pathlib, statistics, sys
folder = pathlib.Path(sys.argv[1])
methods = [
    ("supervised", "supervised (from scratch, fine-tuned)"),
    ("random-init-linear", "random init, linear"),
    ("simclr-knn", "SimCLR, kNN"),
    ("simclr-linear", "SimCLR, linear"),
    ("simclr-finetune", "SimCLR, fine-tuned"),
    ("simclr-lp-ft", "SimCLR, linear probe then fine-tuned"),
    ("simclr-finetune-head1", "SimCLR, fine-tuned from the head's layer 1"),
] + [(f"{key}@{rate}", f"{label}, base rate {rate}") for rate in ("0.2", "0.8") for key, label in [
    ("supervised", "supervised"), ("simclr-finetune", "SimCLR, fine-tuned"), ("simclr-lp-ft", "SimCLR, LP-FT")]]
fractions = ["0.01", "0.1", "1"]
def scores(method, fraction):
    return {int(p.name.rsplit("seed-", 1)[1].split(".")[0]): json.loads(p.read_text())["top1"] * 100
            for p in sorted(folder.glob(f"{method}_{fraction}_seed-*.json"))}
labelled = {f: json.loads(next(folder.glob(f"supervised_{f}_seed-0.json")).read_text())["labelled_images"]
            for f in fractions}
lines = ["method,fraction,labelled_images,top1_mean,top1_std,seeds"]
print(f"{'top-1, 3 seeds':<44}" + "".join(f"{f'{float(f):.0%} ({labelled[f]} labels)':>22}" for f in fractions))
for key, label in methods:
    cells = []
    for f in fractions:
        top1 = list(scores(key, f).values())
        if not top1:
            cells.append("")
            continue
        mean, std = statistics.mean(top1), statistics.stdev(top1)
        cells.append(f"{mean:5.1f}% ± {std:.1f}")
        lines.append(f"{key},{f},{labelled[f]},{mean:.2f},{std:.2f},{len(top1)}")
    print(f"{label:<44}" + "".join(f"{c:>22}" for c in cells))
# Paired by seed: the same labelled images, the same test images.
for key, against in [("simclr-finetune", "supervised"), ("simclr-finetune", "simclr-linear"),
                     ("simclr-lp-ft", "simclr-finetune"), ("simclr-finetune-head1", "simclr-finetune"),
                     ("simclr-finetune@0.2", "supervised@0.2")]:
    cells = []
    for f in fractions:
        a, b = scores(key, f), scores(against, f)
        gains = [a[s] - b[s] for s in sorted(a.keys() & b.keys())]
        cells.append(f"{statistics.mean(gains):+5.1f} ± {statistics.stdev(gains):.1f}" if len(gains) > 1 else "")
    print(f"{key + ' - ' + against:<44}" + "".join(f"{c:>22}" for c in cells))
(folder.parent / "semi.csv").write_text("\n".join(lines) + "\n")
print(f"written: {folder.parent / 'semi.csv'}")
PY
