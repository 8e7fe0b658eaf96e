"""Turning per-RoI class probabilities and boxes into final detections: NMS and soft-NMS.

:func:`multiclass_nms` follows torchvision ``RoIHeads.postprocess_detections`` step by step
(clip, one candidate per RoI and foreground class, score threshold, optional small-box removal,
per-class NMS, top ``max_per_image``), so the standard head reproduces torchvision's output.
The NMS step may instead be soft-NMS (Bodla et al. 2017), used by the multi-scale-trained
Decoupled R-CNN models; torchvision has no soft-NMS, so :func:`soft_nms` is written here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, remove_small_boxes

SOFT_NMS_METHODS = {"soft_nms_linear": "linear", "soft_nms_gaussian": "gaussian"}


def _decay(iou: Tensor, iou_threshold: float, sigma: float, method: str) -> Tensor:
    """Score multipliers: linear ``1 - IoU`` above the threshold, gaussian ``exp(-IoU^2/sigma)``."""
    if method == "linear":
        return torch.where(iou > iou_threshold, 1.0 - iou, torch.ones_like(iou))
    if method == "gaussian":
        return torch.exp(-(iou * iou) / sigma)
    raise ValueError(f"soft_nms: method must be 'linear' or 'gaussian', got {method!r}")


def soft_nms(
    boxes: Tensor,
    scores: Tensor,
    iou_threshold: float,
    sigma: float,
    min_score: float,
    method: str,
    idxs: Tensor | None = None,
    max_num: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Soft-NMS: repeatedly keep the top box and decay the scores of the boxes overlapping it.

    ``method`` "linear" multiplies by ``1 - IoU`` when ``IoU > iou_threshold``; "gaussian" by
    ``exp(-IoU^2 / sigma)`` (no threshold). Boxes whose score falls under ``min_score`` are
    dropped. ``idxs`` (class ids) confines suppression to boxes of the same class. Returns the
    kept indices in decreasing final score and those scores. Scores only decrease, so the k-th
    pick is the k-th best final score and ``max_num`` can stop the loop early exactly.
    """
    scores = scores.clone()
    alive = scores >= min_score
    limit = boxes.shape[0] if max_num is None else min(max_num, boxes.shape[0])
    keep: list[Tensor] = []
    kept_scores: list[Tensor] = []
    while len(keep) < limit and bool(alive.any()):
        best = torch.where(alive, scores, float("-inf")).argmax()
        keep.append(best)
        kept_scores.append(scores[best])
        alive[best] = False
        iou = box_iou(boxes[best, None], boxes)[0]
        if idxs is not None:
            iou = iou * (idxs == idxs[best])
        scores = scores * _decay(iou, iou_threshold, sigma, method)
        alive &= scores >= min_score
    if not keep:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device), scores[:0]
    return torch.stack(keep), torch.stack(kept_scores)


def multiclass_nms(
    boxes: Tensor, scores: Tensor, image_size: tuple[int, int], test_cfg: Any
) -> tuple[Tensor, Tensor, Tensor]:
    """Final detections of one image.

    ``boxes``: ``(N, K, 4)`` class-specific or ``(N, 4)`` shared by every class; ``scores``:
    ``(N, K)`` foreground probabilities; ``image_size`` ``(H, W)``; ``test_cfg``
    (``cfg.model.roi_head.test``): ``score_thresh``, ``min_box_size``, ``nms``, ``nms_iou``,
    ``soft_nms_sigma``, ``soft_nms_min_score``, ``max_per_image``.
    Returns ``(boxes (M, 4), scores (M,), labels (M,) in 1..K)``, best first.
    """
    num_classes = scores.shape[1]
    if boxes.dim() == 2:
        boxes = boxes[:, None].expand(-1, num_classes, 4)
    boxes = clip_boxes_to_image(boxes, image_size)
    labels = torch.arange(1, num_classes + 1, device=scores.device).expand_as(scores)
    boxes, scores, labels = boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)

    keep = torch.where(scores > test_cfg.score_thresh)[0]
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    if test_cfg.min_box_size > 0:
        keep = remove_small_boxes(boxes, test_cfg.min_box_size)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]

    if test_cfg.nms == "nms":
        keep = batched_nms(boxes, scores, labels, test_cfg.nms_iou)[: test_cfg.max_per_image]
        return boxes[keep], scores[keep], labels[keep]
    keep, new_scores = soft_nms(
        boxes,
        scores,
        test_cfg.nms_iou,
        test_cfg.soft_nms_sigma,
        test_cfg.soft_nms_min_score,
        SOFT_NMS_METHODS[test_cfg.nms],
        idxs=labels,
        max_num=test_cfg.max_per_image,
    )
    return boxes[keep], new_scores, labels[keep]
