# What every study script here starts with, sourced as
# `. "$(dirname "$0")/common.sh" "$@"`: the CIFAR-10 subset S (of
# tools/data/cifar10_subset.py) and the output folder OUT from the two
# arguments, checked and made absolute, then the working folder made the
# repository root; SIMCLR, the binary; PYTHON, the project's venv; and
# BASE, the training flags of the findings' CPU scale (docs/findings.md,
# "CPU scale").
study=$(basename "$0")
[ $# -eq 2 ] || { echo "usage: tools/studies/$study SUBSET OUT" >&2; exit 2; }
[ -d "$1/train" ] && [ -d "$1/test" ] || { echo "$study: $1 has no train/ and test/" >&2; exit 2; }
S=$(cd "$1" && pwd) OUT=$(realpath -m "$2")
cd "$(dirname "$0")/../.."
SIMCLR=${SIMCLR_BIN:-target/release/simclr}
[ -x "$SIMCLR" ] || { echo "$study: no $SIMCLR (cargo build --release -p simclr-cli, or set SIMCLR_BIN)" >&2; exit 2; }
PYTHON=$(tools/python.sh)
BASE=(--preset cifar10-fast --data "$S/train" --device cpu --batch-size 128 --epochs 10
      --set model.width_multiplier=0.25 --set train.checkpoint_every=5
      --set "data.knn_train_path=\"$S/train\"" --set "data.knn_test_path=\"$S/test\"")
