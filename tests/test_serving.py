"""The MLflow model takes pictures: in process, and behind a real `mlflow models serve`.

One module-scoped repository is trained well enough to read unseen digits, with its model
registered as `train.register_as`; one module-scoped server serves `models:/<name>/latest`
as the README says, and a second one is started the way an operator allows one folder of
images and lowers the limits.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import BIN, dvc, env, make_repo, run
from servers import MlflowServer
from test_predict import write_unseen_digits

from stages import predict
from stages.models import load_checkpoint
from stages.serving import FOLDER_ENV, NOT_A_FILE, OUTSIDE, PATHS_REFUSED, ServeConfig

NAME = "digits"
TORCH_EXPORT_REFUSAL = "exported by `torch.export` API"


def b64(data: bytes) -> str:
    """Bytes as the base64 text a client sends."""
    return base64.b64encode(data).decode("ascii")


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose header declares width x height pixels: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


BAD = {  # what a client may send, and the start of the error each one gets
    "empty": ("", "empty image"),
    "not base64": ("this is not base64 !", "not valid base64"),
    "not an image": (b64(b"just some text, base64-encoded"), "not an image Pillow can read"),
    "truncated": (b64(b"\x89PNG\r\n\x1a\n truncated"), "corrupt image"),
    "bomb": (b64(png_bomb()), "too many pixels"),
}


def model_uri(repo: Path) -> str:
    """The runs:/ URI of the model that the training run of models/model.pt holds."""
    run_id = torch.load(repo / "models/model.pt", weights_only=True)["run_id"]
    return f"runs:/{run_id}/model"


def use_store(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point this process's MLflow at the repo's store."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")


def cli_predictions(repo: Path, paths: list[Path], out: Path) -> pd.DataFrame:
    """imgpipe-predict's table for paths, top-3."""
    run([str(BIN / "imgpipe-predict"), *map(str, paths), "--top-k", "3", "--csv", str(out)],
        repo)
    return pd.read_csv(out, keep_default_na=False).set_index("path")


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repo trained on 600 digits, its model registered as NAME."""
    repo = make_repo(tmp_path_factory.mktemp("serving") / "repo", images=600,
                     params={"train": {"epochs": 10, "register_as": NAME}})
    dvc(repo, "repro")
    return repo


@pytest.fixture(scope="module")
def unseen(trained: Path) -> list[Path]:
    """100 digits the model never saw, as PNG files."""
    folder = trained.parent / "unseen"
    write_unseen_digits(folder, first=1500, count=100)
    return sorted(folder.rglob("*.png"))


@pytest.fixture(scope="module")
def server(trained: Path) -> Iterator[MlflowServer]:
    """`mlflow models serve -m models:/NAME/latest --env-manager local`, as the README says."""
    served = MlflowServer(["models", "serve", "-m", f"models:/{NAME}/latest",
                           "--env-manager", "local"], trained, trained.parent / "serve.log")
    try:
        wait_for_ping(served)
        yield served
    finally:
        served.kill()


LIMITS = {"max_images": 8, "max_image_bytes": 2000}  # the folder server's, set by the operator


@pytest.fixture(scope="module")
def places(trained: Path, unseen: list[Path]) -> dict[str, Path]:
    """An allowed folder of digits, and ways out of it: a file beside it, and symlinks."""
    allowed, outside = trained.parent / "allowed", trained.parent / "outside"
    allowed.mkdir()
    outside.mkdir()
    shutil.copy(unseen[0], allowed / "inside.png")
    shutil.copy(unseen[1], outside / "secret.png")
    (allowed / "link.png").symlink_to(outside / "secret.png")
    (allowed / "linked-folder").symlink_to(outside, target_is_directory=True)
    return {"allowed": allowed, "inside": allowed / "inside.png",
            "secret": outside / "secret.png"}


@pytest.fixture(scope="module")
def folder_server(trained: Path, places: dict[str, Path]) -> Iterator[MlflowServer]:
    """The same model served with IMGPIPE_SERVE_FOLDER, and limits through MLflow's env var."""
    served = MlflowServer(["models", "serve", "-m", f"models:/{NAME}/latest",
                           "--env-manager", "local"], trained, trained.parent / "folder.log",
                          **{FOLDER_ENV: str(places["allowed"]),
                             "MLFLOW_PYFUNC_INFERENCE_CONFIG": json.dumps(LIMITS)})
    try:
        wait_for_ping(served)
        yield served
    finally:
        served.kill()


