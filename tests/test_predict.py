"""Predict: finds images, survives broken files, preprocesses exactly like training, and
classifies unseen digits about as well as the model scored on its val split."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, dvc, make_repo, run
from PIL import Image

from stages import predict
from stages.models import create_model, load_checkpoint, pick_device
from stages.sample import NAMES
from stages.tensors import SplitDataset, model_feed, read_meta, to_device

SIZE = 8


def write_image(path: Path, value: int = 128, size: int = 12) -> Path:
    """A small grey PNG (or any format Pillow infers from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (size, size), value).save(path, format="PNG")
    return path


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    """An untrained 3-class checkpoint with everything predict reads."""
    torch.manual_seed(0)
    model = create_model("smallcnn", 3)
    path = tmp_path / "model.pt"
    torch.save({"state_dict": model.state_dict(), "model": "smallcnn",
                "classes": ["a", "b", "c"], "image_size": SIZE, "resize": "squash",
                "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}, path)
    return path


def test_find_images_walks_folders_and_skips_hidden_and_non_images(tmp_path):
    root = tmp_path / "in"
    expected = [write_image(root / "a.png"), write_image(root / "deep" / "er" / "b.PNG")]
    write_image(root / ".hidden.png")
    write_image(root / ".git" / "c.png")
    (root / "notes.txt").write_text("not an image")
    odd = write_image(tmp_path / "named.dat")  # named on the command line: tried anyway
    found, missing = predict.find_images([str(root), str(odd), str(odd), "no/such.png"])
    assert found == expected + [odd]
    assert [(m.path, m.error) for m in missing] == [("no/such.png", "not found")]


def test_broken_files_are_listed_and_the_rest_predicted(tiny_model, tmp_path, capsys):
    folder = tmp_path / "in"
    good = [write_image(folder / f"{i}.png", value=40 * i) for i in range(5)]
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "empty.jpg").write_bytes(b"")
    out = tmp_path / "out" / "predictions.csv"
    predict.main([str(folder), "--model", str(tiny_model), "--top-k", "5", "--csv", str(out),
                  "--batch-size", "2"])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in good]
    for line in lines:
        path, cls, prob, top = line.split("\t")
        assert cls in "abc" and 0 < float(prob) <= 1
        assert top.startswith("top-3: " + cls)  # --top-k 5 is capped at the 3 classes
    assert "could not read 2 of 7 file(s)" in captured.err
    assert f"{folder / 'broken.png'}: not an image Pillow can read" in captured.err
    assert f"{folder / 'empty.jpg'}:" in captured.err

    table = pd.read_csv(out, keep_default_na=False)
    assert len(table) == 7
    assert list(table.columns) == ["path", "predicted", "probability", "top2_class",
                                   "top2_probability", "top3_class", "top3_probability",
                                   "error"]
    ok = table[table["error"] == ""]
    assert sorted(ok["path"]) == sorted(str(p) for p in good)
    probs = ok[["probability", "top2_probability", "top3_probability"]].astype(float)
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-4)  # 3 classes: top-3 is everything
    assert (probs.diff(axis=1).iloc[:, 1:] <= 0).all().all()  # best first
    assert set(table.loc[table["error"] != "", "predicted"]) == {""}


def test_nothing_predicted_exits_non_zero_with_one_line(tiny_model, tmp_path, capsys):
    (tmp_path / "bad.png").write_bytes(b"junk")
    with pytest.raises(SystemExit) as stop:
        predict.main([str(tmp_path / "bad.png"), "missing.png", "--model", str(tiny_model)])
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert "missing.png: not found" in err
    assert err.strip().splitlines()[-1] == "error: no image could be predicted"
    with pytest.raises(SystemExit) as stop:
        predict.main([str(tmp_path), "--model", str(tmp_path / "nope.pt")])
    assert stop.value.code == 1


def test_batches_give_the_same_answers_as_one_by_one(tiny_model, tmp_path):
    model, checkpoint = load_checkpoint(tiny_model)
    paths = [write_image(tmp_path / f"{i}.png", value=25 * i, size=5 + i) for i in range(7)]
    device = pick_device()
    together = list(predict.classify(paths, model, checkpoint, device, batch_size=3, top_k=3))
    alone = [next(predict.classify([p], model, checkpoint, device, top_k=3)) for p in paths]
    assert [p.path for p in together] == [str(p) for p in paths]
    for a, b in zip(together, alone):
        assert [c for c, _ in a.top] == [c for c, _ in b.top]
        assert np.allclose([p for _, p in a.top], [p for _, p in b.top], atol=1e-5)


def test_console_script_is_declared():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["imgpipe-predict"].partition(":")
    assert module == "stages.predict" and getattr(predict, function) is predict.main


def test_predict_sees_val_images_exactly_as_training_did(built_repo, monkeypatch):
    """The model input predict builds from the original files equals the stored val tensors."""
    monkeypatch.chdir(built_repo)
    _, checkpoint = load_checkpoint("models/model.pt")
    manifest = pd.read_csv("data/manifest.csv", keep_default_na=False)
    val_paths = manifest.loc[manifest["split"] == "val", "path"].tolist()
    # What training fed the model: the stored val tensors, normalised as the checkpoint says.
    fed = model_feed(read_meta("data/tensors"), checkpoint["mean"], checkpoint["std"])
    raw = torch.from_numpy(SplitDataset("data/tensors", "val").read_all())
    assert raw.dtype == torch.uint8  # preprocess.storage's default: the pixels themselves
    stored = to_device(raw, torch.device("cpu"), fed)
    pixels = [predict.decode(Path(p), checkpoint)[0] for p in val_paths]
    x = predict.model_input(pixels, checkpoint, torch.device("cpu"))
    assert x.shape == stored.shape and x.dtype == torch.float32
    assert torch.equal(x, stored)  # the same pixels through the same normalisation


def write_unseen_digits(folder: Path, first: int, count: int) -> int:
    """Digits from the far end of scikit-learn's set, saved as stages.sample saves them."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(first, first + count):
        out = folder / NAMES[digits.target[i]] / f"unseen-{i:04d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.round(digits.images[i] * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels, "L").save(out)
    return count


def test_unseen_digits_are_classified_at_the_models_accuracy(tmp_path):
    # Digits 0-599: a test split of 60 images, enough for a steady estimate to compare with.
    repo = make_repo(tmp_path / "repo", images=600, params={"train": {"epochs": 8}})
    dvc(repo, "repro")
    # The honest estimate: the test split's accuracy (val chose the epoch, so it flatters).
    test_acc = json.loads((repo / "metrics/eval.json").read_text())["accuracy"]
    unseen = tmp_path / "unseen"
    write_unseen_digits(unseen, first=1500, count=100)
    (unseen / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "predictions.csv"
    proc = run([sys.executable, "-m", "stages.predict", str(unseen), "--top-k", "3",
                "--csv", str(out)], repo)
    assert "broken.png: corrupt image (Truncated File Read)" in proc.stderr
    table = pd.read_csv(out, keep_default_na=False)
    assert len(table) == 101
    ok = table[table["error"] == ""]
    assert len(ok) == 100
    truth = ok["path"].map(lambda p: Path(p).parent.name)
    accuracy = (ok["predicted"] == truth).mean()
    assert test_acc > 0.75, "the tiny model should learn the digits in 8 epochs"
    assert accuracy > test_acc - 0.15, (accuracy, test_acc)
    assert len(proc.stdout.strip().splitlines()) == 100
