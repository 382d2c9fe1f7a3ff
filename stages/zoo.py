"""What the model zoos know, read offline: model names, weights by name, their preprocessing.

Names (`train.model`):
- `smallcnn`: imgpipe's own small CNN.
- A plain name is torchvision's when torchvision has it, else timm's. So `resnet18`,
  `resnet50`, `convnext_tiny` or `efficientnet_b0`, which both zoos know, stay
  torchvision's: every checkpoint written before timm came keeps loading as it was.
- `timm/<architecture>` is always timm's (the prefix of timm's own hub ids, as in
  `timm/resnet50.a1_in1k`): `timm/resnet50` is timm's resnet50. A timm model's
  canonical name carries the prefix, so a checkpoint names its zoo whatever a later
  torchvision adds.

Weights (`train.pretrained`): null; a local file; true (the model's default
weights); a weights tag, torchvision's (`IMAGENET1K_V2`) or timm's (`in1k`,
`fb_in22k_ft_in1k`); or `hf-hub:<owner>/<repo>` for timm weights on the Hugging
Face hub. Everything here reads the zoos' registries (and, for `hf-hub:`, the hub
config in huggingface_hub's cache); nothing is downloaded: see stages/weights.py.

timm is imported only where a timm model is named: the other stages do not pay for it.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from stages.common import UserError
from stages.imaging import DEFAULT_INTERPOLATION, IMAGENET_MEAN, IMAGENET_STD

DEFAULT_MODEL = "smallcnn"
TIMM_PREFIX = "timm/"
HF_HUB_PREFIX = "hf-hub:"
# A `train.pretrained` string with one of these suffixes, or a path separator, is a file.
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".tar")
# imgpipe's preprocessing when no weights say otherwise: see stages/imaging.py.

Zoo = Literal["smallcnn", "torchvision", "timm"]


@dataclass(frozen=True)
class Arch:
    """A resolved `train.model`: its zoo, the zoo's own name for it, and imgpipe's name."""

    zoo: Zoo
    arch: str  # the name the zoo knows it by
    name: str  # canonical imgpipe name: what a checkpoint records


@dataclass(frozen=True)
class WeightsRef:
    """Which weights a `train.pretrained` setting names, before any file is read."""

    arch: Arch
    label: str  # e.g. ResNet18_Weights.IMAGENET1K_V1, tf_efficientnet_lite0.in1k, a path
    kind: Literal["file", "url", "hf-hub"]  # where the bytes come from
    location: str  # local path, URL, or hub repo id (optionally @revision)
    files: tuple[str, ...] = ()  # hf-hub: file names to try, in timm's order
    # torchvision: the WeightsEnum member; timm: the pretrained_cfg dict. Both describe
    # the weights (classes, preprocessing) and are read without a download.
    config: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Preprocessing:
    """What a model is fed: pixel statistics, resampling, and the eval resize + centre crop."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # bilinear | bicubic | nearest ...
    crop_size: int | None  # model input side; None: not fixed by the weights
    resize_size: int | None  # side before the centre crop (eval)
    why: str  # one phrase for the start line: where these values came from
    # How the image reaches resize_size: `crop` scales the short side (torchvision's and
    # timm's usual `center`), `squash` stretches both sides (timm's `squash`); None: no weights.
    resize: str | None = None

    @property
    def crop_pct(self) -> float | None:
        """Share of the resized side that the centre crop keeps (timm's crop_pct)."""
        return self.crop_size / self.resize_size if self.crop_size and self.resize_size else None


# ---------------------------------------------------------------------------- names

def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


def resolve_model(name: str) -> Arch:
    """The zoo and architecture a `train.model` names (see the module docstring for the rule)."""
    name = str(name)
    if name == DEFAULT_MODEL:
        return Arch("smallcnn", DEFAULT_MODEL, DEFAULT_MODEL)
    if name.startswith(HF_HUB_PREFIX):
        raise UserError(f"train.model is {name!r}: name the architecture in train.model and "
                        f"the hub weights in train.pretrained, e.g. train.pretrained: {name}")
    timm_only = name.startswith(TIMM_PREFIX)
    arch = name[len(TIMM_PREFIX):] if timm_only else name
    if "." in arch:  # timm's arch.tag
        base, tag = arch.split(".", 1)
        raise UserError(f"train.model is {name!r}: put the weights tag in train.pretrained "
                        f"(train.model: {TIMM_PREFIX if timm_only else ''}{base}, "
                        f"train.pretrained: {tag})")
    if not timm_only and arch in _torchvision_names():
        return Arch("torchvision", arch, arch)
    import timm

    if timm.is_model(arch):
        return Arch("timm", arch, TIMM_PREFIX + arch)
    raise UserError(f"unknown model {name!r} in params.yaml train.model{_closest(name)}: use "
                    "smallcnn, a torchvision classifier (resnet18) or a timm architecture "
                    "(timm/resnet50, tf_efficientnet_lite0)")


