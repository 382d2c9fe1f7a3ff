"""params.yaml's schema: every key defined once, with its type, default, range and meaning.

    python -m stages.params            check params.yaml (every stage does so first)
    python -m stages.params --table    the README's params table, generated from here

Each section of params.yaml is a frozen pydantic model; `load()` reads the whole
file once, refuses an unknown key, a wrong type or an out-of-range value in one
line that names the key and what it accepts, and returns a typed `Params`.
Stages take their sections from it and pass them on as objects.

Each key also says which stages read it (`read_by`, by default the stage named
like its section) and whether changing it changes what they write (`reruns`).
dvc.yaml's `params:` of each stage lists exactly the keys that rerun it, so a key
that only changes how a run goes (log_every, workers) reruns nothing; a test
keeps the two in step. Adding a param is one field here plus the code that uses it.
"""

from __future__ import annotations

import difflib
import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from stages.common import PARAMS_FILE, UserError, cli, load_params

STAGES = ("index", "preprocess", "train", "evaluate")


def knob(default: Any, meaning: str, *, reruns: bool = True,
         read_by: tuple[str, ...] | None = None, **limits: Any) -> Any:
    """One key: its default, a one-line meaning, its limits (ge, lt, ...) and who reads it.

    reruns=False: the key changes how a stage runs, not what it writes, so no stage
    depends on it. read_by: the stages that read it, when not just its section's own.
    """
    return Field(default, description=meaning, **limits,
                 json_schema_extra={"reruns": reruns, "read_by": read_by})


