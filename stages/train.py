"""Train stage: the classic PyTorch loop, made fast, resumable and honest.

Outputs:
    models/model.pt      the best epoch's weights (lowest val loss), plus all predict needs
    metrics/train.json   the best epoch: its number, val loss and accuracy, and epochs run
                         (a DVC metric)
    metrics/train_details.json  the best epoch's train loss/acc, early stop, seconds,
                         device, and the MLflow run id
    metrics/epochs.csv   per-epoch train/val loss and accuracy (a DVC plot)

Never lose progress: every epoch ends with an atomic checkpoint in
.cache/imgpipe/checkpoints/ under the real repository root. It lives outside
DVC's outputs because DVC deletes a stage's outs before rerunning it, and
because `dvc exp run --temp` works in a throwaway copy; DVC_ROOT points back at
the real root, so a killed experiment resumes too. The file is named by a
fingerprint of the params and the data, so a checkpoint of other params or
data is never resumed; it is deleted once the model is written.

The data path (the loaders, the workers choice and the augmentation) is stages/loaders.py.

Scale out: with train.gpus > 1 the stage relaunches itself under torchrun,
one process per GPU (DistributedDataParallel). Only rank 0 logs and writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from stages import finetune, params, tracking
from stages.common import UserError, atomic_path, cache_root, cli, write_csv, write_json
from stages.imaging import DEFAULT_INTERPOLATION
from stages.loaders import (
    DeviceLoader,
    augment,
    keep_on_device,
    loader_workers,
    make_loader,
    make_sampler,
)
from stages.models import (
    MEMORY_FORMAT,
    amp_dtype,
    autocast,
    build_model,
    pick_device,
    predict,
)
from stages.tensors import SplitDataset, crop_size, model_feed, read_meta, to_device
from stages.weights import LoadedWeights
from stages.zoo import resolve_model, resolve_preprocessing

TENSORS = Path("data/tensors")
WEIGHTS = Path("weights")  # local pretrained weights live here: a dependency of the stage
MODEL = Path("models/model.pt")
METRICS = Path("metrics/train.json")
DETAILS = Path("metrics/train_details.json")
# What runs are compared by (DVC's metrics); the rest of the summary is bookkeeping.
HEADLINE = ("best_epoch", "epochs", "val_loss", "val_acc")
EPOCHS_LOG = Path("metrics/epochs.csv")
CHECKPOINT_VERSION = 1  # bump when the checkpoint layout or the loop's maths change
# Steps timed apart at the start of every epoch: cuDNN autotuning, CUDA start-up and loader
# workers starting make them slow, and images_per_second is logged over the steps after them.
WARMUP_STEPS = 5


# ---------------------------------------------------------------- setup

@dataclass(frozen=True)
class Dist:
    """Where this process sits in a torchrun job; rank 0 of 1 when run plainly."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # processes of the job on this machine

    @property
    def main(self) -> bool:
        """Only the main process logs, shows progress and writes files."""
        return self.rank == 0


def relaunch_under_torchrun(processes: int) -> None:
    """Replace this process by torchrun running this module once per GPU."""
    print(f"train.gpus is {processes}: relaunching under torchrun "
          f"(DistributedDataParallel, {processes} processes)", flush=True)
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={processes}", "-m", "stages.train"]
    os.execv(sys.executable, args)


