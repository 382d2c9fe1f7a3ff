"""The MLflow side of every stage: where the store is, and the run each stage logs into."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stages.common import UserError, repo_root

try:
    import fcntl
except ImportError:  # Windows: no flock; parallel first runs are then not guarded
    fcntl = None

STORE_FILE = "mlflow.db"
# The tag that names the pipeline execution a parent run stands for (see pipeline_key).
PIPELINE_TAG = "imgpipe.pipeline"
PARENT_TAG = "mlflow.parentRunId"  # what MLflow's own nested runs use: the UI nests by it
MODEL_RUN_TAG = "imgpipe.model_run"  # on an evaluate run of its own: the run that trained it
WEIGHTS_TAG = "imgpipe.weights"  # on a train run: the pretrained weights it started from
ARTIFACTS_DIR = "mlartifacts"
# Beside the store, matched by .gitignore's /mlflow.db-*: serialises creating the store.
LOCK_SUFFIX = "-lock"
# MLflow's own defaults retry a dead server for about 4 minutes per call; a stage
# should notice in seconds and go on training. The user's own settings win.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else the sqlite store at the repository root.

    A relative sqlite path (`sqlite:///m.db`, MLflow's documented form) is taken from
    the repository root, DVC_ROOT included, so that queued experiments share the store.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / STORE_FILE}"
    db = sqlite_path(uri)
    if db is not None and not db.is_absolute():
        return f"sqlite:///{repo_root() / db}"
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// tracking URI, or None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])  # ?timeout=... options


def check_reachable(uri: str) -> None:
    """Fail fast, in one line, when the tracking store cannot be used."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5):
                pass
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise UserError(
                f"MLflow server {uri} is unreachable ({reason}): start it, "
                "or unset MLFLOW_TRACKING_URI to use the local store"
            ) from None
    elif (db := sqlite_path(uri)) is not None:
        folder = db.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise UserError(f"MLflow store folder {folder} is missing or not writable: "
                            "fix it or set MLFLOW_TRACKING_URI")


