"""Every shipped config loads and builds, and carries the official values of its model: the
Decoupled R-CNN configs those of the official release, the baselines mmdetection 2.x's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hostile import expect_refusal
from omegaconf import OmegaConf

from drcnn.config import (
    BACKBONE_ARCHS,
    NORM_TYPES,
    config_from_dict,
    load_config,
    rpn_nms_thresholds,
    to_dict,
    typed_sampler,
)
from drcnn.engine.checkpoint import load_model, save_checkpoint
from drcnn.errors import DrcnnError
from drcnn.models.backbone import NORM_LAYERS, RESNET_SPECS
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


# Official sources. DEC: the official Decoupled R-CNN repository (shouwangzhe134/Decoupled-R-CNN,
# commit 39c1ea5) configs/decoupled_rcnn/coco/decoupled_refine_rcnn_r50_fpn_2x_coco.py; FASTER:
# that repository's configs/_base_/models/faster_rcnn_r50_fpn.py (mmdetection 2.4); CASCADE:
# mmdetection 2.x configs/_base_/models/cascade_rcnn_r50_fpn.py. "DEC:105" = line 105 there.
OFFICIAL_RPN = {
    "anchor_sizes": [8 * s for s in (4, 8, 16, 32, 64)],  # DEC:34,36 scales 8 x strides
    "aspect_ratios": [0.5, 1.0, 2.0],  # DEC:35
    "fg_iou_thresh": 0.7,  # DEC:105
    "bg_iou_thresh": 0.3,  # DEC:106
    "min_pos_iou": 0.3,  # DEC:107 (match_low_quality=True, DEC:108)
    "anchor_convention": "mmdet",
    "batch_size_per_image": 256,  # DEC:112
    "positive_fraction": 0.5,  # DEC:113
    "pre_nms_top_n_train": 2000,  # DEC:121
    "pre_nms_top_n_test": 1000,  # DEC:181
    "post_nms_top_n_test": 1000,  # DEC:182
    "test_nms_thresh": 0.7,  # DEC:184
    "min_size": 0.0,  # DEC:125,185 min_bbox_size=0
    "score_thresh": 0.0,  # no score filter in mmdetection's RPN
}
OFFICIAL_ROI = {
    "num_classes": 80,
    "roi_size": 7,  # DEC:51 output_size=7
    "sampling_ratio": 0,  # DEC:51
    "aligned": True,  # mmcv RoIAlign default
    "fc_dim": 1024,  # DEC:58
}
COCO = [p for p in CONFIGS if p.stem.endswith("_coco")]
# DYN: mmdetection 2.x configs/dynamic_rcnn/dynamic_rcnn_r50_fpn_1x_coco.py, whose test-time RPN
# NMS is 0.85 (DYN:28); every other shared value is Faster R-CNN's.
RPN_DIFFERS = {"dynamic_rcnn_r50_fpn_1x_coco": {"test_nms_thresh": 0.85}}


def plain(node):
    return OmegaConf.to_container(node) if OmegaConf.is_config(node) else node


@pytest.mark.parametrize("path", COCO, ids=lambda p: p.stem)
def test_shared_rpn_and_roi_values(path):
    cfg = load_config(path)
    for key, value in {**OFFICIAL_RPN, **RPN_DIFFERS.get(path.stem, {})}.items():
        assert plain(cfg.model.rpn[key]) == value, key
    for key, value in OFFICIAL_ROI.items():
        assert cfg.model.roi_head[key] == value, key
    assert (cfg.model.roi_head.test.nms_iou, cfg.model.roi_head.test.max_per_image) == (0.5, 100)
    assert cfg.model.roi_head.stages[0].iou_thresh == 0.5
    assert list(cfg.model.roi_head.stages[0].target_stds) == [0.1, 0.1, 0.2, 0.2]
    assert cfg.model.roi_head.test.min_box_size == 0.0


@pytest.mark.parametrize("path", DECOUPLED, ids=lambda p: p.stem)
def test_decoupled_official_values(path):
    """Numbers of the official Decoupled R-CNN configs (DEC line numbers)."""
    cfg = load_config(path)
    rpn, roi, train = cfg.model.rpn, cfg.model.roi_head, cfg.train
    assert rpn_nms_thresholds(rpn) == (0.7, 0.85)  # DEC:124
    assert rpn.post_nms_top_n_train == 1000  # DEC:122 nms_post
    assert rpn.allowed_border == -1  # DEC:116
    assert plain(rpn.loss_bbox) == {"type": "l1", "beta": None}  # DEC:44
    assert roi.type == "decoupled" and len(roi.stages) == 3  # DEC:46-47
    assert plain(roi.cls_sampler) == {
        "type": "random",  # DEC:136 RandomSampler
        "num": 512,  # DEC:137
        "pos_fraction": 0.25,  # DEC:138
        "add_gt": True,  # DEC:140
    }
    assert plain(roi.reg_sampler) == {  # DEC:141-143
        "type": "positive",
        "num": 512,
        "pos_fraction": None,
        "add_gt": False,
    }
    assert [list(s.target_stds) for s in roi.stages] == [
        [0.1, 0.1, 0.2, 0.2],  # DEC:64
        [0.05, 0.05, 0.1, 0.1],  # DEC:79
        [0.033, 0.033, 0.067, 0.067],  # DEC:94
    ]
    assert [s.loss_weight for s in roi.stages] == [1.0, 0.5, 0.25]  # DEC:48
    assert all(s.iou_thresh == 0.5 for s in roi.stages)  # DEC:130,149,165
    assert plain(roi.loss_bbox) == {"type": "l1", "beta": None}  # DEC:69,83,98
    assert roi.test.score_thresh == 0.001  # DEC:188
    assert (train.lr, train.reference_batch_size, train.epochs) == (0.01, 8, 24)
    assert list(train.lr_steps) == [16, 22] and train.warmup_iters == 500
    assert cfg.model.backbone.frozen_stages == 1 and cfg.model.backbone.norm == "eval_bn"
    assert cfg.model.transform.max_size == 1333 and cfg.model.transform.test_min_size == 800
    if "mstrain" in path.name:
        assert list(cfg.model.transform.min_size) == [640, 672, 704, 736, 768, 800]
        # x101 mstrain configs: nms=dict(type='soft_nms', iou_threshold=0.5, min_score=0.001),
        # mmcv's soft_nms defaulting to method='linear'
        assert (roi.test.nms, roi.test.nms_iou, roi.test.soft_nms_min_score) == (
            "soft_nms_linear",
            0.5,
            0.001,
        )
    else:
        assert list(cfg.model.transform.min_size) == [800] and roi.test.nms == "nms"


def test_faster_rcnn_2x_official_values():
    """mmdetection 2.4's Faster R-CNN (FASTER line numbers)."""
    cfg = load_config("configs/baselines/faster_rcnn_r50_fpn_2x_coco.yaml")
    rpn, roi = cfg.model.rpn, cfg.model.roi_head
    assert rpn_nms_thresholds(rpn) == (0.7,)  # FASTER:79
    assert rpn.post_nms_top_n_train == 1000  # FASTER:77
    assert rpn.allowed_border == -1  # FASTER:71
    assert plain(rpn.loss_bbox) == {"type": "l1", "beta": None}  # FASTER:33
    assert roi.type == "standard" and len(roi.stages) == 1  # FASTER:35,42
    assert plain(roi.cls_sampler) == {
        "type": "random",  # FASTER:90 RandomSampler
        "num": 512,  # FASTER:91
        "pos_fraction": 0.25,  # FASTER:92
        "add_gt": True,  # FASTER:94
    }
    assert roi.reg_class_agnostic is False  # FASTER:51
    assert plain(roi.loss_bbox) == {"type": "l1", "beta": None}  # FASTER:54
    assert (roi.test.score_thresh, roi.test.nms) == (0.05, "nms")  # FASTER:106-107


