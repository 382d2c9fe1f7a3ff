"""The served model: an MLflow pyfunc model that takes pictures and answers with classes.

    mlflow models serve -m models:/<name>/latest --env-manager local
    curl -d '{"dataframe_split": {"columns": ["image"], "data": [["<base64>"]]}}' ...

Each value of the input's `image` column is an image file's bytes, base64-encoded (or
the path of a local file). It goes through `predict.scores`, the code path of
`imgpipe-predict`: `imaging.load_pixels` with the checkpoint's size and resize mode,
then the checkpoint's normalisation, on the device the model was loaded on. The answer
has one row per input: `class`, `probability`, `top_k` (a list of {class, probability})
and `error`, which is empty unless that one image could not be read.

How MLflow loads it: models-from-code. `stages/mlflow_model.py` is the model's code file,
and this package travels in the model's code/ folder (`code_paths`), so loading needs
neither the repository on sys.path nor pickle (MLflow refuses to unpickle a model unless
MLFLOW_ALLOW_PICKLE_DESERIALIZATION is set). The weights are models/model.pt, a plain
state dict, so they move to whatever device the model is loaded on: a torch.export
program keeps the device it was exported on, and MLflow's loader refuses to move it.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
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
MAX_PATH = 4096                        # longer strings are never file paths: base64 only
AUTO = "auto"                          # the logged model_config's device: chosen at load time
EMPTY = "empty image: send the file's bytes base64-encoded, or the path of a local file"


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Pictures in, classes out: imgpipe's own decoding and model, on any device."""

    def load_context(self, context: Any) -> None:
        """Load models/model.pt onto model_config's device (else MLflow's default rule)."""
        self.device = resolve_device(context.model_config or {})
        model, self.checkpoint = load_checkpoint(context.artifacts[CHECKPOINT])
        self.model = model.to(self.device).eval()

    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        """One row per image: class, probability, top_k and error (empty when it was read)."""
        frame = pd.DataFrame(model_input)
        if INPUT not in frame.columns:
            raise MlflowException(f"the input needs a string column {INPUT!r} holding "
                                  "base64-encoded image files", INVALID_PARAMETER_VALUE)
        top_k = int((params or {}).get("top_k") or 1)
        sources = [read_source(value) for value in frame[INPUT]]
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


def resolve_device(config: dict[str, Any]) -> torch.device:
    """model_config's `device`; `auto`: MLFLOW_DEFAULT_PREDICTION_DEVICE, else the GPU if any."""
    name = config.get("device")
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


def read_source(value: Any) -> tuple[Path | bytes | None, str]:
    """An input value as a local file or the bytes it encodes; or None and why not."""
    if not isinstance(value, str) or not value.strip():
        return None, EMPTY
    value = value.strip()
    if len(value) < MAX_PATH and os.path.isfile(value):
        return Path(value), ""
    if value.startswith("data:") and "," in value:  # a data URL: data:image/png;base64,...
        value = value.split(",", 1)[1]
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        return None, "neither valid base64 nor a local file: send the file's bytes base64-encoded"
    return (data, "") if data else (None, EMPTY)


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

    names = ["mlflow", "torch", "torchvision", "pillow", "numpy", "pandas", "pyyaml", "tqdm"]
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
             model_config={"device": AUTO}, signature=signature(top_k),
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
