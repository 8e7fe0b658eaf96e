"""Max-IoU assignment and the random / positive RoI samplers: float64 references, per-image
references of the batched steps, sampling frequencies, synchronisations and launches."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from drcnn.config import SamplerConfig, require_same_names
from drcnn.models.sampling import (
    SAMPLERS,
    assign_candidates,
    assign_max_iou,
    build_sampler,
    draw_per_group,
    positive_sample,
    random_sample,
    sample_rois,
)
from drcnn.models.sync_audit import SyncAudit

# kernel launches of one batch's sample_rois (random sampler, gt added), whatever its size:
# 63 counted on the CPU along the device path, about half of them the IoU matrix and its
# reduction
LAUNCHES_PER_BATCH = 65


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


def one_image(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A sampler's batch arguments for one image's labels."""
    return labels, torch.zeros_like(labels), 1


def test_draw_per_group_hand_worked():
    """Group 0 has 3 rows and quota 2, group 1 has 2 rows and quota 5 (all kept), group 2 has
    one row and quota 0."""
    group = torch.tensor([1, 2, 0, 0, 1, 0])
    for seed in range(20):
        torch.manual_seed(seed)
        keep = draw_per_group(group, torch.tensor([3, 2, 1]), torch.tensor([2, 5, 0]))
        assert keep.dtype == torch.bool and keep.shape == group.shape
        assert keep[[0, 4]].all() and not keep[1]
        assert keep[[2, 3, 5]].sum().item() == 2


def test_batched_assignment_equals_per_image_assignment():
    """Three images (one without gt) concatenated: each row is matched among its own image's
    gts only, with exactly the per-image IoU, label and matched gt box."""
    g = torch.Generator().manual_seed(5)
    gts = [random_boxes(4, g), random_boxes(0, g), random_boxes(2, g)]
    labels = [torch.tensor([3, 1, 2, 5]), torch.zeros(0, dtype=torch.int64), torch.tensor([4, 6])]
    props = [torch.cat([jitter(b, 6, 0.3, g), random_boxes(9, g)]) for b in gts]
    batch = assign_candidates(props, gts, labels, 0.5, add_gt=True)
    assert batch.counts == [len(p) + len(b) for p, b in zip(props, gts, strict=True)]
    expected_image = torch.arange(3).repeat_interleave(torch.tensor(batch.counts))
    assert torch.equal(batch.image, expected_image)
    for i, rows in enumerate(torch.arange(len(batch.boxes)).split(batch.counts)):
        boxes = torch.cat([props[i], gts[i]])
        alone = assign_max_iou(boxes, gts[i], labels[i], 0.5)
        assert torch.equal(batch.boxes[rows], boxes)
        assert batch.is_gt[rows].tolist() == [False] * len(props[i]) + [True] * len(gts[i])
        assert torch.equal(batch.assignment.labels[rows], alone.labels)
        assert torch.equal(batch.assignment.max_iou[rows], alone.max_iou)
        positive = alone.labels > 0
        if len(gts[i]):
            assert positive.sum() > 4 and (~positive).sum() > 4
            matched = gts[i][alone.matched_idxs[positive]]
            assert torch.equal(batch.matched_gt[rows][positive], matched)
        else:  # no gt: all background, IoU 0
            assert not positive.any() and (alone.max_iou == 0).all()


@pytest.mark.parametrize(("num_pos", "expected_pos"), [(300, 128), (20, 20)])
def test_random_sample_positive_fraction(num_pos, expected_pos):
    labels = torch.cat([torch.randint(1, 4, (num_pos,)), torch.zeros(1000, dtype=torch.int64)])
    labels = labels[torch.randperm(len(labels))]
    keep = random_sample(*one_image(labels), num=512, pos_fraction=0.25)
    assert keep.sum().item() == 512
    assert (labels[keep] > 0).sum().item() == expected_pos  # fewer positives: negatives fill up


def test_random_sample_fills_each_image_of_a_batch_to_its_own_quota():
    """Image 0: 40 positives, 300 negatives; image 1: 3 positives, 10 negatives (fewer than
    num: all taken); image 2: only negatives; the ignored rows (label -1, the RPN's) never."""
    parts = [(40, 300, 5), (3, 10, 200), (0, 100, 0)]
    labels = torch.cat([torch.tensor([2] * p + [0] * n + [-1] * x) for p, n, x in parts])
    image = torch.cat([torch.full((p + n + x,), i) for i, (p, n, x) in enumerate(parts)])
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    labels, image = labels[order], image[order]
    for seed in range(5):
        torch.manual_seed(seed)
        keep = random_sample(labels, image, 3, num=64, pos_fraction=0.25)
        for i, expected in enumerate([(16, 48), (3, 10), (0, 64)]):
            mine = keep & (image == i)
            assert ((labels[mine] > 0).sum().item(), (labels[mine] == 0).sum().item()) == expected
        assert not keep[labels < 0].any()


