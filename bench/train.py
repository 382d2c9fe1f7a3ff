"""Benchmark: our training loop against the classic one, side by side on the same model.

    python bench/train.py [--size 32] [--epochs 3] [--model smallcnn] [--workers 0]

The classic loop decodes every PNG with PIL and runs torchvision transforms in
the Dataset, every epoch. Ours reads the preprocessed tensors (data/tensors)
in whole batches and augments on the device. Both see the same images (the
bundled digits, upscaled to --size px), the same model and the same
augmentation (translate by 1 px, reflect-padded). Epochs alternate between
the loops, so that both share whatever else the machine is doing; the median
epoch of each is compared.

Data wait is the share of an epoch spent in next(loader): time the step
could not start because the batch was not ready.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import torch
from shared import (  # bench/shared.py also puts the repository root on sys.path
    classic_epoch,
    classic_loader,
    make_optimizer,
    make_step,
    run_stages,
    stage_epoch,
    train_rows,
)

from stages import loaders
from stages import train as ours
from stages.models import create_model, pick_device
from stages.sample import write_digits
from stages.tensors import SplitDataset, read_meta

TRANSLATE = 1


def our_setup(folder: Path, meta: dict, model_name: str, batch: int, workers: int,
              device: torch.device) -> tuple[ours.Step, object, object]:
    """Our loop exactly as the train stage builds it (minus MLflow): (step, loader, sampler)."""
    os.chdir(folder)
    train_set = SplitDataset(folder / "data/tensors", "train")
    sampler = loaders.make_sampler(train_set, 0)
    on_device = loaders.keep_on_device("auto", device, train_set.nbytes)
    loader = (loaders.DeviceLoader(train_set, batch, sampler, device) if on_device else
              loaders.make_loader(train_set, batch, workers, sampler, device))
    return make_step(model_name, meta, device, TRANSLATE), loader, sampler


def main() -> None:
    """Run both loops, alternating epochs, and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32, help="image size in pixels")
    parser.add_argument("--images", type=int, default=None, help="use only the first N digits")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each loop")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers, both loops")
    parser.add_argument("--model", default="smallcnn")
    args = parser.parse_args()

    device = pick_device()
    with tempfile.TemporaryDirectory(prefix="imgpipe-bench-") as tmp:
        folder = Path(tmp)
        write_digits(folder / "data/raw", limit=args.images)
        run_stages(folder, ("index", "preprocess"), {"preprocess": {"image_size": args.size}})
        rows = train_rows(folder)
        meta = read_meta(folder / "data/tensors")
        step, loader, sampler = our_setup(folder, meta, args.model, args.batch, args.workers,
                                          device)
        torch.manual_seed(0)
        # The classic loop keeps PyTorch's default layout, as tutorials do.
        model = create_model(args.model, len(meta["classes"])).to(
            device, memory_format=torch.contiguous_format)
        optimizer = make_optimizer(model)
        classic = classic_loader(folder, rows, meta, args.batch, args.workers, device, TRANSLATE)

        print(f"{args.model} at {args.size}px on {device} "
              f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
              f"{torch.get_num_threads()} threads), {len(rows)} train images, batch {args.batch}, "
              f"{args.workers} workers, {args.epochs} epochs each, alternating")
        results: dict[str, list[tuple[float, float]]] = {"classic": [], "ours": []}
        for epoch in range(1, args.epochs + 1):
            results["classic"].append(classic_epoch(model, classic, optimizer, device))
            stats = stage_epoch(step, loader, sampler, epoch)
            results["ours"].append((stats.seconds, stats.data_wait))
            print(f"  epoch {epoch}: classic {results['classic'][-1][0]:.2f} s, "
                  f"ours {stats.seconds:.2f} s", flush=True)

    print(f"\n{'loop':<8} {'epoch s':>8} {'img/s':>8} {'data wait':>10}")
    median = {}
    for name, runs in results.items():
        seconds = statistics.median(s for s, _ in runs)
        wait = statistics.median(w for _, w in runs)
        median[name] = (seconds, wait)
        print(f"{name:<8} {seconds:>8.2f} {len(rows) / seconds:>8.0f} {wait:>10.1%}")
    ratio = median["classic"][0] / median["ours"][0]
    bound = 1 / max(1e-9, 1 - median["classic"][1])
    print(f"\nours is {ratio:.2f}x faster per epoch than the classic loop (goal: >= 3x on CPU).")
    print(f"The classic loop waits for data {median['classic'][1]:.0%} of the time, so removing "
          f"its data cost alone can make it at most {bound:.2f}x faster; the rest is the model's "
          f"compute, which ours speeds up only with channels_last (models.MEMORY_FORMAT).")
    if device.type != "cuda":
        print("No GPU here: GPU figures (data wait, resnet18 img/s at 64 and 224 px against "
              "a ceiling) are measured by bench/gpu.py on a GPU machine.")


if __name__ == "__main__":
    main()