def wait_for_ping(served: MlflowServer, timeout: float = 120) -> None:
    """Block until the scoring server answers /ping; fail with its log if it never does."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and served.proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{served.url}/ping", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    served.kill()
    raise AssertionError(f"the model server never answered:\n"
                         f"{served.log.read_text(errors='replace')[-3000:]}")


def post(served: MlflowServer, body: dict, timeout: float = 120) -> tuple[int, dict]:
    """POST a JSON body to /invocations; returns the status and the parsed answer."""
    request = urllib.request.Request(f"{served.url}/invocations",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def images(values: list[str]) -> dict:
    """A dataframe_split body with one image value per row."""
    return {"dataframe_split": {"columns": ["image"], "data": [[v] for v in values]}}


# ---------------------------------------------------------------- the server

def test_served_model_reads_pictures_like_predict_and_flags_each_bad_one(
        trained, unseen, server, tmp_path):
    images = [b64(p.read_bytes()) for p in unseen]
    bad = list(BAD.values())
    status, answer = post(server, {"dataframe_split": {
        "columns": ["image"], "data": [[v] for v in images + [v for v, _ in bad]]}})
    assert status == 200, answer
    rows = answer["predictions"]
    assert len(rows) == len(unseen) + len(bad)

    good, broken = rows[:len(unseen)], rows[len(unseen):]
    for row, (_, message) in zip(broken, bad):
        assert row["error"].startswith(message), row
        assert row["class"] == "" and row["probability"] is None and row["top_k"] == []
    assert all(row["error"] == "" for row in good)
    truth = [p.parent.name for p in unseen]
    right = np.mean([row["class"] == t for row, t in zip(good, truth)])
    assert right >= 0.9, right

    # The served model and imgpipe-predict agree on every image.
    cli = cli_predictions(trained, unseen, tmp_path / "cli.csv")
    for row, path in zip(good, unseen):
        expected = cli.loc[str(path)]
        assert row["class"] == expected["predicted"]
        assert abs(row["probability"] - expected["probability"]) < 1e-5
        assert [c["class"] for c in row["top_k"]] == [
            expected["predicted"], expected["top2_class"], expected["top3_class"]]
        assert abs(row["top_k"][2]["probability"] - expected["top3_probability"]) < 1e-5


def test_a_request_without_the_image_column_is_a_clear_400(server):
    status, answer = post(server, {"dataframe_split": {"columns": ["picture"],
                                                       "data": [["abc"]]}})
    assert status == 400
    assert "missing inputs ['image']" in answer["message"]
    assert "Traceback" not in answer["message"]


def test_top_k_is_a_request_param(server, unseen):
    status, answer = post(server, {"dataframe_split": {"columns": ["image"],
                                                       "data": [[b64(unseen[0].read_bytes())]]},
                                   "params": {"top_k": 5}})
    assert status == 200, answer
    (row,) = answer["predictions"]
    probabilities = [c["probability"] for c in row["top_k"]]
    assert len(probabilities) == 5 and probabilities == sorted(probabilities, reverse=True)


def test_a_path_is_refused_alike_whether_its_file_exists_and_is_never_opened(
        server, unseen, trained, tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes
    paths = [str(unseen[0]),                          # a readable digit the model knows
             str(unseen[0].with_name("unseen-9999.png")),  # the same name, no such file
             str(fifo), "data/raw/one/0001.png",       # relative to the server's folder
             "/etc/passwd", "/proc/self/environ", "/root/.bash_history"]
    status, answer = post(server, images(paths), timeout=30)
    assert status == 200, answer
    refused = {"class": "", "probability": None, "top_k": [], "error": PATHS_REFUSED}
    assert answer["predictions"] == [refused] * len(paths)


def test_the_default_image_limit_refuses_the_request_and_the_server_goes_on(server, unseen):
    limit = ServeConfig().max_images
    one = b64(unseen[0].read_bytes())
    status, answer = post(server, images([one] * (limit + 1)))
    assert status == 400
    # MLflow puts a short view of the input before the model's own line.
    assert answer["message"].endswith(f"\nError: {limit + 1} images in one request, over this "
                                      f"model's limit of {limit} (max_images): send them in "
                                      "smaller requests"), answer
    assert "Traceback" not in answer["message"]
    status, answer = post(server, images([one] * limit))
    assert status == 200 and len(answer["predictions"]) == limit
    assert all(row["error"] == "" for row in answer["predictions"])


def test_twenty_concurrent_requests_are_all_answered_correctly(server, unseen):
    requests = [[b64(p.read_bytes()) for p in unseen[i * 5:i * 5 + 5]] for i in range(20)]
    status, alone = post(server, images([v for r in requests for v in r]))
    assert status == 200
    expected = [row["class"] for row in alone["predictions"]]
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda values: post(server, images(values)), requests))
    assert [status for status, _ in answers] == [200] * 20
    got = [row["class"] for _, answer in answers for row in answer["predictions"]]
    assert got == expected and all(expected)


# ---------------------------------------------------------------- an allowed folder

def test_an_allowed_folder_is_read_and_nothing_leaves_it(folder_server, server, places):
    allowed, secret = places["allowed"], places["secret"]
    status, by_bytes = post(server, images([b64(places["inside"].read_bytes())]))
    assert status == 200
    status, answer = post(folder_server, images([
        str(places["inside"]),                         # inside: read
        str(allowed / "missing.png"),                  # inside, no such file
        str(allowed / ".." / "outside" / "secret.png"),  # .. out to a readable digit
        str(allowed / ".." / "outside" / "nothing.png"),  # .. out to no file
        str(allowed / "link.png"),                     # a symlink to the secret digit
        str(allowed / "linked-folder" / "secret.png"),  # through a symlinked folder
        str(secret), "/etc/passwd"]))
    assert status == 200, answer
    inside, missing, *escapes = answer["predictions"]
    expected = by_bytes["predictions"][0]
    assert inside["error"] == "" and inside["class"] == expected["class"]
    assert abs(inside["probability"] - expected["probability"]) < 1e-6
    assert missing["error"] == NOT_A_FILE and missing["class"] == ""
    refused = {"class": "", "probability": None, "top_k": [], "error": OUTSIDE}
    assert escapes == [refused] * 6


def test_over_limit_requests_get_their_error_while_the_server_keeps_answering(
        folder_server, unseen):
    small = [b64(p.read_bytes()) for p in unseen[:LIMITS["max_images"]]]
    big = b64(bytes(LIMITS["max_image_bytes"] + 1))
    huge = "A" * 4_000_000 + "!"  # not even base64: refused from its length, undecoded
    status, answer = post(folder_server, images(small + [small[0]]))
    assert status == 400
    assert "9 images in one request, over this model's limit of 8" in answer["message"]
    status, answer = post(folder_server, images([small[0], big, huge, small[1]]))
    assert status == 200, answer
    rows = answer["predictions"]
    for row in rows[1:3]:
        assert row["error"] == ("image over this model's limit of 2,000 bytes "
                                "(max_image_bytes): send a smaller file"), row
    assert rows[0]["error"] == rows[3]["error"] == "" and rows[0]["class"]
    status, answer = post(folder_server, images(small))
    assert status == 200 and [row["error"] for row in answer["predictions"]] == [""] * 8


# ---------------------------------------------------------------- in process

def test_pyfunc_in_process_equals_predict_and_takes_paths_in_the_folder_it_allows(
        trained, unseen, monkeypatch):
    import mlflow

    use_store(trained, monkeypatch)
    monkeypatch.delenv(FOLDER_ENV, raising=False)
    uri = model_uri(trained)
    refusing = mlflow.pyfunc.load_model(uri)
    assert list(refusing.predict(pd.DataFrame({"image": [str(unseen[0])]}))["error"]) == [
        PATHS_REFUSED]
    monkeypatch.setenv(FOLDER_ENV, str(trained / "data"))  # model_config's folder wins
    model = mlflow.pyfunc.load_model(uri, model_config={"image_folder": str(unseen[0].parents[1])})
    net, checkpoint = load_checkpoint(trained / "models/model.pt")
    paths = unseen[:9]
    expected = list(predict.classify(paths, net, checkpoint, torch.device("cpu"), top_k=3))
    by_bytes = model.predict(pd.DataFrame({"image": [b64(p.read_bytes()) for p in paths]}))
    by_path = model.predict(pd.DataFrame({"image": [str(p) for p in paths]}))
    for frame in (by_bytes, by_path):
        assert list(frame.columns) == ["class", "probability", "top_k", "error"]
        assert list(frame["class"]) == [p.top[0][0] for p in expected]
        assert np.allclose(frame["probability"].astype(float), [p.top[0][1] for p in expected],
                           atol=1e-5)
        assert [len(k) for k in frame["top_k"]] == [3] * len(paths)  # evaluate.top_k
        assert set(frame["error"]) == {""}


def test_the_model_loads_on_the_device_asked_for(trained, monkeypatch):
    """The CUDA refusal of the torch.export model is gone; the device is model_config's."""
    import mlflow
    from mlflow.exceptions import MlflowException

    use_store(trained, monkeypatch)
    uri = model_uri(trained)
    model = mlflow.pyfunc.load_model(uri, model_config={"device": "cpu"})
    assert model.unwrap_python_model().device == torch.device("cpu")
    if torch.cuda.is_available():
        on_gpu = mlflow.pyfunc.load_model(uri, model_config={"device": "cuda"})
        assert on_gpu.unwrap_python_model().device.type == "cuda"
    else:
        with pytest.raises(MlflowException) as refused:
            mlflow.pyfunc.load_model(uri, model_config={"device": "cuda"})
        assert TORCH_EXPORT_REFUSAL not in str(refused.value)
        assert "torch sees no CUDA device" in str(refused.value)
    with pytest.raises(MlflowException, match="not a torch device"):
        mlflow.pyfunc.load_model(uri, model_config={"device": "gpu-please"})