@contextlib.contextmanager
def store_lock(db: Path | None) -> Iterator[None]:
    """Hold an exclusive lock beside a sqlite store (no-op for servers and on Windows).

    MLflow creates a fresh sqlite store by running its schema migrations with no lock
    of its own, so parallel first runs (`dvc queue start -j 2`) break each other
    ("table _alembic_tmp_metrics already exists", "duplicate column name").
    """
    if db is None or fcntl is None:
        yield
        return
    with open(db.with_name(db.name + LOCK_SUFFIX), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _use_wal(db: Path) -> None:
    """Create the sqlite store in WAL mode: readers (the UI) never block a writing stage."""
    if db.exists() and db.stat().st_size > 0:
        return  # journal mode is stored in the file: set once, at creation
    with contextlib.closing(sqlite3.connect(db, timeout=60)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")


def connect(experiment: str) -> str:
    """Point MLflow at the store and return the id of `experiment`, creating it if needed."""
    import mlflow

    uri = tracking_uri()
    check_reachable(uri)
    if uri.startswith(("http://", "https://")):
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
    mlflow.set_tracking_uri(uri)
    db = sqlite_path(uri)
    # Creating the store and the experiment happens once per store, under the lock;
    # after that, MLflow's own 20 s sqlite busy timeout covers parallel writers.
    with store_lock(db):
        try:
            if db is not None:
                _use_wal(db)
            found = mlflow.get_experiment_by_name(experiment)
            if found is not None:
                return found.experiment_id
            location = None
            if db is not None:
                # Absolute, so that runs from `dvc exp run --temp` keep their artifacts.
                location = (db.parent / ARTIFACTS_DIR).as_uri()
            return mlflow.create_experiment(experiment, artifact_location=location)
        except Exception as err:  # noqa: BLE001 - any store that fails here fails the same way
            with contextlib.suppress(Exception):
                found = mlflow.get_experiment_by_name(experiment)
                if found is not None:  # another process (without the lock: a server) made it
                    return found.experiment_id
            raise UserError(f"MLflow store {uri} cannot be used ({_reason(err)}): fix "
                            "MLFLOW_TRACKING_URI, or unset it to use the local store") from None


def file_digest(path: str | Path, length: int = 12) -> str:
    """A short sha256 of a file: the data version when applied to the manifest."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def git_commit() -> str | None:
    """The git commit the run starts from: DVC's baseline inside experiments, else HEAD.

    imgpipe-reproduce sets IMGPIPE_GIT_COMMIT to the rebuilt run's commit: it applies an
    experiment's files on top of whatever HEAD is, so HEAD is not where the code came from.
    """
    for name in ("DVC_EXP_BASELINE_REV", "IMGPIPE_GIT_COMMIT"):
        if os.environ.get(name):
            return os.environ[name]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def run_tags(stage: str, data_version: str | None) -> dict[str, str]:
    """Tags that say which stage, DVC experiment, git commit and data produced a run."""
    tags = {"imgpipe.stage": stage}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["git.commit"] = commit
    if data_version:
        tags["data.version"] = data_version
    # Set by imgpipe-reproduce (stages/reproduce.py) around its `dvc repro`: pairs the runs.
    if os.environ.get("IMGPIPE_REPRODUCES"):
        tags["imgpipe.reproduces"] = os.environ["IMGPIPE_REPRODUCES"]
    return tags


def all_params() -> dict[str, Any]:
    """Every param of params.yaml by dotted name, or none when it is missing or invalid."""
    from stages import params

    try:
        return params.flat_values(params.load())
    except UserError:
        return {}


def params_digest(params: dict[str, Any]) -> str:
    """A short sha256 of the params' values (params.yaml's comments and layout aside)."""
    text = json.dumps(params, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def pipeline_key(data_version: str | None, params: dict[str, Any]) -> str:
    """Which pipeline execution a stage run belongs to: one parent run per key.

    Inside `dvc exp run` it is the experiment's name (with its baseline commit, as names
    are only unique per baseline). Outside, it is the commit, the data version and a digest
    of params.yaml: the digest keeps two uncommitted `dvc repro`s with other params (say
    another lr) apart, as their parent's params, logged once, could not hold both.
    IMGPIPE_REPRODUCES (a run id, set when reproducing a run) makes its own execution.
    """
    commit = git_commit() or ""
    name = os.environ.get("DVC_EXP_NAME")
    key = f"exp:{name}@{commit}" if name else \
        f"repro:{commit}:{data_version or ''}:{params_digest(params)}"
    if os.environ.get("IMGPIPE_REPRODUCES"):
        key += f":reproduces:{os.environ['IMGPIPE_REPRODUCES']}"
    return re.sub(r"[^\w.:@/+-]", "_", key)  # MLflow's filter strings have no quote escapes


def pipeline_run_name() -> str:
    """The parent run's name: the experiment's, else repro-<commit> (like DVC's rows)."""
    name = os.environ.get("DVC_EXP_NAME")
    if name:
        return name
    commit = git_commit()
    return f"repro-{commit[:7]}" if commit else "repro"


def find_or_create_pipeline_run(experiment_id: str, data_version: str | None) -> str:
    """The id of this execution's parent run, made (with every param) if it is the first stage.

    Looked up by its PIPELINE_TAG under the store lock, so that parallel queued
    experiments never make two parents for one key (with a server there is no lock,
    but each queued experiment has its own key).
    """
    import mlflow
    from mlflow.entities import Param

    client = mlflow.MlflowClient()
    params = all_params()
    key = pipeline_key(data_version, params)
    with store_lock(sqlite_path(tracking_uri())):
        found = client.search_runs([experiment_id], f"tags.`{PIPELINE_TAG}` = '{key}'",
                                   max_results=1, order_by=["attributes.start_time ASC"])
        if found:
            return found[0].info.run_id
        tags = run_tags("pipeline", data_version) | {PIPELINE_TAG: key}
        run = client.create_run(experiment_id, tags=tags, run_name=pipeline_run_name())
        # log_batch splits the params into batches of MLflow's maximum itself.
        client.log_batch(run.info.run_id,
                         params=[Param(k, str(v)) for k, v in params.items()])
        return run.info.run_id


# The parent run of the stage run in progress: stage_run sets it, stages log their
# headline numbers into it (tracking.RunLogger(tracking.pipeline_run_id())).
_pipeline: dict[str, str] = {}


def pipeline_run_id() -> str:
    """The id of the parent run of the stage run in progress (inside stage_run only)."""
    if "run_id" not in _pipeline:
        raise RuntimeError("pipeline_run_id() is only known inside tracking.stage_run")
    return _pipeline["run_id"]


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'epochs': 3}} -> {'train.epochs': 3}, the way MLflow shows params."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


