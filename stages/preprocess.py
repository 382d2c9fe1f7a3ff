"""Preprocess stage: decode, resize and normalise every image once, into data/tensors/.

Decoded, resized uint8 pixels are kept in a content-addressed cache outside
DVC's outputs (.cache/imgpipe/pixels/, keyed by sha256 and the resize params),
so a rerun after adding images decodes only the new ones, and a change of
normalisation decodes nothing. Clear it with `rm -rf .cache/imgpipe/pixels`.
"""

from __future__ import annotations

import os
import shutil
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from stages import tracking
from stages.common import UserError, atomic_path, cli, load_params, repo_root, write_json
from stages.imaging import IMAGENET_MEAN, IMAGENET_STD, RESIZE_MODES, load_pixels
from stages.tensors import SPLITS, split_files

MANIFEST = Path("data/manifest.csv")
OUT = Path("data/tensors")
METRICS = Path("metrics/preprocess.json")
PIXELS_VERSION = 1  # bump when load_pixels changes its output, to invalidate the cache
CHUNK = 1024        # images normalised per step: bounds memory at any dataset size


def pixel_cache(size: int, resize: str) -> Path:
    """Cache folder for one resize setting; shared by every experiment of the repo."""
    base = Path(os.environ.get("IMGPIPE_CACHE") or repo_root() / ".cache" / "imgpipe")
    return base / "pixels" / f"{size}px-{resize}-v{PIXELS_VERSION}"


def _decode(job: tuple[str, str, int, str, str]) -> tuple[np.ndarray | None, str]:
    """Worker: decode one image and store it in the cache; returns (pixels, error)."""
    path, sha, size, resize, cache = job
    try:
        pixels = load_pixels(path, size, resize)
    except Exception as err:  # noqa: BLE001 - any failure is reported with its file
        return None, f"{path} could not be decoded ({err}): run `dvc repro` to re-index"
    target = Path(cache) / sha[:2] / f"{sha}.npy"
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        np.save(f, pixels)
    return pixels, ""


def decode_all(rows: pd.DataFrame, size: int, resize: str, workers: int,
               out: np.ndarray) -> int:
    """Fill out[i] with the pixels of rows[i], from the cache or by decoding; returns #decoded."""
    cache = pixel_cache(size, resize)
    todo = []
    bar = tqdm(total=len(rows), desc="preprocess", unit="img")
    with bar:
        for i, sha in enumerate(rows["sha256"]):
            hit = cache / sha[:2] / f"{sha}.npy"
            try:
                out[i] = np.load(hit)
                bar.update()
            except (FileNotFoundError, ValueError, OSError):
                todo.append(i)
        jobs = [(rows["path"].iat[i], rows["sha256"].iat[i], size, resize, str(cache))
                for i in todo]
        with Pool(workers) as pool:
            for i, (pixels, error) in zip(todo, pool.imap(_decode, jobs, chunksize=16)):
                if error:
                    raise UserError(error)
                out[i] = pixels
                bar.update()
    return len(todo)


def channel_stats(pixels: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units, streamed chunk by chunk."""
    total = np.zeros(3)
    squares = np.zeros(3)
    for start in range(0, len(pixels), CHUNK):
        block = pixels[start:start + CHUNK].astype(np.float64) / 255.0
        total += block.sum(axis=(0, 2, 3))
        squares += (block ** 2).sum(axis=(0, 2, 3))
    n = len(pixels) * pixels.shape[2] * pixels.shape[3]
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean ** 2, 0.0))
    return mean.tolist(), np.maximum(std, 1e-3).tolist()  # a flat channel must not divide by 0


def write_normalised(pixels: np.ndarray, labels: np.ndarray, mean: list[float],
                     std: list[float], folder: Path, split: str) -> None:
    """Write one split as float16 (x - mean) / std, chunk by chunk into a memory map."""
    x_path, y_path = split_files(folder, split)
    x = np.lib.format.open_memmap(x_path, mode="w+", dtype=np.float16, shape=pixels.shape)
    m = np.asarray(mean, dtype=np.float32)[:, None, None]
    s = np.asarray(std, dtype=np.float32)[:, None, None]
    for start in range(0, len(pixels), CHUNK):
        block = pixels[start:start + CHUNK].astype(np.float32) / 255.0
        x[start:start + CHUNK] = (block - m) / s
    x.flush()
    del x
    np.save(y_path, labels.astype(np.int64))


def preprocess(manifest: pd.DataFrame, size: int, resize: str, normalize: str, workers: int,
               out: Path, data_version: str) -> dict[str, Any]:
    """Build the tensor folder `out` from the manifest; returns the stats for metrics."""
    rows = pd.concat([manifest[manifest["split"] == s] for s in SPLITS], ignore_index=True)
    classes = (manifest.drop_duplicates("label").sort_values("label")["class"].tolist())
    staging = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    started = time.perf_counter()
    pixels = np.lib.format.open_memmap(staging / "pixels.npy", mode="w+", dtype=np.uint8,
                                       shape=(len(rows), 3, size, size))
    decoded = decode_all(rows, size, resize, workers, pixels)
    is_train = (rows["split"] == "train").to_numpy()
    if normalize == "dataset":
        mean, std = channel_stats(pixels[: int(is_train.sum())])
    else:
        mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    counts = {}
    start = 0
    for split in SPLITS:
        n = int((rows["split"] == split).sum())
        labels = rows["label"].to_numpy()[start:start + n]
        write_normalised(pixels[start:start + n], labels, mean, std, staging, split)
        counts[split] = n
        start += n
    del pixels
    (staging / "pixels.npy").unlink()
    seconds = time.perf_counter() - started
    meta = {"classes": classes, "image_size": size, "resize": resize, "normalize": normalize,
            "mean": mean, "std": std, "dtype": "float16", "counts": counts,
            "data_version": data_version}
    write_json(staging / "meta.json", meta)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)
    return {"images": len(rows), "decoded": decoded, "from_cache": len(rows) - decoded,
            "seconds": round(seconds, 3),
            "images_per_second": round(len(rows) / max(seconds, 1e-9), 1),
            "mean": mean, "std": std, **counts}


@cli
def main() -> None:
    """Turn data/manifest.csv into data/tensors/."""
    params = load_params()
    p = params["preprocess"]
    size, resize, normalize = int(p["image_size"]), p["resize"], p["normalize"]
    if resize not in RESIZE_MODES:
        raise UserError(f"preprocess.resize in params.yaml is {resize!r}: use squash or crop")
    if normalize not in ("dataset", "imagenet"):
        raise UserError(f"preprocess.normalize is {normalize!r}: use dataset or imagenet")
    if size < 1:
        raise UserError(f"preprocess.image_size is {size}: use a positive number of pixels")
    workers = int(params.get("workers") or 0) or os.cpu_count() or 1
    try:
        manifest = pd.read_csv(MANIFEST, keep_default_na=False)
    except FileNotFoundError:
        raise UserError(f"{MANIFEST} not found: run `dvc repro index` first") from None
    data_version = tracking.file_digest(MANIFEST)

    with tracking.stage_run(params["mlflow"]["experiment"], "preprocess",
                            {"preprocess": p, "workers": workers}, data_version):
        import mlflow

        stats = preprocess(manifest, size, resize, normalize, workers, OUT, data_version)
        write_json(METRICS, stats)
        mlflow.log_metrics({k: v for k, v in stats.items() if isinstance(v, (int, float))})
    print(f"preprocessed {stats['images']} images ({stats['decoded']} decoded, "
          f"{stats['from_cache']} from cache) at {stats['images_per_second']:.0f} img/s")


if __name__ == "__main__":
    main()
