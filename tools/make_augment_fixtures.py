#!/usr/bin/env python3
"""Writes torchvision reference outputs for each augmentation op, for given
parameters, that crates/simclr/tests/augment_parity.rs compares against.

Run by hand, never in CI (same venv as tools/make_fixtures.py), naming the
files to write (all of them by default):

    ~/.cache/simclr/venv/bin/python tools/make_augment_fixtures.py [augment] [crop_boxes] [vertical_flip]

Output: crates/simclr/tests/fixtures/augment.safetensors: the input image
(uint8, HWC) and one float CHW output per case; the case names carry no
parameters, the parameters are written out again in the Rust test.
crates/simclr/tests/fixtures/crop_boxes.safetensors: boxes drawn by
torchvision's RandomResizedCrop.get_params, whose distribution the Rust
sampler must match (the generators differ, so the boxes themselves cannot).
crates/simclr/tests/fixtures/augment_<op>.safetensors: ops added after the
first set, one file each (the input and the op's output), so that adding an
op never rewrites the fixtures of the others.
"""
import pathlib
import sys

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from safetensors.torch import save_file

OUT = pathlib.Path(__file__).resolve().parent.parent / "crates" / "simclr" / "tests" / "fixtures"


def test_image() -> np.ndarray:
    """40 rows x 48 columns: smooth colour ramps plus a seeded speckle, so
    every op has structure and colour to act on."""
    y, x = np.mgrid[0:40, 0:48]
    rng = np.random.default_rng(7)
    speckle = rng.integers(0, 40, size=(40, 48, 3))
    r = 40 + 4 * x + speckle[..., 0]
    g = 30 + 5 * y + speckle[..., 1]
    b = 200 - 2 * x - 2 * y + speckle[..., 2]
    return np.clip(np.stack([r, g, b], axis=-1), 0, 255).astype(np.uint8)


def chw(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def augment() -> None:
    image = test_image()
    pil = Image.fromarray(image)
    tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
    out = {"input": torch.from_numpy(image).contiguous()}

    # Resized crops on the PIL image, as torchvision v2 does for PIL input
    # (antialiased); quantised to 8 bits like the PIL output.
    def pil_crop(top, left, height, width, size, mode):
        cropped = TF.resized_crop(pil, top, left, height, width, [size, size], interpolation=mode, antialias=True)
        return chw(torch.from_numpy(np.asarray(cropped)).permute(2, 0, 1) / 255.0)

    bilinear, bicubic = TF.InterpolationMode.BILINEAR, TF.InterpolationMode.BICUBIC
    out["crop_enlarge_bilinear"] = pil_crop(5, 9, 16, 20, 32, bilinear)
    out["crop_shrink_bilinear"] = pil_crop(0, 4, 40, 40, 24, bilinear)
    out["crop_enlarge_bicubic"] = pil_crop(5, 9, 16, 20, 32, bicubic)

    out["flip"] = chw(TF.horizontal_flip(tensor))
    out["brightness"] = chw(TF.adjust_brightness(tensor, 1.3))
    out["contrast"] = chw(TF.adjust_contrast(tensor, 0.6))
    out["saturation"] = chw(TF.adjust_saturation(tensor, 1.7))
    out["hue"] = chw(TF.adjust_hue(tensor, 0.17))
    out["hue_negative"] = chw(TF.adjust_hue(tensor, -0.31))
    out["grayscale"] = chw(TF.rgb_to_grayscale(tensor, num_output_channels=3))
    out["blur"] = chw(TF.gaussian_blur(tensor, [5, 5], [1.3, 1.3]))
    out["blur_wide"] = chw(TF.gaussian_blur(tensor, [9, 9], [0.4, 0.4]))
    out["solarize"] = chw(TF.solarize(tensor, 0.5))

    square = tensor[:, :40, 4:44]
    out["square"] = chw(square)
    for turns in (1, 2, 3):
        out[f"rotate_{turns}"] = chw(TF.rotate(square, 90 * turns))

    # Random crop with padding 4: offset (down 3, right -2) is window (7, 2) of the padded image.
    padded = TF.pad(square, [4, 4, 4, 4], fill=0)
    out["pad_crop"] = chw(TF.crop(padded, 4 + 3, 4 - 2, 40, 40))
    out["cutout"] = chw(TF.erase(square, 10, 25, 16, 15, torch.tensor(0.0)))

    # Sobel: our definition (src/augment/sobel.rs) written with conv2d.
    gray = TF.rgb_to_grayscale(square.unsqueeze(0))
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).view(1, 1, 3, 3)
    padded_gray = F.pad(gray, [1, 1, 1, 1], mode="replicate")
    gx = F.conv2d(padded_gray, kx)
    gy = F.conv2d(padded_gray, kx.transpose(2, 3))
    out["sobel"] = chw((torch.sqrt(gx**2 + gy**2) / 4.0).clamp(max=1.0).expand(1, 3, 40, 40)[0])

    OUT.mkdir(parents=True, exist_ok=True)
    save_file(out, OUT / "augment.safetensors")
    print(f"wrote {len(out)} tensors to {OUT / 'augment.safetensors'}")


CROP_BOXES = 4000
# Width x height: wide, square, CIFAR's, and one so thin that ten tries
# rarely fit and the centre-crop fallback shows.
CROP_IMAGES = [(200, 100), (100, 100), (32, 32), (500, 60)]


def crop_boxes() -> None:
    """CROP_BOXES boxes (top, left, height, width) per image size from the
    paper's setting: scale (0.08, 1), ratio (3/4, 4/3)."""
    import torchvision.transforms as T

    torch.manual_seed(0)
    boxes = {}
    for width, height in CROP_IMAGES:
        image = torch.empty(3, height, width)
        drawn = [T.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(CROP_BOXES)]
        boxes[f"{width}x{height}"] = torch.tensor(drawn, dtype=torch.int16)
    save_file(boxes, OUT / "crop_boxes.safetensors")
    print(f"wrote {len(boxes)} sets of {CROP_BOXES} boxes to {OUT / 'crop_boxes.safetensors'}")


# Ops added after augment.safetensors: op name -> torchvision on the float CHW image.
NEW_OPS = {
    "vertical_flip": TF.vertical_flip,
}


def new_op(name: str) -> None:
    image = test_image()
    tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
    out = {"input": torch.from_numpy(image).contiguous(), name: chw(NEW_OPS[name](tensor))}
    path = OUT / f"augment_{name}.safetensors"
    save_file(out, path)
    print(f"wrote {path}")


def main() -> None:
    writers = {"augment": augment, "crop_boxes": crop_boxes}
    writers.update({name: (lambda name=name: new_op(name)) for name in NEW_OPS})
    names = sys.argv[1:] or list(writers)
    unknown = [name for name in names if name not in writers]
    if unknown:
        sys.exit(f"unknown fixture {unknown}: expected some of {list(writers)}")
    OUT.mkdir(parents=True, exist_ok=True)
    for name in names:
        writers[name]()


if __name__ == "__main__":
    main()
