"""Index stage: walk data/raw/<class>/**, verify every image, and write the manifest.

Outputs:
    data/manifest.csv   one row per usable image: path, class, label, sha256, bytes,
                        width, height, split
    data/rejects.csv    every file left out, with a reason a person can act on
    data/splits.json    split history, so that adding images never moves old ones
    metrics/index.json  counts
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from stages import tracking
from stages.common import UserError, cli, load_params, repo_root, write_csv, write_json
from stages.imaging import IMAGE_EXTENSIONS

RAW = Path("data/raw")
MANIFEST = Path("data/manifest.csv")
REJECTS = Path("data/rejects.csv")
SPLITS = Path("data/splits.json")
METRICS = Path("metrics/index.json")
CACHE_FILE = "index-cache.json"
COLUMNS = ["path", "class", "label", "sha256", "bytes", "width", "height", "split"]


# ---------------------------------------------------------------- walking the tree

@dataclass
class Walk:
    """What the walk found: candidate images per class, and everything it skipped."""

    images: list[tuple[str, str]]          # (path relative to the repo, class)
    classes: list[str]                     # every visible class folder, even empty ones
    skipped: Counter                       # reason -> count, for non-image files
    rejects: list[tuple[str, str]]         # (path, reason) for unsafe entries


def is_hidden(name: str) -> bool:
    """Hidden entries (.DS_Store, ._AppleDouble, .ipynb_checkpoints) are never data."""
    return name.startswith(".")


def walk(raw: Path) -> Walk:
    """Find candidate images under raw/<class>/, following symlinks safely."""
    if not raw.is_dir():
        raise UserError(f"{raw} not found: put your images in {raw}/<class>/<image>")
    root = raw.resolve()
    found = Walk([], [], Counter(), [])
    for entry in sorted(os.scandir(raw), key=lambda e: e.name):
        if is_hidden(entry.name):
            continue
        if not entry.is_dir():
            found.skipped["file outside a class folder"] += 1
            continue
        found.classes.append(entry.name)
        seen_dirs: set[str] = set()
        for folder, dirs, files in os.walk(entry.path, followlinks=True):
            real = os.path.realpath(folder)
            if real in seen_dirs or not _inside(real, root):
                reason = "symlink loop" if real in seen_dirs else "symlink leads outside data/raw"
                found.rejects.append((folder, f"{reason}: skipped"))
                dirs[:] = []
                continue
            seen_dirs.add(real)
            dirs[:] = sorted(d for d in dirs if not is_hidden(d))
            for name in sorted(files):
                if is_hidden(name):
                    continue
                path = os.path.join(folder, name)
                if not _inside(os.path.realpath(path), root):
                    found.rejects.append((path, "symlink leads outside data/raw: skipped"))
                elif Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                    found.images.append((path, entry.name))
                else:
                    kind = Path(name).suffix.lower() or "no extension"
                    found.skipped[f"not an image ({kind})"] += 1
    return found


def _inside(path: str, root: Path) -> bool:
    return Path(path) == root or root in Path(path).parents


# ---------------------------------------------------------------- checking one file

def check_image(path: str, max_pixels: int) -> dict[str, Any]:
    """Hash and fully decode one file; return its facts, or a reason to reject it."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = None  # we apply our own limit below, before decoding
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return {"reason": f"unreadable: {err.strerror or err}"}
    facts: dict[str, Any] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    if not data:
        return facts | {"reason": "empty file (0 bytes): delete it or replace it"}
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > max_pixels:
                return facts | {"reason": f"too many pixels ({width}x{height} > "
                                          f"index.max_pixels={max_pixels}): possible "
                                          "decompression bomb; shrink it or raise the limit"}
            # verify() checks structure but misses truncated JPEGs, so decode for real.
            img.load()
            if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                width, height = height, width
    except UnidentifiedImageError:
        return facts | {"reason": f"not an image ({_sniff(data)}): remove it from data/raw"}
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return facts | {"reason": f"broken image ({err}): re-export or remove it"}
    return facts | {"width": width, "height": height, "reason": ""}


def _sniff(data: bytes) -> str:
    head = data[:256].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        return "looks like an HTML page"
    try:
        head.decode("utf-8")
        return "looks like text"
    except UnicodeDecodeError:
        return "unknown format"


def _check_many(args: tuple[list[str], int]) -> list[dict[str, Any]]:
    paths, max_pixels = args
    return [check_image(p, max_pixels) for p in paths]