def _closest(name: str) -> str:
    """' (did you mean a, b?)' over both zoos' names, or ''."""
    if name.startswith(TIMM_PREFIX):
        pool = [TIMM_PREFIX + n for n in _timm_names()]
    else:
        pool = [DEFAULT_MODEL, *_torchvision_names(), *_timm_names()]
    close = list(dict.fromkeys(difflib.get_close_matches(name, pool, n=5, cutoff=0.6)))
    return f" (did you mean {', '.join(close)}?)" if close else ""


# ---------------------------------------------------------------------------- weights

def is_file_setting(value: str) -> bool:
    """Whether a `train.pretrained` string names a local file rather than a tag."""
    text = str(value)
    return ("/" in text or "\\" in text or Path(text).suffix.lower() in WEIGHT_SUFFIXES
            or Path(text).exists())


def resolve_weights(arch: Arch, pretrained: Any) -> WeightsRef | None:
    """The weights a `train.pretrained` setting names for this model; None for no weights."""
    if pretrained is None or pretrained is False:
        return None
    hub = isinstance(pretrained, str) and pretrained.startswith(HF_HUB_PREFIX)
    if isinstance(pretrained, Path) or (isinstance(pretrained, str) and not hub and (
            arch.zoo == "smallcnn" or is_file_setting(pretrained))):
        path = str(pretrained)
        return WeightsRef(arch, path, "file", path, config=_default_config(arch))
    if arch.zoo == "smallcnn":
        raise UserError("train.pretrained is true but smallcnn has no published weights: "
                        "set it to a local weights file, or null")
    if hub:
        return _hf_hub_weights(arch, pretrained[len(HF_HUB_PREFIX):])
    tag = None if pretrained is True else str(pretrained)
    if arch.zoo == "torchvision":
        return _torchvision_weights(arch, tag)
    return _timm_weights(arch, tag)


def _torchvision_weights(arch: Arch, tag: str | None) -> WeightsRef:
    import torchvision

    enum = torchvision.models.get_model_weights(arch.arch)
    try:
        member = enum.DEFAULT if tag is None else enum.verify(tag)
    except KeyError:
        tags = ", ".join(enum.__members__)
        raise UserError(f"train.pretrained: {tag!r} is no weights tag of torchvision's "
                        f"{arch.name}: use true (its default weights) or one of {tags}"
                        f"{_timm_hint(arch, tag)}") from None
    return WeightsRef(arch, str(member), "url", member.url, config=member)


def _timm_hint(arch: Arch, tag: str | None) -> str:
    """A hint to use timm's model when the tag is one of timm's weights for the same name."""
    import timm.models

    if f"{arch.arch}.{tag}" in timm.models.list_pretrained(f"{arch.arch}.*"):
        return f" ({tag} is a tag of timm's {arch.arch}: use train.model: {TIMM_PREFIX}{arch.arch})"
    return ""


def _timm_weights(arch: Arch, tag: str | None) -> WeightsRef:
    import timm.models

    if tag is None:
        cfg = timm.models.get_pretrained_cfg(arch.arch)
        if cfg is None or not cfg.has_weights:
            raise UserError(f"train.pretrained is true but timm's {arch.arch} has no published "
                            "weights: set train.pretrained to a local file, or null")
    else:
        try:
            cfg = timm.models.get_pretrained_cfg(f"{arch.arch}.{tag}")
        except RuntimeError:
            cfg = None
        if cfg is None or not cfg.has_weights:
            tags = [n.split(".", 1)[1] for n in timm.models.list_pretrained(arch.arch + ".*")]
            listed = ", ".join(tags) if tags else "none: it has no published weights"
            raise UserError(f"train.pretrained: {tag!r} is no weights tag of timm's {arch.arch}: "
                            f"use true (its default weights) or one of: {listed}")
    label = f"{arch.arch}.{cfg.tag}" if cfg.tag else arch.arch
    if cfg.custom_load:
        raise UserError(f"timm's {label} weights need timm's own loader, which imgpipe does not "
                        "use: pick another tag, or convert them and set train.pretrained to a file")
    config = cfg.to_dict()
    if cfg.hf_hub_id:
        return WeightsRef(arch, label, "hf-hub", cfg.hf_hub_id, _hf_files(cfg.hf_hub_filename),
                          config=config)
    return WeightsRef(arch, label, "url", cfg.url, config=config)


