"""What every stage shares: params, paths, one-line errors and atomic writes."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

PARAMS_FILE = "params.yaml"


class UserError(Exception):
    """A problem the user can fix; printed as one line, never a traceback."""


def cli(main: Callable[..., Any]) -> Callable[..., Any]:
    """Run a stage's main(): a UserError becomes one line on stderr and exit code 1."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper


def load_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """Read params.yaml as a dict."""
    try:
        with open(path, encoding="utf-8") as f:
            params = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise UserError(f"{path} not found: run the stage from the repository root") from None
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise UserError(f"{path}{where} is not valid YAML: fix it and run again") from None
    if not isinstance(params, dict):
        raise UserError(f"{path} must be a mapping of keys to values")
    return params


def machine_cores() -> int:
    """The CPU cores this process may run on: its affinity mask (taskset, containers), if known."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # macOS and Windows


def processes(workers: int) -> int:
    """A `workers` param as a process count: 0 means one per core."""
    return workers or machine_cores()


def repo_root() -> Path:
    """The real repository root: DVC_ROOT inside `dvc exp run`, else the current directory."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def cache_root() -> Path:
    """Caches that outlive DVC's outputs: IMGPIPE_CACHE, else <repo root>/.cache/imgpipe.

    Resolved through repo_root(), so `dvc exp run --queue/--temp` share the workspace's.
    """
    return Path(os.environ.get("IMGPIPE_CACHE") or repo_root() / ".cache" / "imgpipe")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs should look like any file
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | Path, data: Any) -> None:
    """Write `data` as pretty JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_csv(path: str | Path, frame: Any) -> None:
    """Write a pandas DataFrame as CSV, atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
