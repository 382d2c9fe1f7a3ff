"""Benchmark the index stage: a full index, then re-indexing after small changes.

    python bench/index.py [--files 5000] [--size 64] [--workers 0]

Writes --files distinct JPEGs into a temp folder, then times, in one run:
  full        a first index: every file hashed and decoded
  +1%         re-index after adding 1% more files (only those are decoded)
  touched     re-index after every file got a new mtime, as after a fresh checkout
              (files are hashed, nothing is decoded)
  1 worker    a first index in one process, for the parallel speed-up
Timings on a shared machine are noisy: read the ratios, which are measured side by side.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stages import index  # noqa: E402
from stages.common import processes  # noqa: E402


def write_images(raw: Path, start: int, count: int, size: int, classes: int = 10) -> None:
    """count distinct size x size JPEGs of noise, spread over `classes` class folders."""
    rng = np.random.default_rng(start)
    for i in range(start, start + count):
        folder = raw / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:07d}.jpg", quality=90)


def timed(repo: Path, cache: dict, workers: int) -> tuple[float, dict]:
    """Seconds for one index of repo/data/raw, and its summary."""
    start = time.perf_counter()
    _, _, summary = index.build_manifest(index.RAW, 0.2, 0.1, index.pixel_limit(None), workers,
                                         {}, cache)
    return time.perf_counter() - start, summary


def main() -> None:
    """Run the benchmark and print a table of times and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--workers", type=int, default=0, help="0: one per CPU core")
    args = parser.parse_args()
    workers = processes(args.workers)

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        raw = repo / "data" / "raw"
        print(f"writing {args.files} JPEGs of {args.size}x{args.size} ...", flush=True)
        write_images(raw, 0, args.files, args.size)
        os.chdir(repo)
        rows = []
        cache = {"files": {}, "facts": {}}
        full, s = timed(repo, cache, workers)
        rows.append(("full", full, s))
        write_images(raw, args.files, max(1, args.files // 100), args.size)
        more, s = timed(repo, cache, workers)
        rows.append(("+1%", more, s))
        for path in raw.rglob("*.jpg"):
            os.utime(path, ns=(1, 1))
        touched, s = timed(repo, cache, workers)
        rows.append(("touched", touched, s))
        one, s = timed(repo, {"files": {}, "facts": {}}, 1)
        rows.append(("1 worker", one, s))

    print(f"\n{'run':<10} {'seconds':>8} {'files/s':>9} {'decoded':>8} {'reused':>7} "
          f"{'vs full':>8}")
    for name, seconds, s in rows:
        files = s["checked"] + s["reused"]
        print(f"{name:<10} {seconds:>8.2f} {files / seconds:>9.0f} {s['checked']:>8} "
              f"{s['reused']:>7} {seconds / full:>8.3f}")
    print(f"\nre-index after +1% costs {more / full:.1%} of a full index "
          f"(touched: {touched / full:.1%}); {workers} workers are {one / full:.2f}x "
          "faster than 1")


if __name__ == "__main__":
    main()
