"""Figures of the experiment suite (seaborn / matplotlib, written as PNG or SVG files).

Each function takes a table, draws one figure, saves it atomically and returns the path; the
notebooks display the saved files, the report links them.

Confidence bands are mean +- 1.96 standard errors (a normal-approximation 95% interval; cheap
on the ~10^5 rows of a sensitivity table, unlike bootstrapping).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from drcnn.analysis.sensitivity import BRANCH_CLS, BRANCH_REG, branch_long
from drcnn.errors import DrcnnError
from drcnn.io import atomic_write

BAND = ("se", 1.96)
IOU_BINS = np.linspace(0.0, 1.0, 21)


def save(fig: plt.Figure, path: str | Path) -> Path:
    """Save ``fig`` (format from the suffix) atomically and close it."""
    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    atomic_write(path, lambda handle: fig.savefig(handle, format=fmt, dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return path


def _with_iou_bins(long: pd.DataFrame) -> pd.DataFrame:
    """Add ``iou_bin``, the centre of the input-IoU bin (20 bins of width 0.05)."""
    index = np.clip(np.digitize(long["input_iou"], IOU_BINS[1:-1]), 0, len(IOU_BINS) - 2)
    return long.assign(iou_bin=(IOU_BINS[index] + IOU_BINS[index + 1]) / 2)


def confidence_vs_iou(table: pd.DataFrame, path: str | Path) -> Path:
    """Classifier sensitivity: true-class probability against input IoU, one line per model."""
    long = _with_iou_bins(branch_long(table))
    data = long[long["branch"] == BRANCH_CLS]
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.lineplot(data=data, x="iou_bin", y="quality", hue="model", errorbar=BAND, marker="o", ax=ax)
    ax.set(xlabel="input IoU with ground truth", ylabel="probability of the true class")
    ax.set(xlim=(0, 1), ylim=(0, 1), title="Classifier: confidence vs shift")
    return save(fig, path)


def regression_vs_iou(table: pd.DataFrame, path: str | Path) -> Path:
    """Regressor sensitivity: output IoU against input IoU, one panel per regression stage."""
    long = _with_iou_bins(branch_long(table))
    data = long[long["branch"] == BRANCH_REG]
    grid = sns.relplot(
        data=data,
        x="iou_bin",
        y="quality",
        hue="model",
        col="stage",
        kind="line",
        errorbar=BAND,
        marker="o",
        height=3.5,
        facet_kws={"xlim": (0, 1), "ylim": (0, 1)},
    )
    for ax in grid.axes.flat:
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    grid.set_axis_labels("input IoU with ground truth", "output IoU with ground truth")
    grid.set_titles("regression stage {col_name}")
    return save(grid.figure, path)


def shift_heatmaps(table: pd.DataFrame, path: str | Path) -> Path:
    """Mean true-class probability and final output IoU over (dx, dy) at scale 1, per model."""
    data = table[np.isclose(table["scale"], 1.0)]
    models = list(dict.fromkeys(data["model"]))
    values = [("true_prob", "true-class probability"), ("final_iou", "final output IoU")]
    fig, axes = plt.subplots(
        len(values),
        len(models),
        figsize=(3.6 * len(models), 6.4),
        squeeze=False,
        constrained_layout=True,
    )
    for col, model in enumerate(models):
        rows = data[data["model"] == model]
        for row, (column, label) in enumerate(values):
            grid = rows.pivot_table(index="dy", columns="dx", values=column, aggfunc="mean")
            ax = axes[row, col]
            sns.heatmap(grid, vmin=0, vmax=1, cmap="viridis", ax=ax, cbar=col == len(models) - 1)
            ax.set_title(f"{model}: {label}", fontsize=9)
            ax.set_xticklabels([f"{float(t.get_text()):g}" for t in ax.get_xticklabels()])
            ax.set_yticklabels([f"{float(t.get_text()):g}" for t in ax.get_yticklabels()])
    return save(fig, path)


def ap_vs_iou(per_iou: pd.DataFrame, path: str | Path) -> Path:
    """AP against the IoU threshold of the match, one line per model."""
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.lineplot(data=per_iou, x="iou", y="AP", hue="model", marker="o", ax=ax)
    ax.set(xlabel="IoU threshold", ylabel="AP (%)", title="AP vs IoU threshold")
    return save(fig, path)


def read_metrics_log(path: str | Path) -> pd.DataFrame:
    """The training log ``metrics.jsonl`` (one JSON object per line) as a table."""
    path = Path(path)
    if not path.is_file():
        raise DrcnnError(f"{path}: training log not found")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return pd.DataFrame([json.loads(line) for line in lines])


def loss_curves(log: pd.DataFrame, path: str | Path, x: str = "iter") -> Path:
    """Every numeric ``*loss*`` column of the training log against ``x`` (log-scale y)."""
    losses = [c for c in log.columns if "loss" in c and pd.api.types.is_numeric_dtype(log[c])]
    if x not in log.columns or not losses:
        raise DrcnnError(
            f"training log: expected a {x!r} column and loss columns, got {list(log.columns)}"
        )
    long = log.melt(id_vars=[x], value_vars=losses, var_name="loss", value_name="value").dropna()
    fig, ax = plt.subplots(figsize=(7, 4))
    sns.lineplot(data=long, x=x, y="value", hue="loss", ax=ax)
    ax.set(yscale="log", xlabel=x, ylabel="loss", title="Training losses")
    return save(fig, path)
