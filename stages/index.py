"""Index stage: walk data/raw/<class>/**, verify every image, and write the manifest.

Outputs:
    data/manifest.csv   one row per usable image: path, class, label, sha256, bytes,
                        width, height, split
    data/rejects.csv    every file left out, with a reason a person can act on
    data/splits.json    split history, so that adding images never moves old ones
    metrics/index.json  counts, and how many files were checked or reused

Every file is hashed and fully decoded once. What was learnt about it (size,
dimensions, or why it is rejected) is cached in .cache/imgpipe/index-cache.json
by path, size and mtime, and by content hash, so re-indexing after adding images
decodes only the new files, and re-indexing a fresh checkout only hashes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import warnings
from collections import Counter
from collections.abc import Collection, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from stages import params, tracking
from stages.common import UserError, atomic_path, cache_root, cli, processes, write_csv, write_json
from stages.imaging import IMAGE_EXTENSIONS, to_rgb

RAW = Path("data/raw")
MANIFEST = Path("data/manifest.csv")
REJECTS = Path("data/rejects.csv")
SPLITS = Path("data/splits.json")
METRICS = Path("metrics/index.json")
CACHE_FILE = "index-cache.json"
CHECK_VERSION = 1   # bump when check_file decides differently: it invalidates the cache
COLUMNS = ["path", "class", "label", "sha256", "bytes", "width", "height", "split"]
FACTS = ("bytes", "width", "height", "reason")
LAYOUT = "data/raw/<class>/<image>"
HIDDEN = "hidden (name starts with '.')"
SUMMARY_CLASSES = 30  # the summary lists at most this many classes


# ---------------------------------------------------------------- walking the tree

@dataclass
class Walk:
    """What the walk found: candidate images per class, and everything it left out."""

    images: list[tuple[str, str]] = field(default_factory=list)  # (path, class)
    classes: list[str] = field(default_factory=list)  # every class folder, even empty ones
    skipped: Counter = field(default_factory=Counter)  # kind -> count: not images, or hidden
    rejects: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def is_hidden(name: str) -> bool:
    """Hidden entries (.DS_Store, ._AppleDouble, .ipynb_checkpoints) are never data."""
    return name.startswith(".")


def walk(raw: Path) -> Walk:
    """Find candidate images under raw/<class>/; symlinks are followed only inside their class."""
    if not raw.is_dir():
        raise UserError(f"{raw.as_posix()} not found: put your images in {LAYOUT} "
                        "(or `dvc pull` them)")
    root = raw.resolve()
    found = Walk()
    try:
        entries = sorted(os.scandir(raw), key=lambda e: e.name)
    except OSError as err:
        raise UserError(f"{raw.as_posix()} cannot be read ({err.strerror}): "
                        "fix its permissions") from None
    for entry in entries:
        path = _shown(entry.path)
        if is_hidden(entry.name):
            found.skipped[HIDDEN] += 1
        elif not _is_utf8(entry.name):
            found.rejects.append((path, "name is not valid UTF-8: rename it"))
        elif entry.is_dir():  # follows a symlink
            real = Path(os.path.realpath(entry.path))
            if real == root or root not in real.parents:
                found.rejects.append((path, f"symlink leads outside data/raw: to {real}; "
                                            "not read"))
            else:
                found.classes.append(entry.name)
                _walk_class(found, entry.path, entry.name, root)
        elif not os.path.exists(entry.path):
            found.rejects.append((path, "broken symlink: its target does not exist"))
        elif _is_image_name(entry.name):
            found.rejects.append((path, f"image outside a class folder: move it into {LAYOUT}"))
        else:
            found.skipped[_kind_of_file(entry.name)] += 1
    return found


def _walk_class(found: Walk, class_dir: str, cls: str, root: Path) -> None:
    """Add the images below one class folder, nested folders included."""
    top = Path(os.path.realpath(class_dir))
    seen: dict[str, str] = {}  # real folder -> the path it was first walked as
    folders = [class_dir]
    while folders:
        folder = folders.pop()
        real = os.path.realpath(folder)
        outside = _outside(Path(real), top, root)
        if outside or real in seen:
            reason = outside or (f"symlink loop: same folder as {_shown(seen[real])}; "
                                 "walked once")
            found.rejects.append((_shown(folder), reason))
            continue
        seen[real] = folder
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            found.rejects.append((_shown(folder), f"unreadable folder: {err.strerror}; "
                                                  "fix its permissions"))
            continue
        subfolders = []
        for entry in entries:
            if is_hidden(entry.name):
                found.skipped[HIDDEN] += 1
            elif entry.is_dir():  # follows a symlink; where it leads is checked when walked
                subfolders.append(entry.path)
            elif not _is_image_name(entry.name):
                found.skipped[_kind_of_file(entry.name)] += 1
            elif not _is_utf8(entry.path):
                found.rejects.append((_shown(entry.path), "name is not valid UTF-8: rename it"))
            elif not entry.is_symlink():
                found.images.append((_shown(entry.path), cls))
            elif not os.path.exists(entry.path):
                found.rejects.append((_shown(entry.path),
                                      "broken symlink: its target does not exist"))
            elif outside := _outside(Path(os.path.realpath(entry.path)), top, root):
                found.rejects.append((_shown(entry.path), outside))
            else:
                found.images.append((_shown(entry.path), cls))
        folders.extend(reversed(subfolders))


def _outside(real: Path, top: Path, root: Path) -> str:
    """Why a resolved path may not be read from class folder `top`, or '' if it may."""
    if real == top or top in real.parents:
        return ""
    if root in real.parents:
        return "symlink leads into another class folder: not read, so labels stay unambiguous"
    return f"symlink leads outside data/raw: to {real}; not read"


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _kind_of_file(name: str) -> str:
    return f"not an image ({os.path.splitext(name)[1].lower() or 'no extension'})"


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:  # undecodable bytes in a file name (surrogate escapes)
        return False


def _shown(path: str) -> str:
    """A path as the outputs show it: posix, with undecodable bytes escaped."""
    if not _is_utf8(path):
        path = os.fsencode(path).decode("utf-8", "backslashreplace")
    return path.replace(os.sep, "/") if os.sep != "/" else path


# ---------------------------------------------------------------- checking one file

def pixel_limit(max_pixels: int | None) -> int:
    """index.max_pixels, where null means Pillow's own decompression-bomb limit."""
    from PIL import Image

    return max_pixels or Image.MAX_IMAGE_PIXELS


