"""A stand-in for issue #23's tree: about 800 labelled drawings in 16 class folders.

    python bench/emoji_tree.py OUT [--package FILE.tgz]

The issue's tree (794 PNG drawings with transparency, 3 to 247 per class, in 16 folders
among sound and text files) is not ours to have, so this builds one of the same shape from
Twemoji: the npm package emoji-datasource-twitter@16.0.0, fetched once with `npm pack`
into .cache/npm/ (git ignores it). Its emoji.json gives each emoji's subcategory and image.

Classes are subcategories: the 15 largest and the smallest with at least 3 images, which
gives 767 images, 3 to 259 a class. Left out, because their images are near-copies of one
another that would sit on both sides of a split: skin tones (nested in emoji.json, never
top-level), emoji that emoji.json marks obsoleted_by another, and the "People & Body"
category (a person, a man and a woman for every role, sport and gesture), with "Component".
Seven country flags repeat another's bytes (France's is also Clipperton's and Saint
Martin's): the index keeps one of each. A text file and a short WAV sit in every fourth
class folder, as in the issue's tree.
The 64 px images (the largest the package has) are written as OUT/<subcategory>/<image>.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import wave
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = "emoji-datasource-twitter@16.0.0"
PACKAGE = ROOT / ".cache/npm/emoji-datasource-twitter-16.0.0.tgz"
IMAGES = "package/img/twitter/64/"
CLASSES = 16
SMALLEST = 3  # the smallest class
NEAR_COPIES = {"People & Body", "Component"}


def fetch(package: Path) -> Path:
    """The package's tarball, fetched with `npm pack` the first time."""
    if not package.exists():
        package.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "pack", SPEC, "--pack-destination", str(package.parent)],
                       check=True, stdout=subprocess.DEVNULL)
    return package


def choose(emoji: list[dict]) -> dict[str, list[str]]:
    """Image names by subcategory: the CLASSES - 1 largest and the smallest of SMALLEST or more."""
    by_class: dict[str, list[str]] = {}
    for e in emoji:
        if e["has_img_twitter"] and not e.get("obsoleted_by") and e["category"] not in NEAR_COPIES:
            by_class.setdefault(e["subcategory"], []).append(e["image"])
    ranked = sorted((c for c in by_class if len(by_class[c]) >= SMALLEST),
                    key=lambda c: (-len(by_class[c]), c))
    return {c: sorted(by_class[c]) for c in ranked[:CLASSES - 1] + ranked[-1:]}


def write_decoys(folder: Path) -> None:
    """A text file and a tenth of a second of silence as a WAV: files that are not images."""
    (folder / "README.txt").write_text("Notes on this folder; not an image.\n")
    with wave.open(str(folder / "click.wav"), "wb") as sound:
        sound.setnchannels(1)
        sound.setsampwidth(2)
        sound.setframerate(8000)
        sound.writeframes(b"\0\0" * 800)


def build(package: Path, out: Path) -> Counter:
    """Write the chosen images into out/<subcategory>/; the count of each class."""
    counts: Counter = Counter()
    with tarfile.open(package) as tar:
        classes = choose(json.load(tar.extractfile("package/emoji.json")))
        for i, (name, images) in enumerate(sorted(classes.items())):
            folder = out / name
            folder.mkdir(parents=True, exist_ok=True)
            for image in images:
                (folder / image).write_bytes(tar.extractfile(IMAGES + image).read())
                counts[name] += 1
            if i % 4 == 0:
                write_decoys(folder)
    return counts


def main() -> None:
    """Build the tree and print its class counts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write (must not exist)")
    parser.add_argument("--package", type=Path, default=PACKAGE, help=f"{SPEC} tarball")
    args = parser.parse_args()
    if args.out.exists():
        sys.exit(f"error: {args.out} exists; pass a new folder")
    counts = build(fetch(args.package), args.out)
    for name, n in counts.most_common():
        print(f"{n:5d}  {name}")
    print(f"{sum(counts.values()):5d}  images in {len(counts)} classes, in {args.out}")


if __name__ == "__main__":
    main()
