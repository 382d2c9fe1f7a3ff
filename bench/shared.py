"""What the benchmarks share: generated photo-like JPEGs, the real stages run on them, the
classic PIL + torchvision loop they are measured against, and our loop as the stage builds it.

Imported by the scripts beside it (`python bench/<name>.py` puts bench/ on sys.path).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages import train as ours  # noqa: E402
from stages.models import amp_dtype, create_model  # noqa: E402
from stages.params import Train  # noqa: E402

CLASSES = 10


# ---------------------------------------------------------------- the images

def make_jpeg(job: tuple[str, int, int, int]) -> tuple[str, str]:
    """Write one photo-like JPEG (smooth colour fields plus grain); returns (path, sha256)."""
    path, seed, width, height = job
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), np.int16)
    grain = rng.normal(0, 12, smooth.shape).astype(np.int16)
    pixels = np.clip(smooth + grain, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path, hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_dataset(folder: Path, n: int, workers: int, start: int = 0,
                 size: tuple[int, int] = (500, 375)) -> pd.DataFrame:
    """n generated JPEGs in CLASSES folders, as a manifest with every image in train."""
    jobs = []
    for i in range(start, start + n):
        path = folder / f"c{i % CLASSES}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        jobs.append((str(path), i, *size))
    with Pool(workers) as pool:
        done = pool.map(make_jpeg, jobs, chunksize=32)
    return pd.DataFrame({"path": [p for p, _ in done], "sha256": [s for _, s in done],
                         "class": [f"c{i % CLASSES}" for i in range(start, start + n)],
                         "label": [i % CLASSES for i in range(start, start + n)],
                         "split": "train"})


def write_params(folder: Path, overrides: dict[str, Any]) -> None:
    """params.yaml in folder: the shipped defaults, and overrides by section
    ({"preprocess": {"image_size": 64}}) or top-level key ({"lr": 0.1})."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in overrides.items():
        if isinstance(value, dict):
            params[key].update(value)
        else:
            params[key] = value
    (folder / "params.yaml").write_text(yaml.safe_dump(params))


def run_stage(folder: Path, stage: str) -> float:
    """`python -m stages.<stage>` in folder, its output in folder/logs/; returns its seconds.
    It fails with the log's last lines."""
    # The caller's PYTHONPATH stays: on a device machine it holds the carried wheels.
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT")}
    log = folder / "logs" / f"{stage}.log"
    log.parent.mkdir(exist_ok=True)
    started = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=folder,
                              env=env | {"PYTHONPATH": path}, stdout=out, stderr=out)
    if done.returncode:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        sys.exit(f"stage {stage} failed in {folder} (exit {done.returncode}); {log} ends:\n{tail}")
    return time.perf_counter() - started


def run_stages(folder: Path, stages: tuple[str, ...],
               overrides: dict[str, Any]) -> None:
    """Run the real stages in folder (data/raw already there) with overrides (write_params)."""
    write_params(folder, overrides)
    for stage in stages:
        run_stage(folder, stage)


def train_rows(folder: Path) -> pd.DataFrame:
    """The train split of the manifest the index stage wrote in folder."""
    manifest = pd.read_csv(folder / "data/manifest.csv", keep_default_na=False)
    return manifest[manifest["split"] == "train"]


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


# ---------------------------------------------------------------- the classic loop

class ClassicDataset(torch.utils.data.Dataset):
    """The textbook Dataset: open, decode and transform one image file per __getitem__."""

    def __init__(self, paths: list[Path], labels: list[int], transform: Any):
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[i]) as img:
            x = self.transform(img.convert("RGB"))
        return x, self.labels[i]


def classic_loader(folder: Path, rows: pd.DataFrame, meta: dict[str, Any], batch: int,
                   workers: int, device: torch.device, translate: int
                   ) -> torch.utils.data.DataLoader:
    """DataLoader over the image files with PIL/torchvision transforms, as most tutorials write it.

    It decodes, resizes, shifts (reflect-padded, as our augment) and normalises
    every image again in every epoch.
    """
    from torchvision import transforms as T

    size = meta["image_size"]
    steps = [T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC)]
    if translate:
        steps.append(T.RandomCrop(size, padding=translate, padding_mode="reflect"))
    transform = T.Compose([*steps, T.ToTensor(), T.Normalize(meta["mean"], meta["std"])])
    dataset = ClassicDataset([folder / p for p in rows["path"]], rows["label"].tolist(),
                             transform)
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True,
                                       num_workers=workers, pin_memory=device.type == "cuda",
                                       persistent_workers=workers > 0)


def classic_epoch(model: nn.Module, loader: Any, optimizer: torch.optim.Optimizer,
                  device: torch.device) -> tuple[float, float]:
    """The tutorial loop (fp32, no autocast); returns (seconds, share of time waiting for data)."""
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    waited, started = 0.0, time.perf_counter()
    batches = iter(loader)
    for _ in range(len(loader)):
        ready = time.perf_counter()
        x, y = next(batches)
        waited += time.perf_counter() - ready
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        loss.item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return seconds, waited / seconds


# ---------------------------------------------------------------- our loop

def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """The same SGD for every loop measured."""
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)


def make_step(model_name: str, meta: dict[str, Any], device: torch.device, translate: int
              ) -> ours.Step:
    """The train stage's Step (autocast, channels_last, on-device augmentation), minus MLflow."""
    torch.manual_seed(0)
    model = create_model(model_name, len(meta["classes"])).to(device)
    optimizer = make_optimizer(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(device) == torch.float16)
    return ours.Step(model, optimizer, scheduler, scaler, nn.CrossEntropyLoss(), device, meta,
                     Train(translate=translate))


def stage_epoch(step: ours.Step, loader: Any, sampler: Any, epoch: int) -> ours.EpochStats:
    """One epoch of the stage's own train_epoch, reshuffled as the stage does (sampler epoch)."""
    if sampler is not None:
        sampler.set_epoch(epoch)
    stats = ours.train_epoch(step, loader, 0, None, 10 ** 9, desc=f"epoch {epoch}")
    if step.device.type == "cuda":
        torch.cuda.synchronize()
    return stats
