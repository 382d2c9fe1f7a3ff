"""Models by name, with their weights: smallcnn, any torchvision classifier, any timm model.

Which zoo a name means, which weights `train.pretrained` names and what input they
expect: stages/zoo.py. Where the weights file comes from and its sha256:
stages/weights.py. Here the model is built and the weights go in: a head for
another number of classes is left out and trained afresh (fine-tuning). Building a
model without weights never reads or downloads anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.common import UserError
from stages.weights import LoadedWeights, load_weights, read_state_dict
from stages.zoo import Arch, WeightsRef, resolve_model, resolve_weights

# Images and weights go NHWC on every device: convolutions run faster that way on GPUs
# (tensor cores) and on CPUs (oneDNN). Training steps on 2 EPYC cores: SmallCNN 1.21x
# faster at 32 px and 1.31x at 64 px; resnet18 1.03x at 32 px.
MEMORY_FORMAT = torch.channels_last


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 conv, batch norm, ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Three conv stages and a global average pool: fast on a CPU, right for 8-64 px images."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            conv_block(3, w), conv_block(w, w), nn.MaxPool2d(2),
            conv_block(w, 2 * w), conv_block(2 * w, 2 * w), nn.MaxPool2d(2),
            conv_block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def create_model(name: str, num_classes: int, pretrained: Any = None) -> nn.Module:
    """Build a model by name with a head of num_classes outputs, from weights if given.

    pretrained is a `train.pretrained` setting (see stages/zoo.py). Its weights are
    in MEMORY_FORMAT; moving it to a device keeps that layout.
    """
    return build_model(name, num_classes, pretrained)[0]


def build_model(name: str, num_classes: int, pretrained: Any = None
                ) -> tuple[nn.Module, LoadedWeights | None]:
    """create_model, and what was loaded (name, source, file, sha256) for the run's record."""
    arch = resolve_model(name)
    ref = resolve_weights(arch, pretrained)
    state, loaded = load_weights(ref, pretrained) if ref is not None else (None, None)
    timm_loads = arch.zoo == "timm" and ref is not None and ref.kind != "file"
    new: list[str] = []
    if arch.zoo == "smallcnn":
        model: nn.Module = SmallCNN(num_classes)
    elif arch.zoo == "torchvision":
        import torchvision

        model = torchvision.models.get_model(arch.arch, weights=None, num_classes=num_classes)
    else:
        model, new = _create_timm(arch, num_classes, ref if timm_loads else None, state)
    if ref is not None and state is not None and not timm_loads:
        head_rows = None if ref.kind == "file" else len(ref.config.meta["categories"])
        new = fit_state_dict(model, state, ref.label, head_rows)
    if loaded is not None:
        loaded = dataclasses.replace(loaded, new=tuple(new))
    return model.to(memory_format=MEMORY_FORMAT), loaded



def _create_timm(arch: Arch, num_classes: int, ref: WeightsRef | None,
                 state: dict[str, torch.Tensor] | None) -> tuple[nn.Module, list[str]]:
    """A timm model, and the keys of the head it got afresh (none if it kept the weights').

    Zoo weights (ref, state) go in through timm's loader, which adapts them.
    """
    import timm

    if ref is None or state is None:
        return timm.create_model(arch.arch, pretrained=False, num_classes=num_classes), []
    # Built for the weights' own classes, the load is strict: every tensor must fit. Then
    # timm's reset_classifier puts on a fresh head for ours (timm's own way to fine-tune).
    classes = ref.config.get("num_classes", 1000)
    try:
        model = timm.create_model(arch.arch, pretrained=True, num_classes=classes,
                                  pretrained_cfg={**ref.config, "state_dict": state})
    except RuntimeError as err:  # load_state_dict: missing, unexpected or misshapen tensors
        lines = str(err).strip().splitlines()  # a header, then one line per kind of problem
        first = lines[min(1, len(lines) - 1)].strip()
        first = first if len(first) <= 120 else first[:117] + "..."
        raise UserError(f"pretrained weights {ref.label} do not fit timm's {arch.arch} "
                        f"({first}): check train.model and train.pretrained") from None
    new: list[str] = []
    if classes != num_classes:
        model.reset_classifier(num_classes)
        head = model.get_classifier()
        name = next(n for n, m in model.named_modules() if m is head)
        new = [f"{name}.{key}" for key in head.state_dict()]
    model.pretrained_cfg.pop("state_dict", None)  # else the model keeps a second copy alive
    return model, new


def fit_state_dict(model: nn.Module, weights: dict[str, torch.Tensor], label: str,
                   head_rows: int | None = None) -> list[str]:
    """Load every weight whose name and shape fit; returns the keys left as initialised.

    Weights trained for another number of classes fit everywhere but the head, which
    keeps its fresh initialisation: that is fine-tuning. From a local file, anything
    that fits far less than that is the wrong file; for zoo weights (head_rows: the
    classes they were trained on) only tensors with that many rows may be left out.
    """
    own = model.state_dict()
    fits = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    skipped = [k for k in own if k not in fits]
    if head_rows is not None:
        wrong = [k for k in skipped if k not in weights or weights[k].shape[:1] != (head_rows,)]
        if wrong:
            shown = ", ".join(wrong[:3]) + (", ..." if len(wrong) > 3 else "")
            raise UserError(f"pretrained weights {label} do not fit this model as imgpipe "
                            f"builds it ({len(wrong)} tensors missing or of another shape: "
                            f"{shown}): check train.model and train.pretrained")
    elif len(fits) < len(own) / 2:
        raise UserError(f"pretrained weights {label} do not fit this model: only {len(fits)} "
                        f"of {len(own)} tensors match by name and shape; check train.model")
    model.load_state_dict(fits, strict=False)
    if skipped:
        shown = ", ".join(skipped[:4]) + (", ..." if len(skipped) > 4 else "")
        print(f"note: loaded {len(fits)} of {len(own)} tensors from {label}; left as initialised "
              f"(not in the file, or another shape, e.g. a head for other classes): {shown}")
    else:
        print(f"note: loaded all {len(fits)} tensors from {label}")
    return skipped


def load_pretrained(model: nn.Module, path: str | Path) -> list[str]:
    """Load a local weights file into model by fit (see fit_state_dict); the keys left out."""
    return fit_state_dict(model, read_state_dict(path)[0], str(path))


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load models/model.pt: the model in eval mode, and everything saved beside its weights."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path} not found: train a model first (`dvc repro train`)") from None
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing
        raise UserError(f"{path} is not an imgpipe model ({type(err).__name__}): "
                        "retrain it with `dvc repro train`") from None
    model = create_model(checkpoint["model"], len(checkpoint["classes"]))
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), checkpoint


def pick_device(local_rank: int = 0) -> torch.device:
    """The GPU (this process's one under DDP) when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """Autocast dtype: bf16 on GPUs that have it, else fp16 (needs a GradScaler); None on CPU."""
    if device.type != "cuda":
        return None  # full precision: fastest on CPUs for small nets, and bit-reproducible
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device) -> Any:
    """Mixed precision on a GPU (see amp_dtype); a no-op on the CPU."""
    dtype = amp_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def predict(model: nn.Module, loader: Any, device: torch.device, meta: dict[str, Any]
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run model over a loader of (images, labels); returns float32 logits and labels on the CPU."""
    from stages.tensors import to_device

    model.eval()
    logits, labels = [], []
    for x, y in loader:
        x = to_device(x, device, meta).contiguous(memory_format=MEMORY_FORMAT)
        with autocast(device):
            logits.append(model(x).float().cpu())
        labels.append(y.cpu())
    if not logits:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(labels)
