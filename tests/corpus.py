"""A messy image folder made by code: one file for each case the index stage must handle.

`write_corpus(repo)` fills repo/data/raw and returns what should become of every
entry: a row of the manifest with its class, a line of data/rejects.csv with the
kind of reason, or skipped (counted in the summary, in neither file). Index it
with `index.max_pixels = MAX_PIXELS`, so that BOMB is over the limit while every
other image is far below it.
"""

from __future__ import annotations

import io
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from struct import pack

import numpy as np
from PIL import Image

MAX_PIXELS = 5000   # the bomb has 100x100 pixels; every other image 12x10
SIZE = (12, 10)
RAW = "data/raw"

# Files that tests look at more closely.
ROTATED = f"{RAW}/Dog Photos/rotated.jpg"          # 12x10 stored, EXIF: rotate 90 degrees
ANIMATED = f"{RAW}/cat/anim.gif"                   # red first frame, blue second
TRANSPARENT = f"{RAW}/Dog Photos/transparent.png"  # RGBA, fully transparent
GRAY16 = f"{RAW}/Dog Photos/gray16.png"            # I;16, every pixel 32768
TRUNCATED = f"{RAW}/café-ñ/truncated.jpg"          # first half of a JPEG
BOMB = f"{RAW}/café-ñ/bomb.png"
SINGLE = f"{RAW}/single/only.png"


@dataclass(frozen=True)
class Expect:
    """What the index must make of one entry of the corpus."""

    path: str      # as the outputs show it: relative to the repo, posix
    outcome: str   # "manifest", "reject" or "skip"
    detail: str = ""  # the class for "manifest", the kind of reason for "reject"


def encode(img: Image.Image, fmt: str, **options: object) -> bytes:
    """An image file's bytes."""
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def noise(mode: str, seed: int, size: tuple[int, int] = SIZE) -> Image.Image:
    """Random pixels in any raw Pillow mode: every seed gives different bytes."""
    bits = {"1": 1, "L": 8, "P": 8, "LA": 16, "RGB": 24, "RGBA": 32, "CMYK": 32, "I;16": 16}
    rowbytes = (size[0] * bits[mode] + 7) // 8
    data = np.random.default_rng(seed).bytes(rowbytes * size[1])
    if mode == "P":
        img = Image.frombytes("L", size, data).convert("RGB").quantize(16)
        return img
    return Image.frombytes(mode, size, data)


