"""RPN: two proposal sets from one set of candidates, torchvision parity, the two box losses."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import box_iou

from drcnn.config import load_config
from drcnn.models.rpn import DecoupledRPN, ProposalSets, build_rpn

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


def test_smooth_l1_losses_equal_torchvision():
    rpn = make_rpn("model.rpn.loss_bbox=smooth_l1").train()
    images, features, targets = inputs()
    torch.manual_seed(5)
    _, losses = rpn(images, features, targets)
    torch.manual_seed(5)  # same anchor sampling
    _, expected = torchvision_rpn(rpn, 0.7)(images, features, targets)
    assert set(losses) == {"rpn.loss_cls", "rpn.loss_bbox"}
    torch.testing.assert_close(losses["rpn.loss_cls"], expected["loss_objectness"])
    torch.testing.assert_close(losses["rpn.loss_bbox"], expected["loss_rpn_box_reg"])


class SampleAll:
    """Stand-in sampler: every positive and every negative anchor is sampled."""

    def __call__(self, labels):
        return [lab == 1 for lab in labels], [lab == 0 for lab in labels]


def test_l1_loss_is_sum_over_positives_per_sampled_anchor():
    rpn = make_rpn("model.rpn.loss_bbox=l1").train()
    rpn.fg_bg_sampler = SampleAll()
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
    expected_bbox = (flat_deltas - targets64).abs()[pos].sum() / sampled.sum()
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
    from drcnn.errors import DrcnnError

    with pytest.raises(DrcnnError, match=r"model\.rpn\.nms_thresh"):
        make_rpn(f"model.rpn.nms_thresh={value}")
