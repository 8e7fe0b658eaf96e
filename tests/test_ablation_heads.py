"""The official repository's head ablations (``model.roi_head.box_head``): shared trunk with
decoupled sampling, unshared trunks with ordinary sampling, Double-Head branches. Which loss
trains which parameters, the official normalisers on hand-computed cases, the Double-Head
layer list, the enlarged regression RoIs, and the shipped ablation configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hostile import expect_refusal
from test_roi_heads import (
    CHANNELS,
    SHAPES,
    STAGES,
    K,
    ProposalSets,
    encode64,
    features,
    make_cfg,
    proposals,
    targets,
)
from torch import nn
from torchvision.ops import roi_align

from drcnn.config import load_config
from drcnn.errors import DrcnnError
from drcnn.models.box_heads import DecoupledHead
from drcnn.models.detector import build_detector
from drcnn.models.double_head import ConvRefineHead, DoubleHead
from drcnn.models.mmdet_compat import convert_mmdet_state_dict, mmdet_sources
from drcnn.models.roi_align import rescale_boxes
from drcnn.models.roi_heads import base as roi_base
from drcnn.models.roi_heads import build_roi_heads

ABLATIONS = {  # config stem -> (RoI head type, stage head classes)
    "decoupled_shared_rcnn": ("decoupled", ["DecoupledHead", "RefineHead", "RefineHead"]),
    "unshared2fcs_faster_rcnn": ("standard", ["DecoupledHead"]),
    "double_decoupled_rcnn": ("decoupled", ["DoubleHead", "ConvRefineHead", "ConvRefineHead"]),
    "double_decoupled_norefine_rcnn": ("decoupled", ["DoubleHead"]),
}


def build(kind: str, num_stages: int, box_head: str):
    """A tiny RoI head (K = 3, 8 channels, width 64) with the given box head."""
    torch.manual_seed(0)
    return build_roi_heads(
        make_cfg(kind, num_stages, f"model.roi_head.box_head={box_head}"), CHANNELS
    )


def sampling_spy(monkeypatch) -> list:
    """Record every ``sample_rois`` call's per-image samples, in call and image order."""
    calls = []
    real = roi_base.sample_rois

    def spy(*args):
        out = real(*args)
        calls.extend(out)
        return out

    monkeypatch.setattr(roi_base, "sample_rois", spy)
    return calls


def output_hook(layer: nn.Module) -> list:
    """Collect ``layer``'s outputs."""
    seen = []
    layer.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    return seen


def decoupled_inputs():
    t = targets()
    return t, ProposalSets(proposals(4, t, near=5), proposals(5, t, near=25, scale=0.1))


def trained_by(head: nn.Module, loss: torch.Tensor) -> set[str]:
    """Names of the parameters that ``loss`` gives a non-zero gradient."""
    named = list(head.named_parameters())
    grads = torch.autograd.grad(loss, [p for _, p in named], retain_graph=True, allow_unused=True)
    return {n for (n, _), g in zip(named, grads, strict=True) if g is not None and g.any()}


def layers(*names: str) -> set[str]:
    return {f"stages.0.{n}.{p}" for n in names for p in ("weight", "bias")}


# ---- which loss trains what -------------------------------------------------------------------
def test_shared_trunk_is_trained_by_both_losses():
    head = build("decoupled", 1, "shared")
    t, sets = decoupled_inputs()
    head.train()
    _, losses = head(features(), sets, SHAPES, t)
    assert {n.split(".")[2] for n, _ in head.named_parameters()} == {
        "fc6",
        "fc7",
        "cls_score",
        "bbox_pred",
    }
    assert trained_by(head, losses["s0.loss_cls"]) == layers("fc6", "fc7", "cls_score")
    assert trained_by(head, losses["s0.loss_bbox"]) == layers("fc6", "fc7", "bbox_pred")


def test_unshared_trunks_with_ordinary_sampling_train_apart():
    head = build("standard", 1, "unshared")
    assert isinstance(head.stages[0], DecoupledHead) and not head.stages[0].background_slot
    head.train()
    _, losses = head(features(), proposals(4, targets(), near=5), SHAPES, targets())
    assert trained_by(head, losses["s0.loss_cls"]) == layers("cls_fc6", "cls_fc7", "cls_score")
    assert trained_by(head, losses["s0.loss_bbox"]) == layers("reg_fc6", "reg_fc7", "bbox_pred")