class Section(BaseModel):
    """A params.yaml section: strict types, no unknown keys, immutable once loaded."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


Workers = Annotated[int, Field(ge=0)]
PositiveInt = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0)]
Name = Annotated[str, Field(min_length=1)]
CropShare = Annotated[float, Field(gt=0.5, le=1)]


class Mlflow(Section):
    """Where every stage logs."""

    experiment: str = knob("imgpipe", "MLflow experiment every stage logs into", min_length=1,
                           reruns=False, read_by=STAGES)


class Index(Section):
    """The index stage: which images are used, and how they are split."""

    val_fraction: float = knob(0.2, "share of each class held out for validation, chosen by "
                                    "content hash so that adding images never moves old ones",
                               ge=0, lt=1)
    test_fraction: float = knob(0.1, "share of each class held out as the test split, the "
                                     "one evaluate scores (`0`: none; evaluate then scores val)",
                                ge=0, lt=1)
    max_pixels: PositiveInt | None = knob(
        None, "images with more pixels are rejected without being decoded (decompression "
              "bombs); `null` means Pillow's limit (about 89 million)")

    @model_validator(mode="after")
    def _leaves_images_to_train_on(self) -> Index:
        total = self.val_fraction + self.test_fraction
        if total >= 1:
            raise ValueError(f"index.val_fraction + index.test_fraction is {total:g}: leave "
                             "images to train on, e.g. 0.2 and 0.1")
        return self


class Preprocess(Section):
    """The preprocess stage: how images become tensors."""

    image_size: int = knob(16, "the model sees `image_size` x `image_size` pixels", ge=1)
    resize: Literal["auto", "squash", "crop"] = knob(
        "auto", "`squash` stretches to a square; `crop` scales the short side, then "
                "centre-crops; `auto`: pretrained weights' own (`crop` for torchvision's and "
                "most of timm's), else `squash`")
    interpolation: Literal["auto", "bicubic", "bilinear", "lanczos", "nearest"] = knob(
        "auto", "how images are resampled to their stored size: `auto`: pretrained weights' own "
                "(bilinear for torchvision's, mostly bicubic for timm's), else bicubic")
    crop_pct: Literal["auto"] | CropShare = knob(
        "auto", "share of each stored image's side the model sees at eval, a centre crop; the "
                "tensors are stored at `image_size / crop_pct`, so that random crops have room "
                "(timm's crop_pct). `auto`: pretrained weights' own (224 of 256 for most), "
                "else `1` (no crop)")
    normalize: Literal["auto", "imagenet", "dataset"] = knob(
        "auto", "`auto`: what pretrained weights were trained with (their mean/std), else "
                "ImageNet's; `imagenet`: ImageNet's fixed mean/std, as timm and Ultralytics "
                "use; `dataset`: mean/std of the train split (every shard is rewritten when "
                "the split changes). An explicit value wins over the weights' own")
    storage: Literal["uint8", "float16"] = knob(
        "uint8", "`uint8`: raw pixels, normalised on the device per batch for whichever model "
                 "reads them; `float16`: normalised on disk (twice the size)")
    shard_mb: float = knob(4.0, "average size of a `data/tensors` shard in MB: smaller rewrites "
                                "less when images are added; larger gives DVC fewer files", gt=0)


class Train(Section):
    """The train stage: model, optimisation, augmentation and how the loop runs."""

    seed: int = knob(42, "seeds weight init, shuffling, augmentation and DataLoader workers")
    model: str = knob("smallcnn", "`smallcnn`, any torchvision classifier or any timm model by "
                                  "name; a name both know is torchvision's, `timm/<name>` is "
                                  "timm's", min_length=1, read_by=("preprocess", "train"))
    pretrained: bool | Name | None = knob(
        None, "weights to start from: `null` (none), `true` (the model's default weights), a "
              "torchvision weights name (`IMAGENET1K_V2`), a timm tag (`in1k`), an "
              "`hf-hub:` id, or a local file (in `weights/`)", read_by=("preprocess", "train"))
    epochs: int = knob(15, "passes over the training data; `0` with pretrained weights: the "
                           "head fitted on their frozen features alone (the linear probe)",
                       ge=0)
    batch_size: int = knob(64, "images per step, in total over all GPUs (also used by "
                               "`evaluate`)", ge=1, read_by=("train", "evaluate"))
    optimizer: Literal["sgd", "adamw"] = knob("sgd", "`sgd` or `adamw`")
    momentum: float = knob(0.9, "SGD momentum", ge=0, lt=1)
    nesterov: bool = knob(True, "Nesterov momentum for SGD")
    weight_decay: float = knob(0.0005, "L2 penalty", ge=0)
    schedule: Literal["cosine", "onecycle", "constant"] = knob(
        "cosine", "learning-rate schedule, stepped every batch")
    warmup_epochs: float = knob(0.0, "linear lr warmup (`onecycle`: its rising phase; 0 means "
                                     "30%)", ge=0)
    label_smoothing: float = knob(0.0, "e.g. `0.1` for noisy labels", ge=0, lt=1)
    clip_grad_norm: Literal["auto"] | PositiveFloat | None = knob(
        "auto", "clip the gradient norm to this; `auto`: 1.0 when fine-tuning pretrained "
                "weights (their first steps are sharp), else off; `null`: off")
    class_weights: Literal["none", "balanced"] = knob(
        "none", "`balanced` weighs the loss by inverse class frequency")
    head_first: bool = knob(True, "with pretrained weights: fit the new head on the frozen "
                                  "backbone's features first (a linear probe, kept as epoch 0 "
                                  "if no later epoch beats it), then fine-tune the whole net")
    backbone_lr: float = knob(0.02, "with pretrained weights: their lr as a multiple of `lr` "
                                   "(`0` freezes them: only the head trains)", ge=0, le=1)
    freeze_bn: bool = knob(True, "with pretrained weights: batch norm keeps its pretrained "
                                 "statistics while the net is fine-tuned")
    patience: int = knob(5, "epochs without a lower val loss before stopping (`0`: never); the "
                            "model is always the epoch with the lowest val loss", ge=0)
    flip: bool = knob(False, "random horizontal flip (off for digits and text)")
    translate: int = knob(1, "random shift by up to this many pixels (`0`: off)", ge=0)
    crop_scale: float = knob(1.0, "random-resized crop: each image cut to a random box of "
                                  "`crop_scale` to all of its area (aspect 3/4 to 4/3) and "
                                  "resized back, as torchvision's RandomResizedCrop (`1`: off)",
                             gt=0, le=1)
    color_jitter: float = knob(0.0, "brightness, contrast and saturation each scaled by a random "
                                    "factor from 1 - j to 1 + j (`0`: off)", ge=0, lt=1)
    data_on_device: Literal["auto"] | bool = knob(
        "auto", "keep the data on the GPU: `auto` (when it fits), `true`, `false`")
    compile: bool = knob(False, "`torch.compile` the model: pays off on a GPU in long runs")
    gpus: int = knob(1, "more than 1: DistributedDataParallel via torchrun, one process per "
                        "GPU", ge=1)
    workers: Literal["auto"] | Workers = knob(
        "auto", "DataLoader worker processes for streamed data (none when it is on the "
                "device); `0` loads in the main process; `auto`: 0 on the CPU, on a GPU a "
                "quarter of the cores split among the DDP processes, 1 to 8", reruns=False)
    log_every: int = knob(10, "steps between MLflow writes of the step losses (each step's loss "
                              "is logged)", ge=1, reruns=False)
    register_as: str | None = knob(None, "register the servable model in the MLflow model "
                                         "registry under this name", min_length=1,
                                   read_by=("evaluate",))

    @model_validator(mode="after")
    def _epochs_0_keeps_a_probe(self) -> Train:
        if self.epochs == 0 and (self.pretrained in (None, False) or not self.head_first):
            why = ("train.pretrained is null" if self.pretrained in (None, False)
                   else "train.head_first is false")
            raise ValueError(f"train.epochs is 0, which keeps only the head fitted on "
                             f"pretrained features, but {why}: set train.epochs to 1 or more")
        return self


class Evaluate(Section):
    """The evaluate stage: what it reports."""

    top_k: int = knob(3, "also report top-k accuracy (when 2 <= k < number of classes)", ge=1)
    mistakes: int = knob(16, "how many of the most confident mistakes the gallery shows", ge=0)


class Params(Section):
    """The whole of params.yaml."""

    lr: float = knob(0.05, "learning rate (top level, so `-S lr=...` works as typed)", gt=0,
                     read_by=("train",))
    workers: Workers = knob(0, "processes for indexing and decoding; `0` means one per CPU core",
                            reruns=False, read_by=("index", "preprocess"))
    mlflow: Mlflow = Field(default_factory=Mlflow)
    index: Index = Field(default_factory=Index)
    preprocess: Preprocess = Field(default_factory=Preprocess)
    train: Train = Field(default_factory=Train)
    evaluate: Evaluate = Field(default_factory=Evaluate)


# ---------------------------------------------------------------- the keys, listed

@dataclass(frozen=True)
class Key:
    """One key of params.yaml as the schema defines it."""

    name: str                  # dotted, as in dvc.yaml and `dvc exp run -S`
    default: Any
    meaning: str
    accepts: str               # what a value must be, in words
    reruns: bool
    read_by: tuple[str, ...]


def all_keys(model: type[BaseModel] = Params, prefix: str = "") -> Iterator[Key]:
    """Every key of the schema, in file order, sections expanded."""
    for name, info in model.model_fields.items():
        if _is_section(info.annotation):
            yield from all_keys(info.annotation, f"{prefix}{name}.")
            continue
        extra = info.json_schema_extra or {}
        yield Key(f"{prefix}{name}", info.get_default(call_default_factory=True),
                  info.description or "", accepts(info.annotation, info.metadata),
                  bool(extra.get("reruns", True)),
                  tuple(extra.get("read_by") or (prefix.rstrip("."),)))


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, Section)


def stage_params(stage: str) -> list[str]:
    """The keys whose change reruns `stage`: what dvc.yaml's `params:` of it must list."""
    return [k.name for k in all_keys() if k.reruns and stage in k.read_by]


