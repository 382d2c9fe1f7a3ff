"""Evaluate: scores checked against a hand-computed confusion matrix, and the real outputs
(metrics, DVC plots, PNGs in the training run) checked through dvc and MLflow."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import dvc, mlflow_runs, set_params

from stages import evaluate

CLASSES = ["zero", "one", "two"]
# Six images, three classes with supports 3, 2, 1. Predictions (argmax):
#   zero: zero, zero, one     one: one, two     two: two
# Second choices put the true class in the top 2 for every image except the 5th.
LOGITS = torch.tensor([[3.0, 1.0, 0.0],
                       [3.0, 0.0, 1.0],
                       [1.0, 3.0, 0.0],
                       [0.0, 3.0, 1.0],
                       [2.0, 0.0, 3.0],
                       [0.0, 1.0, 3.0]])
LABELS = torch.tensor([0, 0, 0, 1, 1, 2])
# By hand: rows are true classes, columns predicted classes.
MATRIX = np.array([[2, 1, 0],
                   [0, 1, 1],
                   [0, 0, 1]])
PNGS = ["confusion.png", "loss.png", "per_class_f1.png", "mistakes.png"]


def hand_scores(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall and F1 per class, straight from the definitions."""
    tp = np.diag(matrix).astype(float)
    precision = tp / matrix.sum(axis=0)
    recall = tp / matrix.sum(axis=1)
    return {"precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall)}


def test_score_matches_hand_computed_confusion_matrix():
    result = evaluate.score(LOGITS, LABELS, CLASSES, top_k=2)
    assert (evaluate.confusion(LOGITS, LABELS, 3) == MATRIX).all()
    hand = hand_scores(MATRIX)
    # The hand numbers themselves, so that a wrong matrix cannot pass silently.
    assert hand["f1"] == pytest.approx([0.8, 0.5, 2 / 3])
    support = MATRIX.sum(axis=1)
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["top2_accuracy"] == pytest.approx(5 / 6)
    assert result["macro_f1"] == pytest.approx(hand["f1"].mean())
    assert result["weighted_f1"] == pytest.approx((hand["f1"] * support).sum() / support.sum())
    assert result["weighted_f1"] == pytest.approx(0.677777, abs=1e-6)
    logits = LOGITS.numpy().astype(np.float64)
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    assert result["loss"] == pytest.approx(-log_softmax[np.arange(6), LABELS.numpy()].mean(),
                                           rel=1e-6)
    assert result["images"] == 6
    for i, name in enumerate(CLASSES):
        got = result["per_class"][name]
        assert got["support"] == support[i]
        for key in ("precision", "recall", "f1"):
            assert got[key] == pytest.approx(hand[key][i]), (name, key)
    json.dumps(result)  # plain Python numbers: eval.json must serialise


def test_top_k_is_left_out_when_it_says_nothing():
    assert "top3_accuracy" not in evaluate.score(LOGITS, LABELS, CLASSES, top_k=3)
    assert not any(k.startswith("top") for k in evaluate.score(LOGITS, LABELS, CLASSES, 1))


def test_summary_names_weakest_classes_and_confused_pairs():
    result = evaluate.score(LOGITS, LABELS, CLASSES, top_k=2)
    assert [c for c, _ in evaluate.weakest_classes(result, 2)] == ["one", "two"]
    assert evaluate.confused_pairs(MATRIX, CLASSES) == [("zero", "one", 1), ("one", "two", 1)]
    text = evaluate.summary(result, MATRIX, CLASSES, "test")
    assert "weakest classes (F1): one 0.50, two 0.67, zero 0.80" in text
    assert "zero -> one (1x), one -> two (1x)" in text
    assert "top2 0.8333" in text
    assert text.startswith("test accuracy 0.6667, top2 0.8333, macro F1 ")
    assert text.splitlines()[0].endswith(" on 6 images")
    assert evaluate.summary(result, MATRIX, CLASSES, "val").startswith("val accuracy 0.6667")
    perfect = evaluate.summary(evaluate.score(LOGITS, LOGITS.argmax(1), CLASSES), np.eye(3),
                               CLASSES, "test")
    assert "most confused (true -> predicted): none" in perfect


def test_confident_mistakes_come_most_confident_first():
    found = evaluate.confident_mistakes(LOGITS, LABELS, 10)
    # Wrong: row 2 (one, margin 2 over zero) and row 4 (two, margin 1 over zero).
    assert [(i, p) for i, p, _ in found] == [(2, 1), (4, 2)]
    assert found[0][2] > found[1][2] > 1 / 3
    assert evaluate.confident_mistakes(LOGITS, LABELS, 1) == found[:1]
    assert evaluate.confident_mistakes(LOGITS, LOGITS.argmax(1), 5) == []


def test_repro_writes_metrics_plots_and_training_run_artifacts(built_repo, tmp_path):
    # The headline is the DVC metric; the rest sits beside it.
    result = json.loads((built_repo / "metrics/eval.json").read_text())
    assert list(result) == ["accuracy", "macro_f1", "top3_accuracy", "loss"]
    assert all(isinstance(v, float) for v in result.values())
    details = json.loads((built_repo / "metrics/eval_details.json").read_text())
    assert isinstance(details["weighted_f1"], float)
    # Scored on exactly the test split's images, in manifest order.
    manifest = pd.read_csv(built_repo / "data/manifest.csv", keep_default_na=False)
    test = manifest[manifest["split"] == "test"]
    assert details["split"] == "test" and details["images"] == len(test) > 0
    confusion = pd.read_csv(built_repo / "metrics/confusion.csv", keep_default_na=False)
    assert list(confusion["actual"]) == list(test["class"])
    classes = sorted(details["per_class"])
    assert len(classes) == 10
    assert sum(c["support"] for c in details["per_class"].values()) == details["images"]
    per_class = pd.read_csv(built_repo / "metrics/per_class.csv")
    assert sorted(per_class["class"]) == classes
    for name in PNGS:
        assert (built_repo / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    # The PNGs go into the training run, the one whose id the checkpoint holds.
    from mlflow import MlflowClient

    run_id = torch.load(built_repo / "models/model.pt", weights_only=True)["run_id"]
    runs = {r.info.run_id: r for r in mlflow_runs(built_repo)}
    assert runs[run_id].data.tags["imgpipe.stage"] == "train"
    assert runs[run_id].data.metrics["eval_accuracy"] == pytest.approx(result["accuracy"])
    # The headline also goes to the pipeline's parent run, the row runs are compared by.
    parent = runs[runs[run_id].data.tags["mlflow.parentRunId"]].data.metrics
    assert {k: parent[f"eval_{k}"] for k in result} == pytest.approx(result)
    client = MlflowClient(tracking_uri=f"sqlite:///{built_repo / 'mlflow.db'}")
    logged = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert logged == {f"plots/{name}" for name in PNGS}
    summary = client.download_artifacts(run_id, "evaluation/summary.txt", str(tmp_path))
    assert "weakest classes" in Path(summary).read_text()

    # One HTML page with every plot: the vega ones by title, the PNGs as images.
    out = tmp_path / "page"
    dvc(built_repo, "plots", "show", "-o", str(out))
    html = (out / "index.html").read_text()
    for title in ("Loss per epoch", "Accuracy per epoch", "Confusion matrix (test)",
                  "F1 per class (test)"):
        assert f'"text": "{title}"' in html, title
    for name in PNGS:
        assert f'src="static/workspace_plots_{name}"' in html, name
        assert (out / "static" / f"workspace_plots_{name}").stat().st_size > 1000


def test_gallery_shows_test_images_with_their_true_class(built_repo, monkeypatch):
    monkeypatch.chdir(built_repo)
    from stages.models import load_checkpoint, pick_device, predict
    from stages.tensors import SplitDataset, as_batch, read_meta

    model, checkpoint = load_checkpoint(evaluate.MODEL)
    meta = read_meta(evaluate.TENSORS)
    assert evaluate.scored_split(meta) == "test"
    loader = torch.utils.data.DataLoader(SplitDataset(evaluate.TENSORS, "test"), batch_size=64,
                                         collate_fn=as_batch)
    logits, labels = predict(model, loader, pick_device(), meta)
    paths = evaluate.split_paths(evaluate.MANIFEST, labels, "test")
    manifest = pd.read_csv(evaluate.MANIFEST, keep_default_na=False)
    assert paths == manifest.loc[manifest["split"] == "test", "path"].tolist()
    assert evaluate.split_paths(evaluate.MANIFEST, labels, "val") is None  # other rows
    items = evaluate.gallery(logits, labels, checkpoint["classes"], meta, 4, paths, "test")
    assert 0 < len(items) <= 4
    for item in items:
        assert item["path"] in paths
        assert item["path"].split("/")[-2] == item["true"] != item["predicted"]
        assert item["image"].dtype == np.uint8 and item["image"].shape[2] == 3


def test_metrics_and_plots_diff_show_an_lr_change(clone_built, tmp_path):
    repo = clone_built()
    out = dvc(repo, "exp", "run", "-S", "lr=0.01").stdout
    assert "weakest classes (F1):" in out and "most confused" in out
    diffs = json.loads(dvc(repo, "metrics", "diff", "--json").stdout)
    # Only the headline numbers are metrics: no stage bookkeeping, no per-class rows.
    assert set(diffs) <= {"metrics/eval.json", "metrics/train.json"}
    diff = diffs["metrics/eval.json"]
    assert "loss" in diff and set(diff) <= {"accuracy", "macro_f1", "top3_accuracy", "loss"}
    for change in diff.values():
        assert set(change) >= {"old", "new"}
    assert diff["loss"]["old"] != diff["loss"]["new"]
    table = dvc(repo, "metrics", "diff", "--targets", "metrics/eval.json").stdout
    assert re.search(r"metrics/eval.json\s+loss\s+[\d.]+\s+[\d.]+\s+-?[\d.]+", table), table

    exp = dvc(repo, "exp", "list", "--name-only").stdout.split()[0]
    page = tmp_path / "diff"
    dvc(repo, "plots", "diff", "HEAD", exp, "-o", str(page))
    html = (page / "index.html").read_text()
    for name in PNGS:
        for rev in ("HEAD", exp):
            assert f'src="static/{rev}_plots_{name}"' in html, (rev, name)
    assert (page / "static" / "HEAD_plots_confusion.png").read_bytes() != (
        page / "static" / f"{exp}_plots_confusion.png").read_bytes()


def test_without_a_test_split_val_is_scored_and_said_to_be_optimistic(clone_built):
    repo = clone_built()
    set_params(repo, index={"test_fraction": 0})
    out = dvc(repo, "repro").stdout
    manifest = pd.read_csv(repo / "data/manifest.csv", keep_default_na=False)
    assert set(manifest["split"]) == {"train", "val"}
    details = json.loads((repo / "metrics/eval_details.json").read_text())
    assert details["split"] == "val" and details["images"] == (manifest["split"] == "val").sum()
    assert f"val accuracy {json.loads((repo / 'metrics/eval.json').read_text())['accuracy']:.4f}" \
        in out
    notes = [line for line in out.splitlines() if "there is no test split" in line]
    assert notes == ["note: there is no test split, so this score comes from the val split, "
                     "which also chose the best epoch: it is optimistic; hold out a test split "
                     "with index.test_fraction or a data/raw/test folder"]
