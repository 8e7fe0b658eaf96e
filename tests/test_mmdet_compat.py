"""mmdetection 2.x checkpoints (official Decoupled R-CNN, Faster / Cascade R-CNN) in drcnn.

The mmdetection state dicts here are written by the test from mmdetection's own layout
(``mmdet/models/backbones/resnet.py``, ``necks/fpn.py``, ``dense_heads/rpn_head.py``,
``roi_heads/bbox_heads/{convfc,decoupled,refine}_bbox_head.py``), independently of the
converter: random values under mmdetection's key names and shapes, background as the last class,
class-specific deltas without a background slot.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hostile import expect_refusal
from PIL import Image
from torch import Tensor

from drcnn.cli import main
from drcnn.config import load_config
from drcnn.data.synthetic import SYNTHETIC_CATEGORIES
from drcnn.engine.checkpoint import load_checkpoint, load_model, save_checkpoint
from drcnn.errors import DrcnnError
from drcnn.models import load_mmdet_checkpoint
from drcnn.models.detector import build_detector
from drcnn.models.mmdet_compat import (
    class_meta,
    convert_mmdet_state_dict,
    read_mmdet_checkpoint,
)

SYNTHETIC = Path("configs/synthetic")
FASTER = SYNTHETIC / "faster_rcnn_r18_fpn_synthetic.yaml"
CASCADE = SYNTHETIC / "cascade_rcnn_r18_fpn_synthetic.yaml"
DECOUPLED = SYNTHETIC / "decoupled_rcnn_r18_fpn_synthetic.yaml"
DYNAMIC = SYNTHETIC / "dynamic_rcnn_r18_fpn_synthetic.yaml"
DECOUPLED_COCO = Path("configs/decoupled_rcnn/decoupled_rcnn_r50_fpn_2x_coco.yaml")
NO_WEIGHTS = ["model.backbone.pretrained=null"]
SYNTHETIC_NAMES = tuple(c["name"] for c in SYNTHETIC_CATEGORIES)

# mmdetection bbox heads by config: (bbox_head type of each stage, whether bbox_head is a list)
HEADS = {
    FASTER: (["shared"], False),  # StandardRoIHead + Shared2FCBBoxHead, class-specific
    CASCADE: (["shared_agnostic"] * 3, True),  # CascadeRoIHead, reg_class_agnostic=True
    DECOUPLED: (["decoupled", "refine", "refine"], True),  # DecoupledRefineRoIHead
    DYNAMIC: (["shared"], False),  # DynamicRoIHead (a StandardRoIHead) + Shared2FCBBoxHead
}
HEAD_SHAPES = {  # layer -> shape as (out, in); K classes, F fc width, D flattened RoI feature
    "shared": {"shared_fcs.0": ("F", "D"), "shared_fcs.1": ("F", "F"), "fc_cls": ("K+1", "F"),
               "fc_reg": ("4K", "F")},
    "shared_agnostic": {"shared_fcs.0": ("F", "D"), "shared_fcs.1": ("F", "F"),
                        "fc_cls": ("K+1", "F"), "fc_reg": ("4", "F")},
    "decoupled": {"cls_fcs.0": ("F", "D"), "cls_fcs.1": ("F", "F"), "fc_cls": ("K+1", "F"),
                  "reg_fcs.0": ("F", "D"), "reg_fcs.1": ("F", "F"), "fc_reg": ("4K", "F")},
    "refine": {"reg_fcs.0": ("F", "D"), "reg_fcs.1": ("F", "F"), "fc_reg": ("4", "F")},
}  # fmt: skip


def mmdet_state_dict(
    arch: str,
    neck: tuple[list[int], int],
    num_classes: int,
    fc_dim: int,
    heads: list[str],
    listed: bool,
) -> dict[str, Tensor]:
    """Random weights under mmdetection 2.x's names and shapes (ResNet, FPN, RPN, bbox heads).

    ``neck``: the FPN's ``(in_channels, out_channels)`` as an mmdetection config gives them.
    """
    generator = torch.Generator().manual_seed(0)
    # mmdetection's ResNet names its layers as torchvision's does (conv1, bn1, layer1.0.conv1,
    # ..., downsample.0/1) and has no fc; its BatchNorm keeps num_batches_tracked
    trunk = getattr(torchvision.models, arch)(weights=None).state_dict()
    state = {f"backbone.{k}": v for k, v in trunk.items() if not k.startswith("fc.")}
    stage_channels, channels = neck
    for i, width in enumerate(stage_channels):
        state[f"neck.lateral_convs.{i}.conv.weight"] = torch.empty(channels, width, 1, 1)
        state[f"neck.lateral_convs.{i}.conv.bias"] = torch.empty(channels)
        state[f"neck.fpn_convs.{i}.conv.weight"] = torch.empty(channels, channels, 3, 3)
        state[f"neck.fpn_convs.{i}.conv.bias"] = torch.empty(channels)
    anchors = 3  # scale 8, ratios 0.5 / 1 / 2; sigmoid objectness: one logit per anchor
    for name, out, kernel in (("rpn_conv", channels, 3), ("rpn_cls", anchors, 1),
                              ("rpn_reg", 4 * anchors, 1)):  # fmt: skip
        state[f"rpn_head.{name}.weight"] = torch.empty(out, channels, kernel, kernel)
        state[f"rpn_head.{name}.bias"] = torch.empty(out)
    sizes = {"K+1": num_classes + 1, "4K": 4 * num_classes, "4": 4, "F": fc_dim}
    sizes["D"] = channels * 7 * 7
    for i, head in enumerate(heads):
        prefix = f"roi_head.bbox_head.{i}." if listed else "roi_head.bbox_head."
        for layer, (rows, cols) in HEAD_SHAPES[head].items():
            state[f"{prefix}{layer}.weight"] = torch.empty(sizes[rows], sizes[cols])
            state[f"{prefix}{layer}.bias"] = torch.empty(sizes[rows])
    for key, value in state.items():  # small random weights, positive variances
        if key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(value.shape, generator=generator)
        elif value.is_floating_point():
            state[key] = 0.05 * torch.randn(value.shape, generator=generator)
        else:
            state[key] = torch.randint(1, 1000, value.shape, generator=generator)
    return state


@functools.cache
def _synthetic_state(config: Path) -> dict[str, Tensor]:
    heads, listed = HEADS[config]
    return mmdet_state_dict("resnet18", ([64, 128, 256, 512], 64), 8, 256, heads, listed)


def synthetic_state(config: Path) -> dict[str, Tensor]:
    """mmdetection weights for a synthetic R-18 config (8 classes); the dict is the caller's."""
    return dict(_synthetic_state(config))


