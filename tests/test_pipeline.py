"""End to end: the four stages through the real `dvc` CLI, tracked in a real MLflow store."""

from __future__ import annotations

import json

import pandas as pd
from conftest import dvc, mlflow_runs


def test_fresh_repro_builds_everything(built_repo):
    for out in ["data/manifest.csv", "data/rejects.csv", "data/tensors/meta.json",
                "models/model.pt", "metrics/train.json", "metrics/eval.json",
                "metrics/epochs.csv", "metrics/confusion.csv"]:
        assert (built_repo / out).exists(), out
    manifest = pd.read_csv(built_repo / "data/manifest.csv")
    assert len(manifest) == 200
    assert set(manifest["split"]) == {"train", "val"}
    result = json.loads((built_repo / "metrics/eval.json").read_text())
    assert result["images"] == (manifest["split"] == "val").sum()


def test_second_repro_runs_nothing(clone_built):
    repo = clone_built()
    out = dvc(repo, "repro").stdout
    assert "Running stage" not in out, out
