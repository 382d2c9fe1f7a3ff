"""Tensor storage on disk: each split as shards of .npy files, plus meta.json.

Layout of data/tensors/:
    meta.json                  classes, image size (stored) and crop size (what the model
                               sees: its centre), resize mode, mean/std, dtype, counts,
                               data version, and each split's files (below), in order
    train/<digest>.npy         a shard: (n, 3, S, S) consecutive rows of the split, float16
                               already normalised (the default), or uint8 raw pixels that
                               `to_device` normalises (meta["dtype"])
    train/labels-<digest>.npy  (N,) int64 labels of the whole split
    val/..., test/...          the same for the other splits (a split may hold no rows)
Rows keep the order of data/manifest.csv within each split. Shard boundaries
are content-defined: a shard ends after a row whose image hash falls in a fixed
slice of hash space (see `plan_shards`), the way rsync and restic cut files
into chunks. Adding images therefore changes only the shards they land in, and
a shard's name is a digest of exactly what it holds, so unchanged shards keep
their names, their bytes, and DVC's hashes of them.

torch is imported only where a tensor is made, so that preprocess, which uses
the layout but no tensors, does not pay torch's import time and memory.
"""

from __future__ import annotations

import functools
import json
import os
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.common import UserError

if TYPE_CHECKING:
    import torch

# train is learnt from, val chooses the epoch, and test (never seen by training) is scored.
SPLITS = ("train", "val", "test")
SHARD_MB = 4.0        # default average shard size (params: preprocess.shard_mb)
MAX_SHARD_FACTOR = 4  # no shard holds more than 4x the average


def read_meta(folder: str | Path) -> dict[str, Any]:
    """Read meta.json of a tensor folder."""
    path = Path(folder) / "meta.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} not found: run `dvc repro preprocess` first") from None


