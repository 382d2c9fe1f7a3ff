"""Index stage: walk data/raw, verify every image, split it, and write the manifest.

Two layouts are read: class folders, data/raw/<class>/**, whose val and test splits are
drawn from each class; or split folders, data/raw/<split>/<class>/** (train/val/test and
their common synonyms, see SPLIT_FOLDERS), whose folders are the splits, and a split with
no folder is drawn from train.

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
from stages.tensors import SPLITS as SPLIT_NAMES

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
SPLIT_LAYOUT = "data/raw/<split>/<class>/<image>"
# Folder names that mean a split, in lower case: those of ImageNet, Ultralytics, Kaggle and
# Roboflow exports, timm and fastai.
SPLIT_FOLDERS = {"train": "train", "training": "train",
                 "val": "val", "valid": "val", "validation": "val", "eval": "val",
                 "test": "test", "testing": "test"}
DRAWN = ("val", "test")  # splits drawn from train when they have no folder, in this order
HIDDEN = "hidden (name starts with '.')"
SUMMARY_CLASSES = 30  # the summary lists at most this many classes


# ---------------------------------------------------------------- walking the tree

@dataclass
class Walk:
    """What the walk found: candidate images per class, and everything it left out."""

    images: list[tuple[str, str, str]] = field(default_factory=list)  # (path, class, folder split)
    # (path, class, folder split) of every class folder, even empty ones
    class_folders: list[tuple[str, str, str]] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # kind -> count: not images, or hidden
    rejects: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    split_folders: dict[str, str] = field(default_factory=dict)  # split -> its folder's name


def is_hidden(name: str) -> bool:
    """Hidden entries (.DS_Store, ._AppleDouble, .ipynb_checkpoints) are never data."""
    return name.startswith(".")


def walk(raw: Path) -> Walk:
    """Find candidate images under raw/<class>/ or raw/<split>/<class>/; refuse a mixed tree."""
    if not raw.is_dir():
        raise UserError(f"{raw.as_posix()} not found: put your images in {LAYOUT} "
                        f"or {SPLIT_LAYOUT} (or `dvc pull` them)")
    found = Walk()
    root = raw.resolve()
    entries = _scan(raw)
    found.split_folders = split_layout(raw, entries)
    if not found.split_folders:
        _walk_folders(found, entries, root, "", LAYOUT)
        return found
    split_of = {name: split for split, name in found.split_folders.items()}
    for entry in entries:
        if entry.name in split_of:
            _walk_folders(found, _scan(Path(entry.path)), root, split_of[entry.name],
                          SPLIT_LAYOUT)
        else:  # files and hidden entries: as in a class-folder tree
            _walk_folders(found, [entry], root, "", SPLIT_LAYOUT)
    check_split_classes(found, raw)
    return found


def _scan(folder: Path) -> list[os.DirEntry]:
    try:
        return sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as err:
        raise UserError(f"{folder.as_posix()} cannot be read ({err.strerror}): "
                        "fix its permissions") from None


def split_layout(raw: Path, entries: list[os.DirEntry]) -> dict[str, str]:
    """{split: folder name} when the top folders are all split names, {} when none is."""
    folders = [e.name for e in entries
               if not is_hidden(e.name) and _is_utf8(e.name) and e.is_dir()]
    splits = [f for f in folders if f.lower() in SPLIT_FOLDERS]
    if not splits:
        return {}
    classes = [f for f in folders if f.lower() not in SPLIT_FOLDERS]
    where = raw.as_posix()
    if classes:
        raise UserError(f"{where} mixes split folders ({', '.join(splits[:3])}) with class "
                        f"folders ({', '.join(classes[:3])}{', ...' if len(classes) > 3 else ''}): "
                        f"put every class folder inside a split folder ({SPLIT_LAYOUT}), or "
                        f"use no split folders ({LAYOUT})")
    layout: dict[str, str] = {}
    for name in splits:
        split = SPLIT_FOLDERS[name.lower()]
        if split in layout:
            raise UserError(f"{where} has two folders for the {split} split ({layout[split]} "
                            f"and {name}): merge them into one")
        layout[split] = name
    if "train" not in layout:
        raise UserError(f"{where} has split folders ({', '.join(splits)}) but none for train: "
                        f"add {where}/train/<class>/<image>")
    return {s: layout[s] for s in SPLIT_NAMES if s in layout}


def check_split_classes(found: Walk, raw: Path) -> None:
    """A class in a val or test folder must have a train folder too: the model must learn it."""
    train = {cls for _, cls, split in found.class_folders if split == "train"}
    for path, cls, _ in found.class_folders:
        if cls not in train:
            raise UserError(f"{path} is a class that {raw.as_posix()}/"
                            f"{found.split_folders['train']} lacks: add its training images "
                            f"as {raw.as_posix()}/{found.split_folders['train']}/{cls}/, or "
                            "remove the folder")


def _walk_folders(found: Walk, entries: list[os.DirEntry], root: Path, split: str,
                  layout: str) -> None:
    """Walk the class folders among entries; split is the folder's split, '' for class folders."""
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
                found.class_folders.append((path, entry.name, split))
                _walk_class(found, entry.path, entry.name, root, split)
        elif not os.path.exists(entry.path):
            found.rejects.append((path, "broken symlink: its target does not exist"))
        elif _is_image_name(entry.name):
            found.rejects.append((path, f"image outside a class folder: move it into {layout}"))
        else:
            found.skipped[_kind_of_file(entry.name)] += 1


