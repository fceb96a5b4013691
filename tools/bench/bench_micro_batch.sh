#!/usr/bin/env bash
# Gradient caching on this machine: for each batch size, one training step
# whole and in chunks of MICRO images (train.micro_batch_size), each in its
# own process so each peak memory is its own, the two alternating; prints a
# Markdown table of images/s and peak memory (resident set on the CPU,
# allocated device memory on CUDA):
#   tools/bench/bench_micro_batch.sh     (MICRO=64 BATCHES="64 ... 4096"
#                                         MODEL="--arch resnet18 --width 0.25 --stem cifar --image-size 32"
#                                         DEVICE=cpu SIMCLR_BIN=target/debug/simclr)
# A configuration that runs out of memory says so in its cells (on CUDA the
# largest whole batch that fits is the yardstick; see docs/large-batches.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
MICRO=${MICRO:-64}
BATCHES=${BATCHES:-64 128 256 512 1024 2048 4096}
read -r -a model <<< "${MODEL:---arch resnet18 --width 0.25 --stem cifar --image-size 32}"
DEVICE=${DEVICE:-cpu}
BIN=${SIMCLR_BIN:-}
if [ -z "$BIN" ]; then
  ./x.sh build >/dev/null 2>&1 || { echo "the build failed: run ./x.sh build" >&2; exit 1; }
  BIN=target/debug/simclr
fi
# About 4096 images timed per configuration, at least 2 steps, after 1 warm-up step.
steps() { local s=$((4096 / $1)); echo $((s < 2 ? 2 : s)); }
errors=$(mktemp)
trap 'rm -f "$errors"' EXIT
report() {
  if ! "$BIN" bench "${model[@]}" --device "$DEVICE" --batch-size "$1" --steps "$(steps "$1")" --warmup 1 --json \
      "${@:2}" 2> "$errors"; then
    tail -n 3 "$errors" >&2
    if grep -qiE "out of memory|can't allocate memory" "$errors"; then echo '{"failed": "out of memory"}'; else echo '{"failed": "failed"}'; fi
  fi
}
echo "| batch | whole: images/s | whole: peak MiB | chunks of $MICRO: images/s | chunks: peak MiB | chunk time / whole time |"
echo "|---:|---:|---:|---:|---:|---:|"
for batch in $BATCHES; do
  whole=$(report "$batch")
  chunked=$(if [ "$batch" -gt "$MICRO" ]; then report "$batch" --micro-batch-size "$MICRO"; else echo '{}'; fi)
  python3 - "$batch" "$whole" "$chunked" <<'PY'
import json, sys
batch, whole, chunked = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
def cells(report):
    if not report:
        return ["(same as whole)", ""]
    if report.get("failed"):
        return [report["failed"], ""]
    return [f'{report["train_images_per_second"]:.1f}', f'{report["peak_memory_bytes"] / 2**20:.0f}']
ratio = ""
if whole.get("train_images_per_second") and chunked.get("train_images_per_second"):
    ratio = f'{whole["train_images_per_second"] / chunked["train_images_per_second"]:.2f}'
print("| " + " | ".join([batch] + cells(whole) + cells(chunked) + [ratio]) + " |")
PY
done
