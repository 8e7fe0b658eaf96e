"""The box-loss entry: values against PyTorch and a written-out formula, config validation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from drcnn.config import config_from_dict, load_config, to_dict
from drcnn.errors import DrcnnError
from drcnn.models.losses import box_loss


def diffs() -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions and targets whose differences span both sides of every beta used below."""
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(50, 4, generator=g, dtype=torch.float64)
    target = pred + torch.linspace(-2.5, 2.5, 200, dtype=torch.float64).reshape(50, 4)
    return pred, target


def smooth_l1_written_out(x: torch.Tensor, beta: float) -> torch.Tensor:
    x = x.abs()
    return torch.where(x < beta, 0.5 * x * x / beta, x - 0.5 * beta).sum()


def test_l1_is_the_summed_absolute_difference():
    pred, target = diffs()
    loss = box_loss(pred, target, SimpleNamespace(type="l1", beta=None))
    torch.testing.assert_close(loss, F.l1_loss(pred, target, reduction="sum"))
    torch.testing.assert_close(loss, (pred - target).abs().sum())


@pytest.mark.parametrize("beta", [1 / 9, 0.5, 1.0])
def test_smooth_l1_uses_the_configured_beta(beta):
    pred, target = diffs()
    loss = box_loss(pred, target, SimpleNamespace(type="smooth_l1", beta=beta))
    torch.testing.assert_close(loss, F.smooth_l1_loss(pred, target, beta=beta, reduction="sum"))
    torch.testing.assert_close(loss, smooth_l1_written_out(pred - target, beta))


def test_betas_give_different_losses():
    pred, target = diffs()
    values = {
        beta: box_loss(pred, target, SimpleNamespace(type="smooth_l1", beta=beta)).item()
        for beta in (1 / 9, 1.0)
    }
    assert values[1 / 9] > values[1.0] * 1.05


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.rpn.loss_bbox={type: l1, beta: 0.5}", r"model\.rpn\.loss_bbox\.beta: .*takes no"),
        ("model.roi_head.loss_bbox={type: smooth_l1}", r"model\.roi_head\.loss_bbox\.beta"),
        ("model.roi_head.loss_bbox={type: smooth_l1, beta: 0}", r"loss_bbox\.beta"),
        ("model.roi_head.loss_bbox={type: huber}", r"model\.roi_head\.loss_bbox\.type"),
        ("model.rpn.loss_bbox={type: l1, gamma: 2}", r"model\.rpn\.loss_bbox"),
        ("model.rpn.loss_bbox=smooth_l1", r"model\.rpn\.loss_bbox"),
    ],
)
def test_bad_entries_are_refused(override, message):
    with pytest.raises(DrcnnError, match=message):
        load_config(None, [override])


def test_stored_string_losses_load_as_the_entries_the_old_code_meant():
    stored = to_dict(load_config(None))
    stored["model"]["rpn"]["loss_bbox"] = "smooth_l1"
    stored["model"]["roi_head"]["loss_bbox"] = "l1"
    cfg = config_from_dict(stored)
    assert (cfg.model.rpn.loss_bbox.type, cfg.model.rpn.loss_bbox.beta) == ("smooth_l1", 1 / 9)
    assert (cfg.model.roi_head.loss_bbox.type, cfg.model.roi_head.loss_bbox.beta) == ("l1", None)
    assert stored["model"]["rpn"]["loss_bbox"] == "smooth_l1"  # the caller's dict is untouched
