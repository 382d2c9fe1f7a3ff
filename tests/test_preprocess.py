"""Preprocess: incremental, byte-identical, memory-bounded; resize, normalize, storage params."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, dvc, git, mlflow_runs, set_params
from PIL import Image

from stages import params
from stages.common import UserError
from stages.imaging import IMAGENET_MEAN, IMAGENET_STD
from stages.preprocess import cache_cap_bytes, evict, pixel_cache, preprocess, stored_as
from stages.sample import write_digits
from stages.tensors import SplitDataset, read_meta, to_device


def write_images(folder: Path, count: int, start: int = 0, size: tuple[int, int] = (40, 30)
                 ) -> list[dict]:
    """Random-noise PNGs in two classes; returns their manifest rows (every 4th is val)."""
    rows = []
    for i in range(start, start + count):
        cls = ("cat", "dog")[i % 2]
        path = folder / cls / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(i).integers(0, 256, (size[1], size[0], 3), np.uint8)
        Image.fromarray(pixels).save(path)
        rows.append(image_row(path, cls, "val" if i % 4 == 3 else "train"))
    return rows


def image_row(path: Path, cls: str, split: str) -> dict:
    """One manifest row, as the index stage writes it."""
    return {"path": str(path), "class": cls, "label": ["cat", "dog"].index(cls),
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "split": split}


def build(rows: list[dict], out: Path, size: int = 8, resize: str = "squash",
          normalize: str = "dataset", workers: int = 1, storage: str = "float16",
          shard_mb: float = 4.0, crop_size: int | None = None,
          interpolation: str = "bicubic") -> dict:
    """Run the stage's preprocess() on these rows, in manifest (path) order."""
    manifest = pd.DataFrame(rows).sort_values("path", kind="stable").reset_index(drop=True)
    return preprocess(manifest, size, resize, normalize, workers, out, "v1", storage, shard_mb,
                      crop_size, interpolation)


