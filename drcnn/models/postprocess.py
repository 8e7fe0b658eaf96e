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
import torchvision
from torch import Tensor
from torchvision.ops import box_iou, clip_boxes_to_image, nms

from drcnn.models.threads import cpu_path

SOFT_NMS_METHODS = {"soft_nms_linear": "linear", "soft_nms_gaussian": "gaussian"}
# on a device, soft-NMS without a bound on its picks asks whether any box is left this often
SOFT_NMS_DEVICE_CHECK = 32

# At most about this many (box, class) pairs enter the final NMS (see final_nms_candidates). A
# trained COCO detector keeps a few thousand pairs above the official score threshold 0.001;
# with random weights, or a class-agnostic box expanded to 80 classes, all 80 x 1000 may pass,
# and the CUDA NMS kernel's last step is sequential over every input box.
FINAL_NMS_CANDIDATES = 3000


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """``torchvision.ops.batched_nms``: NMS within each ``idxs`` group, kept indices best first.

    On the CPU path, torchvision's own (a per-group loop above 1000 boxes, faster there). On a
    device, always torchvision's coordinate-offset way: boxes of different groups moved apart
    so one ``nms`` kernel does every group. torchvision also loops there above 25000 boxes (a
    ``unique`` and one ``nms`` per group, each making the host wait), and its offset adds a
    tensor copied from the host.
    """
    if cpu_path(boxes.device):
        return torchvision.ops.batched_nms(boxes, scores, idxs, iou_threshold)
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    offsets = idxs.to(boxes) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def final_nms_candidates(scores: Tensor, usable: Tensor, limit: int) -> Tensor:
    """Indices (ascending) of the usable entries of ``scores`` whose score is at least the
    ``limit``-th best usable score: every usable entry when fewer than ``limit`` are usable.

    Greedy NMS keeps or drops a candidate by the better-scored candidates of its class only,
    so NMS on a set that holds every candidate scored above some value keeps exactly the full
    NMS's kept candidates above that value. Ties at the cut come in whole (``>=``), and the
    candidates keep their order, which NMS's stable sort uses among equal scores: so the kept
    set and its order are the full run's, cut at that score. The result has ``limit`` or more
    entries exactly when the cut may have left some usable entries out.
    """
    if scores.numel() > limit:
        masked = torch.where(usable, scores, torch.full_like(scores, float("-inf")))
        cut = masked.topk(limit, sorted=False).values.min()
        usable = usable & (scores >= cut)
    return torch.where(usable)[0]


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

    Whether any box is left is a question the host must wait for on a device. On the CPU path
    the loop asks before every pick. On a device it asks only every
    :data:`SOFT_NMS_DEVICE_CHECK` picks, and not at all when ``max_num`` bounds the loop (the
    final detections: at most ``max_per_image`` picks); a pick made when nothing was left is
    recorded as such and dropped at the end, with one wait. The picks index with one-element
    tensors, which a device does not read on the host. It was about four waits per kept box.
    """
    scores = scores.clone()
    alive = scores >= min_score
    limit = boxes.shape[0] if max_num is None else min(max_num, boxes.shape[0])
    check = 1 if cpu_path(boxes.device) else limit if max_num is not None else SOFT_NMS_DEVICE_CHECK
    keep: list[Tensor] = []
    kept_scores: list[Tensor] = []
    valid: list[Tensor] = []  # whether a box was left at each pick (unchecked picks)
    while len(keep) < limit:
        if len(keep) % check == 0 and not bool(alive.any()):
            break
        # a one-element index: indexing with a 0-dim tensor reads its value on the host
        best = torch.where(alive, scores, float("-inf")).argmax().view(1)
        valid.append(alive[best])  # False once nothing is left, and for every later pick
        keep.append(best)
        kept_scores.append(scores[best])
        alive[best] = False
        iou = box_iou(boxes[best], boxes)[0]
        if idxs is not None:
            iou = iou * (idxs == idxs[best])
        scores = scores * _decay(iou, iou_threshold, sigma, method)
        alive &= scores >= min_score
    if not keep:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device), scores[:0]
    keep_t, kept_t = torch.cat(keep), torch.cat(kept_scores)
    if check == 1:  # every pick was checked first
        return keep_t, kept_t
    count = int(torch.cat(valid).sum())  # valid picks come first
    return keep_t[:count], kept_t[:count]


def multiclass_nms(
    boxes: Tensor,
    scores: Tensor,
    image_size: tuple[int, int],
    test_cfg: Any,
    stats: dict[str, Any] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Final detections of one image.

    ``boxes``: ``(N, K, 4)`` class-specific or ``(N, 4)`` shared by every class; ``scores``:
    ``(N, K)`` foreground probabilities; ``image_size`` ``(H, W)``; ``test_cfg``
    (``cfg.model.roi_head.test``): ``score_thresh``, ``min_box_size``, ``nms``, ``nms_iou``,
    ``soft_nms_sigma``, ``soft_nms_min_score``, ``max_per_image``.
    Returns ``(boxes (M, 4), scores (M,), labels (M,) in 1..K)``, best first.

    Plain NMS runs on the best :data:`FINAL_NMS_CANDIDATES` (box, class) pairs (ties at the
    cut included, :func:`final_nms_candidates`); when fewer than ``max_per_image`` of them
    survive and pairs were left out, on all of them. Either way the result is the full NMS's.
    ``stats``: when given, filled for benchmarks without waiting for the device:
    ``"nms_inputs"``, the number of pairs that entered the NMS whose result is returned (an
    int), and ``"score_pairs"``, the number that passed the score threshold (a 0-dim tensor on
    the scores' device: reading it waits).
    """
    num_classes = scores.shape[1]
    if boxes.dim() == 2:
        boxes = boxes[:, None].expand(-1, num_classes, 4)
    boxes = clip_boxes_to_image(boxes, image_size).reshape(-1, 4)
    labels = torch.arange(1, num_classes + 1, device=scores.device).expand_as(scores).reshape(-1)
    scores = scores.reshape(-1)
    # the score threshold and (when asked) torchvision's remove_small_boxes, in one selection
    usable = scores > test_cfg.score_thresh
    if test_cfg.min_box_size > 0:
        usable &= ((boxes[:, 2:] - boxes[:, :2]) >= test_cfg.min_box_size).all(dim=1)
    if stats is not None:
        stats["score_pairs"] = usable.sum()

    if test_cfg.nms == "nms":
        limit = max(FINAL_NMS_CANDIDATES, test_cfg.max_per_image)
        cand = final_nms_candidates(scores, usable, limit)
        keep = cand[batched_nms(boxes[cand], scores[cand], labels[cand], test_cfg.nms_iou)]
        if len(keep) < test_cfg.max_per_image and len(cand) >= limit:  # maybe pairs left out
            every = torch.where(usable)[0]
            if len(every) > len(cand):
                cand = every
                keep = cand[batched_nms(boxes[cand], scores[cand], labels[cand], test_cfg.nms_iou)]
        if stats is not None:
            stats["nms_inputs"] = len(cand)
        keep = keep[: test_cfg.max_per_image]
        return boxes[keep], scores[keep], labels[keep]
    keep = torch.where(usable)[0]
    if stats is not None:
        stats["nms_inputs"] = len(keep)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
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
