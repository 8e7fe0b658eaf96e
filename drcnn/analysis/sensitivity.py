"""Translation-sensitivity study: how classifier and regressor react to shifted proposals.

Every ground-truth box of the evaluation images is moved by a grid of offsets ``(dx, dy)``
(fractions of the box's width and height, optionally with a scale factor applied around the
shifted centre) and the moved boxes are fed to the RoI head as proposals (the RPN is bypassed)
through ``model.analyze_boxes(images, boxes, labels)``. All shifted boxes of one image go through
one batched call.

The result is one tidy row per (model, shifted box) with:

- ``model, image_id, gt_id, label, class, dx, dy, scale``: which box and how it was moved;
- ``input_iou``: IoU of the shifted box (clipped to the image) with its ground truth;
- ``true_prob``: the classifier's probability of the true class; ``correct``: whether the
  arg-max class (background included) is the true class;
- per regression stage ``k``: ``iou_s{k}`` (IoU of the stage's output box with the ground
  truth), ``pred_{dx,dy,dw,dh}_s{k}`` (the predicted deltas, in the stage's normalised units)
  and ``ideal_{dx,dy,dw,dh}_s{k}`` (the deltas that would move the stage's input box exactly
  onto the ground truth: the stage's ``box_coder.encode``), and ``delta_l1_s{k}`` (their mean
  absolute difference); ``final_iou`` is the last stage's output IoU (comparable across models
  with different numbers of stages).

Summary numbers (:func:`summarize`), one row per model and branch (the classifier; each
regression stage), over the shifted boxes whose input IoU lies in ``iou_range`` (default
``[0.5, 1]``, the range a detector's positive proposals come from):

- ``slope``, the *sensitivity*: least-squares slope of the branch's quality against input IoU,
  i.e. how much the quality gains per +1.0 of input IoU. Quality is the true-class probability
  for the classifier and the output IoU for a regression stage. 0 means insensitive (the
  branch does as well on a badly shifted box as on a perfect one).
- ``mean_quality``: mean true-class probability / mean output IoU.
- ``accuracy`` (classifier): fraction of boxes whose arg-max class is the true class.
- ``iou_gain`` (regressor): mean output IoU minus input IoU (what the stage adds).
- ``frac_iou_0.9`` (regressor): fraction of boxes the stage brings to IoU >= 0.9.
- ``delta_l1`` (regressor): mean |predicted - ideal| delta (normalised units).

:func:`binned` gives the per-input-IoU-bin means (with standard errors) that the figures plot.
"""

from __future__ import annotations

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
from drcnn.io import atomic_write, atomic_write_text

DELTA_NAMES = ("dx", "dy", "dw", "dh")
BRANCH_CLS = "classification"
BRANCH_REG = "regression"
MIN_BOX_SIZE = 1.0  # pixels; shifted boxes thinner than this after clipping are dropped


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


def load_study(
    checkpoints: Mapping[str, str | Path],
    configs: Mapping[str, str | Path] | None = None,
    data_overrides: Sequence[str] = (),
    device: torch.device | str = "cpu",
) -> tuple[dict[str, torch.nn.Module], Any]:
    """The named models (checkpoints; a config per name is optional, default the stored one)
    and the validation split of the first model's config plus ``data_overrides``."""
    from drcnn.config import load_config
    from drcnn.data.loader import build_dataset
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
    return models, build_dataset(load_config(None, data_overrides, base=first), "val")


def save_table(table: pd.DataFrame, stem: str | Path) -> list[Path]:
    """Write the study's table as ``stem.parquet`` and ``stem.csv``; return the paths."""
    stem = Path(stem)
    paths = [stem.with_suffix(".parquet"), stem.with_suffix(".csv")]
    atomic_write(paths[0], lambda handle: table.to_parquet(handle, index=False))
    atomic_write_text(paths[1], table.to_csv(index=False, float_format="%.6g"))
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


def summarize(table: pd.DataFrame, iou_range: tuple[float, float] = (0.5, 1.0)) -> pd.DataFrame:
    """The summary numbers per model and branch (definitions in the module docstring)."""
    long = branch_long(table)
    low, high = iou_range
    long = long[(long["input_iou"] >= low) & (long["input_iou"] <= high)]
    rows = []
    for (model, branch, stage), group in long.groupby(["model", "branch", "stage"], sort=False):
        row = {
            "model": model,
            "branch": branch,
            "stage": stage,
            "boxes": len(group),
            "slope": _slope(group["input_iou"], group["quality"]),
            "mean_quality": group["quality"].mean(),
        }
        if branch == BRANCH_CLS:
            row["accuracy"] = group["correct"].astype(float).mean()
        else:
            row["iou_gain"] = (group["quality"] - group["input_iou"]).mean()
            row["frac_iou_0.9"] = (group["quality"] >= 0.9).mean()
            row["delta_l1"] = group["delta_l1"].mean()
        rows.append(row)
    columns = ["model", "branch", "stage", "boxes", "slope", "mean_quality", "accuracy"]
    columns += ["iou_gain", "frac_iou_0.9", "delta_l1"]
    return pd.DataFrame(rows).reindex(columns=columns)


def binned(table: pd.DataFrame, bins: Sequence[float] | None = None) -> pd.DataFrame:
    """Mean quality per input-IoU bin, model, branch and stage (with standard error and count)."""
    edges = np.asarray(bins if bins is not None else np.linspace(0.0, 1.0, 21))
    long = branch_long(table)
    index = np.clip(np.digitize(long["input_iou"], edges[1:-1]), 0, len(edges) - 2)
    long = long.assign(iou_bin=(edges[index] + edges[index + 1]) / 2)
    grouped = long.groupby(["model", "branch", "stage", "iou_bin"])["quality"]
    out = grouped.agg(["mean", "sem", "count"]).reset_index()
    return out.rename(columns={"mean": "quality"})