@contextlib.contextmanager
def stage_run(experiment: str, stage: str, params: dict[str, Any],
              data_version: str | None = None, run_id: str | None = None,
              model_run: str | None = None) -> Iterator[Any]:
    """Start (or, with run_id, continue) the MLflow run a stage logs into.

    The run is a child of the pipeline execution's parent run (find_or_create_pipeline_run),
    so that the runs list shows one row per `dvc repro` or experiment. A run that is
    continued (resumed training) keeps the parent it has. model_run (evaluate) is the run
    that trained the model: it is continued when it belongs to this execution, so that one
    run holds the curves and the held-out metrics; a model trained by an earlier execution
    (only evaluate reran, say `-S evaluate.top_k=5`) is evaluated in a new run tagged
    MODEL_RUN_TAG, and the earlier execution's run keeps its own results. The parent's
    status follows its latest stage: RUNNING while one runs, then FINISHED or FAILED.

    If the store goes away while the stage runs, what the stage wrote locally is
    kept, and the stage ends with one line saying what was not logged (exit 1 via
    `common.cli`): the run is incomplete, so DVC must not record the stage as done.
    """
    import mlflow

    experiment_id = connect(experiment)
    try:
        parent = find_or_create_pipeline_run(experiment_id, data_version)
        mlflow.MlflowClient().update_run(parent, "RUNNING")
        tags = run_tags(stage, data_version)
        continued = None  # the run this stage continues, fetched once
        if model_run is not None:
            trained = _get_run(model_run)
            if trained is not None and trained.data.tags.get(PARENT_TAG) == parent:
                continued = trained  # trained in this execution: one run holds it all
            else:
                where = "an earlier execution" if trained else f"not in {tracking_uri()}"
                print(f"note: the model was trained by MLflow run {model_run} ({where}): "
                      f"the {stage} stage logs to a new run tagged {MODEL_RUN_TAG}")
                tags[MODEL_RUN_TAG] = model_run
        elif run_id is not None:
            continued = _get_run(run_id)
            if continued is None:
                print(f"note: MLflow run {run_id} is not in {tracking_uri()}: "
                      "logging to a new run")
        if continued is None:
            run = mlflow.start_run(experiment_id=experiment_id, run_name=_run_name(stage),
                                   tags=tags, parent_run_id=parent)
        else:
            has_parent = PARENT_TAG in continued.data.tags
            run = mlflow.start_run(run_id=continued.info.run_id,
                                   tags=None if has_parent else {PARENT_TAG: parent})
    except Exception as err:
        lost = _store_gone(err, None, stage)
        if lost is None:
            raise
        raise UserError(lost) from None
    _pipeline["run_id"] = parent
    status = "FAILED"
    try:
        if params:
            mlflow.log_params(flatten(params))
        yield run
        status = "FINISHED"
    except UserError:
        raise
    except Exception as err:
        lost = _store_gone(err, run.info.run_id, stage)
        if lost is None:
            raise
        raise UserError(lost) from None
    finally:
        # A run that lost some of its logging is marked FAILED: it is not the whole record.
        lost = run.info.run_id in _FAILED or parent in _FAILED
        _end_run("FAILED" if lost else status, parent)
        _pipeline.clear()
    failed = _FAILED.get(run.info.run_id) or _FAILED.get(parent)
    if failed is not None:
        raise UserError(f"{failed.unlogged()}; the {stage} stage's local outputs are "
                        "complete, and the next `dvc repro` runs it again to log it all")


