"""Write the bundled sample data: scikit-learn's 1,797 handwritten digits as PNG class folders."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from stages.imaging import IMAGE_EXTENSIONS

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def has_images(folder: Path) -> bool:
    """True if any image file sits anywhere below folder."""
    return folder.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS
                                   for p in folder.rglob("*") if p.is_file())


def write_digits(folder: Path, limit: int | None = None) -> int:
    """Save the digits (8x8, 17 grey levels) as 8-bit PNGs in folder/<name>/; returns the count."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    count = 0
    for i, (pixels, target) in enumerate(zip(digits.images, digits.target)):
        if limit is not None and i >= limit:
            break
        out = folder / NAMES[target] / f"{i:04d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(pixels * 255 / 16).astype(np.uint8), "L").save(out)
        count += 1
    return count


def main(argv: list[str]) -> None:
    """python -m stages.sample [FOLDER] [--limit N]: write the sample unless FOLDER has images."""
    folder = Path(argv[0]) if argv and not argv[0].startswith("-") else Path("data/raw")
    limit = int(argv[argv.index("--limit") + 1]) if "--limit" in argv else None
    if has_images(folder):
        print(f"{folder} already holds images: leaving it as it is")
        return
    print(f"wrote {write_digits(folder, limit)} sample digit images to {folder}/")


if __name__ == "__main__":
    main(sys.argv[1:])
