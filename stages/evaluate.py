"""Evaluate stage: score the test split, draw it, and log it into the training run.

The test split is the one that neither trained the model nor chose its epoch (val did),
so its score is unbiased. Without one (index.test_fraction 0 and no test folder) the val
split is scored instead, and the stage says that the score is optimistic.

It also logs the servable model (stages/serving.py) into the training run: pictures in,
classes out, with one of the scored images as its input example.

Outputs:
    metrics/eval.json       the headline: accuracy, macro F1, top-k accuracy, loss (a DVC metric)
    metrics/eval_details.json  the split scored, weighted F1, the number of images, and per
                            class precision, recall, F1 and support
    metrics/confusion.csv   actual,predicted class names per scored image (DVC confusion plot)
    metrics/per_class.csv   class,precision,recall,f1,support (DVC bar plot)
    plots/*.png             confusion matrix, loss curves, F1 per class, confident mistakes
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn import metrics as skm

from stages import params, plots, serving, tracking
from stages.common import UserError, cli, write_csv, write_json
from stages.models import load_checkpoint, pick_device, predict
from stages.tensors import SplitDataset, as_batch, model_feed, read_meta

TENSORS = Path("data/tensors")
MANIFEST = Path("data/manifest.csv")
MODEL = Path("models/model.pt")
EPOCHS_LOG = Path("metrics/epochs.csv")
METRICS = Path("metrics/eval.json")
DETAILS = Path("metrics/eval_details.json")
CONFUSION = Path("metrics/confusion.csv")
PER_CLASS = Path("metrics/per_class.csv")
PLOTS = Path("plots")
THUMBNAIL = 96  # pixels: the longest side of a gallery image
# The numbers runs are compared by: DVC's metrics, and the pipeline run's in MLflow.
HEADLINE = ("accuracy", "macro_f1", "loss")


# ---------------------------------------------------------------- scores

def score(logits: torch.Tensor, labels: torch.Tensor, classes: list[str],
          top_k: int = 3) -> dict[str, Any]:
    """Accuracy, top-k accuracy, loss, macro/weighted F1 and per-class scores, from scikit-learn.

    Top-k accuracy is left out when k is not between 2 and the number of classes - 1,
    where it would only repeat accuracy or always be 1.
    """
    y_true, y_pred = labels.numpy(), logits.argmax(1).numpy()
    ids = list(range(len(classes)))
    report = skm.classification_report(y_true, y_pred, labels=ids, target_names=classes,
                                       output_dict=True, zero_division=0)
    # Headline first: `dvc exp show` orders a file's columns as its keys.
    result: dict[str, Any] = {"accuracy": skm.accuracy_score(y_true, y_pred),
                              "macro_f1": report["macro avg"]["f1-score"]}
    if 2 <= top_k < len(classes):
        probs = torch.softmax(logits.float(), 1).numpy()
        result[f"top{top_k}_accuracy"] = skm.top_k_accuracy_score(y_true, probs, k=top_k,
                                                                   labels=ids)
    result |= {
        "loss": torch.nn.functional.cross_entropy(logits.float(), labels).item(),
        "weighted_f1": report["weighted avg"]["f1-score"],
        "images": len(y_true),
        "per_class": {c: {"precision": report[c]["precision"], "recall": report[c]["recall"],
                          "f1": report[c]["f1-score"], "support": int(report[c]["support"])}
                      for c in classes},
    }
    return {k: float(v) if isinstance(v, np.floating) else v for k, v in result.items()}


def headline(result: dict[str, Any]) -> dict[str, float]:
    """The numbers runs are compared by: accuracy, macro F1, top-k accuracy (if any), loss."""
    return {k: v for k, v in result.items() if k in HEADLINE or is_top_k(k)}


def is_top_k(key: str) -> bool:
    """True for a top-k accuracy key, like top3_accuracy."""
    return key.startswith("top") and key.endswith("_accuracy")


def confusion(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """Counts: row = true class, column = predicted class."""
    return skm.confusion_matrix(labels.numpy(), logits.argmax(1).numpy(),
                                labels=list(range(num_classes)))


def weakest_classes(result: dict[str, Any], n: int = 3) -> list[tuple[str, float]]:
    """The n classes with the lowest F1 (ties: fewer images first), as (class, F1)."""
    per_class = result["per_class"]
    ranked = sorted(per_class, key=lambda c: (per_class[c]["f1"], per_class[c]["support"]))
    return [(c, per_class[c]["f1"]) for c in ranked[:n]]


def confused_pairs(matrix: np.ndarray, classes: list[str], n: int = 3
                   ) -> list[tuple[str, str, int]]:
    """The n most frequent mistakes, as (true class, predicted class, count)."""
    off = np.asarray(matrix).copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:n]
    pairs = [np.unravel_index(i, off.shape) for i in order]
    return [(classes[i], classes[j], int(off[i, j])) for i, j in pairs if off[i, j] > 0]


def summary(result: dict[str, Any], matrix: np.ndarray, classes: list[str], split: str
            ) -> str:
    """A few lines a person reads first: the headline numbers, weakest classes, worst mix-ups."""
    top = next((f", {k.removesuffix('_accuracy')} {v:.4f}" for k, v in result.items()
                if is_top_k(k)), "")
    lines = [f"{split} accuracy {result['accuracy']:.4f}{top}, macro F1 {result['macro_f1']:.4f}, "
             f"weighted F1 {result['weighted_f1']:.4f}, loss {result['loss']:.4f} "
             f"on {result['images']} images"]
    weak = ", ".join(f"{c} {f1:.2f}" for c, f1 in weakest_classes(result))
    lines.append(f"weakest classes (F1): {weak}")
    pairs = confused_pairs(matrix, classes)
    mixed = ", ".join(f"{t} -> {p} ({n}x)" for t, p, n in pairs) or "none"
    lines.append(f"most confused (true -> predicted): {mixed}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the gallery of mistakes

def confident_mistakes(logits: torch.Tensor, labels: torch.Tensor, n: int
                       ) -> list[tuple[int, int, float]]:
    """The n wrong predictions made with the highest confidence, as (row, predicted, prob)."""
    probs = torch.softmax(logits.float(), 1)
    confidence, predicted = probs.max(1)
    wrong = torch.nonzero(predicted != labels).flatten()
    order = wrong[torch.argsort(confidence[wrong], descending=True, stable=True)][:n]
    return [(int(i), int(predicted[i]), float(confidence[i])) for i in order]


def scored_split(meta: dict[str, Any]) -> str:
    """The split to score: test, or val when there is no test split."""
    return "test" if meta["counts"].get("test", 0) > 0 else "val"


def split_paths(manifest_path: Path, labels: torch.Tensor, split: str) -> list[str] | None:
    """Image path of each row of a split (tensors keep manifest order), or None if they differ."""
    try:
        manifest = pd.read_csv(manifest_path, keep_default_na=False)
    except FileNotFoundError:
        return None
    rows = manifest[manifest["split"] == split]
    if len(rows) != len(labels) or not np.array_equal(rows["label"].to_numpy(), labels.numpy()):
        return None
    return rows["path"].tolist()


def thumbnail(path: str | None, stored: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """The original image, small; if it cannot be read, the stored tensor de-normalised."""
    from PIL import Image, ImageOps

    from stages.imaging import to_rgb

    if path is not None:
        try:
            with Image.open(path) as img:
                img = to_rgb(ImageOps.exif_transpose(img))
                img.thumbnail((THUMBNAIL, THUMBNAIL))
                return np.asarray(img)
        except OSError:
            pass
    if stored.dtype == np.uint8:  # preprocess.storage: uint8 keeps the pixels as they are
        return stored.transpose(1, 2, 0)
    mean = np.asarray(meta["mean"])[:, None, None]
    std = np.asarray(meta["std"])[:, None, None]
    pixels = (stored.astype(np.float32) * std + mean).clip(0, 1) * 255
    return pixels.round().astype(np.uint8).transpose(1, 2, 0)


def gallery(logits: torch.Tensor, labels: torch.Tensor, classes: list[str], meta: dict[str, Any],
            count: int, paths: list[str] | None, split: str) -> list[dict[str, Any]]:
    """Thumbnails and captions of the `count` most confident mistakes (paths: split_paths)."""
    found = confident_mistakes(logits, labels, count)
    if not found:
        return []
    rows = SplitDataset(TENSORS, split)
    return [{"image": thumbnail(paths[i] if paths else None, rows.read(np.array([i]))[0], meta),
             "true": classes[int(labels[i])], "predicted": classes[p], "confidence": conf,
             "path": paths[i] if paths else f"{split} row {i}"}
            for i, p, conf in found]


# ---------------------------------------------------------------- the stage

def draw(result: dict[str, Any], matrix: np.ndarray, classes: list[str],
         mistakes: list[dict[str, Any]], folder: Path, split: str) -> list[Path]:
    """Write every evaluation PNG into folder; returns their paths."""
    written = [plots.save(plots.confusion_figure(matrix, classes, split),
                          folder / "confusion.png")]
    if EPOCHS_LOG.exists():
        epochs = pd.read_csv(EPOCHS_LOG)
        written.append(plots.save(plots.loss_figure(epochs), folder / "loss.png"))
    else:
        print(f"note: {EPOCHS_LOG} not found: no loss curves")
    written.append(plots.save(plots.per_class_figure(result["per_class"], split),
                              folder / "per_class_f1.png"))
    written.append(plots.save(plots.mistakes_figure(mistakes, split),
                              folder / "mistakes.png"))
    return written


def log_run(log: tracking.RunLogger, pipeline: tracking.RunLogger, result: dict[str, Any],
            report: str, pngs: list[Path]) -> None:
    """Evaluation metrics, files and PNGs into the training run; the headline into the parent."""
    flat = {f"eval_{k}": v for k, v in result.items() if k != "per_class"}
    for cls, scores in result["per_class"].items():
        flat |= {tracking.metric_key(f"eval_{k}.{cls}"): v
                 for k, v in scores.items() if k != "support"}
    log.metrics(flat)
    pipeline.metrics({f"eval_{k}": v for k, v in headline(result).items()})
    for path in (METRICS, DETAILS, CONFUSION, PER_CLASS):
        log.artifact(path, "evaluation")
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "summary.txt"
        text.write_text(report + "\n", encoding="utf-8")
        log.artifact(text, "evaluation")
    for png in pngs:
        log.artifact(png, "plots")


@cli
def main() -> None:
    """Score models/model.pt on the test split, draw the plots, log them to the training run."""
    p = params.load()
    top_k = p.evaluate.top_k
    model, checkpoint = load_checkpoint(MODEL)
    meta = read_meta(TENSORS)
    classes = checkpoint["classes"]
    if classes != meta["classes"]:
        raise UserError(f"{MODEL} was trained on other classes than {TENSORS} holds: "
                        "run `dvc repro` to retrain it")
    split = scored_split(meta)
    scored = SplitDataset(TENSORS, split)
    if len(scored) == 0:
        raise UserError("the test and val splits are empty: add images, or raise "
                        "index.test_fraction")
    device = pick_device()
    fed = model_feed(meta, checkpoint["mean"], checkpoint["std"])  # as train fed the model
    loader = torch.utils.data.DataLoader(scored, batch_size=p.train.batch_size,
                                         collate_fn=as_batch)
    logits, labels = predict(model.to(device), loader, device, fed)

    result = score(logits, labels, classes, top_k)
    matrix = confusion(logits, labels, len(classes))
    top = headline(result)
    write_json(METRICS, top)
    write_json(DETAILS, {"split": split} | {k: v for k, v in result.items() if k not in top})
    names = pd.Series(classes)
    write_csv(CONFUSION, pd.DataFrame({"actual": names[labels.numpy()].to_numpy(),
                                       "predicted": names[logits.argmax(1).numpy()].to_numpy()}))
    write_csv(PER_CLASS, pd.DataFrame([{"class": c, **s}
                                       for c, s in result["per_class"].items()]))
    paths = split_paths(MANIFEST, labels, split)
    if paths is None:
        print(f"note: {MANIFEST} does not match the {split} tensors; gallery shows stored pixels")
    pngs = draw(result, matrix, classes,
                gallery(logits, labels, classes, meta, p.evaluate.mistakes, paths, split), PLOTS,
                split)
    report = summary(result, matrix, classes, split)
    if split != "test":
        report += ("\nnote: there is no test split, so this score comes from the val split, "
                   "which also chose the best epoch: it is optimistic; hold out a test split "
                   "with index.test_fraction or a data/raw/test folder")
    example = serving.example_image(paths[0] if paths else None,
                                    thumbnail(None, scored.read(np.array([0]))[0], meta))

    with tracking.stage_run(p.mlflow.experiment, "evaluate", {}, meta["data_version"],
                            model_run=checkpoint.get("run_id")) as run:
        log = tracking.RunLogger(run.info.run_id)
        pipeline = tracking.RunLogger(tracking.pipeline_run_id())
        log_run(log, pipeline, result, report, pngs)
        serving.log_model(log, MODEL, example, max(1, min(top_k, len(classes))),
                          p.train.register_as)
    for logger in (log, pipeline):
        if logger.unlogged():
            print(f"warning: {logger.unlogged()}")
    print(report)
    print(f"plots in {PLOTS}/: `dvc plots show` draws them all on one page")


if __name__ == "__main__":
    main()
