#!/usr/bin/env bash
# Installs libtorch 2.11.0 (the CPU+CUDA 13.0 build shipped in the registry's
# `torch==2.11.0` wheel) into a cache outside the checkout, once, and prints
# the environment that points tch at it:
#
#   env=$(scripts/libtorch.sh) && eval "$env"
#
# (not `eval "$(scripts/libtorch.sh)"`: eval of a failed substitution
# succeeds, and the build would then fail later with a vaguer message).
#
# Only torch/{lib,include,share} are unpacked, plus the two CUDA runtime
# libraries that libtorch_cpu.so itself links (libcudart, libcupti); the rest
# of the CUDA stack is needed only on a GPU machine, which has PyTorch.
#
# Safe to run from several terminals at once: the install is serialised by a
# lock on the cache, each wheel is pinned by version and sha256 (so pip can
# neither pick a placeholder such as nvidia-cuda-runtime 0.0.0a0 nor keep a
# truncated download), the unpacked files are checked against the wheels'
# listings, and the install appears under its final name, `.complete`
# included, by one rename. An interrupted install leaves only a temporary
# folder that the next run removes. Failures print one line naming the
# package and pip's reason, and exit non-zero.
set -euo pipefail
# shellcheck source=scripts/pinned-wheels.sh
source "$(dirname "$0")/pinned-wheels.sh"

TORCH_VERSION=2.11.0
# Every file the install needs, as pip would name it: the wheel's exact
# version and sha256. The platform tags below cover each wheel's own tag
# (torch: manylinux_2_28; cuda-runtime: manylinux2014 = manylinux_2_17;
# cupti: manylinux_2_25): `pip download --platform` accepts only the tags it
# is given, not the older ones a machine would also accept.
WHEELS_PINNED=(
    "torch==$TORCH_VERSION sha256:7aa2f9bbc6d4595ba72138026b2074be1233186150e9292865e04b7a63b8c67a"
    "nvidia-cuda-runtime==13.0.96 sha256:7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548"
    "nvidia-cuda-cupti==13.0.85 sha256:4eb01c08e859bf924d222250d2e8f8b8ff6d3db4721288cf35d14252a4d933c8"
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_26_x86_64
    manylinux_2_25_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)
CACHE_ROOT=${SIMCLR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/simclr}
PREFIX=$CACHE_ROOT/libtorch-$TORCH_VERSION

fail() {
    echo "scripts/libtorch.sh: $*" >&2
    exit 1
}

# Only the members tch needs, by zipfile (no `unzip` on every machine);
# zipfile checks each member's CRC as it reads it, and the sizes on disk are
# compared with the listing afterwards.
unpack() {
    "$python" - "$1" "$2" "$TORCH_VERSION" "${WHEELS_PINNED[@]}" <<'PY'
import pathlib, sys, zipfile
target, folder, torch_version = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
keep = ("torch/lib/", "torch/include/", "torch/share/", "nvidia/cu13/lib/")
expected = 0
for requirement in sys.argv[4:]:
    name, version = requirement.split(" ")[0].split("==")
    (wheel,) = folder.glob(f"{name.replace('-', '_')}-{version}-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.infolist() if m.filename.startswith(keep) and not m.is_dir()]
        if not members:
            sys.exit(f"{wheel.name} holds none of {keep}")
        archive.extractall(target, members)
        for member in members:
            size = (target / member.filename).stat().st_size
            if size != member.file_size:
                sys.exit(f"{member.filename}: unpacked {size} bytes, the wheel lists {member.file_size}")
        expected += len(members)
found = sum(1 for path in target.rglob("*") if path.is_file())
if found != expected:
    sys.exit(f"unpacked {found} files, the wheels list {expected}")
# tch checks this file against the version it was written for.
(target / "torch" / "build-version").write_text(torch_version + "\n")
(target / ".complete").write_text(f"{expected} files from {len(sys.argv) - 4} wheels\n")
PY
}

install_once "libtorch-$TORCH_VERSION" "libtorch $TORCH_VERSION" "about 1 GB"

echo "export LIBTORCH='$PREFIX/torch'"
