#!/usr/bin/env bash
# `simclr bench` against the PyTorch reference (tools/bench_pytorch.py) on
# this machine's CPU, same model, batch and steps, one after the other in
# one run; prints both and the ratio. Needs the fixture venv (see
# tools/make_fixtures.py) or PYTHON pointing at a Python with torch 2.11.
#
#   tools/bench_cpu.sh                 # ResNet-18, CIFAR stem, batch 64, 32x32
#   BATCH=128 STEPS=10 tools/bench_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$HOME/.cache/simclr/venv/bin/python}
args=(--arch "${ARCH:-resnet18}" --stem "${STEM:-cifar}" --batch-size "${BATCH:-64}"
      --image-size "${SIZE:-32}" --steps "${STEPS:-5}" --warmup 2)
eval "$(scripts/libtorch.sh)"
cargo build --quiet -p simclr-cli
ours=$(target/debug/simclr bench "${args[@]}" --device cpu --json 2>/dev/null)
reference=$("$PYTHON" tools/bench_pytorch.py "${args[@]}" --threads "$(nproc)")
python3 - "$ours" "$reference" <<'PY'
import json, sys
ours, ref = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"{ours['arch']}, batch {ours['batch_size']} at {ours['image_size']}px, {ours['steps']} timed steps, CPU:")
for key, name in [("train_images_per_second", "training images/s"), ("forward_images_per_second", "encoder forward images/s")]:
    print(f"  {name:26s} simclr {ours[key]:8.1f}   {ref['implementation']} {ref[key]:8.1f}   ratio {ours[key] / ref[key]:.2f}x")
PY
