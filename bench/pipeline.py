"""The four stages as `dvc repro` runs them, fine-tuning a pretrained model on a GPU: the
train stage's speed on the device, and the served model loaded there.

    python bench/pipeline.py                           # GPU: resnet50, 224 px, 12,000 JPEGs
    python bench/pipeline.py --raw /tmp/gpu/data/raw   # the JPEGs bench/gpu.py --dir left
    python bench/pipeline.py --model resnet18 --size 64 --images 600 --epochs 1   # CPU

The weights are --model's own architecture with its ImageNet head, randomly initialised and
saved as a local `train.pretrained` file: no hub is in reach, and their values do not change
the cost. So the train stage runs the fine-tuning recipe (stages/finetune.py): the new head
fitted on the frozen backbone's features (epoch 0), then the whole net.

In a work folder it runs index, preprocess, train and evaluate with `python -m stages.<name>`
(DVC is not needed): params.yaml's defaults, plus train.model, train.pretrained,
preprocess.image_size, train.epochs and train.batch_size. Then:
- served: the model the evaluate stage logged, loaded by `mlflow.pyfunc.load_model` with
  model_config's device set to this one, is sent --served held-out image files as bytes; its
  classes and probabilities are compared with `python -m stages.predict` (imgpipe-predict)
  on the same files;
- streamed: train runs again with `train.data_on_device: false`, the shards read by
  `train.workers: auto` DataLoader workers, and is compared with the first run, whose data
  `data_on_device: auto` held on the device where it fit.

Printed: each stage's seconds; per train run, the head phase's seconds, the last epoch's
img/s and data wait, and the epoch it kept; the served check. Compare the img/s with the
ceiling row of `python bench/gpu.py --model <the same> --sizes <the same>` on the same
machine (bench/device.sh runs both).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from shared import (  # bench/shared.py also puts the repository root on sys.path
    ROOT,
    make_dataset,
    run_stage,
    write_params,
)

from stages.common import machine_cores
from stages.models import create_model, pick_device

JPEG_SIZE = (320, 240)  # as bench/gpu.py
TRAIN_LOG = Path("metrics/epochs.csv")
DETAILS = Path("metrics/train_details.json")
HEADLINE = Path("metrics/train.json")


def synthetic_weights(model: str, path: Path) -> Path:
    """model's architecture with a 1000-class head, randomly initialised, saved at path."""
    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(create_model(model, 1000).state_dict(), path)
    return path


def train_row(work: Path, name: str, seconds: float) -> dict[str, Any]:
    """What one train run did, from the files the stage wrote."""
    epochs = pd.read_csv(work / TRAIN_LOG)
    details = json.loads((work / DETAILS).read_text())
    head, last = epochs[epochs["epoch"] == 0], epochs.iloc[-1]
    kept = json.loads((work / HEADLINE).read_text())["best_epoch"]
    log = (work / "logs/train.log").read_text(errors="replace").splitlines()
    return {"run": name, "device": details["device"], "stage_s": seconds,
            "head_s": float(head["epoch_seconds"].iloc[0]) if len(head) else float("nan"),
            "epochs": int(last["epoch"]), "img_s": float(last["images_per_second"]),
            "data_wait": float(last["data_wait"]), "kept": kept,
            "start": next((line for line in log if line.startswith("starting:")), "")}


def held_out_files(work: Path, count: int) -> list[Path]:
    """The first count files of the test split (else val), as the manifest lists them."""
    manifest = pd.read_csv(work / "data/manifest.csv", keep_default_na=False)
    split = "test" if (manifest["split"] == "test").any() else "val"
    return [work / p for p in manifest[manifest["split"] == split]["path"].head(count)]


