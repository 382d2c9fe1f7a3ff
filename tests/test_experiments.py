"""Queued DVC experiments run in parallel and all land in the one MLflow store at the repo root,
each experiment one row (a parent run) in MLflow's runs list."""

from __future__ import annotations

import time

from conftest import dvc, mlflow_runs

# None equals the fixture's base lr (conftest.FAST_PARAMS): DVC would skip that one.
# A pair: `dvc queue start -j 2` runs them side by side, racing for the store and its lock.
LRS = {"lr-a": "0.01", "lr-b": "0.3"}
WAIT = 900  # seconds; generous, the machine may be busy


def wait_for_queue(repo) -> str:
    """Poll `dvc queue status` until nothing is queued or running; return the last status."""
    deadline = time.monotonic() + WAIT
    while True:
        status = dvc(repo, "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            return status
        assert time.monotonic() < deadline, f"queue still busy after {WAIT}s:\n{status}"
        time.sleep(3)


def test_parallel_queue_logs_every_run_to_the_root_store(clone_built):
    repo = clone_built()
    before = {r.info.run_id for r in mlflow_runs(repo)}
    for name, lr in LRS.items():
        dvc(repo, "exp", "run", "--queue", "-n", name, "-S", f"lr={lr}")
    dvc(repo, "queue", "start", "-j", "2")
    try:
        status = wait_for_queue(repo)
    finally:
        dvc(repo, "queue", "stop", check=False)

    lines = {name: [line for line in status.splitlines() if name in line.split()]
             for name in LRS}
    failed = [name for name, found in lines.items() if not any("Success" in x for x in found)]
    logs = {name: dvc(repo, "queue", "logs", name, check=False).stdout for name in failed}
    assert not failed, f"experiments failed:\n{status}\n" + "\n".join(
        f"--- {name}\n{log[-3000:]}" for name, log in logs.items())
    assert status.count("Success") == len(LRS), status

    # Every experiment's train run is in the store at the repo root (temp runs reach it
    # through DVC_ROOT), tagged with its experiment name and holding its own lr.
    new = [r for r in mlflow_runs(repo) if r.info.run_id not in before]
    train = {r.data.tags.get("dvc.experiment"): r for r in new
             if r.data.tags.get("imgpipe.stage") == "train"}
    assert set(train) == set(LRS), [r.data.tags for r in new]
    for name, run in train.items():
        assert run.data.params["lr"] == LRS[name]
        assert run.info.status == "FINISHED"
        assert "eval_accuracy" in run.data.metrics  # evaluate logged into the same run
    # Each experiment got its own parent, exactly one, holding its params and headline.
    parents = [r for r in new if r.data.tags.get("imgpipe.stage") == "pipeline"]
    assert sorted(r.data.tags["dvc.experiment"] for r in parents) == sorted(LRS)
    for parent in parents:
        name = parent.data.tags["dvc.experiment"]
        assert parent.info.run_name == name and parent.info.status == "FINISHED"
        assert parent.data.params["lr"] == LRS[name]
        assert parent.data.metrics["eval_accuracy"] == train[name].data.metrics["eval_accuracy"]
        assert train[name].data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert "mlflow.parentRunId" not in parent.data.tags
    assert not (repo / ".dvc" / "tmp" / "exps" / "mlflow.db").exists()

    shown = dvc(repo, "exp", "show", "--no-pager", "--csv").stdout
    for name in LRS:
        assert name in shown, shown