def test_cascade_rcnn_20e_official_values():
    """mmdetection 2.x's Cascade R-CNN (CASCADE line numbers)."""
    cfg = load_config("configs/baselines/cascade_rcnn_r50_fpn_20e_coco.yaml")
    rpn, roi = cfg.model.rpn, cfg.model.roi_head
    assert rpn_nms_thresholds(rpn) == (0.7,)  # CASCADE:118
    assert rpn.post_nms_top_n_train == 2000  # CASCADE:117 (nms_post=max_num=2000 before 2.12)
    assert rpn.allowed_border == 0  # CASCADE:112
    assert plain(rpn.loss_bbox) == {"type": "smooth_l1", "beta": 1 / 9}  # CASCADE:34
    assert roi.type == "cascade"  # CASCADE:36-37
    assert [s.iou_thresh for s in roi.stages] == [0.5, 0.6, 0.7]  # CASCADE:124,140,156
    assert [list(s.target_stds) for s in roi.stages] == [
        [0.1, 0.1, 0.2, 0.2],  # CASCADE:54
        [0.05, 0.05, 0.1, 0.1],  # CASCADE:71
        [0.033, 0.033, 0.067, 0.067],  # CASCADE:88
    ]
    assert [s.loss_weight for s in roi.stages] == [1.0, 0.5, 0.25]  # CASCADE:38
    assert roi.reg_class_agnostic is True  # CASCADE:55,72,89
    assert plain(roi.loss_bbox) == {"type": "smooth_l1", "beta": 1.0}  # CASCADE:60,77,94
    assert plain(roi.cls_sampler) == {
        "type": "random",
        "num": 512,
        "pos_fraction": 0.25,
        "add_gt": True,
    }
    assert (roi.test.score_thresh, roi.test.nms) == (0.05, "nms")  # CASCADE:177-178