def _hf_files(filename: str | None) -> tuple[str, ...]:
    """The files timm tries in a hub repo: its override, else safetensors before pickle."""
    return (filename,) if filename else ("model.safetensors", "pytorch_model.bin")


def _hf_hub_weights(arch: Arch, hub_id: str) -> WeightsRef:
    import timm.models

    if arch.zoo != "timm":
        raise UserError(f"train.pretrained: {HF_HUB_PREFIX}{hub_id} holds timm weights but "
                        f"train.model {arch.name} is torchvision's: use train.model: "
                        f"{TIMM_PREFIX}{arch.arch}")
    from stages.weights import hub_errors

    with hub_errors(f"{HF_HUB_PREFIX}{hub_id}", hub_id, "config.json"):
        cfg, hub_arch, model_args = timm.models.load_model_config_from_hf(hub_id)
    if hub_arch != arch.arch:
        raise UserError(f"train.pretrained: {HF_HUB_PREFIX}{hub_id} holds weights for "
                        f"{hub_arch}, not for train.model {arch.name}: use train.model: "
                        f"{TIMM_PREFIX}{hub_arch}, or other weights")
    # A checkpoint rebuilds its model from the name alone, so the weights must fit the
    # architecture as timm builds it by default. timm's save_for_hf always writes these.
    own = {k: v for k, v in model_args.items()
           if k not in ("num_classes", "global_pool") and not (k == "in_chans" and v == 3)}
    if own:
        raise UserError(f"{HF_HUB_PREFIX}{hub_id} builds {hub_arch} with its own arguments "
                        f"({', '.join(f'{k}={v}' for k, v in own.items())}), which imgpipe does "
                        "not pass on: use weights of the architecture as timm builds it")
    config = {**cfg, "source": None}  # we fetch the file ourselves (stages/weights.py)
    return WeightsRef(arch, f"{HF_HUB_PREFIX}{hub_id}", "hf-hub", hub_id,
                      _hf_files(cfg.get("hf_hub_filename")), config=config)


def _default_config(arch: Arch) -> Any:
    """The architecture's default weights' config (their preprocessing), or None."""
    if arch.zoo == "torchvision":
        import torchvision

        return torchvision.models.get_model_weights(arch.arch).DEFAULT
    if arch.zoo == "timm":
        import timm.models

        cfg = timm.models.get_pretrained_cfg(arch.arch)
        return cfg.to_dict() if cfg is not None and cfg.has_weights else None
    return None


# ---------------------------------------------------------------------------- preprocessing

def resolve_preprocessing(name: str, pretrained: Any = None) -> Preprocessing:
    """What the model named, with these weights, expects as input (see Preprocessing)."""
    arch = resolve_model(name)
    ref = resolve_weights(arch, pretrained)
    if ref is None or ref.config is None:
        reason = "no pretrained weights" if ref is None else f"{arch.name} has no zoo weights"
        return Preprocessing(IMAGENET_MEAN, IMAGENET_STD, DEFAULT_INTERPOLATION, None, None,
                             f"imgpipe's defaults ({reason})")
    whose = (f"the default weights of {arch.name}, for the local file {ref.location}"
             if ref.kind == "file" else ref.label)
    if arch.zoo == "torchvision":
        return _from_torchvision(ref.config, f"torchvision's transforms of {whose}")
    return _from_timm(ref.config, f"timm's pretrained_cfg of {whose}")


def _from_torchvision(weights: Any, why: str) -> Preprocessing:
    t = weights.transforms()  # ImageClassification: plain attributes, nothing is read
    return Preprocessing(_triple(t.mean), _triple(t.std), t.interpolation.value,
                         int(t.crop_size[0]), int(t.resize_size[0]), why, "crop")


def _from_timm(cfg: dict[str, Any], why: str) -> Preprocessing:
    from timm.data import resolve_data_config

    data = resolve_data_config(pretrained_cfg=cfg)
    crop = int(data["input_size"][-1])
    resize = math.floor(crop / data["crop_pct"])  # as timm's transforms_factory
    # timm's `border` pads the long side instead of cropping the short one; both keep the
    # aspect ratio, and imgpipe has no padding, so it is read as `crop`.
    mode = "squash" if data.get("crop_mode") == "squash" else "crop"
    return Preprocessing(_triple(data["mean"]), _triple(data["std"]), data["interpolation"],
                         crop, resize, why, mode)


def _triple(values: Any) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return (a, b, c)