def check_all(paths: list[str], max_pixels: int, workers: int,
              cache: dict[str, Any]) -> list[dict[str, Any]]:
    """Check every file in parallel; files whose path, size and mtime match the cache are reused."""
    keys = [_cache_key(p) for p in paths]
    results: list[dict[str, Any] | None] = [cache.get(k) for k in keys]
    todo = [i for i, r in enumerate(results) if r is None]
    chunks = [todo[i:i + 64] for i in range(0, len(todo), 64)]
    bar = tqdm(total=len(paths), initial=len(paths) - len(todo), desc="index", unit="img")
    with bar, ProcessPoolExecutor(max_workers=workers) as pool:
        jobs = [([paths[i] for i in chunk], max_pixels) for chunk in chunks]
        for chunk, checked in zip(chunks, pool.map(_check_many, jobs)):
            for i, facts in zip(chunk, checked):
                results[i] = facts
            bar.update(len(chunk))
    for key, facts in zip(keys, results):
        cache[key] = facts
    return results  # type: ignore[return-value]


def _cache_key(path: str) -> str:
    st = os.stat(path)
    return f"{path}|{st.st_size}|{st.st_mtime_ns}"


# ---------------------------------------------------------------- duplicates and splits

def drop_duplicates(rows: pd.DataFrame) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Same bytes in two classes: reject every copy. Same bytes twice in one class: keep one."""
    rejects = []
    keep = pd.Series(True, index=rows.index)
    for _, group in rows.groupby("sha256", sort=False):
        if len(group) == 1:
            continue
        classes = sorted(group["class"].unique())
        if len(classes) > 1:
            for i, row in group.iterrows():
                rejects.append((row["path"], "same bytes in classes " + ", ".join(classes)
                                + ": the label is ambiguous; keep it in one class only"))
                keep[i] = False
        else:
            first = group["path"].iloc[0]
            for i, row in group.iloc[1:].iterrows():
                rejects.append((row["path"], f"duplicate of {first}: kept once"))
                keep[i] = False
    return rows[keep], rejects


def assign_splits(rows: pd.DataFrame, val_fraction: float,
                  previous: dict[str, str]) -> pd.Series:
    """Stratified train/val split that never moves an image seen before.

    Images already in `previous` (keyed by content hash) keep their split. New
    images of each class, taken in hash order, fill val up to round(fraction * n),
    so a fresh index of the same files always gives the same split.
    """
    split = pd.Series("train", index=rows.index)
    for _, group in rows.groupby("class", sort=False):
        known = group["sha256"].map(previous).astype(object)
        split[group.index] = known.where(known.notna(), "train")
        if len(group) < 2:
            continue  # a lone image is only ever trained on
        target = max(1, round(val_fraction * len(group))) if val_fraction > 0 else 0
        need = target - int((known == "val").sum())
        new = group[known.isna()].sort_values("sha256")
        split[new.index[:max(0, need)]] = "val"
    return split


# ---------------------------------------------------------------- the stage

def build_manifest(raw: Path, val_fraction: float, max_pixels: int, workers: int,
                   previous_splits: dict[str, str], cache: dict[str, Any]
                   ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Walk, check, de-duplicate and split: returns the manifest, rejects and a summary."""
    found = walk(raw)
    paths = [p for p, _ in found.images]
    facts = check_all(paths, max_pixels, workers, cache)
    rejects = list(found.rejects)
    rows = []
    for (path, cls), f in zip(found.images, facts):
        rel = Path(path).as_posix()
        if f["reason"]:
            rejects.append((rel, f["reason"]))
        else:
            rows.append({"path": rel, "class": cls, **{k: f[k] for k in
                                                       ("sha256", "bytes", "width", "height")}})
    frame = pd.DataFrame(rows, columns=["path", "class", "sha256", "bytes", "width", "height"])
    frame, dupes = drop_duplicates(frame)
    rejects += dupes

    counts = frame["class"].value_counts()
    for cls in found.classes:
        if cls not in counts:
            rejects.append((f"{raw.as_posix()}/{cls}",
                            "class folder has no usable images: excluded"))
    classes = sorted(counts.index)
    if len(frame) == 0 or len(classes) < 2:
        raise UserError(f"found {len(frame)} usable images in {len(classes)} class folders under "
                        f"{raw}: need at least 2 classes laid out as {raw}/<class>/<image>"
                        + (" (see data/rejects.csv)" if rejects else ""))
    frame["label"] = frame["class"].map({c: i for i, c in enumerate(classes)})
    frame["split"] = assign_splits(frame, val_fraction, previous_splits)
    frame = frame.sort_values("path", kind="stable")[COLUMNS].reset_index(drop=True)
    reject_frame = pd.DataFrame(sorted(rejects), columns=["path", "reason"])
    summary = {
        "images": len(frame), "classes": len(classes),
        "train": int((frame["split"] == "train").sum()),
        "val": int((frame["split"] == "val").sum()),
        "rejected": len(reject_frame), "skipped": sum(found.skipped.values()),
        "per_class": {c: int(counts[c]) for c in classes},
        "rejects_by_reason": dict(Counter(_reason_kind(r) for _, r in rejects)),
        "skipped_by_reason": dict(found.skipped),
        "single_image_classes": [c for c in classes if counts[c] == 1],
    }
    return frame, reject_frame, summary