def init_distributed() -> Dist:
    """Join the torchrun job if there is one: NCCL between GPUs, gloo between CPU processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), world, local_rank,
                int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every random generator the loop draws from, in a form torch.load(weights_only) reads."""
    np_state = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                      *np_state[2:]),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    """Put every random generator back where rng_state found it."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- optimisation

def make_optimizer(t: params.Train, parameters: Any, lr: float) -> torch.optim.Optimizer:
    """SGD (momentum, optionally Nesterov) or AdamW, from params.yaml train.*.

    parameters: the model's parameters, or param groups with lrs of their own.
    """
    if t.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=t.momentum,
                               nesterov=t.nesterov and t.momentum > 0,
                               weight_decay=t.weight_decay)
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=t.weight_decay)


def param_groups(net: nn.Module, head: nn.Module | None, lr: float, t: params.Train,
                 pretrained: bool, head_fitted: bool = False) -> list[dict[str, Any]]:
    """The optimizer's groups: everything at lr, or, with pretrained weights, the backbone at
    lr * train.backbone_lr (0: frozen) and the new head at lr, or at the backbone's lr once it
    was fitted first (LP-FT: a fitted head needs only small steps; measured: at lr 0.05 it is
    knocked off its optimum in the first epoch, see docs/training.md)."""
    if not pretrained:
        return [{"params": list(net.parameters()), "lr": lr}]
    backbone, new = finetune.split_parameters(net, head)
    if t.backbone_lr == 0:
        for weight in backbone:
            weight.requires_grad_(False)
        return [{"params": new, "lr": lr}]
    head_lr = lr * t.backbone_lr if head_fitted else lr
    return [g for g in ({"params": backbone, "lr": lr * t.backbone_lr},
                        {"params": new, "lr": head_lr}) if g["params"]]


def gradient_clip(setting: Any, pretrained: bool) -> float | None:
    """train.clip_grad_norm resolved: `auto` clips fine-tuning (finetune.FINE_TUNE_CLIP) only."""
    if setting == "auto":
        return finetune.FINE_TUNE_CLIP if pretrained else None
    return setting


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base lr at `step`: linear warmup, then cosine decay or constant."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(t: params.Train, optimizer: torch.optim.Optimizer, lr: float,
                   steps_per_epoch: int) -> Any:
    """The lr schedule of train.schedule over train.epochs, stepped once per batch."""
    total = max(1, steps_per_epoch * t.epochs)
    warmup = min(total, int(round(t.warmup_epochs * steps_per_epoch)))
    if t.schedule == "onecycle":
        # Rises for the warmup (or 30% of the run when no warmup is set), then anneals.
        pct = warmup / total if warmup else 0.3
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total,
            pct_start=min(max(pct, 1e-3), 0.99))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, t.schedule))


def class_weights(labels: np.ndarray, num_classes: int, mode: str) -> torch.Tensor | None:
    """None, or `balanced` loss weights n / (classes * count): rare classes count for more."""
    if mode == "none":
        return None
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = len(labels) / (num_classes * np.maximum(counts, 1.0))
    return torch.tensor(weights, dtype=torch.float32)


class EarlyStopping:
    """Tracks the lowest val loss; says stop after `patience` epochs without one (0: never)."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best_loss = math.inf
        self.best_epoch = 0
        self.bad_epochs = 0

    def update(self, val_loss: float, epoch: int) -> bool:
        """Record one epoch; True if it is the best so far."""
        if not math.isfinite(val_loss):  # no val images: the latest epoch is the best we know
            self.best_epoch = epoch
            return True
        if val_loss < self.best_loss:
            self.best_loss, self.best_epoch, self.bad_epochs = val_loss, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def stop(self) -> bool:
        """True once patience ran out."""
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        """For the checkpoint."""
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """From the checkpoint."""
        vars(self).update(state)


# ---------------------------------------------------------------- checkpoints