def served_check(work: Path, files: list[Path], device: torch.device) -> dict[str, Any]:
    """The logged model on the device against `python -m stages.predict`, same files."""
    import mlflow

    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    run_id = torch.load(work / "models/model.pt", weights_only=True)["run_id"]
    started = time.perf_counter()
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model",
                                     model_config={"device": device.type})
    loaded = time.perf_counter() - started
    on = model.unwrap_python_model().device
    started = time.perf_counter()
    served = model.predict(pd.DataFrame(
        {"image": [base64.b64encode(f.read_bytes()).decode() for f in files]}))
    answered = time.perf_counter() - started

    table = work / "predictions.csv"
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "stages.predict", *map(str, files), "--csv",
                           str(table)], cwd=work, env=os.environ | {"PYTHONPATH": path},
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"imgpipe-predict failed: {done.stderr[-2000:]}")
    predicted = time.perf_counter() - started
    cli = pd.read_csv(table, keep_default_na=False)
    same = int((np.asarray(served["class"]) == cli["predicted"].to_numpy()).sum())
    gap = np.abs(served["probability"].astype(float).to_numpy()
                 - cli["probability"].astype(float).to_numpy()).max()
    return {"device": str(on), "load_s": loaded, "predict_s": answered, "cli_s": predicted,
            "same": same, "images": len(files), "max_gap": float(gap),
            "errors": int((served["error"] != "").sum())}


def main() -> None:
    """Run the stages, print the two train runs and the served check."""
    device = pick_device()
    cuda = device.type == "cuda"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--raw", type=Path, help="a class-folder tree of images to use "
                        "(default: generate --images JPEGs)")
    parser.add_argument("--images", type=int, default=12000 if cuda else 600)
    parser.add_argument("--model", default="resnet50" if cuda else "resnet18")
    parser.add_argument("--size", type=int, default=224 if cuda else 64)
    parser.add_argument("--batch", type=int, default=256 if cuda else 64)
    parser.add_argument("--epochs", type=int, default=3 if cuda else 1)
    parser.add_argument("--served", type=int, default=64, help="held-out images to serve")
    parser.add_argument("--dir", type=Path, help="work folder (default: a temporary one)")
    args = parser.parse_args()

    name = torch.cuda.get_device_name(device) if cuda else "no GPU"
    print(f"{device} ({name}), {machine_cores()} cores, torch {torch.__version__}; "
          f"{args.model} at {args.size} px, batch {args.batch}, {args.epochs} epochs", flush=True)
    with tempfile.TemporaryDirectory(prefix="imgpipe-bench-pipeline-") as tmp:
        work = args.dir or Path(tmp)
        (work / "data").mkdir(parents=True, exist_ok=True)
        if args.raw:
            (work / "data/raw").symlink_to(args.raw.resolve(), target_is_directory=True)
        else:
            make_dataset(work / "data/raw", args.images, machine_cores(), size=JPEG_SIZE)
        weights = synthetic_weights(args.model, work / f"weights/{args.model}.pth")
        train = {"model": args.model, "pretrained": str(weights.relative_to(work)),
                 "epochs": args.epochs, "batch_size": args.batch}
        write_params(work, {"preprocess": {"image_size": args.size}, "train": train})
        seconds = {stage: run_stage(work, stage)
                   for stage in ("index", "preprocess", "train", "evaluate")}
        print("stages: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()), flush=True)
        rows = [train_row(work, "data_on_device: auto", seconds["train"])]
        served = served_check(work, held_out_files(work, args.served), device)

        write_params(work, {"preprocess": {"image_size": args.size},
                            "train": train | {"data_on_device": False}})
        streamed = run_stage(work, "train")
        rows.append(train_row(work, "data_on_device: false, workers: auto", streamed))

    print(f"\n{'train run':<38} {'device':>6} {'stage s':>8} {'head s':>7} {'img/s':>8} "
          f"{'data wait':>10} {'kept':>5}")
    for r in rows:
        print(f"{r['run']:<38} {r['device']:>6} {r['stage_s']:>8.1f} {r['head_s']:>7.1f} "
              f"{r['img_s']:>8.0f} {r['data_wait']:>10.1%} {r['kept']:>5}")
    for r in rows:
        print(r["start"])
    print(f"\nserved model: loaded on {served['device']} in {served['load_s']:.1f} s; "
          f"{served['images']} images in {served['predict_s']:.2f} s in process, "
          f"imgpipe-predict {served['cli_s']:.1f} s; same class for {served['same']} of "
          f"{served['images']}, largest probability gap {served['max_gap']:.2e}, "
          f"{served['errors']} errors")


if __name__ == "__main__":
    main()
