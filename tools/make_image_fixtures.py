#!/usr/bin/env python3
"""Writes the image fixtures that Rust cannot write itself, for the
bad-input corpus in crates/simclr/tests/bad_input.rs (run by hand, same
venv as tools/make_fixtures.py):

    ~/.cache/simclr/venv/bin/python tools/make_image_fixtures.py

Output, in crates/simclr/tests/fixtures/: cmyk.jpg (a 24x16 CMYK JPEG, as
print workflows and some photo libraries save them: left half pure red,
right half pure blue) and progressive.jpg (the same picture in RGB,
progressive encoding).
"""
import pathlib

from PIL import Image

OUT = pathlib.Path(__file__).resolve().parent.parent / "crates" / "simclr" / "tests" / "fixtures"


def main() -> None:
    picture = Image.new("RGB", (24, 16))
    for x in range(24):
        for y in range(16):
            picture.putpixel((x, y), (220, 20, 20) if x < 12 else (20, 20, 220))
    picture.convert("CMYK").save(OUT / "cmyk.jpg", quality=95)
    picture.save(OUT / "progressive.jpg", quality=95, progressive=True)
    print("wrote", OUT / "cmyk.jpg", OUT / "progressive.jpg")


if __name__ == "__main__":
    main()