def fingerprint(p: params.Params, meta: dict[str, Any], world: int) -> str:
    """What a checkpoint is valid for: the params, data and hardware that shape the weights.

    The params are those that rerun the train stage (params.stage_params): a key that
    only changes how the run goes, like train.log_every, keeps the checkpoint valid.
    """
    device = pick_device()
    keyed = {"version": CHECKPOINT_VERSION, "params": params.values(p, "train"),
             "data": meta, "processes": world, "device": device.type,
             "precision": str(amp_dtype(device))}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checkpoint_path(key: str) -> Path:
    """Where the checkpoint of fingerprint `key` lives: outside DVC's outputs (see module doc)."""
    return cache_root() / "checkpoints" / f"train-{key}.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write the checkpoint atomically and durably: a kill leaves the old one or the new one."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def read_checkpoint(path: Path, key: str) -> dict[str, Any] | None:
    """The checkpoint to resume from, or None when there is none or it is of other params/data."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged checkpoint is only a lost head start
        print(f"note: ignoring unreadable checkpoint {path} ({type(err).__name__})")
        return None
    if state.get("fingerprint") != key:
        print(f"note: ignoring checkpoint {path}: it is of other params or data")
        return None
    return state


# ---------------------------------------------------------------- the loop

@dataclass
class Step:
    """Everything one training step needs besides the batch."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    device: torch.device
    meta: dict[str, Any]
    settings: params.Train  # augmentation
    freeze_bn: bool = False  # batch norm keeps its (pretrained) statistics
    clip: float | None = None  # the gradient norm to clip to (train.clip_grad_norm resolved)


@dataclass
class EpochStats:
    """What one pass over the training data measured (summed over all processes)."""

    loss: float
    acc: float
    images: int
    steps: int
    seconds: float
    data_wait: float          # share of the epoch spent waiting for the next batch
    warmup_seconds: float = 0.0  # the first steps of the epoch (WARMUP_STEPS or fewer)
    warmup_images: int = 0

    @property
    def images_per_second(self) -> float:
        """The steady rate: images after the warm-up over their time (whole epoch without one)."""
        images, seconds = self.images - self.warmup_images, self.seconds - self.warmup_seconds
        if images <= 0 or seconds <= 0:  # no steps past the warm-up
            images, seconds = self.images, self.seconds
        return images / max(seconds, 1e-9)


class NonFiniteLoss(Exception):
    """The loss became NaN or inf at (epoch, step)."""


