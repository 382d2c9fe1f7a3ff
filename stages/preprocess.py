"""Preprocess stage: decode, resize and normalise every image once, into data/tensors/.

Images are stored at image_size / crop_pct (`stored_as`: with `auto`, the resize, resize
mode and resampling of pretrained weights' own eval transforms), so that the model's centre
crop of image_size leaves training's random crops room; meta.json records both sizes.

How it stays fast, incremental and small in memory:
- Decoded, resized pixels are kept in a content-addressed cache outside DVC's
  outputs, at <repo>/.cache/imgpipe/pixels/<size>px-<resize>-<code digest>/, keyed by
  the image's sha256. `dvc exp run --queue/--temp` set DVC_ROOT to the real repo, so
  queued experiments share it; IMGPIPE_CACHE moves it elsewhere. A rerun after
  adding images decodes only the new ones, and a change of normalisation
  decodes nothing. The cache is capped at IMGPIPE_CACHE_GB (default 10) by
  evicting the least recently used images; clear it with `make clean-cache`.
- data/tensors/ is sharded (see stages/tensors.py) and persists across runs: a
  shard whose content-derived name is already there is kept untouched, so adding
  1% of images rewrites only the few shards they land in, and DVC hashes and
  caches only those. With `normalize: dataset` every image's stored value depends
  on the train split's statistics, so a change to the split rewrites every
  shard; the default, `imagenet`, keeps each image's bytes its own.
- Worker processes decode images into the cache, then assemble one shard each,
  in memory, and write it atomically. Peak RSS is bounded by a few shards, not
  by the size of the dataset.
- Channel statistics are exact integer sums, so the result does not depend on
  which images came from the cache or in which order workers finished: an
  incremental build is byte-identical to a clean one.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from stages import params, tracking
from stages.common import UserError, atomic_path, cache_root, cli, processes, write_json
from stages.imaging import (
    DEFAULT_INTERPOLATION,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INTERPOLATIONS,
    load_pixels,
)
from stages.tensors import SHARD_MB, SPLITS, plan_shards
from stages.zoo import resolve_preprocessing

MANIFEST = Path("data/manifest.csv")
OUT = Path("data/tensors")
METRICS = Path("metrics/preprocess.json")
PIXELS_VERSION = 2          # bump when the cache entry format changes
DEFAULT_CACHE_GB = 10.0
SUMS = np.dtype("<i8")      # per-channel sum and sum of squares, stored after the pixels
# A shard to write: its path, its images as (path, sha256), and the float16 table (None: uint8).
Job = tuple[str, list[tuple[str, str]], "np.ndarray | None"]


# ---------------------------------------------------------------- the pixel cache

def pixel_cache(size: int, resize: str, interpolation: str = DEFAULT_INTERPOLATION) -> Path:
    """Cache folder for one resize setting and one version of the decoding code.

    The folder name carries a digest of stages/imaging.py and the Pillow version,
    so a change to how images are decoded can never serve stale pixels.
    """
    import PIL

    from stages import imaging

    code = hashlib.sha256(Path(imaging.__file__).read_bytes())
    code.update(f"{PIL.__version__}|{PIXELS_VERSION}".encode())
    return (cache_root() / "pixels"
            / f"{size}px-{resize}-{interpolation}-{code.hexdigest()[:10]}")


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


# ---------------------------------------------------------------- worker jobs

_SETTINGS: dict[str, Any] = {}


def _init_worker(size: int, resize: str, interpolation: str, cache: str) -> None:
    _SETTINGS.update(size=size, resize=resize, interpolation=interpolation, cache=Path(cache))


def _entry(path: str, sha: str, read: bool = True) -> tuple[bytes | None, bool]:
    """One image's cache entry (pixels, then channel sums), from the cache or decoded now.

    Returns (entry bytes, whether it was decoded). With read=False a cached entry
    costs a stat, not a read, and its bytes come back as None. A decode failure
    is a UserError.
    """
    size, cache = _SETTINGS["size"], _SETTINGS["cache"]
    entry = cache_entry(cache, sha)
    with contextlib.suppress(OSError):  # missing, or evicted since the stat: decoded below
        if entry.stat().st_size == 3 * size * size + 6 * SUMS.itemsize:  # torn: decoded again
            os.utime(entry)  # most recently used: evicted last
            return (entry.read_bytes() if read else None), False
    try:
        pixels = load_pixels(path, size, _SETTINGS["resize"],
                             interpolation=_SETTINGS["interpolation"])
    except Exception as err:  # noqa: BLE001 - any failure is reported with its file
        raise UserError(f"{path} could not be decoded ({err}): run `dvc repro` to re-index"
                        ) from None
    flat = np.ascontiguousarray(pixels, dtype=np.uint8).reshape(3, -1)
    sums = np.stack([flat.sum(1, dtype=np.int64),
                     (flat.astype(np.int32) ** 2).sum(1, dtype=np.int64)], axis=1)
    data = flat.tobytes() + sums.astype(SUMS).tobytes()
    with atomic_path(entry) as tmp:  # concurrent runs never see half an entry
        tmp.write_bytes(data)
    return data, True


def _cache_image(job: tuple[str, str, bool]) -> tuple[bool, np.ndarray | None]:
    """Worker: make sure one image is in the pixel cache.

    Returns (decoded, its (3, 2) channel sums when the job asks for them, else None):
    an image already cached is read only for its sums.
    """
    path, sha, want_sums = job
    data, decoded = _entry(path, sha, read=want_sums)
    if not want_sums:
        return decoded, None
    n = 3 * _SETTINGS["size"] ** 2
    return decoded, np.frombuffer(data, SUMS, 6, offset=n).reshape(3, 2)


def _write_shard(job: Job) -> tuple[int, int]:
    """Worker: assemble one shard from the cache, normalise it, write it atomically.

    `table` maps uint8 to float16 per channel (None keeps uint8). Returns
    (rows, images decoded here: normally 0, as the first pass cached them).
    """
    target, rows, table = job
    size = _SETTINGS["size"]
    out = np.empty((len(rows), 3, size, size), np.uint8 if table is None else np.float16)
    decoded = 0
    for i, (path, sha) in enumerate(rows):
        data, was_decoded = _entry(path, sha)  # decodes only if another run evicted it
        pixels = np.frombuffer(data, np.uint8, 3 * size * size).reshape(3, size, size)
        if table is None:
            out[i] = pixels
        else:  # a table lookup is 10x faster than float maths, and gives the same bits
            for c in range(3):
                out[i, c] = table[c][pixels[c]]
        decoded += was_decoded
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        np.save(f, out)
    return len(rows), decoded


@contextlib.contextmanager
def worker_pool(workers: int, size: int, resize: str, interpolation: str, cache: Path
                ) -> Iterator[Callable[[Callable, Iterable, int], Iterator]]:
    """Yield an unordered map(fn, jobs, chunksize) over `workers` processes (1: this one)."""
    args = (size, resize, interpolation, str(cache))
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


def digest(*parts: Any) -> str:
    """A short sha256 of the parts, one per line: names files by what they hold."""
    return hashlib.sha256("\n".join(map(str, parts)).encode()).hexdigest()[:32]


def remove_stale(out: Path, keep: set[str]) -> None:
    """Delete every file under out that meta.json no longer names (old shards, old layouts)."""
    for path in sorted(out.rglob("*"), reverse=True):  # files before their folders
        if path.is_dir():
            with contextlib.suppress(OSError):
                path.rmdir()  # only when empty
        elif path.relative_to(out).as_posix() not in keep:
            path.unlink(missing_ok=True)


def plan_files(out: Path, rows: dict[str, list[tuple[str, str]]],
               labels: dict[str, np.ndarray], settings: tuple[str, ...],
               table: np.ndarray | None, image_bytes: int, shard_mb: float
               ) -> tuple[dict[str, Any], list[Job]]:
    """Each split's shard and label file names for meta.json, and the shards not yet in out."""
    files: dict[str, dict[str, Any]] = {}
    todo: list[Job] = []
    for split in SPLITS:
        shards = []
        shas = [sha for _, sha in rows[split]]
        for start, stop in plan_shards(shas, image_bytes, shard_mb):
            # Everything that decides a shard's bytes goes into its name: settings and images.
            name = f"{split}/{digest(*settings, *shas[start:stop])}.npy"
            shards.append((name, stop - start))
            if not (out / name).is_file():  # written atomically: if it is there, it is whole
                todo.append((str(out / name), rows[split][start:stop], table))
        files[split] = {"labels": f"{split}/labels-{digest(labels[split].tobytes().hex())}.npy",
                        "shards": shards}
    return files, todo


