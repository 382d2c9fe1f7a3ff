"""Photo augmentation: the stage's on whole batches on the device, vs torchvision's per image.

    python bench/augment.py [--images 512] [--size 224] [--workers 2]

Both start from the same stored uint8 pixels (what data/tensors holds) and end with
normalised float32 batches of the same augmentations: a random-resized crop of 35% to
100% of the area, a horizontal flip and a colour jitter of 0.2, each drawn per image.
    ours         tensors.to_device + loaders.augment, whole batches in the main process
                 (on the GPU when there is one)
    torchvision  transforms.v2 (RandomResizedCrop, RandomHorizontalFlip, ColorJitter,
                 ToDtype, Normalize) per image, in DataLoader workers, as timm and the
                 tutorials do it
Prints images per second of each, and their ratio, measured in one run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.shared import cpu_model  # noqa: E402
from stages.imaging import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from stages.loaders import augment  # noqa: E402
from stages.models import pick_device  # noqa: E402
from stages.params import Train  # noqa: E402
from stages.tensors import to_device  # noqa: E402

SETTINGS = Train(flip=True, translate=0, crop_scale=0.35, color_jitter=0.2)
BATCH = 64


class Pixels(torch.utils.data.Dataset):
    """Stored uint8 images through torchvision's transforms, one at a time."""

    def __init__(self, images: torch.Tensor, transform: object):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.images[i])


def ours(images: torch.Tensor, device: torch.device) -> float:
    """Images per second through the stage's to_device + augment."""
    meta = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    augment(to_device(images[:BATCH], device, meta), SETTINGS, meta)  # warm-up
    started = time.perf_counter()
    for batch in images.split(BATCH):
        augment(to_device(batch, device, meta), SETTINGS, meta)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - started)


def theirs(images: torch.Tensor, workers: int) -> float:
    """Images per second through torchvision's v2 transforms in DataLoader workers."""
    from torchvision.transforms import v2

    size = images.shape[-1]
    transform = v2.Compose([
        v2.RandomResizedCrop(size, scale=(SETTINGS.crop_scale, 1.0), antialias=True),
        v2.RandomHorizontalFlip(), v2.ColorJitter(0.2, 0.2, 0.2),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    loader = torch.utils.data.DataLoader(Pixels(images, transform), batch_size=BATCH,
                                         num_workers=workers,
                                         persistent_workers=workers > 0)
    next(iter(loader))  # workers started
    started = time.perf_counter()
    for _ in loader:
        pass
    return len(images) / (time.perf_counter() - started)


def main() -> None:
    """Measure both and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    images = torch.randint(0, 256, (args.images, 3, args.size, args.size), dtype=torch.uint8)
    device = pick_device()
    a, b = ours(images, device), theirs(images, args.workers)
    print(f"machine: {cpu_model()}, torch {torch.__version__}; {args.images} images at "
          f"{args.size} px, batches of {BATCH}")
    print(f"{'path':<44} {'img/s':>8}")
    print(f"{'ours: to_device + augment on ' + device.type:<44} {a:>8.0f}")
    print(f"{f'torchvision v2 per image, {args.workers} workers':<44} {b:>8.0f}")
    print(f"ours / torchvision: {a / b:.2f}")


if __name__ == "__main__":
    main()
