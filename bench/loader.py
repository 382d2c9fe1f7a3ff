"""Loader benchmark: decoding JPEGs every epoch versus reading our preprocessed tensors.

    python bench/loader.py                  # 5,000 JPEGs of 500x375, quality 90
    python bench/loader.py --n 1000         # a quicker run

On the same generated files, same batch size and DataLoader workers, it times
(a) the classic pipeline: a Dataset that opens each JPEG with PIL and applies
    torchvision Resize, ToTensor and Normalize, and
(b) the train stage's own loader (make_loader: SplitDataset, read through a ring of reused
    buffers) over data/tensors built by the real preprocess code, as the loader
    yields it, and in one more row made float32 model input by tensors.to_device,
at each size, alternating epochs of (a) and (b) so that both see the same load,
and prints the median images/s and the ratio b/a (goal: >= 50 at 224 px).
It then compares the two storage dtypes, float16 normalised on disk and uint8
normalised by to_device, for loading alone and for loading plus a SmallCNN
training step on this machine's device.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared import CLASSES, cpu_model, make_dataset  # noqa: E402

from stages.imaging import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from stages.loaders import make_loader  # noqa: E402
from stages.models import SmallCNN, pick_device  # noqa: E402
from stages.preprocess import preprocess  # noqa: E402
from stages.tensors import SplitDataset, read_meta, to_device  # noqa: E402

# ---------------------------------------------------------------- (a) the classic pipeline

class JpegDataset(torch.utils.data.Dataset):
    """Opens and transforms one JPEG per item, every epoch."""

    def __init__(self, manifest: pd.DataFrame, size: int):
        self.paths, self.labels = list(manifest["path"]), list(manifest["label"])
        self.transform = transforms.Compose([
            transforms.Resize((size, size)),  # antialiased bilinear on PIL images
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB")), self.labels[i]


# ---------------------------------------------------------------- timing

def loader(dataset: object, batch_size: int, workers: int) -> torch.utils.data.DataLoader:
    """(a): a shuffling DataLoader, as tutorials write it."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                       num_workers=workers, persistent_workers=workers > 0)


def ours(folder: Path, batch_size: int, workers: int) -> torch.utils.data.DataLoader:
    """(b): the train stage's own loader over data/tensors, with the same shuffling."""
    dataset = SplitDataset(folder, "train")
    return make_loader(dataset, batch_size, workers, torch.utils.data.RandomSampler(dataset),
                       torch.device("cpu"))


def epoch_rate(batches: torch.utils.data.DataLoader, meta: dict | None) -> float:
    """Images per second for one pass; with meta, each batch also goes through to_device."""
    cpu = torch.device("cpu")
    seen = 0
    started = time.perf_counter()
    for x, _ in batches:
        if meta is not None:
            x = to_device(x, cpu, meta)
            assert x.dtype == torch.float32
        seen += len(x)
    return seen / (time.perf_counter() - started)


def train_rate(batches: torch.utils.data.DataLoader, meta: dict, steps: int) -> float:
    """Images per second for loading plus SmallCNN training steps on pick_device()."""
    device = pick_device()
    torch.manual_seed(0)
    model = SmallCNN(CLASSES).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    seen, started = 0, None
    while seen < steps:
        for x, y in batches:
            if started is None:
                started, seen = time.perf_counter(), -len(x)  # step 0 warms up
            x, y = to_device(x, device, meta), y.to(device)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(x)
            if seen >= steps:
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - started)


def build_tensors(manifest: pd.DataFrame, size: int, storage: str, workers: int,
                  out: Path) -> float:
    """Build out/ with the stage's own preprocess(); returns its seconds."""
    started = time.perf_counter()
    preprocess(manifest, size, "squash", "imagenet", workers, out, "bench", storage)
    return time.perf_counter() - started


# ---------------------------------------------------------------- main

