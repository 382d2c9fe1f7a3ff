"""Reproduce: rebuild an MLflow run from its tags, and check that the rebuild gives its metrics.

    imgpipe-reproduce RUN_ID          (or: python -m stages.reproduce RUN_ID)

RUN_ID is an imgpipe training run (tag imgpipe.stage=train) or pipeline run
(imgpipe.stage=pipeline), as the MLflow UI shows it. The run's tags say where it came from:
a run of a DVC experiment (tag dvc.experiment) is restored with `dvc exp apply`, any other
run with `git checkout <git.commit>` and `dvc checkout`. Then `dvc repro -f` rebuilds every
stage, logging new runs tagged imgpipe.reproduces=RUN_ID, and the metrics that do not depend on
timing are compared with the logged ones: exactly on the CPU, within GPU_TOLERANCE on a GPU.
They are best_* (the val split, which chose the epoch) and eval_* (the test split, the
headline; with no test split, val). data/splits.json, the split history, is restored with the
run's data, so the rebuild splits and scores the same images (eval_images counts them).
The exit code is 0 only when all of them agree. Uncommitted changes are never overwritten.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from stages import params
from stages.common import PARAMS_FILE, UserError, cli
from stages.tracking import WEIGHTS_TAG, check_reachable, flatten, tracking_uri

# The runs that hold a whole pipeline's results: the training run (into which evaluate logs)
# and the pipeline's parent run.
REBUILDABLE = ("train", "pipeline")
STAGE_TAG = "imgpipe.stage"
REPRODUCES_TAG = "imgpipe.reproduces"
REPRODUCES_ENV = "IMGPIPE_REPRODUCES"  # read by tracking.run_tags in every stage
COMMIT_ENV = "IMGPIPE_GIT_COMMIT"  # read by tracking.git_commit: the commit the code is from
# Metrics that do not depend on timing: best_* (val) and eval_* (test) are compared (images/s,
# epoch time, data wait, system/* and the step losses' timestamps are not).
BEST_METRICS = ("best_epoch", "best_val_loss", "best_val_acc")
EVAL_PREFIX = "eval_"
# On a GPU, cuDNN's and atomics' summation order changes from run to run.
GPU_TOLERANCE = 1e-3
# Where the train stage writes its device and run id: train_details.json since only the
# headline is a DVC metric; runs of older code kept everything in train.json.
TRAIN_SUMMARIES = (Path("metrics/train_details.json"), Path("metrics/train.json"))
DVC_FILE_SUFFIX = ".dvc"


@dataclass
class Source:
    """Where a run was made: a git commit, and the DVC experiment on top of it if any."""

    commit: str
    experiment: str | None = None
    experiment_rev: str | None = None   # the experiment's own commit (its ref in refs/exps)

    @property
    def rev(self) -> str:
        """The git revision that holds the run's code, params and .dvc files."""
        return self.experiment_rev or self.commit


@dataclass
class Row:
    """One line of the comparison: a metric (or the data version) logged and rebuilt."""

    name: str
    logged: Any
    rebuilt: Any
    equal: bool


# ---------------------------------------------------------------- checks before anything

def check_repo_root() -> None:
    """Refuse to run anywhere but the repository root, where dvc.yaml and the store are."""
    if not Path("dvc.yaml").is_file() or not Path(".git").exists():
        raise UserError(f"{Path.cwd()} is not an imgpipe repository root (no dvc.yaml or .git): "
                        "run imgpipe-reproduce from the folder that holds dvc.yaml")


def check_clean_workspace() -> None:
    """Refuse when tracked files have uncommitted changes: restoring a run would overwrite them."""
    changed = git("status", "--porcelain", "--untracked-files=no").splitlines()
    if changed:
        names = [line[3:] for line in changed]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise UserError(f"the workspace has uncommitted changes ({shown}), which rebuilding a "
                        "run would overwrite: commit them or `git stash` them, then run again")


def open_store() -> Any:
    """An MlflowClient on the store the stages log into."""
    import mlflow

    uri = tracking_uri()
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return mlflow.MlflowClient(uri)


