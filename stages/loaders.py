"""The train stage's data path: batches from data/tensors to the device, and on-device augmentation.

Two loaders hand the loop (images, labels) batches in the order of a sampler:
    DeviceLoader   the whole split held on the device; a batch is an index lookup
    make_loader    a DataLoader streaming the tensor shards through a ring of reused
                   buffers (tensors.RingDataset), in the main process or in workers
`keep_on_device` decides between them (train.data_on_device), `loader_workers` how
many worker processes make_loader gets (train.workers). Augmentation runs
on whole batches on the device, drawn per image, so no worker touches an image.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from stages.common import machine_cores
from stages.tensors import (
    NumberedBatches,
    RingDataset,
    SplitDataset,
    as_batch,
    centre_crop,
)

if TYPE_CHECKING:
    from stages.params import Train

MAX_AUTO_WORKERS = 8  # past this, more workers only add shared memory and start-up time

# ---------------------------------------------------------------- order

def seed_worker(worker_id: int) -> None:
    """Give each DataLoader worker its own reproducible NumPy and Python seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_sampler(dataset: Any, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True
                 ) -> torch.utils.data.DistributedSampler:
    """The share of process `rank` of `world`, in an order that depends only on (seed, epoch).

    The order never depends on generator state, so a resumed run visits the
    same batches as an uninterrupted one, with or without loader workers.
    """
    return torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank,
                                               shuffle=shuffle, seed=seed)


# ---------------------------------------------------------------- loaders

def make_loader(dataset: SplitDataset, batch_size: int, workers: int, sampler: Any,
                device: torch.device, generator: torch.Generator | None = None
                ) -> torch.utils.data.DataLoader:
    """Stream batches from the tensor shards through a ring of reused buffers (see RingDataset).

    Each batch is valid until the next few are loaded: the loops here copy it to the
    device (pinned first, for a fast copy to a GPU) or to float32 straight away.
    """
    prefetch = 2 if workers > 0 else None  # DataLoader's default
    ring = RingDataset(dataset, batch_size, slots=(prefetch or 0) * workers + 2)
    order = sampler if sampler is not None else range(len(dataset))
    return torch.utils.data.DataLoader(
        ring, batch_sampler=NumberedBatches(order, batch_size), num_workers=workers,
        prefetch_factor=prefetch, collate_fn=as_batch, generator=generator,
        worker_init_fn=seed_worker, pin_memory=device.type == "cuda",
        persistent_workers=workers > 0)


class DeviceLoader:
    """Batches from a split held whole on the device: no workers, no copies, no pinning."""

    def __init__(self, dataset: SplitDataset, batch_size: int, sampler: Any,
                 device: torch.device):
        self.x = torch.from_numpy(dataset.read_all()).to(device)  # one read, then held
        self.y = torch.from_numpy(dataset.labels).to(device)
        self.batch_size, self.sampler = batch_size, sampler

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.tensor(list(self.sampler), device=self.x.device)
        for batch in order.split(self.batch_size):
            batch = batch.sort().values  # as SplitDataset reads a batch: same order, same sums
            yield self.x[batch], self.y[batch]


def keep_on_device(setting: Literal["auto"] | bool, device: torch.device, nbytes: int) -> bool:
    """Decide train.data_on_device: `auto` keeps the split on a GPU when it takes < 1/4 of it."""
    if setting != "auto":
        return setting
    if device.type != "cuda":
        return False  # the DataLoader already reads from RAM (page cache) on a CPU
    free, _total = torch.cuda.mem_get_info(device)
    return nbytes < free / 4


