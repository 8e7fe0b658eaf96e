"""Backbone + FPN: torchvision-compatible names, shapes, freezing, and pretrained loading."""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models.detection import fasterrcnn_resnet50_fpn
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d

from drcnn.config import load_config
from drcnn.errors import DrcnnError
from drcnn.models.backbone import FusedFrozenBatchNorm2d, build_backbone


def small_cfg(*overrides: str):
    return load_config(
        None,
        [
            "model.backbone.arch=resnet18",
            "model.backbone.fpn_channels=32",
            "model.backbone.pretrained=null",
            *overrides,
        ],
    )


def shapes(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


@pytest.mark.parametrize("norm", ["bn", "frozen_bn"])
def test_resnet50_fpn_names_and_shapes_equal_torchvision(norm):
    # without weights torchvision builds trainable BatchNorm; frozen BN has no step counter
    reference = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).backbone
    expected = shapes(reference.state_dict())
    if norm == "frozen_bn":
        expected = {k: v for k, v in expected.items() if not k.endswith("num_batches_tracked")}
    cfg = load_config(None, ["model.backbone.pretrained=null", f"model.backbone.norm={norm}"])
    ours = build_backbone(cfg)
    assert shapes(ours.state_dict()) == expected
    assert ours.out_channels == 256


def test_feature_keys_channels_and_strides():
    backbone = build_backbone(small_cfg()).eval()
    features = backbone(torch.rand(2, 3, 128, 96))
    assert list(features) == ["0", "1", "2", "3", "pool"]
    for (name, feat), stride in zip(features.items(), (4, 8, 16, 32, 64), strict=True):
        assert feat.shape == (2, 32, 128 // stride, -(-96 // stride)), name


@pytest.mark.parametrize("frozen_stages", [0, 1, 2, 4])
def test_frozen_stages_match_torchvision_trainable_layers(frozen_stages):
    backbone = build_backbone(
        small_cfg(f"model.backbone.frozen_stages={frozen_stages}", "model.backbone.norm=bn")
    )
    trainable = 5 if frozen_stages == 0 else 4 - frozen_stages
    reference = _resnet_fpn_extractor(torchvision.models.resnet18(), trainable)
    ours = {n: p.requires_grad for n, p in backbone.named_parameters()}
    assert ours == {n: p.requires_grad for n, p in reference.named_parameters()}


def test_frozen_stages_keep_batchnorm_statistics_in_training():
    backbone = build_backbone(small_cfg("model.backbone.norm=bn", "model.backbone.frozen_stages=1"))
    backbone.train()
    assert not backbone.body.bn1.training and not backbone.body.layer1[0].bn1.training
    assert backbone.body.layer2[0].bn1.training
    before = backbone.body.layer1[0].bn1.running_mean.clone()
    after_layer2 = backbone.body.layer2[0].bn1.running_mean.clone()
    backbone(torch.rand(2, 3, 64, 64))
    assert torch.equal(backbone.body.layer1[0].bn1.running_mean, before)
    assert not torch.equal(backbone.body.layer2[0].bn1.running_mean, after_layer2)


def test_norm_choice():
    frozen = build_backbone(small_cfg("model.backbone.norm=frozen_bn"))
    assert isinstance(frozen.body.bn1, FrozenBatchNorm2d)
    trainable = build_backbone(small_cfg("model.backbone.norm=bn"))
    assert type(trainable.body.bn1) is torch.nn.BatchNorm2d


def test_resnext_group_widths():
    cfg = load_config(
        None, ["model.backbone.arch=resnext101_32x4d", "model.backbone.pretrained=null"]
    )
    body = build_backbone(cfg).body
    # 32 groups x 4 channels = 128 wide in layer1, each 3x3 filter sees 4 channels
    assert tuple(body.layer1[0].conv2.weight.shape) == (128, 4, 3, 3)
    assert tuple(body.layer4[0].conv2.weight.shape) == (1024, 32, 3, 3)
    assert len(body.layer3) == 23


def test_resnext64_matches_torchvision_definition():
    cfg = load_config(
        None, ["model.backbone.arch=resnext101_64x4d", "model.backbone.pretrained=null"]
    )
    body = build_backbone(cfg).body.state_dict()
    reference = torchvision.models.resnext101_64x4d(norm_layer=FrozenBatchNorm2d).state_dict()
    reference = {k: v for k, v in reference.items() if not k.startswith("fc.")}
    assert shapes(body) == shapes(reference)


def _trunk_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    trunk = torchvision.models.resnet18()
    for module in trunk.modules():  # non-trivial statistics, so that the round trip is visible
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    return trunk.state_dict()


def _assert_loaded(backbone, state):
    body = backbone.body.state_dict()
    for key, value in body.items():
        assert torch.equal(value, state[key]), key


def test_pretrained_local_file_round_trip(tmp_path):
    state = _trunk_state(3)
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": state}, path)
    backbone = build_backbone(small_cfg(f"model.backbone.pretrained={path}"))
    _assert_loaded(backbone, state)


def test_pretrained_torchvision_from_cache(tmp_path, monkeypatch):
    """torchvision://resnet18 is read from torch hub's cache when present (no network)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    state = _trunk_state(4)
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(state, cache / os.path.basename(url))
    backbone = build_backbone(small_cfg("model.backbone.pretrained=torchvision://resnet18"))
    _assert_loaded(backbone, state)


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("resnet18", "ResNet18_Weights.IMAGENET1K_V1"),
        ("ResNet34_Weights.IMAGENET1K_V1", "ResNet34_Weights.IMAGENET1K_V1"),
    ],
)
def test_pretrained_offline_is_a_one_line_error(tmp_path, monkeypatch, name, shown):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # nothing cached

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(DrcnnError) as info:
        build_backbone(small_cfg(f"model.backbone.pretrained=torchvision://{name}"))
    message = str(info.value)
    assert "\n" not in message
    assert shown in message and "model.backbone.pretrained=null" in message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("torchvision://no_such_net", "unknown torchvision weights"),
        ("does/not/exist.pth", "is not a file"),
    ],
)
def test_pretrained_bad_names(value, expected):
    with pytest.raises(DrcnnError, match=expected):
        build_backbone(small_cfg(f"model.backbone.pretrained={value}"))


def test_pretrained_wrong_architecture_names_the_key(tmp_path: Path):
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), path)  # extra blocks in each stage
    with pytest.raises(DrcnnError, match=r"layer1\.2\.|unexpected weight"):
        build_backbone(small_cfg(f"model.backbone.pretrained={path}"))
    wide = {"conv1.weight": torch.zeros(32, 3, 7, 7)}
    torch.save(wide, path)
    with pytest.raises(DrcnnError, match=r"conv1\.weight.*\(32, 3, 7, 7\)"):
        build_backbone(small_cfg(f"model.backbone.pretrained={path}"))


def test_fused_frozen_batch_norm_equals_torchvision_frozen_bn():
    torch.manual_seed(0)
    reference = FrozenBatchNorm2d(16)
    for name in ("weight", "bias", "running_mean"):
        getattr(reference, name).normal_()
    reference.running_var.uniform_(0.1, 2.0)
    fused = FusedFrozenBatchNorm2d(16)
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(2, 16, 5, 7, dtype=torch.float64, requires_grad=True)
    fused.double(), reference.double()
    torch.testing.assert_close(fused(x), reference(x))
    (grad_fused,) = torch.autograd.grad(fused(x).square().sum(), x)
    (grad_ref,) = torch.autograd.grad(reference(x).square().sum(), x)
    torch.testing.assert_close(grad_fused, grad_ref)
    assert not any(p.requires_grad for p in fused.parameters())


def features_and_input_grad(backbone, x: torch.Tensor):
    x = x.clone().requires_grad_(True)
    features = backbone(x)
    loss = sum(f.square().sum() for f in features.values())
    return features, torch.autograd.grad(loss, x)[0]


@pytest.mark.parametrize("norm", ["bn", "frozen_bn"])
def test_channels_last_backbone_equals_the_nchw_one(norm):
    """Same weights in both layouts: same features and input gradient; NCHW features out."""
    torch.manual_seed(0)
    common = (f"model.backbone.norm={norm}", "model.backbone.frozen_stages=0")
    nhwc = build_backbone(small_cfg(*common))
    nchw = build_backbone(small_cfg(*common, "model.backbone.channels_last=false"))
    nchw.load_state_dict(nhwc.state_dict())
    assert nhwc.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not nchw.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 96, 64)
    got, got_grad = features_and_input_grad(nhwc, x)
    expected, expected_grad = features_and_input_grad(nchw, x)
    assert all(f.is_contiguous() for f in got.values())
    # fp32 convolutions in another layout sum in another order: compare on each tensor's scale
    for name, feature in expected.items():
        scale = feature.abs().max().item()
        torch.testing.assert_close(got[name], feature, rtol=0, atol=1e-4 * scale)
    scale = expected_grad.abs().max().item()
    torch.testing.assert_close(got_grad, expected_grad, rtol=0, atol=1e-4 * scale)
