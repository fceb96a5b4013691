#!/usr/bin/env python3
"""The torchvision v2 reference for `simclr bench augment`: the same
SimCLR pipelines on the same decoded images, one process, one thread.

    python tools/reference/bench_augment.py --data DIR --pipeline simclr-imagenet --image-size 224

Prints one JSON line: {"views_per_second": ...}. Decoding is not timed;
each view ends as a normalised float CHW tensor, as ours does.
tools/bench/bench_augment.sh runs this beside the Rust benchmark.
"""
import argparse
import json
import pathlib
import time

import torch
import torchvision.transforms.v2 as T
from PIL import Image


def pipeline(name: str, size: int) -> T.Compose:
    strength = 1.0 if name == "simclr-imagenet" else 0.5
    ops = [
        T.RandomResizedCrop(size, antialias=True),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ]
    if name == "simclr-imagenet":
        kernel = 2 * (size // 10 // 2) + 1
        ops.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5))
    ops += [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
    return T.Compose(ops)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--pipeline", default="simclr-imagenet")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--limit", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    paths = sorted(p for p in pathlib.Path(args.data).rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    images = [Image.open(p).convert("RGB") for p in paths[: args.limit]]
    transform = pipeline(args.pipeline, args.image_size)
    for image in images:
        transform(image)
    started = time.perf_counter()
    for _ in range(args.rounds):
        for image in images:
            transform(image)
    seconds = time.perf_counter() - started
    print(json.dumps({"views_per_second": args.rounds * len(images) / seconds, "images": len(images)}))


if __name__ == "__main__":
    main()
