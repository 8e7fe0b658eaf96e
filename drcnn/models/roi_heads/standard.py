"""Faster R-CNN RoI head: one shared 2-fc head trained on one random sample per image.

Written as a loop over ``stages`` so that Cascade R-CNN (:mod:`.cascade`) is the same code with
more stages: each stage samples its RoIs at its own IoU threshold, and the next stage trains on
this stage's sampled RoIs moved by its (detached) predicted deltas.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from drcnn.config import RoIHeadConfig
from drcnn.errors import DrcnnError
from drcnn.models.box_heads import DecoupledHead, FastRCNNHead
from drcnn.models.roi_heads.base import FEATMAP_NAMES, RoIHeadsBase, split_proposals
from drcnn.models.sampling import Samples, build_sampler


class StandardRoIHeads(RoIHeadsBase):
    """Faster R-CNN: ``stages`` = one :class:`FastRCNNHead`, trained on the RoIs of
    ``cls_sampler`` (official: random, 512 RoIs, 25% positive).

    ``box_head: unshared``: a :class:`DecoupledHead` instead (separate cls / reg 2-fc trunks, no
    background delta slot), the official ``Unshared2FCBBoxHead`` (``unshared2fcs_bbox_head.py``)
    that the head ablation trains with ordinary sampling; losses and normalisers unchanged
    (mmdetection's ``BBoxHead.loss``).
    """

    max_stages = 1

    def __init__(
        self,
        roi: RoIHeadConfig,
        in_channels: int,
        featmap_names: Sequence[str] = FEATMAP_NAMES,
    ) -> None:
        """The head of ``roi`` (``model.roi_head``) on ``in_channels``-channel FPN maps
        ``featmap_names``."""
        if len(roi.stages) > self.max_stages:
            raise DrcnnError(
                f"config model.roi_head.stages: the {roi.type} head takes at most "
                f"{self.max_stages} stage(s), got {len(roi.stages)}"
            )
        in_features = self.in_features(roi, in_channels)
        # box_head unshared: the official Unshared2FCBBoxHead, DecoupledHead's layers
        head_class = DecoupledHead if roi.box_head == "unshared" else FastRCNNHead
        stages = nn.ModuleList(
            head_class(
                in_features, roi.fc_dim, roi.num_classes, class_agnostic=roi.reg_class_agnostic
            )
            for _ in roi.stages
        )
        super().__init__(roi, featmap_names, stages)
        self.sampler = build_sampler(roi.cls_sampler)

    def forward_train(
        self,
        features: dict[str, Tensor],
        proposals: Any,
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        """Losses ``s{i}.loss_cls``, ``s{i}.loss_bbox`` per stage and ``s0.acc``.

        A ``ProposalSets`` input is read through its classification set.
        """
        boxes, _ = split_proposals(proposals)
        losses: dict[str, Tensor] = {}
        for stage, head in enumerate(self.stages):
            samples = self._stage_samples(boxes, targets, stage)
            rois = torch.cat([s.boxes for s in samples])
            labels = torch.cat([s.labels for s in samples])
            gt_boxes = torch.cat([s.gt_boxes for s in samples])
            logits, deltas = head(self._pool(features, [s.boxes for s in samples], image_shapes))
            losses.update(self._cls_losses(stage, logits, labels))
            pos = labels > 0
            losses[f"s{stage}.loss_bbox"] = self._box_loss(
                stage,
                head.deltas_for_labels(deltas[pos], labels[pos]),
                rois[pos],
                gt_boxes[pos],
                labels.numel(),
            )
            if stage + 1 < len(self.stages):
                boxes = self._next_proposals(stage, samples, logits, deltas, image_shapes)
        return losses

    def stage0_samples(
        self, proposals: Any, targets: list[dict[str, Tensor]]
    ) -> tuple[list[Samples], list[Samples]]:
        """Stage 0's sample of the (classification) proposals, for both branches."""
        samples = self._stage_samples(split_proposals(proposals)[0], targets, 0)
        return samples, samples

    def _stage_samples(
        self, boxes: list[Tensor], targets: list[dict[str, Tensor]], stage: int
    ) -> list[Samples]:
        """Samples of ``boxes`` (gt added when configured) at ``stage``'s threshold."""
        return self._sample(boxes, targets, stage, self.sampler, self.cfg.cls_sampler.add_gt)

    def _next_proposals(
        self,
        stage: int,
        samples: list[Samples],
        logits: Tensor,
        deltas: Tensor,
        image_shapes: list[tuple[int, int]],
    ) -> list[Tensor]:
        """The stage's sampled non-gt RoIs moved by its deltas (gt class, else arg-max class)."""
        labels = torch.cat([s.labels for s in samples])
        chosen = torch.where(labels > 0, labels, logits[:, 1:].argmax(dim=1) + 1)
        picked = self.stages[stage].deltas_for_labels(deltas.detach(), chosen)
        counts = [len(s.boxes) for s in samples]
        rois = torch.cat([s.boxes for s in samples])
        moved = self._move(stage, rois, picked, counts, image_shapes).split(counts)
        return [m[~s.is_gt] for m, s in zip(moved, samples, strict=True)]