@functools.cache
def model_of(config: Path) -> torch.nn.Module:
    """The config's model in eval mode, built once (tests load their own weights into it)."""
    return build_detector(load_config(config, NO_WEIGHTS)).eval()


def stored_shapes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The same keys and shapes backed by one shared zero (a few bytes on disk): for refusals."""
    return {k: v.new_zeros(()).expand(v.shape) for k, v in state.items()}


def save_mmcv(path: Path, state: dict[str, Tensor], **extra: object) -> Path:
    """A file as mmcv 1.x's save_checkpoint writes it (legacy torch format, as torch 1.6 did)."""
    meta = {"mmdet_version": "2.4.0", "config": "model = dict(type='FasterRCNN')", "epoch": 24,
            "iter": 175872, "mmcv_version": "1.1.2", "time": "Tue Sep 1 12:00:00 2020",
            "CLASSES": SYNTHETIC_NAMES}  # fmt: skip
    torch.save({"meta": meta, "state_dict": state, **extra}, path,
               _use_new_zipfile_serialization=False)  # fmt: skip
    return path


def test_decoupled_maps_value_for_value():
    model = model_of(DECOUPLED)
    mm = synthetic_state(DECOUPLED)
    ours = convert_mmdet_state_dict(model, mm)
    assert set(ours) == set(model.state_dict())
    s0 = "roi_heads.stages.0."
    # background: mmdetection's last class row is drcnn's first; class k (1..8) is row k - 1
    fc_cls = mm["roi_head.bbox_head.0.fc_cls.weight"]
    assert torch.equal(ours[s0 + "cls_score.weight"][0], fc_cls[8])
    assert torch.equal(ours[s0 + "cls_score.bias"][0], mm["roi_head.bbox_head.0.fc_cls.bias"][8])
    assert torch.equal(ours[s0 + "cls_score.weight"][1], fc_cls[0])
    assert torch.equal(ours[s0 + "cls_score.weight"][5], fc_cls[4])
    # stage 0's class-specific deltas: 4 x 8 rows on both sides, class k at rows 4(k-1)..
    assert torch.equal(ours[s0 + "bbox_pred.weight"], mm["roi_head.bbox_head.0.fc_reg.weight"])
    assert torch.equal(ours[s0 + "reg_fc7.bias"], mm["roi_head.bbox_head.0.reg_fcs.1.bias"])
    assert torch.equal(ours[s0 + "cls_fc6.weight"], mm["roi_head.bbox_head.0.cls_fcs.0.weight"])
    # a refine stage
    s2 = "roi_heads.stages.2."
    assert torch.equal(ours[s2 + "fc6.weight"], mm["roi_head.bbox_head.2.reg_fcs.0.weight"])
    assert torch.equal(ours[s2 + "bbox_pred.bias"], mm["roi_head.bbox_head.2.fc_reg.bias"])
    # FPN convs, a BatchNorm buffer and counter (trainable BN in the synthetic R-18)
    fpn = "backbone.fpn."
    assert torch.equal(ours[fpn + "layer_blocks.2.0.weight"], mm["neck.fpn_convs.2.conv.weight"])
    assert torch.equal(ours[fpn + "inner_blocks.1.0.bias"], mm["neck.lateral_convs.1.conv.bias"])
    bn = "layer3.1.bn2."
    for buffer in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(ours[f"backbone.body.{bn}{buffer}"], mm[f"backbone.{bn}{buffer}"])
    # RPN: same anchor order and delta order, rows as they are
    for ours_key, mm_key in (("cls_logits", "rpn_cls"), ("bbox_pred", "rpn_reg"),
                             ("conv.0.0", "rpn_conv")):  # fmt: skip
        assert torch.equal(ours[f"rpn.head.{ours_key}.weight"], mm[f"rpn_head.{mm_key}.weight"])


