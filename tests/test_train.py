"""The train stage: params, schedules, determinism, resume after kill -9, NaN guard, DDP."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import BIN, dvc, env, mlflow_runs, set_params

from stages import params
from stages import train as stage
from stages.common import UserError
from stages.models import load_checkpoint
from stages.params import Train
from stages.tensors import SplitDataset, read_meta

RESULT_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr"]


def train_runs(repo: Path) -> list:
    """The MLflow runs of the train stage."""
    return [r for r in mlflow_runs(repo) if r.data.tags.get("imgpipe.stage") == "train"]


def same_weights(a: Path, b: Path) -> bool:
    """True if two models/model.pt files hold bit-identical weights."""
    wa, wb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    return wa["state_dict"].keys() == wb["state_dict"].keys() and all(
        torch.equal(wa["state_dict"][k], wb["state_dict"][k]) for k in wa["state_dict"])


def checkpoints(repo: Path) -> list[Path]:
    """Checkpoint files of the repo (complete ones: partial writes have a .tmp name)."""
    return sorted((repo / ".cache/imgpipe/checkpoints").glob("*.pt"))


def run_in_process(repo: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, pd.DataFrame]:
    """Run the train stage's main() in repo, in this process; returns its metrics."""
    monkeypatch.chdir(repo)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    stage.main()
    return (json.loads((repo / "metrics/train.json").read_text()),
            pd.read_csv(repo / "metrics/epochs.csv"))


# ---------------------------------------------------------------- params

def test_batch_size_must_cover_the_processes():
    with pytest.raises(UserError, match="train.batch_size 2 is smaller than the number of "
                                        r"processes \(4\)"):
        stage.check_fits(Train(batch_size=2), {"image_size": 8}, 4)
    stage.check_fits(Train(batch_size=4), {"image_size": 8}, 4)


def test_translate_must_be_below_image_size(clone_built, monkeypatch, capsys):
    repo = clone_built()
    set_params(repo, train={"translate": 8})
    runs = len(train_runs(repo))
    with pytest.raises(SystemExit):
        run_in_process(repo, monkeypatch)
    assert "error: train.translate is 8 pixels" in capsys.readouterr().err
    assert len(train_runs(repo)) == runs  # refused before any run started


# ---------------------------------------------------------------- optimisation

def test_lr_schedules():
    assert stage.lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)     # warmup ramps up
    assert stage.lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert stage.lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)    # then decays
    assert stage.lr_factor(99, 100, 10, "cosine") < 0.01
    assert stage.lr_factor(99, 100, 0, "constant") == 1.0
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = stage.make_scheduler(Train(schedule="onecycle", warmup_epochs=1, epochs=4), opt,
                                 0.1, 10)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert max(lrs) == pytest.approx(0.1, rel=1e-3) and int(np.argmax(lrs)) in (9, 10)


def test_optimizers():
    model = torch.nn.Linear(2, 2)
    sgd = stage.make_optimizer(Train(optimizer="sgd", momentum=0.8, nesterov=True),
                               model.parameters(), 0.1)
    assert sgd.param_groups[0]["momentum"] == 0.8 and sgd.param_groups[0]["nesterov"]
    assert isinstance(stage.make_optimizer(Train(optimizer="adamw"), model.parameters(), 0.1),
                      torch.optim.AdamW)


def test_balanced_class_weights():
    labels = np.array([0] * 90 + [1] * 10)
    weights = stage.class_weights(labels, 2, "balanced")
    assert weights.tolist() == pytest.approx([100 / (2 * 90), 100 / (2 * 10)])
    assert stage.class_weights(labels, 2, "none") is None


def test_early_stopping_keeps_the_best_epoch():
    stopper = stage.EarlyStopping(patience=2)
    improved = [stopper.update(loss, epoch) for epoch, loss in
                enumerate([1.0, 0.5, 0.6, 0.4, 0.45, 0.5], start=1)]
    assert improved == [True, True, False, True, False, False]
    assert stopper.stop and stopper.best_epoch == 4
    assert not stage.EarlyStopping(patience=0).stop


# ---------------------------------------------------------------- checkpoints

def test_fingerprint_tracks_params_and_data():
    p = params.parse({"lr": 0.05, "train": {"epochs": 3, "workers": 0, "log_every": 10}})
    meta = {"data_version": "abc", "image_size": 8}
    key = stage.fingerprint(p, meta, 1)
    assert key == stage.fingerprint(p, dict(meta), 1)
    assert key != stage.fingerprint(p.model_copy(update={"lr": 0.1}), meta, 1)
    assert key != stage.fingerprint(with_train(p, epochs=4), meta, 1)
    assert key != stage.fingerprint(with_train(p, flip=True), meta, 1)
    assert key != stage.fingerprint(p, {**meta, "data_version": "abd"}, 1)
    assert key != stage.fingerprint(p, meta, 2)
    # How a run goes (workers, logging, registering) does not change what it computes: the
    # checkpoint holds.
    quiet = with_train(p, workers=2, log_every=50, register_as="digits")
    assert key == stage.fingerprint(quiet, meta, 1)
    assert key == stage.fingerprint(p.model_copy(update={"workers": 1}), meta, 1)


