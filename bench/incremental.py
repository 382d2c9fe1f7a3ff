"""Incremental benchmark: `dvc repro preprocess` on N new images, then again after adding 1%.

    python bench/incremental.py --n 20000            # the goal: incremental/full <= 0.10
    python bench/incremental.py --n 2000 --size 64   # a quicker run

It builds a throwaway git + DVC repository the way tests/conftest.make_repo
does, fills data/raw with generated JPEGs (500x375, quality 90, as
bench/loader.py), and times two runs of `dvc repro preprocess` (index, then
preprocess, with all of DVC's own hashing and caching):
  full:         all N images are new;
  incremental:  1% more images, everything else unchanged.
It prints both wall times, their ratio, what the stage decoded and took from the
pixel cache, and the peak RSS of the stage's main process and of its workers
(run it at two values of --n to see that memory does not grow with N).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from conftest import dvc, git, make_repo  # noqa: E402
from shared import cpu_model, make_dataset  # noqa: E402


def repro(repo: Path) -> tuple[float, dict]:
    """Time `dvc repro preprocess`; returns (seconds, metrics/preprocess.json)."""
    started = time.perf_counter()
    out = dvc(repo, "repro", "preprocess").stdout
    seconds = time.perf_counter() - started
    print("   ", next(line for line in out.splitlines() if line.startswith("preprocessed")))
    return seconds, json.loads((repo / "metrics" / "preprocess.json").read_text())


def main() -> None:
    """Build N, add 1%, and print the incremental/full time ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20000, help="images in the full build")
    parser.add_argument("--size", type=int, default=224, help="preprocess.image_size")
    parser.add_argument("--storage", default="float16", choices=["float16", "uint8"])
    parser.add_argument("--source", default="500x375", help="generated JPEG size, WxH")
    parser.add_argument("--workers", type=int, default=0, help="params workers (0: all cores)")
    parser.add_argument("--dir", type=Path, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    width, height = (int(v) for v in args.source.split("x"))
    added = max(1, args.n // 100)

    with tempfile.TemporaryDirectory(prefix="imgpipe-incremental-") as tmp:
        work = args.dir or Path(tmp)
        print(f"machine: {os.cpu_count()} cores, {cpu_model()}; N={args.n} JPEGs {args.source} "
              f"q90 -> {args.size} px {args.storage}, +{added} images")
        repo = make_repo(work / "repo", images=None, params={
            "workers": args.workers,
            "preprocess": {"image_size": args.size, "storage": args.storage}})
        raw = repo / "data" / "raw"
        make_dataset(raw, args.n, os.cpu_count() or 1, size=(width, height))
        dvc(repo, "add", "-q", "data/raw")
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", "images")

        print("full build:")
        full, full_stats = repro(repo)
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", "full build")
        make_dataset(raw, added, os.cpu_count() or 1, start=args.n, size=(width, height))
        print(f"after adding {added} images:")
        incremental, inc_stats = repro(repo)

        print(f"\n{'':<12} {'wall s':>8} {'stage s':>8} {'decoded':>8} {'cached':>8} "
              f"{'peak RSS MB':>12} {'worker RSS MB':>14}")
        for name, wall, s in (("full", full, full_stats),
                              ("incremental", incremental, inc_stats)):
            print(f"{name:<12} {wall:>8.1f} {s['seconds']:>8.1f} {s['decoded']:>8} "
                  f"{s['from_cache']:>8} {s['peak_rss_mb']:>12.0f} "
                  f"{s['worker_peak_rss_mb']:>14.0f}")
        ratio = incremental / full
        print(f"\nincremental/full wall time through dvc repro: {ratio:.3f} "
              f"({'meets' if ratio <= 0.10 else 'misses'} the goal of <= 0.10)")


if __name__ == "__main__":
    main()