def test_dynamic_rcnn_1x_official_values():
    """mmdetection 2.x's Dynamic R-CNN (DYN line numbers) on its Faster R-CNN base."""
    cfg = load_config("configs/baselines/dynamic_rcnn_r50_fpn_1x_coco.yaml")
    rpn, roi = cfg.model.rpn, cfg.model.roi_head
    assert rpn_nms_thresholds(rpn) == (0.85,) and rpn.test_nms_thresh == 0.85  # DYN:20,28
    assert roi.type == "dynamic" and len(roi.stages) == 1  # DYN:4
    assert roi.reg_class_agnostic is False  # DYN:15
    assert plain(roi.loss_bbox) == {"type": "smooth_l1", "beta": 1.0}  # DYN:18
    assert plain(roi.dynamic) == {  # DYN:22-27
        "iou_topk": 75,
        "beta_topk": 10,
        "update_interval": 100,
        "initial_iou": 0.4,
        "initial_beta": 1.0,
    }
    assert roi.stages[0].iou_thresh == 0.5  # the Faster R-CNN assigner until the first update
    assert (cfg.train.epochs, list(cfg.train.lr_steps)) == (12, [8, 11])  # schedule_1x


def test_torchvision_config_keeps_torchvision_conventions():
    cfg = load_config("configs/baselines/faster_rcnn_r50_fpn_torchvision.yaml")
    rpn, roi = cfg.model.rpn, cfg.model.roi_head
    assert rpn.anchor_convention == "torchvision"
    assert rpn.min_pos_iou is None and rpn.allowed_border is None
    assert plain(rpn.loss_bbox) == {"type": "smooth_l1", "beta": 1 / 9}
    assert plain(roi.loss_bbox) == {"type": "smooth_l1", "beta": 1 / 9}
    assert rpn.post_nms_top_n_train == 2000 and roi.sampling_ratio == 2 and not roi.aligned


def test_cli_refuses_a_loss_field_its_type_does_not_use(tmp_path, capsys):
    """Switching Cascade R-CNN's smooth L1 to L1 must also unset its beta."""
    out = tmp_path / "out"
    err = expect_refusal(
        [
            "train",
            "configs/baselines/cascade_rcnn_r50_fpn_20e_coco.yaml",
            "--work-dir",
            out,
            "--set",
            "model.roi_head.loss_bbox={type: l1}",
        ],
        capsys,
        watch=[tmp_path, Path("configs")],
    )
    assert "model.roi_head.loss_bbox.beta" in err and not out.exists()