def preprocess(manifest: pd.DataFrame, size: int, resize: str, normalize: str, workers: int,
               out: Path, data_version: str, storage: str = "float16",
               shard_mb: float = SHARD_MB, crop_size: int | None = None,
               interpolation: str = DEFAULT_INTERPOLATION) -> dict[str, Any]:
    """Bring the tensor folder `out` up to date with the manifest; returns the stats for metrics.

    Images are stored at `size`; the model sees their centre `crop_size` (default: all).

    Shards that already exist under their digest are kept as they are; the rest
    are written from the pixel cache, decoding only images it lacks. meta.json
    is replaced last, so a run that stops half way leaves the old tensors valid.
    """
    import resource

    started = time.perf_counter()
    classes = manifest.drop_duplicates("label").sort_values("label")["class"].tolist()
    splits = {s: manifest[manifest["split"] == s] for s in SPLITS}
    counts = {s: len(rows) for s, rows in splits.items()}
    rows = {s: list(zip(splits[s]["path"], splits[s]["sha256"])) for s in SPLITS}
    labels = {s: splits[s]["label"].to_numpy(np.int64) for s in SPLITS}
    cache = pixel_cache(size, resize, interpolation)
    out.mkdir(parents=True, exist_ok=True)
    decoded = 0
    with worker_pool(workers, size, resize, interpolation, cache) as imap:
        def cache_images(images: list[tuple[str, str]], desc: str, want_sums: bool
                         ) -> np.ndarray:
            """Put these images in the pixel cache; returns their summed channel sums if wanted."""
            nonlocal decoded
            sums = np.zeros((3, 2), dtype=object)  # Python ints: exact, whatever the order
            hits = 0
            jobs = [(path, sha, want_sums) for path, sha in images]
            with tqdm(total=len(jobs), desc=desc, unit="img") as bar:
                for was_decoded, image_sums in imap(_cache_image, jobs, 8):
                    decoded += was_decoded
                    hits += not was_decoded
                    if image_sums is not None:
                        sums += image_sums.astype(object)
                    bar.update()
                    bar.set_postfix_str(f"{hits} from cache", refresh=False)
            return sums

        if normalize == "dataset":  # the statistics need every train image first
            mean, std = channel_stats(cache_images(rows["train"], "statistics", True),
                                      counts["train"] * size * size)
        else:
            mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
        table = normalise_table(mean, std) if storage == "float16" else None
        settings = (cache.name, storage, table.tobytes().hex() if table is not None else "")

        files, todo = plan_files(out, rows, labels, settings, table,
                                 3 * size * size * np.dtype(storage).itemsize, shard_mb)
        done = {sha for _, sha in rows["train"]} if normalize == "dataset" else set()
        cache_images([r for _, shard_rows, _ in todo for r in shard_rows if r[1] not in done],
                     "decode", False)
        filled = time.perf_counter()

        with tqdm(total=sum(len(r) for _, r, _ in todo), desc="write", unit="img") as bar:
            for written, late in imap(_write_shard, todo, 1):
                decoded += late
                bar.update(written)
    wrote = time.perf_counter()

    for split in SPLITS:
        path = out / files[split]["labels"]
        if not path.is_file():  # named by its content, like the shards
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.save(f, labels[split])
    meta = {"classes": classes, "image_size": size, "crop_size": crop_size or size,
            "resize": resize, "interpolation": interpolation, "normalize": normalize,
            "mean": mean, "std": std, "dtype": storage, "counts": counts,
            "data_version": data_version, "files": files}
    write_json(out / "meta.json", meta)
    remove_stale(out, {"meta.json"} | {f[0] for s in SPLITS for f in files[s]["shards"]}
                 | {files[s]["labels"] for s in SPLITS})

    evicted, cache_bytes = evict(cache_root(), cache_cap_bytes())
    seconds = time.perf_counter() - started
    total_shards = sum(len(files[s]["shards"]) for s in SPLITS)
    return {"images": len(manifest), **counts, "decoded": decoded,
            "from_cache": len(manifest) - decoded, "storage": storage,
            "shards": total_shards, "shards_written": len(todo),
            "shards_kept": total_shards - len(todo),
            "seconds": round(seconds, 3),
            "images_per_second": round(len(manifest) / max(seconds, 1e-9), 1),
            "decode_seconds": round(filled - started, 3),
            "write_seconds": round(wrote - filled, 3),
            "cache_mb": round(cache_bytes / 1e6, 1), "cache_evicted": evicted,
            "peak_rss_mb": peak_rss_mb(resource.RUSAGE_SELF),
            "worker_peak_rss_mb": peak_rss_mb(resource.RUSAGE_CHILDREN),
            "mean": mean, "std": std}


