"""Backbone + FPN: torchvision-compatible names, shapes, freezing, and pretrained loading."""

from __future__ import annotations

import math
import os
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from hostile import expect_refusal
from test_detector import image_with_boxes, small_detector
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models.detection import fasterrcnn_resnet50_fpn
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d

from drcnn.config import NORM_TYPES, load_config
from drcnn.errors import DrcnnError
from drcnn.models.backbone import (
    NORM_LAYERS,
    EvalBatchNorm2d,
    FusedFrozenBatchNorm2d,
    ResNetFPN,
    build_backbone,
    fold_norms,
    read_pretrained,
)
from drcnn.models.detector import eval_mode


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
    reference = torchvision.models.resnext101_64x4d().state_dict()  # BatchNorm keys, as eval_bn
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


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache (``TORCH_HOME``, returned) and no network: downloads fail."""
    home = tmp_path / "torch"
    monkeypatch.setenv("TORCH_HOME", str(home))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return home


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("resnet18", "ResNet18_Weights.IMAGENET1K_V1"),
        ("ResNet34_Weights.IMAGENET1K_V1", "ResNet34_Weights.IMAGENET1K_V1"),
    ],
)
def test_pretrained_offline_is_a_one_line_error(offline, name, shown):
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


@pytest.mark.parametrize(
    ("norm", "dtype"),
    [
        ("eval_bn", torch.float32),
        ("frozen_bn", torch.float32),
        # batch statistics of a nearly constant channel (a 2-image batch, 3x2 pixels in
        # layer4) amplify fp32 summation-order differences some 300-fold: compare in fp64
        ("bn", torch.float64),
    ],
)
def test_channels_last_backbone_equals_the_nchw_one(norm, dtype):
    """Same weights in both layouts: same features and input gradient; NCHW features out."""
    torch.manual_seed(0)
    common = (f"model.backbone.norm={norm}", "model.backbone.frozen_stages=0")
    nhwc = build_backbone(small_cfg(*common)).to(dtype)
    nchw = build_backbone(small_cfg(*common, "model.backbone.channels_last=false")).to(dtype)
    nchw.load_state_dict(nhwc.state_dict())
    assert nhwc.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not nchw.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 96, 64, dtype=dtype)
    got, got_grad = features_and_input_grad(nhwc, x)
    expected, expected_grad = features_and_input_grad(nchw, x)
    assert all(f.is_contiguous() for f in got.values())
    # convolutions in another layout sum in another order: compare on each tensor's scale
    for name, feature in expected.items():
        scale = feature.abs().max().item()
        torch.testing.assert_close(got[name], feature, rtol=0, atol=1e-4 * scale)
    scale = expected_grad.abs().max().item()
    torch.testing.assert_close(got_grad, expected_grad, rtol=0, atol=1e-4 * scale)


# --- Official settings (mmdetection 2.4 ResNet / FPN, mmcv 1.x weight names) ---------------


def test_eval_bn_equals_an_eval_mode_batchnorm_in_any_mode():
    """eval_bn normalises with the running statistics, also in training, and trains the affine."""
    torch.manual_seed(0)
    reference = torch.nn.BatchNorm2d(8).double().eval()
    for name in ("weight", "bias", "running_mean"):
        getattr(reference, name).data.normal_()
    reference.running_var.uniform_(0.5, 2.0)
    ours = EvalBatchNorm2d(8).double().train()
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(3, 8, 5, 4, dtype=torch.float64)
    torch.testing.assert_close(ours(x), reference(x))
    grads = [
        torch.autograd.grad(m(x).square().sum(), [m.weight, m.bias]) for m in (ours, reference)
    ]
    torch.testing.assert_close(grads[0], grads[1])
    assert torch.equal(ours.running_mean, reference.running_mean)  # never updated


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _one_sgd_step(norm: str) -> tuple[dict, dict, torch.nn.Module]:
    """State before and after one SGD step of a resnet18 backbone with frozen_stages=1."""
    torch.manual_seed(0)
    backbone = build_backbone(small_cfg(f"model.backbone.norm={norm}"))
    with torch.no_grad():  # ImageNet-like statistics, so that an update would show
        for module in backbone.body.modules():
            if hasattr(module, "running_var"):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    backbone.train()
    before = _snapshot(backbone.body)
    params = [p for p in backbone.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    loss = sum(f.square().mean() for f in backbone(torch.rand(2, 3, 64, 64)).values())
    loss.backward()
    optimizer.step()
    return before, _snapshot(backbone.body), backbone


def test_official_batchnorm_training_step():
    """eval_bn + frozen_stages=1: statistics unchanged everywhere; the affine weights of
    layer2-4 trained; stem and layer1 entirely unchanged (mmdetection's norm_eval=True,
    requires_grad=True, frozen_stages=1)."""
    before, after, backbone = _one_sgd_step("eval_bn")
    assert isinstance(backbone.body.layer2[0].bn1, EvalBatchNorm2d)
    for key in before:
        name = key.rsplit(".", 1)[-1]
        if name in ("running_mean", "running_var") or key.startswith(("conv1.", "bn1.", "layer1.")):
            assert torch.equal(before[key], after[key]), key
    for stage in ("layer2", "layer3", "layer4"):
        for name in ("weight", "bias"):
            key = f"{stage}.0.bn1.{name}"
            assert not torch.equal(before[key], after[key]), key
    # the other choices differ where they should: "bn" updates statistics, "frozen_bn" no affine
    before_bn, after_bn, _ = _one_sgd_step("bn")
    assert not torch.equal(
        before_bn["layer2.0.bn1.running_mean"], after_bn["layer2.0.bn1.running_mean"]
    )
    before_fr, after_fr, _ = _one_sgd_step("frozen_bn")
    assert torch.equal(before_fr["layer2.0.bn1.weight"], after_fr["layer2.0.bn1.weight"])


def test_norm_layers_cover_the_config_choices():
    assert set(NORM_LAYERS) == set(NORM_TYPES)


def _fpn_convs(backbone) -> list[torch.nn.Conv2d]:
    return [m for m in backbone.fpn.modules() if isinstance(m, torch.nn.Conv2d)]


def test_fpn_xavier_uniform_init_by_its_bound():
    """mmdetection's FPN init: U(-b, b), b = sqrt(6 / (fan_in + fan_out)), zero bias;
    torchvision's kaiming_uniform(a=1) has b = sqrt(3 / fan_in), smaller on the 1x1 laterals."""
    torch.manual_seed(0)
    xavier = build_backbone(small_cfg("model.backbone.fpn_init=xavier_uniform"))
    kaiming = build_backbone(small_cfg("model.backbone.fpn_init=kaiming_uniform"))
    for ours, theirs in zip(_fpn_convs(xavier), _fpn_convs(kaiming), strict=True):
        out_c, in_c, kh, kw = ours.weight.shape
        fan_in, fan_out = in_c * kh * kw, out_c * kh * kw
        bound = math.sqrt(6 / (fan_in + fan_out))
        largest = ours.weight.abs().max().item()
        assert 0.95 * bound < largest <= bound
        assert not ours.bias.any()
        assert theirs.weight.abs().max().item() <= math.sqrt(3 / fan_in)
    # the lateral conv from layer4 (512 -> 32 channels): xavier's bound is 1.37x kaiming's
    lateral = _fpn_convs(xavier)[3]
    assert tuple(lateral.weight.shape) == (32, 512, 1, 1)
    assert lateral.weight.abs().max().item() > math.sqrt(3 / 512)


