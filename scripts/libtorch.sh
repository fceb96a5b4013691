#!/usr/bin/env bash
# Installs libtorch 2.11.0 (the CPU+CUDA 13.0 build shipped in the registry's
# `torch==2.11.0` wheel) into a cache outside the checkout, once, and prints
# the environment that points tch at it. Idempotent: a finished install is
# marked by `.complete` and reused by every clone and by CI on this machine.
#
#   eval "$(scripts/libtorch.sh)"
#
# Only torch/{lib,include,share} are unpacked, plus the two CUDA runtime
# libraries that libtorch_cpu.so itself links (libcudart, libcupti); the
# rest of the CUDA stack is needed only on a GPU machine, which already has
# PyTorch installed.
set -euo pipefail

TORCH_VERSION=2.11.0
CUDA_RUNTIME=nvidia-cuda-runtime==13.0.96
CUDA_CUPTI=nvidia-cuda-cupti==13.0.85
CACHE_ROOT=${SIMCLR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/simclr}
PREFIX=$CACHE_ROOT/libtorch-$TORCH_VERSION

if [ ! -f "$PREFIX/.complete" ]; then
    echo "installing libtorch $TORCH_VERSION into $PREFIX (once)" >&2
    PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
    WHEELS=$CACHE_ROOT/wheels
    mkdir -p "$WHEELS"
    if ! ls "$WHEELS"/torch-$TORCH_VERSION-*.whl >/dev/null 2>&1; then
        "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
            --python-version 3.11 --platform manylinux_2_28_x86_64 \
            -d "$WHEELS" "torch==$TORCH_VERSION" >&2
    fi
    if ! ls "$WHEELS"/nvidia_cuda_runtime-*.whl "$WHEELS"/nvidia_cuda_cupti-*.whl >/dev/null 2>&1; then
        "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
            --platform manylinux_2_28_x86_64 -d "$WHEELS" "$CUDA_RUNTIME" "$CUDA_CUPTI" >&2
    fi
    rm -rf "$PREFIX.partial"
    # Only the members tch needs: torch/{lib,include,share} and the two CUDA
    # runtime libraries (zipfile, so no `unzip` is needed).
    "$PYTHON" - "$PREFIX.partial" "$WHEELS"/torch-$TORCH_VERSION-*.whl \
        "$WHEELS"/nvidia_cuda_runtime-*.whl "$WHEELS"/nvidia_cuda_cupti-*.whl <<'PY'
import sys, zipfile
target, wheels = sys.argv[1], sys.argv[2:]
keep = ("torch/lib/", "torch/include/", "torch/share/", "nvidia/cu13/lib/")
for wheel in wheels:
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target, [m for m in archive.namelist() if m.startswith(keep)])
PY
    # tch checks this file against the version it was written for.
    echo "$TORCH_VERSION" > "$PREFIX.partial/torch/build-version"
    rm -rf "$PREFIX"
    mv "$PREFIX.partial" "$PREFIX"
    touch "$PREFIX/.complete"
fi

echo "export LIBTORCH='$PREFIX/torch'"