@dataclass(frozen=True)
class Stored:
    """How images are stored: the side (with room around the model's centre crop), the resize
    mode and the resampling, and where they came from (for the start line)."""

    size: int
    resize: str
    interpolation: str
    why: str


def stored_as(settings: params.Preprocess, t: params.Train) -> Stored:
    """preprocess.crop_pct, .resize and .interpolation resolved. `auto` follows pretrained
    weights' eval transforms (torchvision's: the short side to 256 for a 224 crop, bilinear;
    timm's crop_pct, crop_mode and interpolation); without weights: no room, squash, bicubic.
    An explicit setting wins, with a warning that names both when it differs from the weights'."""
    wanted = resolve_preprocessing(t.model, t.pretrained) if t.pretrained else None
    weights: dict[str, Any] = {}  # what the weights say, where they say it
    if wanted and wanted.crop_pct:
        weights["crop_pct"] = wanted.crop_pct
    if wanted and wanted.resize:
        weights["resize"] = wanted.resize
    if wanted and wanted.interpolation in INTERPOLATIONS:  # not e.g. timm's "random"
        weights["interpolation"] = wanted.interpolation
    chosen, whence = {}, []
    for key, fallback in (("crop_pct", 1.0), ("resize", "squash"),
                          ("interpolation", DEFAULT_INTERPOLATION)):
        value = getattr(settings, key)
        if value == "auto":
            chosen[key] = weights.get(key, fallback)
            whence.append(f"{key} auto")
            continue
        chosen[key] = value
        whence.append(f"{key} {value}")
        if key in weights and weights[key] != value:
            theirs = f"{weights[key]:.4g}" if key == "crop_pct" else weights[key]
            print(f"warning: preprocess.{key} is {value}, but {wanted.why} says {theirs}: "
                  "the explicit setting wins; use auto to follow the weights")
    size = math.floor(settings.image_size / chosen["crop_pct"] + 1e-6)  # as timm's, float-safe
    source = wanted.why if weights else "no pretrained weights"
    return Stored(size, chosen["resize"], chosen["interpolation"],
                  f"crop_pct {chosen['crop_pct']:.4g}, {chosen['resize']}, "
                  f"{chosen['interpolation']} ({', '.join(whence)}: {source})")


