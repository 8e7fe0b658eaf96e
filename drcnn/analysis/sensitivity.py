"""Translation-sensitivity study: how classifier and regressor respond to shifted proposals.

Every ground-truth box of the evaluation images is moved by a grid of offsets ``(dx, dy)``
(fractions of the box's width and height, optionally with a scale factor applied around the
shifted centre) and the moved boxes are fed to the RoI head as proposals (the RPN is bypassed)
through ``model.analyze_boxes(images, boxes, labels)``. All shifted boxes of one image go through
one batched call.

The result is one tidy row per (model, shifted box) with:

- ``model, image_id, gt_id, label, class, dx, dy, scale``: which box and how it was moved;
- ``input_iou``: IoU of the shifted box (clipped to the image) with its ground truth;
- ``true_prob``: the classifier's probability of the true class (the score inference uses);
  ``true_logit``: its log-odds ``log(p / (1 - p))``, computed in float64 from the raw logits of
  the classifying stages (exact also for Cascade R-CNN's average of stage softmaxes:
  ``log mean_s p_s - log mean_s (1 - p_s)``), so it does not saturate where ``p`` rounds to 1;
  ``correct``: whether the arg-max class (background included) is the true class;
- per regression stage ``k``: ``iou_s{k}`` (IoU of the stage's output box with the ground
  truth), ``pred_{dx,dy,dw,dh}_s{k}`` (the predicted deltas, in the stage's normalised units)
  and ``ideal_{dx,dy,dw,dh}_s{k}`` (the deltas that would move the stage's input box exactly
  onto the ground truth: the stage's ``box_coder.encode``), and ``delta_l1_s{k}`` (their mean
  absolute difference); ``final_iou`` is the last stage's output IoU (comparable across models
  with different numbers of stages).

Response metrics: sensitivity to translation is how much a branch's *output* moves when its
input box moves. Notation: ``s = (dx, dy)`` is the translation in fractions of the box's width
and height, ``|s| = sqrt(dx^2 + dy^2)`` its radial size; the *positive zone* is the shifted boxes
whose input IoU lies in ``iou_range`` (default ``[0.5, 1]``, where a detector's positive
proposals come from); a *unit shift* is ``SHIFT_UNIT`` = 0.1 of the box size. The classifier's
figures use the pure translations (scale factor 1); the regression fit uses every box of the
zone (scale factors move ``dw, dh``).

- :func:`regression_fit`, per model, stage and coordinate ``c`` in ``dx, dy, dw, dh``: the least
  squares line ``pred_c = a + gain * ideal_c`` over the zone. ``gain = cov(ideal, pred) /
  var(ideal)`` (1: the stage undoes a translation of its input fully, 0: it ignores it);
  ``r2 = 1 - SS_res / SS_tot`` (NaN when the predictions do not vary); ``resid_std = sqrt(SS_res
  / n)`` in normalised units. NaN when the ideal delta's standard deviation is below
  ``MIN_SPREAD`` (the grid did not move that coordinate, e.g. ``dw, dh`` without scale factors).
- ``prob_change`` / ``logit_change`` (classifier): ``SHIFT_UNIT`` times the least-squares slope of
  ``true_prob`` / ``true_logit`` on ``|s|`` over the zone: the change of the true class's
  probability / log-odds per 0.1 of box size of translation (negative: confidence falls).
- ``radius`` (classifier): the invariance radius, the smallest ``|s|`` at which the mean
  true-class probability over all objects (every translation of the grid, inside the zone or
  not) falls to half its value at ``s = 0``, linearly interpolated between the grid's radii;
  ``inf`` if it stays above half on the whole grid.
- ``sensitivity``, the normalised response, comparable between branches: output change per unit
  shift relative to the output's range. Classifier: ``|prob_change|`` (the probability's range
  is [0, 1]). Regression stage ``k``: the mean over the axes ``a`` in ``x, y`` of
  ``|gain_da| * SHIFT_UNIT / W_a``, where ``W_a`` is the extent (max - min) of ``s_a`` over the
  zone's pure translations. For stage 0, ``ideal_dx = -dx / std_x``: ``|d pred_dx / d dx| =
  gain / std_x``, and the ideal delta's range over the zone is ``W_x / std_x``; a later stage's
  gain is its response to a translation of its own input, weighed the same way. An oracle
  stage scores ``SHIFT_UNIT / W`` (1/6 on the default grid, whose zone spans ``|dx| <= 0.3``),
  a stage that ignores the shift 0.
- ``ratio`` (regression rows): the stage's ``sensitivity`` divided by the classifier's of the same
  model ("the regressor is N times as sensitive as the classifier").
- ``*_lo, *_hi``: a 95% bootstrap percentile interval: the model's objects (ground-truth boxes)
  are drawn with replacement ``num_boot`` times (seeded, the same draws for every branch of a
  model, so ``ratio`` is paired), each drawn object taking all of its shifted boxes along (the
  shifts of one object are correlated).

Quality figures (:func:`summarize` too, over the zone): ``quality_slope``, the least-squares
slope of the branch's quality (true-class probability; a stage's output IoU) against input IoU,
a shortfall measure and not a sensitivity (a perfect regressor has output IoU 1 everywhere and
slope 0); ``mean_quality``; ``accuracy`` (classifier: share of arg-max hits); ``iou_gain``
(regressor: mean output minus input IoU); ``frac_iou_0.9`` (share of boxes the stage brings to
IoU >= 0.9); ``delta_l1`` (mean |predicted - ideal| delta).

:func:`binned` gives the per-input-IoU-bin means (with standard errors) that the figures plot;
:func:`probability_curve` and :func:`regression_curve` the response curves.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torchvision.ops import box_iou, clip_boxes_to_image
from tqdm import tqdm

from drcnn.errors import DrcnnError
from drcnn.io import atomic_write

DELTA_NAMES = ("dx", "dy", "dw", "dh")
BRANCH_CLS = "classification"
BRANCH_REG = "regression"
MIN_BOX_SIZE = 1.0  # pixels; shifted boxes thinner than this after clipping are dropped
SHIFT_UNIT = 0.1  # the unit shift of the response metrics: 0.1 of the box size
# an ideal delta spreading less than this (normalised units) was not moved by the grid: float32
# box rounding alone spreads it by ~1e-6
MIN_SPREAD = 1e-3
FLAT_PREDICTION = 1e-9  # predictions spreading less than this are constant (R^2 undefined)


@dataclass(frozen=True)
class ShiftGrid:
    """Offsets (fractions of box width / height) and scale factors to apply to each box."""

    offsets: tuple[float, ...] = tuple(round(-0.5 + 0.1 * i, 6) for i in range(11))
    scales: tuple[float, ...] = (1.0,)

    @classmethod
    def from_range(
        cls, low: float = -0.5, high: float = 0.5, steps: int = 11, scales: Sequence[float] = (1.0,)
    ) -> ShiftGrid:
        """``steps`` evenly spaced offsets from ``low`` to ``high`` used for both dx and dy."""
        if steps < 1 or not low <= high:
            raise DrcnnError(
                f"shift grid: expected low <= high and steps >= 1, got {low}, {high}, {steps}"
            )
        if any(s <= 0 for s in scales):
            raise DrcnnError(f"shift grid scales: expected positive factors, got {list(scales)}")
        offsets = tuple(float(v) for v in np.round(np.linspace(low, high, steps), 6))
        return cls(offsets=offsets, scales=tuple(float(s) for s in scales))

    def table(self) -> torch.Tensor:
        """``(S, 3)`` float64 rows ``(dx, dy, scale)``: every combination of the grid."""
        dx, dy, scale = torch.meshgrid(
            torch.tensor(self.offsets, dtype=torch.float64),
            torch.tensor(self.offsets, dtype=torch.float64),
            torch.tensor(self.scales, dtype=torch.float64),
            indexing="ij",
        )
        return torch.stack([dx.flatten(), dy.flatten(), scale.flatten()], dim=1)


def shift_boxes(boxes: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Every box moved by every grid row: ``(G, 4)`` x ``(S, 3)`` -> ``(G, S, 4)`` xyxy.

    The centre moves by ``dx * width, dy * height``; width and height are multiplied by
    ``scale`` around the moved centre.
    """
    boxes = boxes.to(grid.dtype)
    size = boxes[:, 2:] - boxes[:, :2]  # (G, 2)
    center = (boxes[:, :2] + boxes[:, 2:]) / 2
    new_center = center[:, None, :] + grid[None, :, :2] * size[:, None, :]
    half = size[:, None, :] * grid[None, :, 2:3] / 2
    return torch.cat([new_center - half, new_center + half], dim=2)


