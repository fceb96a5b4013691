#!/usr/bin/env python3
"""Writes an ImageNet-like folder of JPEGs for the input benchmarks and tests
(issue 19): mixed sizes drawn around ImageNet's, natural-image content.

    python tools/data/make_imagenet_like.py --output /tmp/imagenet-like --count 3000

Each image is a CIFAR-10 training image (ImageFolder, default
../shared/data/cifar10/train) upscaled with bicubic interpolation to the
drawn size, plus Gaussian noise (sigma 16) so that the JPEG carries detail
at full resolution: about 0.45 bytes per pixel at quality 90 with 4:2:0
chroma, near ImageNet's 0.6 (an upscaled image without noise compresses to
a third of that and decodes faster than real photographs would). The
layout is ImageFolder (<output>/<class>/<n>.jpg), classes taken round-robin
from the source.

Sizes: ImageNet's training set has a mean near 470x390 and most images 500
pixels on the long side; here the long side is 500 with probability 0.55
and otherwise log-normal around 480 (sigma 0.45, clipped to 160-1600);
aspect ratios 4:3 (0.6), 3:2 (0.15), 1:1 (0.1), 16:9 (0.1), 5:4 (0.05), a
quarter of them portrait. With --long-side every image has that long side
(the same aspect ratios): large photographs, where reduced-scale decoding
pays most. Deterministic for a given --seed and --start (parts made with
--start 0, 250, 500, ... in parallel fill one folder). Never committed:
generate it where it is needed.
"""
import argparse
import pathlib

import numpy as np
from PIL import Image

ASPECTS = [(4 / 3, 0.6), (3 / 2, 0.15), (1.0, 0.1), (16 / 9, 0.1), (5 / 4, 0.05)]


def draw_size(rng: np.random.Generator, long_side: int | None) -> tuple[int, int]:
    if long_side is not None:
        pass
    elif rng.random() < 0.55:
        long_side = 500
    else:
        long_side = int(np.clip(np.exp(rng.normal(np.log(480), 0.45)), 160, 1600))
    ratios, weights = zip(*ASPECTS)
    ratio = ratios[rng.choice(len(ratios), p=weights)]
    short_side = max(32, round(long_side / ratio))
    return (short_side, long_side) if rng.random() < 0.25 else (long_side, short_side)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="../shared/data/cifar10/train")
    parser.add_argument("--output", required=True)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", type=int, default=0, help="number of the first image (to generate in parallel parts)")
    parser.add_argument("--long-side", type=int, help="every image this long (e.g. 2000, a phone photo's scale)")
    args = parser.parse_args()
    source = pathlib.Path(args.source)
    classes = sorted(p for p in source.iterdir() if p.is_dir()) if source.is_dir() else []
    if not classes:
        raise SystemExit(f"{source}: expected an ImageFolder of source images (class sub-folders)")
    files = [sorted(c.glob("*.jpg")) + sorted(c.glob("*.png")) for c in classes]
    rng = np.random.default_rng([args.seed, args.start])
    output = pathlib.Path(args.output)
    for n in range(args.start, args.start + args.count):
        label = n % len(classes)
        path = files[label][(n // len(classes)) % len(files[label])]
        width, height = draw_size(rng, args.long_side)
        image = Image.open(path).convert("RGB").resize((width, height), Image.BICUBIC)
        noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 16, (height, width, 3))
        folder = output / classes[label].name
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(folder / f"{n:06d}.jpg", quality=90)
    print(f"wrote {args.count} images in {len(classes)} classes to {output}")


if __name__ == "__main__":
    main()
