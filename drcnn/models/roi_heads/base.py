"""What every RoI head shares: pooling, per-stage box coders, the regression chain, losses, NMS.

An RoI head is a list of ``stages`` (stage 0 first) on top of one ``box_roi_pool``. At inference
(and in :meth:`RoIHeadsBase.analyze`) the stages form a chain: each stage looks at its input
boxes, predicts deltas, and moves the boxes (deltas of one class per box when class-specific,
decoded with that stage's ``BoxCoder`` and clipped to the image); the moved boxes are the next
stage's input. The subclasses differ only in how they train and how the final boxes are read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from drcnn.config import RoIHeadConfig
from drcnn.models.box_coder import BoxCoder
from drcnn.models.host_data import clip_rows
from drcnn.models.losses import box_loss
from drcnn.models.postprocess import multiclass_nms
from drcnn.models.roi_align import MultiScaleRoIAlign
from drcnn.models.sampling import Sampler, Samples, sample_rois

Detections = list[dict[str, Tensor]]
BBOX_XFORM_CLIP = math.log(1000.0 / 16)
FEATMAP_NAMES = ("0", "1", "2", "3")  # the FPN levels RoIs are pooled from (P2-P5)


class StageOutput(NamedTuple):
    """One stage of the inference chain, rows = all RoIs of the batch in order."""

    inputs: Tensor  # (N, 4) boxes the stage looked at
    logits: Tensor | None  # (N, K+1) class logits, None for regression-only stages
    deltas: Tensor  # (N, 4C) raw predicted deltas (C = classes or 1)
    picked: Tensor  # (N, 4) the deltas used to move each box
    outputs: Tensor  # (N, 4) moved boxes (the next stage's input)


def box_coder(target_stds: Sequence[float]) -> BoxCoder:
    """drcnn's BoxCoder (torchvision's, sync-free) whose weights are the inverse delta stds
    (0.1, 0.2 -> 10, 5)."""
    return BoxCoder(tuple(1.0 / s for s in target_stds), bbox_xform_clip=BBOX_XFORM_CLIP)


def roi_config(roi: RoIHeadConfig | DictConfig) -> RoIHeadConfig:
    """The ``model.roi_head`` part as its typed dataclass (an OmegaConf node is converted)."""
    return OmegaConf.to_object(roi) if OmegaConf.is_config(roi) else roi


def split_proposals(proposals: Any) -> tuple[list[Tensor], list[Tensor]]:
    """(classification, regression) proposal lists: the RPN's ``ProposalSets`` or one list twice."""
    if hasattr(proposals, "cls") and hasattr(proposals, "reg"):
        return list(proposals.cls), list(proposals.reg)
    return list(proposals), list(proposals)


