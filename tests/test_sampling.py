"""Max-IoU assignment and the random / positive RoI samplers against float64 references."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from drcnn.config import SamplerConfig, require_same_names
from drcnn.models.sampling import (
    SAMPLERS,
    assign_max_iou,
    build_sampler,
    positive_sample,
    random_sample,
    sample_rois,
)


def random_boxes(n: int, generator: torch.Generator, size: float = 100.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator) * size
    wh = torch.rand(n, 2, generator=generator) * size / 2 + 2
    return torch.cat([xy, xy + wh], dim=1)


def jitter(boxes: torch.Tensor, n: int, scale: float, generator: torch.Generator) -> torch.Tensor:
    """``n`` copies of each box with corners moved by up to ``scale`` x its size."""
    rep = boxes.repeat_interleave(n, dim=0)
    wh = (rep[:, 2:] - rep[:, :2]).repeat(1, 2)
    return rep + (torch.rand(rep.shape, generator=generator) * 2 - 1) * scale * wh


def iou64(a: list[float], b: list[float]) -> float:
    """Hand-written float64 IoU of two xyxy boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def test_assign_max_iou_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    gt = random_boxes(4, g)
    labels = torch.tensor([3, 1, 2, 5])
    proposals = torch.cat([jitter(gt, 10, 0.3, g), random_boxes(30, g)])
    out = assign_max_iou(proposals, gt, labels, 0.5)
    for i, p in enumerate(proposals.double().tolist()):
        ious = [iou64(p, b) for b in gt.double().tolist()]
        best = max(range(len(ious)), key=ious.__getitem__)
        assert out.max_iou[i].item() == pytest.approx(ious[best], abs=1e-6)
        expected = labels[best].item() if ious[best] >= 0.5 else 0
        assert out.labels[i].item() == expected
        # background: index 0 (torchvision's Matcher, then clamp(min=0))
        assert out.matched_idxs[i].item() == (best if expected else 0)
    assert (out.labels > 0).sum() > 10 and (out.labels == 0).sum() > 10  # both kinds tested


def test_assign_without_gt_is_all_background():
    g = torch.Generator().manual_seed(1)
    out = assign_max_iou(
        random_boxes(7, g), torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), 0.5
    )
    assert out.labels.tolist() == [0] * 7 and out.max_iou.tolist() == [0.0] * 7


@pytest.mark.parametrize(("num_pos", "expected_pos"), [(300, 128), (20, 20)])
def test_random_sample_positive_fraction(num_pos, expected_pos):
    labels = torch.cat([torch.randint(1, 4, (num_pos,)), torch.zeros(1000, dtype=torch.int64)])
    labels = labels[torch.randperm(len(labels))]
    keep = random_sample(labels, 512, 0.25)
    assert keep.unique().numel() == 512
    assert (labels[keep] > 0).sum().item() == expected_pos  # fewer positives: negatives fill up


def test_positive_sample_all_or_random_subset():
    labels = torch.zeros(200, dtype=torch.int64)
    pos = torch.randperm(200)[:30]
    labels[pos] = 2
    assert positive_sample(labels, 512).tolist() == pos.sort().values.tolist()
    draws = [positive_sample(labels, 10) for _ in range(5)]
    for d in draws:
        assert d.unique().numel() == 10 and set(d.tolist()) <= set(pos.tolist())
    assert len({tuple(d.tolist()) for d in draws}) > 1  # random, not the first 10


def test_cls_samples_keep_fraction_and_include_gt():
    g = torch.Generator().manual_seed(2)
    gt = random_boxes(3, g)
    gt_labels = torch.tensor([1, 2, 3])
    sampler = partial(random_sample, num=64, pos_fraction=0.25)
    negatives = random_boxes(200, g) + 300  # far from every gt
    # Many positives: exactly 16 of the 64 samples are positive.
    many = sample_rois(
        torch.cat([jitter(gt, 30, 0.05, g), negatives]), gt, gt_labels, 0.5, sampler, True
    )
    assert len(many.boxes) == 64 and (many.labels > 0).sum().item() == 16
    # Few positives: all of them are taken, and every gt box is among the samples.
    few = sample_rois(
        torch.cat([jitter(gt, 2, 0.05, g), negatives]), gt, gt_labels, 0.5, sampler, True
    )
    assert few.is_gt.sum().item() == 3
    assert torch.equal(few.boxes[few.is_gt], gt) and torch.equal(few.labels[few.is_gt], gt_labels)
    assert (few.labels > 0).sum().item() == 9
    pos = few.labels > 0
    assert torch.equal(few.gt_boxes[pos], gt[few.labels[pos] - 1])


@pytest.mark.parametrize("num", [512, 5])
def test_reg_samples_are_the_positive_regression_proposals(num):
    g = torch.Generator().manual_seed(3)
    gt = random_boxes(2, g)
    proposals = torch.cat([jitter(gt, 12, 0.25, g), random_boxes(40, g)])
    ious = [max(iou64(p, b) for b in gt.tolist()) for p in proposals.double().tolist()]
    expected = {i for i, v in enumerate(ious) if v >= 0.5}
    assert 5 < len(expected) < 24
    out = sample_rois(
        proposals, gt, torch.tensor([4, 7]), 0.5, partial(positive_sample, num=num), add_gt=False
    )
    assert not out.is_gt.any() and (out.labels > 0).all()
    rows = {i for i, p in enumerate(proposals) for b in out.boxes if torch.equal(p, b)}
    if num >= len(expected):
        assert rows == expected
    else:
        assert len(out.boxes) == num and rows <= expected


@pytest.mark.parametrize(
    ("entry", "reference"),
    [
        (
            SamplerConfig("random", 64, 0.25, True),
            partial(random_sample, num=64, pos_fraction=0.25),
        ),
        (
            SamplerConfig("random", 300, 0.5, False),
            partial(random_sample, num=300, pos_fraction=0.5),
        ),
        (SamplerConfig("positive", 512, None, False), partial(positive_sample, num=512)),
        (SamplerConfig("positive", 7, None, True), partial(positive_sample, num=7)),
    ],
    ids=["random-64", "random-300", "positive-512", "positive-7"],
)
def test_build_sampler_draws_what_the_sampler_functions_draw(entry, reference):
    """Same seed, same labels: the built sampler picks exactly the indices the function picks
    with the entry's arguments (so configs that moved to typed entries train bit-identically)."""
    labels = torch.zeros(400, dtype=torch.int64)
    labels[torch.randperm(400, generator=torch.Generator().manual_seed(4))[:90]] = 3
    torch.manual_seed(11)
    built = build_sampler(entry)(labels)
    torch.manual_seed(11)
    expected = reference(labels)
    assert torch.equal(built, expected)
    if not (entry.type == "positive" and entry.num >= 90):  # else every positive, no choice
        torch.manual_seed(12)
        assert not torch.equal(build_sampler(entry)(labels), expected)  # the seed matters


def test_sampler_table_is_checked_against_the_config_names():
    require_same_names(SAMPLERS, ("random", "positive"), "SAMPLERS")  # the table as shipped
    with pytest.raises(RuntimeError, match=r"SAMPLERS: names .*'iou_balanced'"):
        require_same_names(SAMPLERS, ("random", "positive", "iou_balanced"), "SAMPLERS")
