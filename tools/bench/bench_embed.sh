#!/usr/bin/env bash
# `simclr embed` against the PyTorch reference (tools/reference/embed_pytorch.py) on this
# machine's CPU: the same random ResNet-18 (CIFAR stem) weights, the same
# JPEGs, batch 128 at 32 px. The two alternate for ROUNDS rounds (a shared
# 2-core machine drifts by 15% between runs); medians of the embedding loop
# (decode + forward) and of the whole command (start-up, listing and writing
# included) are printed with their ratios, and the two feature matrices are
# compared. Needs the fixture venv (see tools/fixtures/make_fixtures.py) or PYTHON
# pointing at a Python with torch 2.11 and torchvision.
#
#   tools/bench/bench_embed.sh                        # 300 test images per CIFAR-10 class
#   PER_CLASS=1000 ROUNDS=5 tools/bench/bench_embed.sh
#   WORKERS=0 tools/bench/bench_embed.sh              # PyTorch decodes in its main process (2: in 2 workers, faster here)
#   PRECISION=bf16 tools/bench/bench_embed.sh         # both forward passes in bf16 autocast
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=$(tools/python.sh)
DATA=${DATA:-../shared/data/cifar10/test}
[ -d "$DATA" ] || { echo "no image folder at $DATA (set DATA)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The first PER_CLASS files of every class, linked into one folder tree.
for class in "$DATA"/*/; do
    name=$(basename "$class")
    mkdir -p "$work/images/$name"
    find "$(realpath "$class")" -maxdepth 1 -type f | sort | sed -n "1,${PER_CLASS:-300}p" |
        xargs -I{} ln -s {} "$work/images/$name/"
done
"$PYTHON" tools/reference/embed_pytorch.py --make-weights "$work/encoder.safetensors" --arch resnet18 --stem cifar

libtorch_env=$(scripts/libtorch.sh)
eval "$libtorch_env"
cargo build --quiet -p simclr-cli
args=(--weights "$work/encoder.safetensors" --arch resnet18 --stem cifar --image-size 32
      --batch-size "${BATCH:-128}" --device cpu --input "$work/images" --precision "${PRECISION:-fp32}")
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.3f", b - a }'; }
for round in $(seq "${ROUNDS:-3}"); do
    started=$EPOCHREALTIME
    line=$(target/debug/simclr embed "${args[@]}" --output "$work/simclr.npy" 2>/dev/null)
    echo "simclr $round $(since "$started") $line" >>"$work/runs"
    started=$EPOCHREALTIME
    line=$("$PYTHON" tools/reference/embed_pytorch.py "${args[@]}" --threads "$(nproc)" --workers "${WORKERS:-2}" \
        --output "$work/pytorch.npy")
    echo "pytorch $round $(since "$started") $line" >>"$work/runs"
done
"$PYTHON" - "$work" <<'PY'
import json, re, statistics, sys
import numpy as np
work = sys.argv[1]
ours, ref = [], []
for line in open(f"{work}/runs"):
    who, _, wall, rest = line.split(" ", 3)
    if who == "simclr":
        images, loop = re.search(r"embedded (\d+) images .*; ([0-9.]+) s,", rest).groups()
        ours.append((float(loop), float(wall), int(images)))
    else:
        report = json.loads(rest)
        ref.append((report["embed_seconds"], float(wall), report["images"], report))
images = ours[0][2]
assert all(r[2] == images for r in ours + ref), "the two embedded different numbers of images"
a, b = np.load(f"{work}/simclr.npy"), np.load(f"{work}/pytorch.npy")
info = ref[0][3]
print(f"resnet18 (CIFAR stem), {images} JPEGs at 32 px, batch 128, {info['precision']}, CPU ({info['threads']} "
      f"threads, PyTorch DataLoader workers: {info['workers']}), median of {len(ours)} alternating rounds:")
for index, name in [(0, "embedding loop"), (1, "whole command")]:
    x, y = statistics.median(r[index] for r in ours), statistics.median(r[index] for r in ref)
    spread = lambda rs: "/".join(f"{r[index]:.2f}" for r in rs)
    print(f"  {name:15s} simclr {images / x:7.1f} images/s ({spread(ours)} s)   {info['implementation']} "
          f"{images / y:7.1f} images/s ({spread(ref)} s)   ratio {y / x:.2f}x")
scale = np.abs(b).max()
print(f"  features {a.shape} vs {b.shape}: max |difference| {np.abs(a - b).max():.2e} (largest |h| {scale:.2f}), "
      f"cosine similarity of rows >= {np.min((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)):.6f}")
PY