def test_double_head_branches_and_refine_stage_train_apart():
    head = build("decoupled", 2, "double")
    t, sets = decoupled_inputs()
    head.train()
    _, losses = head(features(), sets, SHAPES, t)
    names = {n for n, _ in head.named_parameters()}
    conv0 = {n for n in names if n.startswith("stages.0.reg_convs.")}
    assert len(conv0) == 15 + 2 * 15  # 15 bias-free convs, each with a BN (weight, bias)
    assert trained_by(head, losses["s0.loss_cls"]) == layers("cls_fc6", "cls_fc7", "cls_score")
    assert trained_by(head, losses["s0.loss_bbox"]) == conv0 | layers("bbox_pred")
    assert trained_by(head, losses["s1.loss_bbox"]) == {
        n for n in names if n.startswith("stages.1.")
    }
    assert all(torch.isfinite(v) for v in losses.values())


# ---- normalisers (official avg_factor) ----------------------------------------------------------
def test_shared_trunk_divides_the_box_loss_by_half_the_decoupled_normaliser(monkeypatch):
    """decoupled_shared_bbox_head.py:224 avg_factor=0.5*labels_reg.size(0): the L1 sum over the
    regression positives / (0.5 x (cls samples + padded regression rows))."""
    head = build("decoupled", 1, "shared")
    calls = sampling_spy(monkeypatch)
    deltas = output_hook(head.stages[0].bbox_pred)
    t, sets = decoupled_inputs()
    head.train()
    _, losses = head(features(), sets, SHAPES, t)
    cls, reg = calls[0:2], calls[2:4]
    labels = torch.cat([s.labels for s in reg])
    assert len(deltas) == 1 and len(deltas[0]) == len(labels) and (labels > 0).all()
    picked = deltas[0].unflatten(1, (K, 4))[torch.arange(len(labels)), labels - 1]
    rois, gt = torch.cat([s.boxes for s in reg]), torch.cat([s.gt_boxes for s in reg])
    target = encode64(rois, gt, STAGES[0].target_stds)
    l1 = (picked.double() - target).abs().sum().item()
    padded = sum(min(512, len(p)) for p in sets.reg)  # 110 and 85 proposals, num 512
    num_cls = sum(len(s.boxes) for s in cls)
    assert padded == 195 and num_cls > 100
    assert losses["s0.loss_bbox"].item() == pytest.approx(l1 / (0.5 * (num_cls + padded)), 1e-4)


def test_unshared_trunks_keep_mmdetection_bbox_head_normaliser(monkeypatch):
    """bbox_head.py loss: L1 over the positives / all sampled RoIs; 4K deltas, slot = label - 1."""
    head = build("standard", 1, "unshared")
    calls = sampling_spy(monkeypatch)
    deltas = output_hook(head.stages[0].bbox_pred)
    head.train()
    _, losses = head(features(), proposals(4, targets(), near=10), SHAPES, targets())
    labels = torch.cat([s.labels for s in calls])
    pos = torch.where(labels > 0)[0]
    assert deltas[0].shape == (len(labels), 4 * K) and 10 < len(pos) < len(labels)
    picked = deltas[0].unflatten(1, (K, 4))[pos, labels[pos] - 1]
    rois = torch.cat([s.boxes for s in calls])[pos]
    gt = torch.cat([s.gt_boxes for s in calls])[pos]
    l1 = (picked.double() - encode64(rois, gt, STAGES[0].target_stds)).abs().sum().item()
    assert losses["s0.loss_bbox"].item() == pytest.approx(l1 / len(labels), 1e-4)


def test_double_head_normalisers_and_conv_branch_rows(monkeypatch):
    """double_decoupled_bbox_head.py:330 avg_factor=labels_reg.size(0) (cls + padded reg rows),
    double_refine_bbox_head.py:208 avg_factor=2*labels.size(0); the stage-0 conv branch runs on
    every pooled row, classification samples included (its BatchNorm sees them)."""
    head = build("decoupled", 2, "double")
    calls = sampling_spy(monkeypatch)
    deltas0, deltas1 = output_hook(head.stages[0].bbox_pred), output_hook(head.stages[1].bbox_pred)
    t, sets = decoupled_inputs()
    head.train()
    _, losses = head(features(), sets, SHAPES, t)
    cls, reg, refine = calls[0:2], calls[2:4], calls[4:6]
    rows = [(len(c.boxes), len(r.boxes)) for c, r in zip(cls, reg, strict=True)]
    is_reg = torch.cat([torch.arange(nc + nr) >= nc for nc, nr in rows])
    assert len(deltas0[0]) == len(is_reg)  # every stage-0 row through the conv branch
    labels = torch.cat([s.labels for s in reg])
    picked = deltas0[0][is_reg].unflatten(1, (K, 4))[torch.arange(len(labels)), labels - 1]
    padded = sum(min(512, len(p)) for p in sets.reg)
    num_cls = sum(len(s.boxes) for s in cls)

    def l1(d, samples, stds):
        rois, gt = torch.cat([s.boxes for s in samples]), torch.cat([s.gt_boxes for s in samples])
        return (d.double() - encode64(rois, gt, stds)).abs().sum().item()

    s0 = l1(picked, reg, STAGES[0].target_stds) / (num_cls + padded)
    s1 = STAGES[1].loss_weight * l1(deltas1[0], refine, STAGES[1].target_stds) / (2 * padded)
    assert losses["s0.loss_bbox"].item() == pytest.approx(s0, 1e-4)
    assert losses["s1.loss_bbox"].item() == pytest.approx(s1, 1e-4)


