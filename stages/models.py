"""The model zoo: a small CNN for small images, or any torchvision classifier by name.

Pretrained weights only ever come from a local file (`train.pretrained` in
params.yaml): nothing is downloaded, so a run is the same offline and online.
"""

from __future__ import annotations

import contextlib
import difflib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.common import UserError

DEFAULT_MODEL = "smallcnn"
# Prefixes that wrappers add to state-dict keys: DDP ("module.") and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
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


def available_models() -> list[str]:
    """Every name create_model accepts."""
    import torchvision

    return [DEFAULT_MODEL] + sorted(torchvision.models.list_models(module=torchvision.models))


def create_model(name: str, num_classes: int, pretrained: str | Path | None = None) -> nn.Module:
    """Build a model by name with a head of num_classes outputs, optionally from local weights.

    Its weights are in MEMORY_FORMAT; moving it to a device keeps that layout.
    """
    if name == DEFAULT_MODEL:
        model: nn.Module = SmallCNN(num_classes)
    else:
        import torchvision

        if name not in torchvision.models.list_models(module=torchvision.models):
            close = difflib.get_close_matches(name, available_models(), n=4, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UserError(f"unknown model {name!r} in params.yaml train.model{hint}: "
                            "use smallcnn or a torchvision classifier name such as resnet18")
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if pretrained:
        load_pretrained(model, pretrained)
    return model.to(memory_format=MEMORY_FORMAT)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights in a local file: a plain state dict, an imgpipe model or a checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"pretrained weights {path} not found: train.pretrained in params.yaml "
                        "must name a local file (nothing is downloaded), or be null")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing
        raise UserError(f"pretrained weights {path} cannot be read ({type(err).__name__}): "
                        "save them with torch.save(model.state_dict(), path)") from None
    for key in ("state_dict", "model", "model_state_dict"):  # imgpipe, timm, common scripts
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise UserError(f"pretrained weights {path} hold no state dict of tensors")
    return {_strip_prefixes(k): v for k, v in data.items()}


def _strip_prefixes(key: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def load_pretrained(model: nn.Module, path: str | Path) -> list[str]:
    """Load every weight whose name and shape fit; returns the keys left as initialised.

    A checkpoint trained for another number of classes fits everywhere but the
    head, which keeps its fresh initialisation: that is fine-tuning. Anything
    that fits far less than that is the wrong file, and an error.
    """
    weights = read_state_dict(path)
    own = model.state_dict()
    fits = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    skipped = [k for k in own if k not in fits]
    if len(fits) < len(own) / 2:
        raise UserError(f"pretrained weights {path} do not fit this model: only {len(fits)} "
                        f"of {len(own)} tensors match by name and shape; check train.model")
    model.load_state_dict(fits, strict=False)
    if skipped:
        shown = ", ".join(skipped[:4]) + (", ..." if len(skipped) > 4 else "")
        print(f"note: loaded {len(fits)} of {len(own)} tensors from {path}; left as initialised "
              f"(not in the file, or another shape, e.g. a head for other classes): {shown}")
    else:
        print(f"note: loaded all {len(fits)} tensors from {path}")
    return skipped


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
