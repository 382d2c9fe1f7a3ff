"""Fine-tuning from the probe: which optimizer, lr and gradient clip lower its val loss.

    python bench/finetune.py [--source digits|openclipart] [--size 32] [--epochs 4]
                             [--augment] [--warmup EPOCHS] SPEC [SPEC ...]

SPEC is optimizer:lr:clip, e.g. sgd:0.001:0 (no clipping), sgd:0.001:1, adamw:0.0001:1.
The real index and preprocess stages run once on the source (scikit-learn's digits, or a
stratified sample of Debian's openclipart-png as bench/transfer.py draws it), with
tf_efficientnet_lite0 and its real ImageNet weights (bench/weights.py). The head is fitted
on frozen features once, as the train stage's epoch 0 does (stages/finetune.py); then each
SPEC fine-tunes a copy of that net for --epochs with the stage's own loop (train_epoch: batch
norm frozen, cosine schedule) and is scored on val after every epoch. Printed: the probe's
val loss and accuracy, then each SPEC's by epoch. --augment adds flips, a random-resized crop
of 35-100% and colour jitter 0.2 (the photo settings of the README).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.shared import run_stages  # noqa: E402
from bench.transfer import OPENCLIPART, sample  # noqa: E402
from bench.weights import ARCH, convert, save  # noqa: E402
from stages import finetune  # noqa: E402
from stages import train as stage  # noqa: E402
from stages.loaders import make_loader, make_sampler  # noqa: E402
from stages.models import build_model  # noqa: E402
from stages.params import Train  # noqa: E402
from stages.sample import write_digits  # noqa: E402
from stages.tensors import SplitDataset, read_meta, to_device  # noqa: E402

CPU = torch.device("cpu")
PHOTO = {"flip": True, "crop_scale": 0.35, "color_jitter": 0.2, "translate": 0}


def probe(folder: Path, weights: Path) -> tuple[nn.Module, dict, list[float]]:
    """The net with its head fitted on frozen features, the meta it is fed with, its val row."""
    tensors = folder / "data/tensors"
    net, loaded = build_model(ARCH, len(read_meta(tensors)["classes"]), str(weights))
    head = finetune.new_head(net, list(loaded.new))
    meta, _ = stage.model_input(read_meta(tensors), Train(model=ARCH, pretrained=str(weights)))

    def features(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        loader = make_loader(SplitDataset(tensors, split), 64, 0, None, CPU)
        return finetune.head_inputs(net, head, loader, CPU, lambda x: to_device(x, CPU, meta))

    fitted = finetune.fit_head(head, features("train"), features("val"))
    return net, meta, [fitted["val_loss"], fitted["val_acc"]]


def fine_tune(net: nn.Module, meta: dict, folder: Path, spec: str, epochs: int,
              augment: bool, warmup: float = 0.0) -> list[tuple[float, float]]:
    """(val loss, val accuracy) after each epoch of fine-tuning a copy of net as SPEC says."""
    name, lr, clip = spec.split(":")
    t = Train(optimizer=name, epochs=epochs, warmup_epochs=warmup, **(PHOTO if augment else {}))
    net = copy.deepcopy(net)
    train_set = SplitDataset(folder / "data/tensors", "train")
    sampler = make_sampler(train_set, t.seed)
    loader = make_loader(train_set, t.batch_size, 0, sampler, CPU)
    val = make_loader(SplitDataset(folder / "data/tensors", "val"), 64, 0, None, CPU)
    optimizer = stage.make_optimizer(t, net.parameters(), float(lr))
    step = stage.Step(net, optimizer, stage.make_scheduler(t, optimizer, float(lr), len(loader)),
                      torch.amp.GradScaler("cpu", enabled=False), nn.CrossEntropyLoss(), CPU,
                      meta, t, freeze_bn=True, clip=float(clip) or None)
    rows = []
    for epoch in range(1, epochs + 1):
        sampler.set_epoch(epoch)
        stage.train_epoch(step, loader, 0, None, 10**9, desc=f"{spec} {epoch}/{epochs}")
        rows.append(stage.evaluate(net, val, nn.CrossEntropyLoss(), CPU, meta))
    return rows


def main() -> None:
    """Prepare the tensors once, fit the probe once, fine-tune each SPEC from it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="+", metavar="SPEC")
    parser.add_argument("--source", choices=("digits", "openclipart"), default="digits")
    parser.add_argument("--size", type=int, default=32, help="preprocess.image_size")
    parser.add_argument("--per-class", type=int, default=40, help="openclipart images a class")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--augment", action="store_true")
    parser.add_argument("--warmup", type=float, default=0.0, help="train.warmup_epochs")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        weights = save(convert(), folder / "weights" / f"{ARCH}.pth")
        if args.source == "digits":
            write_digits(folder / "data/raw")
        else:
            sample(OPENCLIPART, folder / "data/raw", args.per_class)
        run_stages(folder, ("index", "preprocess"),
                   {"preprocess": {"image_size": args.size},
                    "train": {"model": ARCH, "pretrained": str(weights)}})
        net, meta, row = probe(folder, weights)
        images = len(SplitDataset(folder / "data/tensors", "train"))
        print(f"{args.source} at {args.size} px, {images} train images"
              f"{', photo augmentation' if args.augment else ''}, warm-up {args.warmup} epochs")
        print(f"{'probe':<18} val loss {row[0]:.4f} acc {row[1]:.4f}", flush=True)
        for spec in args.specs:
            started = time.perf_counter()
            rows = fine_tune(net, meta, folder, spec, args.epochs, args.augment, args.warmup)
            print(f"{spec:<18} val loss " + ", ".join(f"{loss:.3f}" for loss, _ in rows)
                  + "  acc " + ", ".join(f"{acc:.3f}" for _, acc in rows)
                  + f"  ({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
