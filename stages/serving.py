"""The served model: an MLflow pyfunc model that takes pictures and answers with classes.

    mlflow models serve -m models:/<name>/latest --env-manager local
    curl -d '{"dataframe_split": {"columns": ["image"], "data": [["<base64>"]]}}' ...

Each value of the input's `image` column is an image file's bytes, base64-encoded. It
goes through `predict.scores`, the code path of `imgpipe-predict`: `imaging.load_pixels`
with the checkpoint's size and resize mode, then the checkpoint's normalisation, on the
device the model was loaded on. The answer has one row per input: `class`, `probability`,
`top_k` (a list of {class, probability}) and `error`, which is empty unless that one image
could not be read.

Paths: the model opens no file that a caller names, unless whoever loads it allows one
folder (`ServeConfig.image_folder`, else IMGPIPE_SERVE_FOLDER). A path is refused before
any filesystem call on it, so the answer is the same whether the file exists or not.
Limits: `max_images` per request (more: the request is refused, HTTP 400) and
`max_image_bytes` per image (more: that row's error, judged from the base64 length before
anything is decoded). The HTTP body itself is read whole by MLflow before the model sees
it: cap it in a reverse proxy (docs/scaling.md).

How MLflow loads it: models-from-code. `stages/mlflow_model.py` is the model's code file,
and this package travels in the model's code/ folder (`code_paths`), so loading needs
neither the repository on sys.path nor pickle (MLflow refuses to unpickle a model unless
MLFLOW_ALLOW_PICKLE_DESERIALIZATION is set). The weights are models/model.pt, a plain
state dict, so they move to whatever device the model is loaded on: a torch.export
program keeps the device it was exported on, and MLflow's loader refuses to move it.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from stages.models import load_checkpoint, pick_device
from stages.predict import scores

INPUT = "image"
OUTPUTS = ["class", "probability", "top_k", "error"]
CHECKPOINT = "checkpoint"              # the artifact holding models/model.pt
CODE_FILE = Path(__file__).with_name("mlflow_model.py")
PACKAGE = Path(__file__).parent
AUTO = "auto"                          # the logged model_config's device: chosen at load time
FOLDER_ENV = "IMGPIPE_SERVE_FOLDER"    # the allowed folder when model_config names none
MAX_PATH = 4096                        # longer values are never read as paths
BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")  # what survives b64decode(validate=True)
SEND_BYTES = "send the image's bytes, base64-encoded"
EMPTY = f"empty image: {SEND_BYTES}"
NOT_BASE64 = f"not valid base64: {SEND_BYTES}"
PATHS_REFUSED = f"paths are not accepted here: {SEND_BYTES}"
OUTSIDE = f"not a path inside the allowed image folder: {SEND_BYTES}"
NOT_A_FILE = "no such file in the allowed image folder"


@dataclass(frozen=True)
class ServeConfig:
    """The served model's settings: its logged model_config, which load_model may override."""

    device: str = AUTO                 # cpu, cuda, cuda:N; auto: see resolve_device
    image_folder: str = ""             # the one folder `image` may name files in; "": none
    max_images: int = 128              # images per request; more: the request gets HTTP 400
    max_image_bytes: int = 10 * 2**20  # bytes per image file; more: that row's error

    @classmethod
    def from_model_config(cls, config: dict[str, Any]) -> ServeConfig:
        """The settings model_config holds (defaults for keys it lacks), checked."""
        known = {f.name for f in dataclasses.fields(cls)}
        settings = cls(**{k: v for k, v in config.items() if k in known})
        for name in ("max_images", "max_image_bytes"):
            value = getattr(settings, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MlflowException(f"model_config {name} is {value!r}: it must be a whole "
                                      "number of at least 1", INVALID_PARAMETER_VALUE)
        if not isinstance(settings.image_folder, str):
            raise MlflowException(f"model_config image_folder is {settings.image_folder!r}: it "
                                  "must be a folder's path, or \"\" for none",
                                  INVALID_PARAMETER_VALUE)
        return settings


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Pictures in, classes out: imgpipe's own decoding and model, on any device."""

    def load_context(self, context: Any) -> None:
        """Load models/model.pt onto model_config's device (else MLflow's default rule)."""
        self.settings = ServeConfig.from_model_config(context.model_config or {})
        self.device = resolve_device(self.settings.device)
        self.folder = allowed_folder(self.settings.image_folder)
        model, self.checkpoint = load_checkpoint(context.artifacts[CHECKPOINT])
        self.model = model.to(self.device).eval()

    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        """One row per image: class, probability, top_k and error (empty when it was read)."""
        frame = pd.DataFrame(model_input)
        if INPUT not in frame.columns:
            raise MlflowException(f"the input needs a string column {INPUT!r} holding "
                                  "base64-encoded image files", INVALID_PARAMETER_VALUE)
        if len(frame) > self.settings.max_images:
            raise MlflowException(
                f"{len(frame)} images in one request, over this model's limit of "
                f"{self.settings.max_images} (max_images): send them in smaller requests",
                INVALID_PARAMETER_VALUE)
        top_k = int((params or {}).get("top_k") or 1)
        sources = [read_source(value, self.folder, self.settings.max_image_bytes)
                   for value in frame[INPUT]]
        readable = [source for source, _ in sources if source is not None]
        found = iter(scores(readable, self.model, self.checkpoint, self.device, top_k=top_k))
        rows = []
        for source, error in sources:
            top, error = next(found) if source is not None else ([], error)
            rows.append(answer(top, error))
        # Columns of Python objects: an unread image's probability stays None (JSON null);
        # a float column would turn it into NaN, which is not JSON.
        return pd.DataFrame({c: pd.Series([row[c] for row in rows], dtype=object)
                             for c in OUTPUTS})


def resolve_device(name: str | None) -> torch.device:
    """model_config's `device`; `auto`: MLFLOW_DEFAULT_PREDICTION_DEVICE, else the GPU if any."""
    if name in (None, "", AUTO):
        name = os.environ.get("MLFLOW_DEFAULT_PREDICTION_DEVICE")
    if not name:
        return pick_device()
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise MlflowException(f"device {name!r} is not a torch device: use cpu, cuda or "
                              "cuda:N", INVALID_PARAMETER_VALUE) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MlflowException(f"device {name!r} was asked for, but torch sees no CUDA device "
                              "on this machine: load the model with device 'cpu'",
                              INVALID_PARAMETER_VALUE)
    return device


@dataclass(frozen=True)
class Folder:
    """The one folder whose files callers may name: as the operator wrote it, and resolved."""

    given: str  # absolute and normalised, its symlinks kept: how callers may spell it
    real: str   # every symlink resolved: where a path must end up


def allowed_folder(configured: str) -> Folder | None:
    """The allowed folder: model_config's image_folder, else FOLDER_ENV's, else none."""
    folder = configured or os.environ.get(FOLDER_ENV, "")
    if not folder:
        return None
    given = os.path.abspath(os.path.expanduser(folder))
    if not os.path.isdir(given):
        raise MlflowException(f"the allowed image folder {folder!r} is not a folder on this "
                              f"machine: fix image_folder or {FOLDER_ENV}, or unset it",
                              INVALID_PARAMETER_VALUE)
    return Folder(given, os.path.realpath(given))


def read_source(value: Any, folder: Folder | None, max_bytes: int
                ) -> tuple[Path | bytes | None, str]:
    """An input value as the bytes it encodes, or a file inside folder; or None and why not.

    A valid base64 value is always bytes. Anything else with a / or . in it is a path,
    refused from its text alone unless it lies inside folder once resolved.
    """
    if not isinstance(value, str) or not value.strip():
        return None, EMPTY
    start = value.find(",") + 1 if value.startswith("data:") else 0  # data:image/png;base64,
    # From the length alone, so that an oversized value is never copied or decoded.
    blanks = sum(value.count(c, start) for c in " \t\r\n")
    too_big = (f"image over this model's limit of {max_bytes:,} bytes (max_image_bytes): "
               "send a smaller file")
    if (len(value) - start - blanks) * 3 // 4 > max_bytes + 2:  # + 2: at most 2 padding bytes
        return None, too_big
    text = "".join(value[start:].split())
    if len(text) % 4 == 0 and BASE64.fullmatch(text):
        data = base64.b64decode(text)
        if len(data) > max_bytes:  # the length check above allows up to 2 bytes over
            return None, too_big
        return (data, "") if data else (None, EMPTY)
    if not any(c in text for c in "/\\.~"):
        return None, NOT_BASE64
    if folder is None:
        return None, PATHS_REFUSED
    return read_path(value.strip(), folder)


def read_path(value: str, folder: Folder) -> tuple[Path | None, str]:
    """A path inside folder, resolved first so that neither .. nor a symlink can leave it."""
    # Outside as written (.. collapsed): refused with no filesystem call at all.
    written = os.path.abspath(value) if len(value) < MAX_PATH else ""
    if not (inside(written, folder.given) or inside(written, folder.real)):
        return None, OUTSIDE
    try:
        real = os.path.realpath(written)
    except (OSError, ValueError):  # a NUL in the name, or a symlink loop on an old Python
        return None, NOT_A_FILE
    if not inside(real, folder.real):
        return None, OUTSIDE
    if not os.path.isfile(real):  # a regular file only: a FIFO would block the reader
        return None, NOT_A_FILE
    return Path(real), ""


def inside(path: str, folder: str) -> bool:
    """Whether an absolute, normalised path lies below folder."""
    return path.startswith(folder.rstrip(os.sep) + os.sep)


def answer(top: list[tuple[str, float]], error: str) -> dict[str, Any]:
    """One output row; an image that could not be read has no class and no probability."""
    if not top:
        return {"class": "", "probability": None, "top_k": [], "error": error}
    return {"class": top[0][0], "probability": top[0][1], "error": "",
            "top_k": [{"class": c, "probability": p} for c, p in top]}


# ---------------------------------------------------------------- logging the model

def signature(top_k: int) -> Any:
    """Strings in, one row of class, probability, top_k and error out; top_k a request param."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import (
        Array,
        ColSpec,
        Object,
        ParamSchema,
        ParamSpec,
        Property,
        Schema,
    )

    candidates = Array(Object([Property("class", "string"), Property("probability", "double")]))
    return ModelSignature(
        inputs=Schema([ColSpec("string", INPUT)]),
        outputs=Schema([ColSpec("string", "class"), ColSpec("double", "probability"),
                        ColSpec(candidates, "top_k"), ColSpec("string", "error")]),
        params=ParamSchema([ParamSpec("top_k", "long", top_k)]))


def requirements() -> list[str]:
    """What the served model imports, pinned to the versions it was trained with."""
    from importlib.metadata import version

    # timm and its weights' readers too: stages/models.py builds timm models by name.
    names = ["mlflow", "torch", "torchvision", "timm", "huggingface_hub", "safetensors",
             "pillow", "numpy", "pandas", "pyyaml", "tqdm"]
    return [f"{name}=={version(name).split('+')[0]}" for name in names]


def log_model(log: Any, checkpoint: Path, example: bytes, top_k: int,
              register_as: str | None) -> None:
    """Log models/model.pt as the image-taking `model` of the run, with a real image example."""
    example_input = pd.DataFrame({INPUT: [base64.b64encode(example).decode("ascii")]})
    # Explicit requirements: inferring them starts a subprocess that imports the model.
    log.call("model", 1, mlflow.pyfunc.log_model, name="model", python_model=str(CODE_FILE),
             artifacts={CHECKPOINT: str(checkpoint)}, code_paths=[str(PACKAGE)],
             # A key must be in the logged model_config for load_model(model_config=...)
             # to set it: MLflow ignores any other.
             model_config=dataclasses.asdict(ServeConfig()), signature=signature(top_k),
             input_example=example_input,
             registered_model_name=register_as or None, pip_requirements=requirements())


def example_image(path: str | None, rgb: Any) -> bytes:
    """The input example: a real image file's bytes, else `rgb` (H, W, 3 uint8) as a PNG."""
    if path is not None and os.path.isfile(path):
        return Path(path).read_bytes()
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()
