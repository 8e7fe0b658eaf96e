"""Figures of the experiment suite (seaborn / matplotlib, written as PNG or SVG files).

Each function takes a table, draws one figure, saves it atomically and returns the path; the
notebooks display the saved files, the report links them.

Confidence bands are mean +- 1.96 standard errors (a normal-approximation 95% interval; cheap
on the ~10^5 rows of a sensitivity table, unlike bootstrapping).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from drcnn.analysis.error_analysis import SETTING_LABELS
from drcnn.analysis.proposals import BRANCH_PROPOSALS
from drcnn.analysis.seeds import model_of
from drcnn.analysis.sensitivity import (
    BRANCH_CLS,
    BRANCH_REG,
    branch_long,
    num_stages,
    probability_curve,
    regression_curve,
)
from drcnn.errors import DrcnnError
from drcnn.io import atomic_write, read_json_lines


def _seaborn() -> ModuleType:
    """seaborn, imported on first use: where scipy is installed seaborn imports scipy.stats,
    1.5 s on an H200 machine (2026-11-27), paid by every notebook that imports this module,
    most of which draw nothing with seaborn (the sensitivity steps)."""
    import seaborn

    return seaborn


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


def _binned_quality(data: pd.DataFrame) -> tuple[list[str], pd.DataFrame]:
    """The models in order of appearance, and the mean quality with its standard error per
    model, stage and input-IoU bin: the lines and bands of the quality figures, aggregated
    once (seaborn's own aggregation of the millions of long rows of an 18-run study took most
    of these figures' time)."""
    models = data["model"].unique().tolist()  # in order of appearance
    groups = data.groupby(["model", "stage", "iou_bin"], sort=True, observed=True)["quality"]
    return models, groups.agg(["mean", "sem"]).reset_index()


def _quality_lines(ax: plt.Axes, binned: pd.DataFrame, models: list[str]) -> None:
    """One line per model (the same colour for a model in every panel), +- 1.96 SE bands."""
    for i, model in enumerate(models):
        part = binned[binned["model"] == model]
        _line_with_band(ax, part["iou_bin"], part["mean"], part["sem"], f"C{i}", model)


def confidence_vs_iou(table: pd.DataFrame, path: str | Path) -> Path:
    """Classifier quality: true-class probability against input IoU, one line per model."""
    long = _with_iou_bins(branch_long(table))
    models, binned = _binned_quality(long[long["branch"] == BRANCH_CLS])
    fig, ax = plt.subplots(figsize=(6, 4))
    _quality_lines(ax, binned, models)
    ax.set(xlabel="input IoU with ground truth", ylabel="probability of the true class")
    ax.set(xlim=(0, 1), ylim=(0, 1), title="Classifier: confidence vs shift")
    ax.legend(fontsize=8)
    return save(fig, path)


def regression_vs_iou(table: pd.DataFrame, path: str | Path) -> Path:
    """Regressor quality: output IoU against input IoU, one panel per regression stage (the
    diagonal: output as good as input)."""
    long = _with_iou_bins(branch_long(table))
    models, binned = _binned_quality(long[long["branch"] == BRANCH_REG])
    stages = sorted(binned["stage"].unique())
    fig, axes = plt.subplots(
        1, len(stages), figsize=(3.5 * len(stages) + 1.5, 3.5), sharey=True, squeeze=False
    )
    for stage, ax in zip(stages, axes[0], strict=True):
        _quality_lines(ax, binned[binned["stage"] == stage], models)
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), title=f"regression stage {stage}")
        ax.set_xlabel("input IoU with ground truth")
    axes[0, 0].set_ylabel("output IoU with ground truth")
    axes[0, -1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return save(fig, path)


def draw_response_curves(axes: Sequence[plt.Axes], table: pd.DataFrame) -> None:
    """The response curves on ``axes`` (the classifier's, then one per regression stage).

    Classifier: mean true-class probability against the translation ``|s|`` (fraction of box
    size; the dotted line marks half the value at 0, where the invariance radius is read).
    Regression stage k: mean predicted against ideal translation delta (dx and dy pooled, over the
    positive zone; the diagonal is an oracle, gain 1, the horizontal line a stage that ignores
    the shift, gain 0). One line per model, bands of +- 1.96 standard errors.
    """
    models = table["model"].unique().tolist()  # in order of appearance
    colors = {model: f"C{i}" for i, model in enumerate(models)}
    prob = probability_curve(table)
    ax = axes[0]
    for model in models:
        curve = prob[prob["model"] == model]
        _line_with_band(ax, curve["radius"], curve["prob"], curve["sem"], colors[model], model)
        if len(curve) and curve["radius"].iloc[0] == 0:
            ax.axhline(curve["prob"].iloc[0] / 2, color=colors[model], linestyle=":", lw=1)
    ax.set(xlabel="translation |s| (fraction of box size)", ylabel="true-class probability")
    ax.set(ylim=(0, 1), title="classifier")
    ax.legend(fontsize=8)
    for stage, ax in enumerate(axes[1:]):
        curve = regression_curve(table, stage)
        for model in models:
            part = curve[curve["model"] == model]
            _line_with_band(ax, part["ideal"], part["pred"], part["sem"], colors[model], model)
        if not curve.empty:
            low, high = curve["ideal"].min(), curve["ideal"].max()
            ax.plot([low, high], [low, high], color="grey", linestyle="--", lw=1)
        ax.axhline(0, color="grey", lw=1)
        ax.set(xlabel="ideal delta (dx, dy; normalised)", ylabel="predicted delta")
        ax.set(title=f"regression stage {stage}")


def _line_with_band(
    ax: plt.Axes, x: pd.Series, y: pd.Series, sem: pd.Series, color: str, label: str
) -> None:
    """A line with dots and a +- 1.96 standard-error band."""
    ax.plot(x, y, marker=".", color=color, label=label)
    band = 1.96 * sem.fillna(0)
    ax.fill_between(x, y - band, y + band, color=color, alpha=0.2)


def response_curves(table: pd.DataFrame, path: str | Path) -> Path:
    """The response curves (:func:`draw_response_curves`) side by side, saved to ``path``."""
    panels = 1 + num_stages(table)
    fig, axes = plt.subplots(1, panels, figsize=(3.6 * panels, 3.6), constrained_layout=True)
    draw_response_curves(list(np.atleast_1d(axes)), table)
    return save(fig, path)


def _heatmap(ax: plt.Axes, grid: pd.DataFrame, title: str, every: int = 2) -> None:
    """``grid`` (index ``dy``, columns ``dx``) as square cells in [0, 1] with a colour bar, its
    first row on top, and every ``every``-th shift labelled (``-0.5``, ``-0.3``, ...) so that the
    labels of an 11 x 11 grid do not run into each other. Drawn with matplotlib: seaborn's
    ``heatmap`` draws the whole figure at each call to check its labels for overlap, which made
    the 36 heat maps of an 18-run study take 16 s."""
    mesh = ax.pcolormesh(
        np.ma.masked_invalid(grid.to_numpy(dtype=float)), vmin=0, vmax=1, cmap="viridis"
    )
    ax.figure.colorbar(mesh, ax=ax).outline.set_visible(False)
    ax.spines[:].set_visible(False)
    ax.set_aspect("equal")
    ax.invert_yaxis()
    for axis, values in ((ax.xaxis, grid.columns), (ax.yaxis, grid.index)):
        labels = [f"{float(v):g}" if i % every == 0 else "" for i, v in enumerate(values)]
        axis.set_ticks(np.arange(len(values)) + 0.5, labels, rotation=0, fontsize=8)
    ax.set(xlabel=grid.columns.name, ylabel=grid.index.name)
    ax.set_title(title, fontsize=9)


def shift_heatmaps(table: pd.DataFrame, path: str | Path) -> Path:
    """Mean true-class probability and final output IoU over (dx, dy) at scale 1: one row per
    model (its seed runs pooled), the two quantities side by side."""
    data = table[np.isclose(table["scale"], 1.0)]
    # model_of once per run, not once per row (a study table has about 10^6 rows)
    data = data.assign(model=data["model"].map({r: model_of(r) for r in data["model"].unique()}))
    models = data["model"].unique().tolist()  # in order of appearance
    values = [("true_prob", "true-class probability"), ("final_iou", "final output IoU")]
    fig, axes = plt.subplots(
        len(models),
        len(values),
        figsize=(7.6, 3.4 * len(models)),
        squeeze=False,
        constrained_layout=True,
    )
    for row, model in enumerate(models):
        rows = data[data["model"] == model]
        for col, (column, label) in enumerate(values):
            grid = rows.pivot_table(index="dy", columns="dx", values=column, aggfunc="mean")
            _heatmap(axes[row, col], grid, f"{model}: {label}")
    return save(fig, path)


def ap_vs_iou(per_iou: pd.DataFrame, path: str | Path) -> Path:
    """AP against the IoU threshold of the match, one line per model: the mean over its seed
    runs with a 95% band (seaborn's bootstrap over the runs) when it has several; the legend
    beside the axes, so that it never hides a line."""
    data = per_iou.assign(model=per_iou["model"].map(model_of))
    fig, ax = plt.subplots(figsize=(6, 4))
    _seaborn().lineplot(
        data=data, x="iou", y="AP", hue="model", marker="o", errorbar=("ci", 95), ax=ax
    )
    ax.set(xlabel="IoU threshold", ylabel="AP (%)", title="AP vs IoU threshold")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    return save(fig, path)


def proposal_iou_histograms(hist: pd.DataFrame, path: str | Path) -> Path:
    """IoU with the ground truth of the stage-0 samples each branch trains on, per image.

    ``hist``: :func:`drcnn.analysis.proposals.histograms`. One row of panels per model (the
    runs of its seeds averaged), one column per RPN NMS setting ``t_cls/t_reg``; in each, the
    classification and the regression samples per image as step histograms (0.05 wide; symlog
    y axis, linear below 0.1 per image). A head that trains both branches on one sample (Faster
    / Cascade R-CNN) has one line; the dotted line marks IoU 0.5.
    """
    data = hist[hist["branch"] != BRANCH_PROPOSALS].assign(run_model=hist["model"].map(model_of))
    models = list(dict.fromkeys(data["run_model"]))
    settings = list(dict.fromkeys(data["nms"]))
    fig, axes = plt.subplots(
        len(models),
        len(settings),
        figsize=(3.4 * len(settings), 2.8 * len(models)),
        squeeze=False,
        constrained_layout=True,
    )
    for row, model in enumerate(models):
        for col, nms in enumerate(settings):
            ax = axes[row, col]
            panel = data[(data["run_model"] == model) & (data["nms"] == nms)]
            if panel.empty:
                ax.set_axis_off()
                continue
            shared = bool(panel["shared_sample"].any())
            branches = [BRANCH_CLS] if shared else [BRANCH_CLS, BRANCH_REG]
            for k, branch in enumerate(branches):
                mean = panel[panel["branch"] == branch].groupby("bin_lo")["per_image"].mean()
                label = "both branches (one sample)" if shared else branch
                ax.stairs(mean.to_numpy(), [*mean.index, 1.0], color=f"C{k}", label=label, lw=1.5)
            ax.axvline(0.5, color="grey", linestyle=":", lw=1)
            ax.set_yscale("symlog", linthresh=0.1)  # hundreds of negatives, a few high-IoU boxes
            ax.set(xlim=(0, 1), ylim=(0, None), xlabel="IoU with ground truth")
            ax.set_title(f"{model}, NMS {nms}", fontsize=9)
            ax.tick_params(labelbottom=True)
            ax.legend(fontsize=7)
            if col == 0:
                ax.set_ylabel("samples per image (symlog)")
    return save(fig, path)


def read_metrics_log(path: str | Path) -> pd.DataFrame:
    """The training log ``metrics.jsonl`` (one JSON object per line) as a table; a torn last
    line (a run killed mid-append) is dropped with a warning, as a resumed run drops it."""
    path = Path(path)
    if not path.is_file():
        raise DrcnnError(f"{path}: training log not found")
    return pd.DataFrame(read_json_lines(path))


def loss_curves(log: pd.DataFrame, path: str | Path, x: str = "iter") -> Path:
    """Every numeric ``*loss*`` column of the training log against ``x`` (log-scale y)."""
    losses = [c for c in log.columns if "loss" in c and pd.api.types.is_numeric_dtype(log[c])]
    if x not in log.columns or not losses:
        raise DrcnnError(
            f"training log: expected a {x!r} column and loss columns, got {list(log.columns)}"
        )
    long = log.melt(id_vars=[x], value_vars=losses, var_name="loss", value_name="value").dropna()
    fig, ax = plt.subplots(figsize=(7, 4))
    _seaborn().lineplot(data=long, x=x, y="value", hue="loss", ax=ax)
    ax.set(yscale="log", xlabel=x, ylabel="loss", title="Training losses")
    return save(fig, path)


def error_breakdown(table: pd.DataFrame, path: str | Path, row: str = "all") -> Path:
    """COCO's error breakdown as stacked horizontal bars, one bar per model.

    ``table``: :attr:`drcnn.analysis.error_analysis.ErrorTables.breakdown` (cumulative AP per
    setting ``C75 ... FN``); the bar of a model is its ``class == row`` row (default the mean
    over classes). The first segment is AP75, each next one the AP that forgiving one more kind
    of error adds, so the bar ends at 100 and a segment's width is what that error costs.
    Widths are taken from the running maximum of the settings, so a setting that comes out a
    hair below the one before (possible in corner cases of the matching) gives a zero width.
    """
    settings = list(SETTING_LABELS)
    if not {"model", "class", *settings} <= set(table.columns):
        raise DrcnnError(f"error breakdown: expected columns model, class, {', '.join(settings)}")
    data = table[table["class"] == row]
    if data.empty:
        raise DrcnnError(f"error breakdown: no row of class {row!r}")
    cumulative = np.maximum.accumulate(data[settings].fillna(0).to_numpy(), axis=1)
    widths = np.diff(cumulative, axis=1, prepend=0)
    models = data["model"].astype(str).tolist()
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.5 * len(models)))
    colors = _seaborn().color_palette("colorblind", len(settings))
    left = np.zeros(len(models))
    for k, setting in enumerate(settings):
        bars = ax.barh(
            models, widths[:, k], left=left, color=colors[k], label=SETTING_LABELS[setting]
        )
        ax.bar_label(
            bars,
            [f"{w:.1f}" if w >= 4 else "" for w in widths[:, k]],
            label_type="center",
            fontsize=7,
        )
        left += widths[:, k]
    ax.invert_yaxis()  # first model on top
    ax.set(xlim=(0, 100), xlabel="AP (%), cumulative", title=f"COCO error breakdown ({row})")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return save(fig, path)
