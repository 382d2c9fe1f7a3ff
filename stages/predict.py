"""Predict: classify new images with a trained model, seen exactly as training saw its images.

    python -m stages.predict PATH [PATH ...] [--model models/model.pt] [--top-k K] [--csv OUT]
    imgpipe-predict PATH ...                  (the same, as an installed console script)

PATH is an image or a folder, searched recursively (hidden files and folders are skipped).
Each image goes through `imaging.load_pixels` with the checkpoint's size and resize mode,
then `tensors.to_device` with the checkpoint's mean and std: the same two functions that
built the training tensors and feed the training loop. Unreadable files are listed with
their reason and the rest still run; the exit code is 1 only if nothing could be predicted.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from stages.common import UserError, cli, write_csv
from stages.imaging import (
    DEFAULT_INTERPOLATION,
    IMAGE_EXTENSIONS,
    TooManyPixels,
    load_pixels,
)
from stages.models import MEMORY_FORMAT, autocast, load_checkpoint, pick_device
from stages.tensors import to_device

MODEL = Path("models/model.pt")


@dataclass
class Prediction:
    """The outcome for one image: its top classes best first, or why it could not be read."""

    path: str
    top: list[tuple[str, float]]
    error: str = ""


# ---------------------------------------------------------------- finding images

def find_images(paths: list[str]) -> tuple[list[Path], list[Prediction]]:
    """Expand files and folders into image files; paths that do not exist come back as errors."""
    found: list[Path] = []
    missing: list[Prediction] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found.extend(images_below(path))
        elif path.is_file():
            found.append(path)  # named explicitly: tried whatever its extension
        else:
            missing.append(Prediction(given, [], "not found"))
    unique = list(dict.fromkeys(found))  # a file named twice is predicted once
    return unique, missing


def images_below(folder: Path) -> list[Path]:
    """Every image file under folder, sorted, skipping hidden entries and symlink loops."""
    images = []
    seen: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        images.extend(Path(root) / name for name in sorted(files)
                      if not name.startswith(".")
                      and Path(name).suffix.lower() in IMAGE_EXTENSIONS)
    return images


# ---------------------------------------------------------------- from file to model input

def decode(source: Path | bytes, checkpoint: dict[str, Any]) -> tuple[np.ndarray | None, str]:
    """An image file's (or its bytes') (3, S, S) uint8 pixels as training decoded them.

    Returns None and the reason when it cannot be read; images over Pillow's pixel
    limit are refused from their header, before anything is decoded.
    """
    from PIL import Image, UnidentifiedImageError

    file = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        return load_pixels(file, int(checkpoint["image_size"]), checkpoint["resize"],
                           max_pixels=Image.MAX_IMAGE_PIXELS,
                           interpolation=checkpoint.get("interpolation", DEFAULT_INTERPOLATION)), ""
    except Exception as err:  # noqa: BLE001 - any failure is reported for its file, not fatal
        if isinstance(err, TooManyPixels):
            return None, str(err)
        if isinstance(err, Image.DecompressionBombError):
            return None, f"too many pixels (a possible decompression bomb): {err}"
        if isinstance(err, UnidentifiedImageError):
            return None, "not an image Pillow can read (corrupt or unsupported format)"
        if isinstance(err, OSError) and err.strerror:
            return None, f"unreadable: {err.strerror}"
        return None, f"corrupt image ({err or type(err).__name__})"


def model_input(pixels: list[np.ndarray], checkpoint: dict[str, Any],
                device: torch.device) -> torch.Tensor:
    """Stack uint8 pixels into the float32 model input, normalised with the checkpoint's stats."""
    x = to_device(torch.from_numpy(np.stack(pixels)), device, checkpoint)
    return x.contiguous(memory_format=MEMORY_FORMAT)


# ---------------------------------------------------------------- predicting