def find_run(client: Any, run_id: str) -> Any:
    """The MLflow run `run_id`, or a one-line error naming the store it is not in."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        raise UserError(f"MLflow run {run_id!r} is not in the tracking store {tracking_uri()}: "
                        "copy the id from the run's page in the MLflow UI, or set "
                        "MLFLOW_TRACKING_URI to the store that holds it") from None


def check_made_by_imgpipe(client: Any, run: Any) -> None:
    """Accept training and pipeline runs; say which run to use for another stage's run."""
    run_id, stage = run.info.run_id, run.data.tags.get(STAGE_TAG)
    if stage in REBUILDABLE:
        return
    if stage is None:
        raise UserError(f"MLflow run {run_id} was not made by imgpipe (it has no {STAGE_TAG} "
                        "tag): give the id of an imgpipe train or pipeline run")
    instead = run_to_rebuild(client, run)
    hint = (f"rebuild run {instead} instead (`imgpipe-reproduce {instead}`)" if instead
            else f"give the id of its train run ({STAGE_TAG}=train)")
    raise UserError(f"MLflow run {run_id} was not made by imgpipe's training or pipeline but "
                    f"by its {stage} stage ({STAGE_TAG}={stage}): {hint}")


def run_to_rebuild(client: Any, run: Any) -> str | None:
    """For a stage run: its pipeline parent, else the first train run of the same execution."""
    tags = run.data.tags
    parent = tags.get("mlflow.parentRunId")
    if parent:
        return parent
    filters = [f"tags.`{STAGE_TAG}` = 'train'", f"attributes.start_time >= {run.info.start_time}"]
    for key in ("git.commit", "dvc.experiment"):
        if key in tags:
            filters.append(f"tags.`{key}` = '{tags[key]}'")
    found = client.search_runs([run.info.experiment_id], " and ".join(filters),
                               order_by=["attributes.start_time ASC"], max_results=1)
    return found[0].info.run_id if found else None


# ---------------------------------------------------------------- where the run came from

def find_source(run: Any) -> Source:
    """Read the run's git commit and DVC experiment, checking that both still exist."""
    tags, run_id = run.data.tags, run.info.run_id
    commit = tags.get("git.commit")
    if not commit:
        raise UserError(f"MLflow run {run_id} has no git.commit tag, so its code is unknown: "
                        "it cannot be rebuilt")
    name = tags.get("dvc.experiment")
    if name:
        return Source(commit, name, experiment_rev(name, commit))
    if subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"],
                      capture_output=True).returncode != 0:
        raise UserError(f"commit {commit[:7]} of MLflow run {run_id} is not in this repository: "
                        "`git fetch` it (or run from the clone that made the run)")
    return Source(commit)


def experiment_rev(name: str, baseline: str) -> str:
    """The commit of experiment `name` on `baseline`, from `dvc exp list`; gone: one line."""
    listed = dvc("exp", "list", "--rev", baseline, check=False)
    # Lines read "\t<sha7> [<name>]" under a "<baseline>:" heading.
    found = re.findall(rf"^\t([0-9a-f]+) \[{re.escape(name)}\]$", listed.stdout, re.MULTILINE)
    if listed.returncode != 0 or not found:
        raise UserError(
            f"DVC experiment {name} (on commit {baseline[:7]}) is gone from this repository: "
            "it was garbage-collected (`dvc exp remove` / `dvc exp gc`) or never pulled "
            f"(`dvc exp pull <remote> {name}`); to rebuild it by hand, `git checkout "
            f"{baseline[:7]}`, set the params the run logged in {PARAMS_FILE}, then `dvc repro`")
    return found[0]


def missing_data(rev: str) -> list[str]:
    """The data (.dvc files) of `rev` that neither the DVC cache nor the workspace holds."""
    from dvc.repo import Repo
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    names = [n for n in git("ls-tree", "-r", "--name-only", rev).splitlines()
             if n.endswith(DVC_FILE_SUFFIX) and not n.startswith(".dvc/")]
    missing = []
    with Repo(".") as repo:
        for name in names:
            text = git("show", f"{rev}:{name}")
            if in_workspace(repo, name, text):
                continue  # `dvc checkout` keeps files that match: no cache needed
            for out in (yaml.safe_load(text) or {}).get("outs") or []:
                oid = out.get("md5")
                if not oid:
                    continue
                # DVC 3 files say `hash: md5`; older ones live in the legacy cache.
                odb = repo.cache.local if out.get("hash") == "md5" else repo.cache.legacy
                cached = odb.exists(oid) and (not oid.endswith(".dir") or all(
                    odb.exists(hi.value) for _key, _meta, hi in
                    Tree.load(odb, HashInfo("md5", oid))))
                if not cached:
                    missing.append(str(Path(name).parent / out.get("path", "")))
    return missing


