"""Team setups: a real remote MLflow server (up, down, dying mid-training) and a DVC remote."""

from __future__ import annotations

import filecmp
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import dvc, env, git, make_repo, run, set_params
from servers import MlflowServer, free_port, start_server

# A stage notices a dead server after one retry: keeps the tests quick.
FAST_FAIL = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One `mlflow server` for the module (it takes a while to boot); restarted if a test
    killed it, on the same store."""
    folder = tmp_path_factory.mktemp("server")
    started: list[MlflowServer] = []

    def live() -> MlflowServer:
        if not started or started[-1].proc.poll() is not None:
            started.append(start_server(folder))
        return started[-1]

    yield live
    for one in started:
        one.kill()


def train_runs(client) -> list:
    """The train runs on a server, in any experiment."""
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, "tags.`imgpipe.stage` = 'train'") if ids else []


def all_artifacts(client, run_id: str, folder: str | None = None) -> list:
    """Every file artifact of a run, recursively."""
    found = []
    for item in client.list_artifacts(run_id, folder):
        found += all_artifacts(client, run_id, item.path) if item.is_dir else [item]
    return found


def test_pipeline_logs_to_remote_server(server, tmp_path):
    from mlflow import MlflowClient

    repo = make_repo(tmp_path / "repo")
    url = server().url
    dvc(repo, "repro", MLFLOW_TRACKING_URI=url)
    assert not (repo / "mlflow.db").exists(), "logged to the local store instead"

    client = MlflowClient(tracking_uri=url)
    experiment = client.get_experiment_by_name("imgpipe")
    runs = client.search_runs([experiment.experiment_id])
    stages = {r.data.tags["imgpipe.stage"]: r for r in runs}
    assert set(stages) == {"pipeline", "index", "preprocess", "train"}, stages.keys()
    assert all(r.info.status == "FINISHED" for r in runs)
    assert "eval_accuracy" in stages["train"].data.metrics
    # Without the sqlite lock too, the stages of one repro share one parent.
    parent = stages["pipeline"].info.run_id
    assert {r.data.tags.get("mlflow.parentRunId") for r in runs} == {parent, None}
    assert "eval_accuracy" in stages["pipeline"].data.metrics

    # Every artifact any stage logged comes back through the server, byte for byte
    # where the pipeline also keeps a copy (model, plots and metrics alike).
    local = {p.name: p for folder in ("data", "metrics", "models")
             for p in (repo / folder).rglob("*") if p.is_file()}
    fetched = []
    for r in runs:
        for item in all_artifacts(client, r.info.run_id):
            path = Path(client.download_artifacts(r.info.run_id, item.path,
                                                  str(tmp_path / "fetched" / r.info.run_id)))
            assert path.stat().st_size == item.file_size, item.path
            if path.name in local:
                assert filecmp.cmp(path, local[path.name], shallow=False), item.path
            fetched.append(item.path)
    assert {"rejects.csv", "eval.json"} <= {Path(p).name for p in fetched}, fetched
    # Models logged with mlflow.<flavor>.log_model live beside the runs (MLflow 3).
    import mlflow

    mlflow.set_tracking_uri(url)
    for model in client.search_logged_models([experiment.experiment_id]):
        folder = mlflow.artifacts.download_artifacts(f"models:/{model.model_id}",
                                                     dst_path=str(tmp_path / "models"))
        assert (Path(folder) / "MLmodel").exists(), model.model_id


def test_unreachable_server_fails_in_one_line_before_training(clone_built):
    repo = clone_built()
    model = repo / "models" / "model.pt"
    before = model.stat().st_mtime_ns
    dead = f"http://127.0.0.1:{free_port()}"

    proc = run([sys.executable, "-m", "stages.train"], repo, check=False,
               MLFLOW_TRACKING_URI=dead)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: MLflow server {dead} is "
                                                   "unreachable"), proc.stderr

    out = dvc(repo, "repro", "-f", check=False, MLFLOW_TRACKING_URI=dead)
    assert out.returncode != 0
    assert "unreachable" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert "Running stage 'train'" not in out.stdout  # index failed first
    assert model.stat().st_mtime_ns == before


def test_server_dying_mid_training_keeps_the_model(server, clone_built):
    from mlflow import MlflowClient

    repo = clone_built()
    # The server dies once the first epoch is logged; 19 epochs to go leave a wide margin
    # over the ~0.1 s the test takes to notice and kill it.
    set_params(repo, train={"epochs": 20})
    model = repo / "models" / "model.pt"
    model.unlink()
    server = server()
    client = MlflowClient(tracking_uri=server.url)
    before = {r.info.run_id for r in train_runs(client)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.train"], cwd=repo, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=env(MLFLOW_TRACKING_URI=server.url, **FAST_FAIL))
    deadline = time.monotonic() + 300
    while not any(r.data.metrics for r in train_runs(client) if r.info.run_id not in before):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no epoch was ever logged"
        time.sleep(0.1)
    server.kill()
    stdout, stderr = proc.communicate(timeout=600)

    assert model.exists(), stdout + stderr
    assert (repo / "metrics" / "train.json").exists()
    # Exit 1: the MLflow run is incomplete, so DVC must not record the stage as done.
    assert proc.returncode == 1, stdout + stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: MLflow store failed (server {server.url} stopped "
                           "answering): not logged: "), stderr
    assert "metric values" in last, last


def test_dvc_remote_restores_a_fresh_clone(clone_built, tmp_path):
    repo = clone_built()
    dvc(repo, "remote", "add", "-d", "storage", str(tmp_path / "remote"))
    git(repo, "add", ".dvc/config")
    git(repo, "commit", "-q", "-m", "DVC remote")
    dvc(repo, "push")

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    assert not (clone / "data" / "raw").exists()
    dvc(clone, "pull")
    shards = sorted(p.relative_to(repo).as_posix() for p in (repo / "data/tensors").rglob("*.npy"))
    assert shards and shards == sorted(p.relative_to(clone).as_posix()
                                       for p in (clone / "data/tensors").rglob("*.npy"))
    for out in ["data/manifest.csv", "data/splits.json", "data/tensors/meta.json",
                *shards, "models/model.pt"]:
        assert filecmp.cmp(clone / out, repo / out, shallow=False), out
    raw = sorted(p.relative_to(clone) for p in (clone / "data" / "raw").rglob("*.png"))
    assert raw == sorted(p.relative_to(repo) for p in (repo / "data" / "raw").rglob("*.png"))
    assert len(raw) == 200

    out = dvc(clone, "repro").stdout
    assert "Running stage" not in out, out
    assert not (clone / "mlflow.db").exists()  # nothing ran, nothing logged