# ---- the Double-Head layers ---------------------------------------------------------------------
def conv_list(in_c: int, width: int) -> list[tuple]:
    """The official conv branch, written from double_decoupled_bbox_head.py: BasicResBlock
    (3x3 C->C, 1x1 C->D, identity 1x1 C->D), then 4 mmdetection Bottlenecks (1x1 D->D/4, 3x3
    D/4->D/4, 1x1 D/4->D, stride 1); every conv bias-free and followed by BN."""
    q = width // 4
    res = [(in_c, in_c, 3, 1, 1), (in_c, width, 1, 1, 0), (in_c, width, 1, 1, 0)]
    return res + [(width, q, 1, 1, 0), (q, q, 3, 1, 1), (q, width, 1, 1, 0)] * 4


def convs_of(module: nn.Module) -> list[tuple]:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.bias is None for m in convs)
    return [
        (m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0]) for m in convs
    ]


def test_double_head_layers_are_the_official_list():
    with torch.device("meta"):
        head = DoubleHead(256, 7, 1024, 80)
        refine = ConvRefineHead(256, 1024)
    for module in (head, refine):
        assert convs_of(module.reg_convs) == conv_list(256, 1024)
        bns = [m.num_features for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
        assert bns == [out for _, out, *_ in conv_list(256, 1024)]
    assert head.reg_roi_scale == refine.reg_roi_scale == 1.3
    linear = {
        n: (m.in_features, m.out_features)
        for n, m in head.named_modules()
        if isinstance(m, nn.Linear)
    }
    assert linear == {
        "bbox_pred": (1024, 4 * 80),  # fc_reg on the pooled conv features, 4K
        "cls_fc6": (256 * 7 * 7, 1024),
        "cls_fc7": (1024, 1024),
        "cls_score": (1024, 81),
    }
    assert (refine.bbox_pred.in_features, refine.bbox_pred.out_features) == (1024, 4)
    x = torch.randn(3, 8, 7, 7)
    small = DoubleHead(8, 7, 32, K)
    assert small.forward_cls(x).shape == (3, K + 1) and small.forward_reg(x).shape == (3, 4 * K)
    assert ConvRefineHead(8, 32)(x).shape == (3, 4)


def test_double_head_init_is_the_official_one():
    """ConvModule convs kaiming-normal (fan_out, relu), Bottleneck convs PyTorch's default,
    fc_cls and fc_reg normal(0, 0.01), the fc branch xavier-uniform (init_weights)."""
    torch.manual_seed(0)
    head = DoubleHead(64, 7, 256, 80)
    res = head.reg_convs.res_block
    for conv, fan_out in ((res.conv1[0], 64 * 9), (res.conv2[0], 256), (res.conv_identity[0], 256)):
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)
    bottleneck_conv = head.reg_convs.bottlenecks[0].conv1  # fan_in 256: bound 1 / 16
    assert bottleneck_conv.weight.abs().max().item() <= 1 / 16
    assert bottleneck_conv.weight.std().item() == pytest.approx(1 / 16 / math.sqrt(3), rel=0.05)
    for layer in (head.cls_score, head.bbox_pred):
        assert layer.weight.std().item() == pytest.approx(0.01, rel=0.05)
        assert layer.bias.abs().sum() == 0
    bound = math.sqrt(6 / (64 * 49 + 256))
    assert head.cls_fc6.weight.abs().max().item() <= bound
    assert head.cls_fc6.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)


def test_conv_refine_head_takes_an_empty_batch_in_training():
    """A refine stage without positives: no error, BatchNorm statistics left untouched."""
    head = ConvRefineHead(8, 32).train()
    assert head(torch.zeros(0, 8, 7, 7)).shape == (0, 4)
    assert all(torch.isfinite(b).all() for b in head.buffers())


# ---- enlarged regression RoIs -------------------------------------------------------------------
def test_rescale_boxes_keeps_centres():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0]])  # centre (20, 40), 20 x 40
    assert rescale_boxes(boxes, 1.5).tolist() == [[5.0, 10.0, 35.0, 70.0]]


