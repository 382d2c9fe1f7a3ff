"""Tensor storage: the split files, SplitDataset batches, and to_device for either dtype."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from stages.common import UserError
from stages.tensors import SplitDataset, as_batch, read_meta, split_files, to_device


def write_split(folder, dtype, n=10):
    """A split whose image i is filled with the value i, labelled i."""
    x_path, y_path = split_files(folder, "train")
    np.save(x_path, np.arange(n, dtype=dtype)[:, None, None, None] * np.ones((1, 3, 2, 2), dtype))
    np.save(y_path, np.arange(n, dtype=np.int64))


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


def test_a_dataset_pickles_without_its_mapped_array(tmp_path):
    write_split(tmp_path, np.float16, n=1000)
    dataset = SplitDataset(tmp_path, "train")
    assert dataset[999][1] == 999  # maps the file
    copy = pickle.loads(pickle.dumps(dataset))
    assert len(pickle.dumps(dataset)) < 20_000  # the labels, not the 24 KB of images
    assert torch.equal(copy[5][0], dataset[5][0])


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
