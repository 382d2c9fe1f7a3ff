"""Serving benchmark: images/s through `mlflow models serve` against imgpipe-predict, same files.

    python bench/serve.py                   # 64 photo-like JPEGs of 320x240, at 224 px
    python bench/serve.py --images 128 --size 64
    python bench/serve.py --clients 20 --requests 40 --images 50 --size 64   # under load
    python bench/serve.py --clients 4 --requests 16 --images 8 --model resnet18

One untrained model (--model at --size px; its weights do not change the cost) is logged
the way the evaluate stage logs it (serving.log_model) into a throwaway MLflow store, and
served by a real `mlflow models serve --env-manager local` on 127.0.0.1.

One request (the default): each row is the median of --repeats runs over the same files,
after one warm-up:
- served: one request holding every image base64-encoded (JSON, HTTP, decode, model);
- imgpipe-predict: the command, start to end (Python, torch and the model load included);
- in process: predict.classify alone, the decode-and-model work both of them do.

Under load (--clients N): --requests requests of --images distinct images each, N at a
time, after one warm-up request. It prints p50/p95 latency, images/s over the whole run
and the peak memory (VmHWM) of the largest serving process, beside imgpipe-predict once
over the same files (its own VmHWM as it exits). --big K then sends one request of K
random 512x512 PNGs (about 1 MB each), and prints its answer, its seconds and the server's
peak memory after it.
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
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import torch
from shared import make_dataset  # bench/shared.py also puts the repository root on sys.path

from stages import predict, serving, tracking
from stages.imaging import IMAGENET_MEAN, IMAGENET_STD
from stages.models import create_model, load_checkpoint

BIN = Path(sys.executable).parent


def write_model(path: Path, size: int, name: str = "smallcnn") -> None:
    """An untrained 10-class checkpoint at `size` px, laid out as models/model.pt."""
    torch.manual_seed(0)
    model = create_model(name, 10)
    torch.save({"state_dict": {k: v.contiguous() for k, v in model.state_dict().items()},
                "model": name, "classes": [f"c{i}" for i in range(10)],
                "image_size": size, "resize": "squash", "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD)}, path)


def log_served_model(folder: Path, model: Path, example: Path) -> str:
    """Log the model as evaluate does, into a store under folder; returns its runs:/ URI."""
    import mlflow

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    # Artifacts under folder too: the default is ./mlruns in the current folder.
    experiment = mlflow.create_experiment("serve-bench", (folder / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        log = tracking.RunLogger(run.info.run_id)
        serving.log_model(log, model, example.read_bytes(), top_k=3, register_as=None)
    assert log.unlogged() is None, log.unlogged()
    return f"runs:/{run.info.run_id}/model"


def start_server(uri: str, folder: Path, workers: int = 1) -> tuple[subprocess.Popen, str]:
    """`mlflow models serve` on a free port; returns the process and its URL once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(folder / "serve.log", "wb")  # noqa: SIM115 - open for the server's lifetime
    proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", uri,
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port),
                             "--workers", str(workers)],
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


def body_of(files: list[Path]) -> bytes:
    """The JSON request holding files base64-encoded, one per row."""
    return json.dumps({"dataframe_split": {
        "columns": ["image"],
        "data": [[base64.b64encode(p.read_bytes()).decode()] for p in files]}}).encode()


