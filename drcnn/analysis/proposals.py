"""The IoU of the proposals each branch trains on: the paper's proposal-availability evidence.

Decoupled R-CNN trains its classifier on a random sample (with a positive fraction, gt boxes
added) of the proposals left by RPN NMS at ``t_cls`` and its regressor on every positive of
those left by NMS at ``t_reg``: a higher threshold keeps more highly overlapping proposals,
which the paper says the regressor gains from. This module measures what each branch is given.

For every training image (``dataset[i]``, its training augmentation included) and model, as a
training step sees it but without gradients or updates: the model's transform in training mode
(random short side), the backbone in eval mode (its BatchNorm statistics are read, never
updated; the official configs freeze them in training too), the RPN in training mode (its
training pre- and post-NMS top-n), one set of NMS candidates per image
(:meth:`DecoupledRPN.propose_candidates`), then per NMS setting ``(t_cls, t_reg)`` the two
proposal sets (:meth:`DecoupledRPN.nms_proposals`) and stage 0's samples drawn by the RoI head's
own samplers (:meth:`RoIHeadsBase.stage0_samples`, under a fixed torch seed). One image per
step (no batch padding).

The long table (:func:`proposal_ious`) has one row per box:

- ``model``; ``nms``: the setting, ``"t_cls/t_reg"``;
- ``branch``: ``proposals`` (every RPN proposal of a set), ``classification`` /
  ``regression`` (the stage-0 samples of that branch);
- ``set_nms``: the NMS threshold of the proposal set the box comes from (proposals rows: one
  block per distinct threshold of the setting; classification: ``t_cls``; regression:
  ``t_reg``, or ``t_cls`` for a head that trains both branches on one sample);
- ``shared_sample``: True for Faster / Cascade R-CNN, whose classification and regression rows
  are the same stage-0 sample (drawn from the ``t_cls`` set);
- ``image_id``, ``is_gt`` (a gt box the sampler added as a proposal), ``iou``: the box's IoU
  with its best-overlapping ground truth (``Assignment.max_iou``; the samples' ``Samples.iou``).

:func:`histograms` bins ``iou`` in ``HIST_EDGES`` (0.05 wide, 1.0 in the last bin);
:func:`summarize` gives per ``(model, nms, branch, set_nms)`` the boxes per image, the fraction
and the number per image at IoU >= 0.5, 0.7, 0.8, 0.9 (gt boxes added by the sampler count,
at IoU 1; ``gt_per_image`` says how many), and the mean IoU of the positives
(IoU >= ``pos_iou``, 0.5: stage 0's threshold in every shipped config).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm import tqdm

from drcnn.analysis.sensitivity import BRANCH_CLS, BRANCH_REG
from drcnn.data.loader import collate
from drcnn.errors import DrcnnError
from drcnn.io import atomic_write_text
from drcnn.models.detector import eval_mode
from drcnn.models.rpn import ProposalSets
from drcnn.models.sampling import assign_max_iou

BRANCH_PROPOSALS = "proposals"
BRANCHES = (BRANCH_PROPOSALS, BRANCH_CLS, BRANCH_REG)
EXTRA_SETTINGS = ((0.7, 0.7), (0.85, 0.85))  # tried besides each model's own setting
HIST_EDGES = np.round(np.linspace(0.0, 1.0, 21), 2)
IOU_LEVELS = (0.5, 0.7, 0.8, 0.9)
POSITIVE_IOU = 0.5
GROUP = ["model", "nms", "branch", "set_nms", "shared_sample"]  # one summary row each

Setting = tuple[float, float]


def nms_settings(
    model: torch.nn.Module, extra: Iterable[Setting] = EXTRA_SETTINGS
) -> list[Setting]:
    """The model's own training ``(t_cls, t_reg)`` (one threshold: both), then ``extra``,
    each setting once."""
    own = tuple(float(t) for t in model.rpn.train_nms_thresh)
    settings = [(own[0], own[-1]), *((float(c), float(r)) for c, r in extra)]
    return list(dict.fromkeys(settings))


def setting_label(setting: Setting) -> str:
    """``"t_cls/t_reg"``, e.g. ``"0.7/0.85"``."""
    return f"{setting[0]:g}/{setting[1]:g}"


Block = tuple[dict[str, object], Tensor, Tensor | None]  # columns, ``iou``, ``is_gt`` (or None)


def _rows(blocks: Sequence[Block]) -> pd.DataFrame:
    """The long table's rows of ``blocks``: ``iou`` and ``is_gt`` per box (False where None),
    each block's ``columns`` repeated over its boxes. One DataFrame and one transfer to the host
    per image: a DataFrame per block took 0.34 s per 100 images on a 2-core Xeon (0.14 s now),
    and on CUDA each transfer is a wait for the GPU."""
    columns, ious, gts = zip(*blocks, strict=True)
    lengths = [len(iou) for iou in ious]
    is_gt = [
        torch.zeros_like(iou, dtype=torch.bool) if gt is None else gt
        for iou, gt in zip(ious, gts, strict=True)
    ]
    repeated = {k: np.repeat([c[k] for c in columns], lengths) for k in columns[0]}
    iou = torch.cat(ious).detach().double()  # float64: binned and thresholded alike
    return pd.DataFrame(
        {**repeated, "is_gt": torch.cat(is_gt).cpu().numpy(), "iou": iou.cpu().numpy()}
    )


@torch.no_grad()
def image_proposal_ious(
    model: torch.nn.Module, image: Tensor, target: dict[str, Tensor], settings: Sequence[Setting]
) -> pd.DataFrame:
    """Rows (without ``model``, ``image_id``) of one image for every NMS setting; see the module
    doc. The caller sets the modes (transform and RPN training, the rest eval) and the seed."""
    images, targets = model.transform([image], [target])
    features = model.backbone(images.tensors)
    *_, candidates = model.rpn.propose_candidates(images, list(features.values()))
    thresholds = sorted({t for setting in settings for t in setting})
    sets = {t: model.rpn.nms_proposals(candidates, t) for t in thresholds}
    gt_boxes, gt_labels = targets[0]["boxes"], targets[0]["labels"]
    iou_thresh = model.roi_heads.cfg.stages[0].iou_thresh
    blocks: list[Block] = []
    shared = False
    for setting in settings:
        nms = setting_label(setting)
        for t in dict.fromkeys(setting):
            iou = assign_max_iou(sets[t][0], gt_boxes, gt_labels, iou_thresh).max_iou
            blocks.append(({"nms": nms, "branch": BRANCH_PROPOSALS, "set_nms": t}, iou, None))
        cls_samples, reg_samples = model.roi_heads.stage0_samples(
            ProposalSets(sets[setting[0]], sets[setting[1]]), targets
        )
        shared = cls_samples is reg_samples  # one sample for both branches, from the cls set
        samples = (
            (BRANCH_CLS, cls_samples[0], setting[0]),
            (BRANCH_REG, reg_samples[0], setting[0] if shared else setting[1]),
        )
        for branch, sample, t in samples:
            blocks.append(({"nms": nms, "branch": branch, "set_nms": t}, sample.iou, sample.is_gt))
    return _rows(blocks).assign(shared_sample=shared)


def proposal_ious(
    models: Mapping[str, torch.nn.Module],
    dataset: Sequence,
    settings: Sequence[Setting] | None = None,
    max_images: int | None = 100,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> pd.DataFrame:
    """The long table (module doc) over the first ``max_images`` images of ``dataset``.

    ``dataset[i]`` gives ``(image, target)`` (the training split). ``settings``: the NMS
    settings tried on every model (default or empty: :func:`nms_settings` of each model). Each model
    starts from torch seed ``seed`` (same random short sides and samples on every call); the
    caller's random state is left as it was. Images without ground truth are skipped.
    """
    if max_images is not None and max_images < 1:
        raise DrcnnError(f"proposal_images: expected a positive number, got {max_images}")
    for setting in settings or ():
        if len(setting) != 2 or not all(0 < t <= 1 for t in setting):
            raise DrcnnError(
                f"proposal IoU settings: expected (t_cls, t_reg) in (0, 1], got {setting}"
            )
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    device = torch.device(device)
    cuda = [device.index or 0] if device.type == "cuda" else []
    frames = []
    for name, model in models.items():
        model_settings = list(settings) if settings else nms_settings(model)
        with torch.random.fork_rng(devices=cuda), eval_mode(model):
            torch.manual_seed(seed)
            model.transform.train()
            model.rpn.train()
            for index in tqdm(range(count), desc=name, disable=None if progress else True):
                images, targets = collate([dataset[index]])
                if len(targets[0]["boxes"]) == 0:
                    continue
                target = {k: targets[0][k].to(device) for k in ("boxes", "labels")}
                frame = image_proposal_ious(model, images[0].to(device), target, model_settings)
                frame.insert(0, "image_id", int(targets[0]["image_id"]))
                frame.insert(0, "model", name)
                frames.append(frame)
    if not frames:
        raise DrcnnError("proposal IoU: the dataset has no image with ground truth")
    columns = [*GROUP, "image_id", "is_gt", "iou"]
    return pd.concat(frames, ignore_index=True)[columns]


def _images_per_model(table: pd.DataFrame, num_images: Mapping[str, int] | None) -> pd.Series:
    """Images analysed per model: given, else the distinct image ids of its rows."""
    if num_images is not None:
        return pd.Series(dict(num_images), dtype=float)
    return table.groupby("model", sort=False)["image_id"].nunique().astype(float)


def _bins(iou: pd.Series) -> np.ndarray:
    """Index of each IoU's ``HIST_EDGES`` bin (``[lo, hi)``, 1.0 in the last bin)."""
    return np.clip(np.digitize(iou, HIST_EDGES[1:-1]), 0, len(HIST_EDGES) - 2)