def test_p6_is_a_stride_two_subsample_of_p5():
    """mmdetection's FPN (num_outs=5, no extra convs): max_pool2d(P5, 1, stride=2)."""
    features = build_backbone(small_cfg()).eval()(torch.rand(1, 3, 160, 96))
    assert torch.equal(features["pool"], features["3"][..., ::2, ::2])


class RecordingDownload:
    """Stands in for torch.hub.download_url_to_file: records the call, writes a state dict."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

    def __call__(self, url, dst, hash_prefix=None, progress=True):
        self.calls.append((url, hash_prefix))
        torch.save({"conv1.weight": torch.zeros(1)}, dst)


@pytest.mark.parametrize(
    ("name", "url"),
    [
        # torchvision://NAME as mmcv 1.x resolved it under torchvision 0.7: the V1 weights
        ("resnet50", "https://download.pytorch.org/models/resnet50-0676ba61.pth"),
        ("resnet101", "https://download.pytorch.org/models/resnet101-63fe2227.pth"),
        # the current default, asked for explicitly
        (
            "ResNet50_Weights.IMAGENET1K_V2",
            "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
        ),
    ],
)
def test_torchvision_names_resolve_to_the_v1_weights(tmp_path, monkeypatch, name, url):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    download = RecordingDownload()
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    state = read_pretrained(f"torchvision://{name}")
    assert download.calls == [(url, url.rsplit("-", 1)[1].split(".")[0])]  # hash checked
    assert list(state) == ["conv1.weight"]
    assert (tmp_path / "hub" / "checkpoints" / os.path.basename(url)).is_file()
    read_pretrained(f"torchvision://{name}")  # now from the cache
    assert len(download.calls) == 1


def mmcv_resnext_state(groups: int, width_per_group: int) -> dict[str, torch.Tensor]:
    """An ImageNet ResNeXt-101 state dict named as mmdetection's ResNeXt modules name their
    weights (written from mmdetection 2.4's ResNet/ResNeXt/ResLayer definitions): stem
    ``conv1``/``bn1``; per block ``conv1..3``/``bn1..3`` with the grouped 3x3 in ``conv2``;
    ``downsample.0`` (1x1 conv) / ``downsample.1`` (BN) in each stage's first block; plus the
    classifier ``fc``. Each tensor is a constant (its key's index), expanded to its shape, so
    the file stays small and every value is traceable."""
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, channels: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (channels,)

    shapes["conv1.weight"] = (64, 3, 7, 7)
    bn("bn1", 64)
    inplanes = 64
    for stage, blocks in enumerate((3, 4, 23, 3), start=1):
        planes = 64 * 2 ** (stage - 1)
        width = math.floor(planes * width_per_group / 64) * groups
        for block in range(blocks):
            prefix = f"layer{stage}.{block}"
            shapes[f"{prefix}.conv1.weight"] = (width, inplanes, 1, 1)
            bn(f"{prefix}.bn1", width)
            shapes[f"{prefix}.conv2.weight"] = (width, width // groups, 3, 3)
            bn(f"{prefix}.bn2", width)
            shapes[f"{prefix}.conv3.weight"] = (planes * 4, width, 1, 1)
            bn(f"{prefix}.bn3", planes * 4)
            if block == 0:
                shapes[f"{prefix}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                bn(f"{prefix}.downsample.1", planes * 4)
            inplanes = planes * 4
    shapes["fc.weight"], shapes["fc.bias"] = (1000, 2048), (1000,)
    return {k: torch.tensor(float(i + 1)).expand(s) for i, (k, s) in enumerate(shapes.items())}


def test_open_mmlab_resnext_weights_load_from_the_mmcv_cache_file(tmp_path, monkeypatch):
    """open-mmlab://resnext101_32x4d: mmcv's file name in torch hub's checkpoint folder, in
    mmcv's checkpoint layout ({"meta", "state_dict"}, "module." prefix as mmcv strips it), with
    no BatchNorm step counters; every trunk weight lands where mmdetection's ResNeXt has it."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    state = mmcv_resnext_state(groups=32, width_per_group=4)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    saved = {
        "meta": {"mmcv_version": "1.1.2"},
        "state_dict": {f"module.{k}": v for k, v in state.items()},
    }
    torch.save(saved, cache / "resnext101_32x4d-a5af3160.pth")
    cfg = small_cfg(
        "model.backbone.arch=resnext101_32x4d",
        "model.backbone.pretrained=open-mmlab://resnext101_32x4d",
    )
    body = build_backbone(cfg).body.state_dict()
    trunk_keys = [k for k in state if not k.startswith("fc.")]
    assert sorted(k for k in body if not k.endswith("num_batches_tracked")) == sorted(trunk_keys)
    for key in trunk_keys:
        assert torch.equal(body[key], state[key]), key


def test_open_mmlab_offline_names_the_file_and_the_folder(offline):
    with pytest.raises(DrcnnError) as info:
        read_pretrained("open-mmlab://resnext101_64x4d")
    message = str(info.value)
    assert "\n" not in message
    assert "resnext101_64x4d-ee2c6f71.pth" in message
    assert str(offline / "hub" / "checkpoints") in message


def test_unknown_open_mmlab_name():
    with pytest.raises(DrcnnError, match="unknown open-mmlab weights 'resnet50'"):
        read_pretrained("open-mmlab://resnet50")


def test_cli_refuses_missing_open_mmlab_weights_offline(tmp_path, offline, capsys):
    config = Path("configs/decoupled_rcnn/decoupled_rcnn_x101_32x4d_fpn_2x_coco.yaml")
    argv = ["benchmark", config, "--size", "64", "64", "--images", "1", "--warmup", "0"]
    err = expect_refusal([*argv, "--device", "cpu"], capsys, watch=[tmp_path, Path("configs")])
    assert "resnext101_32x4d-a5af3160.pth" in err
    err = expect_refusal(
        [*argv, "--set", "model.backbone.pretrained=open-mmlab://resnext50"],
        capsys,
        watch=[tmp_path, Path("configs")],
    )
    assert "unknown open-mmlab weights" in err


# --- BatchNorm folded into the convolutions at inference (issue 13) -------------------------


class BatchNormCount(TorchDispatchMode):
    """Counts the BatchNorm kernels that run (``aten.*batch_norm*``) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += "batch_norm" in func.name()
        return func(*args, **(kwargs or {}))


def randomize_norms(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial statistics and affine weights in every BatchNorm (a fresh one is identity)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for norm in module.modules():
            if isinstance(norm, torch.nn.BatchNorm2d | FrozenBatchNorm2d):
                n = norm.num_features if hasattr(norm, "num_features") else len(norm.weight)
                norm.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
                norm.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
                norm.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                norm.bias.copy_(torch.randn(n, generator=generator) * 0.5)


def unfolded_features(backbone, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The features by torchvision's ``BackboneWithFPN.forward`` (the trunk as built, every
    BatchNorm run), in the layout ResNetFPN uses: the reference for the folded trunk."""
    x = x.contiguous(memory_format=backbone.memory_format)
    return {k: f.contiguous() for k, f in BackboneWithFPN.forward(backbone, x).items()}


def assert_features_close(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, feature in expected.items():
        torch.testing.assert_close(got[name], feature, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm", ["eval_bn", "bn"])
def test_inference_folds_batchnorm_into_the_convolutions(norm):
    """At inference no BatchNorm kernel runs, the features equal the unfolded trunk's, and the
    module's state dict (what a checkpoint saves) is the unfolded one, unchanged."""
    torch.manual_seed(0)
    backbone = build_backbone(small_cfg(f"model.backbone.norm={norm}"))
    randomize_norms(backbone)
    backbone.eval()
    state = _snapshot(backbone)
    x = torch.rand(2, 3, 96, 64)
    with torch.inference_mode():
        expected = unfolded_features(backbone, x)
        with BatchNormCount() as unfolded:
            unfolded_features(backbone, x)
        with BatchNormCount() as counted:
            got = backbone(x)
    assert unfolded.count == 20  # resnet18: stem, 2 x 8 block convs, 3 downsamples
    assert counted.count == 0
    assert_features_close(got, expected)
    assert backbone.folded["body"].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    after = backbone.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], v) for k, v in state.items())


