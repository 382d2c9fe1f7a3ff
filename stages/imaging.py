"""One way to turn any image file into the RGB pixels the model sees.

Preprocess and predict both call `load_pixels`, so a model always sees new
images exactly as it saw its training images.

Mode conversions, all ending in 8-bit RGB:
- EXIF orientation is applied first.
- Transparency (RGBA, LA, palette with a transparent colour) is composited on white.
- 16- and 32-bit grayscale (I;16, I, F) is scaled from its full range down to 8 bits.
- CMYK, palette, 1-bit and 8-bit grayscale go through Pillow's own RGB conversion.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
RESIZE_MODES = ("squash", "crop")
BACKGROUND = (255, 255, 255)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, the documented way (see module docstring)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8)
        img = Image.fromarray(arr, "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def resize(img: Image.Image, size: int, mode: str) -> Image.Image:
    """Resize to size x size: `squash` stretches, `crop` scales the short side then centre-crops."""
    if mode == "squash":
        return img.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
    if mode == "crop":
        return ImageOps.fit(img, (size, size), Image.Resampling.BICUBIC)  # no reducing_gap arg
    raise ValueError(f"unknown resize mode {mode!r}: use one of {RESIZE_MODES}")


def load_pixels(path: str | Path, size: int, mode: str) -> np.ndarray:
    """Decode one image file into a (3, size, size) uint8 array."""
    with Image.open(path) as img:
        # JPEG can decode at 1/2, 1/4 or 1/8 scale for free; never below the target size.
        img.draft("RGB", (size, size))
        img = ImageOps.exif_transpose(img)
        img = resize(to_rgb(img), size, mode)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()
