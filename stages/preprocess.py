"""Preprocess stage: decode, resize and normalise every image once, into data/tensors/.

How it stays fast, incremental and small in memory:
- Decoded, resized pixels are kept in a content-addressed cache outside DVC's
  outputs, at <repo>/.cache/imgpipe/pixels/<size>px-<resize>-<code digest>/, keyed by
  the image's sha256. `dvc exp run --queue/--temp` set DVC_ROOT to the real repo, so
  queued experiments share it; IMGPIPE_CACHE moves it elsewhere. A rerun after
  adding images decodes only the new ones, and a change of normalisation
  decodes nothing. The cache is capped at IMGPIPE_CACHE_GB (default 10) by
  evicting the least recently used images; clear it with `make clean-cache`.
- Worker processes copy (or decode) each image straight into its row of a
  pre-sized uint8 .npy file with positioned writes, then normalise it to
  float16 chunk by chunk. Nothing is memory-mapped for writing, because mapped
  pages count towards the resident set: peak RSS stays flat as datasets grow.
- Channel statistics are exact integer sums, so the result does not depend on
  which images came from the cache or in which order workers finished: an
  incremental build is byte-identical to a clean one.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from stages import tracking
from stages.common import UserError, cache_root, cli, load_params, write_json
from stages.imaging import IMAGENET_MEAN, IMAGENET_STD, RESIZE_MODES, load_pixels
from stages.tensors import SPLITS, split_files

MANIFEST = Path("data/manifest.csv")
OUT = Path("data/tensors")
METRICS = Path("metrics/preprocess.json")
NORMALIZE_MODES = ("dataset", "imagenet")
STORAGES = ("float16", "uint8")
PIXELS_VERSION = 2          # bump when the cache entry format changes
CHUNK_BYTES = 4 << 20       # uint8 pixels normalised per job: bounds each worker's memory
DEFAULT_CACHE_GB = 10.0
SUMS = np.dtype("<i8")      # per-channel sum and sum of squares, stored after the pixels


# ---------------------------------------------------------------- the pixel cache

def pixel_cache(size: int, resize: str) -> Path:
    """Cache folder for one resize setting and one version of the decoding code.

    The folder name carries a digest of stages/imaging.py and the Pillow version,
    so a change to how images are decoded can never serve stale pixels.
    """
    import PIL

    from stages import imaging

    code = hashlib.sha256(Path(imaging.__file__).read_bytes())
    code.update(f"{PIL.__version__}|{PIXELS_VERSION}".encode())
    return cache_root() / "pixels" / f"{size}px-{resize}-{code.hexdigest()[:10]}"


def cache_cap_bytes() -> int:
    """The cache size limit: IMGPIPE_CACHE_GB (default 10; 0 keeps nothing)."""
    raw = os.environ.get("IMGPIPE_CACHE_GB", "")
    try:
        gb = float(raw) if raw.strip() else DEFAULT_CACHE_GB
    except ValueError:
        gb = -1.0
    if not gb >= 0:  # also rejects nan
        raise UserError(f"IMGPIPE_CACHE_GB is {raw!r}: use a number of gigabytes, like 10")
    return int(gb * 1e9)


def cache_entry(cache: Path, sha: str) -> Path:
    """Where one image's pixels live: raw (3, S, S) uint8 bytes, then 6 int64 channel sums."""
    return cache / sha[:2] / f"{sha}.u8"


def evict(root: Path, cap: int) -> tuple[int, int]:
    """Delete least recently used cache entries until they fit in `cap` bytes.

    Returns (entries deleted, bytes kept). Hits refresh an entry's mtime, so the
    images of the latest run are the last to go.
    """
    entries = []
    for entry in root.glob("pixels/*/*/*.u8"):
        with contextlib.suppress(FileNotFoundError):  # a concurrent run may evict too
            st = entry.stat()
            entries.append((st.st_mtime_ns, st.st_size, entry))
    total = sum(size for _, size, _ in entries)
    deleted = 0
    for _, size, entry in sorted(entries, key=lambda e: (e[0], str(e[2]))):
        if total <= cap:
            break
        entry.unlink(missing_ok=True)
        total -= size
        deleted += 1
    return deleted, total


# ---------------------------------------------------------------- pre-sized .npy files

def create_npy(path: Path, dtype: np.dtype | str, shape: tuple[int, ...]) -> int:
    """Create a zero-filled .npy file of the given shape; returns the byte offset of its data."""
    dtype = np.dtype(dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
              "shape": shape}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)  # what np.save writes for these shapes
        offset = f.tell()
        f.truncate(offset + math.prod(shape) * dtype.itemsize)  # sparse until written
    return offset


def _write_at(path: str, offset: int, data: Any) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _read_at(path: str, offset: int, count: int) -> np.ndarray:
    buf = np.empty(count, dtype=np.uint8)
    with open(path, "rb") as f:
        f.seek(offset)
        if f.readinto(memoryview(buf)) != count:
            raise OSError(f"{path} is shorter than expected")
    return buf


# ---------------------------------------------------------------- worker jobs

_SETTINGS: dict[str, Any] = {}


