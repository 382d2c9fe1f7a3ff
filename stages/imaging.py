"""One way to turn any image file into the RGB pixels the model sees.

Preprocess and predict both call `load_pixels`, so a model always sees new
images exactly as it saw its training images.

Mode conversions, all ending in 8-bit RGB:
- EXIF orientation is applied first.
- 16-bit grayscale (I;16, I;16B, I;16L) is scaled from 0..65535 down to 0..255.
  32-bit modes (I, F) are scaled the same way if any value exceeds 255, else
  taken as 0..255 as they are; values outside the range are clipped.
- Transparency (RGBA, LA, PA, or a transparent colour in a palette, grayscale or
  RGB image) is composited on a fixed white background, so a transparent area
  always looks the same to the model.
- CMYK, palette, 1-bit, 8-bit grayscale, YCbCr, LAB and HSV go through Pillow's
  own RGB conversion (CMYK ignores any embedded ICC profile).
- Animated GIF and multi-page TIFF: only the first frame is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
RESIZE_MODES = ("squash", "crop")
DEFAULT_INTERPOLATION = "bicubic"  # images resized without pretrained weights to follow
INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                  "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}
BACKGROUND = (255, 255, 255)
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, the documented way (see module docstring)."""
    if img.mode in SIXTEEN_BIT or img.mode in ("I", "F"):
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))  # NaN in float TIFFs: 0
        top = 65535.0 if img.mode in SIXTEEN_BIT or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8)
        img = Image.fromarray(arr)
    if img.mode in ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")  # also turns a transparent colour into alpha
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def resize(img: Image.Image, size: int, mode: str, interpolation: str = DEFAULT_INTERPOLATION
           ) -> Image.Image:
    """Resize to size x size: `squash` stretches, `crop` scales the short side then centre-crops.

    Pillow filters downscaling by the whole scale (antialiased), as torchvision's Resize
    does on PIL images; interpolation is one of INTERPOLATIONS."""
    resample = INTERPOLATIONS[interpolation]
    if mode == "squash":
        return img.resize((size, size), resample, reducing_gap=3.0)
    if mode == "crop":
        return ImageOps.fit(img, (size, size), resample)  # no reducing_gap arg
    raise ValueError(f"unknown resize mode {mode!r}: use one of {RESIZE_MODES}")


class TooManyPixels(ValueError):
    """The image's header declares more pixels than the limit: a possible decompression bomb."""


def load_pixels(path: str | Path | BinaryIO, size: int, mode: str,
                max_pixels: int | None = None, interpolation: str = DEFAULT_INTERPOLATION
                ) -> np.ndarray:
    """Decode one image (a file, or an open binary file) into a (3, size, size) uint8 array.

    With max_pixels, an image whose header declares more pixels is refused before it is
    decoded (TooManyPixels); Pillow alone only warns below twice its own limit.
    """
    with Image.open(path) as img:
        if max_pixels is not None and img.width * img.height > max_pixels:
            raise TooManyPixels(f"too many pixels: {img.width}x{img.height} is more than "
                                f"{max_pixels} (a possible decompression bomb)")
        # JPEG can decode at 1/2, 1/4 or 1/8 scale for free; never below the target size.
        img.draft("RGB", (size, size))
        img = ImageOps.exif_transpose(img)
        img = resize(to_rgb(img), size, mode, interpolation)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()