def values(p: Params, stage: str) -> dict[str, Any]:
    """The values of the keys that rerun `stage`, by dotted name: what its results depend on."""
    flat = flat_values(p)
    return {name: flat[name] for name in stage_params(stage)}


def flat_values(p: Params) -> dict[str, Any]:
    """Every key's value by dotted name, as MLflow shows params: {"train.epochs": 15, ...}."""
    out: dict[str, Any] = {}
    for name, value in p.model_dump().items():
        if isinstance(value, dict):
            out.update({f"{name}.{k}": v for k, v in value.items()})
        else:
            out[name] = value
    return out


def accepts(annotation: Any, metadata: list[Any] = ()) -> str:
    """What a value of this type and these limits must be, in words: "auto or a number > 0"."""
    choices = _choices(annotation, metadata)
    return " or ".join(filter(None, [", ".join(choices[:-1]), choices[-1]]))


def _choices(annotation: Any, metadata: list[Any] = ()) -> list[str]:
    if typing.get_origin(annotation) is Annotated:
        base, *more = typing.get_args(annotation)
        return _choices(base, [*metadata, *_limits(more)])
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return [c for arg in typing.get_args(annotation) for c in _choices(arg, metadata)]
    if typing.get_origin(annotation) is Literal:
        return [str(v) for v in typing.get_args(annotation)]
    if annotation is type(None):
        return ["null"]
    if annotation is bool:
        return ["true", "false"]
    words = {int: "a whole number", float: "a number", str: "a name"}
    return [words.get(annotation, str(annotation)) + _range(metadata)]


