"""stages/reproduce.py: rebuild an MLflow run by its id, in a real git + DVC repo and store."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import (
    FAST_PARAMS,
    copy_repo,
    dvc,
    git,
    mlflow_runs,
    one_line_error,
    run,
    set_params,
)

from stages import reproduce
from stages.reproduce import Row

LR = 0.02  # the experiment's lr: not conftest.FAST_PARAMS's
OTHER_LR = 0.3  # the change committed after the experiment
EXPERIMENT = "lr-small"
assert FAST_PARAMS["lr"] not in (LR, OTHER_LR)


def reproduce_cli(repo: Path, run_id: str) -> subprocess.CompletedProcess:
    """`python -m stages.reproduce RUN_ID` in repo, the way a user runs it."""
    return run([sys.executable, "-m", "stages.reproduce", run_id], repo, check=False)


def train_runs(repo: Path) -> list:
    """The repo's imgpipe train runs, newest first."""
    return [r for r in mlflow_runs(repo) if r.data.tags.get("imgpipe.stage") == "train"]


@pytest.fixture(scope="module")
def experimented(built_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The built pipeline, then `dvc exp run -S lr=LR`, then another lr committed on top.

    Returns the repo (clean workspace: error tests share it and leave it so) and the id of
    the experiment's MLflow train run.
    """
    repo = copy_repo(built_repo, tmp_path_factory.mktemp("experimented"))
    dvc(repo, "exp", "run", "-n", EXPERIMENT, "-S", f"lr={LR}")
    exp_runs = [r for r in train_runs(repo) if r.data.tags.get("dvc.experiment") == EXPERIMENT]
    assert len(exp_runs) == 1
    set_params(repo, lr=OTHER_LR)
    git(repo, "commit", "-qam", f"lr {OTHER_LR}")
    assert not git(repo, "status", "--porcelain", "--untracked-files=no")
    return repo, exp_runs[0].info.run_id


def test_reproduce_rebuilds_an_experiment_with_the_same_metrics(experimented, tmp_path):
    repo, run_id = copy_repo(experimented[0], tmp_path), experimented[1]
    proc = reproduce_cli(repo, run_id)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    # The workspace holds the experiment's params again, not the later commit's.
    assert yaml.safe_load((repo / "params.yaml").read_text())["lr"] == LR
    # The rebuild is a new run, tagged with the run it reproduces, with the same numbers.
    original = next(r for r in mlflow_runs(repo) if r.info.run_id == run_id)
    rebuilt = [r for r in train_runs(repo) if r.data.tags.get("imgpipe.reproduces") == run_id]
    assert len(rebuilt) == 1 and rebuilt[0].info.run_id != run_id
    assert rebuilt[0].data.params["lr"] == str(LR)
    # From the experiment's baseline commit, which is not HEAD (a later commit) here.
    assert rebuilt[0].data.tags["git.commit"] == original.data.tags["git.commit"]
    assert original.data.tags["git.commit"] != git(repo, "rev-parse", "HEAD").strip()
    compared = reproduce.compared_metrics(original.data.metrics)
    assert {"best_epoch", "best_val_loss", "eval_accuracy", "eval_macro_f1"} <= set(compared)
    assert not any(m in compared for m in ("images_per_second", "epoch_seconds", "data_wait"))
    for name in compared:
        assert rebuilt[0].data.metrics[name] == original.data.metrics[name], name
    assert rebuilt[0].data.tags["data.version"] == original.data.tags["data.version"]

    # The printed table: every compared value, each one equal, compared exactly (CPU).
    out = proc.stdout
    assert "compared exactly" in out
    header = out.index("metric  ")
    table = out[header:].splitlines()[1:]
    rows = {line.split()[0]: line.split() for line in table if line.startswith(("best_", "eval_",
                                                                                "data."))}
    headline = [m for m in compared if "." not in m]
    assert set(rows) == {"data.version", *headline}
    for name in headline:
        assert rows[name][-1] == "yes"
        assert float(rows[name][1]) == original.data.metrics[name]
    assert f"all {len(compared) + 1} values equal" in out
    # The rebuild scored the same held-out images: the test split of the restored history.
    manifest = pd.read_csv(repo / "data/manifest.csv", keep_default_na=False)
    assert float(rows["eval_images"][2]) == (manifest["split"] == "test").sum() > 0


def test_reproduce_rebuilds_a_commit_outside_experiments(experimented, tmp_path):
    repo = copy_repo(experimented[0], tmp_path)
    first = train_runs(repo)[-1]  # the built repo's own `dvc repro`, before any experiment
    commit = first.data.tags["git.commit"]
    assert "dvc.experiment" not in first.data.tags
    proc = reproduce_cli(repo, first.info.run_id)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    # The run's commit is checked out (detached), with its params and data.
    assert git(repo, "rev-parse", "HEAD").strip() == commit
    assert yaml.safe_load((repo / "params.yaml").read_text())["lr"] == FAST_PARAMS["lr"]
    (rebuilt,) = [r for r in train_runs(repo)
                  if r.data.tags.get("imgpipe.reproduces") == first.info.run_id]
    assert rebuilt.data.tags["git.commit"] == commit
    compared = reproduce.compared_metrics(first.data.metrics)
    assert {"best_val_loss", "eval_accuracy"} <= set(compared)
    for name in compared:
        assert rebuilt.data.metrics[name] == first.data.metrics[name], name
    assert f"of commit {commit[:7]})" in proc.stdout
    assert f"all {len(compared) + 1} values equal" in proc.stdout


def test_unknown_run_id_names_the_store(experimented):
    repo, _ = experimented
    line = one_line_error(reproduce_cli(repo, "0" * 32))
    assert f"'{'0' * 32}' is not in the tracking store sqlite:///{repo / 'mlflow.db'}" in line


def test_runs_not_made_by_imgpipe_are_refused(experimented):
    repo, _ = experimented
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    foreign = client.create_run(client.create_experiment("someone-else")).info.run_id
    client.set_terminated(foreign)
    assert "was not made by imgpipe (it has no imgpipe.stage tag)" in one_line_error(
        reproduce_cli(repo, foreign))

    # A stage run of imgpipe's own: the message names the pipeline run it is a child of,
    # the row that holds the same execution's train run.
    runs = mlflow_runs(repo)
    index = [r for r in runs if r.data.tags.get("imgpipe.stage") == "index"][-1]  # the first
    first_train = train_runs(repo)[-1]
    parent = index.data.tags["mlflow.parentRunId"]
    assert first_train.data.tags["mlflow.parentRunId"] == parent
    assert client.get_run(parent).data.tags["imgpipe.stage"] == "pipeline"
    line = one_line_error(reproduce_cli(repo, index.info.run_id))
    assert "not made by imgpipe's training or pipeline but by its index stage" in line
    assert f"rebuild run {parent} instead" in line


def test_a_run_from_uncommitted_params_is_refused(experimented):
    repo, _ = experimented
    from mlflow import MlflowClient

    # What `dvc repro` with an edited, uncommitted params.yaml logs: params HEAD lacks.
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    head = git(repo, "rev-parse", "HEAD").strip()
    made = client.create_run(client.get_experiment_by_name("imgpipe").experiment_id,
                             tags={"imgpipe.stage": "train", "git.commit": head})
    client.log_param(made.info.run_id, "lr", "0.7")
    client.log_metric(made.info.run_id, "eval_accuracy", 0.5)
    client.set_terminated(made.info.run_id)
    line = one_line_error(reproduce_cli(repo, made.info.run_id))
    assert f"lr: 0.7 in the run, {OTHER_LR} at {head[:7]}" in line
    assert git(repo, "rev-parse", "HEAD").strip() == head


def test_uncommitted_changes_are_never_overwritten(experimented):
    repo, run_id = experimented
    params = repo / "params.yaml"
    edited = params.read_text() + "# my edit\n"
    params.write_text(edited)
    try:
        line = one_line_error(reproduce_cli(repo, run_id))
        assert "uncommitted changes (params.yaml)" in line and "`git stash`" in line
        assert params.read_text() == edited
    finally:
        git(repo, "checkout", "--", "params.yaml")


def test_data_missing_from_the_cache_names_dvc_pull(experimented, tmp_path):
    repo, run_id = copy_repo(experimented[0], tmp_path), experimented[1]
    # A clone whose images never came: data/raw neither in the workspace nor in the cache.
    listing = yaml.safe_load((repo / "data" / "raw.dvc").read_text())["outs"][0]["md5"]
    cache = repo / ".dvc" / "cache" / "files" / "md5"
    dir_file = cache / listing[:2] / listing[2:]
    for entry in json.loads(dir_file.read_text())[:5]:
        (cache / entry["md5"][:2] / entry["md5"][2:]).unlink()
    shutil.rmtree(repo / "data" / "raw")
    before = git(repo, "status", "--porcelain")
    line = one_line_error(reproduce_cli(repo, run_id))
    assert "(data/raw at " in line and "is not in the DVC cache: `dvc pull` it" in line
    # Refused before anything was touched.
    assert git(repo, "status", "--porcelain") == before
    assert yaml.safe_load((repo / "params.yaml").read_text())["lr"] == OTHER_LR


def test_a_garbage_collected_experiment_is_named(experimented, tmp_path):
    repo, run_id = copy_repo(experimented[0], tmp_path), experimented[1]
    dvc(repo, "exp", "remove", EXPERIMENT)
    line = one_line_error(reproduce_cli(repo, run_id))
    assert f"DVC experiment {EXPERIMENT} (on commit " in line
    assert "garbage-collected" in line and "git checkout" in line


def test_compare_is_exact_unless_given_a_tolerance():
    logged = {"eval_loss": 0.5, "eval_accuracy": 0.9}
    rebuilt = {"eval_loss": 0.5004, "eval_accuracy": 0.9}
    assert [r.equal for r in reproduce.compare(logged, rebuilt, sorted(logged), 0.0)] == [
        True, False]
    assert all(r.equal for r in reproduce.compare(logged, rebuilt, sorted(logged), 1e-3))
    missing = reproduce.compare(logged, {}, ["eval_loss"], 1e-3)
    assert missing == [Row("eval_loss", 0.5, None, False)]


def test_table_folds_agreeing_per_class_rows():
    rows = [Row("best_epoch", 2.0, 2.0, True), Row("eval_f1.cat", 0.5, 0.5, True),
            Row("eval_f1.dog", 0.25, 0.5, False)]
    table = reproduce.format_table(rows).splitlines()
    assert table[0].split() == ["metric", "logged", "rebuilt", "equal"]
    assert table[1].split() == ["best_epoch", "2", "2", "yes"]
    assert table[2].split() == ["eval_f1.dog", "0.25", "0.5", "no"]
    assert table[3].split()[-1] == "yes" and "(1 more)" in table[3]
