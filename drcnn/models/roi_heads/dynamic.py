"""Dynamic R-CNN RoI head (Zhang et al., ECCV 2020): Faster R-CNN whose stage-0 IoU threshold
and SmoothL1 beta follow the training statistics, as mmdetection 2.x's ``DynamicRoIHead``.

Each training iteration records two statistics (``cfg.model.roi_head.dynamic``):

- the ``iou_topk``-th largest IoU of an image's candidate RoIs (proposals plus gt) with their gt,
  averaged over the images: how good the proposals have become;
- the ``beta_topk`` x images-th smallest regression target of the positives, each target the
  mean of ``|dx|`` and ``|dy|`` in normalised delta units: how small the errors have become.

Every ``update_interval`` iterations the assignment threshold (positive at IoU >= t, negative
below) becomes ``max(initial_iou, mean IoU statistic)`` and the SmoothL1 beta
``min(initial_beta, median target statistic)`` (kept when that median is below 1e-15), and the
statistics start again. Until the first update the config's stage-0 ``iou_thresh`` and
``loss_bbox.beta`` apply. Threshold, beta and both histories are buffers, so a checkpoint
resumes with the same schedule; under DDP rank 0's buffers are broadcast every step
(mmdetection keeps one set per rank).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from drcnn.config import BoxLossConfig, RoIHeadConfig
from drcnn.models.roi_heads.base import FEATMAP_NAMES
from drcnn.models.roi_heads.standard import StandardRoIHeads
from drcnn.models.sampling import Samples, assign_candidates, take_samples

TINY_BETA = 1e-15  # a median target below this keeps the current beta (mmdetection's eps)


class DynamicRoIHeads(StandardRoIHeads):
    """Dynamic R-CNN: the Faster R-CNN head with an adaptive threshold and SmoothL1 beta."""

    max_stages = 1
    # buffers that are training statistics, not weights (mmdetection checkpoints lack them)
    running_state = ("iou_thresh", "beta", "iou_history", "beta_history", "recorded")

    def __init__(
        self,
        roi: RoIHeadConfig,
        in_channels: int,
        featmap_names: Sequence[str] = FEATMAP_NAMES,
    ) -> None:
        """The head of ``roi`` (``model.roi_head``, with its ``dynamic`` part) on
        ``in_channels``-channel FPN maps ``featmap_names``."""
        super().__init__(roi, in_channels, featmap_names)
        interval = roi.dynamic.update_interval
        self.register_buffer("iou_thresh", torch.tensor(float(roi.stages[0].iou_thresh)))
        self.register_buffer("beta", torch.tensor(float(roi.loss_bbox.beta)))
        self.register_buffer("iou_history", torch.zeros(interval))
        self.register_buffer("beta_history", torch.zeros(interval))
        self.register_buffer("recorded", torch.zeros((), dtype=torch.int64))
        # this iteration's statistics, recorded by forward_train once the losses are computed
        self._iou_stat: Tensor | None = None
        self._beta_stat: Tensor | None = None
        self._num_images = 0

    def forward_train(
        self,
        features: dict[str, Tensor],
        proposals: Any,
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        """The Faster R-CNN losses at the current threshold and beta, then the statistics."""
        losses = super().forward_train(features, proposals, image_shapes, targets)
        self._record(self._iou_stat, self._beta_stat)
        return losses

    def _stage_samples(
        self, boxes: list[Tensor], targets: list[dict[str, Tensor]], stage: int
    ) -> list[Samples]:
        """The random sample at the current threshold; keeps the IoU statistic."""
        thresh = float(self.iou_thresh)
        add_gt = self.cfg.cls_sampler.add_gt
        gt_boxes, gt_labels = [t["boxes"] for t in targets], [t["labels"] for t in targets]
        candidates = assign_candidates(boxes, gt_boxes, gt_labels, thresh, add_gt)
        assignment = candidates.assignment
        stats = [
            kth_largest(iou, self.cfg.dynamic.iou_topk)
            for iou in assignment.max_iou.split(candidates.counts)
        ]
        self._iou_stat = torch.stack(stats).mean()
        self._num_images = len(boxes)
        return take_samples(
            candidates, self.sampler(assignment.labels, candidates.image, len(boxes))
        )

    def _box_loss_entry(self, targets: Tensor) -> Any:
        """SmoothL1 at the current beta; keeps the target statistic of these positives."""
        errors = targets[:, :2].abs().mean(dim=1)
        # the k-th smallest error, k = beta_topk x images (all of them when fewer)
        self._beta_stat = -kth_largest(-errors, self.cfg.dynamic.beta_topk * self._num_images)
        return BoxLossConfig(type="smooth_l1", beta=float(self.beta))

    @torch.no_grad()
    def _record(self, iou_stat: Tensor | None, beta_stat: Tensor | None) -> None:
        """Store this iteration's statistics; every ``update_interval`` of them, update."""
        interval = self.iou_history.numel()
        slot = int(self.recorded) % interval
        self.iou_history[slot] = iou_stat if iou_stat is not None else float("nan")
        self.beta_history[slot] = beta_stat if beta_stat is not None else float("nan")
        self.recorded += 1
        if slot == interval - 1:
            self._update()

    def _update(self) -> None:
        """mmdetection's ``update_hyperparameters`` on the full histories (NaN: no statistic
        that iteration, e.g. no positive RoI)."""
        dynamic = self.cfg.dynamic
        mean_iou = self.iou_history.nanmean()
        if not torch.isnan(mean_iou):
            self.iou_thresh.fill_(max(dynamic.initial_iou, float(mean_iou)))
        median = self.beta_history.nanquantile(0.5)  # numpy's median: mean of the middle two
        if not torch.isnan(median) and float(median) >= TINY_BETA:
            self.beta.fill_(min(dynamic.initial_beta, float(median)))


def kth_largest(values: Tensor, k: int) -> Tensor:
    """The ``min(k, n)``-th largest of ``n`` values (NaN when there are none)."""
    if values.numel() == 0:
        return values.new_tensor(float("nan"))
    return values.topk(min(k, values.numel())).values[-1]
