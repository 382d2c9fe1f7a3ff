"""Shared fixtures: a real git + DVC repository in a temp folder, driven by the real CLIs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# What a user's clone holds that the pipeline needs.
PROJECT_FILES = ["stages", "dvc.yaml", "params.yaml", ".dvc/config", ".gitignore",
                 ".dvcignore", "data/.gitignore", "pyproject.toml", "weights/README.md"]
# Tiny settings so that a full `dvc repro` takes seconds.
# lr differs from params.yaml's, so that `-S lr=0.05` in a test is a real change.
FAST_PARAMS = {"lr": 0.1, "preprocess": {"image_size": 8}, "workers": 1,
               "train": {"epochs": 2, "batch_size": 32}}


def env(**extra: str) -> dict[str, str]:
    """The environment the CLIs run in: this venv first on PATH, a fixed git identity."""
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e.update(GIT_AUTHOR_NAME="imgpipe tests", GIT_AUTHOR_EMAIL="tests@imgpipe.invalid",
             GIT_COMMITTER_NAME="imgpipe tests", GIT_COMMITTER_EMAIL="tests@imgpipe.invalid",
             DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1")
    e.pop("MLFLOW_TRACKING_URI", None)
    e.pop("DVC_ROOT", None)
    e.update(extra)
    return e


def run(cmd: list[str], cwd: Path, check: bool = True, **extra_env: str
        ) -> subprocess.CompletedProcess:
    """Run a command in cwd; on failure, show its output in the assertion."""
    proc = subprocess.run(cmd, cwd=cwd, env=env(**extra_env), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-4000:]}")
    return proc


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The command failed with exit 1 and a single `error:` line, no traceback."""
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def dvc(repo: Path, *args: str, check: bool = True, **extra_env: str
        ) -> subprocess.CompletedProcess:
    """Run the real dvc CLI in repo."""
    return run([str(BIN / "dvc"), *args], repo, check=check, **extra_env)


def dvc_on_screen(repo: Path, *args: str, columns: int = 120) -> list[str]:
    """What the real dvc CLI shows on the first screen of a terminal `columns` wide.

    It runs on a pseudo-terminal, so dvc pages its output as in a user's shell. DVC's
    default pager is `less -S`, which chops each line at the terminal's width; `cat`
    stands in for it here, and the lines are chopped the same way.
    """
    import fcntl
    import pty
    import re
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    proc = subprocess.Popen([str(BIN / "dvc"), *args], cwd=repo, stdin=follower,
                            stdout=follower, stderr=follower,
                            env=env(DVC_PAGER="cat", COLUMNS=str(columns)))
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: dvc exited
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    assert proc.wait(timeout=120) == 0, shown.decode(errors="replace")
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.decode())  # colours, cursor moves
    return [line[:columns] for line in text.splitlines()]


def git(repo: Path, *args: str) -> str:
    """Run git in repo and return its stdout."""
    return run(["git", *args], repo).stdout


def merge(base: dict, override: dict) -> dict:
    """Deep-merge override into a copy of base."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and key in out else value
    return out


def set_params(repo: Path, **override: object) -> None:
    """Change params.yaml in repo (nested dicts merge into sections)."""
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump(merge(params, override), sort_keys=False))


def make_repo(path: Path, images: int | None = 200, params: dict | None = None) -> Path:
    """A fresh clone-like repo at path: project files, git, DVC, and the first `images` digits."""
    from stages.sample import write_digits

    path.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, path / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, path / name)
    set_params(path, **merge(FAST_PARAMS, params or {}))
    git(path, "init", "-q", "-b", "main")
    if images:
        write_digits(path / "data" / "raw", limit=images)
        dvc(path, "add", "-q", "data/raw")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "initial")
    return path


def mlflow_runs(repo: Path, experiment: str = "imgpipe", uri: str | None = None) -> list:
    """Every run in the repo's default MLflow store (or the store at uri), newest first."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri or f"sqlite:///{repo / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs([found.experiment_id], max_results=1000)


@pytest.fixture(scope="session")
def built_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repo on which `dvc repro` has run once; copy it with `clone_built` before changing it."""
    repo = make_repo(tmp_path_factory.mktemp("built") / "repo")
    dvc(repo, "repro")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "first repro")
    return repo


@pytest.fixture
def clone_built(built_repo: Path, tmp_path: Path):
    """Return a function that copies the built repo (with its DVC cache and MLflow store)."""

    def clone() -> Path:
        return copy_repo(built_repo, tmp_path)

    return clone


def copy_repo(repo: Path, tmp_path: Path) -> Path:
    """A copy of repo (with its DVC cache and MLflow store) at tmp_path/repo, to change freely.

    Copied by `cp` in its own process: closing any file of a sqlite store drops all of
    this process's POSIX locks on it, so an in-process copy while this process holds the
    store open (MlflowClient) lets the next subprocess delete the WAL under it, and this
    process then reads "disk I/O error".
    """
    target = tmp_path / "repo"
    subprocess.run(["cp", "-a", str(repo), str(target)], check=True)
    return target