def with_train(p: params.Params, **changes: object) -> params.Params:
    """p with some train keys changed."""
    return p.model_copy(update={"train": p.train.model_copy(update=changes)})


def test_same_params_give_the_same_model_and_metrics(clone_built, monkeypatch, capsys):
    repo = clone_built()
    set_params(repo, train={"patience": 1, "flip": True, "epochs": 3})
    first, epochs_a = run_in_process(repo, monkeypatch)
    weights = repo / "first.pt"
    shutil.copy(repo / "models/model.pt", weights)
    second, epochs_b = run_in_process(repo, monkeypatch)
    pd.testing.assert_frame_equal(epochs_a[RESULT_COLUMNS], epochs_b[RESULT_COLUMNS])
    assert same_weights(weights, repo / "models/model.pt")
    assert first["val_loss"] == second["val_loss"]
    # Holding the data in memory instead of streaming it changes nothing but the speed.
    set_params(repo, train={"data_on_device": True})
    _, epochs_c = run_in_process(repo, monkeypatch)
    assert ", data on the device" in capsys.readouterr().out
    pd.testing.assert_frame_equal(epochs_a[RESULT_COLUMNS], epochs_c[RESULT_COLUMNS])
    assert same_weights(weights, repo / "models/model.pt")
    # So does loading in 2 worker processes, through the ring of shared buffers.
    set_params(repo, train={"data_on_device": False, "workers": 2})
    _, epochs_d = run_in_process(repo, monkeypatch)
    out = capsys.readouterr().out
    assert ", data streamed, 2 workers; input mean/std (0.485, 0.456, 0.406)/" in out  # as given
    pd.testing.assert_frame_equal(epochs_a[RESULT_COLUMNS], epochs_d[RESULT_COLUMNS])
    assert same_weights(weights, repo / "models/model.pt")
    # The model is the epoch with the lowest val loss; the run stops once patience is spent.
    best = int(epochs_a.loc[epochs_a["val_loss"].idxmin(), "epoch"])
    saved = torch.load(weights, weights_only=True)
    assert first["best_epoch"] == best == saved["epoch"]
    # Trained in channels_last, saved in the plain layout that any loader expects.
    assert all(t.is_contiguous() for t in saved["state_dict"].values())
    assert len(epochs_a) <= best + 1
    assert checkpoints(repo) == []  # a finished run leaves nothing to resume


