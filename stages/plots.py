"""The evaluation figures, as PNG files: what a person looks at to judge a model.

Figures are built on matplotlib's object API (no pyplot), so no global state or
display backend is involved, and every file is written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from stages.common import atomic_path


def save(fig: Figure, path: str | Path) -> Path:
    """Write a figure as PNG, atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return Path(path)


def confusion_figure(matrix: np.ndarray, classes: list[str], split: str) -> Figure:
    """Confusion matrix normalised by row (share of each true class), with class names."""
    counts = np.asarray(matrix, dtype=np.float64)
    rows = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    n = len(classes)
    side = min(4 + 0.5 * n, 24)
    fig = Figure(figsize=(side + 1.5, side))
    ax = fig.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix ({split}), normalised by row")
    if n <= 30:  # beyond that the numbers no longer fit in their cells
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    dark = shares[i, j] > 0.5
                    ax.text(j, i, f"{shares[i, j]:.2f}\n({int(counts[i, j])})", ha="center",
                            va="center", fontsize=7, color="white" if dark else "black")
    return fig


def loss_figure(epochs: pd.DataFrame) -> Figure:
    """Train and val loss (left) and accuracy (right) per epoch, from metrics/epochs.csv."""
    fig = Figure(figsize=(10, 4))
    loss_ax, acc_ax = fig.subplots(1, 2)
    for ax, metric in ((loss_ax, "loss"), (acc_ax, "acc")):
        for split, style in (("train", "-o"), ("val", "-s")):
            column = f"{split}_{metric}"
            if column in epochs:
                ax.plot(epochs["epoch"], epochs[column], style, label=split, markersize=3)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("loss" if metric == "loss" else "accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    loss_ax.set_title("Loss per epoch")
    acc_ax.set_title("Accuracy per epoch")
    return fig


def per_class_figure(per_class: dict[str, dict[str, Any]], split: str) -> Figure:
    """Horizontal bars of F1 per class, weakest at the top, with precision and recall marked."""
    names = sorted(per_class, key=lambda c: per_class[c]["f1"])
    f1 = [per_class[c]["f1"] for c in names]
    fig = Figure(figsize=(7, min(2 + 0.35 * len(names), 40)))
    ax = fig.add_subplot()
    y = np.arange(len(names))
    ax.barh(y, f1, color="tab:blue", label="F1")
    ax.plot([per_class[c]["precision"] for c in names], y, "k|", markersize=10,
            label="precision")
    ax.plot([per_class[c]["recall"] for c in names], y, "rx", markersize=6, label="recall")
    labels = ax.get_yaxis_transform()  # x in axes units, y in data units: a column at right
    for yi, value, name in zip(y, f1, names):
        ax.text(1.02, yi, f"{value:.2f}  n={per_class[name]['support']}", transform=labels,
                va="center", fontsize=8)
    ax.set_yticks(y, names)
    ax.invert_yaxis()  # weakest first, where the eye starts
    ax.set_xlim(0, 1.0)
    ax.set_xlabel(f"score on the {split} split")
    ax.set_title(f"F1 per class ({split}), weakest first")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=8)
    return fig


def mistakes_figure(mistakes: list[dict[str, Any]], split: str, columns: int = 4) -> Figure:
    """A gallery of mistakes: each thumbnail with its true class, predicted class and confidence.

    Each item holds `image` (H, W, 3 uint8), `true`, `predicted`, `confidence` and `path`.
    """
    if not mistakes:
        fig = Figure(figsize=(5, 1.5))
        fig.text(0.5, 0.5, f"No mistakes on the {split} split", ha="center", va="center")
        return fig
    columns = min(columns, len(mistakes))
    rows = -(-len(mistakes) // columns)
    fig = Figure(figsize=(2.6 * columns, 2.9 * rows))
    for i, item in enumerate(mistakes):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.imshow(item["image"], interpolation="nearest")
        ax.set_title(f"true: {item['true']}\npredicted: {item['predicted']} "
                     f"({item['confidence']:.0%})", fontsize=8, color="darkred")
        ax.set_xlabel(Path(item["path"]).name, fontsize=6)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"Most confident mistakes ({split})")
    return fig