def loader_workers(setting: Literal["auto"] | int, device: torch.device, processes: int = 1,
                   cores: int | None = None) -> int:
    """DataLoader workers for streamed data: an explicit train.workers, or what `auto` means here.

    auto is 0 on the CPU: the main process reads the tensor shards fastest there,
    and workers would take cores from the step. On a GPU it is a quarter of this
    process's share of the cores (`processes` DDP processes on the machine split
    them), at least 1, at most MAX_AUTO_WORKERS: on 16 cores that is 4, which kept
    the data wait of an H200 under 5% at 224 px; the other cores are left to the
    main process, its pin-memory thread and the step's own CPU work.
    """
    if setting != "auto":
        return setting
    if device.type != "cuda":
        return 0
    share = (cores if cores is not None else machine_cores()) // max(1, processes)
    return max(1, min(MAX_AUTO_WORKERS, share // 4))


# ---------------------------------------------------------------- augmentation

def augment(x: torch.Tensor, settings: Train, meta: dict[str, Any] | None = None
            ) -> torch.Tensor:
    """train's augmentations, each drawn per image, on a whole (normalised) batch on its device.

    x: the whole stored images (to_device(whole=True)); what comes out is meta's crop_size,
    a random-resized crop of them (train.crop_scale < 1) or else their centre crop, as eval.
    meta's mean/std (as to_device normalised x) are needed for colour jitter.
    """
    size = int(meta["crop_size"]) if meta and "crop_size" in meta else x.shape[-1]
    if settings.crop_scale < 1:
        x = random_resized_crop(x, settings.crop_scale, size)
    elif meta is not None:  # as eval: the centre (centre_crop knows when there is none)
        x = centre_crop(x, meta)
    if settings.flip:
        flipped = torch.rand(len(x), device=x.device) < 0.5
        x = torch.where(flipped.view(-1, 1, 1, 1), x.flip(3), x)
    if settings.translate > 0:
        x = random_translate(x, settings.translate)
    if settings.color_jitter > 0 and meta is not None:
        x = color_jitter(x, settings.color_jitter, meta["mean"], meta["std"])
    return x


def random_resized_crop(x: torch.Tensor, min_scale: float, size: int | None = None
                        ) -> torch.Tensor:
    """Cut each image to a random box of min_scale..1 of its area (aspect 3/4..4/3), resized to
    size x size (default: its own size).

    torchvision's RandomResizedCrop, for a whole batch in one grid_sample: each image
    gets its own affine map from the output to its box (bilinear, edges reflected).
    """
    n = len(x)
    area = torch.empty(n, device=x.device).uniform_(min_scale, 1.0)
    aspect = torch.empty(n, device=x.device).uniform_(math.log(3 / 4), math.log(4 / 3)).exp()
    w = (area * aspect).sqrt().clamp(max=1.0)   # box sides as shares of the image's
    h = (area / aspect).sqrt().clamp(max=1.0)
    cx = (torch.rand(n, device=x.device) * 2 - 1) * (1 - w)  # box centre in [-1, 1] coordinates
    cy = (torch.rand(n, device=x.device) * 2 - 1) * (1 - h)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    out = size or x.shape[-1]
    grid = F.affine_grid(theta, [n, x.shape[1], out, out], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                         align_corners=False)


def color_jitter(x: torch.Tensor, strength: float, mean: Any, std: Any) -> torch.Tensor:
    """Brightness, contrast and saturation each scaled by its own factor in 1 +- strength.

    Worked on the pixels in 0..1 (x is normalised with mean/std), clamped, and normalised
    back; the factors are drawn per image, as torchvision's ColorJitter draws them. The
    three are linear in the pixels p and their grey level g, so they compose into one map
    per image, A*p + B*g + C: a few passes over the batch instead of a dozen (4x faster on
    a CPU). Unlike torchvision, it clamps once, at the end.
    """
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    luma = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    bright, contrast, saturation = torch.empty(3, len(x), 1, 1, 1, device=x.device,
                                               dtype=x.dtype).uniform_(1 - strength,
                                                                       1 + strength)
    pixels = torch.addcmul(m, x, s)                       # back to 0..1
    grey = (pixels * luma).sum(1, keepdim=True)
    level = grey.mean((2, 3), keepdim=True) * bright      # contrast pivots on the mean grey
    # brightness p*b; contrast (p - L)*c + L; saturation (p - g)*s + g, composed:
    out = torch.addcmul((1 - saturation) * contrast * bright * grey + (1 - contrast) * level,
                        pixels, saturation * contrast * bright)
    return out.clamp_(0, 1).sub_(m).div_(s)


def random_translate(x: torch.Tensor, pixels: int) -> torch.Tensor:
    """Shift each image by its own random (dy, dx) in [-pixels, pixels], filling by reflection."""
    n, _c, h, w = x.shape
    padded = F.pad(x, (pixels, pixels, pixels, pixels), mode="reflect")
    dy = torch.randint(0, 2 * pixels + 1, (n, 1), device=x.device)
    dx = torch.randint(0, 2 * pixels + 1, (n, 1), device=x.device)
    rows = dy + torch.arange(h, device=x.device)          # (n, h): source row of each output row
    cols = dx + torch.arange(w, device=x.device)          # (n, w)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    # One gather for the whole batch: indexing dims 0, 2, 3 yields (n, h, w, c).
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