def _init_worker(size: int, resize: str, cache: str) -> None:
    _SETTINGS.update(size=size, resize=resize, cache=Path(cache))


def _fill(job: tuple[str, str, str, int, str]) -> tuple[str, str, bool, np.ndarray | None]:
    """Worker: put one image's pixels at `offset` of `target`, from the cache or by decoding.

    Returns (split, error, decoded, channel sums as a (3, 2) int64 array).
    """
    path, sha, target, offset, split = job
    size, cache = _SETTINGS["size"], _SETTINGS["cache"]
    n = 3 * size * size
    entry = cache_entry(cache, sha)
    try:
        data = entry.read_bytes()
        decoded = len(data) != n + 6 * SUMS.itemsize  # a torn or foreign file is re-decoded
        if not decoded:
            os.utime(entry)  # most recently used: evicted last
    except OSError:
        decoded = True
    if decoded:
        try:
            pixels = load_pixels(path, size, _SETTINGS["resize"])
        except Exception as err:  # noqa: BLE001 - any failure is reported with its file
            return split, f"{path} could not be decoded ({err}): run `dvc repro` to re-index", \
                True, None
        flat = np.ascontiguousarray(pixels, dtype=np.uint8).reshape(3, -1)
        sums = np.stack([flat.sum(1, dtype=np.int64),
                         (flat.astype(np.int32) ** 2).sum(1, dtype=np.int64)], axis=1)
        data = flat.tobytes() + sums.astype(SUMS).tobytes()
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, entry)  # atomic: concurrent runs never see half an entry
    _write_at(target, offset, memoryview(data)[:n])
    return split, "", decoded, np.frombuffer(data, SUMS, 6, offset=n).reshape(3, 2)


def _normalise(job: tuple[str, int, str, int, int, np.ndarray]) -> int:
    """Worker: map `count` uint8 pixels to float16 through the (3, 256) table; returns images."""
    src, src_offset, dst, dst_offset, count, table = job
    size = _SETTINGS["size"]
    block = _read_at(src, src_offset, count).reshape(-1, 3, size, size)
    out = np.empty(block.shape, dtype=np.float16)
    for c in range(3):  # a table lookup is 10x faster than float maths, and gives the same bits
        out[:, c] = table[c][block[:, c]]
    _write_at(dst, dst_offset, out.data)
    return len(block)


@contextlib.contextmanager
def worker_pool(workers: int, size: int, resize: str, cache: Path
                ) -> Iterator[Callable[[Callable, Iterable, int], Iterator]]:
    """Yield an unordered map(fn, jobs, chunksize) over `workers` processes (1: this one)."""
    args = (size, resize, str(cache))
    if workers <= 1:
        _init_worker(*args)
        yield lambda fn, jobs, chunksize: map(fn, jobs)
        return
    with Pool(workers, _init_worker, args) as pool:
        yield lambda fn, jobs, chunksize: pool.imap_unordered(fn, jobs, chunksize=chunksize)


# ---------------------------------------------------------------- the stage

