"""Region proposal network that can emit Decoupled R-CNN's two proposal sets.

torchvision's ``RegionProposalNetwork`` supplies anchors, the head, matching, sampling and box
coding. This subclass changes what happens after the per-level pre-NMS top-k in training when
``nms_thresh`` is a pair ``(t_cls, t_reg)``: the same candidates go through the per-level NMS
twice, giving the *classification* proposals (``t_cls``, usually 0.7) and the *regression*
proposals (``t_reg``, usually 0.85: more highly overlapping boxes survive). It also offers the
official L1 box loss besides torchvision's smooth L1 and names its losses ``rpn.loss_*``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import (
    RegionProposalNetwork,
    RPNHead,
    concat_box_prediction_layers,
)
from torchvision.ops import boxes as box_ops

from drcnn.config import rpn_nms_thresholds
from drcnn.models.threads import thread_map


class ProposalSets(NamedTuple):
    """Training proposals of Decoupled R-CNN: one list of ``(P_i, 4)`` boxes per image, per set."""

    cls: list[Tensor]
    reg: list[Tensor]


class Candidates(NamedTuple):
    """One image's proposals after top-k, clipping and filtering, before NMS."""

    boxes: Tensor
    scores: Tensor
    levels: Tensor


class DecoupledRPN(RegionProposalNetwork):
    """RPN returning ``ProposalSets`` in training with two NMS thresholds, else ``list[Tensor]``.

    ``train_nms_thresh`` holds one or two thresholds; ``nms_thresh`` (torchvision's attribute)
    is the test-time threshold. ``loss_bbox`` is ``"l1"`` or ``"smooth_l1"`` (beta 1/9); both are
    summed over positive anchors and divided by the number of sampled anchors.
    """

    def __init__(
        self,
        anchor_generator: AnchorGenerator,
        head: RPNHead,
        *,
        fg_iou_thresh: float,
        bg_iou_thresh: float,
        batch_size_per_image: int,
        positive_fraction: float,
        pre_nms_top_n: dict[str, int],
        post_nms_top_n: dict[str, int],
        train_nms_thresh: tuple[float, ...],
        test_nms_thresh: float,
        score_thresh: float,
        min_size: float,
        loss_bbox: str,
    ) -> None:
        super().__init__(
            anchor_generator,
            head,
            fg_iou_thresh,
            bg_iou_thresh,
            batch_size_per_image,
            positive_fraction,
            pre_nms_top_n,
            post_nms_top_n,
            test_nms_thresh,
            score_thresh,
        )
        self.train_nms_thresh = tuple(train_nms_thresh)
        self.min_size = min_size
        self.loss_bbox = loss_bbox

    def active_nms_thresholds(self) -> tuple[float, ...]:
        """The NMS thresholds of the current mode: one or two in training, one in eval."""
        return self.train_nms_thresh if self.training else (self.nms_thresh,)

    def select_candidates(
        self,
        proposals: Tensor,
        objectness: Tensor,
        image_shapes: list[tuple[int, int]],
        num_anchors_per_level: list[int],
    ) -> list[Candidates]:
        """Per-level top-k by objectness, clip to the image, drop tiny and low-scoring boxes."""
        num_images = proposals.shape[0]
        objectness = objectness.detach().reshape(num_images, -1)
        levels = torch.cat(
            [
                torch.full((n,), idx, dtype=torch.int64, device=proposals.device)
                for idx, n in enumerate(num_anchors_per_level)
            ]
        ).expand_as(objectness)
        top_n_idx = self._get_top_n_idx(objectness, num_anchors_per_level)
        batch_idx = torch.arange(num_images, device=proposals.device)[:, None]
        objectness = objectness[batch_idx, top_n_idx].sigmoid()
        levels = levels[batch_idx, top_n_idx]
        proposals = proposals[batch_idx, top_n_idx]

        candidates = []
        for boxes, scores, lvl, shape in zip(
            proposals, objectness, levels, image_shapes, strict=True
        ):
            boxes = box_ops.clip_boxes_to_image(boxes, shape)
            keep = box_ops.remove_small_boxes(boxes, self.min_size)
            keep = keep[scores[keep] >= self.score_thresh]
            candidates.append(Candidates(boxes[keep], scores[keep], lvl[keep]))
        return candidates

    def nms_proposals(self, candidates: list[Candidates], thresh: float) -> list[Tensor]:
        """Per-level NMS at ``thresh``, then the ``post_nms_top_n`` best boxes of each image."""
        limit = self.post_nms_top_n()

        def keep(cand: Candidates) -> Tensor:
            return cand.boxes[box_ops.batched_nms(cand.boxes, cand.scores, cand.levels, thresh)]

        run = thread_map if candidates and candidates[0].boxes.device.type == "cpu" else map
        return [boxes[:limit] for boxes in run(keep, candidates)]

    def compute_loss(
        self,
        objectness: Tensor,
        pred_bbox_deltas: Tensor,
        labels: list[Tensor],
        regression_targets: list[Tensor],
    ) -> tuple[Tensor, Tensor]:
        """Objectness BCE over sampled anchors; box loss on positives / number sampled."""
        pos_masks, neg_masks = self.fg_bg_sampler(labels)
        pos = torch.where(torch.cat(pos_masks))[0]
        sampled = torch.cat([pos, torch.where(torch.cat(neg_masks))[0]])
        deltas, targets = pred_bbox_deltas[pos], torch.cat(regression_targets)[pos]
        if self.loss_bbox == "l1":
            box_loss = F.l1_loss(deltas, targets, reduction="sum")
        else:
            box_loss = F.smooth_l1_loss(deltas, targets, beta=1 / 9, reduction="sum")
        cls_loss = F.binary_cross_entropy_with_logits(
            objectness.flatten()[sampled], torch.cat(labels)[sampled]
        )
        return cls_loss, box_loss / max(sampled.numel(), 1)

    def forward(
        self,
        images: ImageList,
        features: dict[str, Tensor],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[Tensor] | ProposalSets, dict[str, Tensor]]:
        """Proposals (one set, or ``ProposalSets`` when training with two thresholds) + losses."""
        feature_maps = list(features.values())
        objectness, pred_bbox_deltas = self.head(feature_maps)
        anchors = self.anchor_generator(images, feature_maps)
        num_anchors_per_level = [o[0].numel() for o in objectness]
        objectness, pred_bbox_deltas = concat_box_prediction_layers(objectness, pred_bbox_deltas)
        # proposals do not back-propagate into the RPN (as in Faster R-CNN)
        proposals = self.box_coder.decode(pred_bbox_deltas.detach(), anchors)
        proposals = proposals.view(len(anchors), -1, 4)
        candidates = self.select_candidates(
            proposals, objectness, images.image_sizes, num_anchors_per_level
        )
        sets = [self.nms_proposals(candidates, t) for t in self.active_nms_thresholds()]
        boxes = ProposalSets(*sets) if len(sets) == 2 else sets[0]

        losses: dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("DecoupledRPN: targets are required in training mode")
            labels, matched_gt_boxes = self.assign_targets_to_anchors(anchors, targets)
            regression_targets = self.box_coder.encode(matched_gt_boxes, anchors)
            loss_cls, loss_bbox = self.compute_loss(
                objectness, pred_bbox_deltas, labels, regression_targets
            )
            losses = {"rpn.loss_cls": loss_cls, "rpn.loss_bbox": loss_bbox}
        return boxes, losses