def test_random_sample_draws_each_row_with_equal_chance():
    """25 positives with quota 5: over 2000 draws each is taken about 400 times (binomial sd
    17.9; the bound is 5 sd), and so on for the negatives (40 of them, quota 15 each draw)."""
    labels = torch.tensor([1] * 25 + [0] * 40)
    torch.manual_seed(0)
    taken = torch.stack(
        [random_sample(*one_image(labels), num=20, pos_fraction=0.25) for _ in range(2000)]
    ).sum(dim=0)
    assert ((taken[:25] - 400).abs() < 5 * 17.9).all()
    assert ((taken[25:] - 750).abs() < 5 * 21.7).all()


def test_positive_sample_all_or_random_subset():
    labels = torch.zeros(200, dtype=torch.int64)
    pos = torch.randperm(200)[:30]
    labels[pos] = 2
    assert torch.equal(positive_sample(*one_image(labels), num=512), labels > 0)
    draws = [positive_sample(*one_image(labels), num=10) for _ in range(5)]
    for d in draws:
        assert d.sum().item() == 10 and (labels[d] > 0).all()
    assert len({tuple(d.tolist()) for d in draws}) > 1  # random, not the first 10


def test_cls_samples_keep_fraction_and_include_gt():
    g = torch.Generator().manual_seed(2)
    gt = random_boxes(3, g)
    gt_labels = torch.tensor([1, 2, 3])
    sampler = partial(random_sample, num=64, pos_fraction=0.25)
    negatives = random_boxes(200, g) + 300  # far from every gt
    # Image 0, many positives: exactly 16 of the 64 samples are positive.
    # Image 1, few positives: all of them are taken, and every gt box is among the samples.
    many, few = sample_rois(
        [
            torch.cat([jitter(gt, 30, 0.05, g), negatives]),
            torch.cat([jitter(gt, 2, 0.05, g), negatives]),
        ],
        [gt, gt],
        [gt_labels, gt_labels],
        0.5,
        sampler,
        True,
    )
    assert len(many.boxes) == 64 and (many.labels > 0).sum().item() == 16
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
    [out] = sample_rois(
        [proposals], [gt], [torch.tensor([4, 7])], 0.5, partial(positive_sample, num=num), False
    )
    assert not out.is_gt.any() and (out.labels > 0).all()
    rows = {i for i, p in enumerate(proposals) for b in out.boxes if torch.equal(p, b)}
    if num >= len(expected):
        assert rows == expected
    else:
        assert len(out.boxes) == num and rows <= expected


def test_sampling_a_batch_waits_once_and_launches_the_same_ops_for_any_batch_size():
    """Assignment and sampling of a whole batch: one wait for the device (the kept count of
    each image, for the split) and a kernel-launch count that does not grow with the images
    (issue #13: the per-image loop before made about 30 launches per image and stage)."""
    launches = []
    for num_images in (2, 8):
        g = torch.Generator().manual_seed(9)
        gts = [random_boxes(3, g) for _ in range(num_images)]
        labels = [torch.tensor([1, 2, 3]) for _ in range(num_images)]
        props = [torch.cat([jitter(b, 10, 0.3, g), random_boxes(50, g)]) for b in gts]
        sampler = partial(random_sample, num=32, pos_fraction=0.25)
        with SyncAudit() as audit:
            samples = sample_rois(props, gts, labels, 0.5, sampler, add_gt=True)
        assert len(samples) == num_images and all(len(s.boxes) == 32 for s in samples)
        assert audit.total == 1 and audit.counts["tolist"] == 1, audit.report()
        launches.append(audit.launches)
    assert launches[0] == launches[1] <= LAUNCHES_PER_BATCH


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
    """Same seed, same labels: the built sampler picks exactly the rows the function picks
    with the entry's arguments (so configs that moved to typed entries train bit-identically)."""
    labels = torch.zeros(400, dtype=torch.int64)
    labels[torch.randperm(400, generator=torch.Generator().manual_seed(4))[:90]] = 3
    torch.manual_seed(11)
    built = build_sampler(entry)(*one_image(labels))
    torch.manual_seed(11)
    expected = reference(*one_image(labels))
    assert torch.equal(built, expected)
    if not (entry.type == "positive" and entry.num >= 90):  # else every positive, no choice
        torch.manual_seed(12)
        assert not torch.equal(build_sampler(entry)(*one_image(labels)), expected)  # seed


def test_sampler_table_is_checked_against_the_config_names():
    require_same_names(SAMPLERS, ("random", "positive"), "SAMPLERS")  # the table as shipped
    with pytest.raises(RuntimeError, match=r"SAMPLERS: names .*'iou_balanced'"):
        require_same_names(SAMPLERS, ("random", "positive", "iou_balanced"), "SAMPLERS")
