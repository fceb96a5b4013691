#!/usr/bin/env python3
"""The torchvision reference for `simclr bench input`: ImageFolder (PIL
decoding) and the SimCLR v2 transforms, two views per image, in a
DataLoader with the same number of workers, on the same files.

    python tools/reference/bench_input.py --data DIR --workers 2 --limit 600

Prints one JSON line: {"images_per_second": ...}, training images (two
normalised float views each) per second, after a first batch that is not
timed, as ours. tools/bench/bench_input.sh runs it beside the Rust benchmark.
"""
import argparse
import json
import time

import torch
import torchvision
from torch.utils.data import DataLoader, Subset

from bench_augment import pipeline


class TwoViews:
    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image):
        return torch.stack([self.transform(image), self.transform(image)])


def data_loader(dataset, batch_size: int, workers: int, pin_memory: bool = False) -> DataLoader:
    """Shuffled full batches from `workers` processes that stay up between epochs."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        pin_memory=pin_memory,
        persistent_workers=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--pipeline", default="simclr-imagenet")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    dataset = torchvision.datasets.ImageFolder(args.data, transform=TwoViews(pipeline(args.pipeline, args.image_size)))
    if args.limit is not None:
        dataset = Subset(dataset, range(min(args.limit, len(dataset))))
    loader = data_loader(dataset, args.batch_size, args.workers)
    batches = iter(loader)
    next(batches)  # starts the workers: not timed, as ours
    started = time.perf_counter()
    done = 0
    for round in range(args.rounds):
        for views, _ in batches:
            done += views.shape[0]
        batches = iter(loader)
    seconds = time.perf_counter() - started
    print(json.dumps({"images_per_second": done / seconds, "images": len(dataset), "workers": args.workers}))


if __name__ == "__main__":
    main()
