#!/usr/bin/env python3
"""Links the first N training and M test images of each CIFAR-10 class into
a new ImageFolder (train/<class>/, test/<class>/): the CPU-scale data of the
time-to-accuracy race (tools/bench/race_cpu.sh) and of the studies in
docs/findings.md. Symbolic links, never copies; "first" in sorted file-name
order, so every machine gets the same images.

    python3 tools/data/cifar10_subset.py ../shared/data/cifar10 /tmp/cifar10-subset --train 500 --test 100
"""
import argparse
import os
import pathlib
import sys

SUFFIXES = (".jpg", ".jpeg", ".png")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("source", type=pathlib.Path, help="CIFAR-10 as train/<class>/ and test/<class>/")
    parser.add_argument("target", type=pathlib.Path, help="a folder that does not exist yet, or an empty one")
    parser.add_argument("--train", type=int, default=500, help="training images per class")
    parser.add_argument("--test", type=int, default=100, help="test images per class")
    args = parser.parse_args()
    if args.target.exists() and any(args.target.iterdir()):
        sys.exit(f"cifar10_subset.py: {args.target} is not empty")
    for split, per_class in (("train", args.train), ("test", args.test)):
        root = args.source / split
        if not root.is_dir():
            sys.exit(f"cifar10_subset.py: no {root} (expected CIFAR-10 as train/<class>/ and test/<class>/)")
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            images = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES)
            if len(images) < per_class:
                sys.exit(f"cifar10_subset.py: {folder} has {len(images)} images, fewer than {per_class}")
            (args.target / split / folder.name).mkdir(parents=True)
            for image in images[:per_class]:
                os.symlink(image.resolve(), args.target / split / folder.name / image.name)


if __name__ == "__main__":
    main()