def in_workspace(repo: Any, dvc_file: str, text_at_rev: str) -> bool:
    """True when the workspace's `dvc_file` reads `text_at_rev` and its data matches it."""
    path = Path(dvc_file)
    if not path.is_file() or path.read_text() != text_at_rev:
        return False
    stages = [s for s in repo.index.stages if s.relpath == str(path)]
    return bool(stages) and all(not out.workspace_status() for out in stages[0].outs)


def check_data_cached(source: Source, run_id: str) -> None:
    """Refuse before touching the workspace when the run's data is not in the DVC cache."""
    missing = missing_data(source.rev)
    if missing:
        raise UserError(f"the data of MLflow run {run_id} ({', '.join(missing)} at "
                        f"{source.rev[:7]}) is not in the DVC cache: `dvc pull` it from the "
                        "remote (`dvc fetch` to fill only the cache), then run again")


# ---------------------------------------------------------------- restoring and rebuilding

def restore(source: Source) -> None:
    """Put the run's code, params and data in the workspace."""
    if source.experiment:
        # Applies the experiment's files on top of HEAD (HEAD stays where it is).
        ran = dvc("exp", "apply", source.experiment_rev, check=False)
        if ran.returncode != 0:
            raise UserError(f"`dvc exp apply {source.experiment}` failed: {last_error(ran)}; "
                            "if files are missing from the cache, `dvc pull` them")
        print(f"applied DVC experiment {source.experiment} ({source.experiment_rev}) "
              f"to the workspace")
        return
    head = git("rev-parse", "HEAD").strip()
    if head != source.commit:
        git("checkout", "--quiet", "--detach", source.commit)
        print(f"checked out {source.commit[:7]}: HEAD is detached there (afterwards, "
              "`git switch -f -` returns to your branch, dropping the rebuilt outputs)")
    # Outputs missing from the cache are fine: `dvc repro -f` rebuilds them all, and the
    # data they are made from was checked to be in the cache.
    ran = dvc("checkout", "--allow-missing", check=False)
    if ran.returncode != 0:
        raise UserError(f"`dvc checkout` failed at {source.commit[:7]}: {last_error(ran)}; "
                        "if files are missing from the cache, `dvc pull` them")


def check_params(run: Any, rev: str) -> None:
    """Refuse when `rev`'s params.yaml does not hold what the run logged (uncommitted params)."""
    at_rev = yaml.safe_load(git("show", f"{rev}:{PARAMS_FILE}")) or {}
    try:  # as the stages logged them: typed by the schema, then str()
        typed = params.flat_values(params.parse(at_rev))
    except UserError:  # a commit from before the schema, or with other keys
        typed = flatten(at_rev)
    held = {k: str(v) for k, v in typed.items()}
    differ = [f"{k}: {v} in the run, {held[k]} at {rev[:7]}"
              for k, v in sorted(run.data.params.items()) if k in held and held[k] != v]
    if differ:
        raise UserError(f"MLflow run {run.info.run_id} was logged with params that {rev[:7]} "
                        f"does not hold ({'; '.join(differ[:3])}): it was made from uncommitted "
                        f"changes; check out {rev[:7]}, set them in {PARAMS_FILE} and run "
                        "`dvc repro`")


def rebuild(run_id: str, commit: str) -> None:
    """Run every stage again, each new run tagged imgpipe.reproduces=run_id and git.commit."""
    env = dict(os.environ)
    env[REPRODUCES_ENV] = run_id
    env[COMMIT_ENV] = commit  # after `dvc exp apply`, HEAD is not where the code is from
    # The stages run as `python -m ...`: the python of this environment, activated or not.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # -f: `dvc exp apply` and `dvc checkout` restore the run's outputs from the DVC cache and
    # its dvc.lock, so a plain `dvc repro` would find every stage up to date and rebuild
    # nothing ("Data and pipelines are up to date"): nothing would be checked.
    ran = subprocess.run([*dvc_command(), "repro", "-f"], env=env)
    if ran.returncode != 0:
        raise UserError(f"`dvc repro -f` failed (exit {ran.returncode}, output above); the "
                        "workspace holds the run's restored code, params and data")