def test_nan_loss_stops_with_one_line_and_no_model(clone_built):
    repo = clone_built()
    set_params(repo, lr=1e12)
    proc = dvc(repo, "repro", "train", check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "NaN or inf in epoch 1 at step" in errors[0] and "lr" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (repo / "models/model.pt").exists()
    assert checkpoints(repo) == []


# ---------------------------------------------------------------- resume after kill -9

def test_resume_after_kill_matches_an_uninterrupted_run(clone_built, tmp_path):
    repo = clone_built()
    # Small batches: many steps per epoch, so that the kill lands mid-run.
    set_params(repo, train={"epochs": 4, "batch_size": 8, "patience": 0})
    reference = tmp_path / "reference"
    shutil.copytree(repo, reference, symlinks=True)
    before = len(train_runs(repo))

    # Start training as a user would, and kill -9 the whole process group after epoch 1.
    proc = subprocess.Popen([str(BIN / "dvc"), "repro", "train"], cwd=repo, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not checkpoints(repo) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = checkpoints(repo)
    assert len(saved) == 1 and not (repo / "models/model.pt").exists(), \
        "training finished before it could be killed: the machine is too slow for this test"
    killed_at = torch.load(saved[0], weights_only=True)["epoch"]
    assert 1 <= killed_at < 4

    # The checkpoint is named by, and only ever read back for, its params and data.
    p = params.load(repo / "params.yaml")
    meta = read_meta(repo / "data/tensors")
    assert saved[0].name == f"train-{stage.fingerprint(p, meta, 1)}.pt"
    other = p.model_copy(update={"lr": 0.07})
    assert stage.read_checkpoint(saved[0], stage.fingerprint(other, meta, 1)) is None

    out = dvc(repo, "repro", "train").stdout
    assert f"resuming after epoch {killed_at}" in out
    dvc(reference, "repro", "train")

    assert same_weights(repo / "models/model.pt", reference / "models/model.pt")
    resumed = pd.read_csv(repo / "metrics/epochs.csv")
    pd.testing.assert_frame_equal(resumed[RESULT_COLUMNS],
                                  pd.read_csv(reference / "metrics/epochs.csv")[RESULT_COLUMNS])
    runs = train_runs(repo)
    assert len(runs) == before + 1 and runs[0].info.status == "FINISHED"  # one run, continued
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    steps = {m.step for m in client.get_metric_history(runs[0].info.run_id, "val_loss")}
    assert steps == {1, 2, 3, 4}
    # Still a child of its execution's row, which the resumed stage finished.
    parent = client.get_run(runs[0].data.tags["mlflow.parentRunId"])
    assert parent.data.tags["imgpipe.stage"] == "pipeline" and parent.info.status == "FINISHED"
    assert parent.data.params["train.batch_size"] == "8"  # this execution's, not built_repo's
    assert checkpoints(repo) == []


def test_checkpoint_of_other_params_is_not_resumed(clone_built, monkeypatch, capsys):
    repo = clone_built()
    meta = read_meta(repo / "data/tensors")
    p = params.load(repo / "params.yaml")
    # A checkpoint left by a killed run with another lr, as if renamed to this run's name.
    old = stage.fingerprint(p.model_copy(update={"lr": 0.5}), meta, 1)
    path = repo / ".cache/imgpipe/checkpoints" / f"train-{stage.fingerprint(p, meta, 1)}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"fingerprint": old, "epoch": 1, "run_id": "x"}, path)
    summary, epochs = run_in_process(repo, monkeypatch)
    out = capsys.readouterr().out
    assert "ignoring checkpoint" in out and "starting:" in out and "resuming" not in out
    # train.workers is auto (params.yaml's default) and this is a CPU: the main process loads.
    assert ", data streamed, 0 workers (auto); input mean/std " in out
    assert list(epochs["epoch"]) == [1, 2]
    assert len(train_runs(repo)) == 2  # built_repo's run and this new one


# ---------------------------------------------------------------- MLflow and scale-out

def test_training_run_logs_every_curve(built_repo):
    import mlflow

    (run,) = train_runs(built_repo)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{built_repo / 'mlflow.db'}")
    for key in ("train_loss", "val_loss", "train_acc", "val_acc", "lr", "epoch_seconds",
                "images_per_second", "step_loss"):
        assert client.get_metric_history(run.info.run_id, key), key
    # The servable model is logged into this run by evaluate (tests/test_serving.py).
    (logged,) = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                            output_format="list")
    assert logged.source_run_id == run.info.run_id


def test_throughput_is_logged_apart_from_the_warmup(built_repo):
    from mlflow import MlflowClient

    (run,) = train_runs(built_repo)
    client = MlflowClient(tracking_uri=f"sqlite:///{built_repo / 'mlflow.db'}")
    logged = {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
              for key in ("images_per_second", "warmup_seconds", "epoch_seconds")}
    epochs = pd.read_csv(built_repo / "metrics/epochs.csv")
    assert set(logged["warmup_seconds"]) == set(epochs["epoch"]) == {1, 2}
    # The warm-up is the first steps (fewer in a short epoch), full batches of train.batch_size.
    images, batch = len(SplitDataset(built_repo / "data/tensors", "train")), 32
    warmup_steps = min(stage.WARMUP_STEPS, math.ceil(images / batch) // 2)
    assert warmup_steps >= 1
    for row in epochs.itertuples():
        assert logged["warmup_seconds"][row.epoch] == pytest.approx(row.warmup_seconds)
        assert logged["images_per_second"][row.epoch] == pytest.approx(row.images_per_second)
        assert 0 < row.warmup_seconds < row.epoch_seconds  # the warm-up is part of the epoch
        # images/s counts only the images after the warm-up, over their own time.
        steady = (images - warmup_steps * batch) / (row.epoch_seconds - row.warmup_seconds)
        assert row.images_per_second == pytest.approx(steady, rel=1e-6) and steady > 0


def test_ddp_on_two_cpu_processes_makes_one_model_and_one_run(clone_built):
    repo = clone_built()
    before = len(train_runs(repo))
    set_params(repo, train={"gpus": 2})
    proc = dvc(repo, "repro", "train", MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="0.5",
               MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING="1")
    assert "relaunching under torchrun" in proc.stdout and "x 2 processes" in proc.stdout
    model, checkpoint = load_checkpoint(repo / "models/model.pt")
    assert checkpoint["classes"] == read_meta(repo / "data/tensors")["classes"]
    runs = train_runs(repo)
    assert len(runs) == before + 1
    new = runs[0]
    assert new.info.status == "FINISHED" and math.isfinite(new.data.metrics["val_loss"])
    assert any(k.startswith("system/") for k in new.data.metrics)  # system metrics are on
