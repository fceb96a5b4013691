#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpus, fuzz/seeds/<target>/, which is
committed. Standard library only; run by hand from the repository root:

    python3 fuzz/make_seeds.py

Seeds: the example configs, the JPEG test fixtures plus a small PNG and BMP
drawn here, one small safetensors file with the checksum simclr writes (CRC-32 of
name and bytes), and
CIFAR-10 and CIFAR-100 batches of two records each.
"""
import json
import pathlib
import shutil
import struct
import zlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
SEEDS = ROOT / "fuzz" / "seeds"


def gradient(width, height):
    """Rows of RGB bytes: red across, green down, blue constant."""
    return [bytes(v for x in range(width) for v in (x * 255 // width, y * 255 // height, 96)) for y in range(height)]


def png(width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\0" + row for row in gradient(width, height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def bmp(width, height):
    stride = (width * 3 + 3) // 4 * 4
    # Bottom-up rows of BGR, each padded to 4 bytes.
    pixels = b"".join(
        bytes(row[i + 2 - c] for i in range(0, len(row), 3) for c in range(3)).ljust(stride, b"\0")
        for row in reversed(gradient(width, height))
    )
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(pixels), 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info) + len(pixels), 0, 0, 14 + len(info)) + info + pixels


def safetensors():
    data = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)
    header = {
        "__metadata__": {"simclr_crc32": f"{zlib.crc32(b'w' + data):08x}"},
        "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, len(data)]},
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(text)) + text + data


def cifar(label_bytes):
    def record(labels, value):
        return bytes(labels) + bytes([value]) * 1024 + bytes(1024) + bytes([255 - value]) * 1024

    labels = [(3,), (9,)] if label_bytes == 1 else [(1, 42), (19, 99)]
    return record(labels[0], 200) + record(labels[1], 10)


def main():
    if SEEDS.exists():
        shutil.rmtree(SEEDS)
    files = {
        "image_decode/gradient.png": png(24, 16),
        "image_decode/gradient.bmp": bmp(24, 16),
        "safetensors_load/small.safetensors": safetensors(),
        "cifar_batch/cifar10.bin": cifar(1),
        "cifar_batch/cifar100.bin": cifar(2),
    }
    for fixture in ("cmyk.jpg", "progressive.jpg"):
        files[f"image_decode/{fixture}"] = (ROOT / "crates/simclr/tests/fixtures" / fixture).read_bytes()
    for config in sorted((ROOT / "configs").glob("*.toml")):
        files[f"run_config/{config.name}"] = config.read_bytes()
    for name, data in sorted(files.items()):
        path = SEEDS / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        print(f"fuzz/seeds/{name}: {len(data)} bytes")


if __name__ == "__main__":
    main()