def paired_iou(boxes: torch.Tensor, gt: torch.Tensor, gt_index: torch.Tensor) -> torch.Tensor:
    """IoU of ``boxes[i]`` with ``gt[gt_index[i]]`` (torchvision's box_iou, one column each)."""
    return box_iou(boxes, gt).gather(1, gt_index[:, None]).squeeze(1)


def shifted_proposals(
    gt_boxes: torch.Tensor, grid: torch.Tensor, image_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shifted boxes of one image, clipped to it: ``(boxes (N,4), gt_index (N,), grid_index (N,))``.

    Boxes that clipping leaves thinner than ``MIN_BOX_SIZE`` pixels are dropped (no detector
    would propose them).
    """
    num_gt, num_shifts = gt_boxes.shape[0], grid.shape[0]
    boxes = clip_boxes_to_image(shift_boxes(gt_boxes, grid).reshape(-1, 4), image_size)
    gt_index = torch.arange(num_gt).repeat_interleave(num_shifts)
    grid_index = torch.arange(num_shifts).repeat(num_gt)
    size = boxes[:, 2:] - boxes[:, :2]
    keep = (size >= MIN_BOX_SIZE).all(dim=1)
    return boxes[keep], gt_index[keep], grid_index[keep]


def _stage_columns(
    analysis: Mapping, gt: torch.Tensor, gt_index: torch.Tensor
) -> dict[str, np.ndarray]:
    """Per regression stage: output IoU, predicted and ideal deltas, and their L1 gap."""
    columns: dict[str, np.ndarray] = {}
    matched_gt = gt[gt_index]
    stages = zip(
        analysis["stage_inputs"],
        analysis["stage_boxes"],
        analysis["stage_deltas"],
        analysis["box_coders"],
        strict=True,
    )
    for k, (inputs, outputs, deltas, coder) in enumerate(stages):
        inputs, outputs, deltas = (t.detach().double().cpu() for t in (inputs, outputs, deltas))
        ideal = coder.encode_single(matched_gt, inputs)
        columns[f"iou_s{k}"] = paired_iou(outputs, gt, gt_index).numpy()
        for j, name in enumerate(DELTA_NAMES):
            columns[f"pred_{name}_s{k}"] = deltas[:, j].numpy()
            columns[f"ideal_{name}_s{k}"] = ideal[:, j].numpy()
        columns[f"delta_l1_s{k}"] = (deltas - ideal).abs().mean(dim=1).numpy()
    columns["final_iou"] = columns[f"iou_s{k}"]
    return columns


def true_log_odds(logits: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Log-odds ``log(p / (1 - p))`` of class ``labels[i]`` under the scores the model reports:
    the softmax of the stages' mean logits (one stage: its softmax; Cascade R-CNN: the mean of
    its three, as mmdetection scores it).

    ``logits``: one ``(N, K+1)`` tensor per classifying stage. Computed in float64 from the
    log-softmax (``log p_c - log sum_{j != c} p_j``), so it stays finite where ``p`` rounds to 1
    in float32.
    """
    mean = torch.stack([z.detach().double().cpu() for z in logits]).mean(dim=0)
    log_p = torch.log_softmax(mean, dim=1)
    index = labels.cpu()[:, None]
    true = log_p.gather(1, index).squeeze(1)
    others = log_p.scatter(1, index, float("-inf")).logsumexp(dim=1)
    return true - others


@torch.no_grad()
def analyze_image(
    model: torch.nn.Module,
    image: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    grid: torch.Tensor,
    device: torch.device | str = "cpu",
) -> pd.DataFrame:
    """All shifted boxes of one image through ``model.analyze_boxes`` in one call -> rows."""
    gt = gt_boxes.double().cpu()
    boxes, gt_index, grid_index = shifted_proposals(gt, grid, tuple(image.shape[-2:]))
    labels = gt_labels.cpu()[gt_index]
    analysis = model.analyze_boxes(
        [image.to(device)], [boxes.float().to(device)], [labels.to(device)]
    )
    probs = analysis["class_probs"].detach().double().cpu()
    rows = {
        "gt_id": gt_index.numpy(),
        "label": labels.numpy(),
        "dx": grid[grid_index, 0].numpy(),
        "dy": grid[grid_index, 1].numpy(),
        "scale": grid[grid_index, 2].numpy(),
        "input_iou": paired_iou(boxes, gt, gt_index).numpy(),
        "true_prob": probs.gather(1, labels[:, None]).squeeze(1).numpy(),
        "true_logit": true_log_odds(analysis["class_logits"], labels).numpy(),
        "correct": (probs.argmax(dim=1) == labels).numpy(),
    }
    rows.update(_stage_columns(analysis, gt, gt_index))
    return pd.DataFrame(rows)


def run_sensitivity(
    models: Mapping[str, torch.nn.Module],
    dataset: Iterable,
    grid: ShiftGrid | None = None,
    class_names: Sequence[str] | None = None,
    device: torch.device | str = "cpu",
    max_images: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """The study's table: one row per (model, shifted ground-truth box); see the module doc.

    ``dataset`` yields ``(image, target)`` with ``target["boxes"]`` (xyxy pixels),
    ``target["labels"]`` (1..K) and ``target["image_id"]`` (the :class:`CocoDetection`
    convention). ``class_names[label - 1]`` names the classes (default: the label number).
    Images without ground truth are skipped.
    """
    grid_table = (grid or ShiftGrid()).table()
    frames = []
    for model in models.values():
        model.eval().to(device)
    for index, (image, target) in enumerate(tqdm(dataset, disable=None if progress else True)):
        if max_images is not None and index >= max_images:
            break
        if len(target["boxes"]) == 0:
            continue
        for name, model in models.items():
            frame = analyze_image(
                model,
                torch.as_tensor(image),
                torch.as_tensor(target["boxes"]),
                torch.as_tensor(target["labels"]),
                grid_table,
                device,
            )
            frame.insert(0, "image_id", int(target["image_id"]))
            frame.insert(0, "model", name)
            frames.append(frame)
    if not frames:
        raise DrcnnError("sensitivity: the dataset has no ground-truth boxes to shift")
    table = pd.concat(frames, ignore_index=True)
    names = list(class_names) if class_names is not None else None
    table.insert(
        table.columns.get_loc("label") + 1,
        "class",
        table["label"].map(lambda k: names[k - 1] if names else str(k)),
    )
    return table


def load_models(
    checkpoints: Mapping[str, str | Path],
    configs: Mapping[str, str | Path] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, torch.nn.Module], Any]:
    """The named models (checkpoints; a config per name is optional, default the stored one)
    and the first model's config; all must have the same number of classes."""
    from drcnn.config import load_config
    from drcnn.engine.checkpoint import load_model

    if not checkpoints:
        raise DrcnnError("sensitivity checkpoints: expected at least one name -> checkpoint")
    models, first = {}, None
    for name, path in checkpoints.items():
        config = (configs or {}).get(name)
        model, cfg = load_model(path, load_config(config) if config else None, device)
        first = first if first is not None else cfg
        if cfg.model.roi_head.num_classes != first.model.roi_head.num_classes:
            raise DrcnnError(f"sensitivity checkpoints: {name} has another number of classes")
        models[name] = model
    return models, first


def study_split(cfg: Any, data_overrides: Sequence[str] = (), split: str = "val") -> Any:
    """The ``split`` (validation; ``train`` for the proposal IoUs) of ``cfg``'s dataset plus
    ``data_overrides``."""
    from drcnn.config import load_config
    from drcnn.data.loader import build_dataset

    return build_dataset(load_config(None, data_overrides, base=cfg), split)


def load_study(
    checkpoints: Mapping[str, str | Path],
    configs: Mapping[str, str | Path] | None = None,
    data_overrides: Sequence[str] = (),
    device: torch.device | str = "cpu",
) -> tuple[dict[str, torch.nn.Module], Any]:
    """:func:`load_models` and the validation split of the first model's config
    (:func:`study_split`)."""
    models, first = load_models(checkpoints, configs, device)
    return models, study_split(first, data_overrides, "val")


def save_table(table: pd.DataFrame, stem: str | Path) -> list[Path]:
    """Write the study's table as ``stem.parquet`` (exact) and ``stem.csv``; return the paths.

    The CSV has the float columns at float32 precision (the shortest text that reads back as
    the same float32: 6 to 9 significant digits; the model outputs behind them are float32),
    written by Arrow's CSV writer. pandas' formatting writer spent 15 s of the study step's 26 s
    on the 110,000 rows of ``make demo``'s two models, and the study's table grows with every
    model and seed."""
    import pyarrow
    from pyarrow import csv

    stem = Path(stem)
    paths = [stem.with_suffix(".parquet"), stem.with_suffix(".csv")]
    atomic_write(paths[0], lambda handle: table.to_parquet(handle, index=False))
    floats = table.select_dtypes("float64").columns
    text = pyarrow.Table.from_pandas(
        table.astype(dict.fromkeys(floats, "float32")), preserve_index=False
    )
    options = csv.WriteOptions(quoting_style="needed")
    atomic_write(paths[1], lambda handle: csv.write_csv(text, handle, options))
    return paths


def num_stages(table: pd.DataFrame) -> int:
    """How many regression stages the table has columns for (the most of any model)."""
    return sum(1 for c in table.columns if c.startswith("iou_s"))


def _slope(x: pd.Series, y: pd.Series) -> float:
    """Least-squares slope of y on x (NaN when x does not vary)."""
    x, y = x.to_numpy(np.float64), y.to_numpy(np.float64)
    spread = ((x - x.mean()) ** 2).sum()
    return float(((x - x.mean()) * (y - y.mean())).sum() / spread) if spread > 0 else float("nan")


def branch_long(table: pd.DataFrame) -> pd.DataFrame:
    """Long form for plotting and summaries: one row per (shifted box, branch, stage).

    Columns ``model, branch, stage, input_iou, dx, dy, scale, quality, output_iou``: quality is
    the true-class probability (classifier, stage 0) or the output IoU (regression stage k).
    Stages a model does not have (NaN columns) are left out.
    """
    keys = ["model", "image_id", "gt_id", "dx", "dy", "scale", "input_iou"]
    cls = table[keys].assign(
        branch=BRANCH_CLS, stage=0, quality=table["true_prob"], correct=table["correct"]
    )
    parts = [cls]
    for k in range(num_stages(table)):
        part = table[keys].assign(
            branch=BRANCH_REG,
            stage=k,
            quality=table[f"iou_s{k}"],
            delta_l1=table[f"delta_l1_s{k}"],
        )
        parts.append(part[part["quality"].notna()])
    return pd.concat(parts, ignore_index=True)


def in_zone(table: pd.DataFrame, iou_range: tuple[float, float]) -> pd.Series:
    """Whether each shifted box's input IoU lies in ``iou_range`` (bounds included)."""
    low, high = iou_range
    return (table["input_iou"] >= low) & (table["input_iou"] <= high)


def quality_summary(
    table: pd.DataFrame, iou_range: tuple[float, float] = (0.5, 1.0)
) -> pd.DataFrame:
    """The quality figures per model and branch over the zone (see the module docstring)."""
    long = branch_long(table)
    long = long[in_zone(long, iou_range)]
    rows = []
    for (model, branch, stage), group in long.groupby(["model", "branch", "stage"], sort=False):
        row = {
            "model": model,
            "branch": branch,
            "stage": stage,
            "boxes": len(group),
            "quality_slope": _slope(group["input_iou"], group["quality"]),
            "mean_quality": group["quality"].mean(),
        }
        if branch == BRANCH_CLS:
            row["accuracy"] = group["correct"].astype(float).mean()
        else:
            row["iou_gain"] = (group["quality"] - group["input_iou"]).mean()
            row["frac_iou_0.9"] = (group["quality"] >= 0.9).mean()
            row["delta_l1"] = group["delta_l1"].mean()
        rows.append(row)
    return pd.DataFrame(rows)


def _fit(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Least-squares line ``y = a + gain * x``: gain, R^2 and the residuals' RMS (NaNs if x
    spreads less than ``MIN_SPREAD``; R^2 NaN if y does not vary)."""
    nan = {"gain": np.nan, "r2": np.nan, "resid_std": np.nan}
    if len(x) < 2 or x.std() < MIN_SPREAD:
        return nan
    xc, yc = x - x.mean(), y - y.mean()
    gain = float((xc * yc).sum() / (xc**2).sum())
    ss_res, ss_tot = float(((yc - gain * xc) ** 2).sum()), float((yc**2).sum())
    r2 = 1 - ss_res / ss_tot if y.std() > FLAT_PREDICTION else np.nan
    return {"gain": gain, "r2": r2, "resid_std": math.sqrt(ss_res / len(x))}


def regression_fit(
    table: pd.DataFrame, iou_range: tuple[float, float] = (0.5, 1.0)
) -> pd.DataFrame:
    """Predicted against ideal deltas over the zone, per model, stage and coordinate.

    Columns ``model, stage, coordinate, boxes, gain, r2, resid_std, ideal_std`` (normalised
    units; definitions in the module docstring).
    """
    zone = table[in_zone(table, iou_range)]
    rows = []
    for model, frame in zone.groupby("model", sort=False):
        for k in range(num_stages(table)):
            stage = frame[frame[f"pred_dx_s{k}"].notna()]
            if stage.empty:
                continue
            for name in DELTA_NAMES:
                ideal = stage[f"ideal_{name}_s{k}"].to_numpy(np.float64)
                pred = stage[f"pred_{name}_s{k}"].to_numpy(np.float64)
                row = {"model": model, "stage": k, "coordinate": name, "boxes": len(stage)}
                rows.append({**row, **_fit(ideal, pred), "ideal_std": ideal.std()})
    columns = ["model", "stage", "coordinate", "boxes", "gain", "r2", "resid_std", "ideal_std"]
    return pd.DataFrame(rows, columns=columns)


def bootstrap_counts(num_objects: int, num_boot: int, seed: int) -> np.ndarray:
    """``(num_boot, num_objects)`` how often each object is drawn in each bootstrap replicate
    (``num_objects`` draws with replacement, seeded)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(num_objects, np.full(num_objects, 1.0 / num_objects), size=num_boot)


def _object_sums(obj: np.ndarray, x: np.ndarray, y: np.ndarray, num_objects: int) -> np.ndarray:
    """Per object ``(count, sum x, sum y, sum xy, sum xx)``: ``(num_objects, 5)``; the least
    squares slope of any resample follows from a weighted sum of these rows."""
    if len(x):
        x, y = x - x.mean(), y - y.mean()  # a constant shift leaves every slope unchanged
    terms = (np.ones_like(x), x, y, x * y, x * x)
    return np.stack([np.bincount(obj, t, minlength=num_objects) for t in terms], axis=1)


def _slope_of_sums(sums: np.ndarray) -> np.ndarray:
    """Least-squares slopes from ``(..., 5)`` sums (NaN where x does not vary)."""
    n, sx, sy, sxy, sxx = np.moveaxis(sums, -1, 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        spread = n * sxx - sx * sx
        return np.where(spread > 1e-12 * n * n, (n * sxy - sx * sy) / spread, np.nan)


def invariance_radius(radii: np.ndarray, mean_prob: np.ndarray) -> float:
    """The smallest radius at which ``mean_prob`` falls to half its value at radius 0.

    ``radii`` ascending, starting at 0 (else NaN); NaN entries of ``mean_prob`` are skipped;
    linear interpolation between the two radii around the first crossing; ``inf`` if the curve
    never falls to half, NaN if its value at 0 is not positive.
    """
    keep = ~np.isnan(mean_prob)
    radii, mean_prob = radii[keep], mean_prob[keep]
    if len(radii) == 0 or radii[0] != 0 or not mean_prob[0] > 0:
        return float("nan")
    half = mean_prob[0] / 2
    below = np.flatnonzero(mean_prob <= half)
    if len(below) == 0:
        return float("inf")
    i = below[0]
    r0, r1, p0, p1 = radii[i - 1], radii[i], mean_prob[i - 1], mean_prob[i]
    return float(r0 + (p0 - half) / (p0 - p1) * (r1 - r0))


def _interval(values: np.ndarray) -> tuple[float, float]:
    """95% percentile interval of bootstrap values (actual replicate values, so ``inf`` is
    allowed; NaN replicates are left out)."""
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    low, high = np.quantile(values, [0.025, 0.975], method="inverted_cdf")
    return float(low), float(high)


def _with_interval(row: dict, name: str, value: float, boot: np.ndarray) -> None:
    """``row[name]``, ``row[name_lo]``, ``row[name_hi]``."""
    row[name] = float(value)
    row[f"{name}_lo"], row[f"{name}_hi"] = _interval(boot)


def _classifier_response(
    frame: pd.DataFrame, obj: np.ndarray, zone: np.ndarray, counts: np.ndarray
) -> tuple[dict, np.ndarray]:
    """The classifier's response figures of one model, and the bootstrap replicates of its
    sensitivity (``|prob_change|``)."""
    flat = np.isclose(frame["scale"].to_numpy(), 1.0)
    radius = np.hypot(frame["dx"].to_numpy(), frame["dy"].to_numpy())
    prob = frame["true_prob"].to_numpy(np.float64)
    num = counts.shape[1]
    sel = flat & zone
    prob_sums = _object_sums(obj[sel], radius[sel], prob[sel], num)
    logit = frame["true_logit"].to_numpy(np.float64)[sel]
    logit_sums = _object_sums(obj[sel], radius[sel], logit, num)
    boot = np.abs(_slope_of_sums(counts @ prob_sums)) * SHIFT_UNIT
    row = {"objects": int(np.unique(obj[sel]).size)}
    row["prob_change"] = float(_slope_of_sums(prob_sums.sum(0))) * SHIFT_UNIT
    row["logit_change"] = float(_slope_of_sums(logit_sums.sum(0))) * SHIFT_UNIT
    _with_interval(row, "sensitivity", abs(row["prob_change"]), boot)
    # the mean probability per distinct radius (all translations), per object then resampled
    radii, ring = np.unique(np.round(radius[flat], 6), return_inverse=True)
    cell = obj[flat] * len(radii) + ring
    size = num * len(radii)
    total = np.bincount(cell, prob[flat], minlength=size).reshape(num, -1)
    count = np.bincount(cell, minlength=size).reshape(num, -1)
    with np.errstate(divide="ignore", invalid="ignore"):
        curves = (counts @ total) / (counts @ count)
        full = total.sum(0) / count.sum(0)
    radius_boot = np.array([invariance_radius(radii, c) for c in curves])
    _with_interval(row, "radius", invariance_radius(radii, full), radius_boot)
    return row, boot


def _regression_response(
    frame: pd.DataFrame,
    obj: np.ndarray,
    zone: np.ndarray,
    counts: np.ndarray,
    stage: int,
) -> tuple[dict, np.ndarray]:
    """Regression stage ``stage``'s gains and normalised sensitivity of one model, and the
    bootstrap replicates of the sensitivity."""
    flat = np.isclose(frame["scale"].to_numpy(), 1.0)
    sel = zone & frame[f"pred_dx_s{stage}"].notna().to_numpy()
    row: dict = {"objects": int(np.unique(obj[sel]).size)}
    deltas = {}
    for name in DELTA_NAMES:
        ideal = frame[f"ideal_{name}_s{stage}"].to_numpy(np.float64)[sel]
        pred = frame[f"pred_{name}_s{stage}"].to_numpy(np.float64)[sel]
        deltas[name] = ideal, pred
        row[f"gain_{name}"] = _fit(ideal, pred)["gain"]
    value, boot = 0.0, np.zeros(counts.shape[0])
    for name in ("dx", "dy"):
        shift = frame[name].to_numpy(np.float64)[zone & flat]
        extent = np.ptp(shift) if len(shift) else 0.0
        ideal, pred = deltas[name]
        weight = SHIFT_UNIT / extent / 2 if extent > 0 else np.nan  # mean of the two axes
        value = value + abs(row[f"gain_{name}"]) * weight
        sums = _object_sums(obj[sel], ideal, pred, counts.shape[1])
        spread = len(ideal) > 0 and ideal.std() >= MIN_SPREAD
        boot = boot + (np.abs(_slope_of_sums(counts @ sums)) if spread else np.nan) * weight
    _with_interval(row, "sensitivity", value, boot)
    return row, boot


def response_summary(
    table: pd.DataFrame,
    iou_range: tuple[float, float] = (0.5, 1.0),
    num_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """The response metrics per model and branch, with bootstrap intervals (module docstring).

    Every model is resampled with the same ``seed``, so its numbers do not depend on which other
    models the table holds.
    """
    rows = []
    for model, frame in table.groupby("model", sort=False):
        obj = frame.groupby(["image_id", "gt_id"]).ngroup().to_numpy()
        counts = bootstrap_counts(int(obj.max()) + 1, num_boot, seed).astype(np.float64)
        zone = in_zone(frame, iou_range).to_numpy()
        cls, cls_boot = _classifier_response(frame, obj, zone, counts)
        rows.append({"model": model, "branch": BRANCH_CLS, "stage": 0, **cls})
        for k in range(num_stages(table)):
            if frame[f"pred_dx_s{k}"].isna().all():
                continue
            reg, reg_boot = _regression_response(frame, obj, zone, counts, k)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.float64(reg["sensitivity"]) / cls["sensitivity"]
                _with_interval(reg, "ratio", ratio, reg_boot / cls_boot)
            rows.append({"model": model, "branch": BRANCH_REG, "stage": k, **reg})
    return pd.DataFrame(rows)


SUMMARY_COLUMNS = [
    "model",
    "branch",
    "stage",
    "boxes",
    "objects",
    "sensitivity",
    "sensitivity_lo",
    "sensitivity_hi",
    "ratio",
    "ratio_lo",
    "ratio_hi",
    "gain_dx",
    "gain_dy",
    "gain_dw",
    "gain_dh",
    "prob_change",
    "logit_change",
    "radius",
    "radius_lo",
    "radius_hi",
    "quality_slope",
    "mean_quality",
    "accuracy",
    "iou_gain",
    "frac_iou_0.9",
    "delta_l1",
]
# The columns a reader needs first (the report and ``drcnn sensitivity`` show these): the
# summary's columns, in its order, less the detail ones.
DETAIL_COLUMNS = {
    "boxes",
    "objects",
    "gain_dw",
    "gain_dh",
    "logit_change",
    "radius_lo",
    "radius_hi",
    "quality_slope",
    "mean_quality",
    "accuracy",
    "delta_l1",
}
KEY_COLUMNS = [c for c in SUMMARY_COLUMNS if c not in DETAIL_COLUMNS]


def summarize(
    table: pd.DataFrame,
    iou_range: tuple[float, float] = (0.5, 1.0),
    num_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Response metrics and quality figures per model and branch, one row per (model, branch,
    stage), columns :data:`SUMMARY_COLUMNS` (definitions in the module docstring)."""
    keys = ["model", "branch", "stage"]
    response = response_summary(table, iou_range, num_boot, seed)
    quality = quality_summary(table, iou_range)
    merged = response.merge(quality, on=keys, how="left")  # response: every branch, in order
    return merged.reindex(columns=SUMMARY_COLUMNS)


def binned(table: pd.DataFrame, bins: Sequence[float] | None = None) -> pd.DataFrame:
    """Mean quality per input-IoU bin, model, branch and stage (with standard error and count)."""
    edges = np.asarray(bins if bins is not None else np.linspace(0.0, 1.0, 21))
    long = branch_long(table)
    index = np.clip(np.digitize(long["input_iou"], edges[1:-1]), 0, len(edges) - 2)
    long = long.assign(iou_bin=(edges[index] + edges[index + 1]) / 2)
    grouped = long.groupby(["model", "branch", "stage", "iou_bin"])["quality"]
    out = grouped.agg(["mean", "sem", "count"]).reset_index()
    return out.rename(columns={"mean": "quality"})


def probability_curve(table: pd.DataFrame) -> pd.DataFrame:
    """Mean true-class probability per model and translation size ``|s|`` (scale factor 1).

    Columns ``model, radius, prob, sem, count``: the curve whose half-height is the invariance
    radius.
    """
    flat = table[np.isclose(table["scale"], 1.0)]
    radius = np.round(np.hypot(flat["dx"], flat["dy"]), 6).rename("radius")
    grouped = flat.groupby([flat["model"], radius], sort=False)["true_prob"]
    curve = grouped.agg(["mean", "sem", "count"]).reset_index().sort_values(["model", "radius"])
    return curve.rename(columns={"mean": "prob"}).reset_index(drop=True)


def regression_curve(
    table: pd.DataFrame,
    stage: int,
    iou_range: tuple[float, float] = (0.5, 1.0),
    bins: int = 15,
) -> pd.DataFrame:
    """Mean predicted against ideal translation delta of stage ``stage`` over the zone.

    ``dx`` and ``dy`` pooled (normalised units), binned by the ideal delta in ``bins``
    equal-width bins between its 1st and 99th percentile (the bins' ends take the rest).
    Columns ``model, ideal, pred, sem, count``: the curve whose slope is the gain.
    """
    zone = table[in_zone(table, iou_range) & table[f"pred_dx_s{stage}"].notna()]
    parts = [
        pd.DataFrame(
            {
                "model": zone["model"],
                "ideal": zone[f"ideal_{name}_s{stage}"],
                "pred": zone[f"pred_{name}_s{stage}"],
            }
        )
        for name in ("dx", "dy")
    ]
    long = pd.concat(parts, ignore_index=True)
    columns = ["model", "ideal", "pred", "sem", "count"]
    if long.empty:
        return pd.DataFrame(columns=columns)
    edges = np.linspace(*np.percentile(long["ideal"], [1, 99]), bins + 1)
    index = np.clip(np.digitize(long["ideal"], edges[1:-1]), 0, bins - 1)
    long = long.assign(bin=index)
    grouped = long.groupby(["model", "bin"], sort=False)
    curve = grouped.agg(
        ideal=("ideal", "mean"), pred=("pred", "mean"), sem=("pred", "sem"), count=("pred", "size")
    )
    return curve.reset_index().sort_values(["model", "ideal"])[columns].reset_index(drop=True)
