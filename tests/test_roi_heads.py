"""RoI heads: torchvision parity, losses, decoupled sampling/refinement, cascade scores, analyze."""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import pytest
import torch
from omegaconf import OmegaConf
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import MultiScaleRoIAlign, box_iou

from drcnn.config import ROI_HEAD_TYPES, RoIHeadConfig, StageConfig, load_config
from drcnn.errors import DrcnnError
from drcnn.models.roi_heads import ROI_HEADS, build_roi_heads
from drcnn.models.roi_heads import base as roi_base
from drcnn.models.roi_heads.decoupled import padded_reg_count
from drcnn.models.sampling import positive_sample, random_sample, sample_rois

K = 3  # foreground classes
CHANNELS = 8
SHAPES = [(128, 96), (112, 128)]
STAGES = [
    StageConfig(0.5, [0.1, 0.1, 0.2, 0.2], 1.0),
    StageConfig(0.6, [0.05, 0.05, 0.1, 0.1], 0.5),
    StageConfig(0.7, [0.033, 0.033, 0.067, 0.067], 0.25),
]


class ProposalSets(NamedTuple):
    """Stand-in for the RPN's two proposal sets."""

    cls: list[torch.Tensor]
    reg: list[torch.Tensor]


def make_cfg(kind: str, num_stages: int = 1, *overrides: str):
    cfg = load_config(
        None,
        overrides=[
            f"model.roi_head.type={kind}",
            f"model.roi_head.num_classes={K}",
            "model.roi_head.fc_dim=64",
            *overrides,
        ],
    )
    cfg.model.roi_head.stages = STAGES[:num_stages]
    return cfg


def make_head(kind: str, num_stages: int = 1, *overrides: str, delta_std: float = 0.05):
    """A head whose output layers are re-drawn so scores and moves are far from uniform / zero."""
    torch.manual_seed(0)
    head = build_roi_heads(make_cfg(kind, num_stages, *overrides), CHANNELS)
    for stage in head.stages:
        torch.nn.init.normal_(stage.bbox_pred.weight, std=delta_std)
        if hasattr(stage, "cls_score"):
            torch.nn.init.normal_(stage.cls_score.weight, std=0.3)
    return head