def _limits(metadata: list[Any]) -> list[Any]:
    """Constraints inside Annotated[...]: a Field's own, or annotated_types' directly."""
    out = []
    for item in metadata:
        out.extend(getattr(item, "metadata", [item]))
    return out


def _range(metadata: list[Any]) -> str:
    words = {annotated_types.Ge: (">=", "ge"), annotated_types.Gt: (">", "gt"),
             annotated_types.Lt: ("<", "lt"), annotated_types.Le: ("<=", "le")}
    found = [f"{sign} {getattr(m, attr)}" for m in _limits(metadata)
             for cls, (sign, attr) in words.items() if isinstance(m, cls)]
    return f" {' and '.join(found)}" if found else ""


# ---------------------------------------------------------------- loading

def parse(raw: dict[str, Any], source: str = PARAMS_FILE) -> Params:
    """Check a params mapping against the schema; the first problem is one UserError line."""
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        # A union reports each member it tried: count the keys that are wrong, not the tries.
        wrong = list(dict.fromkeys(_key_path(p) for p in err.errors()))
        extra = (f" (and {len(wrong) - 1} more key{'s' if len(wrong) > 2 else ''} to fix)"
                 if len(wrong) > 1 else "")
        raise UserError(f"{source}: {explain(err.errors()[0], raw)}{extra}") from None


def load(path: str | Path = PARAMS_FILE) -> Params:
    """Read and check params.yaml once: the typed params every stage starts from."""
    return parse(load_params(path), str(path))


def explain(problem: dict[str, Any], raw: dict[str, Any]) -> str:
    """One pydantic error as a line that names the key and its fix."""
    if problem["type"] == "value_error":  # a check across keys: its message names them
        return str(problem["ctx"]["error"])
    path = list(_key_path(problem))
    name = ".".join(path)
    model, where = _model_at(path[:-1])
    if problem["type"] == "extra_forbidden":
        close = difflib.get_close_matches(path[-1], list(model.model_fields), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]}?" if close else \
            f"its keys are {', '.join(model.model_fields)}"
        return f"{name} is not a key of {where}: {hint} (see README's Params)"
    info = model.model_fields.get(path[-1]) if path else None
    if info is not None and _is_section(info.annotation):
        return f"{name} must be a section of keys, like the one in the README's Params"
    want = accepts(info.annotation, info.metadata) if info is not None else problem["msg"]
    return f"{name} is {_value_at(raw, path)!r}: use {want}"


def _key_path(problem: dict[str, Any]) -> tuple[str, ...]:
    """The key an error is about, without the union member pydantic tried."""
    return tuple(p for p in problem["loc"] if isinstance(p, str) and not _is_type_tag(p))


def _is_type_tag(part: str) -> bool:
    """pydantic adds the union member tried to an error's location, e.g. "literal['auto']"."""
    return "[" in part or part in ("int", "float", "bool", "str", "none") \
        or part.startswith(("constrained-", "function-"))


def _model_at(path: list[str]) -> tuple[type[BaseModel], str]:
    model: type[BaseModel] = Params
    for part in path:
        model = model.model_fields[part].annotation
    return model, ".".join(path) or PARAMS_FILE


def _value_at(raw: Any, path: list[str]) -> Any:
    for part in path:
        raw = raw.get(part) if isinstance(raw, dict) else None
    return raw


# ---------------------------------------------------------------- the README table

def table() -> str:
    """The README's params table, a row per key, from the schema."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key in all_keys():
        rows.append(f"| `{key.name}` | `{_yaml(key.default)}` | {key.meaning} |")
    return "\n".join(rows)


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


@cli
def main() -> None:
    """Check params.yaml; with --table, print the README's params table."""
    if sys.argv[1:] == ["--table"]:
        print(table())
        return
    load()
    print(f"{PARAMS_FILE}: every key is known and valid")


if __name__ == "__main__":
    main()
