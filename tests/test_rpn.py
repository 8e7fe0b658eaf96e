"""RPN: two proposal sets from one set of candidates, torchvision parity, the box losses, and
mmdetection's anchor convention (strides, unrounded anchors, padding, border, min_pos_iou)."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import box_iou, clip_boxes_to_image, remove_small_boxes

from drcnn.config import load_config
from drcnn.errors import DrcnnError
from drcnn.models.rpn import DecoupledRPN, ProposalSets, build_rpn, mmdet_anchor_labels

CHANNELS = 16
IMAGE_SIZES = [(128, 128), (112, 96)]


def make_rpn(*overrides: str) -> DecoupledRPN:
    torch.manual_seed(0)
    cfg = load_config(
        None,
        [
            "model.rpn.min_size=0.001",  # torchvision's fixed value, for the parity checks
            "model.rpn.post_nms_top_n_train=5000",
            "model.rpn.pre_nms_top_n_train=5000",
            *overrides,
        ],
    )
    rpn = build_rpn(cfg, CHANNELS)
    for param in rpn.head.parameters():  # spread objectness and deltas beyond the 0.01 init
        torch.nn.init.normal_(param, std=0.05)
    return rpn


def inputs():
    generator = torch.Generator().manual_seed(1)
    images = ImageList(torch.zeros(2, 3, 128, 128), IMAGE_SIZES)
    features = {
        name: torch.randn(2, CHANNELS, 128 // stride, 128 // stride, generator=generator)
        for name, stride in zip(("0", "1", "2", "3", "pool"), (4, 8, 16, 32, 64), strict=True)
    }
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [40.0, 30.0, 120.0, 90.0]])},
        {"boxes": torch.tensor([[5.0, 5.0, 50.0, 40.0]])},
    ]
    return images, features, targets


def torchvision_rpn(rpn: DecoupledRPN, nms_thresh: float) -> RegionProposalNetwork:
    """torchvision's RPN sharing ``rpn``'s head and anchors, with one NMS threshold."""
    reference = RegionProposalNetwork(
        rpn.anchor_generator,
        rpn.head,
        0.7,
        0.3,
        256,
        0.5,
        rpn._pre_nms_top_n,
        rpn._post_nms_top_n,
        nms_thresh,
    )
    reference.train(rpn.training)
    return reference


def pairwise_iou(boxes: torch.Tensor) -> torch.Tensor:
    """IoU of every box with every other box (zero on the diagonal)."""
    return box_iou(boxes, boxes).fill_diagonal_(0)


def test_two_sets_equal_torchvision_at_each_threshold():
    rpn = make_rpn("model.rpn.nms_thresh=[0.7,0.85]").train()
    images, features, targets = inputs()
    proposals, _ = rpn(images, features, targets)
    assert isinstance(proposals, ProposalSets)
    for boxes, thresh in ((proposals.cls, 0.7), (proposals.reg, 0.85)):
        expected, _ = torchvision_rpn(rpn, thresh)(images, features, targets)
        for ours, ref in zip(boxes, expected, strict=True):
            torch.testing.assert_close(ours, ref)


def test_candidates_of_a_batch_are_each_image_clipped_and_filtered_alone():
    """``select_candidates`` clips and filters every image at once: per image, exactly the
    boxes, scores and levels of torchvision's per-image steps (``clip_boxes_to_image``,
    ``remove_small_boxes``, then the score threshold) on the same top-k."""
    rpn = make_rpn("model.rpn.min_size=3.0", "model.rpn.score_thresh=0.3").train()
    g = torch.Generator().manual_seed(4)
    shapes, per_level = [(60, 80), (100, 50), (90, 70)], [40, 25]
    xy = torch.rand(3, 65, 2, generator=g) * 100 - 10  # some beyond the image
    proposals = torch.cat([xy, xy + torch.rand(3, 65, 2, generator=g) * 30], dim=2)
    objectness = torch.randn(3 * 65, 1, generator=g)
    got = rpn.select_candidates(proposals, objectness, shapes, per_level)

    top = rpn._get_top_n_idx(objectness.reshape(3, -1), per_level)
    levels = torch.cat([torch.full((n,), i) for i, n in enumerate(per_level)])
    for i, (shape, cand) in enumerate(zip(shapes, got, strict=True)):
        boxes = clip_boxes_to_image(proposals[i, top[i]], shape)
        scores = objectness.reshape(3, -1)[i, top[i]].sigmoid()
        keep = remove_small_boxes(boxes, 3.0)
        keep = keep[scores[keep] >= 0.3]
        assert 5 < len(keep) < 60
        assert torch.equal(cand.boxes, boxes[keep]) and torch.equal(cand.scores, scores[keep])
        assert torch.equal(cand.levels, levels[top[i]][keep])


def test_regression_set_keeps_more_overlapping_boxes():
    rpn = make_rpn("model.rpn.nms_thresh=[0.7,0.85]").train()
    images, features, targets = inputs()
    proposals, _ = rpn(images, features, targets)
    for cls_boxes, reg_boxes in zip(proposals.cls, proposals.reg, strict=True):
        assert len(reg_boxes) > len(cls_boxes)
        cls_iou, reg_iou = pairwise_iou(cls_boxes), pairwise_iou(reg_boxes)
        # nearest-neighbour overlap is higher, and many more pairs overlap above 0.7
        assert reg_iou.max(1).values.mean() > cls_iou.max(1).values.mean() + 0.05
        assert (reg_iou > 0.7).sum() > 2 * (cls_iou > 0.7).sum()


def test_each_set_capped_per_image():
    rpn = make_rpn("model.rpn.nms_thresh=[0.7,0.85]", "model.rpn.post_nms_top_n_train=50").train()
    images, features, targets = inputs()
    proposals, _ = rpn(images, features, targets)
    assert [len(b) for b in proposals.cls] == [50, 50]
    assert [len(b) for b in proposals.reg] == [50, 50]


def test_single_threshold_and_eval_give_one_list():
    rpn = make_rpn(
        "model.rpn.nms_thresh=0.6",
        "model.rpn.test_nms_thresh=0.5",
        "model.rpn.post_nms_top_n_test=40",
    )
    images, features, targets = inputs()
    train_boxes, _ = rpn.train()(images, features, targets)
    assert isinstance(train_boxes, list) and not isinstance(train_boxes, ProposalSets)
    expected, _ = torchvision_rpn(rpn, 0.6)(images, features, targets)
    for ours, ref in zip(train_boxes, expected, strict=True):
        torch.testing.assert_close(ours, ref)

    rpn = rpn.eval()
    eval_boxes, losses = rpn(images, features)
    assert losses == {}
    expected, _ = torchvision_rpn(rpn, 0.5)(images, features)
    assert [len(b) for b in eval_boxes] == [40, 40]
    for ours, ref in zip(eval_boxes, expected, strict=True):
        torch.testing.assert_close(ours, ref)


SMOOTH_L1_TORCHVISION = "model.rpn.loss_bbox={type: smooth_l1, beta: 0.1111111111111111}"


class DrawnByDrcnn:
    """torchvision's ``fg_bg_sampler`` interface (per-image positive and negative masks) drawing
    what drcnn's RPN draws from the same random state."""

    def __init__(self, rpn):
        self.rpn = rpn

    def __call__(self, labels):
        label = torch.stack(labels)
        keep = self.rpn.sample_anchors(label)
        return list(keep & (label == 1)), list(keep & (label == 0))