def find_rebuilt_run(client: Any, run: Any, since_ms: int) -> Any:
    """The newest run tagged imgpipe.reproduces=<run id> of the same stage, started since."""
    run_id, stage = run.info.run_id, run.data.tags[STAGE_TAG]
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(
        experiments, f"tags.`{REPRODUCES_TAG}` = '{run_id}' and tags.`{STAGE_TAG}` = '{stage}' "
        f"and attributes.start_time >= {since_ms}",
        order_by=["attributes.start_time DESC"], max_results=1)
    if found:
        return found[0]
    # Code older than the tag (restored from an old commit) did not set it: the training
    # summary names the new run, which then gets the tag here.
    new_id = train_summary("mlflow_run_id") if stage == "train" else None
    if new_id:
        new = client.get_run(new_id)
        if new.info.start_time >= since_ms and new_id != run_id:
            client.set_tag(new_id, REPRODUCES_TAG, run_id)
            return client.get_run(new_id)
    raise UserError(f"`dvc repro -f` logged no new {stage} run tagged {REPRODUCES_TAG}="
                    f"{run_id} to {tracking_uri()}: check the output above")


# ---------------------------------------------------------------- comparing

def compared_metrics(logged: dict[str, float]) -> list[str]:
    """The logged metrics that do not depend on timing: best_* first, then eval_*."""
    best = [m for m in BEST_METRICS if m in logged]
    return best + sorted(m for m in logged if m.startswith(EVAL_PREFIX))


def compare(logged: dict[str, float], rebuilt: dict[str, float], names: list[str],
            tolerance: float) -> list[Row]:
    """One row per metric: equal when the rebuilt value is within `tolerance` (0: exactly)."""
    rows = []
    for name in names:
        old, new = logged[name], rebuilt.get(name)
        equal = new is not None and (old == new or abs(old - new) <= tolerance
                                     or (math.isnan(old) and math.isnan(new)))
        rows.append(Row(name, old, new, equal))
    return rows


def device_of(client: Any, run: Any) -> str | None:
    """The device type ('cpu', 'cuda') the run trained on, from its training summary artifact."""
    import mlflow

    train = run
    if run.data.tags.get(STAGE_TAG) != "train":  # a pipeline run: ask its train child
        children = client.search_runs(
            [run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}' and "
            f"tags.`{STAGE_TAG}` = 'train'", max_results=1)
        if not children:
            return None
        train = children[0]
    for summary in TRAIN_SUMMARIES:
        try:
            device = mlflow.artifacts.load_dict(f"{train.info.artifact_uri}/{summary.name}")
        except Exception:  # noqa: BLE001 - no such summary logged: try the next, then fall back
            continue
        if device.get("device"):
            return device["device"]
    return None


def train_summary(key: str) -> Any:
    """A value of the train stage's local summary files (see TRAIN_SUMMARIES), or None."""
    for summary in TRAIN_SUMMARIES:
        if summary.is_file():
            value = json.loads(summary.read_text()).get(key)
            if value is not None:
                return value
    return None


