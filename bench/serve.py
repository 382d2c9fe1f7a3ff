"""Serving benchmark: images/s through `mlflow models serve` against imgpipe-predict, same files.

    python bench/serve.py                   # 64 photo-like JPEGs of 320x240, at 224 px
    python bench/serve.py --images 128 --size 64

One model (a SmallCNN at --size px; its weights do not change the cost) is logged the way
the evaluate stage logs it (serving.log_model) into a throwaway MLflow store, and served by
a real `mlflow models serve --env-manager local` on 127.0.0.1. Each row is the median of
--repeats runs over the same files, after one warm-up:
- served: one request holding every image base64-encoded (JSON, HTTP, decode, model);
- imgpipe-predict: the command, start to end (Python, torch and the model load included);
- in process: predict.classify alone, the decode-and-model work both of them do.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
from shared import make_dataset  # bench/shared.py also puts the repository root on sys.path

from stages import predict, serving, tracking
from stages.imaging import IMAGENET_MEAN, IMAGENET_STD
from stages.models import create_model, load_checkpoint

BIN = Path(sys.executable).parent


def write_model(path: Path, size: int) -> None:
    """An untrained 10-class SmallCNN checkpoint at `size` px, laid out as models/model.pt."""
    torch.manual_seed(0)
    model = create_model("smallcnn", 10)
    torch.save({"state_dict": {k: v.contiguous() for k, v in model.state_dict().items()},
                "model": "smallcnn", "classes": [f"c{i}" for i in range(10)],
                "image_size": size, "resize": "squash", "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD)}, path)


def log_served_model(folder: Path, model: Path, example: Path) -> str:
    """Log the model as evaluate does, into a store under folder; returns its runs:/ URI."""
    import mlflow

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    with mlflow.start_run() as run:
        log = tracking.RunLogger(run.info.run_id)
        serving.log_model(log, model, example.read_bytes(), top_k=3, register_as=None)
    assert log.unlogged() is None, log.unlogged()
    return f"runs:/{run.info.run_id}/model"


def start_server(uri: str, folder: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow models serve` on a free port; returns the process and its URL once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(folder / "serve.log", "wb")  # noqa: SIM115 - open for the server's lifetime
    proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", uri,
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            # it runs uvicorn from PATH: this environment's
                            env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the model server did not start:\n{(folder / 'serve.log').read_text()}")


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() over repeats runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    """Time the three ways over the same files and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=224, help="model input size in px")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = [Path(p) for p in make_dataset(folder / "images", args.images, workers=2,
                                               size=(320, 240))["path"]]
        model = folder / "model.pt"
        write_model(model, args.size)
        uri = log_served_model(folder, model, files[0])
        body = json.dumps({"dataframe_split": {
            "columns": ["image"],
            "data": [[base64.b64encode(p.read_bytes()).decode()] for p in files]}}).encode()
        proc, url = start_server(uri, folder)
        try:
            def request() -> None:
                post = urllib.request.Request(f"{url}/invocations", data=body,
                                              headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(post, timeout=300) as answer:
                    rows = json.loads(answer.read())["predictions"]
                assert len(rows) == len(files) and not any(r["error"] for r in rows)

            served = timed(request, args.repeats)
        finally:
            os.killpg(proc.pid, 9)
        command = [str(BIN / "imgpipe-predict"), *map(str, files), "--model", str(model)]
        cli = timed(lambda: subprocess.run(command, check=True, capture_output=True),
                    max(1, args.repeats // 2))
        net, checkpoint = load_checkpoint(model)
        device = torch.device("cpu")
        in_process = timed(lambda: list(predict.classify(files, net, checkpoint, device)),
                           args.repeats)

    n = len(files)
    print(f"\n{n} JPEGs of 320x240 -> {args.size} px, SmallCNN, CPU "
          f"({torch.get_num_threads()} threads), median of {args.repeats}")
    print(f"{'path':<40}{'seconds':>10}{'img/s':>10}{'vs predict':>12}")
    for name, seconds in (("served: one request of all images", served),
                          ("imgpipe-predict, whole command", cli),
                          ("in process: predict.classify", in_process)):
        print(f"{name:<40}{seconds:>10.3f}{n / seconds:>10.0f}{cli / seconds:>11.2f}x")


if __name__ == "__main__":
    main()