def test_faster_gets_a_zero_background_slot():
    model = model_of(FASTER)
    mm = synthetic_state(FASTER)
    ours = convert_mmdet_state_dict(model, mm)
    deltas = ours["roi_heads.stages.0.bbox_pred.weight"]
    assert deltas.shape == (4 * 9, 256)
    assert torch.equal(deltas[:4], torch.zeros(4, 256))
    assert torch.equal(deltas[4:], mm["roi_head.bbox_head.fc_reg.weight"])
    assert torch.equal(ours["roi_heads.stages.0.bbox_pred.bias"][:4], torch.zeros(4))
    fc7 = mm["roi_head.bbox_head.shared_fcs.1.weight"]
    assert torch.equal(ours["roi_heads.stages.0.fc7.weight"], fc7)


def mmdet_head_forward(mm: dict[str, Tensor], prefix: str, head: str, x: Tensor):
    """(class logits or None, deltas) of an mmdetection bbox head, computed from its weights."""

    def fc(name: str, h: Tensor) -> Tensor:
        return F.linear(h, mm[f"{prefix}{name}.weight"], mm[f"{prefix}{name}.bias"])

    x = x.flatten(1)
    if head.startswith("shared"):
        h = F.relu(fc("shared_fcs.1", F.relu(fc("shared_fcs.0", x))))
        return fc("fc_cls", h), fc("fc_reg", h)
    reg = fc("fc_reg", F.relu(fc("reg_fcs.1", F.relu(fc("reg_fcs.0", x)))))
    if head == "refine":
        return None, reg
    return fc("fc_cls", F.relu(fc("cls_fcs.1", F.relu(fc("cls_fcs.0", x))))), reg