def trainable_backbone_in_eval_mode() -> tuple[ResNetFPN, torch.Tensor]:
    """A seeded R-18 backbone, nothing frozen, non-trivial norms, in eval mode; and an input."""
    torch.manual_seed(0)
    backbone = build_backbone(small_cfg("model.backbone.frozen_stages=0"))
    randomize_norms(backbone)
    return backbone.eval(), torch.rand(1, 3, 64, 64)


def test_folded_trunk_follows_weight_changes_and_leaves_training_alone():
    """A weight changed in place, a loaded state dict or a training step: the next inference
    uses the new weights. Gradients (eval mode with autograd on, or training) still reach the
    BatchNorm weights, which the folded copy would not let through."""
    backbone, x = trainable_backbone_in_eval_mode()
    with torch.no_grad():
        backbone(x)
        backbone.body.layer2[0].bn1.running_mean.add_(1.0)  # in place, as copy_ and optimisers
        assert_features_close(backbone(x), unfolded_features(backbone, x))
        other = build_backbone(small_cfg("model.backbone.frozen_stages=0"))
        randomize_norms(other, seed=1)
        backbone.load_state_dict(other.state_dict())
        assert_features_close(backbone(x), unfolded_features(backbone, x))
    loss = sum(f.square().mean() for f in backbone(x).values())  # eval mode, autograd on
    (grad,) = torch.autograd.grad(loss, [backbone.body.layer3[0].bn2.weight])
    assert grad.abs().sum() > 0
    backbone.train()
    assert not backbone.folded
    optimizer = torch.optim.SGD(backbone.parameters(), lr=1e-4)
    sum(f.square().mean() for f in backbone(x).values()).backward()
    optimizer.step()
    backbone.eval()
    with torch.no_grad():
        assert_features_close(backbone(x), unfolded_features(backbone, x))


