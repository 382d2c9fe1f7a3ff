"""End to end: the four stages through the real `dvc` CLI, tracked in a real MLflow store."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
from conftest import dvc, dvc_on_screen, git, make_repo, mlflow_runs, set_params

STAGES = ["index", "preprocess", "train", "evaluate"]


def stages_run(output: str) -> list[str]:
    """The stages a `dvc repro` / `dvc exp run` actually executed, in order."""
    return re.findall(r"Running stage '([^']+)'", output)


def test_fresh_repro_builds_everything(built_repo):
    for out in ["data/manifest.csv", "data/rejects.csv", "data/tensors/meta.json",
                "models/model.pt", "metrics/train.json", "metrics/train_details.json",
                "metrics/eval.json", "metrics/eval_details.json", "metrics/epochs.csv",
                "metrics/confusion.csv"]:
        assert (built_repo / out).exists(), out
    manifest = pd.read_csv(built_repo / "data/manifest.csv")
    assert len(manifest) == 200
    assert list(manifest.columns[:8]) == ["path", "class", "label", "sha256", "bytes",
                                         "width", "height", "split"]
    assert set(manifest["split"]) == {"train", "val", "test"}
    # Labels follow the sorted class-folder names, like torchvision's ImageFolder.
    classes = sorted(manifest["class"].unique())
    assert (manifest["label"] == manifest["class"].map(classes.index)).all()
    result = json.loads((built_repo / "metrics/eval.json").read_text())
    assert list(result) == ["accuracy", "macro_f1", "top3_accuracy", "loss"]  # the headline
    details = json.loads((built_repo / "metrics/eval_details.json").read_text())
    assert details["images"] == (manifest["split"] == "test").sum()  # the held-out split
    assert {"weighted_f1", "per_class"} <= details.keys()
    trained = json.loads((built_repo / "metrics/train.json").read_text())
    assert list(trained) == ["best_epoch", "epochs", "val_loss", "val_acc"]
    details = json.loads((built_repo / "metrics/train_details.json").read_text())
    assert {"train_loss", "seconds", "device", "mlflow_run_id"} <= details.keys()
    epochs = pd.read_csv(built_repo / "metrics/epochs.csv")
    assert {"train_loss", "val_loss", "train_acc", "val_acc"} <= set(epochs.columns)


def test_a_train_valid_test_tree_is_read_as_given_and_scored_on_its_test_folder(tmp_path):
    from stages.sample import NAMES, write_digits

    repo = make_repo(tmp_path / "repo", images=None)
    write_digits(tmp_path / "digits", limit=200)
    folders = {"train": "train", "valid": "val", "test": "test"}
    for i, image in enumerate(sorted((tmp_path / "digits").rglob("*.png"))):
        folder = ["train", "train", "train", "valid", "test"][i % 5]
        target = repo / "data/raw" / folder / image.parent.name / image.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(image, target)
    dvc(repo, "add", "-q", "data/raw")
    out = dvc(repo, "repro").stdout
    assert ("read split folders (data/raw/<split>/<class>/<image>): train from data/raw/train/, "
            "val from data/raw/valid/, test from data/raw/test/") in out

    manifest = pd.read_csv(repo / "data/manifest.csv", keep_default_na=False)
    assert sorted(manifest["class"].unique()) == sorted(NAMES)
    assert (manifest["split"] == manifest["path"].map(lambda p: folders[Path(p).parts[2]])).all()
    test = manifest[manifest["split"] == "test"]
    assert len(test) == len(list((repo / "data/raw/test").rglob("*.png"))) == 40
    details = json.loads((repo / "metrics/eval_details.json").read_text())
    assert details["split"] == "test" and details["images"] == 40
    confusion = pd.read_csv(repo / "metrics/confusion.csv", keep_default_na=False)
    assert list(confusion["actual"]) == list(test["class"])
    assert re.search(r"^test accuracy [\d.]+, .* on 40 images$", out, re.MULTILINE), out


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
    assert stages == {"pipeline", "index", "preprocess", "train"}


def top_level_runs(repo) -> list:
    """The rows of MLflow's runs list: runs that are no other run's child."""
    return [r for r in mlflow_runs(repo) if "mlflow.parentRunId" not in r.data.tags]


def test_experiments_compare_at_a_glance_in_dvc_and_mlflow(clone_built):
    repo = clone_built()
    out = dvc(repo, "exp", "run", "-S", "lr=0.01").stdout
    assert stages_run(out) == ["train", "evaluate"]

    # Only the headline numbers are columns, the evaluation's first.
    (baseline,) = json.loads(dvc(repo, "exp", "show", "--json").stdout)[1:]
    (exp,) = baseline["experiments"]
    assert list(exp["revs"][0]["data"]["metrics"]) == ["metrics/eval.json", "metrics/train.json"]
    header = dvc(repo, "exp", "show", "--md").stdout.splitlines()[0]
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[:10] == ["Experiment", "Created", "accuracy", "macro_f1", "top3_accuracy",
                            "loss", "best_epoch", "epochs", "val_loss", "val_acc"]
    # A 120-column terminal shows both rows' names, lr, accuracy and macro F1 in full.
    table = dvc(repo, "exp", "show", "--only-changed", COLUMNS="120").stdout
    rows = {"main": baseline["data"], exp["name"]: exp["revs"][0]["data"]}
    for name, data in rows.items():
        line = next(x for x in table.splitlines() if name in x)
        scores = data["metrics"]["metrics/eval.json"]["data"]
        shown = re.split(r"\s+", line.replace("[", " ").replace("]", " "))
        for value in (data["params"]["params.yaml"]["data"]["lr"], scores["accuracy"],
                      scores["macro_f1"]):
            assert f"{value:.5g}" in shown, (name, value, table)
    assert {"lr", "accuracy", "macro_f1"} <= set(table.split())
    # Plain `dvc exp show` in that terminal: DVC pages the whole table (every param and
    # dependency too), and its first screen holds the names and the evaluation in full.
    screen = dvc_on_screen(repo, "exp", "show", columns=120)
    assert {"Experiment", "accuracy", "macro_f1", "loss"} <= set(" ".join(screen).split())
    for name, data in rows.items():
        line = next(x for x in screen if name in x)
        scores = data["metrics"]["metrics/eval.json"]["data"]
        shown = re.split(r"\s+", line.replace("[", " ").replace("]", " "))
        for value in (scores["accuracy"], scores["macro_f1"]):
            assert f"{value:.5g}" in shown, (name, value, "\n".join(screen))

    # MLflow: one row per pipeline execution, holding the params and the headline.
    dvc(repo, "exp", "run", "-S", "lr=0.2")
    names = set(dvc(repo, "exp", "list", "--name-only").stdout.split())
    top = top_level_runs(repo)
    assert {r.data.tags["imgpipe.stage"] for r in top} == {"pipeline"}
    by_exp = {r.data.tags.get("dvc.experiment"): r for r in top}
    assert set(by_exp) == names | {None} and len(top) == 3  # the built repo's repro + 2
    children = {}
    for run in mlflow_runs(repo):
        children.setdefault(run.data.tags.get("mlflow.parentRunId"), []).append(run)
    for name, parent in by_exp.items():
        assert parent.info.status == "FINISHED"
        assert {"lr", "train.epochs", "preprocess.image_size"} <= parent.data.params.keys()
        assert set(parent.data.metrics) == {"eval_accuracy", "eval_macro_f1", "eval_loss",
                                            "eval_top3_accuracy"}
        stages = {r.data.tags["imgpipe.stage"]: r for r in children[parent.info.run_id]}
        assert set(stages) == ({"train"} if name else {"index", "preprocess", "train"})
        train = stages["train"]
        assert train.data.params["lr"] == parent.data.params["lr"]
        assert train.data.metrics["eval_accuracy"] == parent.data.metrics["eval_accuracy"]
    assert sorted(r.data.params["lr"] for r in top) == ["0.01", "0.1", "0.2"]


def test_evaluate_only_experiment_leaves_the_earlier_training_run_as_it_was(clone_built):
    repo = clone_built()
    (trained,) = [r for r in mlflow_runs(repo) if r.data.tags["imgpipe.stage"] == "train"]
    out = dvc(repo, "exp", "run", "-S", "evaluate.top_k=2").stdout
    assert stages_run(out) == ["evaluate"]
    assert f"trained by MLflow run {trained.info.run_id} (an earlier execution)" in out
    (name,) = dvc(repo, "exp", "list", "--name-only").stdout.split()

    runs = {r.info.run_id: r for r in mlflow_runs(repo)}
    # The built repo's training run still holds its own evaluation, and only that.
    before = runs[trained.info.run_id]
    assert before.data.metrics == trained.data.metrics
    assert "eval_top2_accuracy" not in before.data.metrics
    # The experiment's row has its own evaluate run, which names the model's training run.
    (parent,) = [r for r in runs.values() if r.data.tags.get("dvc.experiment") == name
                 and r.data.tags["imgpipe.stage"] == "pipeline"]
    (evaluated,) = [r for r in runs.values()
                    if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert evaluated.data.tags["imgpipe.stage"] == "evaluate"
    assert evaluated.data.tags["imgpipe.model_run"] == trained.info.run_id
    scores = json.loads((repo / "metrics/eval.json").read_text())
    assert evaluated.data.metrics["eval_top2_accuracy"] == scores["top2_accuracy"]
    assert parent.data.metrics["eval_top2_accuracy"] == scores["top2_accuracy"]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    assert {"plots", "evaluation"} <= {f.path for f in client.list_artifacts(
        evaluated.info.run_id)}
    # Each run holds the servable model of its own evaluation.
    models = client.search_logged_models([parent.info.experiment_id])
    assert sorted(m.source_run_id for m in models) == sorted(
        [trained.info.run_id, evaluated.info.run_id])


def test_evaluate_in_another_store_names_the_training_run_it_lacks(clone_built):
    repo = clone_built()
    (trained,) = [r for r in mlflow_runs(repo) if r.data.tags["imgpipe.stage"] == "train"]
    other = f"sqlite:///{repo / 'other.db'}"
    out = dvc(repo, "repro", "-f", "-s", "evaluate", MLFLOW_TRACKING_URI=other).stdout
    assert f"trained by MLflow run {trained.info.run_id} (not in {other})" in out

    (evaluated,) = [r for r in mlflow_runs(repo, uri=other)
                    if r.data.tags["imgpipe.stage"] == "evaluate"]
    assert evaluated.info.status == "FINISHED"
    assert evaluated.data.tags["imgpipe.model_run"] == trained.info.run_id
    scores = json.loads((repo / "metrics/eval.json").read_text())
    assert evaluated.data.metrics["eval_accuracy"] == scores["accuracy"]
    assert "mlflow.parentRunId" in evaluated.data.tags