def post(url: str, body: bytes, rows: int) -> float:
    """POST one request to /invocations; its seconds, once every row was answered."""
    started = time.perf_counter()
    request = urllib.request.Request(f"{url}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as answer:
        predictions = json.loads(answer.read())["predictions"]
    assert len(predictions) == rows and not any(r["error"] for r in predictions)
    return time.perf_counter() - started


def big_request(url: str, count: int) -> tuple[str, float]:
    """One request of count random 512x512 PNGs: the server's answer in short, and seconds."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    values = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(buffer, "PNG")
        values.append([base64.b64encode(buffer.getvalue()).decode()])
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": values}}).encode()
    del values
    started = time.perf_counter()
    request = urllib.request.Request(f"{url}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as answer:
            said = f"{answer.status}, {len(json.loads(answer.read())['predictions'])} rows"
    except urllib.error.HTTPError as err:
        said = f"{err.code}: {json.loads(err.read())['message'].rsplit('Error: ', 1)[-1]}"
    return f"{len(body) / 1e6:.0f} MB body -> {said}", time.perf_counter() - started


def peak_rss(pid: int) -> int:
    """The largest peak resident memory (VmHWM, bytes) of a process and its descendants."""
    root = psutil.Process(pid)
    peaks = []
    for proc in [root, *root.children(recursive=True)]:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) * 1024)
    return max(peaks)


# Runs a console script and prints its own peak memory as it exits. Its parent's rusage
# would not do: a child forked from this big process counts the pages it shared with us.
PEAK_AT_EXIT = """
import atexit, runpy, sys
def peak():
    print(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")), file=sys.stderr)
atexit.register(peak)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def predict_command(files: list[Path], model: Path) -> tuple[float, int]:
    """imgpipe-predict over files, start to end: its seconds and peak memory (bytes)."""
    command = [sys.executable, "-c", PEAK_AT_EXIT, str(BIN / "imgpipe-predict"),
               *map(str, files), "--model", str(model)]
    started = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, check=True)
    seconds = time.perf_counter() - started
    peak = done.stderr[done.stderr.rindex("VmHWM:"):].split()[1]  # in kB
    return seconds, int(peak) * 1024


def one_request(args: argparse.Namespace, folder: Path, files: list[Path], model: Path,
                uri: str) -> None:
    """The default: one request of every image, imgpipe-predict, and predict.classify."""
    body = body_of(files)
    proc, url = start_server(uri, folder, args.workers)
    try:
        served = timed(lambda: post(url, body, len(files)), args.repeats)
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
    print(f"\n{n} JPEGs of {args.photo} -> {args.size} px, {args.model}, CPU "
          f"({torch.get_num_threads()} threads), median of {args.repeats}")
    print(f"{'path':<40}{'seconds':>10}{'img/s':>10}{'vs predict':>12}")
    for name, seconds in (("served: one request of all images", served),
                          ("imgpipe-predict, whole command", cli),
                          ("in process: predict.classify", in_process)):
        print(f"{name:<40}{seconds:>10.3f}{n / seconds:>10.0f}{cli / seconds:>11.2f}x")


def under_load(args: argparse.Namespace, folder: Path, files: list[Path], model: Path,
               uri: str) -> None:
    """--requests requests of --images images each, --clients at a time, then imgpipe-predict."""
    bodies = [body_of(files[i:i + args.images]) for i in range(0, len(files), args.images)]
    proc, url = start_server(uri, folder, args.workers)
    try:
        idle = peak_rss(proc.pid)
        post(url, bodies[0], args.images)  # warm-up: the first forward pass allocates
        started = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            latencies = list(pool.map(lambda body: post(url, body, args.images), bodies))
        wall = time.perf_counter() - started
        peak = peak_rss(proc.pid)
        big = big_request(url, args.big) if args.big else None
        big_peak = peak_rss(proc.pid)
        post(url, bodies[0], args.images)  # it still answers
    finally:
        os.killpg(proc.pid, 9)
    cli, cli_peak = predict_command(files, model)

    n, mib = len(files), 2 ** 20
    p50, p95 = np.percentile(latencies, [50, 95])
    print(f"\n{len(bodies)} requests of {args.images} JPEGs of {args.photo} -> {args.size} px, "
          f"{args.clients} at a time, {args.model}, CPU ({os.cpu_count()} cores), "
          f"{args.workers} server worker(s)")
    print(f"{'path':<34}{'seconds':>9}{'img/s':>8}{'p50 s':>8}{'p95 s':>8}{'peak MiB':>10}")
    print(f"{'served, ' + str(args.clients) + ' clients':<34}{wall:>9.2f}{n / wall:>8.0f}"
          f"{p50:>8.2f}{p95:>8.2f}{peak / mib:>10.0f}  (idle {idle / mib:.0f})")
    print(f"{'imgpipe-predict, whole command':<34}{cli:>9.2f}{n / cli:>8.0f}{'':>8}{'':>8}"
          f"{cli_peak / mib:>10.0f}")
    if big:
        print(f"then {args.big} random 512x512 PNGs in one request: {big[0]} in {big[1]:.1f} s; "
              f"server peak {big_peak / mib:.0f} MiB; the next request was answered")


def main() -> None:
    """Time serving against imgpipe-predict over the same files and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="images per request")
    parser.add_argument("--size", type=int, default=224, help="model input size in px")
    parser.add_argument("--model", default="smallcnn", help="smallcnn, resnet18, ...")
    parser.add_argument("--photo", default="320x240", help="generated JPEGs' WxH")
    parser.add_argument("--repeats", type=int, default=5, help="one-request mode's runs")
    parser.add_argument("--clients", type=int, default=0,
                        help="under load: this many requests at a time (default: one request)")
    parser.add_argument("--requests", type=int, default=0,
                        help="under load: requests in all (default: 2 per client)")
    parser.add_argument("--big", type=int, default=0,
                        help="under load: then one request of this many random 512x512 PNGs")
    parser.add_argument("--workers", type=int, default=1,
                        help="mlflow models serve --workers (default: %(default)s)")
    args = parser.parse_args()
    width, height = map(int, args.photo.split("x"))
    count = args.images * (args.requests or 2 * args.clients) if args.clients else args.images

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = [Path(p) for p in make_dataset(folder / "images", count, workers=2,
                                               size=(width, height))["path"]]
        model = folder / "model.pt"
        write_model(model, args.size, args.model)
        uri = log_served_model(folder, model, files[0])
        (under_load if args.clients else one_request)(args, folder, files, model, uri)


if __name__ == "__main__":
    main()
