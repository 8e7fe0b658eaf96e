"""Assignment of proposals to ground truth and the RoI samplers of the box heads.

Every RoI stage first labels its proposals by max-IoU assignment (:func:`assign_max_iou`),
then picks the RoIs it trains on. Two samplers exist because Decoupled R-CNN samples the two
tasks differently: the classification branch uses the usual fixed-size random sampler with a
positive fraction (:func:`random_sample`), the regression branch uses every positive proposal
(:func:`positive_sample`), so that highly overlapping proposals are not thrown away. A head
takes its samplers from its config entries (``type: random | positive``, see
:class:`drcnn.config.SamplerConfig`) through :func:`build_sampler`. :func:`sample_rois` chains
the steps for one image (:func:`assign_candidates`, a sampler, :func:`take_samples`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torchvision.ops import box_iou

from drcnn.config import SAMPLER_FIELDS, require_same_names
from drcnn.models.torchvision_private import BalancedPositiveNegativeSampler

# One image's assignment labels -> the (sorted) indices of the RoIs it trains on.
Sampler = Callable[[Tensor], Tensor]


class Assignment(NamedTuple):
    """Per-proposal result of max-IoU assignment (one image)."""

    matched_idxs: Tensor  # (N,) int64 index of the best gt (0 when there is no gt)
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
    proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor, iou_thresh: float
) -> Assignment:
    """Label each proposal with its best-overlapping gt: positive if IoU >= t, else background.

    No ignore band and no low-quality matches: torchvision's ``Matcher(t, t, False)`` followed
    by ``clamp(min=0)``, so a background proposal's ``matched_idxs`` is 0, with selections
    instead of mask assignments (the same values without waiting for the device). An image
    without gt (or without proposals) gives all background.
    """
    num = proposals.shape[0]
    if num == 0 or gt_boxes.shape[0] == 0:
        zeros = torch.zeros(num, dtype=torch.int64, device=proposals.device)
        return Assignment(zeros, zeros.clone(), proposals.new_zeros(num))
    iou = box_iou(gt_boxes.to(proposals.dtype), proposals)
    max_iou, best = iou.max(dim=0)
    positive = max_iou >= iou_thresh
    matched_idxs = torch.where(positive, best, 0)
    labels = torch.where(positive, gt_labels[best].to(torch.int64), 0)
    return Assignment(matched_idxs, labels, max_iou)


def random_sample(labels: Tensor, num: int, pos_fraction: float) -> Tensor:
    """Indices (sorted) of up to ``num * pos_fraction`` random positives, the rest negatives.

    torchvision's ``BalancedPositiveNegativeSampler``: fewer positives are made up with
    negatives, so the sample has ``num`` RoIs whenever enough proposals exist.
    """
    pos_mask, neg_mask = BalancedPositiveNegativeSampler(num, pos_fraction)([labels])
    return torch.where(pos_mask[0].bool() | neg_mask[0].bool())[0]


def positive_sample(labels: Tensor, num: int) -> Tensor:
    """Indices (sorted) of every positive when at most ``num``, else of a random ``num`` of them.

    The positive sampler of Decoupled R-CNN's regression branch: no negatives.
    """
    positive = torch.where(labels > 0)[0]
    if positive.numel() > num:
        keep = torch.randperm(positive.numel(), device=positive.device)[:num]
        positive = positive[keep].sort().values
    return positive


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
    """One image's candidate RoIs (the proposals, then the gt boxes when added) and their
    assignment, before a sampler picks from them."""

    boxes: Tensor  # (N, 4)
    is_gt: Tensor  # (N,) bool, the RoI is a gt box added as a proposal
    assignment: Assignment
    matched_gt: Tensor  # (N, 4) each RoI's best gt box (the RoI itself when there is no gt)


def assign_candidates(
    proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor, iou_thresh: float, add_gt: bool
) -> Candidates:
    """``proposals`` (plus the gt boxes when ``add_gt``) assigned at ``iou_thresh``."""
    gt_boxes = gt_boxes.to(proposals.dtype)
    is_gt = torch.zeros(proposals.shape[0], dtype=torch.bool, device=proposals.device)
    if add_gt:
        proposals = torch.cat([proposals, gt_boxes])
        is_gt = torch.cat([is_gt, torch.ones_like(gt_labels, dtype=torch.bool)])
    assignment = assign_max_iou(proposals, gt_boxes, gt_labels, iou_thresh)
    matched_gt = gt_boxes[assignment.matched_idxs] if gt_boxes.numel() else proposals
    return Candidates(proposals, is_gt, assignment, matched_gt)


def take_samples(candidates: Candidates, keep: Tensor) -> Samples:
    """The rows ``keep`` of ``candidates`` as :class:`Samples`."""
    assignment = candidates.assignment
    return Samples(
        candidates.boxes[keep],
        assignment.labels[keep],
        candidates.matched_gt[keep],
        candidates.is_gt[keep],
        assignment.max_iou[keep],
    )


def sample_rois(
    proposals: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    iou_thresh: float,
    sampler: Sampler,
    add_gt: bool,
) -> Samples:
    """Assign ``proposals`` (plus the gt boxes when ``add_gt``) and keep what ``sampler`` picks."""
    candidates = assign_candidates(proposals, gt_boxes, gt_labels, iou_thresh, add_gt)
    return take_samples(candidates, sampler(candidates.assignment.labels))
