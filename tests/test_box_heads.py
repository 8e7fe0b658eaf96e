"""Box heads: torchvision equivalence, branch separation, delta layout, init, box coding."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

from drcnn.models.box_heads import DecoupledHead, FastRCNNHead, RefineHead
from drcnn.models.roi_heads.base import box_coder

IN_FEATURES = 4 * 7 * 7


def test_fastrcnn_head_equals_torchvision_two_mlp_and_predictor():
    torch.manual_seed(0)
    head = FastRCNNHead(IN_FEATURES, 64, num_classes=5)
    trunk, predictor = TwoMLPHead(IN_FEATURES, 64), FastRCNNPredictor(64, 6)
    trunk.load_state_dict({k: v for k, v in head.state_dict().items() if k.startswith("fc")})
    predictor.load_state_dict(
        {
            k: v
            for k, v in head.state_dict().items()
            if k.split(".")[0] in ("cls_score", "bbox_pred")
        }
    )
    x = torch.randn(9, 4, 7, 7)
    logits, deltas = head(x)
    ref_logits, ref_deltas = predictor(trunk(x))
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    torch.testing.assert_close(deltas, ref_deltas, rtol=0, atol=0)
    assert FastRCNNHead(IN_FEATURES, 64, 5, class_agnostic=True)(x)[1].shape == (9, 4)


def test_decoupled_branches_are_unshared():
    head = DecoupledHead(IN_FEATURES, 32, num_classes=3)
    x = torch.randn(5, 4, 7, 7)
    assert head.forward_cls(x).shape == (5, 4) and head.forward_reg(x).shape == (5, 12)
    head.forward_cls(x).sum().backward()
    for name, p in head.named_parameters():
        assert (p.grad is not None) == name.startswith("cls_"), name
    assert [n for n, _ in RefineHead(IN_FEATURES, 32).named_children()] == [
        "fc6",
        "fc7",
        "bbox_pred",
    ]
    assert RefineHead(IN_FEATURES, 32)(x).shape == (5, 4)


def test_output_layer_init():
    torch.manual_seed(0)
    head = DecoupledHead(IN_FEATURES, 1024, num_classes=80)
    assert head.cls_score.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert head.bbox_pred.weight.std().item() == pytest.approx(0.001, rel=0.05)
    assert head.cls_score.bias.abs().sum() == 0 and head.bbox_pred.bias.abs().sum() == 0
    refine = RefineHead(IN_FEATURES, 1024)
    assert refine.bbox_pred.weight.std().item() == pytest.approx(0.001, rel=0.05)
    assert refine.bbox_pred.bias.abs().sum() == 0


def assert_uniform(weight: torch.Tensor, bound: float) -> None:
    """Weights drawn from U(-bound, bound): inside it, reaching its edge, std bound / sqrt(3)."""
    assert weight.abs().max().item() <= bound
    assert weight.abs().max().item() > 0.99 * bound
    assert weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.02)


def test_trunk_init_is_xavier_uniform_where_the_official_code_runs_it():
    """Shared2FCBBoxHead and DecoupledBBoxHead: xavier-uniform fcs, zero bias. RefineBBoxHead's
    xavier init is never called (``__init_weights``): PyTorch's default Linear init."""
    torch.manual_seed(0)
    fc_dim = 256
    xavier = {
        "fc6": (6 / (IN_FEATURES + fc_dim)) ** 0.5,
        "fc7": (6 / (fc_dim + fc_dim)) ** 0.5,
    }
    heads = {
        "": FastRCNNHead(IN_FEATURES, fc_dim, num_classes=5),
        "cls_": DecoupledHead(IN_FEATURES, fc_dim, num_classes=5),
        "reg_": DecoupledHead(IN_FEATURES, fc_dim, num_classes=5),
    }
    for prefix, head in heads.items():
        for name, bound in xavier.items():
            layer = getattr(head, prefix + name)
            assert_uniform(layer.weight, bound)
            assert layer.bias.abs().sum() == 0
    refine = RefineHead(IN_FEATURES, fc_dim)
    for layer, fan_in in ((refine.fc6, IN_FEATURES), (refine.fc7, fc_dim)):
        assert_uniform(layer.weight, fan_in**-0.5)
        assert layer.bias.abs().max() > 0 and layer.bias.abs().max() <= fan_in**-0.5


def test_delta_layout_per_head():
    deltas_fast = torch.arange(2 * 16, dtype=torch.float).reshape(2, 16)  # K = 3, bg slot 0
    labels = torch.tensor([3, 1])
    fast = FastRCNNHead(IN_FEATURES, 8, num_classes=3)
    assert fast.deltas_for_labels(deltas_fast, labels).tolist() == [
        deltas_fast[0, 12:16].tolist(),
        deltas_fast[1, 4:8].tolist(),
    ]
    assert torch.equal(fast.foreground_deltas(deltas_fast)[1, 0], deltas_fast[1, 4:8])
    deltas_dec = deltas_fast[:, :12]  # K = 3, no bg slot
    dec = DecoupledHead(IN_FEATURES, 8, num_classes=3)
    assert dec.deltas_for_labels(deltas_dec, labels).tolist() == [
        deltas_dec[0, 8:12].tolist(),
        deltas_dec[1, 0:4].tolist(),
    ]
    agnostic = RefineHead(IN_FEATURES, 8)
    assert torch.equal(agnostic.deltas_for_labels(deltas_dec[:, :4], labels), deltas_dec[:, :4])


@pytest.mark.parametrize(
    "stds", [(0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067)]
)
def test_box_coder_round_trip_with_stage_stds(stds):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(20, 2, generator=g) * 50
    props = torch.cat([xy, xy + 10 + torch.rand(20, 2, generator=g) * 40], 1)
    gt = props + (torch.rand(20, 4, generator=g) - 0.5) * 8
    coder = box_coder(stds)
    deltas = coder.encode_single(gt, props)
    # float64 hand encoding: centre offsets over size and log size ratios, divided by the stds
    p, t = props.double(), gt.double()
    pw, ph = p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]
    tw, th = t[:, 2] - t[:, 0], t[:, 3] - t[:, 1]
    ref = torch.stack(
        [
            ((t[:, 0] + tw / 2) - (p[:, 0] + pw / 2)) / pw / stds[0],
            ((t[:, 1] + th / 2) - (p[:, 1] + ph / 2)) / ph / stds[1],
            torch.log(tw / pw) / stds[2],
            torch.log(th / ph) / stds[3],
        ],
        dim=1,
    )
    torch.testing.assert_close(deltas.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(coder.decode_single(deltas, props), gt, rtol=0, atol=1e-3)
