"""Decoupled R-CNN RoI head: decoupled sampling, an unshared cls/reg head, cascaded regression.

Stage 0 (:class:`DecoupledHead`) trains its classifier on random samples of the classification
proposals (gt added) and its regressor on *every* positive regression proposal (positive
sampler, no gt), both pooled in one RoIAlign call. Stages 1..N-1 (:class:`RefineHead`) are
regression-only: the previous stage's positive RoIs, moved by its predicted deltas, are
re-assigned at the stage's IoU threshold and all positives are regressed again. At inference the
class scores come from stage 0 only; each stage moves every proposal once more (stage 0 with the
deltas of its arg-max class) and the last stage's boxes are the detections; without refine
stages (N = 1), each class's own decoded box, as the official DecoupledRoIHead.

Box-loss normalisers (the official code's ``avg_factor``): the official positive sampler pads
each image's regression sample with negatives up to ``reg_sampler.num``, and those padded rows
are carried through every refine stage, so each stage counts ``min(num, regression proposals)``
rows per image (:func:`padded_reg_count`) although only positives carry a loss. Stage 0 divides
its L1 by the cls samples + that count (``decoupled_bbox_head.py``, ``labels_reg.size(0)``), the
refine stages by ``REFINE_NORMALISER_SCALE`` x that count (``refine_bbox_head.py``,
``avg_factor=2*labels.size(0)``: 1024 per image when padded to 512).

The head ablation's box heads (``model.roi_head.box_head``, :meth:`DecoupledRoIHeads._box_heads`)
keep these samples and normalisers, except that the shared trunk halves stage 0's
(``BoxHead.box_normaliser_scale``), and the Double-Head regression branches pool their RoIs
enlarged (``BoxHead.reg_roi_scale``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from drcnn.config import RoIHeadConfig
from drcnn.errors import DrcnnError
from drcnn.models.box_heads import BoxHead, DecoupledHead, RefineHead
from drcnn.models.double_head import ConvRefineHead, DoubleHead
from drcnn.models.roi_heads.base import (
    FEATMAP_NAMES,
    RoIHeadsBase,
    StageOutput,
    split_proposals,
)
from drcnn.models.sampling import Samples, build_sampler

# The refine stages' box-loss normaliser is this many times the padded regression sample count
# (official refine_bbox_head.py, avg_factor=2*labels.size(0), "lamda=0.5").
REFINE_NORMALISER_SCALE = 2


def padded_reg_count(candidates: Sequence[int], num: int) -> int:
    """Rows of the official padded regression sample over the batch: ``sum min(num, P_i)``.

    ``candidates``: the regression proposals ``P_i`` each image samples from. The official
    positive sampler takes every positive (at most ``num``) and pads with negatives up to
    ``num``; with one IoU threshold every proposal is positive or negative, so an image gives
    ``min(num, P_i)`` rows, in stage 0 and, carried along as proposals, in every refine stage.
    """
    return sum(min(num, p) for p in candidates)


class DecoupledRoIHeads(RoIHeadsBase):
    """Decoupled R-CNN: ``stages`` = [DecoupledHead, RefineHead, ...].

    ``box_head``: null or unshared = those; shared = a :class:`DecoupledHead` with one trunk
    (``DecoupledSharedBBoxHead``); double = [:class:`DoubleHead`, :class:`ConvRefineHead`, ...]
    (``DoubleDecoupledBBoxHead``, ``DoubleRefineBBoxHead``).
    """

    def __init__(
        self,
        roi: RoIHeadConfig,
        in_channels: int,
        featmap_names: Sequence[str] = FEATMAP_NAMES,
    ) -> None:
        """The head of ``roi`` (``model.roi_head``) on ``in_channels``-channel FPN maps
        ``featmap_names``."""
        stages = nn.ModuleList(self._box_heads(roi, in_channels))
        if roi.reg_sampler.type != "positive":
            raise DrcnnError(
                "config model.roi_head.reg_sampler.type: the decoupled head regresses every RoI "
                f"its regression sampler picks, so it needs positive, got {roi.reg_sampler.type}"
            )
        super().__init__(roi, featmap_names, stages)
        self.cls_sampler = build_sampler(roi.cls_sampler)
        self.reg_sampler = build_sampler(roi.reg_sampler)

    @classmethod
    def _box_heads(cls, roi: RoIHeadConfig, in_channels: int) -> list[BoxHead]:
        """Stage 0's head and the refine stages' heads of ``roi.box_head``."""
        if roi.box_head == "double":
            return [DoubleHead(in_channels, roi.roi_size, roi.fc_dim, roi.num_classes)] + [
                ConvRefineHead(in_channels, roi.fc_dim) for _ in roi.stages[1:]
            ]
        in_features = cls.in_features(roi, in_channels)
        shared = roi.box_head == "shared"
        return [DecoupledHead(in_features, roi.fc_dim, roi.num_classes, shared_trunk=shared)] + [
            RefineHead(in_features, roi.fc_dim) for _ in roi.stages[1:]
        ]

    def _stage_predict(
        self,
        stage: int,
        features: dict[str, Tensor],
        boxes: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> tuple[Tensor | None, Tensor]:
        """Stage 0 runs both branches, refine stages regress only; each regression branch on
        its RoIs pooled ``reg_roi_scale`` larger when its head says so."""
        head = self.stages[stage]
        x_reg = self._pool(features, boxes, image_shapes, head.reg_roi_scale)
        if stage > 0:
            return None, head(x_reg)
        same = head.reg_roi_scale is None
        x_cls = x_reg if same else self._pool(features, boxes, image_shapes)
        return head.forward_cls(x_cls), head.forward_reg(x_reg)

    def _final_boxes(self, outs: list[StageOutput]) -> Tensor:
        """The last stage's moved boxes, shared by every class; with stage 0 alone (no refine
        stages) each class's own decoded box, as the official ``DecoupledRoIHead`` tests
        (``simple_test_bboxes`` -> ``bbox_head.get_bboxes``: per-class decode). With refine
        stages, stage 0 moves each box by its arg-max class (``regress_by_class``) and the
        class-agnostic refine stages move it on."""
        if len(self.stages) == 1:
            return super()._final_boxes(outs)
        return outs[-1].outputs

    def forward_train(
        self,
        features: dict[str, Tensor],
        proposals: Any,
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        """Losses ``s0.loss_cls``, ``s0.acc`` and ``s{i}.loss_bbox`` for every stage.

        ``proposals``: ``ProposalSets(cls, reg)`` or one list used for both.
        """
        cls_samples, reg_samples = self.stage0_samples(proposals, targets)
        logits, deltas = self._stage0_predict(features, cls_samples, reg_samples, image_shapes)

        cls_labels = torch.cat([s.labels for s in cls_samples])
        losses = self._cls_losses(0, logits, cls_labels)
        add_gt = self.cfg.reg_sampler.add_gt
        candidates = [
            len(b) + (len(t["boxes"]) if add_gt else 0)
            for b, t in zip(split_proposals(proposals)[1], targets, strict=True)
        ]
        reg_rows = padded_reg_count(candidates, self.cfg.reg_sampler.num)
        picked = self.stages[0].deltas_for_labels(
            deltas, torch.cat([s.labels for s in reg_samples])
        )
        scale = self.stages[0].box_normaliser_scale  # 0.5 for the shared trunk
        losses["s0.loss_bbox"] = self._stage_box_loss(
            0, picked, reg_samples, scale * (cls_labels.numel() + reg_rows)
        )
        samples = reg_samples
        for stage in range(1, len(self.stages)):
            moved = self._move_samples(stage - 1, samples, picked.detach(), image_shapes)
            samples = self._sample(moved, targets, stage, self.reg_sampler, add_gt=False)
            head = self.stages[stage]
            boxes = [s.boxes for s in samples]
            picked = head(self._pool(features, boxes, image_shapes, head.reg_roi_scale))
            losses[f"s{stage}.loss_bbox"] = self._stage_box_loss(
                stage, picked, samples, REFINE_NORMALISER_SCALE * reg_rows
            )
        return losses

    def stage0_samples(
        self, proposals: Any, targets: list[dict[str, Tensor]]
    ) -> tuple[list[Samples], list[Samples]]:
        """The ``cls_sampler`` samples of the classification proposals and the ``reg_sampler``
        (positive) samples of the regression proposals (gt added where configured)."""
        cls_boxes, reg_boxes = split_proposals(proposals)
        cls_samples = self._sample(
            cls_boxes, targets, 0, self.cls_sampler, self.cfg.cls_sampler.add_gt
        )
        reg_samples = self._sample(
            reg_boxes, targets, 0, self.reg_sampler, self.cfg.reg_sampler.add_gt
        )
        return cls_samples, reg_samples

    def _stage0_predict(
        self,
        features: dict[str, Tensor],
        cls_samples: list[Samples],
        reg_samples: list[Samples],
        image_shapes: list[tuple[int, int]],
    ) -> tuple[Tensor, Tensor]:
        """Pool cls and reg samples in one RoIAlign call; each fc branch sees only its own rows.

        A conv regression branch (``reg_roi_scale`` set: the Double-Head) pools every row again
        enlarged and runs on all of them, as the official head does (its BatchNorm statistics
        span the classification rows too); only the regression rows' deltas are returned.
        """
        boxes = [
            torch.cat([c.boxes, r.boxes]) for c, r in zip(cls_samples, reg_samples, strict=True)
        ]
        # row numbers from the Python sizes: a boolean mask would make the host wait
        device = boxes[0].device
        cls_rows, reg_rows, first = [], [], 0
        for c, r in zip(cls_samples, reg_samples, strict=True):
            middle = first + len(c.boxes)
            cls_rows.append(torch.arange(first, middle, device=device))
            reg_rows.append(torch.arange(middle, middle + len(r.boxes), device=device))
            first = middle + len(r.boxes)
        cls_idx, reg_idx = torch.cat(cls_rows), torch.cat(reg_rows)
        x = self._pool(features, boxes, image_shapes)
        head = self.stages[0]
        if head.reg_roi_scale is None:
            return head.forward_cls(x[cls_idx]), head.forward_reg(x[reg_idx])
        x_reg = self._pool(features, boxes, image_shapes, head.reg_roi_scale)
        return head.forward_cls(x[cls_idx]), head.forward_reg(x_reg)[reg_idx]

    def _stage_box_loss(
        self, stage: int, picked: Tensor, samples: list[Samples], normaliser: float
    ) -> Tensor:
        """Box loss of ``picked`` deltas on all rows of ``samples`` (all positive)."""
        rois = torch.cat([s.boxes for s in samples])
        gt_boxes = torch.cat([s.gt_boxes for s in samples])
        return self._box_loss(stage, picked, rois, gt_boxes, normaliser)

    def _move_samples(
        self,
        stage: int,
        samples: list[Samples],
        picked: Tensor,
        image_shapes: list[tuple[int, int]],
    ) -> list[Tensor]:
        """The (positive) regression RoIs of ``stage`` moved by its deltas, per image."""
        counts = [len(s.boxes) for s in samples]
        rois = torch.cat([s.boxes for s in samples])
        return list(self._move(stage, rois, picked, counts, image_shapes).split(counts))