def bomb_header_png(width: int, height: int) -> bytes:
    """A PNG that claims width x height grey pixels but holds only a few bytes of them."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return pack(">I", len(body)) + kind + body + pack(">I", zlib.crc32(kind + body))

    header = pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b""))


def write_corpus(repo: Path, outside: Path, dvc_safe: bool = False) -> list[Expect]:
    """Write the corpus into repo/data/raw; returns the expected outcome of every entry.

    dvc_safe leaves out what `dvc add` refuses or changes: symlinks and a file name
    that is not UTF-8. `outside` is a folder outside the repo for escaping symlinks.
    """
    expect: list[Expect] = []
    seed = iter(range(1000, 2000))

    def put(rel: str, data: bytes, outcome: str, detail: str = "") -> None:
        path = repo / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if outcome:
            expect.append(Expect(rel, outcome, detail))

    def image(rel: str, fmt: str, mode: str = "RGB", cls: str = "", **options: object) -> bytes:
        data = encode(noise(mode, next(seed)), fmt, **options)
        put(rel, data, "manifest", cls or rel.split("/")[2])
        return data

    # cat: every format, any case of extension, junk, hidden entries, nesting, symlinks.
    image(f"{RAW}/cat/photo.jpg", "JPEG")
    image(f"{RAW}/cat/UPPER.JPG", "JPEG")
    image(f"{RAW}/cat/long.jpeg", "JPEG")
    image(f"{RAW}/cat/photo.png", "PNG")
    image(f"{RAW}/cat/photo.bmp", "BMP")
    image(f"{RAW}/cat/photo.webp", "WEBP", lossless=True)
    image(f"{RAW}/cat/photo.tif", "TIFF")
    image(f"{RAW}/cat/scan.TIFF", "TIFF", compression="tiff_lzw")
    image(f"{RAW}/cat/nested/deeper/inner.png", "PNG")
    red, blue = Image.new("RGB", SIZE, (255, 0, 0)), Image.new("RGB", SIZE, (0, 0, 255))
    put(ANIMATED, encode(red, "GIF", save_all=True, append_images=[blue], duration=100,
                         loop=0), "manifest", "cat")
    put(f"{RAW}/cat/notes.txt", b"taken in 2019\n", "skip")
    put(f"{RAW}/cat/labels.csv", b"file,label\nphoto.jpg,cat\n", "skip")
    put(f"{RAW}/cat/README", b"cats\n", "skip")
    put(f"{RAW}/cat/.DS_Store", b"\0\0\0\1Bud1" + bytes(64), "skip")
    put(f"{RAW}/cat/._photo.jpg", b"\0\5\x16\7\0\2\0\0Mac OS X        " + bytes(32), "skip")
    put(f"{RAW}/cat/.ipynb_checkpoints/photo-checkpoint.jpg",
        encode(noise("RGB", next(seed)), "JPEG"), "")
    expect.append(Expect(f"{RAW}/cat/.ipynb_checkpoints", "skip"))

    # Dog Photos: every image mode, and EXIF rotation.
    for name, mode in [("gray", "L"), ("palette", "P"), ("rgba", "RGBA"), ("la", "LA"),
                       ("bilevel", "1")]:
        image(f"{RAW}/Dog Photos/{name}.png", "PNG", mode)
    image(f"{RAW}/Dog Photos/palette-alpha.png", "PNG", "P", transparency=0)
    image(f"{RAW}/Dog Photos/palette-alpha.gif", "GIF", "P", transparency=3)
    image(f"{RAW}/Dog Photos/cmyk.jpg", "JPEG", "CMYK")
    image(f"{RAW}/Dog Photos/cmyk.tif", "TIFF", "CMYK")
    image(f"{RAW}/Dog Photos/gray16.tif", "TIFF", "I;16")
    floats = np.random.default_rng(next(seed)).uniform(0, 4000, SIZE[::-1]).astype(np.float32)
    put(f"{RAW}/Dog Photos/float32.tif", encode(Image.fromarray(floats), "TIFF"),
        "manifest", "Dog Photos")
    gray16 = Image.frombytes("I;16", SIZE, pack("<H", 32768) * (SIZE[0] * SIZE[1]))
    put(GRAY16, encode(gray16, "PNG"), "manifest", "Dog Photos")
    clear = Image.frombytes("RGBA", SIZE, np.random.default_rng(next(seed)).bytes(480))
    clear.putalpha(0)
    put(TRANSPARENT, encode(clear, "PNG"), "manifest", "Dog Photos")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image(ROTATED, "JPEG", exif=exif.tobytes())

    # café-ñ: every way a file can be broken, and one good image so that the class stays.
    image(f"{RAW}/café-ñ/ok.jpg", "JPEG")
    put(f"{RAW}/café-ñ/empty.jpg", b"", "reject", "empty file")
    full = encode(noise("RGB", next(seed), (64, 64)), "JPEG")  # cut past its headers
    put(TRUNCATED, full[:len(full) // 2], "reject", "broken image")
    full = encode(noise("RGB", next(seed), (32, 32)), "PNG")
    put(f"{RAW}/café-ñ/truncated.png", full[:len(full) // 2], "reject", "broken image")
    put(f"{RAW}/café-ñ/page.jpg", b"<!DOCTYPE html>\n<html><body>403 Forbidden</body></html>\n",
        "reject", "not an image")
    put(f"{RAW}/café-ñ/notes.png", b"this is not a picture\n", "reject", "not an image")
    put(f"{RAW}/café-ñ/noise.webp", np.random.default_rng(next(seed)).bytes(300),
        "reject", "not an image")
    put(BOMB, encode(noise("L", next(seed), (100, 100)), "PNG"), "reject", "too many pixels")

    # v1.2 and UPPER: duplicates, within a class and across classes.
    shared = encode(noise("RGB", next(seed)), "PNG")
    put(f"{RAW}/v1.2/shared.png", shared, "reject", "same image in several classes")
    put(f"{RAW}/UPPER/copy-of-shared.png", shared, "reject", "same image in several classes")
    twice = image(f"{RAW}/v1.2/own-a.png", "PNG")
    put(f"{RAW}/v1.2/sub/own-b.png", twice, "reject", "duplicate in its class")
    image(f"{RAW}/v1.2/other.png", "PNG")
    image(f"{RAW}/UPPER/up.png", "PNG")

    # Class problems, hidden classes and files outside any class.
    image(SINGLE, "PNG")
    put(f"{RAW}/empty/.DS_Store", b"\0\0\0\1Bud1", "skip")
    expect.append(Expect(f"{RAW}/empty", "reject", "class without usable images"))
    put(f"{RAW}/all-broken/junk.jpg", b"GIF89a but not really", "reject", "not an image")
    expect.append(Expect(f"{RAW}/all-broken", "reject", "class without usable images"))
    put(f"{RAW}/.hidden-class/x.png", encode(noise("RGB", next(seed)), "PNG"), "")
    expect.append(Expect(f"{RAW}/.hidden-class", "skip"))
    put(f"{RAW}/stray.jpg", encode(noise("RGB", next(seed)), "JPEG"),
        "reject", "image outside a class folder")
    put(f"{RAW}/README.md", b"# my photos\n", "skip")

    if not dvc_safe:
        outside.mkdir(parents=True, exist_ok=True)
        (outside / "secret.png").write_bytes(encode(noise("RGB", next(seed)), "PNG"))
        links = [("cat/nested/loop", "..", "symlink loop"),
                 ("cat/escape", str(outside), "symlink leads outside data/raw"),
                 ("cat/escape.png", str(outside / "secret.png"), "symlink leads outside data/raw"),
                 ("cat/friends", "../Dog Photos", "symlink leads into another class folder"),
                 ("cat/dangling.jpg", "gone.jpg", "broken symlink"),
                 ("elsewhere", str(outside), "symlink leads outside data/raw")]
        for rel, target, kind in links:
            os.symlink(target, repo / RAW / rel)
            expect.append(Expect(f"{RAW}/{rel}", "reject", kind))
        os.symlink("photo.png", repo / RAW / "cat/the-same-photo.png")  # same class and bytes
        expect.append(Expect(f"{RAW}/cat/the-same-photo.png", "reject",
                             "duplicate in its class"))
        bad = os.fsencode(repo / RAW / "cat") + b"/bad\xff.png"
        with open(bad, "wb") as f:
            f.write(encode(noise("RGB", next(seed)), "PNG"))
        expect.append(Expect(f"{RAW}/cat/bad\\xff.png", "reject", "name is not valid UTF-8"))
    return expect