def _walk_class(found: Walk, class_dir: str, cls: str, root: Path, split: str) -> None:
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
                found.images.append((_shown(entry.path), cls, split))
            elif not os.path.exists(entry.path):
                found.rejects.append((_shown(entry.path),
                                      "broken symlink: its target does not exist"))
            elif outside := _outside(Path(os.path.realpath(entry.path)), top, root):
                found.rejects.append((_shown(entry.path), outside))
            else:
                found.images.append((_shown(entry.path), cls, split))
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


def assign_splits(rows: pd.DataFrame, fractions: dict[str, float],
                  previous: dict[str, str]) -> pd.Series:
    """Stratified train/val/test split that never moves an image seen before.

    A row whose `folder` column names val or test (split folders) is in that split.
    The others, the pool (class folders, or the train folder), are train unless drawn:
    for each split in `fractions` (those with no folder), new images of each class,
    taken in hash order, fill it up to round(fraction * n) of the class, at least 1,
    val first. Images in `previous` (by content hash) keep their split, so a fresh
    index of the same files always gives the same split, and adding images never
    moves old ones. A class needs 2 images for one drawn split and 3 for two: a
    single image is only ever trained on, and a class of 2 is not tested.
    """
    folder = rows["folder"] if "folder" in rows else pd.Series("", index=rows.index)
    given = folder.isin(["val", "test"])
    split = folder.where(given, "train").astype(object)
    drawn = [s for s in DRAWN if fractions.get(s, 0) > 0]
    pool = rows[~given]
    for _, group in pool.groupby("class", sort=False):
        if len(group) < 2:
            continue
        known = pd.Series([previous.get(sha, "") for sha in group["sha256"]],
                          index=group.index, dtype=object)
        known = known.where(known.isin(["train", *drawn]), "")  # no longer drawn: drawn again
        split[group.index] = known.where(known != "", "train")
        fits = drawn[:len(group) - 1]  # leave at least one image to train on
        targets = {s: max(1, round(fractions[s] * len(group))) for s in fits}
        while sum(targets.values()) > len(group) - 1:  # small classes: round() overshoots
            largest = max(targets, key=lambda s: targets[s])
            targets[largest] -= 1
        new = list(group[known == ""].sort_values("sha256").index)
        for s in fits:
            need = max(0, targets[s] - int((known == s).sum()))
            split[new[:need]] = s
            new = new[need:]
    return split


# ---------------------------------------------------------------- the manifest

