#!/usr/bin/env python3
"""Writes a copy of an ImageFolder in which each image is turned by a fixed
number of quarter turns counter-clockwise (0 to 3), drawn once per file:
the data of docs/findings.md's study of why rotation hurts in Figure 5.

    tools/python.sh  # prints the venv's python, with Pillow
    python tools/data/rotated_copy.py /tmp/cifar10-subset/train /tmp/rotated/train --upright 0.5

An image stays upright with probability --upright, and is otherwise turned
by 90, 180 or 270 degrees, each equally likely: --upright 0.5 matches the
orientations a crop-and-rotation pair of Figure 5 trains on (one view
upright, the other turned by 1 to 3 quarter turns), --upright 0.25 makes
every orientation equally likely. The draw is a hash of (--seed, the file's
path under the source), so it does not depend on the order files are read
in or on which other files exist. Images are written as PNG, losslessly,
so a turned image holds exactly the decoded source's pixels (upright ones
too: every image of the copy goes through the same decoder).
`orientations.csv` beside the classes lists each file's quarter turns.
Never committed: generate it where it is needed.
"""
import argparse
import hashlib
import pathlib
import sys

from PIL import Image

SUFFIXES = (".jpg", ".jpeg", ".png")
TURNS = {1: Image.Transpose.ROTATE_90, 2: Image.Transpose.ROTATE_180, 3: Image.Transpose.ROTATE_270}


def quarter_turns(seed: int, relative: str, upright: float) -> int:
    """0 with probability `upright`, else 1, 2 or 3 alike, from a hash."""
    digest = hashlib.sha256(f"{seed}/{relative}".encode()).digest()
    uniform = int.from_bytes(digest[:8], "little") / 2**64
    if uniform < upright:
        return 0
    return 1 + min(2, int((uniform - upright) / (1.0 - upright) * 3))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("source", type=pathlib.Path, help="an ImageFolder: <source>/<class>/<image>")
    parser.add_argument("target", type=pathlib.Path, help="a folder that does not exist yet, or an empty one")
    parser.add_argument("--upright", type=float, default=0.5, help="the share of images left upright")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0.0 <= args.upright <= 1.0:
        sys.exit(f"rotated_copy.py: --upright {args.upright} is not a probability")
    if not args.source.is_dir():
        sys.exit(f"rotated_copy.py: no folder {args.source}")
    if args.target.exists() and any(args.target.iterdir()):
        sys.exit(f"rotated_copy.py: {args.target} is not empty")
    classes = sorted(p for p in args.source.iterdir() if p.is_dir())
    if not classes:
        sys.exit(f"rotated_copy.py: {args.source} has no class folders")
    rows = ["path,quarter_turns"]
    counts = [0, 0, 0, 0]
    for folder in classes:
        (args.target / folder.name).mkdir(parents=True)
        for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES):
            relative = f"{folder.name}/{image.name}"
            turns = quarter_turns(args.seed, relative, args.upright)
            with Image.open(image) as opened:
                pixels = opened.convert("RGB")
            if turns:
                pixels = pixels.transpose(TURNS[turns])
            written = f"{folder.name}/{image.stem}.png"
            pixels.save(args.target / written)
            rows.append(f"{written},{turns}")
            counts[turns] += 1
    (args.target / "orientations.csv").write_text("\n".join(rows) + "\n")
    total = sum(counts)
    shares = ", ".join(f"{90 * k} degrees {counts[k] / total:.1%}" for k in range(4))
    print(f"rotated_copy.py: {total} images to {args.target} ({shares})")


if __name__ == "__main__":
    main()