def local_device() -> str:
    """The device type the rebuild trained on: metrics/train.json, else what torch sees."""
    device = train_summary("device")
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def format_value(value: Any) -> str:
    """A metric as the table shows it: integers plainly, floats in full (shortest repr)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def format_table(rows: list[Row]) -> str:
    """metric | logged | rebuilt | equal; per-class rows are folded into one when all agree."""
    per_class = [r for r in rows if r.name.startswith(EVAL_PREFIX) and "." in r.name]
    shown = [r for r in rows if r not in per_class or not r.equal]
    lines = [("metric", "logged", "rebuilt", "equal")]
    lines += [(r.name, format_value(r.logged), format_value(r.rebuilt),
               "yes" if r.equal else "no") for r in shown]
    agreeing = [r for r in per_class if r.equal]
    if agreeing:
        lines.append((f"per-class eval_* ({len(agreeing)} more)", "", "", "yes"))
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
                     for line in lines)


# ---------------------------------------------------------------- helpers

def dvc_command() -> list[str]:
    """The dvc of this environment when it has one, else the one on PATH."""
    beside = Path(sys.executable).parent / "dvc"
    return [str(beside)] if beside.exists() else ["dvc"]


def dvc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the dvc CLI, capturing its output."""
    ran = subprocess.run([*dvc_command(), *args], capture_output=True, text=True)
    if check and ran.returncode != 0:
        raise UserError(f"`dvc {' '.join(args)}` failed: {last_error(ran)}")
    return ran


def git(*args: str) -> str:
    """Run git and return its stdout; a failure is one line."""
    ran = subprocess.run(["git", *args], capture_output=True, text=True)
    if ran.returncode != 0:
        raise UserError(f"`git {' '.join(args)}` failed: {last_error(ran)}")
    return ran.stdout


def last_error(ran: subprocess.CompletedProcess) -> str:
    """The first error line a command printed, for a one-line message."""
    lines = [line.strip() for line in (ran.stderr + ran.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("ERROR", "error", "fatal"))]
    return (errors or lines or [f"exit {ran.returncode}"])[0][:300]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line: one MLflow run id."""
    parser = argparse.ArgumentParser(
        prog="imgpipe-reproduce",
        description="Rebuild an MLflow run of imgpipe (its code, params and data) and check "
                    "that the rebuild gives the same metrics.")
    parser.add_argument("run_id", help="the MLflow run id of an imgpipe train or pipeline run")
    return parser.parse_args(argv)


@cli
def main(argv: list[str] | None = None) -> None:
    """Restore the run, rebuild it with `dvc repro -f`, print the comparison; exit 0 if equal."""
    run_id = parse_args(argv).run_id.strip()
    check_repo_root()
    check_clean_workspace()
    client = open_store()
    run = find_run(client, run_id)
    check_made_by_imgpipe(client, run)
    source = find_source(run)
    check_params(run, source.rev)
    check_data_cached(source, run_id)
    names = compared_metrics(run.data.metrics)
    if not names:
        raise UserError(f"MLflow run {run_id} has no best_* or eval_* metrics to compare: "
                        "it did not finish; rebuild a finished run")
    made = (f"DVC experiment {source.experiment} on commit {source.commit[:7]}"
            if source.experiment else f"commit {source.commit[:7]}")
    print(f"rebuilding MLflow run {run_id} ({run.data.tags[STAGE_TAG]} run of {made})")

    since_ms = int(time.time() * 1000)
    restore(source)
    rebuild(run_id, source.commit)
    rebuilt = find_rebuilt_run(client, run, since_ms)

    devices = (device_of(client, run) or local_device(), local_device())
    tolerance = 0.0 if devices == ("cpu", "cpu") else GPU_TOLERANCE
    rows = compare(run.data.metrics, rebuilt.data.metrics, names, tolerance)
    # What the run started from: its data, and the bytes of its pretrained weights, if any.
    for tag in (f"{WEIGHTS_TAG}.sha256", "data.version"):
        logged, again = run.data.tags.get(tag), rebuilt.data.tags.get(tag)
        if logged:
            rows.insert(0, Row(tag, logged, again, logged == again))
    print()
    print(f"MLflow run {run_id} (logged on {devices[0]}) against its rebuild "
          f"{rebuilt.info.run_id} (on {devices[1]}), "
          + ("compared exactly:" if tolerance == 0 else
             f"within a tolerance of {tolerance:g} (absolute), as a GPU is involved:"))
    print(format_table(rows))
    differ = [r.name for r in rows if not r.equal]
    if differ:
        raise UserError(f"the rebuild differs from MLflow run {run_id} in {len(differ)} of "
                        f"{len(rows)} values ({', '.join(differ[:3])}"
                        f"{', ...' if len(differ) > 3 else ''})")
    print(f"all {len(rows)} values equal: MLflow run {rebuilt.info.run_id} rebuilt {run_id}")


if __name__ == "__main__":
    main()