def features(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, w = 128, 128  # padded batch size
    return {
        str(i): torch.randn(2, CHANNELS, h // 2 ** (i + 2), w // 2 ** (i + 2), generator=g)
        for i in range(4)
    }


def random_boxes(n: int, shape: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    h, w = shape
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
    wh = 8 + torch.rand(n, 2, generator=g) * 40
    return torch.cat([xy, torch.minimum(xy + wh, torch.tensor([w - 1.0, h - 1.0]))], dim=1)


def jitter(boxes: torch.Tensor, n: int, scale: float, g: torch.Generator) -> torch.Tensor:
    rep = boxes.repeat_interleave(n, dim=0)
    wh = (rep[:, 2:] - rep[:, :2]).repeat(1, 2)
    return rep + (torch.rand(rep.shape, generator=g) * 2 - 1) * scale * wh


def targets() -> list[dict[str, torch.Tensor]]:
    return [
        {
            "boxes": torch.tensor([[10.0, 20.0, 50.0, 70.0], [40.0, 30.0, 90.0, 100.0]]),
            "labels": torch.tensor([2, 3]),
        },
        {"boxes": torch.tensor([[30.0, 30.0, 80.0, 60.0]]), "labels": torch.tensor([1])},
    ]


def proposals(seed: int, t=None, near: int = 15, scale: float = 0.15) -> list[torch.Tensor]:
    """Random boxes plus, when targets are given, jittered copies of each gt box."""
    g = torch.Generator().manual_seed(seed)
    out = [random_boxes(60, s, g) for s in SHAPES]
    if t is not None:
        out = [
            torch.cat([p, jitter(x["boxes"], near, scale, g)]) for p, x in zip(out, t, strict=True)
        ]
    return out


def decode64(boxes: torch.Tensor, deltas: torch.Tensor, stds, shapes, counts) -> torch.Tensor:
    """Hand float64 decode (centre shift x size, size x exp) and clip to each image."""
    b, d = boxes.double(), deltas.double() * torch.tensor(stds, dtype=torch.float64)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    cx, cy = b[:, 0] + w / 2 + d[:, 0] * w, b[:, 1] + h / 2 + d[:, 1] * h
    nw, nh = w * torch.exp(d[:, 2]), h * torch.exp(d[:, 3])
    out = torch.stack([cx - nw / 2, cy - nh / 2, cx + nw / 2, cy + nh / 2], dim=1)
    parts = []
    for part, (ih, iw) in zip(out.split(counts), shapes, strict=True):
        parts.append(
            torch.stack(
                [
                    part[:, 0].clamp(0, iw),
                    part[:, 1].clamp(0, ih),
                    part[:, 2].clamp(0, iw),
                    part[:, 3].clamp(0, ih),
                ],
                1,
            )
        )
    return torch.cat(parts)


def encode64(rois: torch.Tensor, gt: torch.Tensor, stds) -> torch.Tensor:
    r, t = rois.double(), gt.double()
    rw, rh, tw, th = r[:, 2] - r[:, 0], r[:, 3] - r[:, 1], t[:, 2] - t[:, 0], t[:, 3] - t[:, 1]
    d = torch.stack(
        [
            (t[:, 0] + tw / 2 - r[:, 0] - rw / 2) / rw,
            (t[:, 1] + th / 2 - r[:, 1] - rh / 2) / rh,
            torch.log(tw / rw),
            torch.log(th / rh),
        ],
        dim=1,
    )
    return d / torch.tensor(stds, dtype=torch.float64)


# ---- torchvision parity -----------------------------------------------------------------------
def torchvision_twin(head) -> RoIHeads:
    twin = RoIHeads(
        MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2),
        TwoMLPHead(CHANNELS * 49, 64),
        FastRCNNPredictor(64, K + 1),
        0.5,
        0.5,
        512,
        0.25,
        None,
        0.05,
        0.5,
        100,
    )
    state = head.stages[0].state_dict()
    twin.box_head.load_state_dict({k: v for k, v in state.items() if k.startswith("fc")})
    twin.box_predictor.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc")})
    return twin


def test_standard_head_equals_torchvision_roi_heads():
    settings = (
        "model.roi_head.sampling_ratio=2",
        "model.roi_head.loss_bbox={type: smooth_l1, beta: 0.1111111111111111}",
        "model.roi_head.test.score_thresh=0.05",
        "model.roi_head.test.min_box_size=0.01",
    )
    head = make_head("standard", 1, *settings)
    twin = torchvision_twin(head)
    feats, t = features(), targets()
    props = proposals(1, t)

    head.eval(), twin.eval()
    with torch.no_grad():
        ours, _ = head(feats, props, SHAPES)
        ref, _ = twin(feats, props, SHAPES)
    for a, b in zip(ours, ref, strict=True):
        assert 20 < len(b["boxes"]) <= 100
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1e-5)
        torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=1e-5)

    head.train(), twin.train()
    torch.manual_seed(7)
    _, losses = head(feats, props, SHAPES, t)
    torch.manual_seed(7)
    _, ref_losses = twin(feats, props, SHAPES, t)
    torch.testing.assert_close(losses["s0.loss_cls"], ref_losses["loss_classifier"])
    torch.testing.assert_close(losses["s0.loss_bbox"], ref_losses["loss_box_reg"])


