#!/usr/bin/env bash
# `simclr bench` against the PyTorch reference (tools/reference/bench_pytorch.py) on
# this machine's CPU, same model, batch and steps. The two alternate for
# ROUNDS rounds (a shared 2-core machine drifts by 15% between runs); the
# medians and their ratio are printed. Needs the fixture venv (see
# tools/fixtures/make_fixtures.py) or PYTHON pointing at a Python with torch 2.11.
#
#   tools/bench/bench_cpu.sh                 # ResNet-18, CIFAR stem, batch 64, 32x32
#   BATCH=128 STEPS=10 ROUNDS=5 tools/bench/bench_cpu.sh
#   REF_ARGS=--channels-last tools/bench/bench_cpu.sh   # PyTorch in simclr's memory format
#   SIMCLR_ARGS=--no-mixed-precision tools/bench/bench_cpu.sh   # fp32 on a CPU with bf16 instructions
#   WIDTH=0.0625 BATCH=2 SIZE=8 STEPS=200 OPTIMIZER=sgd REF_ARGS=--channels-last tools/bench/bench_cpu.sh
#       # a model so small that dispatching ops is most of a step, as on a GPU
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=$(tools/python.sh)
args=(--arch "${ARCH:-resnet18}" --width "${WIDTH:-1}" --stem "${STEM:-cifar}" --batch-size "${BATCH:-64}"
      --image-size "${SIZE:-32}" --steps "${STEPS:-5}" --warmup 2 --optimizer "${OPTIMIZER:-lars}")
libtorch_env=$(scripts/libtorch.sh)
eval "$libtorch_env"
cargo build --quiet -p simclr-cli
runs=()
for _ in $(seq "${ROUNDS:-3}"); do
    # shellcheck disable=SC2086
    ours=$(target/debug/simclr bench "${args[@]}" --device cpu --json ${SIMCLR_ARGS:-} 2>/dev/null)
    runs+=("$ours")
    # Where simclr trained in bf16 (a CPU with bf16 instructions), so does the reference.
    precision=()
    if python3 -c 'import json, sys; sys.exit(json.loads(sys.argv[1])["precision"] != "bf16")' "$ours"; then
        precision=(--bf16)
    fi
    # shellcheck disable=SC2086
    runs+=("$("$PYTHON" tools/reference/bench_pytorch.py "${args[@]}" --threads "$(nproc)" "${precision[@]}" ${REF_ARGS:-})")
done
python3 - "${runs[@]}" <<'PY'
import json, statistics, sys
runs = [json.loads(r) for r in sys.argv[1:]]
ours, ref = runs[0::2], runs[1::2]
first = ours[0]
print(f"{first['arch']}, batch {first['batch_size']} at {first['image_size']}px, {first['steps']} timed steps, "
      f"CPU, {first['precision']}, median of {len(ours)} alternating rounds:")
for key, name in [("train_images_per_second", "training images/s"), ("forward_images_per_second", "encoder forward images/s")]:
    a, b = statistics.median(r[key] for r in ours), statistics.median(r[key] for r in ref)
    spread = lambda rs: "/".join(f"{r[key]:.1f}" for r in rs)
    print(f"  {name:26s} simclr {a:8.1f} ({spread(ours)})   {ref[0]['implementation']} {b:8.1f} ({spread(ref)})"
          f"   ratio {a / b:.2f}x")
PY
