"""The official backbone, FPN, data and schedule settings, pinned on the configs as loaded.

Official = the public Decoupled R-CNN release (``shouwangzhe134/Decoupled-R-CNN``, commit
39c1ea5; mmdetection 2.4.0, mmcv-full 1.1.2, torchvision 0.7.0). Each value below names the
official file and line it comes from; the COCO baselines share the official code's model
(``configs/_base_/models/faster_rcnn_r50_fpn.py``, as in mmdetection 2.x) and data files.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from drcnn.config import IMAGENET_MEAN, IMAGENET_STD, load_config

DECOUPLED = sorted(Path("configs/decoupled_rcnn").glob("*.yaml"))
BASELINES = [
    Path("configs/baselines/faster_rcnn_r50_fpn_2x_coco.yaml"),
    Path("configs/baselines/cascade_rcnn_r50_fpn_20e_coco.yaml"),
]
OFFICIAL = DECOUPLED + BASELINES

# decoupled_refine_rcnn_*_coco.py: pretrained= (r50 l.13, r101 l.2, x101 l.3), depth/groups
PRETRAINED = {
    "decoupled_rcnn_r50_fpn_2x_coco": ("resnet50", "torchvision://resnet50"),
    "decoupled_rcnn_r101_fpn_2x_coco": ("resnet101", "torchvision://resnet101"),
    "decoupled_rcnn_x101_32x4d_fpn_2x_coco": (
        "resnext101_32x4d",
        "open-mmlab://resnext101_32x4d",
    ),
    "decoupled_rcnn_x101_32x4d_fpn_mstrain_2x_coco": (
        "resnext101_32x4d",
        "open-mmlab://resnext101_32x4d",
    ),
    "decoupled_rcnn_x101_64x4d_fpn_mstrain_2x_coco": (
        "resnext101_64x4d",
        "open-mmlab://resnext101_64x4d",
    ),
    "faster_rcnn_r50_fpn_2x_coco": ("resnet50", "torchvision://resnet50"),
    "cascade_rcnn_r50_fpn_20e_coco": ("resnet50", "torchvision://resnet50"),
}


def test_every_official_config_is_pinned():
    assert {p.stem for p in OFFICIAL} == set(PRETRAINED)


@pytest.mark.parametrize("path", OFFICIAL, ids=lambda p: p.stem)
def test_official_backbone_and_fpn(path):
    backbone = load_config(path).model.backbone
    assert (backbone.arch, backbone.pretrained) == PRETRAINED[path.stem]
    # decoupled_refine_rcnn_r50_fpn_2x_coco.py l.19-22: frozen_stages=1 (stem + layer1),
    # norm_cfg=dict(type='BN', requires_grad=True), norm_eval=True, style='pytorch' (stride in
    # the 3x3 conv, as torchvision's ResNet); the X-101 files keep norm_eval from it (l.21)
    assert backbone.frozen_stages == 1
    assert backbone.norm == "eval_bn"
    # l.26-27: FPN out_channels=256, num_outs=5 (P6 by max-pooling P5, mmdet fpn.py l.199);
    # mmdet 2.4 fpn.py l.158-162: xavier_init(m, distribution='uniform') on every conv
    assert backbone.fpn_channels == 256
    assert backbone.fpn_init == "xavier_uniform"


@pytest.mark.parametrize("path", OFFICIAL, ids=lambda p: p.stem)
def test_official_data_pipeline(path):
    cfg = load_config(path)
    transform, data = cfg.model.transform, cfg.data
    # coco_detection.py l.3-4: mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
    # to_rgb=True, on 0..255 RGB pixels = ImageNet's mean/std on drcnn's 0..1 RGB images
    for ours, official in zip(transform.image_mean, [123.675, 116.28, 103.53], strict=True):
        assert ours == pytest.approx(official / 255, abs=1e-12)
    for ours, official in zip(transform.image_std, [58.395, 57.12, 57.375], strict=True):
        assert ours == pytest.approx(official / 255, abs=1e-12)
    assert list(transform.image_mean) == IMAGENET_MEAN and list(transform.image_std) == IMAGENET_STD
    # l.8 Resize img_scale=(1333, 800) keep_ratio=True (mstrain: l.21-26, 640..800 by 32);
    # l.25 test img_scale=(1333, 800)
    assert (transform.max_size, transform.test_min_size) == (1333, 800)
    if "mstrain" in path.stem:
        assert list(transform.min_size) == [640, 672, 704, 736, 768, 800]
    else:
        assert list(transform.min_size) == [800]
    # l.15 RandomFlip flip_ratio=0.5; l.17 Pad size_divisor=32
    assert data.flip_prob == 0.5 and transform.size_divisible == 32
    # l.40 samples_per_gpu=2; mmdet builder.py l.109 DistributedGroupSampler (aspect groups)
    assert data.batch_size == 2 and data.group_by_aspect_ratio is True


@pytest.mark.parametrize("path", OFFICIAL, ids=lambda p: p.stem)
def test_official_optimizer_and_schedule(path):
    train = load_config(path).train
    # schedule_2x.py l.3: SGD lr=0.01 (total batch 8 = 2 x 4 GPUs), momentum=0.9,
    # weight_decay=0.0001; mmdetection's own schedule_1x.py: lr=0.02 for 16, the same per image
    assert train.optimizer == "sgd"
    assert train.lr / train.reference_batch_size == pytest.approx(0.01 / 8)
    assert (train.momentum, train.weight_decay) == (0.9, 0.0001)
    # l.5 grad_clip=None; no gradient accumulation, fp32
    assert train.grad_clip is None and train.accumulate == 1 and train.amp == "none"
    # l.8-12: step policy, linear warm-up over 500 iterations from 0.001 x lr, x0.1 at epochs
    assert (train.warmup_iters, train.warmup_ratio, train.gamma) == (500, 0.001, 0.1)
    assert train.lr_step_unit == "epoch"
    if "20e" in path.stem:  # mmdetection schedule_20e.py: step=[16, 19], total_epochs=20
        assert (train.epochs, list(train.lr_steps)) == (20, [16, 19])
    else:  # schedule_2x.py l.12-13: step=[16, 22], total_epochs=24
        assert (train.epochs, list(train.lr_steps)) == (24, [16, 22])


def test_torchvision_parity_config_keeps_torchvision_settings():
    backbone = load_config("configs/baselines/faster_rcnn_r50_fpn_torchvision.yaml").model.backbone
    assert backbone.norm == "frozen_bn" and backbone.fpn_init == "kaiming_uniform"
    assert backbone.pretrained == "torchvision://resnet50" and backbone.channels_last is False


@pytest.mark.parametrize("kind", ["faster", "cascade", "decoupled"])
def test_synthetic_configs_train_from_scratch_ungrouped(kind):
    cfg = load_config(f"configs/synthetic/{kind}_rcnn_r18_fpn_synthetic.yaml")
    assert cfg.model.backbone.norm == "bn" and cfg.model.backbone.frozen_stages == 0
    # kaiming, not the official xavier: see configs/_base_/models/r18_fpn_synthetic.yaml
    assert cfg.model.backbone.fpn_init == "kaiming_uniform"
    assert cfg.data.group_by_aspect_ratio is False