def check_finite(losses: list[torch.Tensor], first_step: int, shard: Dist) -> None:
    """Raise NonFiniteLoss naming the first bad global step; every process agrees."""
    if not losses:
        return
    bad = (~torch.isfinite(torch.stack(losses))).nonzero()
    first = first_step + int(bad[0]) if len(bad) else -1
    if shard.world > 1:  # the earliest bad step over all processes, so that all stop together
        flag = torch.tensor(first if first >= 0 else 2**62, device=losses[0].device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        first = int(flag) if int(flag) < 2**62 else -1
    if first >= 0:
        raise NonFiniteLoss(first)


def train_epoch(s: Step, loader: Any, first_step: int, log: Any, log_every: int,
                shard: Dist = Dist(), desc: str = "train") -> EpochStats:
    """One pass over the training data: the classic loop, with the checks folded in.

    The loss is checked for NaN/inf and sent to MLflow (when `log` is a RunLogger)
    every `log_every` steps, each step's own value: reading it every step would
    stall a GPU's queue. The first WARMUP_STEPS steps (at most half the epoch) are
    timed apart, so that the steady rate can be compared across runs and epochs.
    """
    finetune.train_mode(s.model, s.freeze_bn)
    total_loss = torch.zeros((), device=s.device)
    correct = torch.zeros((), device=s.device, dtype=torch.long)
    pending: list[torch.Tensor] = []  # unchecked losses: .item() every step would stall a GPU
    seen, waited, started = 0, 0.0, time.perf_counter()
    warmup = min(WARMUP_STEPS, len(loader) // 2)  # a short epoch keeps half its steps steady
    warm_seconds, warm_seen = 0.0, 0
    # A with block: a NaN loss raised in it clears the bar first, so its error starts a line.
    with tqdm(total=len(loader), desc=desc, unit="batch", leave=False,
              disable=not shard.main) as bar:
        batches = iter(loader)
        for i in range(len(loader)):
            ready = time.perf_counter()
            x, y = next(batches)
            waited += time.perf_counter() - ready
            x = augment(to_device(x, s.device, s.meta, whole=True), s.settings, s.meta)
            x = x.contiguous(memory_format=MEMORY_FORMAT)
            y = y.to(s.device, non_blocking=True)

            s.optimizer.zero_grad(set_to_none=True)
            with autocast(s.device):
                out = s.model(x)
                loss = s.loss_fn(out, y)
            s.scaler.scale(loss).backward()
            if s.clip:
                s.scaler.unscale_(s.optimizer)
                nn.utils.clip_grad_norm_(s.model.parameters(), s.clip)
            s.scaler.step(s.optimizer)
            s.scaler.update()
            s.scheduler.step()

            loss = loss.detach()
            pending.append(loss)
            total_loss += loss * len(y)
            correct += (out.argmax(1) == y).sum()
            seen += len(y)
            if i + 1 == warmup:
                if s.device.type == "cuda":  # the clock must see the queued steps done, not issued
                    torch.cuda.synchronize(s.device)
                warm_seconds, warm_seen = time.perf_counter() - started, seen
            bar.update()
            if (i + 1) % log_every == 0 or i + 1 == len(loader):
                check_finite(pending, first_step + i + 1 - len(pending), shard)
                values = torch.stack(pending).tolist()
                pending = []
                if log is not None:  # every step's own loss, written in one batch
                    log.series("step_loss", values, first_step + i + 2 - len(values))
                if shard.main:
                    rate = seen * shard.world / (time.perf_counter() - started)
                    bar.set_postfix(loss=f"{values[-1]:.3f}", acc=f"{correct.item() / seen:.3f}",
                                    img_s=f"{rate:.0f}")
    sums = torch.stack([total_loss.float(), correct.float(),
                        torch.tensor(float(seen), device=s.device),
                        torch.tensor(float(warm_seen), device=s.device)])
    if shard.world > 1:
        dist.all_reduce(sums)
    total, right, images, warm_images = sums.tolist()
    seconds = time.perf_counter() - started
    return EpochStats(total / max(images, 1), right / max(images, 1), int(images),
                      len(loader), seconds, waited / max(seconds, 1e-9),
                      warm_seconds, int(warm_images))


def head_first(net: nn.Module, head: nn.Linear, train_loader: Any, val_loader: Any,
               device: torch.device, meta: dict[str, Any], weights: torch.Tensor | None
               ) -> dict[str, Any]:
    """Fit the new head on the frozen backbone's features (stages/finetune.py): epoch 0's row."""
    started = time.perf_counter()

    def to_input(x: torch.Tensor) -> torch.Tensor:
        return to_device(x, device, meta)

    train = finetune.head_inputs(net, head, train_loader, device, to_input)
    val = finetune.head_inputs(net, head, val_loader, device, to_input)
    fitted = finetune.fit_head(head, train, val, weights)  # val scored on its features
    val_loss, val_acc = fitted["val_loss"], fitted["val_acc"]
    seconds = time.perf_counter() - started
    print(f"epoch   0     the new head on frozen features (L2 {fitted['head_l2']:g}): "
          f"train loss {fitted['train_loss']:.4f} acc {fitted['train_acc']:.4f}  "
          f"val loss {val_loss:.4f} acc {val_acc:.4f}  in {seconds:.1f} s", flush=True)
    return {"epoch": 0, "train_loss": fitted["train_loss"], "train_acc": fitted["train_acc"],
            "val_loss": val_loss, "val_acc": val_acc, "lr": 0.0, "epoch_seconds": seconds,
            "warmup_seconds": 0.0, "images_per_second": len(train[1]) / seconds,
            "data_wait": 0.0}


def evaluate(model: nn.Module, loader: Any, loss_fn: nn.Module, device: torch.device,
             meta: dict[str, Any]) -> tuple[float, float]:
    """Mean loss (unweighted, unsmoothed) and accuracy over a loader; NaN when it is empty."""
    logits, labels = predict(model, loader, device, meta)
    if len(labels) == 0:
        return float("nan"), float("nan")
    loss = F.cross_entropy(logits, labels).item()
    return loss, (logits.argmax(1) == labels).float().mean().item()


# ---------------------------------------------------------------- outputs

def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the weights, safe to keep while training goes on.

    Stored in the plain (NCHW) layout, whatever MEMORY_FORMAT training used.
    """
    return {k: v.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
            for k, v in model.state_dict().items()}


def save_model(path: Path, state: dict[str, torch.Tensor], meta: dict[str, Any],
               extra: dict[str, Any]) -> None:
    """Save the weights with everything predict needs, atomically."""
    checkpoint = {
        "state_dict": state,
        "classes": meta["classes"], "image_size": meta["image_size"],
        "crop_size": crop_size(meta),
        "resize": meta["resize"], "interpolation": meta.get("interpolation", DEFAULT_INTERPOLATION),
        "mean": meta["mean"], "std": meta["std"], **extra,
    }
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


# ---------------------------------------------------------------- the stage

def model_input(meta: dict[str, Any], t: params.Train) -> tuple[dict[str, Any], str]:
    """The meta to feed the stored tensors with, and why: pretrained weights' own mean/std.

    With preprocess.normalize: auto a pretrained model gets the mean/std its weights were
    trained with (timm's pretrained_cfg, torchvision's transforms); an explicit
    normalize wins, with a warning when it differs from the weights'.
    """
    setting = f"preprocess.normalize: {meta['normalize']}"
    if not t.pretrained:
        return meta, f"mean/std {_stats(meta)} ({setting})"
    wanted = resolve_preprocessing(t.model, t.pretrained)
    seen = crop_size(meta)
    if wanted.crop_size and wanted.crop_size != seen:
        print(f"warning: preprocess.image_size is {seen}, but {wanted.why} says "
              f"{wanted.crop_size} px: the model runs at either, usually best at its own")
    if meta["normalize"] == "auto":
        fed = model_feed(meta, wanted.mean, wanted.std)
        return fed, f"mean/std {_stats(fed)} from {wanted.why} ({setting})"
    if (tuple(meta["mean"]), tuple(meta["std"])) != (wanted.mean, wanted.std):
        print(f"warning: {setting} feeds mean/std {_stats(meta)}, but {wanted.why} says "
              f"{_stats({'mean': wanted.mean, 'std': wanted.std})}: the explicit setting wins; "
              "use normalize: auto to follow the weights")
    return meta, f"mean/std {_stats(meta)} ({setting})"


def _stats(meta: dict[str, Any]) -> str:
    return "/".join("(" + ", ".join(f"{v:.3g}" for v in meta[k]) + ")" for k in ("mean", "std"))


def silenced(quiet: bool) -> Any:
    """A context that swallows what is printed, when quiet (DDP's other processes)."""
    return contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext()


def warn_outside_weights(path: Path) -> None:
    """A local weights file outside weights/ is not a DVC dependency: say so."""
    if WEIGHTS.resolve() not in path.resolve().parents:
        print(f"note: train.pretrained {path} is outside {WEIGHTS}/, which the train stage "
              f"depends on: DVC will not retrain when that file is replaced; move it into "
              f"{WEIGHTS}/ (see {WEIGHTS}/README.md)")


def check_fits(t: params.Train, meta: dict[str, Any], world: int) -> None:
    """Fail in one line, before any work, on train params the data or processes rule out."""
    if t.batch_size < world:
        raise UserError(f"train.batch_size {t.batch_size} is smaller than the number of "
                        f"processes ({world})")
    size = crop_size(meta)
    if not t.translate < size:
        raise UserError(f"train.translate is {t.translate} pixels: use 0 (off) up to "
                        f"{size - 1}, below the image size")


def train(p: params.Params, meta: dict[str, Any], run: Any, key: str,
          resume: dict[str, Any] | None = None, shard: Dist = Dist()) -> dict[str, Any] | None:
    """Fit the model of params; rank 0 writes the model, epoch log, metrics and checkpoints."""
    t = p.train  # checked against the data and processes by main (check_fits)
    lr, epochs, seed = p.lr, t.epochs, t.seed
    batch_size = t.batch_size // shard.world  # batch_size is the total over processes
    seed_everything(seed + shard.rank)  # DDP copies rank 0's initial weights to every rank
    device = pick_device(shard.local_rank)
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = cuda  # fixed input shapes: let cuDNN pick the fastest kernels
    if cuda:
        torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in fp32

    train_set, val_set = SplitDataset(TENSORS, "train"), SplitDataset(TENSORS, "val")
    sampler = make_sampler(train_set, seed, shard.rank, shard.world)
    on_device = keep_on_device(t.data_on_device, device, train_set.nbytes + val_set.nbytes)
    # Seeds the loader workers; its own generator, so loaders never draw from torch's global one.
    generator = torch.Generator().manual_seed(seed + shard.rank)
    if on_device:  # no workers: a batch is an index lookup on the device
        train_loader: Any = DeviceLoader(train_set, batch_size, sampler, device)
        val_loader: Any = DeviceLoader(val_set, batch_size, range(len(val_set)), device)
        feed = "data on the device"
    else:
        workers = loader_workers(t.workers, device, shard.local_world)
        train_loader = make_loader(train_set, batch_size, workers, sampler, device, generator)
        val_loader = make_loader(val_set, batch_size, 0, None, device, torch.Generator())
        feed = (f"data streamed, {workers} worker{'' if workers == 1 else 's'}"
                f"{' (auto)' if t.workers == 'auto' else ''}")

    classes = meta["classes"]
    # Loaded on a resume too: what they lack is the head (stages/finetune.py), and the record.
    with silenced(not shard.main):  # its notes and warnings, said once: by rank 0
        net, loaded = build_model(t.model, len(classes), t.pretrained)
        meta, fed = model_input(meta, t)
    net = net.to(device)
    pretrained = loaded is not None
    if shard.main and pretrained and Path(str(t.pretrained)).is_file():  # a local file
        warn_outside_weights(Path(str(t.pretrained)))
    head = finetune.new_head(net, list(loaded.new)) if pretrained else None
    head_fitted_first = head is not None and t.head_first  # LP-FT: the probe is epoch 0
    if epochs == 0 and not head_fitted_first:  # params ruled out the other reasons
        raise UserError(f"train.epochs is 0, which keeps only a new head fitted on pretrained "
                        f"features, but {t.pretrained} leaves no new linear head on {t.model} "
                        "to fit: set train.epochs to 1 or more")
    clip = gradient_clip(t.clip_grad_norm, pretrained)
    if resume:
        net.load_state_dict(resume["model"])
    weights = class_weights(train_set.labels, len(classes), t.class_weights)
    loss_fn = nn.CrossEntropyLoss(weight=None if weights is None else weights.to(device),
                                  label_smoothing=t.label_smoothing)

    log = tracking.RunLogger(run.info.run_id) if shard.main else None
    if shard.main:
        where = f"resuming after epoch {resume['epoch']}" if resume else "starting"
        tuning = (f", fine-tuning{' after fitting the head' if head_fitted_first else ''} "
                  f"(backbone lr x{t.backbone_lr}{', batch norm frozen' if t.freeze_bn else ''})"
                  if pretrained else "")
        tuning += f", gradient norm clipped at {clip:g}" if clip else ""
        if epochs == 0:
            tuning = ", only the new head, fitted on frozen features (the linear probe)"
        print(f"{where}: {t.model} on {device}"
              f"{f' x {shard.world} processes' if shard.world > 1 else ''}, "
              f"{len(train_set)} train / {len(val_set)} val images, {len(classes)} classes, "
              f"{epochs} epochs, {feed}{tuning}; input {fed}", flush=True)

    stopper = EarlyStopping(t.patience)
    history: list[dict[str, Any]] = []
    if head_fitted_first and not resume:
        row = None
        if shard.main:  # before DDP wraps the net: DDP then copies the fitted head to every rank
            whole = (DeviceLoader(train_set, batch_size, range(len(train_set)), device)
                     if on_device else
                     make_loader(train_set, batch_size, 0, None, device, torch.Generator()))
            row = head_first(net, head, whole, val_loader, device, meta, weights)
            log.metrics({k: v for k, v in row.items() if k != "epoch"}, step=0)
        if shard.world > 1:  # every process's early stopping counts from the same epoch 0
            shared = [row]
            dist.broadcast_object_list(shared, src=0)
            row = shared[0]
        history.append(row)
        stopper.update(row["val_loss"], 0)
    best_state, start_epoch, global_step = cpu_state(net), 0, 0

    model: nn.Module = net
    if shard.world > 1:
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device] if cuda else None)
    if t.compile:
        model = torch.compile(model)
    optimizer = make_optimizer(t, param_groups(net, head, lr, t, pretrained, head_fitted_first),
                               lr)
    scheduler = make_scheduler(t, optimizer, lr, len(train_loader))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(device) == torch.float16)
    step = Step(model, optimizer, scheduler, scaler, loss_fn, device, meta, t,
                freeze_bn=pretrained and t.freeze_bn, clip=clip)
    if resume:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        stopper.load_state_dict(resume["stopper"])
        history, best_state = resume["history"], resume["best_state"]
        start_epoch, global_step = resume["epoch"], resume["step"]
        set_rng_state(resume["rng"][shard.rank])
        generator.set_state(resume["rng"][shard.rank]["loader"])

    started = time.perf_counter()
    for epoch in range(start_epoch + 1, epochs + 1):
        if stopper.stop:
            break
        sampler.set_epoch(epoch)
        try:
            stats = train_epoch(step, train_loader, global_step, log, t.log_every, shard,
                                desc=f"epoch {epoch}/{epochs}")
        except NonFiniteLoss as bad:
            raise UserError(
                f"loss became NaN or inf in epoch {epoch} at step {bad.args[0]}: the learning "
                f"rate is probably too high (lr={lr}); lower lr in params.yaml and rerun "
                "(no model was written)") from None
        global_step += stats.steps
        val_loss = val_acc = float("nan")
        if shard.main:
            val_loss, val_acc = evaluate(net, val_loader, loss_fn, device, meta)
        if shard.world > 1:  # rank 0 decides for all, so every process stops at the same epoch
            shared = [val_loss, val_acc]
            dist.broadcast_object_list(shared, src=0)
            val_loss, val_acc = shared
        if stopper.update(val_loss, epoch):
            best_state = cpu_state(net)
        row = {"epoch": epoch, "train_loss": stats.loss, "train_acc": stats.acc,
               "val_loss": val_loss, "val_acc": val_acc, "lr": optimizer.param_groups[0]["lr"],
               "epoch_seconds": stats.seconds, "warmup_seconds": stats.warmup_seconds,
               "images_per_second": stats.images_per_second, "data_wait": stats.data_wait}
        history.append(row)

        mine = rng_state() | {"loader": generator.get_state()}
        states: list[Any] = [mine]
        if shard.world > 1:  # each process draws its own augmentations: keep every one's state
            states = [None] * shard.world
            dist.all_gather_object(states, mine)
        if shard.main:
            # Logged before the checkpoint: a kill in between repeats the epoch's values, rather
            # than leave a checkpointed epoch that never reached MLflow.
            log.metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
            save_checkpoint(checkpoint_path(key), {
                "fingerprint": key, "epoch": epoch,
                "step": global_step, "model": cpu_state(net), "best_state": best_state,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "stopper": stopper.state_dict(),
                "history": history, "rng": states, "run_id": run.info.run_id})
            print(f"epoch {epoch:>3}/{epochs}  train loss {stats.loss:.4f} acc {stats.acc:.4f}  "
                  f"val loss {val_loss:.4f} acc {val_acc:.4f}  "
                  f"{row['images_per_second']:.0f} img/s after {stats.warmup_seconds:.1f} s "
                  "of warm-up", flush=True)
        if stopper.stop and shard.main:
            print(f"early stop: val loss has not improved for {stopper.patience} epochs; "
                  f"keeping epoch {stopper.best_epoch}")
    if not shard.main:
        return None
    return finish(t, meta, run, log, best_state, stopper, history, checkpoint_path(key),
                  device, time.perf_counter() - started, loaded)