def main() -> None:
    """Generate the JPEGs, build the tensors, time both loaders and print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="JPEGs to generate")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="DataLoader workers for both pipelines (default: all cores)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 64])
    parser.add_argument("--repeats", type=int, default=3, help="epochs timed per pipeline")
    parser.add_argument("--train-size", type=int, default=32,
                        help="image size for the storage training comparison")
    parser.add_argument("--train-images", type=int, default=2048,
                        help="images per training-throughput measurement")
    parser.add_argument("--dir", type=Path, help="work folder (default: a temporary one)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="imgpipe-bench-") as tmp:
        work = args.dir or Path(tmp)
        os.environ["IMGPIPE_CACHE"] = str(work / "cache")
        print(f"machine: {os.cpu_count()} cores, {cpu_model()}, torch {torch.__version__}, "
              f"device for training: {pick_device()}")
        started = time.perf_counter()
        manifest = make_dataset(work / "jpegs", args.n, args.workers)
        print(f"generated {args.n} JPEGs 500x375 q90 in {time.perf_counter() - started:.1f} s")
        print(f"batch size {args.batch_size}, median of {args.repeats} epochs\n")
        for size in args.sizes:
            out = work / f"tensors{size}"
            seconds = build_tensors(manifest, size, "float16", args.workers, out)
            meta = read_meta(out)
            pipelines = {  # name: (DataLoader, meta for to_device or None)
                f"(a) PIL + torchvision, {args.workers} workers":
                    (loader(JpegDataset(manifest, size), args.batch_size, args.workers), None),
                f"(b) tensors, {args.workers} workers":
                    (ours(out, args.batch_size, args.workers), None),
                "(b) tensors, main process (train.workers: 0)":
                    (ours(out, args.batch_size, 0), None),
                "(b) main process + to_device on the CPU":
                    (ours(out, args.batch_size, 0), meta),
            }
            rates: dict[str, list[float]] = {name: [] for name in pipelines}
            for _ in range(args.repeats):  # interleaved, so that all see the same load
                for name, (batches, to_input) in pipelines.items():
                    rates[name].append(epoch_rate(batches, to_input))
            del pipelines
            print(f"{size} px (tensors built once by preprocess in {seconds:.1f} s):")
            base = statistics.median(next(iter(rates.values())))
            for i, (name, values) in enumerate(rates.items()):
                rate = statistics.median(values)
                ratio = f"  b/a = {rate / base:6.1f}" if i else ""
                print(f"  {name:<46} {rate:>8.0f} img/s{ratio}", flush=True)

        print("\nstorage: float16 normalised on disk vs uint8 normalised by to_device "
              "(main-process loader)")
        print(f"{'size':>5}  {'what':<22}  {'float16':>12}  {'uint8':>12}  {'u8/f16':>6}")
        for size in sorted({*args.sizes, args.train_size}, reverse=True):
            measured: dict[str, dict[str, list[float]]] = {"load": {}, "train": {}}
            loaders = {}
            for storage in ("float16", "uint8"):
                out = work / f"{storage}-{size}"
                if storage == "float16" and (work / f"tensors{size}").exists():
                    out = work / f"tensors{size}"
                else:
                    build_tensors(manifest, size, storage, args.workers, out)
                loaders[storage] = (ours(out, args.batch_size, 0), read_meta(out))
            for _ in range(args.repeats):
                for storage, (batches, meta) in loaders.items():
                    measured["load"].setdefault(storage, []).append(epoch_rate(batches, meta))
                    if size == args.train_size:
                        measured["train"].setdefault(storage, []).append(
                            train_rate(batches, meta, args.train_images))
            for what, label in (("load", "load to float32"),
                                ("train", f"load + SmallCNN step ({pick_device().type})")):
                if measured[what]:
                    f16, u8 = (statistics.median(measured[what][s]) for s in ("float16", "uint8"))
                    print(f"{size:>5}  {label:<22}  {f16:>6.0f} img/s  {u8:>6.0f} img/s  "
                          f"{u8 / f16:>6.2f}", flush=True)
            del loaders


if __name__ == "__main__":
    main()