def test_a_wrong_folder_or_limit_fails_the_load_with_one_clear_line(trained, monkeypatch):
    import mlflow
    from mlflow.exceptions import MlflowException

    use_store(trained, monkeypatch)
    uri = model_uri(trained)
    with pytest.raises(MlflowException, match="is not a folder on this machine"):
        mlflow.pyfunc.load_model(uri, model_config={"image_folder": str(trained / "nowhere")})
    monkeypatch.setenv(FOLDER_ENV, str(trained / "params.yaml"))
    with pytest.raises(MlflowException, match=f"fix image_folder or {FOLDER_ENV}"):
        mlflow.pyfunc.load_model(uri)
    with pytest.raises(MlflowException, match="max_images is 0: it must be a whole number"):
        mlflow.pyfunc.load_model(uri, model_config={"max_images": 0, "image_folder": "."})


def test_signature_and_input_example_show_what_to_send(trained, monkeypatch):
    import mlflow
    from PIL import Image

    use_store(trained, monkeypatch)
    info = mlflow.models.get_model_info(model_uri(trained))
    assert info.signature.inputs.input_names() == ["image"]
    assert info.signature.outputs.input_names() == ["class", "probability", "top_k", "error"]
    assert info.signature.params.to_dict()[0]["default"] == 3
    # Every setting is logged, so that load_model(model_config=...) may change it.
    assert set(info.flavors["python_function"]["config"]) == set(
        dataclasses.asdict(ServeConfig()))
    folder = Path(mlflow.artifacts.download_artifacts(model_uri(trained)))
    example = json.loads((folder / "input_example.json").read_text())
    encoded = example["data"][0][0]
    with Image.open(io.BytesIO(base64.b64decode(encoded))) as img:
        img.load()  # a real image file: the first of the split evaluate scored, test
    manifest = pd.read_csv(trained / "data/manifest.csv", keep_default_na=False)
    first_test = manifest.loc[manifest["split"] == "test", "path"].iloc[0]
    assert base64.b64decode(encoded) == (trained / first_test).read_bytes()
    assert "code" in {p.name for p in folder.iterdir()}


