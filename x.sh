#!/usr/bin/env bash
# The project's one entry point on a fresh machine: installs libtorch once
# (cached outside the checkout, see scripts/libtorch.sh), builds, and runs.
#
#   ./x.sh simclr ARGS...   build the `simclr` binary and run it
#   ./x.sh test [ARGS...]   build and run every test (cargo test ARGS)
#   ./x.sh build            build the binary
#   ./x.sh build-cuda       build the CUDA-capable binary into target/cuda/simclr, and beside it
#                           libsimclr_graph.so, the CUDA graph shim (train.cuda_graph, bench --cuda-graph)
#   ./x.sh fuzz-check       compile the fuzz targets (fuzz/, a crate of its own)
#   ./x.sh fmt-check        every tracked Rust file formatted as rustfmt.toml says
#
# Everything builds in one profile (dev, optimised; see Cargo.toml). The
# tests build the two project crates once more with the fault-injection
# feature (test hooks the shipped binary must not have); cargo keeps both
# builds, so switching between `simclr` and `test` rebuilds nothing.
set -euo pipefail
cd "$(dirname "$0")"
if [ "${1:-}" = fmt-check ]; then
    # Every tracked file, not `cargo fmt`'s module tree: rustfmt does not
    # follow a `mod` declared by a macro, nor enter fuzz/, a crate of its own.
    # Needs no libtorch, so it runs before the installer.
    git ls-files -z '*.rs' | xargs -0 rustfmt --check --edition 2021
    exit
fi
env=$(scripts/libtorch.sh)
eval "$env"

case "${1:-}" in
    simclr)
        shift
        cargo build --quiet -p simclr-cli
        exec target/debug/simclr "$@"
        ;;
    test)
        shift
        exec cargo test --workspace --features simclr-cli/fault-injection "$@"
        ;;
    build)
        exec cargo build -p simclr-cli
        ;;
    build-cuda)
        # The feature keeps libtorch_cuda linked and compiles the c10d shim's
        # NCCL backend, against headers installed once (scripts/cuda-headers.sh);
        # the result is copied out of cargo's way.
        cuda_env=$(scripts/cuda-headers.sh)
        eval "$cuda_env"
        cargo build -p simclr-cli --features cuda
        mkdir -p target/cuda
        cp target/debug/simclr target/cuda/simclr
        # The CUDA graph shim is loaded at run time from beside the binary
        # (crates/simclr/src/cuda_graph.rs says why it is not linked in).
        g++ -std=c++17 -O2 -shared -fPIC -Wall -I"$LIBTORCH/include" -I"$LIBTORCH/include/torch/csrc/api/include" \
            -I"${SIMCLR_CUDA_INCLUDE%%:*}" crates/simclr/src/cuda_graph.cpp -L"$LIBTORCH/lib" \
            -L"$LIBTORCH/../nvidia/cu13/lib" -ltorch_cuda -ltorch_cpu -lc10_cuda -lc10 -l:libcudart.so.13 \
            -o target/cuda/libsimclr_graph.so
        echo "target/cuda/simclr and libsimclr_graph.so (run where CUDA and PyTorch 2.11's libraries are on LD_LIBRARY_PATH)"
        ;;
    fuzz-check)
        exec cargo check --quiet --locked --manifest-path fuzz/Cargo.toml --bins
        ;;
    *)
        echo "usage: ./x.sh simclr ARGS... | test [ARGS...] | build | build-cuda | fuzz-check | fmt-check" >&2
        exit 2
        ;;
esac