def files(folder: Path) -> dict[str, bytes]:
    """Every file below a folder, by relative path."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def read_split(folder: Path, split: str = "train") -> np.ndarray:
    """A split's images as preprocess stored them."""
    return SplitDataset(folder, split).read_all()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private pixel cache for one test."""
    monkeypatch.setenv("IMGPIPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("IMGPIPE_CACHE_GB", raising=False)
    return tmp_path / "cache"


def test_adding_images_decodes_only_new_ones_and_matches_a_clean_build(tmp_path, cache,
                                                                       monkeypatch):
    small = {"normalize": "imagenet", "shard_mb": 3 * 8 * 8 * 2 * 4 / 2**20}  # ~4 images a shard
    rows = write_images(tmp_path / "raw", 40)
    first = build(rows, tmp_path / "tensors", workers=2, **small)
    assert (first["decoded"], first["from_cache"]) == (40, 0)
    assert first["shards"] == first["shards_written"] > 4

    rows += write_images(tmp_path / "raw", 2, start=40)  # sorts last: lands in the last shards
    again = build(rows, tmp_path / "tensors", workers=2, **small)
    assert (again["decoded"], again["from_cache"]) == (2, 40)
    assert 1 <= again["shards_written"] <= 4 and again["shards_kept"] >= first["shards"] - 4

    monkeypatch.setenv("IMGPIPE_CACHE", str(tmp_path / "empty-cache"))
    clean = build(rows, tmp_path / "clean", workers=1, **small)
    assert (clean["decoded"], clean["from_cache"]) == (42, 0)
    assert files(tmp_path / "tensors") == files(tmp_path / "clean")  # no stale shard left over
    assert read_split(tmp_path / "tensors").shape == (32, 3, 8, 8)


def test_dataset_normalization_rewrites_every_shard_and_matches_a_clean_build(tmp_path, cache):
    small = 3 * 8 * 8 * 2 * 4 / 2**20
    rows = write_images(tmp_path / "raw", 24)
    build(rows, tmp_path / "tensors", workers=2, shard_mb=small)
    rows += write_images(tmp_path / "raw", 2, start=24)
    again = build(rows, tmp_path / "tensors", workers=2, shard_mb=small)  # new train statistics
    assert again["shards_written"] == again["shards"] > 2 and again["decoded"] == 2
    build(rows, tmp_path / "clean", shard_mb=small)
    assert files(tmp_path / "tensors") == files(tmp_path / "clean")


def test_a_run_that_stops_half_way_leaves_the_old_tensors_readable(tmp_path, cache):
    rows = write_images(tmp_path / "raw", 12)
    build(rows, tmp_path / "tensors")
    before = read_split(tmp_path / "tensors")
    (tmp_path / "raw" / "cat" / "00000.png").write_bytes(b"not a png any more")
    with pytest.raises(UserError, match="00000.png could not be decoded"):
        build(rows, tmp_path / "tensors", size=6)  # new size: every shard is new, first fails
    np.testing.assert_array_equal(read_split(tmp_path / "tensors"), before)


def test_changing_normalization_renormalises_without_decoding(tmp_path, cache):
    rows = write_images(tmp_path / "raw", 12)
    build(rows, tmp_path / "raw-pixels", storage="uint8")
    stats = build(rows, tmp_path / "tensors", normalize="imagenet")
    assert stats["decoded"] == 0 and stats["from_cache"] == 12
    meta = read_meta(tmp_path / "tensors")
    assert meta["mean"] == list(IMAGENET_MEAN) and meta["std"] == list(IMAGENET_STD)
    pixels = read_split(tmp_path / "raw-pixels") / 255.0
    expected = (pixels - np.array(IMAGENET_MEAN)[:, None, None]) / np.array(IMAGENET_STD)[:, None,
                                                                                            None]
    stored = read_split(tmp_path / "tensors")
    assert stored.dtype == np.float16
    np.testing.assert_allclose(stored, expected, atol=3e-3)


def test_dataset_normalization_uses_train_split_statistics(tmp_path, cache):
    rows = write_images(tmp_path / "raw", 12)
    stats = build(rows, tmp_path / "u8", storage="uint8")
    train = read_split(tmp_path / "u8") / 255.0
    assert stats["train"] == len(train) == 9
    np.testing.assert_allclose(stats["mean"], train.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(stats["std"], train.std(axis=(0, 2, 3)), rtol=1e-9)
    build(rows, tmp_path / "f16")
    normalised = read_split(tmp_path / "f16").astype(np.float64)
    np.testing.assert_allclose(normalised.mean(axis=(0, 2, 3)), 0, atol=2e-3)
    np.testing.assert_allclose(normalised.std(axis=(0, 2, 3)), 1, atol=2e-3)


def same_image_in_two_classes(tmp_path: Path, pixels: np.ndarray, name: str) -> list[dict]:
    """Save one picture as a train image of class cat and of class dog; returns their rows."""
    rows = []
    for cls in ("cat", "dog"):
        path = tmp_path / "raw" / cls / name
        path.parent.mkdir(parents=True)
        Image.fromarray(pixels).save(path)
        rows.append(image_row(path, cls, "train"))
    return rows


def test_resize_squash_keeps_everything_and_crop_keeps_the_centre(tmp_path, cache):
    thirds = np.zeros((10, 30, 3), np.uint8)  # red | green | blue, 10 columns each
    thirds[:, :10, 0] = thirds[:, 10:20, 1] = thirds[:, 20:, 2] = 255
    rows = same_image_in_two_classes(tmp_path, thirds, "thirds.png")
    build(rows, tmp_path / "squash", size=6, resize="squash", storage="uint8")
    build(rows, tmp_path / "crop", size=6, resize="crop", storage="uint8")
    squash = read_split(tmp_path / "squash")[0].astype(int)
    crop = read_split(tmp_path / "crop")[0].astype(int)
    assert squash[0, :, 0].min() > 200 and squash[2, :, -1].min() > 200  # red left, blue right
    assert crop[1].min() > 200 and crop[0].max() < 60 and crop[2].max() < 60  # all green
    assert pixel_cache(6, "squash") != pixel_cache(6, "crop")


def test_downscaling_is_antialiased(tmp_path, cache):
    board = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)  # 1-pixel checks
    rows = same_image_in_two_classes(tmp_path, board, "board.png")
    build(rows, tmp_path / "t", size=8, storage="uint8")
    pixels = read_split(tmp_path / "t").astype(int)
    assert np.abs(pixels - 127.5).max() < 20  # averaged to grey; nearest-neighbour gives 0/255


def test_uint8_and_float16_storage_give_the_same_model_input(tmp_path, cache):
    import torch

    rows = write_images(tmp_path / "raw", 12)
    build(rows, tmp_path / "f16")
    build(rows, tmp_path / "u8", storage="uint8")
    inputs = {}
    for name in ("f16", "u8"):
        meta = read_meta(tmp_path / name)
        assert meta["dtype"] == {"f16": "float16", "u8": "uint8"}[name]
        x, y = SplitDataset(tmp_path / name, "val").__getitems__([2, 0, 1])
        inputs[name] = to_device(x, torch.device("cpu"), meta)
        assert inputs[name].dtype == torch.float32
    assert read_split(tmp_path / "u8").dtype == np.uint8
    torch.testing.assert_close(inputs["u8"], inputs["f16"], atol=3e-3, rtol=0)


def test_a_damaged_cache_entry_is_decoded_again(tmp_path, cache):
    rows = write_images(tmp_path / "raw", 6)
    build(rows, tmp_path / "a")
    entry = next(cache.rglob("*.u8"))
    entry.write_bytes(entry.read_bytes()[:-10])  # torn write
    stats = build(rows, tmp_path / "b")
    assert stats["decoded"] == 1
    assert files(tmp_path / "a") == files(tmp_path / "b")


def test_cache_is_capped_by_evicting_least_recently_used(tmp_path, cache, monkeypatch):
    folder = cache / "pixels" / "8px-squash-x" / "ab"
    folder.mkdir(parents=True)
    for age, name in enumerate(["new", "mid", "old"]):
        entry = folder / f"{name}.u8"
        entry.write_bytes(b"x" * 100)
        os.utime(entry, ns=(10**18 - age * 10**9,) * 2)
    assert evict(cache, 250) == (1, 200)
    assert sorted(p.stem for p in folder.iterdir()) == ["mid", "new"]
    assert evict(cache, 10**6) == (0, 200)

    monkeypatch.setenv("IMGPIPE_CACHE_GB", "0")  # keep nothing: every run decodes
    rows = write_images(tmp_path / "raw", 4)
    stats = build(rows, tmp_path / "t")
    assert stats["cache_mb"] == 0 and stats["cache_evicted"] == 6
    assert build(rows, tmp_path / "t2")["decoded"] == 4
    assert not list(cache.rglob("*.u8"))


def test_a_bad_cache_size_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("IMGPIPE_CACHE_GB", "lots")
    with pytest.raises(UserError, match="IMGPIPE_CACHE_GB"):
        cache_cap_bytes()
    monkeypatch.setenv("IMGPIPE_CACHE_GB", "0.5")
    assert cache_cap_bytes() == 500_000_000


PEAK_RSS = """
import sys
from pathlib import Path
import pandas as pd
from stages.preprocess import preprocess
manifest = pd.read_csv(sys.argv[1], keep_default_na=False)
# 1 MB shards hold 10 images here: 100 and 400 images both make many shards.
print(preprocess(manifest, 128, "squash", "dataset", 1, Path(sys.argv[2]), "v", "float16",
                 1.0)["peak_rss_mb"])