@pytest.mark.parametrize("config", [FASTER, CASCADE, DECOUPLED, DYNAMIC], ids=lambda p: p.stem)
def test_heads_compute_what_mmdetection_computes(config):
    """Scores of class k, background and the deltas of class k agree with mmdetection's
    (Dynamic R-CNN's running statistics, absent there, keep their initial values)."""
    model = model_of(config)
    mm = synthetic_state(config)
    load_mmdet_checkpoint(model, mm)
    if config == DYNAMIC:
        assert model.roi_heads.iou_thresh.item() == 0.5 and int(model.roi_heads.recorded) == 0
    heads, listed = HEADS[config]
    x = torch.randn(6, 64, 7, 7) * 0.05
    labels = torch.tensor([1, 2, 3, 5, 8, 8])  # drcnn labels 1..K = mmdetection labels 0..K-1
    for i, (head, stage) in enumerate(zip(heads, model.roi_heads.stages, strict=True)):
        logits, deltas = mmdet_head_forward(
            mm, f"roi_head.bbox_head.{i}." if listed else "roi_head.bbox_head.", head, x
        )
        with torch.no_grad():
            out = stage(x)
        ours_logits, ours_deltas = out if isinstance(out, tuple) else (None, out)
        if logits is not None:
            theirs, probs = F.softmax(logits, 1), F.softmax(ours_logits, 1)
            torch.testing.assert_close(probs[:, 1:], theirs[:, :-1])  # foreground classes
            torch.testing.assert_close(probs[:, 0], theirs[:, -1])  # background
        if stage.class_specific:
            per_class = deltas.view(6, -1, 4)
            torch.testing.assert_close(stage.foreground_deltas(ours_deltas), per_class)
            torch.testing.assert_close(
                stage.deltas_for_labels(ours_deltas, labels), per_class[torch.arange(6), labels - 1]
            )
        else:
            torch.testing.assert_close(ours_deltas, deltas)


def mmdet_base_anchors(stride: int, ratios: list[float], scales: list[float]) -> Tensor:
    """mmdetection 2.x AnchorGenerator.gen_single_level_base_anchors (center_offset=0,
    scale_major=True): ratio-major, centred on 0, not rounded."""
    rows = []
    for ratio in ratios:
        for scale in scales:
            w = stride * scale / math.sqrt(ratio)
            h = stride * scale * math.sqrt(ratio)
            rows.append([-0.5 * w, -0.5 * h, 0.5 * w, 0.5 * h])
    return torch.tensor(rows)


def test_rpn_anchor_order_is_mmdetections():
    """The RPN rows need no permutation: each location's anchors come in mmdetection's order.

    torchvision rounds the base anchors to whole pixels (mmdetection does not): at most 0.5 px.
    """
    model = model_of(DECOUPLED)
    generator = model.rpn.anchor_generator
    for stride, cell in zip((4, 8, 16, 32, 64), generator.cell_anchors, strict=True):
        theirs = mmdet_base_anchors(stride, [0.5, 1.0, 2.0], [8.0])
        assert (cell - theirs).abs().max() <= 0.5