def test_smooth_l1_losses_equal_torchvision():
    """torchvision's RPN given the anchors drcnn samples (the same sizes, drawn batched rather
    than by its per-image ``randperm``): the same losses."""
    rpn = make_rpn(SMOOTH_L1_TORCHVISION).train()
    images, features, targets = inputs()
    torch.manual_seed(5)
    _, losses = rpn(images, features, targets)
    reference = torchvision_rpn(rpn, 0.7)
    drawn = DrawnByDrcnn(rpn)
    reference.fg_bg_sampler = drawn
    torch.manual_seed(5)  # same anchor sampling
    _, expected = reference(images, features, targets)
    assert set(losses) == {"rpn.loss_cls", "rpn.loss_bbox"}
    torch.testing.assert_close(losses["rpn.loss_cls"], expected["loss_objectness"])
    torch.testing.assert_close(losses["rpn.loss_bbox"], expected["loss_rpn_box_reg"])
    # the sizes of torchvision's own sampler: 256 per image, at most half positive
    labels, _ = reference.assign_targets_to_anchors(
        rpn.anchor_generator(images, list(features.values())), targets
    )
    pos, neg = drawn(labels)
    for p, n, label in zip(pos, neg, labels, strict=True):
        assert p.sum() == min(128, (label == 1).sum()) and p.sum() + n.sum() == 256


