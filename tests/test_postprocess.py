"""soft-NMS against a float64 pure-Python loop; multiclass NMS against a per-class loop and,
on its top candidates only, against the plain full NMS."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torchvision.ops import clip_boxes_to_image, nms
from torchvision.ops.boxes import _batched_nms_coordinate_trick

from drcnn.config import load_config
from drcnn.models import postprocess
from drcnn.models.postprocess import final_nms_candidates, multiclass_nms, soft_nms
from drcnn.models.sync_audit import SyncAudit
from drcnn.models.threads import device_code_path


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


@pytest.mark.parametrize("max_num", [None, 5, 200])
@pytest.mark.parametrize("method", ["linear", "gaussian"])
def test_soft_nms_on_the_device_path_keeps_the_same_boxes_with_few_waits(method, max_num):
    """A device asks whether any box is left once per call when the picks are bounded (else
    every SOFT_NMS_DEVICE_CHECK picks), runs on past the last box unchecked and drops those
    picks: the same result as the host's loop, which asks before every pick. min_score 0.3
    leaves fewer boxes than 200 picks, so picks past the last box happen."""
    boxes = clustered_boxes(120, seed=5)
    scores = torch.rand(120, generator=torch.Generator().manual_seed(6))
    idxs = torch.randint(0, 3, (120,), generator=torch.Generator().manual_seed(7))
    args = (boxes, scores, 0.3, 0.5, 0.3, method)
    keep, kept = soft_nms(*args, idxs=idxs, max_num=max_num)
    assert 5 <= len(keep) < 120
    with SyncAudit() as audit:  # along the device code path
        device_keep, device_kept = soft_nms(*args, idxs=idxs, max_num=max_num)
    assert torch.equal(device_keep, keep) and torch.equal(device_kept, kept)
    # before the first pick; unbounded, also every SOFT_NMS_DEVICE_CHECK picks up to the first
    # check that finds none left
    every = postprocess.SOFT_NMS_DEVICE_CHECK
    checks = 1 if max_num is not None else -(-len(keep) // every) + 1
    assert audit.total <= checks + 1, audit.report()  # + the count of valid picks at the end


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


# ---- the final NMS on the top candidates (postprocess.FINAL_NMS_CANDIDATES) -----------------


def full_nms(boxes, scores, size, cfg):
    """Plain full NMS: the score threshold, then one batched NMS of every candidate
    (torchvision's coordinate-offset way, the same nms kernel), then the top max_per_image."""
    num_classes = scores.shape[1]
    boxes = clip_boxes_to_image(boxes[:, None].expand(-1, num_classes, 4), size).reshape(-1, 4)
    labels = torch.arange(1, num_classes + 1).expand_as(scores).reshape(-1)
    scores = scores.reshape(-1)
    cand = torch.where(scores > cfg.score_thresh)[0]
    keep = _batched_nms_coordinate_trick(boxes[cand], scores[cand], labels[cand], cfg.nms_iou)
    keep = cand[keep][: cfg.max_per_image]
    return boxes[keep], scores[keep], labels[keep]


def overlapping(n: int, seed: int) -> torch.Tensor:
    """Heavily overlapping boxes: tight clusters of about 10."""
    g = torch.Generator().manual_seed(seed)
    clusters = n // 10
    centre = (torch.rand(clusters, 2, generator=g) * 150 + 25)[
        torch.randint(clusters, (n,), generator=g)
    ]
    centre = centre + torch.randn(n, 2, generator=g) * 3
    wh = 30 + torch.rand(n, 2, generator=g) * 10
    return torch.cat([centre - wh / 2, centre + wh / 2], dim=1)


def case(kind: str):
    """(boxes (N, 4) shared by the classes, scores (N, K)) of one adversarial kind."""
    g = torch.Generator().manual_seed(11)
    if kind == "random":
        return clustered_boxes(400, seed=12), torch.rand(400, 6, generator=g)
    if kind == "overlapping":
        return overlapping(400, seed=13), torch.rand(400, 6, generator=g)
    if kind == "ties":  # four score values: the cut falls inside a tie group
        return clustered_boxes(400, seed=14), (
            torch.rand(400, 6, generator=g) * 4
        ).floor() / 4 + 0.1
    if kind == "few_kept":  # one box per class survives in the top candidates: fallback
        boxes = torch.tensor([[10.0, 10.0, 60.0, 60.0]]).repeat(400, 1)
        boxes[300:] = overlapping(100, seed=15)  # lower scores: kept by the full NMS only
        scores = torch.rand(400, 6, generator=g)
        scores[300:] *= 0.01
        return boxes, scores
    raise ValueError(kind)


@pytest.mark.parametrize("device_path", [False, True])
@pytest.mark.parametrize("kind", ["random", "overlapping", "ties", "few_kept"])
def test_top_candidates_nms_equals_full_nms(kind, device_path, monkeypatch):
    monkeypatch.setattr(postprocess, "FINAL_NMS_CANDIDATES", 150)
    boxes, scores = case(kind)
    cfg = make_test_cfg(score_thresh=0.001, nms_iou=0.5, max_per_image=60)
    stats: dict[str, int] = {}
    with device_code_path() if device_path else contextlib.nullcontext():
        got = multiclass_nms(boxes, scores, (200, 200), cfg, stats=stats)
    expected = full_nms(boxes, scores, (200, 200), cfg)
    usable = int((scores > 0.001).sum())
    assert usable > 150  # the cut applies
    assert int(stats["score_pairs"]) == usable
    if kind == "few_kept":
        assert stats["nms_inputs"] == usable  # fewer than max_per_image in the top: all of them
    else:
        assert 150 <= stats["nms_inputs"] < usable
    if kind == "ties":
        assert stats["nms_inputs"] > 150  # the whole tie group at the cut came in
    assert len(got[0]) == len(expected[0]) == 60
    if device_path:  # the same nms kernel on the same candidates in the same order
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a, b)
    else:  # torchvision's per-class loop on the CPU orders ties its own way
        rows = sorted(zip(got[1].tolist(), got[2].tolist(), got[0].tolist(), strict=True))
        want = [expected[1].tolist(), expected[2].tolist(), expected[0].tolist()]
        assert rows == sorted(zip(*want, strict=True))


def test_top_candidates_include_every_tie_at_the_cut():
    scores = torch.tensor([0.9, 0.5, 0.7, 0.5, 0.5, 0.2, 0.5, 0.95])
    usable = torch.ones(8, dtype=torch.bool)
    usable[6] = False
    assert final_nms_candidates(scores, usable, 3).tolist() == [0, 2, 7]
    assert final_nms_candidates(scores, usable, 4).tolist() == [0, 1, 2, 3, 4, 7]  # ties at 0.5
    assert final_nms_candidates(scores, usable, 20).tolist() == [0, 1, 2, 3, 4, 5, 7]
