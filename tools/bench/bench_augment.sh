#!/usr/bin/env bash
# Augmentation throughput, ours against torchvision v2, on the same images
# and the same single core (both one thread), then ours on 2 threads:
#   tools/bench/bench_augment.sh            (ROUNDS=5 LIMIT=256 by default)
# Needs the fixture venv of tools/fixtures/make_fixtures.py (torch, torchvision).
# ImageNet-like inputs: 256 generated 500x375 JPEGs; CIFAR inputs: the first
# LIMIT images of ../shared/data/cifar10/test when present, else generated 32x32.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=$(tools/python.sh)
ROUNDS=${ROUNDS:-5}
LIMIT=${LIMIT:-256}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
./x.sh build >/dev/null
BIN=target/debug/simclr

"$PYTHON" - "$WORK" <<'PY'
import sys, pathlib
import numpy as np
from PIL import Image
root = pathlib.Path(sys.argv[1])
rng = np.random.default_rng(0)
for name, (w, h), count in [("large", (500, 375), 256), ("small", (32, 32), 256)]:
    (root / name).mkdir()
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        noisy = np.clip(np.asarray(coarse, dtype=np.int16) + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(root / name / f"{i:04d}.jpg", quality=90)
PY
SMALL="$WORK/small"
if [ -d ../shared/data/cifar10/test ]; then SMALL=../shared/data/cifar10/test; fi

printf '%-16s %5s %8s %14s %14s %7s %14s\n' pipeline size threads "ours views/s" "torchvision" ratio "ours 2 thr"
for spec in "simclr-imagenet 224 $WORK/large" "simclr-cifar 32 $SMALL"; do
  set -- $spec
  ours=$($BIN bench augment --data "$3" --pipeline "$1" --image-size "$2" --limit "$LIMIT" --rounds "$ROUNDS" --threads 1 --json)
  ours2=$($BIN bench augment --data "$3" --pipeline "$1" --image-size "$2" --limit "$LIMIT" --rounds "$ROUNDS" --threads 2 --json)
  theirs=$("$PYTHON" tools/reference/bench_augment.py --data "$3" --pipeline "$1" --image-size "$2" --limit "$LIMIT" --rounds "$ROUNDS")
  "$PYTHON" - "$1" "$2" "$ours" "$theirs" "$ours2" <<'PY'
import json, sys
name, size, ours, theirs, ours2 = sys.argv[1], sys.argv[2], *map(json.loads, sys.argv[3:])
a, b, c = ours["cpu_views_per_second"], theirs["views_per_second"], ours2["cpu_views_per_second"]
print(f"{name:<16} {size:>5} {1:>8} {a:>14.1f} {b:>14.1f} {a / b:>6.2f}x {c:>14.1f}")
PY
done