@pytest.mark.parametrize("norm", ["eval_bn", "frozen_bn"])
def test_r50_coco_checkpoint(norm):
    """The official R-50 COCO layout: 80 classes; mmdetection's BatchNorm counters kept for
    eval-mode BN (the official configs' norm) and dropped for frozen BN, which has none."""
    cfg = load_config(DECOUPLED_COCO, [*NO_WEIGHTS, f"model.backbone.norm={norm}"])
    model = build_detector(cfg).eval()
    neck = ([256, 512, 1024, 2048], 256)
    mm = mmdet_state_dict("resnet50", neck, 80, 1024, HEADS[DECOUPLED][0], True)
    counter = "backbone.layer1.0.bn1.num_batches_tracked"
    assert counter in mm
    ours = convert_mmdet_state_dict(model, mm)
    counters = [k for k in ours if k.endswith("num_batches_tracked")]
    if norm == "frozen_bn":
        assert not counters
    else:
        assert torch.equal(ours["backbone.body.layer1.0.bn1.num_batches_tracked"], mm[counter])
    assert torch.equal(ours["backbone.body.layer4.2.bn3.running_mean"],
                       mm["backbone.layer4.2.bn3.running_mean"])  # fmt: skip
    assert torch.equal(ours["backbone.body.layer2.0.downsample.1.weight"],
                       mm["backbone.layer2.0.downsample.1.weight"])  # fmt: skip
    fc_cls = mm["roi_head.bbox_head.0.fc_cls.weight"]
    background_first = torch.cat([fc_cls[80:], fc_cls[:80]])
    assert torch.equal(ours["roi_heads.stages.0.cls_score.weight"], background_first)
    fc7 = mm["roi_head.bbox_head.1.reg_fcs.1.weight"]
    assert torch.equal(ours["roi_heads.stages.1.fc7.weight"], fc7)


def test_coco_class_meta():
    """COCO names in mmdetection's order get COCO's category ids (label k -> cat_ids[k-1])."""
    meta = class_meta({}, 80, "ckpt")  # no CLASSES, 80 classes: mmdetection's COCO
    names, ids = meta["class_names"], meta["cat_ids"]
    assert len(names) == len(ids) == 80
    known = {"person": 1, "traffic light": 10, "stop sign": 13, "backpack": 27,
             "dining table": 67, "tv": 72, "toothbrush": 90}  # fmt: skip
    assert {name: ids[names.index(name)] for name in known} == known
    assert ids == sorted(ids)
    assert class_meta({"CLASSES": tuple(names)}, 80, "ckpt") == meta
    other = class_meta({"CLASSES": SYNTHETIC_NAMES}, 8, "ckpt")
    assert other == {"class_names": list(SYNTHETIC_NAMES), "cat_ids": []}
    with pytest.raises(DrcnnError, match=r"meta CLASSES has 8 classes.*num_classes is 80"):
        class_meta({"CLASSES": SYNTHETIC_NAMES}, 80, "ckpt")


def test_faster_checkpoint_refused_by_decoupled_config():
    model = model_of(DECOUPLED)
    with pytest.raises(DrcnnError) as info:
        load_mmdet_checkpoint(model, synthetic_state(FASTER), "faster.pth")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("faster.pth: does not fit the config's model (decoupled RoI head")
    assert "no key roi_head.bbox_head.0.cls_fcs.0.weight" in message
    assert "unexpected key roi_head.bbox_head.shared_fcs.0.weight" in message


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda s: s.update({"roi_head.bbox_head.0.fc_cls.weight": torch.zeros(10, 256)}),
         r"key roi_head\.bbox_head\.0\.fc_cls\.weight has shape \(10, 256\), the config's model "
         r"expects \(9, 256\) \(drcnn roi_heads\.stages\.0\.cls_score\.weight\)"),
        (lambda s: s.pop("neck.fpn_convs.3.conv.bias"),
         r"no key neck\.fpn_convs\.3\.conv\.bias "
         r"\(drcnn backbone\.fpn\.layer_blocks\.3\.0\.bias\)"),
        (lambda s: s.update({"roi_head.mask_head.conv.weight": torch.zeros(1)}),
         r"unexpected key roi_head\.mask_head\.conv\.weight$"),
        (lambda s: s.update({"rpn_head.rpn_cls.weight": [0.0]}),
         r"key rpn_head\.rpn_cls\.weight is not a tensor"),
    ],
    ids=["shape", "missing", "unexpected", "not-a-tensor"],
)  # fmt: skip
def test_bad_state_dict_names_the_key(change, expected):
    model = model_of(DECOUPLED)
    state = synthetic_state(DECOUPLED)
    change(state)
    with pytest.raises(DrcnnError, match=expected):
        load_mmdet_checkpoint(model, state)


