"""Real MLflow servers on 127.0.0.1 for the tests: started as a user would, killed for real."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from conftest import BIN, env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """An `mlflow server` (or `mlflow ui`) process; `url` is where it answers."""

    def __init__(self, args: list[str], cwd: Path, log: Path, **extra_env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "wb") as out:
            # Own process group: the server forks workers, and kill() must end them all.
            self.proc = subprocess.Popen(
                [str(BIN / "mlflow"), *args, "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=cwd, env=env(**extra_env), stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)

    def wait_ready(self, timeout: float = 90) -> None:
        """Block until /health answers; fail with the server's log if it never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(OSError), \
                    urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                if r.status == 200:
                    return
            time.sleep(0.3)
        self.kill()
        raise AssertionError(f"mlflow did not start on {self.url}:\n"
                             f"{self.log.read_text(errors='replace')[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the server and its workers: the server just goes away."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


def start_server(tmp: Path) -> MlflowServer:
    """A running `mlflow server` with a sqlite backend and an artifacts folder under tmp."""
    tmp.mkdir(parents=True, exist_ok=True)
    server = MlflowServer(["server", "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}",
                           "--artifacts-destination", str(tmp / "artifacts"),
                           "--workers", "1"], tmp, tmp / "server.log")
    server.wait_ready()
    return server


@contextlib.contextmanager
def mlflow_ui(repo: Path) -> Iterator[MlflowServer]:
    """`mlflow ui` started in the repository root, the way the README says."""
    server = MlflowServer(["ui", "--workers", "1"], repo, repo.parent / "mlflow-ui.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.kill()