def plan_shards(shas: list[str], image_bytes: int, shard_mb: float = SHARD_MB
                ) -> list[tuple[int, int]]:
    """Cut rows into shards of about shard_mb, at boundaries chosen by the rows' own hashes.

    A shard ends after a row whose sha256 is 0 modulo the average row count, or
    once it holds MAX_SHARD_FACTOR times that many rows. Rows inserted anywhere
    move only the boundaries of the shard they land in. Returns (start, stop) ranges.
    """
    average = max(1, int(shard_mb * 2**20) // max(1, image_bytes))
    ranges, start = [], 0
    for i, sha in enumerate(shas):
        if int(sha[:15], 16) % average == 0 or i + 1 - start >= MAX_SHARD_FACTOR * average:
            ranges.append((start, i + 1))
            start = i + 1
    if start < len(shas):
        ranges.append((start, len(shas)))
    return ranges


class SplitDataset:
    """A map-style Dataset over one split's shards, float16 or uint8, read with positioned reads.

    Rows are read with os.preadv straight into the batch array: no file stays
    open (a split may have thousands of shards) and nothing is memory-mapped, so
    reading counts only the batch towards a process's memory. DataLoader needs
    only __len__ and __getitem__ (and uses __getitems__ when present), so this
    does not subclass torch's Dataset, which would import torch for preprocess.
    """

    def __init__(self, folder: str | Path, split: str):
        folder = Path(folder)
        meta = read_meta(folder)
        files = meta["files"][split]
        self.labels = np.load(folder / files["labels"])
        self.paths = [str(folder / name) for name, _ in files["shards"]]
        self.starts = np.cumsum([0] + [rows for _, rows in files["shards"]])
        size = meta["image_size"]
        self.shape = (len(self.labels), 3, size, size)
        self.dtype = np.dtype(meta["dtype"])
        self.row_bytes = 3 * size * size * self.dtype.itemsize
        self._offsets: dict[int, int] = {}  # shard -> where its data starts, after the header

    @property
    def nbytes(self) -> int:
        """Size of all the split's images."""
        return len(self) * self.row_bytes

    def _data_offset(self, shard: int, fd: int) -> int:
        if shard not in self._offsets:
            with open(fd, "rb", closefd=False) as f:
                f.seek(0)
                read_header = (np.lib.format.read_array_header_1_0
                               if np.lib.format.read_magic(f) == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(f)
                expected = (int(self.starts[shard + 1] - self.starts[shard]), *self.shape[1:])
                if shape != expected or dtype != self.dtype:
                    raise UserError(f"{self.paths[shard]} holds {dtype} {shape}, not what "
                                    "meta.json says: run `dvc repro -f preprocess`")
                self._offsets[shard] = f.tell()
        return self._offsets[shard]

    def read(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The images at ascending row numbers, read shard by shard into `out` (or a new array)."""
        rows = np.asarray(rows, dtype=np.int64)
        if out is None:
            out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        shard_of = np.searchsorted(self.starts, rows, side="right") - 1
        i = 0
        while i < len(rows):
            shard = int(shard_of[i])
            fd = os.open(self.paths[shard], os.O_RDONLY)
            try:
                base = self._data_offset(shard, fd)
                while i < len(rows) and shard_of[i] == shard:
                    j = i + 1  # a run of consecutive rows is one read
                    while j < len(rows) and rows[j] == rows[j - 1] + 1 and shard_of[j] == shard:
                        j += 1
                    want = (j - i) * self.row_bytes
                    at = base + int(rows[i] - self.starts[shard]) * self.row_bytes
                    if os.preadv(fd, [view[i * self.row_bytes:j * self.row_bytes]], at) != want:
                        raise UserError(f"{self.paths[shard]} is truncated: run "
                                        "`dvc repro -f preprocess`")
                    i = j
            finally:
                os.close(fd)
        return out

    def read_all(self) -> np.ndarray:
        """The whole split as one (N, 3, S, S) array in memory."""
        return self.read(np.arange(len(self)))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        return torch.from_numpy(self.read(np.array([i]))[0]), torch.tensor(self.labels[i])

    def batch(self, indices: list[int], out: np.ndarray | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of these rows in ascending order; the images go into `out` if given."""
        import torch

        order = np.sort(np.asarray(indices))
        return torch.from_numpy(self.read(order, out)), torch.from_numpy(self.labels[order])

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Read a whole batch with sorted, shard-wise reads: far faster than per-item reads."""
        return self.batch(indices)


class NumberedBatch(list):
    """A batch of row numbers that knows its place in the stream, which picks its ring slot."""

    number = 0


class NumberedBatches:
    """batch_sampler: cut a sampler's order into batches, numbered on across epochs."""

    def __init__(self, sampler: Any, batch_size: int):
        self.sampler, self.batch_size, self.count = sampler, batch_size, 0

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self) -> Any:
        batch = NumberedBatch()
        for i in self.sampler:
            batch.append(i)
            if len(batch) == self.batch_size:
                yield self._numbered(batch)
                batch = NumberedBatch()
        if batch:
            yield self._numbered(batch)

    def _numbered(self, batch: NumberedBatch) -> NumberedBatch:
        batch.number, self.count = self.count, self.count + 1
        return batch


class RingDataset:
    """SplitDataset batches read into a ring of shared-memory buffers that are reused in turn.

    A fresh array per batch costs page faults on every batch (glibc maps any block
    over 32 MB anew), and from a DataLoader worker a second copy, into new shared
    memory, to hand it over. Here a batch is read straight into the next slot of a
    ring allocated once, and a worker hands over only the slot's number (see
    RingSlot): the main process reads the slot through its own mapping of the ring.
    The catch: a batch stays valid until the loader has yielded len(ring) - 1 more,
    so a consumer must copy what it keeps (the train loop copies each batch to the
    device, or to float32, at once). Use it with NumberedBatches as the
    batch_sampler, and at least prefetch_factor * workers + 2 slots.
    """

    def __init__(self, dataset: SplitDataset, batch_size: int, slots: int):
        import torch

        self.dataset = dataset
        dtype = torch.from_numpy(np.empty(0, dataset.dtype)).dtype
        self.ring = torch.empty((slots, batch_size, *dataset.shape[1:]), dtype=dtype)
        self.ring.share_memory_()  # before the workers start: they all write into it
        self.key = id(self.ring)  # only the process that made the ring looks it up
        _RINGS[self.key] = self.ring

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dataset[i]

    def __getitems__(self, batch: NumberedBatch) -> tuple[Any, torch.Tensor]:
        import torch.utils.data

        number = batch.number % len(self.ring)
        slot = self.ring[number][:len(batch)]
        _, labels = self.dataset.batch(batch, out=slot.numpy())
        if torch.utils.data.get_worker_info() is None:
            return slot, labels
        return RingSlot(self.key, number, len(batch)), labels


# Each process's rings by key, so that a RingSlot from a worker unpickles into a view.
_RINGS: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()


class RingSlot:
    """What a worker sends for a batch in the ring: the slot's number, not its bytes.

    It unpickles, in the main process, straight into a view of that process's own
    mapping of the ring. Sending the tensor instead would pass a file descriptor
    through a socket for every batch, and the main process would check and map it.
    """

    def __init__(self, key: int, number: int, rows: int):
        self.key, self.number, self.rows = key, number, rows

    def __reduce__(self) -> tuple[Any, tuple[int, int, int]]:
        return _ring_view, (self.key, self.number, self.rows)


def _ring_view(key: int, number: int, rows: int) -> torch.Tensor:
    """The first `rows` rows of slot `number` of this process's ring `key`."""
    return _RINGS[key][number][:rows]


def as_batch(batch: Any) -> Any:
    """collate_fn for SplitDataset: __getitems__ already returns a stacked batch."""
    return batch


def crop_size(meta: dict[str, Any]) -> int:
    """The side of what the model sees: the centre of the stored images (older meta: all)."""
    return int(meta.get("crop_size", meta["image_size"]))


def centre_crop(x: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
    """The centre crop_size x crop_size of stored (N, 3, S, S) images (a view; torchvision's
    CenterCrop offsets): what the model sees at eval. Images already that size pass as they are."""
    if "crop_size" not in meta:  # tensors made before the crop: the model sees all
        return x
    size = crop_size(meta)
    top = int(round((x.shape[-2] - size) / 2.0))
    left = int(round((x.shape[-1] - size) / 2.0))
    return x[..., top:top + size, left:left + size] if top > 0 or left > 0 else x


def to_device(x: torch.Tensor, device: torch.device, meta: dict[str, Any],
              whole: bool = False) -> torch.Tensor:
    """Move a stored batch to the device as float32 model input: its centre crop (meta's
    crop_size), or with whole=True the whole stored images, for training's random crops.

    Every consumer of data/tensors goes through here, so the storage dtype can
    change (float16 already normalised, or uint8 normalised on the device)
    without touching the training loop.
    """
    import torch

    x = (x if whole else centre_crop(x, meta)).to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        scale, shift = _normaliser(device, tuple(meta["mean"]), tuple(meta["std"]))
        # One conversion, then in place: 2x faster on a CPU than (x / 255 - mean) / std.
        return x.float().mul_(scale).add_(shift)
    x = x.float()
    stored = (tuple(meta.get("stored_mean", meta["mean"])),
              tuple(meta.get("stored_std", meta["std"])))
    if stored != (tuple(meta["mean"]), tuple(meta["std"])):  # float16 normalised otherwise
        scale, shift = _renormaliser(device, *stored, tuple(meta["mean"]), tuple(meta["std"]))
        x = x.mul_(scale).add_(shift)
    return x


def model_feed(meta: dict[str, Any], mean: Any, std: Any) -> dict[str, Any]:
    """meta for feeding this folder's tensors to a model that wants (mean, std) instead.

    to_device normalises uint8 pixels with them, and moves float16 ones from the
    stored normalisation to them; the stored values stay as stored_mean/stored_std.
    """
    return {**meta, "mean": list(mean), "std": list(std),
            "stored_mean": meta.get("stored_mean", meta["mean"]),
            "stored_std": meta.get("stored_std", meta["std"])}


@functools.lru_cache(maxsize=8)
def _renormaliser(device: torch.device, mean: tuple[float, ...], std: tuple[float, ...],
                  new_mean: tuple[float, ...], new_std: tuple[float, ...]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) taking (v - mean) / std to (v - new_mean) / new_std, made once per device."""
    import torch

    m, s, nm, ns = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1)
                    for v in (mean, std, new_mean, new_std))
    return (s / ns).to(device), ((m - nm) / ns).to(device)


@functools.lru_cache(maxsize=8)
def _normaliser(device: torch.device, mean: tuple[float, ...], std: tuple[float, ...]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with x * scale + shift == (x / 255 - mean) / std, made once per device."""
    import torch

    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (1.0 / (255.0 * s)).to(device), (-m / s).to(device)  # no host copy per batch