def test_mmcv_checkpoint_reads_with_weights_only(tmp_path):
    state = synthetic_state(DECOUPLED)
    optimizer = {"state": {0: {"momentum_buffer": torch.ones(3)}},
                 "param_groups": [{"lr": 0.01, "params": [0]}]}  # fmt: skip
    path = save_mmcv(tmp_path / "ckpt.pth", state, optimizer=optimizer)
    loaded, meta = read_mmdet_checkpoint(path)
    assert meta["CLASSES"] == SYNTHETIC_NAMES
    assert loaded.keys() == state.keys()
    assert torch.equal(loaded["rpn_head.rpn_reg.bias"], state["rpn_head.rpn_reg.bias"])


def test_convert_command_end_to_end(tmp_path, capsys):
    """CKPT -> OUT.pth; load_model takes it (stored config), it detects, and infer runs."""
    ckpt = save_mmcv(tmp_path / "mmdet.pth", synthetic_state(DECOUPLED))
    out = tmp_path / "converted" / "drcnn.pth"
    assert main(["convert", "mmdet", str(ckpt), "--config", str(DECOUPLED), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    state = load_checkpoint(out)
    assert state["class_names"] == list(SYNTHETIC_NAMES) and state["cat_ids"] == []
    assert state["config"]["model"]["backbone"]["pretrained"] is None
    model, cfg = load_model(out)
    assert cfg.model.roi_head.type == "decoupled"
    reference = model_of(DECOUPLED)
    load_mmdet_checkpoint(reference, synthetic_state(DECOUPLED))
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    image = torch.rand(3, 96, 128)
    with torch.no_grad():
        (detections,) = model([image])
    assert len(detections["boxes"]) > 0 and detections["boxes"].isfinite().all()

    picture = tmp_path / "tiny.png"
    Image.fromarray((image.permute(1, 2, 0) * 255).byte().numpy()).save(picture)
    infer_out = tmp_path / "infer"
    argv = ["infer", DECOUPLED, out, picture, "--out", infer_out, "--score-thr", "0",
            "--device", "cpu"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    entries = json.loads((infer_out / "detections.json").read_text())
    assert entries[0]["file"] == str(picture)
    labels = [d["label"] for d in entries[0]["detections"]]
    assert labels == [SYNTHETIC_NAMES[k - 1] for k in detections["labels"].tolist()]


class NotPlain:
    """An object torch.load(weights_only=True) must refuse to construct."""


def test_convert_command_refusals(tmp_path, capsys):
    decoupled = save_mmcv(tmp_path / "decoupled.pth", stored_shapes(synthetic_state(DECOUPLED)))
    faster = save_mmcv(tmp_path / "faster.pth", stored_shapes(synthetic_state(FASTER)))
    wrong = stored_shapes(synthetic_state(DECOUPLED))
    wrong["roi_head.bbox_head.1.fc_reg.weight"] = torch.zeros(8, 256)
    wrong = save_mmcv(tmp_path / "wrong.pth", wrong)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"meta": {"hook": NotPlain()}, "state_dict": {}}, unsafe)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    ours = save_checkpoint(tmp_path / "drcnn.pth", {"model": {"w": torch.zeros(1)}})
    existing = tmp_path / "out" / "existing.pth"
    existing.parent.mkdir()
    existing.write_bytes(b"the user's file")
    out = tmp_path / "out" / "new.pth"

    def refuse(ckpt: Path, target: Path = out) -> str:
        argv = ["convert", "mmdet", ckpt, "--config", DECOUPLED, "--out", target]
        return expect_refusal(argv, capsys, watch=[tmp_path])

    assert "already exists" in refuse(decoupled, existing)
    assert "no key roi_head.bbox_head.0.cls_fcs.0.weight" in refuse(faster)
    assert "key roi_head.bbox_head.1.fc_reg.weight has shape (8, 256)" in refuse(wrong)
    assert "not loadable with torch.load(weights_only=True)" in refuse(unsafe)
    assert "not loadable with torch.load(weights_only=True)" in refuse(garbage)
    assert "not an mmdetection checkpoint" in refuse(ours)
    assert "mmdetection checkpoint not found" in refuse(tmp_path / "missing.pth")
    assert not out.exists()