def channel_stats(sums: np.ndarray, pixels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units from exact integer sums over `pixels` each."""
    if pixels == 0:
        raise UserError("the train split is empty: add images, or use preprocess.normalize: "
                        "imagenet")
    mean, std = [], []
    for total, squares in sums.tolist():
        var = (squares * pixels - total * total) / (pixels * pixels * 255 ** 2)  # exact ints
        mean.append(total / (pixels * 255))
        std.append(max(math.sqrt(max(var, 0.0)), 1e-3))  # a flat channel must not divide by 0
    return mean, std


def normalise_table(mean: list[float], std: list[float]) -> np.ndarray:
    """(3, 256) float16 table: value v of channel c becomes (v / 255 - mean[c]) / std[c]."""
    levels = np.arange(256, dtype=np.float32) / 255.0
    m = np.asarray(mean, dtype=np.float32)[:, None]
    s = np.asarray(std, dtype=np.float32)[:, None]
    return ((levels[None, :] - m) / s).astype(np.float16)


def peak_rss_mb(who: int) -> float:
    """Peak resident memory in MB of this process (RUSAGE_SELF) or its reaped workers."""
    import resource

    kb = resource.getrusage(who).ru_maxrss
    return round(kb / (1024 ** 2 if sys.platform == "darwin" else 1024), 1)  # macOS: bytes


def preprocess(manifest: pd.DataFrame, size: int, resize: str, normalize: str, workers: int,
               out: Path, data_version: str, storage: str = "float16") -> dict[str, Any]:
    """Build the tensor folder `out` from the manifest; returns the stats for metrics."""
    import resource

    started = time.perf_counter()
    classes = manifest.drop_duplicates("label").sort_values("label")["class"].tolist()
    splits = {s: manifest[manifest["split"] == s] for s in SPLITS}
    counts = {s: len(rows) for s, rows in splits.items()}
    staging = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    cache = pixel_cache(size, resize)
    per_image = 3 * size * size

    # uint8 storage keeps the pixels as they are; float16 normalises them in a second pass.
    pixel_files, offsets = {}, {}
    for split in SPLITS:
        pixel_files[split] = (split_files(staging, split)[0] if storage == "uint8"
                              else staging / f".{split}_u8.npy")
        offsets[split] = create_npy(pixel_files[split], np.uint8, (counts[split], 3, size, size))
    jobs = ((path, sha, str(pixel_files[split]), offsets[split] + j * per_image, split)
            for split in SPLITS
            for j, (path, sha) in enumerate(zip(splits[split]["path"], splits[split]["sha256"])))

    sums = np.zeros((3, 2), dtype=object)  # Python ints: exact, whatever the order
    decoded = 0
    with worker_pool(workers, size, resize, cache) as imap:
        with tqdm(total=len(manifest), desc="decode", unit="img") as bar:
            for split, error, was_decoded, image_sums in imap(_fill, jobs, 8):
                if error:
                    raise UserError(error)
                decoded += was_decoded
                if split == "train":
                    sums += image_sums.astype(object)
                bar.update()
                bar.set_postfix_str(f"{bar.n - decoded} from cache", refresh=False)
        filled = time.perf_counter()

        if normalize == "dataset":
            mean, std = channel_stats(sums, counts["train"] * size * size)
        else:
            mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)

        if storage == "float16":
            table = normalise_table(mean, std)
            step = max(1, CHUNK_BYTES // per_image) * per_image
            norm_jobs = []
            for split in SPLITS:
                dst = split_files(staging, split)[0]
                dst_offset = create_npy(dst, np.float16, (counts[split], 3, size, size))
                total = counts[split] * per_image
                norm_jobs += [(str(pixel_files[split]), offsets[split] + start, str(dst),
                               dst_offset + 2 * start, min(step, total - start), table)
                              for start in range(0, total, step)]
            with tqdm(total=len(manifest), desc="normalise", unit="img") as bar:
                for n in imap(_normalise, norm_jobs, 1):
                    bar.update(n)
            for path in pixel_files.values():
                path.unlink()
    normalised = time.perf_counter()

    for split in SPLITS:
        np.save(split_files(staging, split)[1], splits[split]["label"].to_numpy(np.int64))
    meta = {"classes": classes, "image_size": size, "resize": resize, "normalize": normalize,
            "mean": mean, "std": std, "dtype": storage, "counts": counts,
            "data_version": data_version}
    write_json(staging / "meta.json", meta)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)

    evicted, cache_bytes = evict(cache_root(), cache_cap_bytes())
    seconds = time.perf_counter() - started
    return {"images": len(manifest), **counts, "decoded": decoded,
            "from_cache": len(manifest) - decoded, "storage": storage,
            "seconds": round(seconds, 3),
            "images_per_second": round(len(manifest) / max(seconds, 1e-9), 1),
            "decode_seconds": round(filled - started, 3),
            "normalise_seconds": round(normalised - filled, 3),
            "cache_mb": round(cache_bytes / 1e6, 1), "cache_evicted": evicted,
            "peak_rss_mb": peak_rss_mb(resource.RUSAGE_SELF),
            "worker_peak_rss_mb": peak_rss_mb(resource.RUSAGE_CHILDREN),
            "mean": mean, "std": std}


def check_params(size: int, resize: str, normalize: str, storage: str) -> None:
    """Refuse unknown resize, normalize or storage settings in one line each."""
    if resize not in RESIZE_MODES:
        raise UserError(f"preprocess.resize in params.yaml is {resize!r}: use squash or crop")
    if normalize not in NORMALIZE_MODES:
        raise UserError(f"preprocess.normalize is {normalize!r}: use dataset or imagenet")
    if storage not in STORAGES:
        raise UserError(f"preprocess.storage is {storage!r}: use float16 or uint8")
    if size < 1:
        raise UserError(f"preprocess.image_size is {size}: use a positive number of pixels")


@cli
def main() -> None:
    """Turn data/manifest.csv into data/tensors/."""
    params = load_params()
    p = params["preprocess"]
    size, resize, normalize = int(p["image_size"]), p["resize"], p["normalize"]
    storage = p.get("storage", "float16")
    check_params(size, resize, normalize, storage)
    cache_cap_bytes()  # a bad IMGPIPE_CACHE_GB fails now, not after the work
    workers = int(params.get("workers") or 0) or os.cpu_count() or 1
    try:
        manifest = pd.read_csv(MANIFEST, keep_default_na=False)
    except FileNotFoundError:
        raise UserError(f"{MANIFEST} not found: run `dvc repro index` first") from None
    data_version = tracking.file_digest(MANIFEST)

    with tracking.stage_run(params["mlflow"]["experiment"], "preprocess",
                            {"preprocess": p, "workers": workers}, data_version):
        import mlflow

        stats = preprocess(manifest, size, resize, normalize, workers, OUT, data_version,
                           storage)
        write_json(METRICS, stats)
        mlflow.log_metrics({k: v for k, v in stats.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
    print(f"preprocessed {stats['images']} images: {stats['from_cache']} from the cache, "
          f"{stats['decoded']} decoded, {stats['images_per_second']:.0f} img/s, "
          f"peak memory {stats['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
