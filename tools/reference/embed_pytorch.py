#!/usr/bin/env python3
"""The PyTorch reference for `simclr embed`: h of a torchvision ResNet (the
chosen stem, `fc` removed, channels_last, eval mode, no gradients) for every
image below a folder, sorted by path, written as a float32 `.npy` matrix.
Images are decoded by PIL, resized (shorter side, bilinear with antialias)
and centre-cropped, and normalised, as torchvision's transforms do and as
`simclr embed` does; `--precision bf16` runs the forward pass under
`torch.autocast` in bf16, as `simclr embed --precision bf16` does. Prints
one JSON line with the time taken.

    "$(tools/python.sh)" tools/reference/embed_pytorch.py --weights w.safetensors \
        --arch resnet18 --stem cifar --image-size 32 --input DIR --output feats.npy

`--make-weights PATH` writes a randomly initialised encoder in torchvision's
names (what `simclr embed --weights` reads) and exits. tools/bench/bench_embed.sh
times this script against `simclr embed` on the same images.
"""
import time

STARTED = time.perf_counter()  # before `import torch`: part of what a user waits for

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torchvision import transforms  # noqa: E402

EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def encoder(arch, stem):
    model = getattr(torchvision.models, arch)()
    model.fc = torch.nn.Identity()
    if stem == "cifar":
        model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = torch.nn.Identity()
    return model


def image_files(root):
    files = []
    for folder, _, names in os.walk(root):
        files += [os.path.join(folder, n) for n in names if os.path.splitext(n)[1].lower() in EXTENSIONS]
    return sorted(files)


class Images(torch.utils.data.Dataset):
    def __init__(self, files, transform):
        self.files, self.transform = files, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        with Image.open(self.files[index]) as image:
            return self.transform(image.convert("RGB"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights")
    parser.add_argument("--make-weights", help="write a random encoder's weights here and exit")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--stem", default="cifar", choices=["cifar", "imagenet"])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--mean", default="0.485,0.456,0.406")
    parser.add_argument("--std", default="0.229,0.224,0.225")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--input")
    parser.add_argument("--output")
    args = parser.parse_args()
    if args.make_weights:
        torch.manual_seed(0)
        save_file(encoder(args.arch, args.stem).state_dict(), args.make_weights)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True

    model = encoder(args.arch, args.stem)
    state = {k.removeprefix("encoder."): v for k, v in load_file(args.weights).items()}
    model.load_state_dict(state)
    model = model.to(device, memory_format=torch.channels_last).eval()

    mean = [float(v) for v in args.mean.split(",")]
    std = [float(v) for v in args.std.split(",")]
    transform = transforms.Compose([
        transforms.Resize(args.image_size, antialias=True),
        transforms.CenterCrop(args.image_size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])
    files = image_files(args.input)
    loader = torch.utils.data.DataLoader(
        Images(files, transform), batch_size=args.batch_size, num_workers=args.workers,
        pin_memory=device.type == "cuda")
    loop_started = time.perf_counter()
    chunks = []
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    with torch.no_grad(), bf16:
        for images in loader:
            images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            chunks.append(model(images).float().cpu())
    features = torch.cat(chunks).numpy()
    loop_seconds = time.perf_counter() - loop_started
    np.save(args.output, features)
    print(json.dumps({
        "implementation": f"pytorch {torch.__version__}",
        "device": str(device),
        "threads": torch.get_num_threads(),
        "workers": args.workers,
        "precision": args.precision,
        "images": len(files),
        "feature_dim": int(features.shape[1]),
        "embed_seconds": loop_seconds,
        "total_seconds": time.perf_counter() - STARTED,
    }))


if __name__ == "__main__":
    main()
