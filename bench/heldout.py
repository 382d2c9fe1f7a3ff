"""Issue #23's goal, checked on any labelled tree the way a user reaches it.

    python bench/heldout.py --tree DIR [--size 224] [--epochs N]

The goal: a user sets only train.model, train.pretrained (a converted weights file) and
preprocess.image_size and runs `dvc exp run`; the held-out accuracy is then at least that of
a frozen linear probe of the same weights on the same images, and at least 0.80, and the
whole run takes under 15 minutes on 2 CPU cores (about 800 images).

This makes that user's repository in a temp folder (tests/conftest.py's make_repo: the
project files and git, params.yaml as it ships), copies DIR into data/raw and the ImageNet
weights of EfficientNet-Lite0 (bench/weights.py) into weights/, `dvc add`s both, commits,
and times one run of all four stages:
    dvc exp run -S train.model=tf_efficientnet_lite0 \\
        -S train.pretrained=weights/tf_efficientnet_lite0.pth -S preprocess.image_size=224
(--epochs adds -S train.epochs=N, for a quick try). Then bench/transfer.py's probe is fitted
on the run's own tensors and scored on the same held-out split (test, else val). Printed:
the run and the probe (accuracy, macro F1, seconds), the split sizes, the train stage's
epochs and the one it kept, and the goal lines. Nothing is downloaded (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.shared import cpu_model  # noqa: E402
from bench.transfer import held_out, probe_row  # noqa: E402
from bench.weights import ARCH, convert, save  # noqa: E402
from tests.conftest import BIN, dvc, env, git, make_repo  # noqa: E402

WEIGHTS = f"weights/{ARCH}.pth"
GOAL_ACCURACY = 0.80
GOAL_SECONDS = 15 * 60


def user_repo(folder: Path, tree: Path) -> Path:
    """A clone with the tree in data/raw and the weights in weights/, both dvc-added; the repo."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    repo = make_repo(folder, images=None, params=params)  # params.yaml's values, not the tests'
    shutil.copytree(tree, repo / "data/raw")
    save(convert(), repo / WEIGHTS)
    dvc(repo, "add", "-q", "data/raw")
    dvc(repo, "add", "-q", WEIGHTS)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "my photos and weights")
    return repo


def exp_run(repo: Path, size: int, epochs: int | None) -> float:
    """Time one `dvc exp run` with the user's three keys, its output shown as it goes."""
    keys = [f"train.model={ARCH}", f"train.pretrained={WEIGHTS}", f"preprocess.image_size={size}"]
    keys += [f"train.epochs={epochs}"] if epochs else []
    args = [arg for key in keys for arg in ("-S", key)]
    print("$ dvc exp run " + " ".join(args), flush=True)
    started = time.perf_counter()
    subprocess.run([str(BIN / "dvc"), "exp", "run", *args], cwd=repo, check=True,
                   env=env(HF_HUB_OFFLINE="1"))
    return time.perf_counter() - started


def run_row(repo: Path, seconds: float) -> dict:
    """The run's held-out scores, as the evaluate stage wrote them."""
    scores = json.loads((repo / "metrics/eval.json").read_text())
    return {"variant": "dvc exp run", "accuracy": scores["accuracy"],
            "macro_f1": scores["macro_f1"], "seconds": seconds}


def show_data(repo: Path) -> None:
    """The split sizes, and the files the index left out or passed over."""
    index = json.loads((repo / "metrics/index.json").read_text())
    counts = ", ".join(f"{index[s]} {s}" for s in ("train", "val", "test"))
    print(f"images: {counts} in {index['classes']} classes; scored on {held_out(repo)}; "
          f"rejected {index['rejects_by_reason']}; skipped {index['skipped_by_reason']}")


def show_epochs(repo: Path) -> None:
    """The train stage's epochs (0: the head fitted on frozen features) and the one it kept."""
    kept = json.loads((repo / "metrics/train.json").read_text())["best_epoch"]
    epochs = pd.read_csv(repo / "metrics/epochs.csv")
    print(f"\ntrain kept epoch {kept} (lowest val loss); per epoch:")
    print(f"{'epoch':>5} {'val loss':>9} {'val acc':>8} {'seconds':>8}")
    for row in epochs.itertuples():
        mark = "  <- kept" if row.epoch == kept else ""
        print(f"{row.epoch:>5} {row.val_loss:>9.4f} {row.val_acc:>8.4f} "
              f"{row.epoch_seconds:>8.1f}{mark}")


def show_goal(run: dict, probe: dict) -> None:
    """The two rows and the goal's three lines, each passed or failed."""
    print(f"\n{'variant':<12} {'accuracy':>9} {'macro F1':>9} {'seconds':>8}")
    for row in (run, probe):
        print(f"{row['variant']:<12} {row['accuracy']:>9.4f} {row['macro_f1']:>9.4f} "
              f"{row['seconds']:>8.0f}")
    goals = [(f"run accuracy >= probe ({probe['accuracy']:.4f})",
              run["accuracy"] >= probe["accuracy"]),
             (f"run accuracy >= {GOAL_ACCURACY}", run["accuracy"] >= GOAL_ACCURACY),
             (f"run wall time < {GOAL_SECONDS} s", run["seconds"] < GOAL_SECONDS)]
    print()
    for goal, met in goals:
        print(f"{'pass' if met else 'FAIL'}  {goal}")


def main() -> None:
    """Make the repo, run the experiment, fit the probe, print what the goal asks."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, required=True, help="class folders of images")
    parser.add_argument("--size", type=int, default=224, help="preprocess.image_size")
    parser.add_argument("--epochs", type=int, help="train.epochs (default: params.yaml's)")
    args = parser.parse_args()
    if not args.tree.is_dir():
        sys.exit(f"error: {args.tree} is not a folder")
    os.environ["HF_HUB_OFFLINE"] = "1"

    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"load average {os.getloadavg()[0]:.2f} at the start")
    with tempfile.TemporaryDirectory() as tmp:
        repo = user_repo(Path(tmp) / "repo", args.tree)
        seconds = exp_run(repo, args.size, args.epochs)
        print(f"load average {os.getloadavg()[0]:.2f} at the end of the run\n")
        show_data(repo)
        run = run_row(repo, seconds)
        probe = probe_row(repo, repo / WEIGHTS, time.perf_counter())
        show_epochs(repo)
    show_goal(run, probe)


if __name__ == "__main__":
    main()