def test_folded_trunk_is_made_once_across_eval_switches(monkeypatch):
    """Analysis code wraps every image in ``eval_mode`` (``eval()`` then ``train(False)``): the
    trunk is folded once, not per call. A submodule put in training mode by hand changes which
    norms fold, so the next inference folds again and matches the unfolded trunk."""
    import drcnn.models.backbone as backbone_module

    folds = []

    def counting_fold(body):
        folds.append(1)
        return fold_norms(body)

    monkeypatch.setattr(backbone_module, "fold_norms", counting_fold)
    backbone, x = trainable_backbone_in_eval_mode()
    with torch.no_grad():
        for _ in range(3):
            with eval_mode(backbone):
                backbone(x)
        assert len(folds) == 1
        backbone.body.layer2[0].bn1.train()  # normalises with batch statistics now
        got = backbone(x)
        assert len(folds) == 2
        assert_features_close(got, unfolded_features(backbone, x))


def test_frozen_bn_computes_as_torchvision_also_at_inference():
    """``frozen_bn`` (the torchvision-parity config's) is not folded: the same features, to the
    bit, as torchvision's forward, every BatchNorm run."""
    torch.manual_seed(0)
    backbone = build_backbone(small_cfg("model.backbone.norm=frozen_bn"))
    randomize_norms(backbone)
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode(), BatchNormCount() as counted:
        got = backbone.eval()(x)
    assert counted.count == 20
    expected = unfolded_features(backbone, x)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_folding_leaves_group_and_training_batchnorm_alone():
    """Only fixed-affine norms fold: a BatchNorm in training mode or a GroupNorm stays."""
    body = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 4, 3)
    )
    body.add_module("3", torch.nn.GroupNorm(2, 4))
    assert isinstance(fold_norms(body.train())[1], torch.nn.BatchNorm2d)
    folded = fold_norms(body.eval())
    assert isinstance(folded[1], torch.nn.Identity) and isinstance(folded[3], torch.nn.GroupNorm)


@pytest.mark.parametrize("kind", ["faster", "decoupled"])
def test_detector_inference_with_folded_batchnorm_equals_the_unfolded_one(kind, monkeypatch):
    """Whole detector, fixed random weights with non-trivial BatchNorm statistics: the same
    detections (to 1e-4) as with the trunk run unfolded, and no BatchNorm kernel runs."""
    model = small_detector(kind).eval()
    randomize_norms(model)
    image, _ = image_with_boxes(torch.Generator().manual_seed(0), 128, 160)
    with torch.inference_mode(), BatchNormCount() as counted:
        got = model([image])[0]
    with monkeypatch.context() as patch, torch.inference_mode():
        patch.setattr(ResNetFPN, "inference_body", lambda backbone: backbone.body)
        with BatchNormCount() as unfolded:
            expected = model([image])[0]
    assert counted.count == 0 and unfolded.count > 0
    assert len(expected["scores"]) > 10
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
