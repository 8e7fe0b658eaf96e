"""Translation-sensitivity study on hand-built cases with stand-in models.

The stand-ins expose ``analyze_boxes`` as docs/design.md specifies (class_probs, stage_inputs,
stage_boxes, stage_deltas, box_coders) and behave in ways whose outcome is known by hand: an
oracle regressor predicts the deltas that undo the shift, an identity regressor predicts zero,
a constant classifier ignores the box, an "IoU classifier" scores the true class by the IoU.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import box_iou

from drcnn.analysis.sensitivity import (
    ShiftGrid,
    binned,
    run_sensitivity,
    shift_boxes,
    shifted_proposals,
    summarize,
)
from drcnn.errors import DrcnnError

STAGE_STDS = [(0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1)]
NUM_CLASSES = 3
# two objects far apart so that every shifted box is nearest to its own ground truth
GT = torch.tensor([[70.0, 90.0, 110.0, 170.0], [150.0, 140.0, 230.0, 180.0]], dtype=torch.float64)
LABELS = torch.tensor([2, 3])


class StandInModel(torch.nn.Module):
    """A fake detector whose RoI head knows the ground truth ``gt``."""

    def __init__(self, gt: torch.Tensor, regressor: str, classifier: str) -> None:
        super().__init__()
        self.gt, self.regressor, self.classifier = gt, regressor, classifier
        self.coders = [BoxCoder(weights=tuple(1.0 / s for s in stds)) for stds in STAGE_STDS]

    def _probs(self, boxes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.classifier == "constant":
            row = torch.tensor([0.1, 0.2, 0.3, 0.4])
            return row.expand(len(boxes), -1).clone()
        iou = box_iou(boxes, self.gt).max(dim=1).values.float()
        probs = torch.zeros(len(boxes), NUM_CLASSES + 1)
        probs[torch.arange(len(boxes)), labels] = iou
        probs[:, 0] = 1 - iou
        return probs

    def analyze_boxes(self, images, boxes, labels) -> dict:
        assert len(images) == len(boxes) == len(labels) == 1
        inputs, stage_inputs, stage_boxes, stage_deltas = boxes[0].double(), [], [], []
        for coder in self.coders:
            target = self.gt[box_iou(inputs, self.gt).argmax(dim=1)]
            deltas = coder.encode_single(target, inputs)
            if self.regressor == "identity":
                deltas = torch.zeros_like(deltas)
            outputs = coder.decode_single(deltas, inputs)
            stage_inputs.append(inputs.float())
            stage_boxes.append(outputs.float())
            stage_deltas.append(deltas.float())
            inputs = outputs
        return {
            "class_probs": self._probs(boxes[0], labels[0]),
            "stage_inputs": stage_inputs,
            "stage_boxes": stage_boxes,
            "stage_deltas": stage_deltas,
            "box_coders": self.coders,
        }


def _dataset():
    image = torch.zeros(3, 256, 256)
    return [(image, {"boxes": GT.float(), "labels": LABELS, "image_id": 7})]


def _table(regressor: str, classifier: str, grid: ShiftGrid | None = None):
    model = StandInModel(GT, regressor, classifier)
    return run_sensitivity(
        {"fake": model}, _dataset(), grid, class_names=["a", "b", "c"], progress=False
    )


def test_shift_grid_iou_matches_hand_formula():
    grid = ShiftGrid.from_range(-0.5, 0.5, 5, scales=(0.5, 1.0, 2.0))
    table = grid.table()
    assert table.shape == (5 * 5 * 3, 3)
    box = torch.tensor([[10.0, 20.0, 50.0, 100.0]], dtype=torch.float64)
    shifted = shift_boxes(box, table)[0]
    iou = box_iou(shifted, box)[:, 0]
    for (dx, dy, scale), value in zip(table.tolist(), iou.tolist(), strict=True):
        if scale == 1.0:
            inter = (1 - abs(dx)) * (1 - abs(dy))
            assert value == pytest.approx(inter / (2 - inter), abs=1e-9)
        elif dx == 0 and dy == 0:
            assert value == pytest.approx(min(scale, 1 / scale) ** 2, abs=1e-9)
    # a hand-worked box: 10x10 moved right by 2 px -> intersection 80, union 120
    moved = shift_boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[0.2, 0.0, 1.0]]))
    assert moved[0, 0].tolist() == pytest.approx([2.0, 0.0, 12.0, 10.0])


def test_shifted_proposals_are_clipped_and_indexed():
    grid = ShiftGrid.from_range(-0.5, 0.5, 3).table()
    gt = torch.tensor([[0.0, 0.0, 20.0, 20.0]], dtype=torch.float64)
    boxes, gt_index, grid_index = shifted_proposals(gt, grid, (100, 100))
    assert len(boxes) == 9 and (gt_index == 0).all()
    assert boxes.min() >= 0
    # dx = dy = -0.5 moves the box to (-10, -10, 10, 10): clipped to (0, 0, 10, 10)
    corner = boxes[(grid[grid_index, 0] == -0.5) & (grid[grid_index, 1] == -0.5)]
    assert corner[0].tolist() == [0.0, 0.0, 10.0, 10.0]


def test_zero_shift_has_input_iou_one():
    table = _table("identity", "constant")
    zero = table[(table["dx"] == 0) & (table["dy"] == 0) & (table["scale"] == 1)]
    assert len(zero) == len(GT)
    assert np.allclose(zero["input_iou"], 1.0)
    assert set(table["class"]) == {"b", "c"}


def test_oracle_regressor_reaches_iou_one_at_every_shift():
    table = _table("oracle", "constant", ShiftGrid.from_range(-0.5, 0.5, 11, scales=(0.7, 1.3)))
    assert table["input_iou"].min() < 0.3  # the grid really moves the boxes
    for stage in range(len(STAGE_STDS)):
        assert np.allclose(table[f"iou_s{stage}"], 1.0, atol=1e-5)
        assert np.allclose(table[f"delta_l1_s{stage}"], 0.0, atol=1e-4)
    assert np.allclose(table["final_iou"], 1.0, atol=1e-5)
    summary = summarize(table).set_index(["branch", "stage"])
    assert summary.loc[("regression", 0), "frac_iou_0.9"] == 1.0


def test_identity_regressor_ideal_deltas_undo_the_shift():
    table = _table("identity", "constant", ShiftGrid.from_range(-0.4, 0.4, 5, scales=(1.0, 2.0)))
    # nothing moves: output IoU equals input IoU, predicted deltas are zero
    assert np.allclose(table["iou_s0"], table["input_iou"], atol=1e-5)
    assert np.allclose(table["pred_dx_s0"], 0.0)
    # the ideal deltas undo a shift of dx * w on a box of width scale * w: -dx / scale * (1/std)
    inside = table[(table["input_iou"] > 0) & (table["image_id"] == 7)]
    expected_dx = -inside["dx"] / inside["scale"] / STAGE_STDS[0][0]
    expected_dw = np.log(1 / inside["scale"]) / STAGE_STDS[0][2]
    unclipped = inside["gt_id"] == 0  # the first object never touches the image border
    assert np.allclose(inside.loc[unclipped, "ideal_dx_s0"], expected_dx[unclipped], atol=1e-4)
    assert np.allclose(inside.loc[unclipped, "ideal_dw_s0"], expected_dw[unclipped], atol=1e-4)
    summary = summarize(table).set_index(["branch", "stage"])
    assert summary.loc[("regression", 0), "iou_gain"] == pytest.approx(0.0, abs=1e-5)
    # output IoU = input IoU, so the regressor's sensitivity slope is exactly 1
    assert summary.loc[("regression", 0), "slope"] == pytest.approx(1.0, abs=1e-4)


def test_constant_classifier_is_flat_and_iou_classifier_is_not():
    flat = summarize(_table("oracle", "constant")).set_index(["branch", "stage"])
    assert flat.loc[("classification", 0), "slope"] == pytest.approx(0.0, abs=1e-12)
    # label 2 has probability 0.3 and label 3 probability 0.4 in the constant row
    assert flat.loc[("classification", 0), "mean_quality"] == pytest.approx(0.35, abs=1e-6)
    assert flat.loc[("classification", 0), "accuracy"] == pytest.approx(0.5)
    steep = summarize(_table("oracle", "iou")).set_index(["branch", "stage"])
    assert steep.loc[("classification", 0), "slope"] == pytest.approx(1.0, abs=1e-5)


def test_binned_means_match_a_direct_computation():
    table = _table("identity", "iou")
    bins = binned(table, bins=[0.0, 0.5, 1.0])
    cls = bins[bins["branch"] == "classification"].set_index("iou_bin")
    high = table[table["input_iou"] >= 0.5]
    assert cls.loc[0.75, "quality"] == pytest.approx(high["true_prob"].mean(), rel=1e-6)
    assert cls.loc[0.75, "count"] == len(high)
    assert math.isclose(cls["count"].sum(), len(table))


def test_bad_grid_and_empty_dataset_are_user_errors():
    with pytest.raises(DrcnnError, match="shift grid"):
        ShiftGrid.from_range(0.5, -0.5, 3)
    with pytest.raises(DrcnnError, match="scales"):
        ShiftGrid.from_range(scales=(0.0,))
    empty = [
        (
            torch.zeros(3, 8, 8),
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0), "image_id": 1},
        )
    ]
    model = StandInModel(GT, "oracle", "constant")
    with pytest.raises(DrcnnError, match="no ground-truth"):
        run_sensitivity({"m": model}, empty, progress=False)
