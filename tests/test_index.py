"""The index stage: every messy real-world folder handled, nothing lost, clear errors."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import ROOT, dvc, env, make_repo, mlflow_runs
from corpus import (
    ANIMATED,
    BOMB,
    GRAY16,
    MAX_PIXELS,
    ROTATED,
    SINGLE,
    TRANSPARENT,
    TRUNCATED,
    Expect,
    bomb_header_png,
    encode,
    noise,
    write_corpus,
)
from PIL import Image

from stages import index
from stages.imaging import load_pixels


@contextlib.contextmanager
def inside(folder: Path) -> Iterator[None]:
    """Run the block with folder as the current directory, as a stage runs in its repo."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def build(repo: Path, history: dict[str, str] | None = None, cache: dict | None = None,
          max_pixels: int = MAX_PIXELS, workers: int = 1, val_fraction: float = 0.2,
          test_fraction: float = 0.1) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Index repo/data/raw the way the stage does, without writing anything."""
    with inside(repo):
        return index.build_manifest(index.RAW, val_fraction, test_fraction, max_pixels, workers,
                                    history or {},
                                    index.load_cache(max_pixels) if cache is None else cache)


def assert_outcomes(manifest: pd.DataFrame, rejects: pd.DataFrame, expect: list[Expect]) -> None:
    """Every entry of the corpus ended where it should, and nothing else was rejected."""
    classes = dict(zip(manifest["path"], manifest["class"]))
    reasons = dict(zip(rejects["path"], rejects["reason"]))
    for e in expect:
        if e.outcome == "manifest":
            assert classes.get(e.path) == e.detail, (e, reasons.get(e.path))
        elif e.outcome == "reject":
            assert reasons.get(e.path, "").startswith(f"{e.detail}: "), (e, reasons.get(e.path))
        else:
            assert e.path not in classes and e.path not in reasons, e
    assert set(reasons) <= {e.path for e in expect}, set(reasons) - {e.path for e in expect}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory):
    """The messy corpus, indexed once: (repo, expected outcomes, manifest, rejects, summary)."""
    base = tmp_path_factory.mktemp("corpus")
    repo = base / "repo"
    expect = write_corpus(repo, base / "outside")
    return (repo, expect, *build(repo))


# ---------------------------------------------------------------- the messy corpus

def test_every_file_of_the_corpus_has_its_outcome(corpus):
    repo, expect, manifest, rejects, summary = corpus
    assert_outcomes(manifest, rejects, expect)
    assert summary["skipped"] == sum(e.outcome == "skip" for e in expect)
    assert summary["rejected"] == sum(e.outcome == "reject" for e in expect)
    assert not manifest["path"].str.contains("ipynb_checkpoints|hidden|secret").any()
    assert manifest["sha256"].is_unique  # so no duplicate can sit in both train and val
    # Every reason is something a person can act on: a kind, then what happened and what to do.
    assert all(len(r.split(": ", 1)) == 2 for r in rejects["reason"])


def test_classes_are_any_folder_name_and_labels_follow_sorted_names(corpus):
    _, _, manifest, _, summary = corpus
    names = ["Dog Photos", "UPPER", "café-ñ", "cat", "single", "v1.2"]
    assert sorted(names) == names and list(summary["per_class"]) == names
    assert dict(zip(manifest["class"], manifest["label"])) == {c: i for i, c in enumerate(names)}
    assert summary["empty_classes"] == ["all-broken", "empty"]


def test_single_image_class_is_trained_on_and_warned_about(corpus, capsys):
    _, _, manifest, _, summary = corpus
    assert manifest.set_index("path").at[SINGLE, "split"] == "train"
    index.print_summary(summary)
    out = capsys.readouterr().out
    assert "warning: class 'single' has a single image" in out


def test_summary_reads_well(corpus, capsys):
    *_, summary = corpus
    index.print_summary(summary)
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0] == "indexed 29 images in 6 classes: 21 train, 6 val, 2 test"
    assert lines[1] == ("read class folders (data/raw/<class>/<image>); drawn from each class: "
                        "val 20%, test 10%")
    assert "  Dog Photos      10       3       1" in lines  # a table of classes and splits
    assert "rejected 22 entries (see data/rejects.csv):" in lines
    assert "       4  not an image" in lines  # grouped by kind of reason
    assert "       5  hidden (name starts with '.')" in lines
    assert "       1  not an image (.txt)" in lines
    # v1.2 has 2 images: too few for all three splits, so it is named.
    assert ("warning: 1 class has no test image, so the headline score leaves it out: 'v1.2'; "
            "add images: a class needs 3 for a test image") in lines
    assert len(lines) < 50


def test_accepted_images_decode_to_rgb_the_documented_way(corpus):
    repo, _, manifest, _, _ = corpus
    with inside(repo):
        pixels = {p: load_pixels(p, 8, "squash") for p in manifest["path"]}
    assert all(p.shape == (3, 8, 8) and p.dtype == np.uint8 for p in pixels.values())
    assert (pixels[ANIMATED][:, 4, 4] == [255, 0, 0]).all()  # the first frame of a GIF
    assert (pixels[TRANSPARENT] == 255).all()                 # composited on white
    assert (pixels[GRAY16] == 128).all()                      # 32768 of 65535 -> 128 of 255
    row = manifest.set_index("path").loc[ROTATED]
    assert (row["width"], row["height"]) == (10, 12)          # EXIF rotation applied


def test_truncated_jpeg_passes_verify_but_is_rejected(corpus):
    repo, _, _, rejects, _ = corpus
    with Image.open(repo / TRUNCATED) as img:
        img.verify()  # Pillow's structural check alone lets it through
    assert rejects.set_index("path").at[TRUNCATED, "reason"].startswith("broken image: ")


def test_decompression_bomb_is_rejected_unread(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_header_png(60_000, 60_000))  # 3.6 billion pixels claimed in 100 bytes
    pillow_limit = index.pixel_limit(None)
    assert pillow_limit == Image.MAX_IMAGE_PIXELS
    facts = index.check_file(str(bomb), pillow_limit)
    assert facts["reason"].startswith("too many pixels: 60000x60000")
    assert pillow_limit == Image.MAX_IMAGE_PIXELS  # Pillow's own limit is left as it was


def test_the_pixel_limit_is_the_only_problem_of_the_corpus_bomb(corpus):
    repo, *_ = corpus
    assert index.check_file(str(repo / BOMB), 100 * 100)["reason"] == ""


# ---------------------------------------------------------------- splits and re-indexing

def write_class(raw: Path, cls: str, count: int, start: int = 0) -> None:
    """count distinct tiny PNGs in raw/cls, numbered from start."""
    (raw / cls).mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        seed = zlib.crc32(f"{cls}/{i}".encode())  # hash() differs between runs
        (raw / cls / f"{i:04d}.png").write_bytes(encode(noise("L", seed, (4, 4)), "PNG"))


def splits_of(manifest: pd.DataFrame) -> dict[str, str]:
    return dict(zip(manifest["path"], manifest["split"]))


def test_split_is_stable_and_stratified_as_data_grows(tmp_path):
    raw = tmp_path / "data" / "raw"
    sizes = {"a": 40, "b": 60, "c": 25, "d": 20, "e": 5, "f": 3}
    for cls, n in sizes.items():
        write_class(raw, cls, n)
    first, _, summary = build(tmp_path, workers=2)
    assert splits_of(build(tmp_path, cache={"files": {}, "facts": {}})[0]) == splits_of(first)
    assert summary["untested_classes"] == []

    for cls, n in sizes.items():  # 10% more in every class
        write_class(raw, cls, -(-n // 10), start=n)
    history = dict(zip(first["sha256"], first["split"]))
    grown, _, _ = build(tmp_path, history, workers=2)
    old = grown[grown["path"].isin(first["path"])]
    assert splits_of(old) == splits_of(first)  # no old image changed split, in any of the three
    assert set(first["split"]) == {"train", "val", "test"}
    for frame in (first, grown):
        for cls, group in frame.groupby("class"):
            shares = group["split"].value_counts(normalize=True)
            assert shares["test"] >= 0.05 and shares["train"] > 0, (cls, shares)
            if len(group) >= 20:
                assert abs(shares["val"] - 0.2) <= 0.03, (cls, shares)
                assert abs(shares["test"] - 0.1) <= 0.03, (cls, shares)


def test_small_classes_fill_val_before_test_and_keep_one_to_train():
    rows = pd.DataFrame({"class": ["x", "y", "y", "z", "z", "z"],
                         "sha256": ["s1", "s2", "s3", "s4", "s5", "s6"]})
    split = index.assign_splits(rows, {"val": 0.2, "test": 0.1}, {})
    assert list(split) == ["train", "val", "train", "val", "test", "train"]
    # Fractions whose rounding asks for more than a class holds still leave one to train on.
    rows = pd.DataFrame({"class": ["z"] * 3, "sha256": ["s1", "s2", "s3"]})
    assert sorted(index.assign_splits(rows, {"val": 0.5, "test": 0.4}, {})) == [
        "test", "train", "val"]


def test_a_lone_image_is_never_val_even_if_it_was_before():
    rows = pd.DataFrame({"class": ["x", "y", "y"], "sha256": ["s1", "s2", "s3"]})
    split = index.assign_splits(rows, {"val": 0.5}, {"s1": "val", "s2": "val"})
    assert list(split) == ["train", "val", "train"]


def test_a_history_from_before_test_splits_keeps_every_image_and_new_ones_fill_test(tmp_path):
    raw = tmp_path / "data" / "raw"
    for cls in ("a", "b"):
        write_class(raw, cls, 30)
    old, _, _ = build(tmp_path, test_fraction=0)  # as imgpipe split before it held out test
    assert set(old["split"]) == {"train", "val"}
    (tmp_path / "data/splits.json").write_text(json.dumps(
        {"val_fraction": 0.2, "splits": dict(zip(old["sha256"], old["split"]))}))
    with inside(tmp_path):
        history, legacy = index.read_previous_splits(0.2, 0.1)
    assert legacy and history == dict(zip(old["sha256"], old["split"]))

    same, _, summary = build(tmp_path, history)
    assert splits_of(same) == splits_of(old)  # no image trained on moves into test
    assert summary["test"] == 0 and summary["untested_classes"] == ["a", "b"]
    for cls in ("a", "b"):
        write_class(raw, cls, 5, start=30)
    grown, _, _ = build(tmp_path, history)
    assert splits_of(grown[grown["path"].isin(old["path"])]) == splits_of(old)
    new = grown[~grown["path"].isin(old["path"])]
    assert (new.groupby("class")["split"].apply(lambda s: (s == "test").sum()) == 4).all()


def test_a_changed_fraction_splits_afresh(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data/splits.json").write_text(json.dumps(
        {"val_fraction": 0.2, "test_fraction": 0.1, "splits": {"s1": "test", "s2": "val"}}))
    with inside(tmp_path):
        assert index.read_previous_splits(0.2, 0.1) == ({"s1": "test", "s2": "val"}, False)
        assert index.read_previous_splits(0.2, 0.15) == ({}, False)
        assert index.read_previous_splits(0.25, 0.1) == ({}, False)


def test_the_first_index_after_the_upgrade_says_what_it_kept(tmp_path):
    raw = tmp_path / "data" / "raw"
    for cls in ("a", "b"):
        write_class(raw, cls, 30)
    old, _, _ = build(tmp_path, test_fraction=0)
    (tmp_path / "data/splits.json").write_text(json.dumps(  # as imgpipe wrote it before
        {"val_fraction": 0.2, "splits": dict(zip(old["sha256"], old["split"]))}))
    for cls in ("a", "b"):
        write_class(raw, cls, 5, start=30)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    proc = subprocess.run([sys.executable, "-m", "stages.index"], cwd=tmp_path,
                          env=env(PYTHONPATH=str(ROOT)), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ("note: data/splits.json is from before imgpipe held out a test split: images "
            "indexed before keep their train or val split and only new images fill test "
            "(it holds 8); delete data/splits.json and rerun to split every image afresh"
            ) in proc.stdout
    manifest = pd.read_csv(tmp_path / "data/manifest.csv", keep_default_na=False)
    assert splits_of(manifest[manifest["path"].isin(old["path"])]) == splits_of(old)
    state = json.loads((tmp_path / "data/splits.json").read_text())
    assert state["test_fraction"] == 0.1  # from now on, a history like any other
    assert sorted(state["splits"].values()).count("test") == 8


# ---------------------------------------------------------------- split folders

# Split folder names as datasets ship them: (train, val, test); None: no such folder.
LAYOUTS = {
    "imagenet": ("train", "val", "test"),
    "roboflow, capitalised": ("Train", "valid", "TEST"),
    "long names": ("training", "Validation", "testing"),
    "eval, no test": ("train", "eval", None),
    "fastai, no test": ("train", "valid", None),
    "train and test only": ("TRAIN", None, "Test"),
    "train only": ("train", None, None),
}
COUNTS = {"train": 20, "val": 6, "test": 5}  # images per class in each split folder


def write_split_tree(raw: Path, folders: tuple[str | None, ...]) -> None:
    """Three classes in each split folder given; every image differs from all others."""
    for n, (folder, split) in enumerate(zip(folders, COUNTS)):
        if folder is not None:
            for cls in ("cat", "dog", "Emu"):
                write_class(raw / folder, cls, COUNTS[split], start=1000 * n)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_split_folders_are_the_splits_and_missing_ones_are_drawn_from_train(tmp_path, layout):
    folders = LAYOUTS[layout]
    write_split_tree(tmp_path / "data/raw", folders)
    manifest, _, summary = build(tmp_path)
    assert sorted(manifest["class"].unique()) == ["Emu", "cat", "dog"]
    given = {f: s for f, s in zip(folders, COUNTS) if f is not None}
    folder = manifest["path"].str.split("/").str[2].map(given)  # the split of each image's folder
    for split in ("val", "test"):
        chosen = manifest["split"] == split
        if split in given.values():  # exactly its folder's images
            assert chosen.equals(folder == split)
            assert chosen.sum() == 3 * COUNTS[split]
        else:  # drawn from the train folder's images, in each class
            assert (folder[chosen] == "train").all()
            drawn = {"val": round(0.2 * COUNTS["train"]), "test": round(0.1 * COUNTS["train"])}
            assert (manifest[chosen].groupby("class").size() == drawn[split]).all()
            assert len(manifest[chosen].groupby("class")) == 3
    assert summary["layout"] == "split folders"
    assert summary["split_folders"] == {s: f for f, s in given.items()}
    assert index.layout_line(summary).startswith(
        f"read split folders (data/raw/<split>/<class>/<image>): train from data/raw/"
        f"{folders[0]}/")


def test_an_image_moved_between_split_folders_takes_its_new_folders_split(tmp_path):
    raw = tmp_path / "data/raw"
    write_split_tree(raw, ("train", None, "test"))
    first, _, _ = build(tmp_path)
    history = dict(zip(first["sha256"], first["split"]))
    moved = next(p for p, s in splits_of(first).items() if s == "train")
    target = raw / "test" / Path(moved).relative_to("data/raw/train")
    (tmp_path / moved).rename(target)
    again, _, _ = build(tmp_path, history)
    assert splits_of(again)[target.relative_to(tmp_path).as_posix()] == "test"
    unmoved = again[again["path"].isin(first["path"])]
    assert splits_of(unmoved) == {p: s for p, s in splits_of(first).items() if p != moved}


def test_reindex_decodes_only_new_files(tmp_path):
    raw = tmp_path / "data" / "raw"
    write_class(raw, "a", 100)
    write_class(raw, "b", 100)
    cache = index.load_cache(MAX_PIXELS)
    summary = build(tmp_path, cache=cache, workers=2)[2]
    assert (summary["checked"], summary["reused"]) == (200, 0)

    write_class(raw, "a", 2, start=100)  # 1% more
    summary = build(tmp_path, cache=cache, workers=2)[2]
    assert (summary["checked"], summary["reused"]) == (2, 200)

    for path in raw.rglob("*.png"):  # as after a fresh checkout: same bytes, new mtimes
        os.utime(path, ns=(1, 1))
    summary = build(tmp_path, cache=cache, workers=2)[2]
    assert (summary["checked"], summary["reused"]) == (0, 202)
    assert len(cache["files"]) == len(cache["facts"]) == 202

    (raw / "a" / "0000.png").write_bytes(b"now broken")  # a changed file is checked again
    manifest, rejects, summary = build(tmp_path, cache=cache)
    assert (summary["checked"], summary["reused"]) == (1, 201)
    assert list(rejects["path"]) == ["data/raw/a/0000.png"]


def test_the_cache_is_dropped_when_the_pixel_limit_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGPIPE_CACHE", str(tmp_path))
    index.save_cache(index.load_cache(1000) | {"files": {"p|1|2": "s"}, "facts": {"s": {}}})
    assert index.load_cache(1000)["files"] == {"p|1|2": "s"}
    assert index.load_cache(2000)["files"] == {}


# ---------------------------------------------------------------- errors

PARAMS = {"workers": 1, "mlflow": {"experiment": "imgpipe"},
          "index": {"val_fraction": 0.2, "test_fraction": 0.1}}


def one_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(noise("RGB", seed), "PNG"))


def no_raw(repo: Path) -> None:
    pass


def no_classes(repo: Path) -> None:
    (repo / "data/raw").mkdir(parents=True)
    (repo / "data/raw/notes.txt").write_text("nothing here")


def one_class(repo: Path) -> None:
    one_image(repo / "data/raw/cat/a.png", 1)
    one_image(repo / "data/raw/cat/b.png", 2)
    (repo / "data/raw/dog").mkdir()


def all_broken(repo: Path) -> None:
    (repo / "data/raw/cat").mkdir(parents=True)
    (repo / "data/raw/cat/a.jpg").write_text("<html></html>")
    (repo / "data/raw/dog").mkdir()
    (repo / "data/raw/dog/b.png").write_bytes(b"")


def train_folder_broken(repo: Path) -> None:
    split_tree("train/cat", "val/cat", "val/dog")(repo)
    (repo / "data/raw/train/dog").mkdir()
    (repo / "data/raw/train/dog/b.png").write_bytes(b"")


def params_file(text: str):
    def write(repo: Path) -> None:
        one_class(repo)
        one_image(repo / "data/raw/dog/c.png", 3)
        (repo / "params.yaml").write_text(text)
    return write


def bad_params(**index_params: object):
    return params_file(yaml.safe_dump({**PARAMS, "index": index_params}))


def split_tree(*folders: str):
    """A tree with one image in each of these folders under data/raw."""
    def write(repo: Path) -> None:
        for i, folder in enumerate(folders):
            one_image(repo / "data/raw" / folder / f"{i}.png", 10 + i)
    return write


ERRORS = {
    "no data/raw": (no_raw, "data/raw not found: put your images in data/raw/<class>/<image>"),
    "no class folders": (no_classes, "found no usable images under data/raw: expected"),
    "one class": (one_class, "found only 1 class with usable images under data/raw ('cat')"),
    "all broken": (all_broken, "no usable images under data/raw; 4 rejected, see data/rejects.csv"),
    "val_fraction": (bad_params(val_fraction=1.5), "params.yaml: index.val_fraction is 1.5: use "
                                                   "a number >= 0 and < 1"),
    "test_fraction": (bad_params(val_fraction=0.2, test_fraction=-0.1),
                      "params.yaml: index.test_fraction is -0.1: use a number >= 0 and < 1"),
    "fractions sum to 1": (bad_params(val_fraction=0.5, test_fraction=0.5),
                           "params.yaml: index.val_fraction + index.test_fraction is 1: leave "
                           "images to train on"),
    "max_pixels": (bad_params(val_fraction=0.2, test_fraction=0.1, max_pixels="lots"),
                   "params.yaml: index.max_pixels is 'lots': use a whole number >= 1 or null"),
    "index not a section": (params_file("index: 0.2\n"), "params.yaml: index must be a section"),
    "split and class folders mixed": (
        split_tree("train/cat", "train/dog", "cat", "Valid/dog"),
        "data/raw mixes split folders (Valid, train) with class folders (cat): put every class "
        "folder inside a split folder (data/raw/<split>/<class>/<image>)"),
    "val class that train lacks": (
        split_tree("train/cat", "train/dog", "val/cat", "test/horse"),
        "data/raw/test/horse is a class that data/raw/train lacks: add its training images as "
        "data/raw/train/horse/, or remove the folder"),
    "two folders for val": (
        split_tree("train/cat", "train/dog", "val/cat", "validation/dog"),
        "data/raw has two folders for the val split (val and validation): merge them into one"),
    "train images all broken": (
        train_folder_broken, "class 'dog' has no usable images in data/raw/train/dog; "
        "1 rejected, see data/rejects.csv: add images the model can learn it from"),
    "no train folder": (split_tree("valid/cat", "test/cat"),
                        "data/raw has split folders (test, valid) but none for train"),
}


LAYOUT_ERRORS = ("split and class folders mixed", "val class that train lacks",
                 "two folders for val", "no train folder")


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_one_actionable_line(tmp_path, case):
    setup, message = ERRORS[case]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    setup(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    proc = subprocess.run([sys.executable, "-m", "stages.index"], cwd=tmp_path,
                          env=env(PYTHONPATH=str(ROOT)), capture_output=True, text=True)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert not (tmp_path / "data/manifest.csv").exists()
    if case in LAYOUT_ERRORS:  # refused before anything is written, even the cache
        assert sorted(tmp_path.rglob("*")) == before


# ---------------------------------------------------------------- through dvc and MLflow

def test_dvc_repro_on_a_messy_tree_then_more_images(tmp_path):
    from stages.sample import write_digits

    repo = make_repo(tmp_path / "repo", images=None, params={"index": {"max_pixels": MAX_PIXELS}})
    write_digits(repo / "data/raw", limit=200)
    expect = write_corpus(repo, tmp_path / "outside", dvc_safe=True)
    dvc(repo, "add", "-q", "data/raw")
    out = dvc(repo, "repro", "index").stdout
    assert "indexed 229 images in 16 classes" in out
    assert "warning: class 'single' has a single image" in out
    first = pd.read_csv(repo / "data/manifest.csv", keep_default_na=False)
    rejects = pd.read_csv(repo / "data/rejects.csv", keep_default_na=False)
    assert_outcomes(first, rejects, expect)
    before = json.loads((repo / "metrics/index.json").read_text())

    write_digits(repo / "data/raw", limit=220)  # 20 new digits; the first 200 rewritten as is
    dvc(repo, "add", "-q", "data/raw")
    dvc(repo, "repro", "index")
    grown = pd.read_csv(repo / "data/manifest.csv", keep_default_na=False)
    assert splits_of(grown[grown["path"].isin(first["path"])]) == splits_of(first)
    metrics = json.loads((repo / "metrics/index.json").read_text())
    assert (metrics["images"], metrics["checked"]) == (249, 20)
    assert metrics["reused"] == before["checked"] + before["reused"]

    runs = [r for r in mlflow_runs(repo) if r.data.tags.get("imgpipe.stage") == "index"]
    assert len(runs) == 2
    latest = runs[0]
    assert latest.data.tags["data.version"] == metrics["data_version"]
    assert latest.data.tags["data.version"] != runs[1].data.tags["data.version"]
    assert latest.data.metrics["images"] == 249
    assert latest.data.metrics["classes"] == 16
    assert latest.data.metrics["rejected.too many pixels"] == 1
    assert latest.data.metrics["class.single"] == 1
    kinds = Counter(index.reason_kind(r) for r in rejects["reason"])
    assert {k: latest.data.metrics[f"rejected.{k}"] for k in kinds} == kinds