def check_file(path: str, max_pixels: int, known: Collection[str] = ()) -> dict[str, Any]:
    """Hash one file and, unless its hash is `known`, decode it: its facts, or why to reject it."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return {"sha256": None, "bytes": 0, "width": 0, "height": 0,
                "reason": f"unreadable file: {err.strerror or err}; check its permissions"}
    sha = hashlib.sha256(data).hexdigest()
    if sha in known:
        return {"sha256": sha}  # decided before: the caller takes the facts from the cache
    return {"sha256": sha, **inspect_image(data, max_pixels)}


def inspect_image(data: bytes, max_pixels: int) -> dict[str, Any]:
    """Decode an image fully (header first, against the pixel limit); reason '' if usable."""
    from PIL import Image, UnidentifiedImageError

    facts = {"bytes": len(data), "width": 0, "height": 0, "reason": ""}
    if not data:
        return facts | {"reason": "empty file: 0 bytes; replace or delete it"}
    try:
        with _pillow_limit_off(), Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            facts |= {"width": width, "height": height}
            if width * height > max_pixels:  # decided on the header: nothing is decoded
                return facts | {"reason": f"too many pixels: {width}x{height} is more than "
                                          f"index.max_pixels={max_pixels} (a possible "
                                          "decompression bomb); shrink it or raise the limit"}
            img.load()    # verify() misses truncated JPEGs; a full decode does not
            to_rgb(img)   # the conversion preprocess makes must work too
            if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF rotation by 90 degrees
                facts |= {"width": height, "height": width}
    except UnidentifiedImageError:
        return facts | {"reason": f"not an image: {_sniff(data)}; remove it from data/raw"}
    except Exception as err:  # noqa: BLE001 - a bad file may make Pillow raise anything
        detail = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        return facts | {"reason": f"broken image: {detail}; re-export or remove it"}
    return facts


@contextlib.contextmanager
def _pillow_limit_off() -> Iterator[None]:
    """Our own pixel limit applies instead of Pillow's, which would raise inside open()."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # odd EXIF and palettes warn; they are not errors
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _sniff(data: bytes) -> str:
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        return "it is an HTML or XML page (a saved web page?)"
    try:
        head.decode("utf-8")
        return "it is text"
    except UnicodeDecodeError:
        return "unknown file format"


