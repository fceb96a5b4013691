#!/usr/bin/env bash
# The time-to-accuracy race on this machine's CPU (issue 21, acceptance 5):
# `simclr train --preset cifar10-fast` against the PyTorch reference
# (tools/reference/train_pytorch.py) given the same recipe, the same model
# (ResNet-18 at 0.25x width, CIFAR stem, head 128-128-128), batch 128, the
# same images (the first 500 training and 100 test images of each CIFAR-10
# class) and the same wall-clock budget of training, each then scored by
# kNN (k = 200, t = 0.1; bank = the training images, queries = the test
# images). The two alternate, ours first in odd rounds and second in even
# ones (a shared 2-core machine drifts between runs), round r with seed r.
# Prints one JSON line per run, a Markdown table and the verdict: our mean
# end-to-end images/s (training images over training seconds, augmentation
# included, the kNN not) at least the reference's, and our mean kNN not
# below it.
#
#   tools/bench/race_cpu.sh                # 2 rounds of 240 s each, about 20 min
#   ROUNDS=3 BUDGET=240 DATA=../shared/data/cifar10 OUT=runs/race tools/bench/race_cpu.sh
#   ONLY=simclr ROUNDS=1 tools/bench/race_cpu.sh    # one side alone (tuning)
#   SIMCLR_ARGS="--set loss.temperature=0.2" tools/bench/race_cpu.sh   # the reference follows
#   SIMCLR_ARGS="--set train.mixed_precision=false" tools/bench/race_cpu.sh   # both in fp32
#
# Both train in bf16 on a CPU with AVX-512 BF16 (simclr's train.mixed_precision,
# the reference's rule for it), in fp32 on any other.
#
# SIMCLR_BIN picks the binary (default: a release build, made here).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-2}
BUDGET=${BUDGET:-240}
DATA=${DATA:-../shared/data/cifar10}
OUT=${OUT:-runs/race-cpu}
PYTHON=$(tools/python.sh)
for split in train test; do
  [ -d "$DATA/$split" ] || { echo "race_cpu.sh: no $DATA/$split (set DATA to a CIFAR-10 ImageFolder with train/ and test/)" >&2; exit 1; }
done
eval "$(scripts/libtorch.sh)"
BIN=${SIMCLR_BIN:-}
if [ -z "$BIN" ]; then
  cargo build --quiet --release -p simclr-cli
  BIN=target/release/simclr
fi
mkdir -p "$OUT"

# The subset, as symbolic links (the data is never copied).
subset=$(mktemp -d)
trap 'rm -rf "$subset"' EXIT
python3 tools/data/cifar10_subset.py "$DATA" "$subset" --train 500 --test 100

# The recipe both sides run: cifar10-fast's with SIMCLR_ARGS, read from the
# config for the reference. The width, head and batch are the CPU setting's.
# shellcheck disable=SC2086
read -ra ref_recipe < <("$BIN" train --preset cifar10-fast ${SIMCLR_ARGS:-} --print-config | python3 tools/reference/preset_recipe.py)
ref_recipe+=(--width 0.25 --hidden-dim 128 --batch-size 128)
echo "reference recipe: ${ref_recipe[*]}" >&2

simclr() {  # round
  local run="$OUT/simclr-$1"
  rm -rf "$run"
  # shellcheck disable=SC2086
  "$BIN" train --preset cifar10-fast --data "$subset/train" --output "$run" --device cpu --seed "$1" \
    --batch-size 128 --set model.width_multiplier=0.25 --set train.time_budget_seconds="$BUDGET" \
    --set "data.knn_train_path=\"$subset/train\"" --set "data.knn_test_path=\"$subset/test\"" \
    --set train.knn_k=200 --set train.knn_temperature=0.1 ${SIMCLR_ARGS:-} > "$run.log" 2>&1 \
    || { tail -n 5 "$run.log" >&2; echo "race_cpu.sh: simclr failed, log in $run.log" >&2; exit 1; }
  python3 - "$run" "$1" <<'PY'
import json, pathlib, sys
run = pathlib.Path(sys.argv[1])
metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
summary = json.loads((run / "summary.json").read_text())
seconds = sum(m["seconds"] for m in metrics)
images = sum(m["images_per_second"] * m["seconds"] for m in metrics)
print(json.dumps({"implementation": "simclr", "round": int(sys.argv[2]), "epochs": len(metrics),
                  "train_seconds": seconds, "images_per_second": images / seconds,
                  "precision": summary["precision"], "knn_top1": summary["final_knn_top1"]}))
PY
}

reference() {  # round
  # shellcheck disable=SC2086
  "$PYTHON" tools/reference/train_pytorch.py --data "$subset" --device cpu --budget "$BUDGET" --seed "$1" \
    "${ref_recipe[@]}" ${REF_ARGS:-} \
    | python3 -c 'import json, sys; r = json.loads(sys.stdin.read()); r["round"] = int(sys.argv[1]); print(json.dumps(r))' "$1"
}

results="$OUT/results.jsonl"
: > "$results"
for round in $(seq "$ROUNDS"); do
  order=(simclr reference)
  [ $((round % 2)) -eq 0 ] && order=(reference simclr)
  for side in "${order[@]}"; do
    if [ -z "${ONLY:-}" ] || [ "$ONLY" = "$side" ]; then
      "$side" "$round" | tee -a "$results"
    fi
  done
done

python3 - "$results" "$BUDGET" <<'PY'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
print(f"\n{sys.argv[2]} s of training each, CPU, {len(runs)} runs:\n")
print("| round | implementation | precision | epochs | training s | images/s | kNN top-1 |")
print("|---:|---|---|---:|---:|---:|---:|")
for r in runs:
    print(f"| {r['round']} | {r['implementation']} | {r['precision']} | {r['epochs']} | {r['train_seconds']:.1f} | "
          f"{r['images_per_second']:.1f} | {100 * r['knn_top1']:.2f}% |")
ours = [r for r in runs if r["implementation"] == "simclr"]
theirs = [r for r in runs if r["implementation"] != "simclr"]
if ours and theirs:
    mean = lambda rs, key: statistics.mean(r[key] for r in rs)
    speed = mean(ours, "images_per_second") / mean(theirs, "images_per_second")
    knn = 100 * (mean(ours, "knn_top1") - mean(theirs, "knn_top1"))
    print(f"\nmean images/s: simclr {mean(ours, 'images_per_second'):.1f}, reference "
          f"{mean(theirs, 'images_per_second'):.1f} (ratio {speed:.3f}): {'met' if speed >= 1 else 'NOT met'}")
    print(f"mean kNN top-1: simclr {100 * mean(ours, 'knn_top1'):.2f}%, reference "
          f"{100 * mean(theirs, 'knn_top1'):.2f}% ({knn:+.2f} points): {'met' if knn >= 0 else 'NOT met'}")
PY
