#!/usr/bin/env python3
"""Checks a module written by `simclr export` as a PyTorch user runs it:
`torch.jit.load`, then its `forward` on the images whose features
`simclr embed` wrote with the same weights. Each image listed in the
`.paths.txt` beside the features is decoded by PIL, resized (shorter side,
bilinear with antialias) and centre-cropped to `--image-size` as embed does,
and given to the module as RGB floats in [0, 1]; the module normalises. The
largest difference from embed's features, relative to the largest feature,
is printed as one JSON line; exit status 1 above `--tolerance`. On PNG
images the module alone is compared (the same pixels on both sides: 2.6e-7
for the demo's encoder on 60 CIFAR-10 test images); on JPEGs the decoders
differ too (zune-jpeg in embed, libjpeg-turbo in PIL: 5.0e-3 on the same
images), so give those `--tolerance 1e-2`. Run by hand:

    simclr export --weights runs/x/encoder.safetensors --output encoder.pt
    simclr embed --weights runs/x/encoder.safetensors --input DIR --output feats.npy --device cpu
    "$(tools/python.sh)" tools/reference/check_torchscript.py encoder.pt feats.npy --image-size 32

`--device cuda` runs the module there, moved by `.to()` as `model.cuda()`
moves one (`--map-location` loads it there instead), and `--dtype` converts
it and the images as `model.to(dtype)` does (bfloat16 or float16: give a
looser `--tolerance`, e.g. 3e-2). The JSON line also counts the module's
buffers (its weights; a trace's constants would be none).
"""
import argparse
import json
import sys

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("module", help="the TorchScript file simclr export wrote")
    parser.add_argument("features", help="the .npy simclr embed wrote (its .paths.txt beside it)")
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--map-location", action="store_true", help="load it on --device, not move it there")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    if args.map_location:
        module = torch.jit.load(args.module, map_location=args.device)
    else:
        module = torch.jit.load(args.module).to(args.device)
    module = module.to(dtype).eval()
    ours = np.load(args.features)
    paths_file = args.features[: -len(".npy")] + ".paths.txt"
    with open(paths_file) as listing:
        paths = [line.rstrip("\n") for line in listing if line.strip()]
    if len(paths) != len(ours):
        sys.exit(f"{paths_file}: {len(paths)} paths for {len(ours)} rows of {args.features}")

    rows = []
    for start in range(0, len(paths), 64):
        batch = []
        for path in paths[start : start + 64]:
            with Image.open(path) as image:
                image = image.convert("RGB")
            image = functional.resize(image, args.image_size, antialias=True)
            batch.append(functional.to_tensor(functional.center_crop(image, args.image_size)))
        with torch.no_grad():
            rows.append(module(torch.stack(batch).to(args.device, dtype)).float().cpu().numpy())
    theirs = np.concatenate(rows)

    if theirs.shape != ours.shape:
        sys.exit(f"the module gave features of shape {theirs.shape}, embed wrote {ours.shape}")
    difference = float(np.abs(theirs - ours).max() / np.abs(ours).max())
    report = {"images": len(paths), "features": theirs.shape[1], "device": args.device, "dtype": args.dtype}
    report["buffers"] = len(list(module.buffers()))
    report["relative_difference"] = difference
    print(json.dumps(report))
    if difference > args.tolerance:
        sys.exit(f"the module's features differ from embed's by {difference:.2e} (allowed {args.tolerance:.0e})")


if __name__ == "__main__":
    main()