def test_synthetic_configs_are_cpu_sized():
    for kind in ("faster", "cascade", "decoupled"):
        cfg = load_config(f"configs/synthetic/{kind}_rcnn_r18_fpn_synthetic.yaml")
        assert cfg.model.roi_head.num_classes == 8 and cfg.data.root == "data/synthetic"
        assert cfg.model.backbone.pretrained is None and cfg.model.backbone.norm == "bn"
        assert cfg.train.lr_step_unit == "iter"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.roi_head.cls_sampler.type=iou_balanced", r"cls_sampler\.type: expected one of"),
        ("model.roi_head.reg_sampler.pos_fraction=1.0", r"reg_sampler\.pos_fraction: .*takes no"),
        ("model.roi_head.cls_sampler.type=positive", r"cls_sampler\.pos_fraction: .*takes no"),
        (
            "model.roi_head.cls_sampler={type: random, pos_fraction: null}",
            r"cls_sampler\.pos_fraction: type random needs",
        ),
        ("model.roi_head.reg_sampler.num=0", r"reg_sampler\.num: expected an integer >= 1"),
        ("model.roi_head.cls_sampler.pos_fraction=1.5", r"cls_sampler\.pos_fraction: .*\[0, 1\]"),
    ],
)
def test_bad_sampler_entries_are_refused(override, message):
    with pytest.raises(DrcnnError, match=message):
        load_config("configs/synthetic/decoupled_rcnn_r18_fpn_synthetic.yaml", [override])


def test_cli_refuses_a_sampler_field_its_type_does_not_use(tmp_path, capsys):
    """The old way of asking for the positive sampler (pos_fraction 1.0) is not ignored."""
    out = tmp_path / "out"
    err = expect_refusal(
        [
            "train",
            "configs/synthetic/decoupled_rcnn_r18_fpn_synthetic.yaml",
            "--work-dir",
            out,
            "--set",
            "model.roi_head.reg_sampler.pos_fraction=1.0",
        ],
        capsys,
        watch=[tmp_path, Path("configs")],
    )
    assert "model.roi_head.reg_sampler.pos_fraction" in err and not out.exists()


def old_sampler_entries(cfg) -> dict:
    """``cfg`` as a checkpoint stored it before samplers had a type."""
    stored = to_dict(cfg)
    roi = stored["model"]["roi_head"]
    roi["cls_sampler"] = {"num": 128, "pos_fraction": 0.25, "add_gt": True}
    roi["reg_sampler"] = {"num": 128, "pos_fraction": 1.0, "add_gt": False}
    return stored


def test_untyped_sampler_entries_get_the_type_their_slot_ran():
    """The old heads drew the classification RoIs at random and the regression RoIs with the
    positive sampler, whatever pos_fraction said."""
    assert typed_sampler("cls_sampler", {"num": 512, "pos_fraction": 0.25, "add_gt": True}) == {
        "type": "random",
        "num": 512,
        "pos_fraction": 0.25,
        "add_gt": True,
    }
    for fraction in (1.0, 0.5):
        entry = {"num": 64, "pos_fraction": fraction, "add_gt": False}
        assert typed_sampler("reg_sampler", entry) == {
            "type": "positive",
            "num": 64,
            "add_gt": False,
        }


def test_a_checkpoint_with_untyped_sampler_entries_still_loads(tmp_path):
    cfg = load_config("configs/synthetic/decoupled_rcnn_r18_fpn_synthetic.yaml")
    stored = old_sampler_entries(cfg)
    assert config_from_dict(stored) == cfg  # the entries the shipped config now writes
    assert "type" not in stored["model"]["roi_head"]["reg_sampler"]  # the caller's dict kept
    torch.manual_seed(0)
    model = build_detector(cfg, pretrained=False)
    save_checkpoint(tmp_path / "old.pth", {"model": model.state_dict(), "config": stored})
    _, loaded = load_model(tmp_path / "old.pth")
    assert plain(loaded.model.roi_head.reg_sampler) == {
        "type": "positive",
        "num": 128,
        "pos_fraction": None,
        "add_gt": False,
    }


def test_model_tables_have_the_config_names():
    """Each name list lives in drcnn.config; the model side checks its tables at import."""
    assert list(RESNET_SPECS) == list(BACKBONE_ARCHS)
    assert list(NORM_LAYERS) == list(NORM_TYPES)
