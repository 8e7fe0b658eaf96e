"""Dynamic R-CNN head: its statistics against hand/numpy references, the update rule, the
adapted threshold and beta in use, config checks, and exact resume of the running buffers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import read_jsonl, tiny_overrides
from torchvision.ops import box_iou

from drcnn.config import load_config
from drcnn.engine.checkpoint import load_checkpoint
from drcnn.engine.train import train
from drcnn.errors import DrcnnError
from drcnn.models.roi_heads import build_roi_heads
from drcnn.models.roi_heads.dynamic import DynamicRoIHeads, kth_largest

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DYNAMIC = CONFIGS / "synthetic" / "dynamic_rcnn_r18_fpn_synthetic.yaml"


def dynamic_head(*overrides: str) -> DynamicRoIHeads:
    cfg = load_config(DYNAMIC, ["model.roi_head.num_classes=3", *overrides])
    head = build_roi_heads(cfg, in_channels=8)
    assert isinstance(head, DynamicRoIHeads)
    return head


def test_kth_largest_clamps_k_and_is_nan_when_empty():
    values = torch.tensor([0.3, 0.9, 0.1, 0.6])
    assert kth_largest(values, 1) == 0.9
    assert kth_largest(values, 3) == 0.3
    assert kth_largest(values, 10) == 0.1  # fewer than k values: the smallest
    assert torch.isnan(kth_largest(values[:0], 2))


def test_iou_statistic_is_the_mean_over_images_of_the_kth_largest_candidate_iou():
    head = dynamic_head("model.roi_head.dynamic.iou_topk=3")
    torch.manual_seed(0)
    gts = [torch.tensor([[10.0, 10.0, 50.0, 50.0]]), torch.tensor([[0.0, 0.0, 30.0, 40.0]])]
    proposals = [g + torch.randn(20, 4) * 6 for g in gts]
    proposals = [
        torch.cat([p[:, :2], p[:, :2] + (p[:, 2:] - p[:, :2]).abs() + 1], 1) for p in proposals
    ]
    targets = [{"boxes": g, "labels": torch.tensor([1])} for g in gts]
    head._stage_samples(proposals, targets, 0)
    expected = []
    for p, g in zip(proposals, gts, strict=True):
        ious = box_iou(g, torch.cat([p, g])).max(dim=0).values.numpy()  # gt joins (add_gt)
        expected.append(np.sort(ious)[::-1][2])
    assert head._iou_stat.item() == pytest.approx(np.mean(expected), abs=1e-6)
    assert head._num_images == 2


def test_beta_statistic_is_the_kth_smallest_target_and_the_loss_uses_the_current_beta():
    head = dynamic_head("model.roi_head.dynamic.beta_topk=2")
    head._num_images = 2  # k = 2 x 2 = 4
    head.beta.fill_(0.25)
    targets = torch.tensor(
        [[0.8, -0.2, 0.1, 0.1], [-0.1, 0.1, 0.0, 0.0], [0.3, 0.5, 0.0, 0.0], [0.05, -0.05, 1, 1],
         [1.0, 1.0, 0.0, 0.0], [-0.6, 0.0, 0.0, 0.0]]
    )  # fmt: skip
    entry = head._box_loss_entry(targets)
    errors = np.sort(np.abs(targets[:, :2].numpy()).mean(axis=1))
    assert head._beta_stat.item() == pytest.approx(errors[3])
    assert (entry.type, entry.beta) == ("smooth_l1", 0.25)
    head._num_images = 10  # k = 20 > 6 positives: the largest
    head._box_loss_entry(targets)
    assert head._beta_stat.item() == pytest.approx(errors[-1])


def test_update_every_interval_follows_the_mean_and_the_median_with_their_bounds():
    head = dynamic_head("model.roi_head.dynamic.update_interval=4")
    ious, betas = [0.55, 0.62, 0.58, 0.71], [0.30, 0.10, 0.20, 0.05]
    for i, (iou, beta) in enumerate(zip(ious, betas, strict=True)):
        assert head.iou_thresh.item() == pytest.approx(0.5)  # the config's, until the update
        head._record(torch.tensor(iou), torch.tensor(beta))
        assert int(head.recorded) == i + 1
    assert head.iou_thresh.item() == pytest.approx(max(0.4, np.mean(ious)))
    assert head.beta.item() == pytest.approx(min(1.0, np.median(betas)))  # mean of middle two
    # the floor and cap: low IoUs keep initial_iou; a large median is capped at initial_beta
    for _ in range(4):
        head._record(torch.tensor(0.2), torch.tensor(3.0))
    assert head.iou_thresh.item() == pytest.approx(0.4)
    assert head.beta.item() == pytest.approx(1.0)
    # a median below 1e-15 keeps beta; an iteration without a statistic (NaN) is left out
    head._record(torch.tensor(0.6), torch.tensor(0.0))
    head._record(torch.tensor(0.7), None)
    head._record(None, torch.tensor(0.0))
    head._record(torch.tensor(0.8), torch.tensor(0.0))
    assert head.iou_thresh.item() == pytest.approx(0.7)
    assert head.beta.item() == pytest.approx(1.0)


def test_the_adapted_threshold_decides_positives():
    head = dynamic_head("model.roi_head.cls_sampler.add_gt=false")
    gt = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    proposals = [torch.tensor([[0.0, 0.0, 100.0, 60.0], [0.0, 0.0, 100.0, 90.0]])]  # IoU .6, .9
    targets = [{"boxes": gt, "labels": torch.tensor([2])}]
    assert head._stage_samples(proposals, targets, 0)[0].labels.tolist() == [2, 2]
    head.iou_thresh.fill_(0.7)
    assert head._stage_samples(proposals, targets, 0)[0].labels.tolist() == [0, 2]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.roi_head.dynamic=null"], "type dynamic needs its settings"),
        (["model.roi_head.loss_bbox={type: l1}"], "adapts a smooth_l1 beta"),
        (["model.roi_head.dynamic.update_interval=0"], "update_interval: expected a positive"),
        (["model.roi_head.dynamic.initial_iou=1.5"], "0 < initial_iou < 1"),
        (["model.roi_head.type=standard"], "type standard takes no dynamic settings"),
    ],
)
def test_config_refuses_inconsistent_dynamic_settings(overrides, message):
    with pytest.raises(DrcnnError, match=message):
        load_config(DYNAMIC, overrides)


def test_resume_reproduces_the_thresholds_and_losses_of_the_uninterrupted_run(
    synthetic_root, tmp_path
):
    """7 iterations straight vs 4, stop, resume to 7, updating every 3 iterations: the
    iteration-4 statistic saved in the checkpoint must take part in the update at 6."""
    overrides = [
        *tiny_overrides(synthetic_root),
        "model.transform.min_size=[96]",
        "model.transform.max_size=96",
        "model.roi_head.dynamic.update_interval=3",
        "model.roi_head.dynamic.iou_topk=5",
        "train.checkpoint_unit=iter",
        "train.checkpoint_interval=100",
    ]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(load_config(DYNAMIC, [*overrides, "train.max_iters=7"]), straight, device="cpu")
    train(load_config(DYNAMIC, [*overrides, "train.max_iters=4"]), split, device="cpu")
    cfg = load_config(DYNAMIC, [*overrides, "train.max_iters=7"])
    train(cfg, split, resume=split / "latest.pth", device="cpu")

    runs = [read_jsonl(run / "metrics.jsonl") for run in (straight, split)]
    for key in ("loss", "s0.loss_cls", "s0.loss_bbox"):
        assert [e[key] for e in runs[0]] == [e[key] for e in runs[1]], key
    first, second = (load_checkpoint(run / "latest.pth")["model"] for run in (straight, split))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert int(first["roi_heads.recorded"]) == 7
    # two updates happened: the threshold left the config's 0.5 for the statistics' mean
    assert first["roi_heads.iou_thresh"].item() != pytest.approx(0.5)
