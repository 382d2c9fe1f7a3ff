"""stages/tracking.py: the store, parallel first runs, and logging that survives failures."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time

import pytest
from conftest import ROOT, env
from servers import free_port

from stages import params, tracking
from stages.common import UserError

# One stage's worth of MLflow work; waits for the go file so that all workers hit a fresh
# store at the same moment, which is how `dvc queue start -j N` starts a queue.
WORKER = """
import sys, time
from pathlib import Path
from stages import tracking
import mlflow
ready, go = Path(sys.argv[1]), Path(sys.argv[2])
ready.touch()
while not go.exists():
    time.sleep(0.01)
with tracking.stage_run("imgpipe", "train", {"lr": float(sys.argv[3])}):
    mlflow.log_metric("val_acc", 0.5)
"""


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh sqlite store in tmp_path, found the way the stages find it (DVC_ROOT)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    return tmp_path / tracking.STORE_FILE


def test_parallel_first_runs_share_a_fresh_store(store, tmp_path):
    # Without the lock, MLflow's schema migrations race: "table _alembic_tmp_metrics
    # already exists", "duplicate column name: step".
    workers = []
    for i in range(4):
        workers.append(subprocess.Popen(
            [sys.executable, "-c", WORKER, str(tmp_path / f"ready{i}"), str(tmp_path / "go"),
             str(0.01 * (i + 1))], cwd=ROOT, env=env(DVC_ROOT=str(tmp_path)),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + 300
    while not all((tmp_path / f"ready{i}").exists() for i in range(4)):
        assert all(w.poll() is None for w in workers), [w.communicate() for w in workers]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    (tmp_path / "go").touch()
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0] * 4, "\n---\n".join(outputs)

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiments = [e for e in client.search_experiments() if e.name == "imgpipe"]
    assert len(experiments) == 1
    runs = client.search_runs([experiments[0].experiment_id])
    stage_runs = [r for r in runs if r.data.tags["imgpipe.stage"] == "train"]
    assert sorted(r.data.params["lr"] for r in stage_runs) == ["0.01", "0.02", "0.03", "0.04"]
    # One execution (same commit, data and params.yaml): one parent, made once under the lock.
    (parent,) = [r for r in runs if r.data.tags["imgpipe.stage"] == "pipeline"]
    assert {r.data.tags["mlflow.parentRunId"] for r in stage_runs} == {parent.info.run_id}
    assert experiments[0].artifact_location == (tmp_path / tracking.ARTIFACTS_DIR).as_uri()
    with sqlite3.connect(store) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_tracking_uri_is_the_store_at_the_repo_root(store, monkeypatch):
    assert tracking.tracking_uri() == f"sqlite:///{store}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking.tracking_uri() == "http://127.0.0.1:1"


def test_check_reachable_says_what_is_wrong(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(UserError, match=f"MLflow server {dead} is unreachable"):
        tracking.check_reachable(dead)
    with pytest.raises(UserError, match="missing or not writable"):
        tracking.check_reachable(f"sqlite:///{tmp_path / 'nowhere' / 'mlflow.db'}")
    tracking.check_reachable(f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_run_logger_counts_what_it_could_not_log(store, tmp_path):
    tracking.connect("imgpipe")
    log = tracking.RunLogger("0" * 32)  # no such run: every call fails in the store
    log.metrics({"loss": 1.0, "acc": 0.5}, step=1)
    log.series("step_loss", [1.0, 0.9, 0.8], first_step=0)
    (tmp_path / "plot.png").write_bytes(b"png")
    log.artifact(tmp_path / "plot.png")
    log.tags({"a": "1"})
    lost = log.unlogged()
    assert lost.startswith("MLflow store failed (")
    assert "not logged: 5 metric values, 1 artifact plot.png, 1 tags" in lost


def test_stage_run_fails_in_one_line_when_logging_was_lost(store):
    with pytest.raises(UserError) as err, tracking.stage_run("imgpipe", "train", {"lr": 0.1}) \
            as run:
        log = tracking.RunLogger(run.info.run_id)
        log.metrics({"fine": 1.0}, step=1)
        log.metrics({"bad*name": 1.0}, step=2)  # the store refuses it
        log.metrics({"fine": 2.0}, step=3)  # skipped after the first failure
    message = str(err.value)
    assert "not logged: 2 metric values" in message and "\n" not in message
    from mlflow import MlflowClient

    kept = MlflowClient(tracking_uri=f"sqlite:///{store}").get_run(run.info.run_id)
    assert kept.data.metrics == {"fine": 1.0}
    assert kept.data.params == {"lr": "0.1"}


def run_stage(stage: str, run_id: str | None = None, fail: bool = False,
              model_run: str | None = None) -> tuple[str, str]:
    """One stage's MLflow run, as the stages make it; returns (its run id, its parent's id)."""
    params = {} if run_id or model_run else {"stage": stage}  # a continued run has its params
    with tracking.stage_run("imgpipe", stage, params, "data-v1", run_id, model_run) as run:
        if fail:
            raise RuntimeError("the stage broke")
        return run.info.run_id, tracking.pipeline_run_id()


def test_stage_runs_nest_under_one_parent_per_pipeline_execution(store, tmp_path,
                                                                    monkeypatch, capsys):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # no git here: the key is data version and params
    for name in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "IMGPIPE_REPRODUCES"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "params.yaml").write_text("lr: 0.1\ntrain: {epochs: 2}\n")
    index, parent = run_stage("index")
    train, same = run_stage("train")
    assert same == parent
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    run = client.get_run(parent)
    assert run.data.tags["imgpipe.stage"] == "pipeline"
    assert run.data.tags["data.version"] == "data-v1"
    # Every key, as the stages read it: params.yaml's values, the schema's defaults elsewhere.
    typed = params.flat_values(params.parse({"lr": 0.1, "train": {"epochs": 2}}))
    assert run.data.params == {k: str(v) for k, v in typed.items()}
    assert run.data.params["lr"] == "0.1" and run.data.params["train.epochs"] == "2"
    assert run.info.status == "FINISHED" and run.info.run_name == "repro"
    for child in (index, train):
        assert client.get_run(child).data.tags["mlflow.parentRunId"] == parent

    # Other params, uncommitted: another execution, since params are logged once per parent.
    (tmp_path / "params.yaml").write_text("lr: 0.2\ntrain: {epochs: 2}\n")
    _, other = run_stage("train")
    assert other != parent and client.get_run(other).data.params["lr"] == "0.2"
    # Each experiment, and each reproduction of a run, is its own execution.
    monkeypatch.setenv("DVC_EXP_NAME", "exp-a")
    train_a, exp_a = run_stage("train")
    monkeypatch.setenv("IMGPIPE_REPRODUCES", "0" * 32)
    _, reproduced = run_stage("train")
    assert len({parent, other, exp_a, reproduced}) == 4
    assert client.get_run(exp_a).info.run_name == "exp-a"
    assert "reproduces" in client.get_run(reproduced).data.tags["imgpipe.pipeline"]

    # A resumed training run keeps its parent. Evaluate continues the run that trained the
    # model when it is of this execution, else logs to a new run that names it, so that the
    # earlier execution's training run is left as it was.
    monkeypatch.delenv("IMGPIPE_REPRODUCES")
    assert run_stage("train", run_id=train) == (train, exp_a)
    assert client.get_run(train).data.tags["mlflow.parentRunId"] == parent
    # A run to resume that the store does not hold (another store): a new run, said so.
    gone = "f" * 32
    fresh, current = run_stage("train", run_id=gone)
    assert current == exp_a and fresh not in (gone, train, train_a)
    assert f"MLflow run {gone} is not in sqlite:///{store}: logging to a new run" \
        in capsys.readouterr().out
    assert run_stage("evaluate", model_run=train_a) == (train_a, exp_a)
    evaluated, current = run_stage("evaluate", model_run=train)
    assert current == exp_a and evaluated not in (train, train_a)
    tags = client.get_run(evaluated).data.tags
    assert tags["mlflow.parentRunId"] == exp_a and tags["imgpipe.stage"] == "evaluate"
    assert tags["imgpipe.model_run"] == train
    assert "imgpipe.model_run" not in client.get_run(train_a).data.tags
    with pytest.raises(RuntimeError, match="the stage broke"):
        run_stage("train", fail=True)
    assert client.get_run(exp_a).info.status == "FAILED"
    top = client.search_runs([run.info.experiment_id], "tags.`mlflow.parentRunId` IS NULL")
    assert {r.info.run_id for r in top} == {parent, other, exp_a, reproduced}


def test_flatten_and_metric_key():
    assert tracking.flatten({"lr": 0.1, "train": {"epochs": 3, "opt": {"name": "sgd"}}}) == {
        "lr": 0.1, "train.epochs": 3, "train.opt.name": "sgd"}
    assert tracking.metric_key("f1.class (1)*") == "f1.class _1__"
