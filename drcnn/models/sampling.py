"""Assignment of proposals to ground truth and the RoI samplers of the box heads.

Every RoI stage first labels its proposals by max-IoU assignment (:func:`assign_max_iou`),
then picks the RoIs it trains on. Two samplers exist because Decoupled R-CNN samples the two
tasks differently: the classification branch uses the usual fixed-size random sampler with a
positive fraction (:func:`random_sample`), the regression branch uses every positive proposal
(:func:`positive_sample`), so that highly overlapping proposals are not thrown away. A head
takes its samplers from its config entries (``type: random | positive``, see
:class:`drcnn.config.SamplerConfig`) through :func:`build_sampler`. :func:`sample_rois` chains
the steps (:func:`assign_candidates`, a sampler, :func:`take_samples`).

Each step works on a whole batch at once: the images' candidates are concatenated, every row
knows its image, and the assignment and the random draws are made in a fixed number of tensor
ops whatever the batch size. A training step of a small model on a GPU is bound by the host's
kernel launches, and the per-image loop these steps replace made about 30 launches per image
and stage (issue #13). The draws are the samplers of torchvision and mmdetection in
distribution (a uniformly random subset of each image's positives and negatives, of the same
sizes) but not draw for draw: they come from one batched random key per row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_iou

from drcnn.config import SAMPLER_FIELDS, require_same_names
from drcnn.models.host_data import row_images, to_device

# A batch's assignment labels (N,), each row's image (N,) and the number of images -> the
# rows (N,) bool that the stage trains on.
Sampler = Callable[[Tensor, Tensor, int], Tensor]


class Assignment(NamedTuple):
    """Per-proposal result of max-IoU assignment."""

    matched_idxs: Tensor  # (N,) int64 index of the best gt (0 for background and without gt)
    labels: Tensor  # (N,) int64 gt class for positives, 0 = background
    max_iou: Tensor  # (N,) IoU with the best gt (0 when there is no gt)


class Samples(NamedTuple):
    """The RoIs one stage trains on (one image)."""

    boxes: Tensor  # (n, 4) sampled RoIs
    labels: Tensor  # (n,) int64, 0 = background
    gt_boxes: Tensor  # (n, 4) matched gt box (meaningless for background RoIs)
    is_gt: Tensor  # (n,) bool, the RoI is a gt box added as a proposal
    iou: Tensor  # (n,) IoU with the best-overlapping gt (Assignment.max_iou; 0 without gt)


def assign_max_iou(
    proposals: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    iou_thresh: float,
    images: tuple[Tensor, Tensor] | None = None,
) -> Assignment:
    """Label each proposal with its best-overlapping gt: positive if IoU >= t, else background.

    No ignore band and no low-quality matches: torchvision's ``Matcher(t, t, False)`` followed
    by ``clamp(min=0)``, so a background proposal's ``matched_idxs`` is 0, with selections
    instead of mask assignments (the same values without waiting for the device). Without gt
    (or without proposals) everything is background.

    ``images``: ``(gt_image, row_image)``, the image of each gt and of each proposal when the
    rows are a batch's images concatenated. A proposal is then matched among its own image's
    gts only (one IoU matrix for the batch, other images' pairs masked), ``matched_idxs``
    indexes the concatenated gts, and a proposal of an image without gt is background with
    IoU 0, as in a per-image call. The matrix has up to ``images`` times the pairs of the
    per-image ones (all gts by all rows), which at the 2 to 8 images per device of detection
    training stays far below the feature maps' memory.
    """
    num = proposals.shape[0]
    if num == 0 or gt_boxes.shape[0] == 0:
        zeros = torch.zeros(num, dtype=torch.int64, device=proposals.device)
        return Assignment(zeros, zeros.clone(), proposals.new_zeros(num))
    iou = box_iou(gt_boxes.to(proposals.dtype), proposals)
    if images is not None:
        gt_image, row_image = images
        iou = iou.masked_fill(gt_image[:, None] != row_image[None, :], -1.0)
    max_iou, best = iou.max(dim=0)
    positive = max_iou >= iou_thresh
    matched_idxs = best * positive
    labels = gt_labels[best].to(torch.int64) * positive
    if images is not None:
        max_iou = max_iou.clamp(min=0)  # -1: an image without gt
    return Assignment(matched_idxs, labels, max_iou)


def draw_per_group(group: Tensor, sizes: Tensor, quota: Tensor) -> Tensor:
    """Rows (N,) bool: in each group ``g`` a uniformly random ``min(quota[g], sizes[g])`` of its
    rows. ``group`` (N,) int64 in ``[0, G)``; ``sizes`` (G,) its rows per group.

    Each row gets the key ``group + u`` (``u`` uniform in [0, 1), float64): sorted by key, the
    rows come group by group in random order, and a row is kept when its rank within its group
    is below the group's quota. A fixed number of ops for any number of groups, none of which
    waits for the device.
    """
    num = group.shape[0]
    keys = torch.rand(num, dtype=torch.float64, device=group.device) + group
    order = keys.argsort()
    sorted_group = group[order]
    starts = sizes.cumsum(0) - sizes
    rank = torch.arange(num, device=group.device) - starts[sorted_group]
    keep = torch.empty(num, dtype=torch.bool, device=group.device)
    keep[order] = rank < quota[sorted_group]
    return keep


QuotaRule = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def _draw_classes(labels: Tensor, image: Tensor, num_images: int, rule: QuotaRule) -> Tensor:
    """Rows (N,) bool: per image ``i``, random positives (label > 0) and negatives (label 0) in
    the numbers ``rule(positives, negatives)`` gives from each image's counts. Rows with a
    label < 0 (the RPN's ignored anchors) are never drawn."""
    ignored = 2 * num_images  # slots 2i: image i's negatives, 2i + 1: its positives
    slot = torch.where(labels < 0, ignored, 2 * image + (labels > 0))
    sizes = torch.zeros(ignored + 1, dtype=torch.int64, device=labels.device)
    sizes.index_add_(0, slot, torch.ones_like(slot))
    pos_quota, neg_quota = rule(sizes[1:ignored:2], sizes[0:ignored:2])
    quota = torch.cat([torch.stack([neg_quota, pos_quota], dim=1).flatten(), sizes.new_zeros(1)])
    return draw_per_group(slot, sizes, quota)


def random_sample(
    labels: Tensor, image: Tensor, num_images: int, num: int, pos_fraction: float
) -> Tensor:
    """Per image, up to ``num * pos_fraction`` random positives, the rest random negatives.

    The sizes of torchvision's ``BalancedPositiveNegativeSampler`` (and mmdetection's
    ``RandomSampler``): fewer positives are made up with negatives, so an image's sample has
    ``num`` rows whenever enough exist. Used by the RoI heads and the RPN (whose labels are
    float, -1 for ignored anchors).
    """

    def rule(positives: Tensor, negatives: Tensor) -> tuple[Tensor, Tensor]:
        pos_quota = positives.clamp(max=int(num * pos_fraction))
        return pos_quota, torch.minimum(negatives, num - pos_quota)

    return _draw_classes(labels, image, num_images, rule)


def positive_sample(labels: Tensor, image: Tensor, num_images: int, num: int) -> Tensor:
    """Per image, every positive when at most ``num``, else a random ``num`` of them.

    The positive sampler of Decoupled R-CNN's regression branch: no negatives.
    """

    def rule(positives: Tensor, negatives: Tensor) -> tuple[Tensor, Tensor]:
        return positives.clamp(max=num), torch.zeros_like(negatives)

    return _draw_classes(labels, image, num_images, rule)


# The sampler of each config type, from its entry (the fields of config.SAMPLER_FIELDS[type]).
SAMPLERS: dict[str, Callable[[Any], Sampler]] = {
    "random": lambda entry: partial(random_sample, num=entry.num, pos_fraction=entry.pos_fraction),
    "positive": lambda entry: partial(positive_sample, num=entry.num),
}
require_same_names(SAMPLERS, tuple(SAMPLER_FIELDS), "drcnn.models.sampling.SAMPLERS")


def build_sampler(entry: Any) -> Sampler:
    """The sampler of a validated ``cls_sampler`` / ``reg_sampler`` entry (``add_gt`` is
    applied by :func:`sample_rois`, which takes it separately)."""
    return SAMPLERS[entry.type](entry)


class Candidates(NamedTuple):
    """A batch's candidate RoIs (per image: its proposals, then its gt boxes when added, images
    in order) and their assignment, before a sampler picks from them."""

    boxes: Tensor  # (N, 4)
    is_gt: Tensor  # (N,) bool, the RoI is a gt box added as a proposal
    assignment: Assignment
    matched_gt: Tensor  # (N, 4) each RoI's best gt box (the RoI itself in a batch without gt)
    image: Tensor  # (N,) int64, each RoI's image
    counts: list[int]  # RoIs per image


def _host_rows(counts: Sequence[int], gt_counts: Sequence[int], add_gt: bool) -> np.ndarray:
    """On the host: each candidate's image, each candidate's is-gt flag and each gt's image,
    one int64 array (sizes and flags come from the Python shapes, so no device op waits)."""
    is_gt = [
        np.arange(c) >= c - (g if add_gt else 0) for c, g in zip(counts, gt_counts, strict=True)
    ]
    return np.concatenate([row_images(counts), *is_gt, row_images(gt_counts)]).astype(np.int64)


def assign_candidates(
    proposals: Sequence[Tensor],
    gt_boxes: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    iou_thresh: float,
    add_gt: bool,
) -> Candidates:
    """Every image's ``proposals`` (plus its gt boxes when ``add_gt``) assigned at ``iou_thresh``
    to its own gts, in one batch (see :func:`assign_max_iou`)."""
    dtype = proposals[0].dtype
    gt_boxes = [g.to(dtype) for g in gt_boxes]
    gt_counts = [len(g) for g in gt_boxes]
    parts = [p for pair in zip(proposals, gt_boxes, strict=True) for p in pair]
    boxes = torch.cat(parts if add_gt else list(proposals))
    counts = [len(p) + (g if add_gt else 0) for p, g in zip(proposals, gt_counts, strict=True)]
    num = sum(counts)
    rows = to_device(_host_rows(counts, gt_counts, add_gt), boxes)
    image, is_gt, gt_image = rows[:num], rows[num : 2 * num].bool(), rows[2 * num :]
    all_gt, all_labels = torch.cat(gt_boxes), torch.cat(list(gt_labels))
    assignment = assign_max_iou(boxes, all_gt, all_labels, iou_thresh, (gt_image, image))
    matched_gt = all_gt[assignment.matched_idxs] if all_gt.numel() else boxes
    return Candidates(boxes, is_gt, assignment, matched_gt, image, counts)


def take_samples(candidates: Candidates, keep: Tensor) -> list[Samples]:
    """Per image, the rows ``keep`` ((N,) bool) of ``candidates`` as :class:`Samples`.

    One wait for the device per batch: the kept count of each image, which the split needs.
    """
    num_images = len(candidates.counts)
    kept = torch.zeros(num_images, dtype=torch.int64, device=keep.device)
    kept = kept.index_add_(0, candidates.image, keep.to(torch.int64)).tolist()
    rows = torch.nonzero_static(keep, size=sum(kept)).squeeze(1)
    assignment = candidates.assignment
    columns = (
        candidates.boxes[rows],
        assignment.labels[rows],
        candidates.matched_gt[rows],
        candidates.is_gt[rows],
        assignment.max_iou[rows],
    )
    return [Samples(*parts) for parts in zip(*(c.split(kept) for c in columns), strict=True)]


def sample_rois(
    proposals: Sequence[Tensor],
    gt_boxes: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    iou_thresh: float,
    sampler: Sampler,
    add_gt: bool,
) -> list[Samples]:
    """Per image, its ``proposals`` (plus its gt boxes when ``add_gt``) assigned, and the rows
    ``sampler`` picks."""
    candidates = assign_candidates(proposals, gt_boxes, gt_labels, iou_thresh, add_gt)
    labels = candidates.assignment.labels
    return take_samples(candidates, sampler(labels, candidates.image, len(proposals)))
