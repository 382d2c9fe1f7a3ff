"""GPU benchmark: how close each data path comes to a GPU that is fed for free.

    python bench/gpu.py            # on a GPU: 12,000 JPEGs, 224 and 64 px, resnet18, batch 256
    python bench/gpu.py            # on the CPU: 400 JPEGs, 32 px, smallcnn, batch 64 (a minute)
    python bench/gpu.py --images 2000 --sizes 64 --model resnet18 --batch 128

It writes photo-like JPEGs (320x240: smooth colour fields plus grain, as
bench/loader.py) into data/raw of a work folder, runs the real index and
preprocess stages on them with `preprocess.storage: uint8`, and at each size
trains the same model through each data path in turn, with the train stage's
own Step and train_epoch (bf16 autocast, channels_last, cuDNN autotuning on a
GPU; translate by 1 px on the device):

  ceiling       one batch held on the device, fed again every step: the step alone
  DeviceLoader  the split held on the device (train.data_on_device)
  make_loader   the tensor shards streamed, in the main process (train.workers: 0)
                and in the workers `auto` picks here (loaders.loader_workers);
                --workers 8 12 adds rows with those numbers
  classic       PIL decode + torchvision transforms of every image, every epoch, in
                16 DataLoader workers (or one per core, if fewer), pinned memory, same Step
  tutorial      the classic data in the textbook loop: fp32, NCHW, no autocast

Each row is the last of two epochs (the first pays for autotuning and worker
start-up). img/s is over that whole epoch; data wait is the share of it spent
in next(loader). The goals on a GPU at 224 px: both loaders at least 0.95 of
the ceiling, and at least 4x the classic loop.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from shared import (  # bench/shared.py also puts the repository root on sys.path
    classic_epoch,
    classic_loader,
    cpu_model,
    make_dataset,
    make_optimizer,
    make_step,
    run_stages,
    stage_epoch,
    train_rows,
)

from stages import loaders
from stages.common import machine_cores
from stages.models import create_model, pick_device
from stages.tensors import SplitDataset, read_meta

TRANSLATE = 1
JPEG_SIZE = (320, 240)


@dataclass
class Row:
    """One data path's measured epoch."""

    name: str
    rate: float   # images per second
    wait: float   # share of the epoch spent waiting for the next batch


class HeldBatch:
    """One batch on the device, handed out again for every step: the loop with no data cost."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, steps: int):
        self.x, self.y, self.steps = x, y, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Any:
        for _ in range(self.steps):
            yield self.x, self.y


def stage_row(name: str, args: argparse.Namespace, meta: dict[str, Any], loader: Any,
              sampler: Any, device: torch.device, translate: int = TRANSLATE) -> Row:
    """Train a fresh model for args.epochs epochs through the stage's Step; the last one counts."""
    step = make_step(args.model, meta, device, translate)
    for epoch in range(1, args.epochs + 1):
        stats = stage_epoch(step, loader, sampler, epoch)
    row = Row(name, stats.images / stats.seconds, stats.data_wait)
    print(f"  {name}: {row.rate:.0f} img/s, data wait {row.wait:.1%}", flush=True)
    return row


def tutorial_row(name: str, args: argparse.Namespace, meta: dict[str, Any], loader: Any,
                 device: torch.device) -> Row:
    """The textbook loop over the classic loader: fp32, PyTorch's default (NCHW) layout."""
    torch.manual_seed(0)
    model = create_model(args.model, len(meta["classes"])).to(
        device, memory_format=torch.contiguous_format)
    optimizer = make_optimizer(model)
    for _ in range(args.epochs):
        seconds, wait = classic_epoch(model, loader, optimizer, device)
    row = Row(name, len(loader.dataset) / seconds, wait)
    print(f"  {name}: {row.rate:.0f} img/s, data wait {row.wait:.1%}", flush=True)
    return row