# ---- training -----------------------------------------------------------------------------------
EXPECTED_KEYS = {
    ("standard", 1): {"s0.loss_cls", "s0.loss_bbox", "s0.acc"},
    ("cascade", 3): {"s0.acc"} | {f"s{i}.loss_{k}" for i in range(3) for k in ("cls", "bbox")},
    ("decoupled", 3): {"s0.loss_cls", "s0.acc", "s0.loss_bbox", "s1.loss_bbox", "s2.loss_bbox"},
    ("decoupled", 1): {"s0.loss_cls", "s0.acc", "s0.loss_bbox"},
}


@pytest.mark.parametrize(("kind", "num_stages"), list(EXPECTED_KEYS))
def test_losses_finite_with_empty_and_one_box_images(kind, num_stages):
    head = make_head(kind, num_stages, delta_std=0.001)
    t = [
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
        {"boxes": torch.tensor([[30.0, 30.0, 80.0, 60.0]]), "labels": torch.tensor([2])},
    ]
    props = proposals(2, t, near=10, scale=0.05)
    if kind == "decoupled":
        props = ProposalSets(props, proposals(3, t, near=20, scale=0.05))
    head.train()
    _, losses = head(features(), props, SHAPES, t)
    assert set(losses) == EXPECTED_KEYS[(kind, num_stages)]
    for key, value in losses.items():
        assert torch.isfinite(value), key
        assert value > 0 or key == "s0.acc", key  # every stage found positives to regress
    assert 0 <= losses["s0.acc"] <= 1 and not losses["s0.acc"].requires_grad
    sum(v for k, v in losses.items() if ".loss" in k).backward()
    grads = [p.grad for p in head.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("num_reg", [512, 100])
def test_decoupled_sampling_refinement_and_normalisers(monkeypatch, num_reg):
    head = make_head("decoupled", 3, f"model.roi_head.reg_sampler.num={num_reg}")
    calls = []

    def spy(proposals, gt_boxes, gt_labels, iou_thresh, sampler, add_gt):
        out = roi_sample(proposals, gt_boxes, gt_labels, iou_thresh, sampler, add_gt)
        calls.append((proposals, iou_thresh, add_gt, out))
        return out

    roi_sample = roi_base.sample_rois
    monkeypatch.setattr(roi_base, "sample_rois", spy)
    deltas = []
    for stage in head.stages:
        stage.bbox_pred.register_forward_hook(lambda m, i, o: deltas.append(o.detach()))

    t = targets()
    sets = ProposalSets(proposals(4, t, near=5), proposals(5, t, near=25, scale=0.1))
    head.train()
    _, losses = head(features(), sets, SHAPES, t)
    # one batched call per stage and branch: cls, reg, refine 1, refine 2
    assert len(calls) == 4 and len(deltas) == 3
    cls_call, reg_call, s1_call, s2_call = calls

    props, iou, add_gt, _ = cls_call
    assert all(p is e for p, e in zip(props, sets.cls, strict=True)) and iou == 0.5 and add_gt
    # Regression samples: exactly the regression proposals with IoU >= 0.5, no gt added.
    props, iou, add_gt, reg_out = reg_call
    assert all(p is e for p, e in zip(props, sets.reg, strict=True))
    assert iou == 0.5 and not add_gt
    for out, expected, x in zip(reg_out, sets.reg, t, strict=True):
        positive = box_iou(expected.double(), x["boxes"].double()).max(dim=1).values >= 0.5
        assert 10 < positive.sum() < num_reg
        assert torch.equal(out.boxes, expected[positive])

    # Refine stages assign the previous stage's RoIs moved by its deltas (gt class in stage 0).
    reg_rois = torch.cat([o.boxes for o in reg_out])
    reg_labels = torch.cat([o.labels for o in reg_out])
    picked0 = deltas[0].unflatten(1, (K, 4))[torch.arange(len(reg_labels)), reg_labels - 1]
    counts = [len(o.boxes) for o in reg_out]
    moved0 = decode64(reg_rois, picked0, STAGES[0].target_stds, SHAPES, counts)
    assert (moved0 - reg_rois.double()).abs().max() > 0.3  # the move is visible
    torch.testing.assert_close(torch.cat(s1_call[0]).double(), moved0, rtol=0, atol=1e-3)
    assert s1_call[1] == 0.6 and not s1_call[2]
    s1_rois = torch.cat([o.boxes for o in s1_call[3]])
    moved1 = decode64(
        s1_rois, deltas[1], STAGES[1].target_stds, SHAPES, [len(o.boxes) for o in s1_call[3]]
    )
    torch.testing.assert_close(torch.cat(s2_call[0]).double(), moved1, rtol=0, atol=1e-3)
    assert s2_call[1] == 0.7 and not s2_call[2]

    # Normalisers (official avg_factor): the official positive sampler pads each image's
    # regression sample with negatives to num rows, min(num, proposals); stage 0 divides by
    # cls samples + those rows, each refine stage by 2 x those rows (refine_bbox_head.py).
    padded = sum(min(num_reg, len(p)) for p in sets.reg)
    assert padded == (195 if num_reg == 512 else 185)  # 110 and 85 proposals
    num_cls = sum(len(o.boxes) for o in cls_call[3])
    reg_gt = torch.cat([o.gt_boxes for o in reg_out])
    l1 = (picked0.double() - encode64(reg_rois, reg_gt, STAGES[0].target_stds)).abs().sum()
    assert losses["s0.loss_bbox"].item() == pytest.approx(
        (l1 / (num_cls + padded)).item(), rel=1e-4
    )
    for stage, call in ((1, s1_call), (2, s2_call)):
        rois = torch.cat([o.boxes for o in call[3]])
        gt = torch.cat([o.gt_boxes for o in call[3]])
        target = encode64(rois, gt, STAGES[stage].target_stds)
        l1 = (deltas[stage].double() - target).abs().sum()
        expected = STAGES[stage].loss_weight * l1 / (2 * padded)
        assert losses[f"s{stage}.loss_bbox"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_padded_reg_count_formula():
    """Hand-worked: num 4; images with 6, 2 and 0 regression proposals -> 4 + 2 + 0 rows."""
    assert padded_reg_count([6, 2, 0], 4) == 6
    assert padded_reg_count([512, 700], 512) == 1024  # COCO: 512 rows per image, 1024 refine


# ---- inference ----------------------------------------------------------------------------------
def capture_nms_inputs(monkeypatch) -> list:
    seen = []
    real = roi_base.multiclass_nms

    def spy(boxes, scores, image_size, test_cfg, **kwargs):
        seen.append((boxes, scores))
        return real(boxes, scores, image_size, test_cfg, **kwargs)

    monkeypatch.setattr(roi_base, "multiclass_nms", spy)
    return seen


def manual_chain(head, feats, props, labels=None):
    """Stages run by hand: per-stage class logits, the boxes each stage sees, its raw outputs."""
    counts = [len(p) for p in props]
    boxes = torch.cat(props)
    logit_list, inputs, raw = [], [], []
    for i, stage in enumerate(head.stages):
        x = head.box_roi_pool(feats, list(boxes.split(counts)), SHAPES)
        out = stage(x)
        logits, d = out if isinstance(out, tuple) else (None, out)
        if logits is not None:
            logit_list.append(logits)
        inputs.append(boxes)
        raw.append(d)
        if d.shape[1] > 4:
            chosen = labels if labels is not None else logits[:, 1:].argmax(1) + 1
            slots = chosen if d.shape[1] == 4 * (K + 1) else chosen - 1
            d = d.unflatten(1, (-1, 4))[torch.arange(len(d)), slots]
        boxes = decode64(boxes, d, STAGES[i].target_stds, SHAPES, counts).float()
    return logit_list, inputs, raw, boxes


def clip_per_image(boxes: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """``(N, K, 4)`` boxes clipped to their image (as the NMS step clips them), in float64."""
    clipped = []
    for b, (h, w) in zip(boxes.split(counts), SHAPES, strict=True):
        b = b.clone()
        b[..., 0::2] = b[..., 0::2].clamp(0, w)
        b[..., 1::2] = b[..., 1::2].clamp(0, h)
        clipped.append(b)
    return torch.cat(clipped).double()


def scores_of(logits: list[torch.Tensor]) -> torch.Tensor:
    """Inference scores: the softmax of the logits averaged over the classifying stages, in
    float64 (mmdetection's CascadeRoIHead: sum(ms_scores) / num_stages, then softmax)."""
    return torch.softmax(torch.stack([lg.double() for lg in logits]).mean(0), 1)


def test_cascade_scores_are_softmax_of_stage_averaged_logits(monkeypatch):
    head = make_head("cascade", 3)
    seen = capture_nms_inputs(monkeypatch)
    feats, props = features(), proposals(6, targets())
    head.eval()
    with torch.no_grad():
        head(feats, props, SHAPES)
        logits, inputs, raw, _ = manual_chain(head, feats, props)
    counts = [len(p) for p in props]
    expected = scores_of(logits)[:, 1:]
    mean_of_probs = sum(torch.softmax(lg.double(), 1) for lg in logits)[:, 1:] / 3
    assert (expected - mean_of_probs).abs().max() > 1e-3  # the order of mean and softmax matters
    got = torch.cat([s for _, s in seen]).double()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # Boxes: the last stage's class-specific decode of its own inputs (clipped by the NMS step).
    last = raw[2].unflatten(1, (K + 1, 4))[:, 1:]
    stds = STAGES[2].target_stds
    expected = torch.stack(
        [decode64(inputs[2], last[:, k], stds, SHAPES, counts) for k in range(K)], dim=1
    )
    got = torch.cat([b for b, _ in seen])
    assert got.shape == (sum(counts), K, 4)
    torch.testing.assert_close(clip_per_image(got, counts), expected, rtol=0, atol=1e-3)


def test_decoupled_inference_uses_stage0_scores_and_last_boxes(monkeypatch):
    head = make_head("decoupled", 3)
    seen = capture_nms_inputs(monkeypatch)
    feats, props = features(), proposals(7, targets())
    head.eval()
    with torch.no_grad():
        dets, _ = head(feats, props, SHAPES)
        logits, _, _, final = manual_chain(head, feats, props)
    assert len(logits) == 1
    torch.testing.assert_close(
        torch.cat([s for _, s in seen]), torch.softmax(logits[0], 1)[:, 1:], rtol=0, atol=1e-6
    )
    shared = torch.cat([b for b, _ in seen])
    assert shared.shape == (sum(len(p) for p in props), 4)
    torch.testing.assert_close(shared, final, rtol=0, atol=1e-3)
    assert all(d["labels"].min() >= 1 and d["labels"].max() <= K for d in dets)


def test_decoupled_without_refine_stages_decodes_each_class_box(monkeypatch):
    """N = 1: every class gets its own decoded box (the official DecoupledRoIHead's
    ``get_bboxes``), not the box moved by the arg-max class's deltas."""
    head = make_head("decoupled", 1)
    seen = capture_nms_inputs(monkeypatch)
    feats, props = features(), proposals(7, targets())
    counts = [len(p) for p in props]
    head.eval()
    with torch.no_grad():
        head(feats, props, SHAPES)
        _, inputs, raw, moved = manual_chain(head, feats, props)
    per_class = raw[0].unflatten(1, (K, 4))  # 4K deltas, no background slot
    stds = STAGES[0].target_stds
    expected = torch.stack(
        [decode64(inputs[0], per_class[:, k], stds, SHAPES, counts) for k in range(K)], dim=1
    )
    got = torch.cat([b for b, _ in seen])
    assert got.shape == (sum(counts), K, 4)
    torch.testing.assert_close(clip_per_image(got, counts), expected, rtol=0, atol=1e-3)
    assert (expected - moved.double()[:, None]).abs().amax() > 1.0  # not the arg-max box


# ---- analyze -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "num_stages"), [("decoupled", 3), ("cascade", 3), ("standard", 1)]
)
def test_analyze_shapes_and_given_label(kind, num_stages):
    head = make_head(kind, num_stages)
    head.eval()
    feats, t = features(), targets()
    boxes = [jitter(x["boxes"], 4, 0.2, torch.Generator().manual_seed(8)) for x in t]
    labels = [x["labels"].repeat_interleave(4) for x in t]
    flipped = [lab % K + 1 for lab in labels]  # every box gets another class
    with torch.no_grad():
        out = head.analyze(feats, boxes, SHAPES, labels)
        other = head.analyze(feats, boxes, SHAPES, flipped)
        logits, _, raw, _ = manual_chain(head, feats, boxes, torch.cat(labels))
    n = sum(len(b) for b in boxes)
    assert out["class_probs"].shape == (n, K + 1)
    assert (
        len(out["stage_inputs"])
        == len(out["stage_boxes"])
        == len(out["stage_deltas"])
        == num_stages
    )
    assert len(out["box_coders"]) == num_stages
    assert all(
        x.shape == (n, 4)
        for key in ("stage_inputs", "stage_boxes", "stage_deltas")
        for x in out[key]
    )
    torch.testing.assert_close(out["stage_inputs"][0], torch.cat(boxes))
    torch.testing.assert_close(out["class_probs"].double(), scores_of(logits), rtol=0, atol=1e-6)
    # stage 0 moves each box with the deltas of its GIVEN label
    lab = torch.cat(labels)
    slots = lab if kind != "decoupled" else lab - 1
    d0 = raw[0].unflatten(1, (-1, 4))[torch.arange(n), slots]
    torch.testing.assert_close(out["stage_deltas"][0], d0)
    counts = [len(b) for b in boxes]
    torch.testing.assert_close(
        out["stage_boxes"][0].double(),
        decode64(torch.cat(boxes), d0, STAGES[0].target_stds, SHAPES, counts),
        rtol=0,
        atol=1e-3,
    )
    assert (out["stage_boxes"][0] - other["stage_boxes"][0]).abs().max() > 1e-2
    for i in range(1, num_stages):
        torch.testing.assert_close(out["stage_inputs"][i], out["stage_boxes"][i - 1])
    if kind == "decoupled":  # classification does not depend on the given label
        torch.testing.assert_close(out["class_probs"], other["class_probs"])


def test_build_table_and_stage_count_error():
    assert type(build_roi_heads(make_cfg("cascade", 3), CHANNELS)).__name__ == "CascadeRoIHeads"
    head = build_roi_heads(make_cfg("decoupled", 2), CHANNELS)
    assert [type(s).__name__ for s in head.stages] == ["DecoupledHead", "RefineHead"]
    assert {n.split(".")[0] for n, _ in head.named_parameters()} == {"stages"}
    assert hasattr(head, "box_roi_pool")
    with pytest.raises(DrcnnError, match=r"model\.roi_head\.stages"):
        build_roi_heads(make_cfg("standard", 3), CHANNELS)


@pytest.mark.parametrize("kind", ["faster", "cascade", "decoupled"])
def test_heads_from_shipped_configs_draw_what_the_sampler_functions_draw(kind):
    """A head built from a shipped config's typed sampler entries (cls: random 128 / 25% + gt;
    reg: positive, here 10 so that it has to choose) samples exactly the RoIs that
    ``random_sample`` / ``positive_sample`` pick with the same seed and arguments."""
    cfg = load_config(
        f"configs/synthetic/{kind}_rcnn_r18_fpn_synthetic.yaml",
        ["model.roi_head.reg_sampler.num=10"],
    )
    head = build_roi_heads(cfg, CHANNELS)
    t = targets()
    sets = ProposalSets(proposals(4, t, near=40), proposals(5, t, near=25, scale=0.1))
    torch.manual_seed(3)
    cls, reg = head.stage0_samples(sets if kind == "decoupled" else sets.cls, t)

    def reference(boxes, sampler, add_gt):
        gt_boxes, gt_labels = [x["boxes"] for x in t], [x["labels"] for x in t]
        return sample_rois(boxes, gt_boxes, gt_labels, 0.5, sampler, add_gt)

    torch.manual_seed(3)
    expected_cls = reference(sets.cls, partial(random_sample, num=128, pos_fraction=0.25), True)
    expected_reg = (
        reference(sets.reg, partial(positive_sample, num=10), False)
        if kind == "decoupled"
        else expected_cls
    )
    for got, expected in ((cls, expected_cls), (reg, expected_reg)):
        for g, e in zip(got, expected, strict=True):
            assert all(torch.equal(a, b) for a, b in zip(g, e, strict=True))
    assert max((s.labels > 0).sum().item() for s in cls) == 32  # the random sampler chose
    if kind == "decoupled":
        assert all(len(s.boxes) == 10 and (s.labels > 0).all() for s in reg)  # so did this one


def test_decoupled_head_refuses_a_regression_sampler_that_takes_negatives():
    """Its regression branch regresses every RoI the sampler returns."""
    with pytest.raises(DrcnnError, match=r"model\.roi_head\.reg_sampler\.type: .*positive"):
        build_roi_heads(
            make_cfg(
                "decoupled", 1, "model.roi_head.reg_sampler={type: random, pos_fraction: 0.25}"
            ),
            CHANNELS,
        )


@pytest.mark.parametrize("kind", ROI_HEAD_TYPES)
def test_heads_are_built_from_their_typed_config_part(kind):
    """Each head class takes the ``model.roi_head`` dataclass, the channels and the FPN map
    names (no global config), as the RPN does; ``build_roi_heads`` builds the same head."""
    path = "configs/synthetic/dynamic_rcnn_r18_fpn_synthetic.yaml" if kind == "dynamic" else None
    cfg = load_config(path, [f"model.roi_head.type={kind}", "model.roi_head.fc_dim=16"])
    roi = OmegaConf.to_object(cfg.model.roi_head)
    assert isinstance(roi, RoIHeadConfig)
    head = ROI_HEADS[kind](roi, CHANNELS, ("p2", "p3"))
    assert head.cfg is roi
    assert head.box_roi_pool.featmap_names == ["p2", "p3"]
    assert head.stages[0].cls_score.in_features == 16  # fc_dim
    built = build_roi_heads(cfg, CHANNELS)
    assert type(built) is type(head)
    assert built.cfg == roi
    shapes = {k: v.shape for k, v in head.state_dict().items()}
    assert shapes == {k: v.shape for k, v in built.state_dict().items()}


def test_roi_head_table_has_the_config_names():
    assert list(ROI_HEADS) == list(ROI_HEAD_TYPES)


def test_level_mapping_is_mmdetection_finest_scale_56():
    """mmdetection's SingleRoIExtractor (finest_scale 56): FPN level floor(log2(sqrt(wh) / 56))
    clamped to P2..P5; torchvision's mapper (224 at level 4) gives the same levels."""
    head = make_head("standard")
    sides = torch.tensor([10.0, 111.0, 113.0, 223.0, 225.0, 447.0, 449.0, 2000.0])
    boxes = torch.stack([torch.zeros(8), torch.zeros(8), sides, sides], 1)
    head._pool(features(), [boxes, boxes[:1]], SHAPES)  # sets up the pooler's level mapper
    levels = head.box_roi_pool.map_levels([boxes])
    expected = torch.floor(torch.log2(sides.double() / 56 + 1e-6)).clamp(0, 3).long()
    assert levels.tolist() == expected.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
