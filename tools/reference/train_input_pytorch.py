#!/usr/bin/env python3
"""The PyTorch reference for issue 19's GPU check: SimCLR training fed from
JPEG files by torchvision's usual input pipeline, to set beside `simclr
train` with the hybrid path on the same files, model, batch and card.

Input: ImageFolder (PIL decoding) and the SimCLR ImageNet v2 transforms
(tools/reference/bench_augment.py's `pipeline`), two views per image, in a
DataLoader with --workers processes, pinned memory and non-blocking copies.
Model: torchvision ResNet-50 (`fc` removed), MLP head 2048-2048-128,
NT-Xent (tau 0.1), SGD with momentum; bf16 autocast and channels_last on
CUDA. Trains --epochs passes over the images and prints one JSON line with
the training images per second of every epoch after the first (which
starts the workers and pays cuDNN's autotuning).

    python tools/reference/train_input_pytorch.py --data DIR --workers 16 --batch-size 256 --epochs 4
"""
import argparse
import json
import time

import torch
import torchvision

from bench_augment import pipeline
from bench_input import TwoViews, data_loader
from train_pytorch import nt_xent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    dataset = torchvision.datasets.ImageFolder(args.data, transform=TwoViews(pipeline("simclr-imagenet", args.image_size)))
    loader = data_loader(dataset, args.batch_size, args.workers, pin_memory=cuda)
    encoder = getattr(torchvision.models, args.arch)()
    features = encoder.fc.in_features
    encoder.fc = torch.nn.Identity()
    head = torch.nn.Sequential(
        torch.nn.Linear(features, features), torch.nn.BatchNorm1d(features), torch.nn.ReLU(), torch.nn.Linear(features, 128)
    )
    model = torch.nn.Sequential(encoder, head).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-6)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    rates, waits = [], []
    for epoch in range(args.epochs):
        started, waited, images = time.perf_counter(), 0.0, 0
        asked = time.perf_counter()
        for views, _ in loader:
            waited += time.perf_counter() - asked
            x = views.to(device, non_blocking=True).transpose(0, 1).flatten(0, 1)
            x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                z = model(x)
            loss = nt_xent(z, 0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            images += views.shape[0]
            asked = time.perf_counter()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        if epoch > 0:
            rates.append(images / seconds)
            waits.append(waited / seconds)
    print(
        json.dumps(
            {
                "implementation": "pytorch-dataloader",
                "arch": args.arch,
                "batch_size": args.batch_size,
                "workers": args.workers,
                "images": len(dataset),
                "images_per_second": sum(rates) / max(len(rates), 1),
                "data_wait_share": sum(waits) / max(len(waits), 1),
                "loss": loss.item(),
            }
        )
    )


if __name__ == "__main__":
    main()