class RoIHeadsBase(nn.Module):
    """Pool + stages + coders; ``forward`` follows torchvision ``RoIHeads.forward``.

    Subclasses build ``stages`` and implement :meth:`forward_train` (returns the loss dict);
    they may override :meth:`_stage_predict` and :meth:`_final_boxes`.
    """

    def __init__(
        self, roi: RoIHeadConfig, featmap_names: Sequence[str], stages: nn.ModuleList
    ) -> None:
        super().__init__()
        self.cfg = roi_config(roi)
        self.box_roi_pool = MultiScaleRoIAlign(
            list(featmap_names), roi.roi_size, roi.sampling_ratio, aligned=roi.aligned
        )
        self.stages = stages
        self.box_coders = [box_coder(stage.target_stds) for stage in roi.stages]
        # per image of the last inference, for benchmarks to report the final NMS's load
        # (postprocess.multiclass_nms's stats): the (box, class) pairs that entered it, and
        # those that passed the score threshold (0-dim tensors on the device)
        self.final_nms_inputs: list[int] = []
        self.final_score_pairs: list[Tensor] = []

    @staticmethod
    def in_features(roi: RoIHeadConfig, in_channels: int) -> int:
        """Width of a flattened RoI feature."""
        return in_channels * roi.roi_size**2

    # ---- torchvision interface ------------------------------------------------------------
    def forward(
        self,
        features: dict[str, Tensor],
        proposals: Any,
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[Detections, dict[str, Tensor]]:
        """Training: ``([], losses)`` (targets required); inference: ``(detections, {})``."""
        if self.training:
            if targets is None:
                raise ValueError("RoI heads: targets are required in training mode")
            return [], self.forward_train(features, proposals, image_shapes, targets)
        return self.predict(features, split_proposals(proposals)[0], image_shapes), {}

    def forward_train(
        self,
        features: dict[str, Tensor],
        proposals: Any,
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        """Sample RoIs against ``targets`` and return the loss dict (per head type)."""
        raise NotImplementedError

    def stage0_samples(
        self, proposals: Any, targets: list[dict[str, Tensor]]
    ) -> tuple[list[Samples], list[Samples]]:
        """Per image, the (classification, regression) RoIs stage 0 trains on, drawn with the
        head's own samplers (random draws: seed torch for repeatable samples).

        ``proposals``: ``ProposalSets(cls, reg)`` or one list. One list object twice when both
        branches train on one sample (Faster / Cascade R-CNN).
        """
        raise NotImplementedError

    # ---- shared pieces ----------------------------------------------------------------------
    def _pool(
        self,
        features: dict[str, Tensor],
        boxes: list[Tensor],
        image_shapes: list[tuple[int, int]],
        roi_scale: float | None = None,
    ) -> Tensor:
        """RoIAlign features ``(sum of boxes, C, S, S)`` of per-image boxes, FPN level by size
        (``roi_scale``: each box pooled that many times larger, see ``BoxHead.reg_roi_scale``)."""
        return self.box_roi_pool(features, boxes, image_shapes, roi_scale_factor=roi_scale)

    def _sample(
        self,
        boxes: list[Tensor],
        targets: list[dict[str, Tensor]],
        stage: int,
        sampler: Sampler,
        add_gt: bool,
    ) -> list[Samples]:
        """Per-image samples of ``boxes`` assigned at stage ``stage``'s IoU threshold."""
        gt_boxes, gt_labels = [t["boxes"] for t in targets], [t["labels"] for t in targets]
        iou = self.cfg.stages[stage].iou_thresh
        return sample_rois(boxes, gt_boxes, gt_labels, iou, sampler, add_gt)

    def _move(
        self,
        stage: int,
        boxes: Tensor,
        deltas: Tensor,
        counts: Sequence[int],
        image_shapes: Sequence[tuple[int, int]],
    ) -> Tensor:
        """Boxes moved by one delta row each with stage ``stage``'s coder, clipped to the image."""
        moved = self.box_coders[stage].decode_single(deltas.float(), boxes)
        return clip_rows(moved, counts, image_shapes)

    def _cls_losses(self, stage: int, logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """Cross-entropy (mean over the sampled RoIs), and the accuracy for stage 0."""
        weight = self.cfg.stages[stage].loss_weight
        losses = {f"s{stage}.loss_cls": weight * F.cross_entropy(logits, labels)}
        if stage == 0:
            losses["s0.acc"] = (logits.argmax(dim=1) == labels).float().mean().detach()
        return losses

    def _box_loss(
        self, stage: int, deltas: Tensor, rois: Tensor, gt_boxes: Tensor, normaliser: float
    ) -> Tensor:
        """Box loss of ``deltas`` against the encoded gt, summed, / ``normaliser``, weighted."""
        targets = self.box_coders[stage].encode_single(gt_boxes, rois)
        loss = box_loss(deltas.float(), targets, self._box_loss_entry(targets)) / max(normaliser, 1)
        return self.cfg.stages[stage].loss_weight * loss

    def _box_loss_entry(self, targets: Tensor) -> Any:
        """The ``loss_bbox`` entry for these (positive) targets: the config's, which a head
        with an adaptive loss (Dynamic R-CNN) replaces."""
        return self.cfg.loss_bbox

    # ---- the chain (inference and analysis) -------------------------------------------------
    def _stage_predict(
        self,
        stage: int,
        features: dict[str, Tensor],
        boxes: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> tuple[Tensor | None, Tensor]:
        """(class logits or None, deltas) of stage ``stage`` on per-image ``boxes`` (pooled here:
        a head may pool its branches differently)."""
        return self.stages[stage](self._pool(features, boxes, image_shapes))

    def _chain(
        self,
        features: dict[str, Tensor],
        boxes: list[Tensor],
        image_shapes: list[tuple[int, int]],
        labels: Tensor | None = None,
    ) -> list[StageOutput]:
        """Run every stage on the previous stage's moved boxes.

        Class-specific deltas are taken for ``labels`` when given (the analysis), else for the
        arg-max foreground class of the stage's own logits (inference).
        """
        counts = [len(b) for b in boxes]
        inputs = torch.cat(boxes)
        chosen = labels
        outs: list[StageOutput] = []
        for stage, head in enumerate(self.stages):
            per_image = list(inputs.split(counts))
            logits, deltas = self._stage_predict(stage, features, per_image, image_shapes)
            if labels is None and logits is not None:
                chosen = logits[:, 1:].argmax(dim=1) + 1
            picked = head.deltas_for_labels(deltas, chosen)
            moved = self._move(stage, inputs, picked, counts, image_shapes).detach()
            outs.append(StageOutput(inputs, logits, deltas, picked, moved))
            inputs = moved
        return outs

    @staticmethod
    def _class_probs(outs: list[StageOutput]) -> Tensor:
        """Softmax of the class logits averaged over the stages that classify.

        Cascade R-CNN averages its three stages' logits, then takes the softmax (mmdetection's
        ``CascadeRoIHead.simple_test``); with one classifying stage (Faster R-CNN, and
        Decoupled R-CNN's stage 0) this is that stage's softmax, bit for bit.
        """
        logits = [o.logits for o in outs if o.logits is not None]
        return F.softmax(torch.stack(logits).mean(dim=0), dim=1)

    def _final_boxes(self, outs: list[StageOutput]) -> Tensor:
        """Detection boxes: ``(N, K, 4)`` per-class decode of the last stage, or ``(N, 4)``."""
        last, head = outs[-1], self.stages[-1]
        if not head.class_specific:
            return last.outputs
        per_class = head.foreground_deltas(last.deltas)
        decoded = self.box_coders[-1].decode_single(per_class.flatten(1).float(), last.inputs)
        return decoded.reshape(per_class.shape)

    def predict(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> Detections:
        """Detections per image: chain the stages, average class scores, per-class NMS
        (each image's NMS load is left in ``final_nms_inputs`` and ``final_score_pairs``)."""
        counts = [len(p) for p in proposals]
        outs = self._chain(features, proposals, image_shapes)
        scores = self._class_probs(outs)[:, 1:].split(counts)
        boxes = self._final_boxes(outs).split(counts)
        detections, self.final_nms_inputs, self.final_score_pairs = [], [], []
        for b, s, shape in zip(boxes, scores, image_shapes, strict=True):
            stats: dict[str, Any] = {}
            det_boxes, det_scores, det_labels = multiclass_nms(
                b, s, shape, self.cfg.test, stats=stats
            )
            detections.append({"boxes": det_boxes, "scores": det_scores, "labels": det_labels})
            self.final_nms_inputs.append(stats["nms_inputs"])
            self.final_score_pairs.append(stats["score_pairs"])
        return detections

    def analyze(
        self,
        features: dict[str, Tensor],
        boxes: list[Tensor],
        image_shapes: list[tuple[int, int]],
        labels: list[Tensor],
    ) -> dict[str, Any]:
        """Run the head on given boxes (no sampling, no NMS) for the sensitivity study.

        Class-specific deltas are those of the given (true) ``labels``, so regression is judged
        apart from classification; ``class_probs`` are the scores inference would use on the
        boxes each stage sees (``class_logits``: the raw logits of each classifying stage they
        average). Rows: all boxes of all images, in order.
        """
        outs = self._chain(features, boxes, image_shapes, torch.cat(labels))
        return {
            "class_probs": self._class_probs(outs),
            "class_logits": [o.logits for o in outs if o.logits is not None],
            "stage_inputs": [o.inputs for o in outs],
            "stage_boxes": [o.outputs for o in outs],
            "stage_deltas": [o.picked for o in outs],
            "box_coders": list(self.box_coders),
        }