def finish(t: params.Train, meta: dict[str, Any], run: Any, log: Any,
           best_state: dict[str, torch.Tensor], stopper: EarlyStopping,
           history: list[dict[str, Any]], ckpt: Path, device: torch.device,
           seconds: float, loaded: LoadedWeights | None) -> dict[str, Any]:
    """Write the best epoch's model and the metrics locally first, then log them to MLflow."""
    if not all(torch.isfinite(v).all() for v in best_state.values() if v.is_floating_point()):
        raise UserError("the weights hold NaN or inf: lower lr in params.yaml and rerun "
                        "(no model was written)")
    best = next(r for r in history if r["epoch"] == stopper.best_epoch)
    save_model(MODEL, best_state, meta, {"model": resolve_model(t.model).name,
                                         "run_id": run.info.run_id,
                                         "data_version": meta["data_version"],
                                         "epoch": best["epoch"]})
    write_csv(EPOCHS_LOG, pd.DataFrame(history))
    summary = {"best_epoch": best["epoch"], "epochs": sum(r["epoch"] > 0 for r in history)}
    summary |= {k: best[k] for k in ("val_loss", "val_acc", "train_loss", "train_acc")}
    summary |= {"stopped_early": stopper.stop, "seconds": round(seconds, 2),
                "device": device.type, "mlflow_run_id": run.info.run_id,
                "pretrained": loaded.record() if loaded else None}
    write_json(METRICS, {k: summary[k] for k in HEADLINE})
    write_json(DETAILS, {k: v for k, v in summary.items() if k not in HEADLINE})
    ckpt.unlink(missing_ok=True)  # the model is safe: nothing left to resume

    # Not into the pipeline's run: MLflow's Compare plots the first metric by name, which
    # there is then eval_accuracy.
    log.metrics({"best_epoch": best["epoch"], "best_val_loss": best["val_loss"],
                 "best_val_acc": best["val_acc"]})
    if loaded:  # which bytes the run started from: imgpipe-reproduce compares them
        log.tags({f"{tracking.WEIGHTS_TAG}.{k}": v for k, v in loaded.record().items()})
    for path in (METRICS, DETAILS, EPOCHS_LOG):
        log.artifact(path)
    if log.unlogged():  # the servable model is logged by the evaluate stage, once it is scored
        print(f"warning: {log.unlogged()}")
    return summary