def build_rpn(cfg: DictConfig, in_channels: int) -> DecoupledRPN:
    """The RPN of ``cfg.model.rpn`` on FPN features with ``in_channels`` channels."""
    rcfg = cfg.model.rpn
    anchor_generator = AnchorGenerator(
        sizes=tuple((int(s),) for s in rcfg.anchor_sizes),
        aspect_ratios=(tuple(float(r) for r in rcfg.aspect_ratios),) * len(rcfg.anchor_sizes),
    )
    head = RPNHead(in_channels, anchor_generator.num_anchors_per_location()[0])
    return DecoupledRPN(
        anchor_generator,
        head,
        fg_iou_thresh=rcfg.fg_iou_thresh,
        bg_iou_thresh=rcfg.bg_iou_thresh,
        batch_size_per_image=rcfg.batch_size_per_image,
        positive_fraction=rcfg.positive_fraction,
        pre_nms_top_n={"training": rcfg.pre_nms_top_n_train, "testing": rcfg.pre_nms_top_n_test},
        post_nms_top_n={
            "training": rcfg.post_nms_top_n_train,
            "testing": rcfg.post_nms_top_n_test,
        },
        train_nms_thresh=rpn_nms_thresholds(rcfg),
        test_nms_thresh=rcfg.test_nms_thresh,
        score_thresh=rcfg.score_thresh,
        min_size=rcfg.min_size,
        loss_bbox=rcfg.loss_bbox,
    )
