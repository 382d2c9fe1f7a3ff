"""Tensor storage: content-defined shards, SplitDataset batches, and to_device for either dtype."""

from __future__ import annotations

import hashlib
import json
import pickle
import time

import numpy as np
import pytest
import torch

from stages.common import UserError
from stages.tensors import (
    NumberedBatches,
    RingDataset,
    SplitDataset,
    as_batch,
    centre_crop,
    plan_shards,
    read_meta,
    to_device,
)


def write_split(folder, dtype, n=10, shard_rows=(4, 3)):
    """A train split whose image i is filled with the value i, labelled i, in shards of these
    sizes (repeated)."""
    images = np.arange(n, dtype=dtype)[:, None, None, None] * np.ones((1, 3, 2, 2), dtype)
    (folder / "train").mkdir(parents=True)
    shards, start, k = [], 0, 0
    while start < n:
        stop = min(n, start + shard_rows[k % len(shard_rows)])
        name = f"train/{k}.npy"
        np.save(folder / name, images[start:stop])
        shards.append([name, stop - start])
        start, k = stop, k + 1
    np.save(folder / "train/labels.npy", np.arange(n, dtype=np.int64))
    meta = {"image_size": 2, "dtype": np.dtype(dtype).name,
            "files": {"train": {"labels": "train/labels.npy", "shards": shards}}}
    (folder / "meta.json").write_text(json.dumps(meta))


def shas(seeds):
    return [hashlib.sha256(str(s).encode()).hexdigest() for s in seeds]


def test_shard_boundaries_move_only_where_rows_are_inserted():
    rows = shas(range(5000))
    before = plan_shards(rows, image_bytes=2**20 // 50, shard_mb=1)  # ~50 rows a shard
    assert before[0][0] == 0 and before[-1][1] == 5000
    assert all(a[1] == b[0] for a, b in zip(before, before[1:]))  # no gaps, no overlaps
    assert 40 < len(before) < 250 and max(b - a for a, b in before) <= 200
    inserted = rows[:2500] + shas(range(10**6, 10**6 + 20)) + rows[2500:]
    after = plan_shards(inserted, image_bytes=2**20 // 50, shard_mb=1)
    contents = {tuple(rows[a:b]) for a, b in before}
    changed = [r for r in (tuple(inserted[a:b]) for a, b in after) if r not in contents]
    assert 1 <= len(changed) <= 2, len(changed)  # the shard that took the 20 rows (or its split)
    assert plan_shards(rows, 1) == plan_shards(rows, 1)  # a function of the rows alone


def test_reads_gather_across_shards(tmp_path):
    write_split(tmp_path, np.float16, n=10)
    dataset = SplitDataset(tmp_path, "train")
    assert len(dataset.paths) == 3 and dataset.nbytes == 10 * 3 * 2 * 2 * 2
    np.testing.assert_array_equal(dataset.read(np.array([0, 3, 4, 8, 9]))[:, 0, 0, 0],
                                  [0, 3, 4, 8, 9])
    assert dataset.read_all()[:, 1, 1, 1].tolist() == list(range(10))


@pytest.mark.parametrize("dtype", [np.float16, np.uint8])
def test_loader_batches_keep_images_and_labels_together(tmp_path, dtype):
    write_split(tmp_path, dtype)
    loader = torch.utils.data.DataLoader(SplitDataset(tmp_path, "train"), batch_size=4,
                                         shuffle=True, collate_fn=as_batch)
    seen = []
    for x, y in loader:
        assert x.dtype == torch.from_numpy(np.zeros(1, dtype)).dtype and x.shape[1:] == (3, 2, 2)
        assert torch.equal(x[:, 0, 0, 0].long(), y)
        seen += y.tolist()
    assert sorted(seen) == list(range(10))


@pytest.mark.parametrize("workers", [0, 2])
def test_ring_batches_stay_intact_until_the_consumer_moves_on(tmp_path, workers):
    write_split(tmp_path, np.float16, n=40)
    dataset = SplitDataset(tmp_path, "train")
    slots = 2 * workers + 2
    ring = RingDataset(dataset, 4, slots)
    loader = torch.utils.data.DataLoader(
        ring, batch_sampler=NumberedBatches(range(40), 4),
        num_workers=workers, prefetch_factor=2 if workers else None, collate_fn=as_batch)
    seen = []
    for _ in range(2):  # numbering goes on across epochs
        for x, y in loader:
            time.sleep(0.01)  # a slow step: the workers run ahead as far as they may
            assert torch.equal(x[:, 0, 0, 0].long(), y)  # not overwritten by a later batch
            # a view of this process's own ring: workers sent a slot number, not a new mapping
            assert x.untyped_storage().data_ptr() == ring.ring.untyped_storage().data_ptr()
            seen += y.tolist()
    assert seen == list(range(40)) * 2


def test_a_dataset_pickles_small_for_spawned_workers(tmp_path):
    write_split(tmp_path, np.float16, n=1000, shard_rows=(300,))
    dataset = SplitDataset(tmp_path, "train")
    assert dataset[999][1] == 999  # reads a shard
    copy = pickle.loads(pickle.dumps(dataset))
    assert len(pickle.dumps(dataset)) < 20_000  # the labels, not the 24 KB of images
    assert torch.equal(copy[5][0], dataset[5][0])


def test_a_damaged_shard_is_a_one_line_error(tmp_path):
    write_split(tmp_path, np.float16, n=10)
    shard = tmp_path / "train" / "2.npy"
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(UserError, match="2.npy is truncated: run `dvc repro -f preprocess`"):
        SplitDataset(tmp_path, "train").read_all()
    np.save(shard, np.zeros((2, 3, 2, 2), np.float16))
    with pytest.raises(UserError, match="not what meta.json says"):
        SplitDataset(tmp_path, "train").read_all()


def test_to_device_normalises_uint8_and_passes_float16_through():
    meta = {"mean": [0.5, 0.25, 0.0], "std": [0.5, 0.25, 1.0]}
    raw = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    x = to_device(raw, torch.device("cpu"), meta)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([-1.0, -1.0, 0.0]))
    torch.testing.assert_close(x[0, :, 0, 1], torch.tensor([1.0, 3.0, 1.0]))
    stored = torch.tensor([[-1.5, 2.0]], dtype=torch.float16)
    assert torch.equal(to_device(stored, torch.device("cpu"), meta), stored.float())


def test_missing_meta_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="dvc repro preprocess"):
        read_meta(tmp_path)


@pytest.mark.parametrize("stored", [12, 13])  # an even and an odd margin
def test_the_model_sees_the_centre_crop_as_torchvision_cuts_it(stored):
    from torchvision.transforms.v2.functional import center_crop

    raw = torch.randint(0, 256, (2, 3, stored, stored), dtype=torch.uint8)
    meta = {"mean": [0.0] * 3, "std": [1 / 255] * 3, "image_size": stored, "crop_size": 8}
    x = to_device(raw, torch.device("cpu"), meta)
    assert torch.equal(x, center_crop(raw, [8, 8]).float())
    assert torch.equal(centre_crop(raw, meta), center_crop(raw, [8, 8]))
    whole = to_device(raw, torch.device("cpu"), meta, whole=True)  # training's random crops
    assert torch.equal(whole, raw.float())
    assert torch.equal(centre_crop(x, meta), x)  # already the model's size: as it is