_known: Collection[str] = ()  # set in each worker process by _start_worker


def _start_worker(known: Collection[str]) -> None:
    global _known
    _known = known


def _check_chunk(args: tuple[list[str], int]) -> list[dict[str, Any]]:
    paths, max_pixels = args
    return [check_file(p, max_pixels, _known) for p in paths]


def _checks(paths: list[str], max_pixels: int, workers: int,
            known: Collection[str]) -> Iterator[dict[str, Any]]:
    """check_file over paths, in order, in `workers` processes (in this one for a few files)."""
    if workers <= 1 or len(paths) < 64:
        for path in paths:
            yield check_file(path, max_pixels, known)
        return
    size = max(1, min(64, len(paths) // (4 * workers)))  # small chunks keep every worker busy
    chunks = [(paths[i:i + size], max_pixels) for i in range(0, len(paths), size)]
    with ProcessPoolExecutor(workers, initializer=_start_worker, initargs=(known,)) as pool:
        for checked in pool.map(_check_chunk, chunks):
            yield from checked


def check_all(paths: list[str], max_pixels: int, workers: int,
              cache: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """Facts for every file, reusing the cache; returns them and how many files were decoded."""
    files, facts = cache["files"], cache["facts"]
    keys = [_stat_key(p) for p in paths]
    results: list[dict[str, Any] | None] = [
        {"sha256": files[k], **facts[files[k]]} if files.get(k) in facts else None for k in keys]
    todo = [i for i, r in enumerate(results) if r is None]
    decoded = 0
    with tqdm(total=len(paths), initial=len(paths) - len(todo), desc="index", unit="file",
              disable=None) as bar:  # disable=None: a bar on a terminal, not in logs
        for i, found in zip(todo, _checks([paths[i] for i in todo], max_pixels, workers,
                                          frozenset(facts))):
            sha = found["sha256"]
            if "reason" in found:  # decoded now (or unreadable: sha is None)
                decoded += 1
                if sha is not None:
                    facts[sha] = {k: found[k] for k in FACTS}
            results[i] = {"sha256": sha, **facts[sha]} if sha is not None else found
            if sha is not None and keys[i] is not None:
                files[keys[i]] = sha
            bar.update()
    # Keep only what this tree holds, so the cache never outgrows the data.
    cache["files"] = {k: files[k] for k in keys if k in files}
    cache["facts"] = {s: facts[s] for s in cache["files"].values()}
    return results, decoded  # type: ignore[return-value]


def _stat_key(path: str) -> str | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{path}|{st.st_size}|{st.st_mtime_ns}"


# ---------------------------------------------------------------- duplicates and splits

def drop_duplicates(rows: pd.DataFrame) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Same bytes in two classes: reject every copy. Same bytes twice in one class: keep one."""
    rows = rows.sort_values("path", kind="stable")
    copies = rows[rows.duplicated("sha256", keep=False)]
    classes: dict[str, set[str]] = {}
    for sha, cls in zip(copies["sha256"], copies["class"]):
        classes.setdefault(sha, set()).add(cls)
    kept: dict[str, str] = {}  # sha256 -> the path kept, the first in path order
    dropped, rejects = [], []
    for i, path, sha in zip(copies.index, copies["path"], copies["sha256"]):
        if len(classes[sha]) > 1:
            rejects.append((path, "same image in several classes: identical bytes in "
                                  f"{', '.join(sorted(classes[sha]))}; the label is ambiguous, "
                                  "so keep it in one class only"))
        elif sha in kept:
            rejects.append((path, f"duplicate in its class: identical bytes to {kept[sha]}, "
                                  "which is kept"))
        else:
            kept[sha] = path
            continue
        dropped.append(i)
    return rows.drop(index=dropped), rejects


def assign_splits(rows: pd.DataFrame, val_fraction: float,
                  previous: dict[str, str]) -> pd.Series:
    """Stratified train/val split that never moves an image seen before.

    Images in `previous` (by content hash) keep their split. New images of each
    class, taken in hash order, fill val up to round(val_fraction * n) of the
    class, so a fresh index of the same files always gives the same split. A class
    with a single image is only ever trained on.
    """
    known_all = pd.Series([previous.get(sha, "") for sha in rows["sha256"]], index=rows.index,
                          dtype=object)  # "" for an image never seen before
    split = pd.Series("train", index=rows.index, dtype=object)
    for _, group in rows.groupby("class", sort=False):
        if len(group) < 2:
            continue
        known = known_all[group.index]
        split[group.index] = known.where(known != "", "train")
        target = max(1, round(val_fraction * len(group))) if val_fraction > 0 else 0
        need = target - int((known == "val").sum())
        new = group[known == ""].sort_values("sha256")
        split[new.index[:max(0, need)]] = "val"
    return split


# ---------------------------------------------------------------- the manifest

def build_manifest(raw: Path, val_fraction: float, max_pixels: int, workers: int,
                   previous_splits: dict[str, str], cache: dict[str, Any]
                   ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Walk, check, de-duplicate and split: returns the manifest, rejects and a summary."""
    found = walk(raw)
    facts, decoded = check_all([p for p, _ in found.images], max_pixels, workers, cache)
    rejects = list(found.rejects)
    rows = []
    for (path, cls), f in zip(found.images, facts):
        if f["reason"]:
            rejects.append((path, f["reason"]))
        else:
            rows.append((path, cls, f["sha256"], f["bytes"], f["width"], f["height"]))
    frame = pd.DataFrame(rows, columns=["path", "class", "sha256", "bytes", "width", "height"])
    frame, duplicates = drop_duplicates(frame)
    rejects += duplicates

    counts = frame["class"].value_counts()
    empty = [c for c in found.classes if c not in counts]
    rejects += [(f"{raw.as_posix()}/{c}", "class without usable images: the class is left out")
                for c in empty]
    classes = sorted(counts.index)
    frame["label"] = frame["class"].map({c: i for i, c in enumerate(classes)})
    frame["split"] = assign_splits(frame, val_fraction, previous_splits)
    frame = frame.sort_values("path", kind="stable")[COLUMNS].reset_index(drop=True)
    reject_frame = pd.DataFrame(sorted(rejects), columns=["path", "reason"])
    per_split = frame.groupby(["class", "split"]).size()
    summary = {
        "images": len(frame), "classes": len(classes),
        "train": int((frame["split"] == "train").sum()),
        "val": int((frame["split"] == "val").sum()),
        "rejected": len(reject_frame), "skipped": sum(found.skipped.values()),
        "checked": decoded, "reused": len(found.images) - decoded,
        "per_class": {c: {s: int(per_split.get((c, s), 0)) for s in ("train", "val")}
                      for c in classes},
        "rejects_by_reason": dict(sorted(Counter(reason_kind(r) for _, r in rejects).items())),
        "skipped_by_reason": dict(sorted(found.skipped.items())),
        "single_image_classes": [c for c in classes if counts[c] == 1],
        "empty_classes": empty,
    }
    return frame, reject_frame, summary


def reason_kind(reason: str) -> str:
    """The kind of a reject reason: the words before its first colon."""
    return reason.split(":", 1)[0]


def require_classes(summary: dict[str, Any], raw: Path = RAW) -> None:
    """Training needs images in at least 2 classes: otherwise say what was found, in one line."""
    rejected = (f"; {summary['rejected']} rejected, see {REJECTS.as_posix()}"
                if summary["rejected"] else "")
    if summary["images"] == 0:
        raise UserError(f"found no usable images under {raw.as_posix()}{rejected}: "
                        f"expected images laid out as {LAYOUT}")
    if summary["classes"] < 2:
        only = next(iter(summary["per_class"]))
        raise UserError(f"found only 1 class with usable images under {raw.as_posix()} "
                        f"({only!r}){rejected}: need at least 2, laid out as {LAYOUT}")


def print_summary(summary: dict[str, Any]) -> None:
    """A short, readable report of what was indexed and what was left out."""
    print(f"\nindexed {summary['images']} images in {summary['classes']} classes: "
          f"{summary['train']} train, {summary['val']} val")
    shown = list(summary["per_class"].items())[:SUMMARY_CLASSES]
    width = max([len("class")] + [len(c) for c, _ in shown])
    print(f"  {'class':<{width}}  {'train':>6}  {'val':>6}")
    for cls, n in shown:
        print(f"  {cls:<{width}}  {n['train']:>6}  {n['val']:>6}")
    if summary["classes"] > len(shown):
        print(f"  ... and {summary['classes'] - len(shown)} more classes "
              f"(see {METRICS.as_posix()})")
    if summary["rejected"]:
        print(f"rejected {summary['rejected']} entries (see {REJECTS.as_posix()}):")
        for kind, n in summary["rejects_by_reason"].items():
            print(f"  {n:>6}  {kind}")
    if summary["skipped"]:
        print(f"skipped {summary['skipped']} files and folders that are not images:")
        for kind, n in summary["skipped_by_reason"].items():
            print(f"  {n:>6}  {kind}")
    print(f"checked {summary['checked']} new or changed files, "
          f"reused {summary['reused']} earlier checks")
    for cls in summary["single_image_classes"]:
        print(f"warning: class {cls!r} has a single image: it is trained on but never "
              "validated; add more images to it")
    for cls in summary["empty_classes"]:
        print(f"warning: class folder {cls!r} has no usable images: it is left out")


# ---------------------------------------------------------------- state between runs

def read_previous_splits(val_fraction: float) -> dict[str, str]:
    """Splits from earlier runs, unless val_fraction changed (then start afresh)."""
    try:
        state = json.loads(SPLITS.read_text(encoding="utf-8"))
        splits = state["splits"] if state["val_fraction"] == val_fraction else {}
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError):
        print(f"warning: {SPLITS} is unreadable: splitting afresh", file=sys.stderr)
        return {}
    return {sha: s for sha, s in splits.items() if s in ("train", "val")}


def cache_path() -> Path:
    """The re-index cache lives outside DVC's outs, so it survives reruns."""
    return cache_root() / CACHE_FILE


def _cache_version(max_pixels: int) -> str:
    from PIL import __version__ as pillow

    return f"{CHECK_VERSION}-pillow{pillow}-max{max_pixels}"


def load_cache(max_pixels: int) -> dict[str, Any]:
    """The re-index cache: {files: path|size|mtime -> sha256, facts: sha256 -> facts}."""
    empty = {"version": _cache_version(max_pixels), "files": {}, "facts": {}}
    try:
        cache = json.loads(cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return empty
    if not isinstance(cache, dict) or cache.get("version") != empty["version"]:
        return empty  # other checks, or another pixel limit: decide every file again
    return cache


def save_cache(cache: dict[str, Any]) -> None:
    """Write the cache; failing to write it only costs time on the next run."""
    try:
        with atomic_path(cache_path()) as tmp:  # compact: it holds a line per file
            tmp.write_text(json.dumps(cache, separators=(",", ":")), encoding="utf-8")
    except OSError as err:
        print(f"warning: could not write the index cache {cache_path()}: {err.strerror}",
              file=sys.stderr)


# ---------------------------------------------------------------- the stage

@cli
def main() -> None:
    """Index data/raw into data/manifest.csv and data/rejects.csv."""
    p = params.load()
    max_pixels = pixel_limit(p.index.max_pixels)
    workers = processes(p.workers)
    tracking.check_reachable(tracking.tracking_uri())  # fail before the work, not after

    cache = load_cache(max_pixels)
    history = read_previous_splits(p.index.val_fraction)
    manifest, rejects, summary = build_manifest(RAW, p.index.val_fraction, max_pixels,
                                                workers, history, cache)
    save_cache(cache)
    write_csv(REJECTS, rejects)
    require_classes(summary)
    write_csv(MANIFEST, manifest)
    # Keep images that left the tree too: if they come back, they return to their split.
    write_json(SPLITS, {"val_fraction": p.index.val_fraction,
                        "splits": history | dict(zip(manifest["sha256"], manifest["split"]))})
    summary["data_version"] = tracking.file_digest(MANIFEST)
    write_json(METRICS, summary)
    print_summary(summary)

    logged = {"index": p.index.model_dump() | {"max_pixels": max_pixels}, "workers": workers}
    with tracking.stage_run(p.mlflow.experiment, "index", logged, summary["data_version"]):
        import mlflow

        mlflow.log_metrics({k: summary[k] for k in ("images", "classes", "train", "val",
                                                   "rejected", "skipped", "checked", "reused")})
        mlflow.log_metrics({tracking.metric_key(f"class.{c}"): n["train"] + n["val"]
                            for c, n in summary["per_class"].items()})
        if summary["rejects_by_reason"]:
            mlflow.log_metrics({tracking.metric_key(f"rejected.{k}"): v
                                for k, v in summary["rejects_by_reason"].items()})
        mlflow.log_artifact(str(REJECTS))


if __name__ == "__main__":
    main()