def test_loading_needs_neither_the_repository_nor_pickle(trained, tmp_path):
    """A fresh process outside the repo, with the model's own copy of stages/ on its path."""
    image = str(trained / "data/raw/one/0001.png")
    script = (
        "import mlflow, pandas as pd\n"
        f"model = mlflow.pyfunc.load_model({model_uri(trained)!r}, "
        f"model_config={{'image_folder': {str(trained / 'data/raw')!r}}})\n"
        "import stages\n"
        "print(stages.__file__)\n"
        f"print(model.predict(pd.DataFrame({{'image': [{image!r}]}}))['class'][0])\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                         text=True, env=env(MLFLOW_TRACKING_URI=f"sqlite:///{trained}/mlflow.db",
                                            MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false"))
    assert out.returncode == 0, out.stderr[-3000:]
    loaded_from, answer = out.stdout.strip().splitlines()[-2:]
    assert str(trained) not in loaded_from and "/code/stages/" in loaded_from
    assert answer in torch.load(trained / "models/model.pt", weights_only=True)["classes"]


def test_a_timm_model_is_served_as_imgpipe_predict_sees_it(tmp_path, monkeypatch):
    import mlflow

    repo = make_repo(tmp_path / "repo", images=200,
                     params={"preprocess": {"image_size": 32},
                             "train": {"model": "test_efficientnet", "epochs": 1}})
    dvc(repo, "repro")
    assert torch.load(repo / "models/model.pt", weights_only=True)["model"] == \
        "timm/test_efficientnet"
    use_store(repo, monkeypatch)
    uri = model_uri(repo)
    pinned = Path(mlflow.artifacts.download_artifacts(f"{uri}/requirements.txt")).read_text()
    assert "timm==" in pinned  # the served environment can build the model
    paths = sorted((repo / "data/raw").rglob("*.png"))[:12]
    expected = cli_predictions(repo, paths, tmp_path / "predict.csv")
    served = mlflow.pyfunc.load_model(uri).predict(
        pd.DataFrame({"image": [b64(p.read_bytes()) for p in paths]}))
    assert list(served["class"]) == [expected.at[str(p), "predicted"] for p in paths]
    assert np.allclose(served["probability"].astype(float),
                       [expected.at[str(p), "probability"] for p in paths], atol=1e-5)
