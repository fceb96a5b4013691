#!/usr/bin/env python3
"""Packs an image folder tree into one blob plus an index, so a dataset of
many small files (CIFAR-10's 60,000 JPEGs: about 55 MB) travels to the GPU
machine in one call, and unpacks it there. Standard library only.

    python3 tools/device/pack_images.py pack ../shared/data/cifar10 device/cifar10
        -> device/cifar10.bin (the files' bytes back to back)
           device/cifar10.tsv (relative path, offset, length per file)
    python3 tools/device/pack_images.py unpack device/cifar10 /tmp/cifar10
        -> /tmp/cifar10/train/<class>/*.jpg, /tmp/cifar10/test/<class>/*.jpg
"""
import pathlib
import sys


def pack(source: pathlib.Path, target: pathlib.Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in source.rglob("*") if p.is_file())
    offset = 0
    with open(target.with_suffix(".bin"), "wb") as blob, open(target.with_suffix(".tsv"), "w") as index:
        for path in files:
            data = path.read_bytes()
            blob.write(data)
            index.write(f"{path.relative_to(source)}\t{offset}\t{len(data)}\n")
            offset += len(data)
    print(f"packed {len(files)} files, {offset / 1e6:.1f} MB, into {target.with_suffix('.bin')}")


def unpack(packed: pathlib.Path, target: pathlib.Path) -> None:
    data = packed.with_suffix(".bin").read_bytes()
    count = 0
    for line in packed.with_suffix(".tsv").read_text().splitlines():
        name, offset, length = line.split("\t")
        path = target / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data[int(offset) : int(offset) + int(length)])
        count += 1
    print(f"unpacked {count} files into {target}")


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("pack", "unpack"):
        sys.exit(__doc__)
    (pack if sys.argv[1] == "pack" else unpack)(pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3]))