def measure_size(work: Path, size: int, args: argparse.Namespace, device: torch.device
                 ) -> list[Row]:
    """Preprocess at `size` px with the real stage, then time every data path on it."""
    started = time.perf_counter()
    run_stages(work, ("preprocess",), {"preprocess": {"image_size": size, "storage": "uint8"}})
    meta = read_meta(work / "data/tensors")
    train_set = SplitDataset(work / "data/tensors", "train")
    sampler = loaders.make_sampler(train_set, 0)
    batch, steps = args.batch, math.ceil(len(train_set) / args.batch)
    print(f"{size} px: {len(train_set)} train images preprocessed (uint8) in "
          f"{time.perf_counter() - started:.1f} s; {steps} steps per epoch", flush=True)

    first = np.arange(min(batch, len(train_set)))
    held = HeldBatch(torch.from_numpy(train_set.read(first)).to(device),
                     torch.from_numpy(train_set.labels[first]).to(device), steps)
    rows = [stage_row("ceiling: one batch held on the device", args, meta, held, None, device)]
    del held
    on_device = loaders.DeviceLoader(train_set, batch, sampler, device)
    rows.append(stage_row("DeviceLoader (data_on_device)", args, meta, on_device, sampler,
                          device))
    del on_device
    for setting in (0, "auto", *args.workers):
        workers = loaders.loader_workers(setting, device)
        streamed = loaders.make_loader(train_set, batch, workers, sampler, device)
        name = f"make_loader, {workers} workers{' (auto)' if setting == 'auto' else ''}"
        rows.append(stage_row(name, args, meta, streamed, sampler, device))
        del streamed  # stops its workers
    classic = classic_loader(work, train_rows(work), meta, batch, args.classic_workers, device,
                             TRANSLATE)  # it shifts in its transforms, so the Step does not
    rows.append(stage_row(f"classic: PIL + torchvision, {args.classic_workers} workers, pinned",
                          args, meta, classic, None, device, translate=0))
    rows.append(tutorial_row("tutorial loop: the classic data, fp32, NCHW", args, meta, classic,
                             device))
    del classic
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def print_table(size: int, rows: list[Row], cuda: bool) -> None:
    """The rows with their ratios to the ceiling and to the classic loop, then the goals."""
    ceiling = rows[0].rate
    classic = next(r for r in rows if r.name.startswith("classic")).rate
    print(f"\n{f'{size} px':<52} {'img/s':>8} {'data wait':>10} {'vs ceiling':>11} "
          f"{'x classic':>10}")
    for r in rows:
        print(f"{r.name:<52} {r.rate:>8.0f} {r.wait:>10.1%} {r.rate / ceiling:>11.2f} "
              f"{r.rate / classic:>9.2f}x")
    ours = [r for r in rows if r.name.startswith("DeviceLoader") or r.name.endswith("(auto)")]
    near = all(r.rate / ceiling >= 0.95 for r in ours)
    fast = all(r.rate / classic >= 4 for r in ours)
    where = "" if cuda and size == 224 else " (the goals are for a GPU at 224 px)"
    print(f"goals{where}: DeviceLoader and auto workers >= 0.95 of the ceiling: "
          f"{'met' if near else 'not met'}; >= 4x the classic loop: "
          f"{'met' if fast else 'not met'}")


def main() -> None:
    """Generate the JPEGs, index them, and print one table per image size."""
    device = pick_device()
    cuda = device.type == "cuda"
    cores = machine_cores()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=12000 if cuda else 400,
                        help="JPEGs to generate (20%% go to val)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 64] if cuda else [32])
    parser.add_argument("--model", default="resnet18" if cuda else "smallcnn")
    parser.add_argument("--batch", type=int, default=256 if cuda else 64)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per row; the last counts")
    parser.add_argument("--workers", type=int, nargs="*", default=[],
                        help="more make_loader rows, with these numbers of workers")
    parser.add_argument("--classic-workers", type=int, default=min(16, cores),
                        help="DataLoader workers of the classic loop")
    parser.add_argument("--dir", type=Path, help="work folder (default: a temporary one)")
    args = parser.parse_args()

    if cuda:  # as the train stage sets them
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    name = torch.cuda.get_device_name(device) if cuda else "no GPU"
    print(f"{device} ({name}), {cores} cores ({cpu_model()}), torch {torch.__version__}"
          f"{f', CUDA {torch.version.cuda}' if cuda else ''}; {args.model}, batch {args.batch}, "
          f"{args.images} JPEGs {JPEG_SIZE[0]}x{JPEG_SIZE[1]}", flush=True)
    tables = []
    with tempfile.TemporaryDirectory(prefix="imgpipe-bench-gpu-") as tmp:
        work = args.dir or Path(tmp)
        started = time.perf_counter()
        make_dataset(work / "data/raw", args.images, cores, size=JPEG_SIZE)
        run_stages(work, ("index",), {})
        print(f"generated and indexed {args.images} JPEGs in "
              f"{time.perf_counter() - started:.1f} s", flush=True)
        cwd = os.getcwd()
        os.chdir(work)  # as the stage runs: relative paths and the cache under the work folder
        try:
            for size in args.sizes:
                tables.append((size, measure_size(work, size, args, device)))
        finally:
            os.chdir(cwd)
    for size, rows in tables:
        print_table(size, rows, cuda)


if __name__ == "__main__":
    main()