def build_manifest(raw: Path, val_fraction: float, test_fraction: float, max_pixels: int,
                   workers: int, previous_splits: dict[str, str], cache: dict[str, Any]
                   ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Walk, check, de-duplicate and split: returns the manifest, rejects and a summary."""
    found = walk(raw)
    facts, decoded = check_all([p for p, _, _ in found.images], max_pixels, workers, cache)
    rejects = list(found.rejects)
    rows = []
    for (path, cls, folder), f in zip(found.images, facts):
        if f["reason"]:
            rejects.append((path, f["reason"]))
        else:
            rows.append((path, cls, folder, f["sha256"], f["bytes"], f["width"], f["height"]))
    frame = pd.DataFrame(rows, columns=["path", "class", "folder", "sha256", "bytes", "width",
                                        "height"])
    frame, duplicates = drop_duplicates(frame)
    rejects += duplicates

    counts = frame["class"].value_counts()
    empty = sorted({c for _, c, _ in found.class_folders if c not in counts})
    rejects += [(path, "class without usable images: the class is left out")
                for path, c, _ in found.class_folders if c in empty]
    classes = sorted(counts.index)
    fractions = {s: f for s, f in (("val", val_fraction), ("test", test_fraction))
                 if s not in found.split_folders}
    frame["label"] = frame["class"].map({c: i for i, c in enumerate(classes)})
    frame["split"] = assign_splits(frame, fractions, previous_splits)
    frame = frame.sort_values("path", kind="stable")[COLUMNS].reset_index(drop=True)
    reject_frame = pd.DataFrame(sorted(rejects), columns=["path", "reason"])
    per_split = frame.groupby(["class", "split"]).size()
    per_class = {c: {s: int(per_split.get((c, s), 0)) for s in SPLIT_NAMES} for c in classes}
    tested = "test" in found.split_folders or fractions.get("test", 0) > 0
    summary = {
        "images": len(frame), "classes": len(classes),
        **{s: int((frame["split"] == s).sum()) for s in SPLIT_NAMES},
        "rejected": len(reject_frame), "skipped": sum(found.skipped.values()),
        "checked": decoded, "reused": len(found.images) - decoded,
        "layout": "split folders" if found.split_folders else "class folders",
        "split_folders": found.split_folders,
        "drawn": {s: fractions[s] for s in DRAWN if s in fractions},
        "per_class": per_class,
        "rejects_by_reason": dict(sorted(Counter(reason_kind(r) for _, r in rejects).items())),
        "skipped_by_reason": dict(sorted(found.skipped.items())),
        "single_image_classes": [c for c in classes if counts[c] == 1],
        "untested_classes": [c for c in classes if tested and counts[c] > 1
                             and per_class[c]["test"] == 0],
        "untrained_classes": [c for c in classes if per_class[c]["train"] == 0],
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
    if summary["untrained_classes"]:  # the model could never learn it, yet it would be scored
        cls = summary["untrained_classes"][0]
        train = summary["split_folders"].get("train")
        if train:
            raise UserError(f"class {cls!r} has no usable images in {raw.as_posix()}/{train}/"
                            f"{cls}{rejected}: add images the model can learn it from")
        raise UserError(f"class {cls!r} has no image to train on: {SPLITS.as_posix()} keeps all "
                        "of its images in val or test; add images to it, or delete "
                        f"{SPLITS.as_posix()} to split afresh")


def layout_line(summary: dict[str, Any]) -> str:
    """Which layout was read, and where each split came from."""
    folders = summary["split_folders"]
    if folders:
        parts = [f"{s} from {RAW.as_posix()}/{folders[s]}/" for s in SPLIT_NAMES if s in folders]
        head = f"read split folders ({SPLIT_LAYOUT}): " + ", ".join(parts)
    else:
        head = f"read class folders ({LAYOUT})"
    drawn = [f"{s} {f:.0%}" for s, f in summary["drawn"].items() if f > 0]
    none = [s for s in summary["drawn"] if summary["drawn"][s] == 0]
    tail = (f"; drawn from {'train' if folders else 'each class'}: {', '.join(drawn)}"
            if drawn else "")
    tail += "".join(f"; no {s} split (index.{s}_fraction is 0)" for s in none)
    return head + tail


def print_summary(summary: dict[str, Any]) -> None:
    """A short, readable report of what was indexed and what was left out."""
    print(f"\nindexed {summary['images']} images in {summary['classes']} classes: "
          + ", ".join(f"{summary[s]} {s}" for s in SPLIT_NAMES))
    print(layout_line(summary))
    shown = list(summary["per_class"].items())[:SUMMARY_CLASSES]
    width = max([len("class")] + [len(c) for c, _ in shown])
    print(f"  {'class':<{width}}" + "".join(f"  {s:>6}" for s in SPLIT_NAMES))
    for cls, n in shown:
        print(f"  {cls:<{width}}" + "".join(f"  {n[s]:>6}" for s in SPLIT_NAMES))
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
              "validated or tested; add more images to it")
    untested = [c for c in summary["untested_classes"]
                if c not in summary["single_image_classes"]]
    if untested:
        names = ", ".join(repr(c) for c in untested[:SUMMARY_CLASSES])
        more = (f" and {len(untested) - SUMMARY_CLASSES} more"
                if len(untested) > SUMMARY_CLASSES else "")
        one = len(untested) == 1
        folder = summary["split_folders"].get("test")
        needs = 1 + sum(f > 0 for f in summary["drawn"].values())  # see assign_splits
        fix = (f"add their images to {RAW.as_posix()}/{folder}/" if folder
               else f"add images: a class needs {needs} for a test image")
        print(f"warning: {len(untested)} {'class has' if one else 'classes have'} no test "
              f"image, so the headline score leaves {'it' if one else 'them'} out: "
              f"{names}{more}; {fix}")
    for cls in summary["empty_classes"]:
        print(f"warning: class folder {cls!r} has no usable images: it is left out")


# ---------------------------------------------------------------- state between runs

def read_previous_splits(val_fraction: float, test_fraction: float) -> tuple[dict[str, str], bool]:
    """Splits from earlier runs, unless a fraction changed (then start afresh).

    Also says whether the history predates test splits (it records no test_fraction):
    its images keep train or val, and only new images are drawn into test, since moving
    an image that was trained on into test would score the model on what it learnt.
    """
    try:
        state = json.loads(SPLITS.read_text(encoding="utf-8"))
        legacy = "test_fraction" not in state
        same = (state["val_fraction"] == val_fraction
                and (legacy or state["test_fraction"] == test_fraction))
        splits = state["splits"] if same else {}
    except FileNotFoundError:
        return {}, False
    except (ValueError, KeyError, TypeError):
        print(f"warning: {SPLITS} is unreadable: splitting afresh", file=sys.stderr)
        return {}, False
    return {sha: s for sha, s in splits.items() if s in SPLIT_NAMES}, legacy and bool(splits)


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
    history, legacy = read_previous_splits(p.index.val_fraction, p.index.test_fraction)
    manifest, rejects, summary = build_manifest(RAW, p.index.val_fraction,
                                                p.index.test_fraction, max_pixels, workers,
                                                history, cache)
    save_cache(cache)
    write_csv(REJECTS, rejects)
    require_classes(summary)
    write_csv(MANIFEST, manifest)
    # Keep images that left the tree too: if they come back, they return to their split.
    write_json(SPLITS, {"val_fraction": p.index.val_fraction,
                        "test_fraction": p.index.test_fraction,
                        "splits": history | dict(zip(manifest["sha256"], manifest["split"]))})
    summary["data_version"] = tracking.file_digest(MANIFEST)
    write_json(METRICS, summary)
    print_summary(summary)
    if legacy and summary["drawn"].get("test", 0) > 0:
        print(f"note: {SPLITS.as_posix()} is from before imgpipe held out a test split: images "
              "indexed before keep their train or val split and only new images fill test "
              f"(it holds {summary['test']}); delete {SPLITS.as_posix()} and rerun to split "
              "every image afresh")

    logged = {"index": p.index.model_dump() | {"max_pixels": max_pixels}, "workers": workers}
    with tracking.stage_run(p.mlflow.experiment, "index", logged, summary["data_version"]):
        import mlflow

        mlflow.log_metrics({k: summary[k] for k in ("images", "classes", *SPLIT_NAMES,
                                                   "rejected", "skipped", "checked", "reused")})
        mlflow.log_metrics({tracking.metric_key(f"class.{c}"): sum(n.values())
                            for c, n in summary["per_class"].items()})
        if summary["rejects_by_reason"]:
            mlflow.log_metrics({tracking.metric_key(f"rejected.{k}"): v
                                for k, v in summary["rejects_by_reason"].items()})
        mlflow.log_artifact(str(REJECTS))


if __name__ == "__main__":
    main()
