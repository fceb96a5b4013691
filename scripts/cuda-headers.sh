#!/usr/bin/env bash
# Installs the headers the `cuda` build's c10d shim compiles against (NCCL's,
# for ProcessGroupNCCL, and the CUDA runtime, cuBLAS, cuSPARSE and cuSOLVER
# headers that ProcessGroupNCCL.hpp pulls in through ATen) into the cache,
# once, and prints the variable build.rs reads:
#
#   env=$(scripts/cuda-headers.sh) && eval "$env"
#
# The versions are those torch 2.11.0's metadata pins (nvidia-nccl-cu13
# 2.28.9, cuda-toolkit 13.0.2's components), each wheel pinned by sha256 as
# in scripts/libtorch.sh. Only `nvidia/*/include/` is unpacked: the
# libraries themselves come with PyTorch on the GPU machine. About 1 GB of
# wheels is downloaded (cuBLAS alone is 423 MB) for a few MB of headers;
# only `./x.sh build-cuda` needs them, never the CPU build or the tests.
set -euo pipefail
# shellcheck source=scripts/pinned-wheels.sh
source "$(dirname "$0")/pinned-wheels.sh"

WHEELS_PINNED=(
    "nvidia-nccl-cu13==2.28.9 sha256:e4553a30f34195f3fa1da02a6da3d6337d28f2003943aa0a3d247bbc25fefc42"
    "nvidia-cuda-runtime==13.0.96 sha256:7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548"
    "nvidia-cuda-crt==13.0.88 sha256:2c8043c7c9e02492716426e9919fc78d2c5b3b2a7a768a88e952676b08aa55a4"
    "nvidia-cuda-cccl==13.0.85 sha256:e0da7ad981f3a8aff08241b5bfc1af868742a63e2762f53a5171c492ef242649"
    "nvidia-cublas==13.1.0.3 sha256:ee8722c1f0145ab246bccb9e452153b5e0515fd094c3678df50b2a0888b8b171"
    "nvidia-cusparse==12.6.3.3 sha256:2b3c89c88d01ee0e477cb7f82ef60a11a4bcd57b6b87c33f789350b59759360b"
    "nvidia-cusolver==12.0.4.66 sha256:0a759da5dea5c0ea10fd307de75cdeb59e7ea4fcb8add0924859b944babf1112"
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_18_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)
CACHE_ROOT=${SIMCLR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/simclr}
PREFIX=$CACHE_ROOT/cuda-headers-13.0

fail() {
    echo "scripts/cuda-headers.sh: $*" >&2
    exit 1
}

# Only the headers, by zipfile.
unpack() {
    "$python" - "$1" "$2" "${WHEELS_PINNED[@]}" <<'PY'
import pathlib, re, sys, zipfile
target, folder = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
include = re.compile(r"^nvidia/[^/]+/include/")
count = 0
for requirement in sys.argv[3:]:
    name, version = requirement.split(" ")[0].split("==")
    (wheel,) = folder.glob(f"{name.replace('-', '_')}-{version}-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.infolist() if include.match(m.filename) and not m.is_dir()]
        if not members:
            sys.exit(f"{wheel.name} holds no headers")
        archive.extractall(target, members)
        count += len(members)
for header in ("nvidia/nccl/include/nccl.h", "nvidia/cu13/include/cuda_runtime_api.h", "nvidia/cu13/include/cublas_v2.h"):
    if not (target / header).is_file():
        sys.exit(f"{header} missing after unpacking")
(target / ".complete").write_text(f"{count} headers\n")
PY
}

install_once cuda-headers "the CUDA and NCCL headers" "about 1 GB of wheels"

echo "export SIMCLR_CUDA_INCLUDE='$PREFIX/nvidia/cu13/include:$PREFIX/nvidia/nccl/include'"