"""


def test_peak_memory_does_not_grow_with_the_dataset(tmp_path, cache):
    # 4x the images adds 30 MB of tensors; a version that held them in memory (or in
    # memory-mapped pages) would show that growth in its peak RSS. A shard is 1 MB here.
    rows = write_images(tmp_path / "raw", 400, size=(48, 32))
    peaks = []
    for n in (100, 400):
        csv = tmp_path / f"manifest{n}.csv"
        pd.DataFrame(rows[:n]).to_csv(csv, index=False)
        proc = subprocess.run([sys.executable, "-c", PEAK_RSS, str(csv), str(tmp_path / f"t{n}")],
                              capture_output=True, text=True, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, proc.stderr[-2000:]
        peaks.append(float(proc.stdout.split()[-1]))
    assert sum(p.stat().st_size for p in (tmp_path / "t400").rglob("*.npy")) > 39 * 10**6
    print("peak RSS MB for 100 and 400 images:", peaks)
    assert peaks[1] - peaks[0] < 15, peaks


# ---------------------------------------------------------------- through dvc


def test_repro_after_adding_images_takes_the_rest_from_the_cache(clone_built):
    repo = clone_built()
    write_digits(repo / "data" / "raw", limit=203)  # rewrites the first 200 unchanged
    out = dvc(repo, "repro", "preprocess").stdout
    # All 3 new digits go to train: the val and test shards are kept as they were.
    assert "preprocessed 203 images: 200 from the cache, 3 decoded; wrote 1 of 3 shards" in out, out
    metrics = json.loads((repo / "metrics/preprocess.json").read_text())
    assert (metrics["decoded"], metrics["from_cache"], metrics["images"]) == (3, 200, 203)
    assert metrics["images_per_second"] > 0
    run = next(r for r in mlflow_runs(repo) if r.data.tags.get("imgpipe.stage") == "preprocess")
    assert run.data.metrics["decoded"] == 3 and run.data.metrics["from_cache"] == 200
    logged = params.load(repo / "params.yaml").preprocess.storage
    assert run.data.params["preprocess.storage"] == logged


def test_pretrained_weights_choose_the_stored_size_resize_and_resampling(clone_built):
    """timm's tf_efficientnet_lite0 weights (their config, read offline; nothing is loaded):
    stored at 16 / 0.875 = 18 px, short side then centre crop, bicubic, and the start line
    says so and why; meta.json keeps the resolved values that predict and serving read."""
    repo = clone_built()
    set_params(repo, train={"model": "tf_efficientnet_lite0", "pretrained": True},
               preprocess={"image_size": 16})
    out = dvc(repo, "repro", "preprocess").stdout
    assert ("images stored at 18 px, the model sees their centre 16 px: crop_pct 0.875, crop, "
            "bicubic (crop_pct auto, resize auto, interpolation auto: timm's pretrained_cfg "
            "of tf_efficientnet_lite0") in out, out
    meta = read_meta(repo / "data/tensors")
    assert (meta["image_size"], meta["crop_size"], meta["resize"], meta["interpolation"]) == (
        18, 16, "crop", "bicubic")


def test_repro_after_adding_images_rewrites_only_the_shards_they_land_in(clone_built):
    repo = clone_built()
    set_params(repo, preprocess={"shard_mb": 0.01})  # about 27 digits a shard at 8 px
    dvc(repo, "repro", "preprocess")
    before = {p.relative_to(repo): p.stat() for p in (repo / "data/tensors").rglob("*.npy")}
    write_digits(repo / "data" / "raw", limit=203)
    dvc(repo, "repro", "preprocess")
    metrics = json.loads((repo / "metrics/preprocess.json").read_text())
    assert 0 < metrics["shards_written"] < metrics["shards"] == (metrics["shards_written"]
                                                                  + metrics["shards_kept"])
    after = {p.relative_to(repo): p.stat() for p in (repo / "data/tensors").rglob("*.npy")}
    kept = [p for p in after if p in before and not p.name.startswith("labels")]
    assert len(kept) == metrics["shards_kept"]
    for path in kept:  # left alone: DVC neither deleted them nor did the stage rewrite them
        assert (after[path].st_ino, after[path].st_mtime_ns) == (before[path].st_ino,
                                                                 before[path].st_mtime_ns)
    assert len(after) == metrics["shards"] + 3  # and no stale shard is left: 3 label files


def test_experiments_outside_the_workspace_share_the_cache(clone_built):
    repo = clone_built()
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "--allow-empty", "-m", "clone")
    # --temp runs in a copy under .dvc/tmp, as queued experiments do; DVC_ROOT points home.
    dvc(repo, "exp", "run", "--temp", "preprocess", "-S", "preprocess.normalize=dataset")
    run = next(r for r in mlflow_runs(repo) if r.data.tags.get("imgpipe.stage") == "preprocess"
               and r.data.params.get("preprocess.normalize") == "dataset")
    assert run.data.metrics["decoded"] == 0 and run.data.metrics["from_cache"] == 200


def test_crop_pct_stores_room_to_crop_and_predict_cuts_the_same_centre(tmp_path, cache):
    """crop_pct 0.8 at image_size 8: stored at 10 px, and the model, in training's eval and in
    predict from the original files, sees the same centre 8 px."""
    import torch

    from stages import predict

    rows = write_images(tmp_path / "raw", 8)
    settings = params.Preprocess(image_size=8, crop_pct=0.8, storage="uint8")
    stored = stored_as(settings, params.Train()).size
    assert stored == 10
    build(rows, tmp_path / "t", size=stored, storage="uint8", normalize="imagenet",
          crop_size=8)
    meta = read_meta(tmp_path / "t")
    assert (meta["image_size"], meta["crop_size"]) == (10, 8)
    raw = torch.from_numpy(read_split(tmp_path / "t"))
    fed = to_device(raw, torch.device("cpu"), meta)
    assert fed.shape[-2:] == (8, 8)
    checkpoint = {k: meta[k] for k in ("image_size", "crop_size", "resize", "mean", "std")}
    paths = [r["path"] for r in sorted(rows, key=lambda r: r["path"]) if r["split"] == "train"]
    pixels = [predict.decode(Path(p), checkpoint)[0] for p in paths]
    assert torch.equal(predict.model_input(pixels, checkpoint, torch.device("cpu")), fed)


@pytest.mark.parametrize(
    ("model", "pretrained", "size", "crop_pct", "stored", "resize", "interpolation"), [
        ("smallcnn", None, 224, "auto", 224, "squash", "bicubic"),             # no weights
        ("resnet18", None, 224, 0.875, 256, "squash", "bicubic"),              # explicit
        ("tf_efficientnet_lite0", True, 224, "auto", 256, "crop", "bicubic"),  # timm: 0.875
        ("resnet50", "IMAGENET1K_V2", 224, "auto", 232, "crop", "bilinear"),   # torchvision
        ("timm/convnext_tiny", "fb_in22k_ft_in1k_384", 384, "auto", 384, "squash",
         "bicubic"),                                                            # timm: squash
    ])
def test_crop_resize_and_interpolation_auto_follow_the_weights_eval_transforms(
        model, pretrained, size, crop_pct, stored, resize, interpolation, capsys):
    settings = params.Preprocess(image_size=size, crop_pct=crop_pct)
    got = stored_as(settings, params.Train(model=model, pretrained=pretrained))
    assert (got.size, got.resize, got.interpolation) == (stored, resize, interpolation)
    assert ("crop_pct auto" in got.why) == (crop_pct == "auto")
    assert "resize auto" in got.why
    assert "warning" not in capsys.readouterr().out


def test_an_explicit_crop_resize_or_interpolation_wins_over_the_weights_with_a_warning(capsys):
    settings = params.Preprocess(image_size=224, crop_pct=1.0, resize="squash",
                                 interpolation="bicubic")
    got = stored_as(settings, params.Train(model="resnet50", pretrained="IMAGENET1K_V2"))
    assert (got.size, got.resize, got.interpolation) == (224, "squash", "bicubic")
    warnings = capsys.readouterr().out.splitlines()
    assert len(warnings) == 3
    assert "preprocess.crop_pct is 1.0, but torchvision's transforms" in warnings[0]
    assert "says 0.9655" in warnings[0]
    assert "preprocess.resize is squash" in warnings[1] and "says crop" in warnings[1]
    assert "preprocess.interpolation is bicubic" in warnings[2] and "says bilinear" in warnings[2]


def test_interpolation_is_applied_and_keys_its_own_cache(tmp_path, cache):
    board = (np.indices((64, 64)).sum(axis=0) % 7 * 40).astype(np.uint8)
    rows = same_image_in_two_classes(tmp_path, board, "board.png")
    build(rows, tmp_path / "cubic", size=10, storage="uint8")
    build(rows, tmp_path / "near", size=10, storage="uint8", interpolation="nearest")
    assert read_meta(tmp_path / "near")["interpolation"] == "nearest"
    nearest = read_split(tmp_path / "near")
    assert set(np.unique(nearest)) <= set(np.unique(board))  # nearest makes no new values
    assert not np.array_equal(nearest, read_split(tmp_path / "cubic"))
    assert pixel_cache(10, "squash", "nearest") != pixel_cache(10, "squash")