def sample_all(labels, image, num_images):
    """Stand-in sampler: every positive and every negative anchor is sampled."""
    return labels >= 0


def smooth_l1_64(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Elementwise smooth L1 written out: 0.5 x^2 / beta below beta, |x| - beta / 2 above."""
    x = x.abs()
    return torch.where(x < beta, 0.5 * x * x / beta, x - 0.5 * beta)


@pytest.mark.parametrize(
    ("entry", "elementwise"),
    [
        ("{type: l1}", torch.abs),
        ("{type: smooth_l1, beta: 1.0}", lambda x: smooth_l1_64(x, 1.0)),
        ("{type: smooth_l1, beta: 0.05}", lambda x: smooth_l1_64(x, 0.05)),
    ],
)
def test_box_loss_is_sum_over_positives_per_sampled_anchor(entry, elementwise):
    rpn = make_rpn(f"model.rpn.loss_bbox={entry}").train()
    rpn.sampler = sample_all
    images, features, targets = inputs()
    _, losses = rpn(images, features, targets)

    # float64 re-computation from the head outputs and torchvision's targets
    maps = list(features.values())
    anchors = rpn.anchor_generator(images, maps)
    labels, matched = rpn.assign_targets_to_anchors(anchors, targets)
    logits, deltas = rpn.head(maps)
    flat_deltas = torch.cat(
        [
            d.view(2, -1, 4, d.shape[-2], d.shape[-1]).permute(0, 3, 4, 1, 2).reshape(2, -1, 4)
            for d in deltas
        ],
        dim=1,
    ).double()
    flat_logits = torch.cat([lg.permute(0, 2, 3, 1).reshape(2, -1) for lg in logits], 1).double()
    targets64 = torch.stack(rpn.box_coder.encode(matched, anchors)).double()
    label = torch.stack(labels).double()
    pos, sampled = label == 1, label >= 0
    expected_bbox = elementwise(flat_deltas - targets64)[pos].sum() / sampled.sum()
    expected_cls = torch.nn.functional.binary_cross_entropy_with_logits(
        flat_logits[sampled], label[sampled]
    )
    assert pos.sum() > 0
    torch.testing.assert_close(losses["rpn.loss_bbox"].double(), expected_bbox, rtol=1e-5, atol=0)
    torch.testing.assert_close(losses["rpn.loss_cls"].double(), expected_cls, rtol=1e-5, atol=0)


def test_images_without_boxes_train():
    rpn = make_rpn("model.rpn.nms_thresh=[0.7,0.85]").train()
    images, features, _ = inputs()
    empty = [{"boxes": torch.zeros(0, 4)} for _ in range(2)]
    proposals, losses = rpn(images, features, empty)
    assert losses["rpn.loss_bbox"].item() == 0.0
    assert torch.isfinite(losses["rpn.loss_cls"])
    losses["rpn.loss_cls"].backward()
    assert all(len(b) > 0 for b in proposals.reg)


@pytest.mark.parametrize("value", ["[0.7,0.85,0.9]", "1.5"])
def test_bad_nms_threshold_is_rejected(value):
    with pytest.raises(DrcnnError, match=r"model\.rpn\.nms_thresh"):
        make_rpn(f"model.rpn.nms_thresh={value}")


# ---- mmdetection's anchor convention -------------------------------------------------------------
MMDET = ("model.rpn.anchor_convention=mmdet", "model.rpn.min_pos_iou=0.3")


def mmdet_rpn(allowed_border: int = -1) -> DecoupledRPN:
    return make_rpn(*MMDET, f"model.rpn.allowed_border={allowed_border}")


def grid_features(padded: tuple[int, int]) -> list[torch.Tensor]:
    """P2..P6 maps of a ``padded`` batch as the FPN gives them (ceil halving per level)."""
    h, w = padded[0] // 4, padded[1] // 4
    maps = []
    for _ in range(5):
        maps.append(torch.zeros(1, CHANNELS, h, w))
        h, w = -(-h // 2), -(-w // 2)
    return maps


def mmdet_anchors_64(maps: list[torch.Tensor]) -> torch.Tensor:
    """mmdetection 2.x's AnchorGenerator written out in float64: scale 8 x stride, centre at
    (column, row) x stride, half sizes 4 * stride / sqrt(r) and 4 * stride * sqrt(r)."""
    rows = []
    for fmap, stride in zip(maps, (4, 8, 16, 32, 64), strict=True):
        for y in range(fmap.shape[-2]):
            for x in range(fmap.shape[-1]):
                for ratio in (0.5, 1.0, 2.0):
                    w, h = 8 * stride / ratio**0.5, 8 * stride * ratio**0.5
                    cx, cy = x * stride, y * stride
                    rows.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    return torch.tensor(rows, dtype=torch.float64)


def test_mmdet_anchors_use_nominal_strides_and_are_not_rounded():
    padded = (800, 96)  # P6 is 13 rows: torchvision's stride there is 800 // 13 = 61, not 64
    maps = grid_features(padded)
    images = ImageList(torch.zeros(1, 3, *padded), [padded])
    ours = mmdet_rpn().anchor_generator(images, maps)[0]
    torch.testing.assert_close(ours.double(), mmdet_anchors_64(maps), rtol=0, atol=1e-4)
    torchvision_anchors = make_rpn().anchor_generator(images, maps)[0]
    assert torchvision_anchors.shape == ours.shape
    assert torchvision_anchors[-1, 1] + torchvision_anchors[-1, 3] == 2 * 12 * 61  # last P6 row
    assert torchvision_anchors[0, 2] == 23 and ours[0, 2] == pytest.approx(16 * 2**0.5, abs=1e-5)


def labels_of(rpn: DecoupledRPN, images: ImageList, maps: list[torch.Tensor], targets):
    anchors = rpn.anchor_generator(images, maps)
    grids = [tuple(m.shape[-2:]) for m in maps]
    labels, matched = rpn.label_anchors(anchors, targets, images.image_sizes, grids)
    return anchors[0], labels, matched


def test_anchors_in_batch_padding_are_ignored():
    padded = (128, 128)
    maps = [m.expand(2, -1, -1, -1) for m in grid_features(padded)]
    # image 1 is 70 x 90: mmdetection pads it to 96 x 96 by itself, the rest is batch padding
    images = ImageList(torch.zeros(2, 3, *padded), [(128, 128), (70, 90)])
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0]])}] * 2
    anchors, labels, _ = labels_of(mmdet_rpn(), images, maps, targets)
    centre = (anchors[:, :2] + anchors[:, 2:]) / 2
    in_pad = (centre[:, 1] > 96 - 1) | (centre[:, 0] > 96 - 1)  # cell origin at or past 96
    assert in_pad.sum() > 0 and (labels[1][in_pad] == -1).all()
    # the same anchors in the full-size image, and every anchor of image 1 inside 96 x 96
    # (also those past its 70 x 90 content), are labelled as usual: far ones negative
    assert (labels[0] != -1).sum() > (labels[1] != -1).sum()
    far_inside = ~in_pad & (box_iou(anchors, targets[1]["boxes"])[:, 0] < 0.3)
    assert (labels[1][far_inside] == 0).all()
    assert (labels[1][(centre[:, 1] > 70) & ~in_pad] == 0).any()
    # torchvision's convention labels the padding anchors too
    _, tv_labels, _ = labels_of(make_rpn(), images, maps, targets)
    assert (tv_labels[1][in_pad] == 0).any()


def test_allowed_border_zero_ignores_anchors_crossing_the_image():
    padded = (128, 128)
    maps = grid_features(padded)
    images = ImageList(torch.zeros(1, 3, *padded), [(112, 120)])
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0]])}]
    anchors, labels, _ = labels_of(mmdet_rpn(0), images, maps, targets)
    crossing = (anchors[:, :2] < 0).any(1) | (anchors[:, 2] >= 120) | (anchors[:, 3] >= 112)
    assert (labels[0][crossing] == -1).all()
    assert (labels[0][~crossing] == 0).sum() > 0 and (labels[0][~crossing] == 1).sum() > 0
    _, kept, _ = labels_of(mmdet_rpn(-1), images, maps, targets)
    assert (kept[0][crossing] == 0).sum() > 0  # allowed_border -1 keeps them


def test_a_batch_is_labelled_at_once_as_each_image_alone(monkeypatch):
    """The usable-anchor mask (about 40 small ops, kernel launches on a GPU) is made once per
    image size in a batch; the batch, labelled at once (gts padded to the most of any image),
    gives every image the labels and matched boxes of :func:`mmdet_anchor_labels` on that image
    alone (no gt: its usable anchors negative, matched to zeros)."""
    maps = grid_features((128, 128))
    sizes = [(112, 120), (64, 128), (112, 120), (112, 120)]
    images = ImageList(torch.zeros(len(sizes), 3, 128, 128), sizes)
    g = torch.Generator().manual_seed(3)
    targets = []
    for count in (2, 1, 0, 3):
        xy = torch.rand(count, 2, generator=g) * 60
        targets.append(
            {"boxes": torch.cat([xy, xy + 10 + torch.rand(count, 2, generator=g) * 40], 1)}
        )
    rpn = mmdet_rpn(0)
    calls = []
    made = DecoupledRPN.usable_anchors
    monkeypatch.setattr(
        DecoupledRPN, "usable_anchors", lambda self, *a: calls.append(a[1]) or made(self, *a)
    )
    _, labels, matched = labels_of(rpn, images, maps, targets)
    assert calls == [(112, 120), (64, 128)]
    anchors = rpn.anchor_generator(images, maps)[0]
    grids = [tuple(m.shape[-2:]) for m in maps]
    for size, target, lab, mat in zip(sizes, targets, labels, matched, strict=True):
        usable = made(rpn, anchors, size, grids)
        gt = target["boxes"]
        if len(gt) == 0:
            assert torch.equal(lab, torch.where(usable, 0.0, -1.0)) and not mat.any()
            continue
        alone, best = mmdet_anchor_labels(box_iou(gt, anchors), usable, 0.7, 0.3, 0.3)
        assert torch.equal(lab, alone) and torch.equal(mat, gt[best])
    every = torch.cat(labels)
    assert (every == 1).sum() > 3 and (every == 0).any() and (every == -1).any()


def test_empty_image_labels_only_usable_anchors_negative():
    maps = grid_features((128, 128))
    images = ImageList(torch.zeros(1, 3, 128, 128), [(64, 128)])
    anchors, labels, matched = labels_of(mmdet_rpn(), images, maps, [{"boxes": torch.zeros(0, 4)}])
    usable = mmdet_rpn().usable_anchors(anchors, (64, 128), [tuple(m.shape[-2:]) for m in maps])
    assert usable.sum() < len(anchors)
    assert (labels[0][usable] == 0).all() and (labels[0][~usable] == -1).all()
    assert matched[0].shape == anchors.shape


@pytest.mark.parametrize(("best_iou", "positive"), [(0.25, False), (0.35, True)])
def test_low_quality_match_needs_min_pos_iou(best_iou, positive):
    iou = torch.tensor([[best_iou, 0.1, 0.0, best_iou]])  # a tie: both best anchors count
    labels, matched = mmdet_anchor_labels(iou, torch.ones(4, dtype=torch.bool), 0.7, 0.3, 0.3)
    expected = [1.0, 0.0, 0.0, 1.0] if positive else [0.0, 0.0, 0.0, 0.0]
    assert labels.tolist() == expected and matched.tolist() == [0, 0, 0, 0]


def test_low_quality_match_goes_to_that_gt_and_skips_unusable_anchors():
    iou = torch.tensor(
        [
            [0.80, 0.20, 0.00, 0.50],  # gt 0: anchor 0 positive (>= 0.7)
            [0.40, 0.10, 0.95, 0.00],  # gt 1: anchor 2 (0.95) lies in the padding
        ]
    )
    usable = torch.tensor([True, True, False, True])
    labels, matched = mmdet_anchor_labels(iou, usable, 0.7, 0.3, 0.3)
    # gt 1's best usable anchor is anchor 0 (0.40 >= 0.3): it becomes gt 1's, not gt 0's;
    # anchor 3's best IoU 0.5 is between the thresholds: ignored; anchor 2 is unusable
    assert labels.tolist() == [1.0, 0.0, -1.0, -1.0]
    assert matched[0] == 1


def test_an_anchor_that_several_gts_match_at_low_quality_goes_to_the_last():
    """mmdetection assigns the gts' best anchors in gt order, so of several gts whose best
    anchor is the same, the last one keeps it; an image's padding rows (``real_gt`` False)
    never take one, even at IoU 0 against an anchor whose best IoU is 0."""
    iou = torch.tensor(
        [
            [[0.10, 0.50, 0.00], [0.00, 0.20, 0.00], [0.00, 0.50, 0.35], [0.00, 0.00, 0.00]],
            [[0.60, 0.00, 0.00], [0.00, 0.00, 0.00], [0.00, 0.00, 0.00], [0.00, 0.00, 0.00]],
        ]
    )
    real = torch.tensor([[True, True, True, False], [True, False, False, False]])
    labels, matched = mmdet_anchor_labels(
        iou, torch.ones(2, 3, dtype=torch.bool), 0.7, 0.3, 0.3, real
    )
    # image 0: gts 0 and 2 both peak at anchor 1 (0.5), so gt 2 keeps it; gt 1's best (0.2)
    # is below min_pos_iou; anchor 2 (best 0.35) lies between the thresholds: ignored.
    # Image 1: gt 0 takes anchor 0; anchors 1 and 2 are background.
    assert labels.tolist() == [[0.0, 1.0, -1.0], [1.0, 0.0, 0.0]]
    assert matched[0, 1] == 2 and matched[1, 0] == 0


def test_tiny_gt_gets_no_anchor_under_the_floor_but_does_in_torchvision():
    maps = grid_features((128, 128))
    images = ImageList(torch.zeros(1, 3, 128, 128), [(128, 128)])
    targets = [{"boxes": torch.tensor([[40.0, 40.0, 46.0, 46.0], [10.0, 60.0, 80.0, 120.0]])}]
    anchors, labels, matched = labels_of(mmdet_rpn(), images, maps, targets)
    best = box_iou(targets[0]["boxes"], anchors).max(dim=1).values
    assert best[0] < 0.3 <= best[1]
    positives = labels[0] == 1
    assert positives.any() and not (matched[0][positives] == targets[0]["boxes"][0]).all(1).any()
    _, tv_labels, tv_matched = labels_of(make_rpn(), images, maps, targets)
    tv_pos = tv_labels[0] == 1
    assert (tv_matched[0][tv_pos] == targets[0]["boxes"][0]).all(1).any()


def test_mmdet_rpn_trains_and_the_settings_are_validated():
    rpn = mmdet_rpn(0).train()
    images, features, targets = inputs()
    _, losses = rpn(images, features, targets)
    assert losses["rpn.loss_bbox"] > 0 and torch.isfinite(losses["rpn.loss_cls"])
    with pytest.raises(DrcnnError, match=r"model\.rpn\.min_pos_iou"):
        make_rpn("model.rpn.min_pos_iou=0.3")  # torchvision convention takes none
    with pytest.raises(DrcnnError, match=r"model\.rpn\.allowed_border"):
        make_rpn(*MMDET)  # mmdet needs allowed_border
    with pytest.raises(DrcnnError, match=r"model\.rpn\.anchor_convention"):
        make_rpn("model.rpn.anchor_convention=detectron")


@pytest.mark.parametrize("convention", ["torchvision", "mmdet"])
def test_anchors_are_float32_and_made_once_per_batch_shape(convention, monkeypatch):
    """The RPN's anchors are the generator's float32 anchors also for bf16 features (bf16
    would round a coordinate near 1000 px to a multiple of 4 px), shared by the batch's images,
    and made again only for another batch shape or another inference mode."""
    rpn = mmdet_rpn() if convention == "mmdet" else make_rpn()
    generator = type(rpn.anchor_generator)
    made = []
    original = generator.forward
    monkeypatch.setattr(
        generator, "forward", lambda self, *a: made.append(a[1][0].shape) or original(self, *a)
    )
    images = ImageList(torch.zeros(2, 3, 128, 128), [(128, 128), (100, 90)])
    maps = grid_features((128, 128))
    first = rpn.anchors(images, [m.bfloat16() for m in maps])
    assert first[0].dtype == torch.float32 and first[1] is first[0]
    assert torch.equal(first[0], original(rpn.anchor_generator, images, maps)[0])
    made.clear()
    assert rpn.anchors(images, maps)[0] is first[0] and made == []
    wider = ImageList(torch.zeros(2, 3, 128, 192), [(128, 192), (100, 90)])
    assert len(rpn.anchors(wider, grid_features((128, 192)))[0]) > len(first[0])
    with torch.inference_mode():
        inference = rpn.anchors(images, maps)[0]
    assert inference.is_inference() and torch.equal(inference, first[0])
    assert not rpn.anchors(images, maps)[0].is_inference()
    assert len(made) == 2
    rpn.to(torch.float64)  # a move drops what the cache holds (it would stay on the old device)
    assert len(rpn.shape_cache) == 0


def test_bf16_autocast_keeps_the_rpn_boxes_and_gt_boxes_in_float32(monkeypatch):
    """Under bf16 autocast (train.amp) the RPN's head computes in bf16, but its proposals and
    candidates, and the gt boxes the RoI heads match them with, stay float32 as mmdetection
    keeps them: before, the anchors took the features' dtype and the heads' gt boxes were cast
    to the proposals' bf16 (a gt corner at 150.3 px became 150)."""
    from drcnn.models import sampling
    from drcnn.models.detector import build_detector

    cfg = load_config(
        "configs/synthetic/decoupled_rcnn_r18_fpn_synthetic.yaml",
        [
            "model.backbone.pretrained=null",
            "model.transform.min_size=[192]",
            "model.transform.max_size=192",
        ],
    )
    torch.manual_seed(0)
    model = build_detector(cfg).train()
    targets = [
        {"boxes": torch.tensor([[20.3, 30.7, 150.3, 170.9]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[40.1, 11.3, 90.7, 181.5]]), "labels": torch.tensor([2])},
    ]
    seen = []
    assign = sampling.assign_candidates

    def spy(proposals, *args):
        candidates = assign(proposals, *args)
        seen.append((proposals[0].dtype, candidates))
        return candidates

    monkeypatch.setattr(sampling, "assign_candidates", spy)
    images = [torch.rand(3, 192, 192, generator=torch.Generator().manual_seed(i)) for i in (0, 1)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, targets)
    assert seen and all(dtype == torch.float32 for dtype, _ in seen)
    gts = torch.cat([t["boxes"] for t in targets])
    # every positive's target is a gt box exactly
    matched = torch.cat([c.matched_gt[c.assignment.labels > 0] for _, c in seen])
    assert len(matched) and (matched[:, None] == gts).all(-1).any(-1).all()
    assert all(v.dtype == torch.float32 for v in losses.values())
