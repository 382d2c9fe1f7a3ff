"""The model zoo: a small CNN for small images, or any torchvision classifier by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.common import UserError

DEFAULT_MODEL = "smallcnn"


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


def create_model(name: str, num_classes: int) -> nn.Module:
    """Build a model by name with a head of num_classes outputs and no pretrained weights."""
    if name == DEFAULT_MODEL:
        return SmallCNN(num_classes)
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        close = [m for m in available_models() if name.split("_")[0] in m][:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown model {name!r} in params.yaml train.model{hint}: "
                        "use smallcnn or a torchvision classifier name such as resnet18")
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


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


def pick_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device) -> Any:
    """bf16 autocast on a GPU; full precision on the CPU, where it is fastest for small nets."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    import contextlib

    return contextlib.nullcontext()


@torch.no_grad()
def predict(model: nn.Module, loader: Any, device: torch.device, meta: dict[str, Any]
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run model over a loader of (images, labels); returns float32 logits and labels on the CPU."""
    from stages.tensors import to_device

    model.eval()
    logits, labels = [], []
    for x, y in loader:
        x = to_device(x, device, meta)
        with autocast(device):
            logits.append(model(x).float().cpu())
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)