def _reason_kind(reason: str) -> str:
    """Group reasons by their first words, so the summary stays short."""
    return reason.split(":")[0].split(" (")[0]


def print_summary(summary: dict[str, Any]) -> None:
    """A short, readable report of what was indexed and what was left out."""
    print(f"\nindexed {summary['images']} images in {summary['classes']} classes: "
          f"{summary['train']} train, {summary['val']} val")
    width = max(len(c) for c in summary["per_class"])
    for cls, n in summary["per_class"].items():
        print(f"  {cls:<{width}}  {n}")
    for cls in summary["single_image_classes"]:
        print(f"warning: class {cls!r} has a single image: it is trained on but never validated")
    if summary["rejected"]:
        print(f"rejected {summary['rejected']} files (details in {REJECTS}):")
        for reason, n in sorted(summary["rejects_by_reason"].items()):
            print(f"  {n:>5}  {reason}")
    if summary["skipped"]:
        print(f"skipped {summary['skipped']} files that are not images:")
        for reason, n in sorted(summary["skipped_by_reason"].items()):
            print(f"  {n:>5}  {reason}")


def read_previous_splits(val_fraction: float) -> dict[str, str]:
    """Splits from the last run, unless val_fraction changed (then start afresh)."""
    try:
        state = json.loads(SPLITS.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return state["splits"] if state.get("val_fraction") == val_fraction else {}


def cache_path() -> Path:
    """The re-index cache lives outside DVC's outs, so it survives reruns."""
    return Path(os.environ.get("IMGPIPE_CACHE") or repo_root() / ".cache" / "imgpipe") / CACHE_FILE


def load_cache() -> dict[str, Any]:
    """The re-index cache: path|size|mtime -> facts."""
    try:
        return json.loads(cache_path().read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


@cli
def main() -> None:
    """Index data/raw into data/manifest.csv and data/rejects.csv."""
    params = load_params()
    p = params["index"]
    val_fraction = float(p["val_fraction"])
    if not 0 <= val_fraction < 1:
        raise UserError(f"index.val_fraction in params.yaml is {val_fraction}: use 0 <= x < 1")
    from PIL import Image

    max_pixels = int(p.get("max_pixels") or Image.MAX_IMAGE_PIXELS)
    workers = int(params.get("workers") or 0) or os.cpu_count() or 1

    with tracking.stage_run(params["mlflow"]["experiment"], "index",
                            {"index": p, "workers": workers}) as _:
        import mlflow

        cache = load_cache()
        manifest, rejects, summary = build_manifest(
            RAW, val_fraction, max_pixels, workers, read_previous_splits(val_fraction), cache)
        write_csv(MANIFEST, manifest)
        write_csv(REJECTS, rejects)
        write_json(SPLITS, {"val_fraction": val_fraction,
                            "splits": dict(zip(manifest["sha256"], manifest["split"]))})
        live = {k: v for k, v in cache.items() if Path(k.split("|")[0]).exists()}
        write_json(cache_path(), live)
        summary["data_version"] = tracking.file_digest(MANIFEST)
        write_json(METRICS, summary)

        mlflow.set_tag("data.version", summary["data_version"])
        mlflow.log_metrics({k: summary[k] for k in ("images", "classes", "train", "val",
                                                   "rejected", "skipped")})
        mlflow.log_metrics({tracking.metric_key(f"rejected.{k}"): v
                            for k, v in summary["rejects_by_reason"].items()})
        mlflow.log_artifact(str(REJECTS))
    print_summary(summary)


if __name__ == "__main__":
    main()
