"""soft-NMS against a float64 pure-Python loop; multiclass NMS against a per-class loop."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import nms

from drcnn.config import load_config
from drcnn.models.postprocess import multiclass_nms, soft_nms


def clustered_boxes(n: int, seed: int) -> torch.Tensor:
    """Boxes in a few clusters, so that many pairs overlap."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(n // 8 + 1, 2, generator=g) * 200
    ctr = (
        centres[torch.randint(len(centres), (n,), generator=g)] + torch.randn(n, 2, generator=g) * 6
    )
    wh = 20 + torch.rand(n, 2, generator=g) * 30
    return torch.cat([ctr - wh / 2, ctr + wh / 2], dim=1)


def iou64(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def soft_nms_reference(boxes, scores, thr, sigma, min_score, method):
    """Textbook soft-NMS, one box at a time, in Python floats."""
    boxes, scores = boxes.double().tolist(), scores.double().tolist()
    remaining = [i for i in range(len(boxes)) if scores[i] >= min_score]
    keep, kept = [], []
    while remaining:
        best = max(remaining, key=lambda i: scores[i])
        keep.append(best)
        kept.append(scores[best])
        remaining.remove(best)
        for i in list(remaining):
            o = iou64(boxes[best], boxes[i])
            if method == "linear":
                scores[i] *= 1 - o if o > thr else 1.0
            else:
                scores[i] *= math.exp(-o * o / sigma)
            if scores[i] < min_score:
                remaining.remove(i)
    return keep, kept


@pytest.mark.parametrize("method", ["linear", "gaussian"])
def test_soft_nms_equals_python_reference(method):
    boxes = clustered_boxes(80, seed=0)
    scores = torch.rand(80, generator=torch.Generator().manual_seed(1))
    keep, new_scores = soft_nms(boxes, scores, 0.3, 0.5, 0.05, method)
    ref_keep, ref_scores = soft_nms_reference(boxes, scores, 0.3, 0.5, 0.05, method)
    assert 5 < len(ref_keep) < 80  # suppression and dropping both happened
    assert keep.tolist() == ref_keep
    torch.testing.assert_close(
        new_scores.double(), torch.tensor(ref_scores, dtype=torch.float64), rtol=1e-5, atol=1e-6
    )
    early, early_scores = soft_nms(boxes, scores, 0.3, 0.5, 0.05, method, max_num=7)
    assert early.tolist() == ref_keep[:7] and torch.equal(early_scores, new_scores[:7])


def test_soft_nms_by_class_never_crosses_classes():
    boxes = clustered_boxes(60, seed=2)
    scores = torch.rand(60, generator=torch.Generator().manual_seed(3))
    idxs = torch.randint(0, 3, (60,), generator=torch.Generator().manual_seed(4))
    keep, new_scores = soft_nms(boxes, scores, 0.5, 0.5, 0.01, "linear", idxs=idxs)
    merged = {}
    for c in range(3):
        rows = torch.where(idxs == c)[0]
        k, s = soft_nms_reference(boxes[rows], scores[rows], 0.5, 0.5, 0.01, "linear")
        merged.update({rows[i].item(): v for i, v in zip(k, s, strict=True)})
    assert sorted(keep.tolist()) == sorted(merged)
    assert new_scores.tolist() == pytest.approx([merged[i] for i in keep.tolist()], abs=1e-6)
    assert new_scores.tolist() == sorted(new_scores.tolist(), reverse=True)


def make_test_cfg(**overrides):
    items = [f"model.roi_head.test.{k}={v}" for k, v in overrides.items()]
    return load_config(None, overrides=items).model.roi_head.test


def per_class_reference(boxes, scores, size, thr, iou, max_per_image):
    """Per-class loop with torchvision nms (instead of batched_nms), then the global top-k."""
    h, w = size
    boxes = boxes.clone()
    boxes[..., 0::2] = boxes[..., 0::2].clamp(0, w)
    boxes[..., 1::2] = boxes[..., 1::2].clamp(0, h)
    rows = []
    for c in range(scores.shape[1]):
        cand = torch.where(scores[:, c] > thr)[0]
        for i in nms(boxes[cand, c], scores[cand, c], iou).tolist():
            rows.append((scores[cand[i], c].item(), c + 1, boxes[cand[i], c]))
    rows.sort(key=lambda r: -r[0])
    return rows[:max_per_image]


@pytest.mark.parametrize("max_per_image", [100, 15])
def test_multiclass_nms_matches_per_class_loop(max_per_image):
    g = torch.Generator().manual_seed(5)
    boxes = torch.stack([clustered_boxes(120, seed=s) for s in range(3)], dim=1) - 20  # (N, 3, 4)
    scores = torch.rand(120, 3, generator=g)
    cfg = make_test_cfg(score_thresh=0.2, nms_iou=0.5, max_per_image=max_per_image)
    out_boxes, out_scores, out_labels = multiclass_nms(boxes, scores, (150, 180), cfg)
    ref = per_class_reference(boxes, scores, (150, 180), 0.2, 0.5, max_per_image)
    assert len(out_scores) == len(ref) <= max_per_image
    assert out_scores.tolist() == [r[0] for r in ref]
    assert out_labels.tolist() == [r[1] for r in ref]
    torch.testing.assert_close(out_boxes, torch.stack([r[2] for r in ref]))
    assert out_boxes[:, 0::2].max() <= 180 and out_boxes.min() >= 0


def test_shared_boxes_equal_expanded_boxes():
    boxes = clustered_boxes(50, seed=6)
    scores = torch.rand(50, 4, generator=torch.Generator().manual_seed(7))
    cfg = make_test_cfg(score_thresh=0.05)
    shared = multiclass_nms(boxes, scores, (300, 300), cfg)
    expanded = multiclass_nms(boxes[:, None].expand(-1, 4, 4), scores, (300, 300), cfg)
    for a, b in zip(shared, expanded, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("nms_type", ["nms", "soft_nms_linear", "soft_nms_gaussian"])
def test_at_most_max_per_image(nms_type):
    boxes = clustered_boxes(400, seed=8)
    scores = torch.rand(400, 5, generator=torch.Generator().manual_seed(9))
    cfg = make_test_cfg(nms=nms_type, max_per_image=30)
    out_boxes, out_scores, out_labels = multiclass_nms(boxes, scores, (400, 400), cfg)
    assert len(out_boxes) == len(out_scores) == len(out_labels) == 30
    assert out_labels.min() >= 1 and out_labels.max() <= 5
    assert out_scores.tolist() == sorted(out_scores.tolist(), reverse=True)


def test_small_boxes_removed_only_when_asked():
    boxes = torch.tensor([[10.0, 10.0, 10.005, 30.0], [0.0, 0.0, 20.0, 20.0]])
    scores = torch.tensor([[0.9], [0.8]])
    kept = multiclass_nms(boxes, scores, (50, 50), make_test_cfg(min_box_size=0.01))
    assert kept[1].tolist() == pytest.approx([0.8])
    assert len(multiclass_nms(boxes, scores, (50, 50), make_test_cfg())[1]) == 2
