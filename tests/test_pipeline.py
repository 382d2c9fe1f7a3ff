"""End to end: the four stages through the real `dvc` CLI, tracked in a real MLflow store."""

from __future__ import annotations

import json
import re

import pandas as pd
from conftest import dvc, git, mlflow_runs, set_params

STAGES = ["index", "preprocess", "train", "evaluate"]


def stages_run(output: str) -> list[str]:
    """The stages a `dvc repro` / `dvc exp run` actually executed, in order."""
    return re.findall(r"Running stage '([^']+)'", output)


def test_fresh_repro_builds_everything(built_repo):
    for out in ["data/manifest.csv", "data/rejects.csv", "data/tensors/meta.json",
                "models/model.pt", "metrics/train.json", "metrics/eval.json",
                "metrics/epochs.csv", "metrics/confusion.csv"]:
        assert (built_repo / out).exists(), out
    manifest = pd.read_csv(built_repo / "data/manifest.csv")
    assert len(manifest) == 200
    assert list(manifest.columns[:8]) == ["path", "class", "label", "sha256", "bytes",
                                         "width", "height", "split"]
    assert set(manifest["split"]) == {"train", "val"}
    # Labels follow the sorted class-folder names, like torchvision's ImageFolder.
    classes = sorted(manifest["class"].unique())
    assert (manifest["label"] == manifest["class"].map(classes.index)).all()
    result = json.loads((built_repo / "metrics/eval.json").read_text())
    assert result["images"] == (manifest["split"] == "val").sum()
    assert {"accuracy", "macro_f1", "loss", "per_class"} <= result.keys()
    epochs = pd.read_csv(built_repo / "metrics/epochs.csv")
    assert {"train_loss", "val_loss", "train_acc", "val_acc"} <= set(epochs.columns)


def test_second_repro_runs_nothing(clone_built):
    repo = clone_built()
    assert stages_run(dvc(repo, "repro").stdout) == []


def test_changing_lr_reruns_only_train_and_evaluate(clone_built):
    repo = clone_built()
    set_params(repo, lr=0.01)
    assert stages_run(dvc(repo, "repro").stdout) == ["train", "evaluate"]


def test_changing_image_size_reruns_from_preprocess(clone_built):
    repo = clone_built()
    set_params(repo, preprocess={"image_size": 10})
    assert stages_run(dvc(repo, "repro").stdout) == ["preprocess", "train", "evaluate"]


def test_adding_images_reruns_from_index_and_keeps_old_splits(clone_built):
    from stages.sample import write_digits

    repo = clone_built()
    before = pd.read_csv(repo / "data/manifest.csv").set_index("sha256")["split"]
    write_digits(repo / "data/raw", limit=260)  # the first 200 again, plus 60 new ones
    assert stages_run(dvc(repo, "repro").stdout) == STAGES
    after = pd.read_csv(repo / "data/manifest.csv").set_index("sha256")["split"]
    assert len(after) == 260
    assert after[before.index].equals(before)
    # `dvc repro` re-saved the tracked data folder by itself.
    assert "data/raw.dvc" in git(repo, "status", "--porcelain")


def test_metrics_and_plots_commands_work(clone_built):
    repo = clone_built()
    shown = dvc(repo, "metrics", "show").stdout
    assert "metrics/eval.json" in shown and "accuracy" in shown
    set_params(repo, lr=0.2)
    dvc(repo, "repro")
    diff = dvc(repo, "metrics", "diff").stdout
    assert "accuracy" in diff
    plots = dvc(repo, "plots", "show", "-o", "plots_out").stdout
    page = (repo / "plots_out" / "index.html").read_text()
    assert "plots_out" in plots and "Confusion matrix" in page and "Loss per epoch" in page


def test_evaluate_logs_into_the_training_run(built_repo):
    runs = mlflow_runs(built_repo)
    train_runs = [r for r in runs if r.data.tags.get("imgpipe.stage") == "train"]
    assert len(train_runs) == 1
    run = train_runs[0]
    # One row holds both the training curves and the held-out metrics.
    assert {"train_loss", "val_loss", "eval_accuracy", "eval_macro_f1"} <= run.data.metrics.keys()
    assert run.data.params["lr"] == "0.1"
    assert len(run.data.tags["data.version"]) == 12
    assert run.data.tags["git.commit"] == git(built_repo, "rev-parse", "HEAD~1").strip()
    model_run = __import__("torch").load(built_repo / "models/model.pt", weights_only=True)
    assert model_run["run_id"] == run.info.run_id
    stages = {r.data.tags.get("imgpipe.stage") for r in runs}
    assert stages == {"index", "preprocess", "train"}


def test_exp_run_logs_lr_and_experiment_name(clone_built):
    repo = clone_built()
    before = {r.info.run_id for r in mlflow_runs(repo)}
    out = dvc(repo, "exp", "run", "-S", "lr=0.05").stdout
    assert stages_run(out) == ["train", "evaluate"]
    new = [r for r in mlflow_runs(repo) if r.info.run_id not in before]
    assert len(new) == 1
    run = new[0]
    assert run.data.params["lr"] == "0.05"
    names = dvc(repo, "exp", "list", "--name-only").stdout.split()
    assert run.data.tags["dvc.experiment"] in names
    assert "eval_accuracy" in run.data.metrics
