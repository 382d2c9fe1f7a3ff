"""Train stage: the classic PyTorch DataLoader loop over the preprocessed tensors.

Outputs:
    models/model.pt      weights plus classes, normalisation and image size: all predict needs
    metrics/train.json   final numbers
    metrics/epochs.csv   per-epoch train/val loss and accuracy (a DVC plot)
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from stages import tracking
from stages.common import UserError, atomic_path, cli, load_params, write_csv, write_json
from stages.models import autocast, create_model, pick_device, predict
from stages.tensors import SplitDataset, as_batch, read_meta, to_device

TENSORS = Path("data/tensors")
MODEL = Path("models/model.pt")
METRICS = Path("metrics/train.json")
EPOCHS_LOG = Path("metrics/epochs.csv")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; returns the generator that drives shuffling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """Give each DataLoader worker its own reproducible NumPy and Python seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset: SplitDataset, batch_size: int, workers: int, shuffle: bool,
                generator: torch.Generator | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader that reads whole batches from the memory-mapped tensors."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
        collate_fn=as_batch, generator=generator, worker_init_fn=seed_worker,
        pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)


def make_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float
                   ) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum, or AdamW."""
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                               weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    raise UserError(f"train.optimizer in params.yaml is {name!r}: use sgd or adamw")


def train_epoch(model: nn.Module, loader: Any, optimizer: torch.optim.Optimizer,
                scheduler: Any, loss_fn: nn.Module, device: torch.device,
                meta: dict[str, Any], desc: str) -> tuple[float, float, list[float]]:
    """One pass over the training data; returns mean loss, accuracy and each step's loss."""
    model.train()
    step_losses: list[float] = []
    correct = seen = 0
    bar = tqdm(loader, desc=desc, unit="batch", leave=False)
    for x, y in bar:
        x = to_device(x, device, meta)
        y = y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device):
            out = model(x)
            loss = loss_fn(out, y)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step_losses.append(loss.item())
        correct += (out.argmax(1) == y).sum().item()
        seen += len(y)
        bar.set_postfix(loss=f"{step_losses[-1]:.3f}", acc=f"{correct / seen:.3f}")
    return float(np.mean(step_losses)), correct / seen, step_losses


def evaluate_loss(model: nn.Module, loader: Any, loss_fn: nn.Module,
                  device: torch.device, meta: dict[str, Any]) -> tuple[float, float]:
    """Mean loss and accuracy over a loader."""
    logits, labels = predict(model, loader, device, meta)
    if len(labels) == 0:
        return float("nan"), float("nan")
    return loss_fn(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


def save_model(path: Path, model: nn.Module, meta: dict[str, Any], extra: dict[str, Any]) -> None:
    """Save the weights with everything predict needs, atomically."""
    checkpoint = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "classes": meta["classes"], "image_size": meta["image_size"],
        "resize": meta["resize"], "mean": meta["mean"], "std": meta["std"], **extra,
    }
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def train(params: dict[str, Any], run: Any) -> dict[str, Any]:
    """Fit the model described by params; write the model, the epoch log and metrics."""
    p = params["train"]
    lr, epochs, batch_size = float(params["lr"]), int(p["epochs"]), int(p["batch_size"])
    generator = seed_everything(int(p["seed"]))
    meta = read_meta(TENSORS)
    device = pick_device()
    train_set, val_set = SplitDataset(TENSORS, "train"), SplitDataset(TENSORS, "val")
    train_loader = make_loader(train_set, batch_size, int(p["workers"]), True, generator)
    val_loader = make_loader(val_set, batch_size, int(p["workers"]), False)

    model = create_model(p["model"], len(meta["classes"])).to(device)
    optimizer = make_optimizer(p["optimizer"], model, lr, float(p["weight_decay"]))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, epochs * len(train_loader)))
    loss_fn = nn.CrossEntropyLoss()
    log = tracking.RunLogger(run.info.run_id)
    print(f"training {p['model']} on {device}: {len(train_set)} train / {len(val_set)} val "
          f"images, {len(meta['classes'])} classes, {epochs} epochs")

    history = []
    step = 0
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        epoch_start = time.perf_counter()
        train_loss, train_acc, losses = train_epoch(
            model, train_loader, optimizer, scheduler, loss_fn, device, meta,
            desc=f"epoch {epoch}/{epochs}")
        seconds = time.perf_counter() - epoch_start
        val_loss, val_acc = evaluate_loss(model, val_loader, loss_fn, device, meta)
        if not np.isfinite(train_loss):
            raise UserError(f"loss became {train_loss} in epoch {epoch}: the learning rate "
                            f"(lr={lr}) is probably too high; lower it and rerun")
        row = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
               "val_loss": val_loss, "val_acc": val_acc,
               "lr": optimizer.param_groups[0]["lr"], "epoch_seconds": seconds,
               "images_per_second": len(train_set) / seconds}
        history.append(row)
        log.series("step_loss", losses, step)
        step += len(losses)
        log.metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
        print(f"epoch {epoch:>3}/{epochs}  train loss {train_loss:.4f} acc {train_acc:.4f}  "
              f"val loss {val_loss:.4f} acc {val_acc:.4f}  {row['images_per_second']:.0f} img/s")

    save_model(MODEL, model, meta, {"model": p["model"], "run_id": run.info.run_id,
                                    "data_version": meta["data_version"]})
    write_csv(EPOCHS_LOG, pd.DataFrame(history))
    final = history[-1]
    summary = {k: final[k] for k in ("train_loss", "train_acc", "val_loss", "val_acc")}
    summary |= {"epochs": epochs, "seconds": round(time.perf_counter() - started, 2),
                "device": device.type, "mlflow_run_id": run.info.run_id}
    write_json(METRICS, summary)
    if log.unlogged():
        print(f"warning: {log.unlogged()}")
    return summary


@cli
def main() -> None:
    """Train a model on data/tensors/ and write models/model.pt."""
    params = load_params()
    meta = read_meta(TENSORS)
    logged = {"lr": params["lr"], "train": params["train"],
              "data": {k: meta[k] for k in ("image_size", "resize", "normalize")}}
    with tracking.stage_run(params["mlflow"]["experiment"], "train", logged,
                            meta["data_version"]) as run:
        summary = train(params, run)
    print(f"done: val accuracy {summary['val_acc']:.4f}, model in {MODEL}")


if __name__ == "__main__":
    main()
