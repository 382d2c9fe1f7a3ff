"""Evaluate stage: score the held-out split and log it into the training run.

Outputs:
    metrics/eval.json      accuracy, macro F1, loss, and per-class precision/recall/F1
    metrics/confusion.csv  actual,predicted class names per val image (DVC confusion plot)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch
from sklearn import metrics as skm

from stages import tracking
from stages.common import cli, load_params, write_csv, write_json
from stages.models import load_checkpoint, pick_device, predict
from stages.tensors import SplitDataset, as_batch, read_meta

TENSORS = Path("data/tensors")
MODEL = Path("models/model.pt")
METRICS = Path("metrics/eval.json")
CONFUSION = Path("metrics/confusion.csv")


def score(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """Accuracy, loss, macro F1 and per-class scores, from scikit-learn."""
    y_true, y_pred = labels.numpy(), logits.argmax(1).numpy()
    ids = list(range(len(classes)))
    report = skm.classification_report(y_true, y_pred, labels=ids, target_names=classes,
                                       output_dict=True, zero_division=0)
    return {
        "accuracy": skm.accuracy_score(y_true, y_pred),
        "macro_f1": report["macro avg"]["f1-score"],
        "loss": torch.nn.functional.cross_entropy(logits, labels).item(),
        "images": len(y_true),
        "per_class": {c: {"precision": report[c]["precision"], "recall": report[c]["recall"],
                          "f1": report[c]["f1-score"], "support": int(report[c]["support"])}
                      for c in classes},
    }


@cli
def main() -> None:
    """Score models/model.pt on the val split."""
    params = load_params()
    model, checkpoint = load_checkpoint(MODEL)
    device = pick_device()
    classes = checkpoint["classes"]
    val = SplitDataset(TENSORS, "val")
    loader = torch.utils.data.DataLoader(val, batch_size=int(params["train"]["batch_size"]),
                                         collate_fn=as_batch)
    meta = read_meta(TENSORS)
    logits, labels = predict(model.to(device), loader, device, meta)
    result = score(logits, labels, classes)
    write_json(METRICS, result)
    names = pd.Series(classes)
    write_csv(CONFUSION, pd.DataFrame({"actual": names[labels.numpy()].to_numpy(),
                                       "predicted": names[logits.argmax(1).numpy()].to_numpy()}))

    experiment = params.get("mlflow", {}).get("experiment", "imgpipe")
    with tracking.stage_run(experiment, "evaluate", {}, meta["data_version"],
                            run_id=checkpoint.get("run_id")):
        import mlflow

        flat = {f"eval_{k}": v for k, v in result.items() if k != "per_class"}
        for cls, scores in result["per_class"].items():
            flat |= {tracking.metric_key(f"eval_{k}.{cls}"): v
                     for k, v in scores.items() if k != "support"}
        mlflow.log_metrics(flat)
        mlflow.log_artifact(str(METRICS))
    print(f"val accuracy {result['accuracy']:.4f}, macro F1 {result['macro_f1']:.4f}, "
          f"loss {result['loss']:.4f} on {result['images']} images")


if __name__ == "__main__":
    main()