def test_scaled_pooling_keeps_the_level_of_the_box_as_given():
    """mmdetection's SingleRoIExtractor maps levels first, then rescales: a 100-px box pooled
    1.3x larger (130 px, which alone would map to P3) is read from P2 (stride 4)."""
    cfg = make_cfg("decoupled", 1, "model.roi_head.box_head=double", "model.roi_head.aligned=true")
    head = build_roi_heads(cfg, CHANNELS)
    feats = features()
    box = torch.tensor([[10.0, 10.0, 110.0, 110.0]])
    scaled = rescale_boxes(box, 1.3)
    got = head._pool(feats, [box, box[:0]], SHAPES, 1.3)
    rois = torch.cat([torch.zeros(1, 1), scaled], dim=1)
    expected = roi_align(feats["0"], rois, 7, 1 / 4, 0, aligned=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    on_p3 = head._pool(feats, [scaled, box[:0]], SHAPES)
    assert (on_p3 - expected).abs().max() > 1e-3


def test_double_head_inference_pools_each_branch_its_way():
    head = build("decoupled", 1, "double").eval()
    feats, t = features(), targets()
    boxes = [x["boxes"] + 2.0 for x in t]
    with torch.no_grad():
        out = head.analyze(feats, boxes, SHAPES, [x["labels"] for x in t])
        x_cls = head.box_roi_pool(feats, boxes, SHAPES)
        x_reg = head.box_roi_pool(feats, boxes, SHAPES, roi_scale_factor=1.3)
        stage = head.stages[0]
        logits, deltas = stage.forward_cls(x_cls), stage.forward_reg(x_reg)
        unscaled = stage.forward_reg(x_cls)
    labels = torch.cat([x["labels"] for x in t])
    picked = deltas.unflatten(1, (K, 4))[torch.arange(len(labels)), labels - 1]
    torch.testing.assert_close(out["class_logits"][0], logits)
    torch.testing.assert_close(out["stage_deltas"][0], picked)
    assert (unscaled - deltas).abs().max() > 1e-4


# ---- configs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("stem", list(ABLATIONS))
@pytest.mark.parametrize("dataset", ["coco", "synthetic"])
def test_ablation_configs_build_their_heads(stem, dataset):
    path = (
        Path(f"configs/decoupled_rcnn/ablations/{stem}_r50_fpn_2x_coco.yaml")
        if dataset == "coco"
        else Path(f"configs/synthetic/ablations/{stem}_r18_fpn_synthetic.yaml")
    )
    cfg = load_config(path, ["model.backbone.pretrained=null"])
    kind, heads = ABLATIONS[stem]
    with torch.device("meta"):
        model = build_detector(cfg)
    assert cfg.model.roi_head.type == kind
    assert [type(s).__name__ for s in model.roi_heads.stages] == heads
    if dataset == "synthetic":
        assert cfg.model.roi_head.fc_dim == 256 and cfg.model.roi_head.num_classes == 8
    if stem == "decoupled_shared_rcnn":
        assert model.roi_heads.stages[0].shared_trunk


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.roi_head.box_head=twin"], r"box_head: expected one of shared, unshared, double"),
        (
            ["model.roi_head.type=standard", "model.roi_head.box_head=double"],
            r"box_head: double needs type decoupled",
        ),
    ],
)
def test_bad_box_heads_are_refused(overrides, message):
    with pytest.raises(DrcnnError, match=message):
        load_config(None, overrides)


def test_cli_refuses_double_head_without_decoupled_sampling(tmp_path, capsys):
    out = tmp_path / "out"
    err = expect_refusal(
        [
            "train",
            "configs/synthetic/ablations/unshared2fcs_faster_rcnn_r18_fpn_synthetic.yaml",
            "--work-dir",
            out,
            "--set",
            "model.roi_head.box_head=double",
        ],
        capsys,
        watch=[tmp_path, Path("configs")],
    )
    assert "model.roi_head.box_head" in err and not out.exists()


def test_mmdet_import_maps_the_shared_trunk_and_refuses_double_heads(tmp_path, capsys):
    cfg = load_config("configs/synthetic/ablations/decoupled_shared_rcnn_r18_fpn_synthetic.yaml")
    with torch.device("meta"):
        sources = mmdet_sources(build_detector(cfg))
    prefix = "roi_head.bbox_head.0.shared_fcs"
    assert sources["roi_heads.stages.0.fc6.weight"].key == f"{prefix}.0.weight"
    assert sources["roi_heads.stages.0.fc7.bias"].key == f"{prefix}.1.bias"
    double = "configs/synthetic/ablations/double_decoupled_rcnn_r18_fpn_synthetic.yaml"
    with torch.device("meta"):
        model = build_detector(load_config(double))
    with pytest.raises(DrcnnError, match=r"no mmdetection name maps to"):
        convert_mmdet_state_dict(model, {})
    ckpt = tmp_path / "mmdet.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, ckpt)
    out = tmp_path / "converted" / "out.pth"
    err = expect_refusal(
        ["convert", "mmdet", ckpt, "--config", double, "--out", out],
        capsys,
        watch=[tmp_path, Path("configs")],
    )
    assert "cannot be imported" in err and not out.exists()
