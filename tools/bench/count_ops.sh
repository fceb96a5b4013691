#!/usr/bin/env bash
# ATen ops dispatched per unit of work, simclr against the PyTorch
# reference, counted on this machine's CPU. On a GPU every small kernel
# costs a launch (a few microseconds of host and device time) whatever the
# batch, so where no GPU is at hand these counts compare how much launching
# each implementation does. tools/bench/opcount.cpp, built here against the
# cached libtorch's headers and preloaded into both processes, counts every
# op and, as "kernels", those that are not views or allocations and run no
# other kernel op inside. Each figure is the difference between a run of
# 3 and one of 8 units, over 5, so start-up and model building drop out.
# A proxy: host-side work counts as kernels here too (a slice of drawn
# values becoming a tensor, a CPU optimiser's chunks), while on a GPU only
# the upload of those values launches, and the optimiser runs whole buffers.
#
#   tools/bench/count_ops.sh step      one training step (ResNet-18, CIFAR stem, SGD, tiny batch) and one
#                                encoder forward, `simclr bench` against tools/reference/bench_pytorch.py
#   tools/bench/count_ops.sh augment   one batch of 256 CIFAR views on the device path, `simclr bench augment`
#                                against tools/reference/train_pytorch.py's batched augmentation
# Environment: PYTHON (the fixture venv's), DATA (an ImageFolder of 32x32 images, for augment;
# default ../shared/data/cifar10/test), TOP (rows of the per-op table, 25).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=$(tools/python.sh)
DATA=${DATA:-../shared/data/cifar10/test}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
libtorch_env=$(scripts/libtorch.sh)
eval "$libtorch_env"
cargo build --quiet -p simclr-cli
g++ -std=c++17 -O2 -shared -fPIC -I"$LIBTORCH/include" -I"$LIBTORCH/include/torch/csrc/api/include" \
    tools/bench/opcount.cpp -L"$LIBTORCH/lib" -ltorch_cpu -lc10 -Wl,-rpath,"$LIBTORCH/lib" -o "$work/opcount.so"
count() { # name units command...
    local name=$1 units=$2
    shift 2
    LD_PRELOAD="$work/opcount.so" OPCOUNT_OUT="$work/$name.$units" "$@" > /dev/null
}
case "${1:-}" in
step)
    for units in 3 8; do
        args=(--arch resnet18 --stem cifar --batch-size 2 --image-size 8 --warmup 1 --steps "$units" --optimizer sgd)
        count simclr "$units" target/debug/simclr bench "${args[@]}" --device cpu --json
        count pytorch "$units" "$PYTHON" tools/reference/bench_pytorch.py "${args[@]}" --threads 2 --channels-last
    done
    unit="training step and encoder forward (on the CPU: PyTorch's SGD loops over tensors there, foreach on CUDA)"
    ;;
augment)
    for units in 3 8; do
        count simclr "$units" target/debug/simclr bench augment --data "$DATA" --pipeline simclr-cifar \
            --image-size 32 --limit 256 --rounds "$units" --json
        count pytorch "$units" "$PYTHON" - "$units" <<'PY'
import sys
import torch
sys.path.insert(0, "tools")
from train_pytorch import augment
images = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8)
for _ in range(int(sys.argv[1]) + 1):  # one more, as simclr's warm-up round
    augment(images)
PY
    done
    unit="batch of 256 views"
    ;;
*)
    sed -n '2,/^set -euo/p' "$0" | sed '$d'
    exit 2
    ;;
esac
python3 - "$work" "$unit" "${TOP:-25}" <<'PY'
import pathlib, sys
work, unit, top = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
def per_unit(name):
    load = lambda units: {f[0]: (int(f[1]), int(f[2])) for f in
                          (l.split("\t") for l in (work / f"{name}.{units}").read_text().splitlines())}
    few, many = load(3), load(8)
    return {op: ((a - few.get(op, (0, 0))[0]) / 5, (k - few.get(op, (0, 0))[1]) / 5) for op, (a, k) in many.items()}
ours, ref = per_unit("simclr"), per_unit("pytorch")
total = lambda counts, i: sum(c[i] for c in counts.values())
print(f"ATen ops per {unit}:")
print(f"  {'':34} {'simclr':>16} {'pytorch':>16}")
print(f"  {'all ops':34} {total(ours, 0):16.0f} {total(ref, 0):16.0f}")
print(f"  {'kernels':34} {total(ours, 1):16.0f} {total(ref, 1):16.0f}")
print(f"  kernels by op (top {top}):")
names = sorted(set(ours) | set(ref), key=lambda op: -max(ours.get(op, (0, 0))[1], ref.get(op, (0, 0))[1]))
for op in names[:top]:
    a, b = ours.get(op, (0, 0))[1], ref.get(op, (0, 0))[1]
    if a or b:
        print(f"    {op:32} {a:16.1f} {b:16.1f}")
PY