def _store_gone(err: Exception, run_id: str | None, stage: str) -> str | None:
    """One line for an MLflow call that failed because the store went away, else None."""
    try:
        check_reachable(tracking_uri())
        return None  # the store is fine: a real bug, keep its traceback
    except UserError as gone:
        first = _reason(err)
        failed = _FAILED.get(run_id) if run_id else None
        earlier = f"; before that, {failed.unlogged()}" if failed is not None else ""
        what = f"the rest of run {run_id}" if run_id else "the whole stage"
        return (f"{gone}; the {stage} stage stopped at an MLflow call ({first}); "
                f"not logged: {what}{earlier}")


def _end_run(status: str, parent: str) -> None:
    """End the active run and its parent; a store that is gone costs one quick try."""
    import mlflow

    try:
        check_reachable(tracking_uri())
        reachable = True
    except UserError:
        reachable = False
    saved = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    if not reachable:
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        mlflow.end_run(status)
        mlflow.MlflowClient().set_terminated(parent, status)
    except Exception as err:  # noqa: BLE001 - the caller reports what was lost
        if reachable:
            print(f"warning: MLflow run could not be closed ({_reason(err)})")
    finally:
        if not reachable:
            if saved is None:
                os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
            else:
                os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = saved


def _reason(err: BaseException) -> str:
    """The first line of an MLflow error, short: a dead server is named as such."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "API request to" in text and ("Max retries exceeded" in text or "Connection" in text):
        return f"server {tracking_uri()} stopped answering"
    return text[:200]


def _get_run(run_id: str) -> Any:
    """The run run_id in the current store, or None when the store does not hold it."""
    import mlflow

    try:
        return mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return None


def metric_key(name: str) -> str:
    """Replace characters MLflow refuses in metric names (class names can hold anything)."""
    return re.sub(r"[^\w.\- /]", "_", name)


def _run_name(stage: str) -> str:
    name = os.environ.get("DVC_EXP_NAME")
    return f"{name}-{stage}" if name else stage


# Loggers that lost something, by run id: stage_run reports them when the stage ends,
# even after the stage's code has dropped its logger.
_FAILED: dict[str, RunLogger] = {}


class RunLogger:
    """Logs into one MLflow run, and keeps going if the store goes away mid-run.

    Training must never be lost because tracking failed: after the first error
    every call is skipped, and `unlogged()` says what did not reach the store.
    """

    def __init__(self, run_id: str):
        import mlflow

        self.run_id = run_id
        self.client = mlflow.MlflowClient()
        self.error: str | None = None
        self.missed: Counter = Counter()

    def call(self, what: str, count: int, fn: Any, *args: Any, **kwargs: Any) -> None:
        """Run one MLflow call; after the first failure, only count `count` of `what` as missed."""
        if self.error is None:
            try:
                fn(*args, **kwargs)
                return
            except Exception as err:  # noqa: BLE001 - any store failure is handled the same way
                self.error = _reason(err)
                _FAILED[self.run_id] = self
                print(f"warning: MLflow logging failed ({self.error}); "
                      "training goes on, outputs are still written locally")
        self.missed[what] += count

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        """Log several metrics at one step."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in values.items()]
        self.call("metric values", len(batch), self.client.log_batch, self.run_id,
                   metrics=batch)

    def series(self, key: str, values: list[float], first_step: int) -> None:
        """Log a run of values of one metric at consecutive steps (e.g. the loss of each step)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(v), now, first_step + i) for i, v in enumerate(values)]
        for start in range(0, len(batch), 1000):  # MLflow caps a batch at 1000 metrics
            self.call("metric values", len(batch[start:start + 1000]), self.client.log_batch,
                       self.run_id, metrics=batch[start:start + 1000])

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        """Upload one file into the run's artifacts."""
        self.call(f"artifact {Path(path).name}", 1, self.client.log_artifact, self.run_id,
                   str(path), folder)

    def tags(self, values: dict[str, str]) -> None:
        """Set tags on the run."""
        for key, value in values.items():
            self.call("tags", 1, self.client.set_tag, self.run_id, key, value)

    def unlogged(self) -> str | None:
        """One line on what never reached the store, or None if everything did."""
        if self.error is None:
            return None
        lost = ", ".join(f"{n} {what}" for what, n in self.missed.items())
        return f"MLflow store failed ({self.error}): not logged: {lost or 'nothing yet'}"