def histograms(table: pd.DataFrame, num_images: Mapping[str, int] | None = None) -> pd.DataFrame:
    """IoU histograms, one row per ``GROUP`` key and bin: ``bin_lo, bin_hi`` (``HIST_EDGES``),
    ``count``, ``per_image`` (count / images) and ``fraction`` (of the group's boxes)."""
    images = _images_per_model(table, num_images)
    rows = []
    for key, group in table.groupby(GROUP, sort=False):
        counts = np.bincount(_bins(group["iou"]), minlength=len(HIST_EDGES) - 1)
        for lo, hi, count in zip(HIST_EDGES[:-1], HIST_EDGES[1:], counts, strict=True):
            row = dict(zip(GROUP, key, strict=True))
            row.update(bin_lo=lo, bin_hi=hi, count=int(count))
            row.update(per_image=count / images[key[0]], fraction=count / len(group))
            rows.append(row)
    return pd.DataFrame(rows)


def summarize(
    table: pd.DataFrame,
    num_images: Mapping[str, int] | None = None,
    pos_iou: float = POSITIVE_IOU,
) -> pd.DataFrame:
    """One row per ``GROUP`` key: ``images``, ``per_image`` (boxes per image), ``gt_per_image``
    (of them, gt boxes added by the sampler, IoU 1), per level ``v`` in ``IOU_LEVELS``
    ``frac_iou_v`` and ``per_image_iou_v`` (boxes at IoU >= v), and ``mean_pos_iou`` (mean IoU
    of the boxes at IoU >= ``pos_iou``; NaN without any)."""
    images = _images_per_model(table, num_images)
    rows = []
    for key, group in table.groupby(GROUP, sort=False):
        iou = group["iou"].to_numpy()
        n = images[key[0]]
        row = dict(zip(GROUP, key, strict=True))
        row.update(images=int(n), per_image=len(iou) / n, gt_per_image=group["is_gt"].sum() / n)
        for level in IOU_LEVELS:
            above = int((iou >= level).sum())
            row[f"frac_iou_{level:g}"] = above / len(iou)
            row[f"per_image_iou_{level:g}"] = above / n
        positive = iou[iou >= pos_iou]
        row["mean_pos_iou"] = float(positive.mean()) if positive.size else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def write_proposal_study(
    table: pd.DataFrame, out_dir: str | Path
) -> tuple[pd.DataFrame, pd.DataFrame, Path]:
    """From the long table (:func:`proposal_ious`, of any number of models): write
    ``proposal_iou.{csv,md,html}`` (summary), ``proposal_iou_hist.csv`` (histograms) and
    ``proposal_iou.png`` into ``out_dir``; return ``(summary, histograms, figure path)``."""
    from drcnn.analysis import plots, tables

    out_dir = Path(out_dir)
    summary, hist = summarize(table), histograms(table)
    tables.write_table(summary, out_dir / "proposal_iou", digits=3)
    atomic_write_text(out_dir / "proposal_iou_hist.csv", hist.to_csv(index=False))
    return summary, hist, plots.proposal_iou_histograms(hist, out_dir / "proposal_iou.png")
