"""Every shipped config loads and builds; the Decoupled R-CNN configs carry the official values."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from drcnn.config import load_config, rpn_nms_thresholds
from drcnn.models.detector import build_detector

CONFIGS = sorted(p for p in Path("configs").rglob("*.yaml") if "_base_" not in p.parts)
DECOUPLED = [p for p in CONFIGS if p.parent.name == "decoupled_rcnn"]


def test_expected_configs_exist():
    names = {p.name for p in CONFIGS}
    for stem in (
        "r50_fpn_2x",
        "r101_fpn_2x",
        "x101_32x4d_fpn_2x",
        "x101_32x4d_fpn_mstrain_2x",
        "x101_64x4d_fpn_mstrain_2x",
    ):
        assert f"decoupled_rcnn_{stem}_coco.yaml" in names
    for name in (
        "faster_rcnn_r50_fpn_2x_coco.yaml",
        "cascade_rcnn_r50_fpn_20e_coco.yaml",
        "faster_rcnn_r50_fpn_torchvision.yaml",
    ):
        assert name in names
    for kind in ("faster", "cascade", "decoupled"):
        assert f"{kind}_rcnn_r18_fpn_synthetic.yaml" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds(path):
    cfg = load_config(path, ["model.backbone.pretrained=null"])
    with torch.device("meta"):  # build only: no memory, no init cost for the big backbones
        model = build_detector(cfg)
    assert len(model.roi_heads.stages) == len(cfg.model.roi_head.stages)
    arch = {
        "resnet50": 2048,
        "resnet101": 2048,
        "resnext101_32x4d": 2048,
        "resnext101_64x4d": 2048,
        "resnet18": 512,
    }[cfg.model.backbone.arch]
    assert model.backbone.body.layer4[-1].conv1.in_channels == arch
    # RoIAlign's pixel model: torchvision's for the torchvision-compatible config, else mmcv's
    assert model.roi_heads.box_roi_pool.aligned == ("torchvision" not in path.stem)


@pytest.mark.parametrize("path", DECOUPLED, ids=lambda p: p.stem)
def test_decoupled_official_values(path):
    """Numbers from METHOD.md (official mmdetection-2.4 release)."""
    cfg = load_config(path)
    rpn, roi, train = cfg.model.rpn, cfg.model.roi_head, cfg.train
    assert rpn_nms_thresholds(rpn) == (0.7, 0.85)
    assert rpn.post_nms_top_n_train == 1000 and rpn.post_nms_top_n_test == 1000
    assert rpn.test_nms_thresh == 0.7 and rpn.loss_bbox == "l1"
    assert list(rpn.anchor_sizes) == [8 * s for s in (4, 8, 16, 32, 64)]
    assert roi.type == "decoupled" and roi.num_classes == 80
    assert (roi.cls_sampler.num, roi.cls_sampler.pos_fraction, roi.cls_sampler.add_gt) == (
        512,
        0.25,
        True,
    )
    assert (roi.reg_sampler.num, roi.reg_sampler.pos_fraction, roi.reg_sampler.add_gt) == (
        512,
        1.0,
        False,
    )
    assert [list(s.target_stds) for s in roi.stages] == [
        [0.1, 0.1, 0.2, 0.2],
        [0.05, 0.05, 0.1, 0.1],
        [0.033, 0.033, 0.067, 0.067],
    ]
    assert [s.loss_weight for s in roi.stages] == [1.0, 0.5, 0.25]
    assert all(s.iou_thresh == 0.5 for s in roi.stages)
    assert roi.fc_dim == 1024 and roi.roi_size == 7
    assert (roi.test.nms_iou, roi.test.max_per_image) == (0.5, 100)
    assert (train.lr, train.reference_batch_size, train.epochs) == (0.01, 8, 24)
    assert list(train.lr_steps) == [16, 22] and train.warmup_iters == 500
    assert cfg.model.backbone.frozen_stages == 1 and cfg.model.backbone.norm == "eval_bn"
    assert cfg.model.transform.max_size == 1333 and cfg.model.transform.test_min_size == 800
    if "mstrain" in path.name:
        assert list(cfg.model.transform.min_size) == [640, 672, 704, 736, 768, 800]
        assert roi.test.nms.startswith("soft_nms")
    else:
        assert list(cfg.model.transform.min_size) == [800] and roi.test.nms == "nms"


def test_synthetic_configs_are_cpu_sized():
    for kind in ("faster", "cascade", "decoupled"):
        cfg = load_config(f"configs/synthetic/{kind}_rcnn_r18_fpn_synthetic.yaml")
        assert cfg.model.roi_head.num_classes == 8 and cfg.data.root == "data/synthetic"
        assert cfg.model.backbone.pretrained is None and cfg.model.backbone.norm == "bn"
        assert cfg.train.lr_step_unit == "iter"