@cli
def main() -> None:
    """Turn data/manifest.csv into data/tensors/."""
    p = params.load()
    cache_cap_bytes()  # a bad IMGPIPE_CACHE_GB fails now, not after the work
    workers = processes(p.workers)
    try:
        manifest = pd.read_csv(MANIFEST, keep_default_na=False)
    except FileNotFoundError:
        raise UserError(f"{MANIFEST} not found: run `dvc repro index` first") from None
    data_version = tracking.file_digest(MANIFEST)

    settings = p.preprocess
    stored = stored_as(settings, p.train)
    print(f"images stored at {stored.size} px, the model sees their centre "
          f"{settings.image_size} px: {stored.why}", flush=True)
    with tracking.stage_run(p.mlflow.experiment, "preprocess",
                            {"preprocess": settings.model_dump(), "workers": workers,
                             "stored_size": stored.size, "stored_resize": stored.resize,
                             "stored_interpolation": stored.interpolation},
                            data_version):
        import mlflow

        stats = preprocess(manifest, stored.size, stored.resize, settings.normalize,
                           workers, OUT, data_version, settings.storage, settings.shard_mb,
                           crop_size=settings.image_size, interpolation=stored.interpolation)
        write_json(METRICS, stats)
        mlflow.log_metrics({k: v for k, v in stats.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
    print(f"preprocessed {stats['images']} images: {stats['from_cache']} from the cache, "
          f"{stats['decoded']} decoded; wrote {stats['shards_written']} of {stats['shards']} "
          f"shards, kept the rest; {stats['images_per_second']:.0f} img/s, "
          f"peak memory {stats['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