def scores(sources: list[Path | bytes], model: torch.nn.Module, checkpoint: dict[str, Any],
           device: torch.device, batch_size: int = 64, top_k: int = 1,
           decoders: int | None = None) -> Iterator[tuple[list[tuple[str, float]], str]]:
    """Each source's top classes best first (or [] and why it could not be read), in order.

    Sources are image files or their bytes; decoding the next batch overlaps the model.
    """
    classes = checkpoint["classes"]
    k = max(1, min(top_k, len(classes)))
    batches = [sources[i:i + batch_size] for i in range(0, len(sources), batch_size)]
    decoders = decoders or min(8, os.cpu_count() or 1)
    model = model.to(device).eval()
    with ThreadPoolExecutor(decoders) as pool:  # Pillow releases the GIL while decoding

        def submit(batch: list[Path | bytes]) -> list[Future]:
            return [pool.submit(decode, source, checkpoint) for source in batch]

        pending = submit(batches[0]) if batches else []
        for i in range(len(batches)):
            decoded = [f.result() for f in pending]
            pending = submit(batches[i + 1]) if i + 1 < len(batches) else []
            good = [j for j, (pixels, _) in enumerate(decoded) if pixels is not None]
            tops: dict[int, list[tuple[str, float]]] = {}
            if good:
                x = model_input([decoded[j][0] for j in good], checkpoint, device)
                with torch.no_grad(), autocast(device):
                    logits = model(x)
                probs, ids = torch.softmax(logits.float(), 1).topk(k, 1)
                for j, p_row, id_row in zip(good, probs.cpu().tolist(), ids.cpu().tolist()):
                    tops[j] = [(classes[c], p) for c, p in zip(id_row, p_row)]
            for j, (_, error) in enumerate(decoded):
                yield tops.get(j, []), error


def classify(paths: list[Path], model: torch.nn.Module, checkpoint: dict[str, Any],
             device: torch.device, batch_size: int = 64, top_k: int = 1,
             decoders: int | None = None) -> Iterator[Prediction]:
    """Predict every path in batches, in order (see `scores`)."""
    found = scores(paths, model, checkpoint, device, batch_size, top_k, decoders)
    for path, (top, error) in zip(paths, found):
        yield Prediction(str(path), top, error)


def format_line(pred: Prediction) -> str:
    """One printed line: path, class, probability, and the top-k when asked for."""
    cls, prob = pred.top[0]
    line = f"{pred.path}\t{cls}\t{prob:.4f}"
    if len(pred.top) > 1:
        line += f"\ttop-{len(pred.top)}: " + ", ".join(f"{c} {p:.4f}" for c, p in pred.top)
    return line


def as_table(predictions: list[Prediction], top_k: int) -> pd.DataFrame:
    """One row per image: path, predicted, probability, topN_class/topN_probability, error."""
    rows = []
    for pred in predictions:
        row: dict[str, Any] = {"path": pred.path}
        for n in range(1, top_k + 1):
            cls, prob = pred.top[n - 1] if n <= len(pred.top) else ("", None)
            prob = None if prob is None else round(prob, 6)
            names = ("predicted", "probability") if n == 1 else (f"top{n}_class",
                                                                 f"top{n}_probability")
            row |= {names[0]: cls, names[1]: prob}
        row["error"] = pred.error
        rows.append(row)
    return pd.DataFrame(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="imgpipe-predict", description="Classify images with a trained imgpipe model.")
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="an image, or a folder searched recursively")
    parser.add_argument("--model", default=str(MODEL), help="checkpoint (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=1,
                        help="also show the K most likely classes (default: %(default)s)")
    parser.add_argument("--csv", metavar="OUT", help="also write one row per image to OUT")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="images per forward pass (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be at least 1")
    return args


@cli
def main(argv: list[str] | None = None) -> None:
    """Classify the images at PATH...; exit 1 only if none could be predicted."""
    args = parse_args(argv)
    model, checkpoint = load_checkpoint(args.model)
    top_k = min(args.top_k, len(checkpoint["classes"]))
    paths, missing = find_images(args.paths)
    if not paths and not missing:
        raise UserError(f"no images found in {' '.join(args.paths)} (looked for "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
    device = pick_device()
    predictions = list(missing)
    bar = tqdm(total=len(paths), desc="predict", unit="img", disable=None)
    with bar:
        for pred in classify(paths, model, checkpoint, device, args.batch_size, top_k):
            predictions.append(pred)
            if pred.top:
                bar.write(format_line(pred), file=sys.stdout)
            bar.update()
    failed = [p for p in predictions if p.error]
    if args.csv:
        write_csv(args.csv, as_table(predictions, top_k))
    if failed:
        print(f"could not read {len(failed)} of {len(predictions)} file(s):", file=sys.stderr)
        for pred in failed:
            print(f"  {pred.path}: {pred.error}", file=sys.stderr)
    done = len(predictions) - len(failed)
    if done == 0:
        raise UserError("no image could be predicted")
    print(f"predicted {done} image(s) on {device.type}"
          + (f"; results in {args.csv}" if args.csv else ""), file=sys.stderr)


if __name__ == "__main__":
    main()