def enable_system_metrics() -> None:
    """CPU, memory (and GPU, with nvidia-ml-py) usage in the MLflow run, sampled in a thread."""
    import mlflow

    mlflow.enable_system_metrics_logging()
    # Its monitor says at INFO that it started and stopped, around every line of ours.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)


@cli
def main() -> None:
    """Train a model on data/tensors/ and write models/model.pt (resuming if a checkpoint fits)."""
    p = params.load()
    if p.train.gpus > 1 and "LOCAL_RANK" not in os.environ:
        relaunch_under_torchrun(p.train.gpus)
    shard = init_distributed()
    try:
        meta = read_meta(TENSORS)
        check_fits(p.train, meta, shard.world)
        key = fingerprint(p, meta, shard.world)
        resume = read_checkpoint(checkpoint_path(key), key)
        if not shard.main:
            train(p, meta, None, key, resume, shard)
            return
        logged = {"lr": p.lr, "train": p.train.model_dump(),
                  "data": {k: meta[k] for k in ("image_size", "resize", "normalize")}
                  | {"crop_size": crop_size(meta)}}
        enable_system_metrics()
        with tracking.stage_run(p.mlflow.experiment, "train", logged, meta["data_version"],
                                run_id=resume["run_id"] if resume else None) as run:
            summary = train(p, meta, run, key, resume, shard)
        print(f"done: best epoch {summary['best_epoch']}, val accuracy "
              f"{summary['val_acc']:.4f}, model in {MODEL}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
