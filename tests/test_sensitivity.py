"""Translation-sensitivity study on hand-built cases with stand-in models.

The stand-ins expose ``analyze_boxes`` as docs/design.md specifies (class_probs, class_logits,
stage_inputs, stage_boxes, stage_deltas, box_coders) and behave in ways whose outcome is known by
hand: an oracle regressor predicts the deltas that undo the shift, an identity regressor predicts
zero, a constant regressor one fixed correction, a half regressor half the ideal one; a constant
classifier ignores the box, an "IoU classifier" scores the true class by the IoU, a "linear" and
a "gauss" classifier by a known function of the translation ``|s|`` (fraction of box size).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import box_iou

from drcnn.analysis.sensitivity import (
    SUMMARY_COLUMNS,
    ShiftGrid,
    binned,
    bootstrap_counts,
    invariance_radius,
    regression_fit,
    response_summary,
    run_sensitivity,
    save_table,
    shift_boxes,
    shifted_proposals,
    summarize,
    true_log_odds,
)
from drcnn.errors import DrcnnError

STAGE_STDS = [(0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1)]
NUM_CLASSES = 3
# two objects far apart so that every shifted box is nearest to its own ground truth
GT = torch.tensor([[70.0, 90.0, 110.0, 170.0], [150.0, 140.0, 230.0, 180.0]], dtype=torch.float64)
LABELS = torch.tensor([2, 3])
# two objects far from the border of a 400 px image: no shift of the grids below clips them
GT_FREE = torch.tensor(
    [[100.0, 100.0, 160.0, 140.0], [240.0, 250.0, 300.0, 330.0]], dtype=torch.float64
)
LINEAR = (0.9, 0.5)  # the linear classifier: p = 0.9 - 0.5 |s|
CONSTANT_DELTAS = (0.3, -0.2, 0.1, 0.05)


def translation(boxes: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """|s| of each box from its nearest ground truth: centre offset in fractions of its size."""
    target = gt[box_iou(boxes.double(), gt).argmax(dim=1)]
    size = target[:, 2:] - target[:, :2]
    offset = (boxes[:, :2] + boxes[:, 2:] - target[:, :2] - target[:, 2:]).double() / 2
    return (offset / size).norm(dim=1)


class StandInModel(torch.nn.Module):
    """A fake detector whose RoI head knows the ground truth ``gt``."""

    def __init__(
        self, gt: torch.Tensor, regressor: str, classifier: str, sigma: float = 0.2
    ) -> None:
        super().__init__()
        self.gt, self.regressor, self.classifier, self.sigma = gt, regressor, classifier, sigma
        self.coders = [BoxCoder(weights=tuple(1.0 / s for s in stds)) for stds in STAGE_STDS]

    def true_probability(self, boxes: torch.Tensor) -> torch.Tensor:
        """The probability the non-constant classifiers give the true class (float64)."""
        if self.classifier == "iou":
            return box_iou(boxes.double(), self.gt).max(dim=1).values
        radius = translation(boxes, self.gt)
        if self.classifier == "linear":
            return LINEAR[0] - LINEAR[1] * radius
        return torch.exp(-(radius**2) / (2 * self.sigma**2))

    def _logits(self, boxes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.classifier == "constant":
            return torch.tensor([0.1, 0.2, 0.3, 0.4]).log().expand(len(boxes), -1).clone()
        prob = self.true_probability(boxes)
        probs = torch.full((len(boxes), NUM_CLASSES + 1), 1e-12, dtype=torch.float64)
        probs[torch.arange(len(boxes)), labels] = prob
        probs[:, 0] = 1 - prob
        return probs.clamp_min(1e-12).log().float()

    def _deltas(self, coder: BoxCoder, inputs: torch.Tensor) -> torch.Tensor:
        target = self.gt[box_iou(inputs, self.gt).argmax(dim=1)]
        ideal = coder.encode_single(target, inputs)
        if self.regressor == "identity":
            return torch.zeros_like(ideal)
        if self.regressor == "constant":
            return torch.tensor(CONSTANT_DELTAS, dtype=ideal.dtype).expand_as(ideal).clone()
        if self.regressor == "half":
            return ideal / 2
        return ideal

    def analyze_boxes(self, images, boxes, labels) -> dict:
        assert len(images) == len(boxes) == len(labels) == 1
        inputs, stage_inputs, stage_boxes, stage_deltas = boxes[0].double(), [], [], []
        for coder in self.coders:
            deltas = self._deltas(coder, inputs)
            outputs = coder.decode_single(deltas, inputs)
            stage_inputs.append(inputs.float())
            stage_boxes.append(outputs.float())
            stage_deltas.append(deltas.float())
            inputs = outputs
        logits = self._logits(boxes[0], labels[0])
        return {
            "class_probs": torch.softmax(logits, dim=1),
            "class_logits": [logits],
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


def _free_table(regressor: str, classifier: str, grid: ShiftGrid | None = None, **kwargs):
    """The study of a stand-in on GT_FREE (nothing clipped) in a 400 px image."""
    model = StandInModel(GT_FREE, regressor, classifier, **kwargs)
    dataset = [
        (torch.zeros(3, 400, 400), {"boxes": GT_FREE.float(), "labels": LABELS, "image_id": 3})
    ]
    return run_sensitivity({"fake": model}, dataset, grid, progress=False)


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
    # output IoU = input IoU, so the regressor's quality slope is exactly 1
    assert summary.loc[("regression", 0), "quality_slope"] == pytest.approx(1.0, abs=1e-4)


def test_constant_classifier_is_flat_and_iou_classifier_is_not():
    flat = summarize(_table("oracle", "constant")).set_index(["branch", "stage"])
    assert flat.loc[("classification", 0), "quality_slope"] == pytest.approx(0.0, abs=1e-12)
    # label 2 has probability 0.3 and label 3 probability 0.4 in the constant row
    assert flat.loc[("classification", 0), "mean_quality"] == pytest.approx(0.35, abs=1e-6)
    assert flat.loc[("classification", 0), "accuracy"] == pytest.approx(0.5)
    steep = summarize(_table("oracle", "iou")).set_index(["branch", "stage"])
    assert steep.loc[("classification", 0), "quality_slope"] == pytest.approx(1.0, abs=1e-5)


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


def _zone_radii(grid: ShiftGrid) -> np.ndarray:
    """|s| of the pure translations of ``grid`` whose input IoU is >= 0.5, by the hand formula
    (an unclipped box moved by (dx, dy) of its size keeps (1-|dx|)(1-|dy|) of its area)."""
    dx, dy = np.meshgrid(grid.offsets, grid.offsets)
    inter = (1 - np.abs(dx)) * (1 - np.abs(dy))
    keep = inter / (2 - inter) >= 0.5
    return np.hypot(dx[keep], dy[keep])


def test_oracle_regressor_has_gain_one_and_the_grid_sensitivity():
    grid = ShiftGrid.from_range(-0.5, 0.5, 11, scales=(0.8, 1.0, 1.25))
    table = _free_table("oracle", "linear", grid)
    fit = regression_fit(table).set_index(["stage", "coordinate"])
    for name in ("dx", "dy", "dw", "dh"):  # the scale factors move dw and dh
        assert fit.loc[(0, name), "gain"] == pytest.approx(1.0, abs=1e-5)
        assert fit.loc[(0, name), "r2"] == pytest.approx(1.0, abs=1e-6)
        assert fit.loc[(0, name), "resid_std"] == pytest.approx(0.0, abs=1e-4)
    # stage 1 gets perfect boxes: the grid does not move its input, its gain is undefined
    assert fit.loc[(1, "dx"), ["gain", "r2"]].isna().all()
    summary = summarize(table, num_boot=50)
    assert list(summary.columns) == SUMMARY_COLUMNS
    summary = summary.set_index(["branch", "stage"])
    reg = summary.loc[("regression", 0)]
    assert reg[["gain_dx", "gain_dy"]].tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    # the zone's pure translations span |dx| <= 0.3 (IoU 0.7 / 1.3 >= 0.5 > 0.6 / 1.4): W = 0.6
    assert reg["sensitivity"] == pytest.approx(0.1 / 0.6, rel=1e-5)
    # the linear classifier loses 0.5 of probability per box size: 0.05 per unit shift
    cls = summary.loc[("classification", 0)]
    assert cls["prob_change"] == pytest.approx(-0.05, abs=1e-6)
    assert cls["sensitivity"] == pytest.approx(0.05, abs=1e-6)
    assert reg["ratio"] == pytest.approx((0.1 / 0.6) / 0.05, rel=1e-4)
    # log-odds of p = 0.9 - 0.5 |s|: least-squares slope by numpy over the zone's radii
    radii = _zone_radii(grid)
    prob = LINEAR[0] - LINEAR[1] * radii
    expected = 0.1 * np.polyfit(radii, np.log(prob / (1 - prob)), 1)[0]
    assert cls["logit_change"] == pytest.approx(expected, rel=1e-4)
    assert cls["radius"] == math.inf  # 0.9 / 2 is reached at |s| = 0.9, beyond the grid


def test_half_and_constant_regressors_have_gain_half_and_zero():
    grid = ShiftGrid.from_range(-0.5, 0.5, 11, scales=(0.8, 1.0, 1.25))
    half = regression_fit(_free_table("half", "constant", grid)).set_index(["stage", "coordinate"])
    assert half.loc[(0, "dx"), "gain"] == pytest.approx(0.5, abs=1e-5)
    assert half.loc[(0, "dw"), "gain"] == pytest.approx(0.5, abs=1e-5)
    table = _free_table("constant", "constant", grid)
    fit = regression_fit(table)
    assert fit["gain"].to_numpy() == pytest.approx(0.0, abs=1e-9)
    assert fit["r2"].isna().all()  # a constant explains nothing and has nothing to explain
    summary = summarize(table, num_boot=50).set_index(["branch", "stage"])
    assert summary.loc[("regression", 0), "sensitivity"] == pytest.approx(0.0, abs=1e-9)
    # the constant classifier does not respond at all
    cls = summary.loc[("classification", 0)]
    assert cls["prob_change"] == pytest.approx(0.0, abs=1e-9)
    assert cls["logit_change"] == pytest.approx(0.0, abs=1e-6)
    assert cls["sensitivity"] == pytest.approx(0.0, abs=1e-9)
    assert cls["radius"] == math.inf


def test_gaussian_classifier_has_its_half_width_as_invariance_radius():
    sigma = 0.2 / math.sqrt(2 * math.log(2))  # half height exactly at |s| = 0.2, a grid radius
    table = _free_table("oracle", "gauss", sigma=sigma)
    summary = summarize(table, num_boot=20).set_index(["branch", "stage"])
    assert summary.loc[("classification", 0), "radius"] == pytest.approx(0.2, abs=1e-6)
    # any width on a fine grid: within the linear-interpolation error
    fine = ShiftGrid.from_range(-0.5, 0.5, 41)
    table = _free_table("oracle", "gauss", fine, sigma=0.25)
    cls = summarize(table, num_boot=20).set_index(["branch", "stage"]).loc[("classification", 0)]
    assert cls["radius"] == pytest.approx(0.25 * math.sqrt(2 * math.log(2)), abs=2e-3)
    radii = _zone_radii(fine)
    expected = 0.1 * np.polyfit(radii, np.exp(-(radii**2) / (2 * 0.25**2)), 1)[0]
    assert cls["prob_change"] == pytest.approx(expected, rel=1e-4)


def test_invariance_radius_interpolates_and_handles_edges():
    radii = np.array([0.0, 0.1, 0.2, 0.3])
    # 0.8 -> half 0.4, crossed between 0.6 at 0.1 and 0.2 at 0.2: 0.1 + 0.2 / 0.4 * 0.1
    assert invariance_radius(radii, np.array([0.8, 0.6, 0.2, 0.1])) == pytest.approx(0.15)
    assert invariance_radius(radii, np.array([0.8, 0.7, np.nan, 0.4])) == pytest.approx(0.3)
    assert invariance_radius(radii, np.array([0.8, 0.8, 0.7, 0.6])) == math.inf
    assert math.isnan(invariance_radius(radii, np.zeros(4)))
    assert math.isnan(invariance_radius(radii[1:], np.array([0.8, 0.6, 0.2])))


def test_true_log_odds_of_the_softmax_of_averaged_logits():
    logits = [torch.tensor([[0.0, 2.0, -1.0]]), torch.tensor([[1.0, 0.5, 0.0]])]
    # mean logits (0.5, 1.25, -0.5): p = e^1.25 / (e^0.5 + e^1.25 + e^-0.5)
    p = math.exp(1.25) / (math.exp(0.5) + math.exp(1.25) + math.exp(-0.5))
    expected = math.log(p / (1 - p))
    assert true_log_odds(logits, torch.tensor([1])).item() == pytest.approx(expected, rel=1e-12)
    # stays finite where the probability rounds to 1 in float32
    sure = true_log_odds([torch.tensor([[0.0, 40.0]])], torch.tensor([1])).item()
    assert sure == pytest.approx(40.0, rel=1e-9)


@pytest.mark.parametrize("kind", ["decoupled", "cascade"])
def test_real_heads_report_logits_consistent_with_their_probabilities(kind):
    from test_detector import small_detector

    model = small_detector(kind).eval()
    dataset = [
        (
            torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(1)),
            {
                "boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 30.0, 120.0, 90.0]]),
                "labels": torch.tensor([1, 4]),
                "image_id": 5,
            },
        )
    ]
    table = run_sensitivity(
        {kind: model}, dataset, ShiftGrid.from_range(-0.2, 0.2, 3), progress=False
    )
    sigmoid = 1 / (1 + np.exp(-table["true_logit"]))
    assert np.allclose(sigmoid, table["true_prob"], atol=1e-6)
    assert table["true_prob"].std() > 0  # a real head's scores move with the box


def _synthetic_table(num_objects: int, gain: float, slope: float, seed: int) -> pd.DataFrame:
    """A study table drawn at random: per object a gain around ``gain`` and a probability slope
    (per box size) around ``slope``, plus per-box noise; one regression stage; 7 x 7 shifts of
    up to 0.3 of the box size (all of them in the zone, IoU set to 1 - |s|)."""
    rng = np.random.default_rng(seed)
    offsets = np.round(np.linspace(-0.3, 0.3, 7), 6)
    grid_dx, grid_dy = (a.ravel() for a in np.meshgrid(offsets, offsets))
    obj = np.repeat(np.arange(num_objects), len(grid_dx))
    dx, dy = np.tile(grid_dx, num_objects), np.tile(grid_dy, num_objects)
    radius, size = np.hypot(dx, dy), len(obj)
    gains = rng.normal(gain, 0.15, num_objects)[obj]
    slopes = rng.normal(slope, 0.3, num_objects)[obj]
    prob = np.clip(0.8 + slopes * radius + rng.normal(0, 0.02, size), 1e-4, 1 - 1e-4)
    columns = {
        "model": "m",
        "image_id": obj // 3,
        "gt_id": obj % 3,
        "dx": dx,
        "dy": dy,
        "scale": 1.0,
        "input_iou": 1 - radius,
        "true_prob": prob,
        "true_logit": np.log(prob / (1 - prob)),
        "correct": prob > 0.5,
        "iou_s0": 0.9,
        "delta_l1_s0": 0.1,
    }
    for name, shift in (("dx", dx), ("dy", dy), ("dw", 0 * dx), ("dh", 0 * dx)):
        ideal = -shift / 0.1
        columns[f"ideal_{name}_s0"] = ideal
        columns[f"pred_{name}_s0"] = gains * ideal + rng.normal(0, 0.3, size)
    return pd.DataFrame(columns)


def test_bootstrap_interval_is_the_percentile_interval_of_resampled_objects():
    """The weighted-sum bootstrap against resampling the table's objects by hand."""
    table = _synthetic_table(12, gain=0.7, slope=-1.0, seed=0)
    summary = summarize(table, num_boot=20, seed=5).set_index(["branch", "stage"])
    objects = [np.asarray(rows) for rows in table.groupby(["image_id", "gt_id"]).indices.values()]
    values = {"reg": [], "cls": [], "ratio": []}
    for draw in bootstrap_counts(len(objects), 20, 5):
        picked = [
            (rows, copy) for rows, times in zip(objects, draw, strict=True) for copy in range(times)
        ]
        drawn = table.loc[np.concatenate([rows for rows, _ in picked])].assign(
            image_id=np.repeat(np.arange(len(picked)), [len(rows) for rows, _ in picked]),
            gt_id=0,
        )  # each copy of an object a distinct object
        point = response_summary(drawn, num_boot=1).set_index(["branch", "stage"])
        values["reg"].append(point.loc[("regression", 0), "sensitivity"])
        values["cls"].append(point.loc[("classification", 0), "sensitivity"])
        values["ratio"].append(point.loc[("regression", 0), "ratio"])
    for key, (branch, column) in {
        "reg": ("regression", "sensitivity"),
        "cls": ("classification", "sensitivity"),
        "ratio": ("regression", "ratio"),
    }.items():
        low, high = np.quantile(values[key], [0.025, 0.975], method="inverted_cdf")
        assert summary.loc[(branch, 0), f"{column}_lo"] == pytest.approx(low, rel=1e-9)
        assert summary.loc[(branch, 0), f"{column}_hi"] == pytest.approx(high, rel=1e-9)
        assert low < high


def test_bootstrap_interval_covers_the_true_value_and_is_seeded():
    # true values: regressor gain 0.7 over the zone |dx| <= 0.3 (W = 0.6); classifier slope -1
    true_reg, true_cls = 0.7 * 0.1 / 0.6, 0.1
    covered = {"reg": 0, "cls": 0}
    trials = 40
    for seed in range(trials):
        summary = response_summary(_synthetic_table(60, 0.7, -1.0, seed), num_boot=300, seed=seed)
        summary = summary.set_index(["branch", "stage"])
        reg, cls = summary.loc[("regression", 0)], summary.loc[("classification", 0)]
        covered["reg"] += reg["sensitivity_lo"] <= true_reg <= reg["sensitivity_hi"]
        covered["cls"] += cls["sensitivity_lo"] <= true_cls <= cls["sensitivity_hi"]
        assert reg["sensitivity_lo"] < reg["sensitivity"] < reg["sensitivity_hi"]
    # a 95% interval: at most a few misses in 40 (binomial: P(>= 6 misses) < 5%)
    assert covered["reg"] >= trials - 5 and covered["cls"] >= trials - 5
    table = _synthetic_table(60, 0.7, -1.0, 0)
    first, again = summarize(table, num_boot=200, seed=3), summarize(table, num_boot=200, seed=3)
    pd.testing.assert_frame_equal(first, again)
    other = summarize(table, num_boot=200, seed=4)
    assert not np.isclose(first["sensitivity_lo"], other["sensitivity_lo"]).all()


def test_summary_keeps_model_order_and_each_model_is_summarised_on_its_own():
    grid = ShiftGrid.from_range(-0.5, 0.5, 5)
    alone = {
        "zeta": _free_table("half", "gauss", grid).assign(model="zeta"),
        "alpha": _free_table("oracle", "linear", grid).assign(model="alpha"),
    }
    both = summarize(pd.concat(alone.values(), ignore_index=True), num_boot=30)
    assert both["model"].tolist() == ["zeta"] * 3 + ["alpha"] * 3
    assert both["branch"].tolist() == ["classification", "regression", "regression"] * 2
    for name, table in alone.items():
        own = summarize(table, num_boot=30)
        pd.testing.assert_frame_equal(
            both[both["model"] == name].reset_index(drop=True), own, check_dtype=False
        )


def test_shift_heatmaps_pool_seed_runs_and_label_every_other_shift(tmp_path, monkeypatch):
    """One row of heat maps per model (its seed runs pooled, values their mean), and every
    other shift labelled so that the 11 labels of an axis do not overlap."""
    import matplotlib.pyplot as plt

    from drcnn.analysis import plots

    table = _table("oracle", "iou")
    runs = [table.assign(model=f"m-seed{k}", true_prob=table["true_prob"] * k) for k in (1, 2)]
    figures = []
    monkeypatch.setattr(plots, "save", lambda fig, path: figures.append(fig) or path)
    plots.shift_heatmaps(pd.concat(runs, ignore_index=True), tmp_path / "h.png")
    axes = figures[0].axes
    heatmaps = [ax for ax in axes if ax.get_title()]
    assert [ax.get_title() for ax in heatmaps] == [
        "m: true-class probability",
        "m: final output IoU",
    ]
    labels = [t.get_text() for t in heatmaps[0].get_xticklabels()]
    assert labels[0] == "-0.5" and labels[1] == "" and labels[2] == "-0.3"
    pooled = heatmaps[0].collections[0].get_array()
    flat = table[np.isclose(table["scale"], 1.0)]
    expected = flat.pivot_table(index="dy", columns="dx", values="true_prob") * 1.5
    np.testing.assert_allclose(np.asarray(pooled).ravel(), expected.to_numpy().ravel())
    plt.close("all")


def test_quality_figures_draw_the_mean_and_standard_error_per_iou_bin(tmp_path, monkeypatch):
    """Each model's line in the classifier and regressor quality figures is the mean quality
    per 0.05-wide input-IoU bin, its band +- 1.96 standard errors (computed here with numpy)."""
    import matplotlib.pyplot as plt

    from drcnn.analysis import plots

    table = _table("oracle", "iou")
    runs = pd.concat([table.assign(model="a"), table.assign(model="b", true_prob=0.5)])
    figures = []
    monkeypatch.setattr(plots, "save", lambda fig, path: figures.append(fig) or path)
    plots.confidence_vs_iou(runs, tmp_path / "c.png")
    plots.regression_vs_iou(runs, tmp_path / "r.png")
    bins = np.clip(np.digitize(table["input_iou"], np.linspace(0, 1, 21)[1:-1]), 0, 19)
    for fig, column in ((figures[0], "true_prob"), (figures[1], "iou_s0")):
        values = table[column].to_numpy()
        used = np.unique(bins[~np.isnan(values)])
        mean = [np.nanmean(values[bins == b]) for b in used]
        line = fig.axes[0].lines[0]
        assert line.get_label() == "a"
        np.testing.assert_allclose(line.get_xdata(), (used + 0.5) / 20)
        np.testing.assert_allclose(line.get_ydata(), mean)
        # the band of a bin: +- 1.96 x std (ddof 1) / sqrt(n)
        first = values[bins == used[0]]
        half = 1.96 * np.std(first, ddof=1) / np.sqrt(len(first)) if len(first) > 1 else 0.0
        band = fig.axes[0].collections[0].get_paths()[0].vertices[:, 1]
        assert np.isclose(band, mean[0] - half).any() and np.isclose(band, mean[0] + half).any()
    assert [line.get_label() for line in figures[0].axes[0].lines] == ["a", "b"]
    np.testing.assert_allclose(figures[0].axes[0].lines[1].get_ydata(), 0.5)
    plt.close("all")


def test_saved_table_reads_back_exactly_from_parquet_and_at_float32_from_csv(tmp_path):
    """The Parquet file is the table; the CSV has every column, its types, and each float as
    the float32 nearest to it (NaN as an empty field), strings with commas quoted."""
    rng = np.random.default_rng(0)
    floats = rng.normal(size=50) * 10.0 ** rng.integers(-9, 6, size=50)
    floats[[3, 17]] = np.nan
    table = pd.DataFrame(
        {
            "model": ["faster, seed 0"] * 25 + ["dec"] * 25,
            "image_id": np.arange(50, dtype=np.int64) * 1000003,
            "correct": rng.random(50) > 0.5,
            "input_iou": floats,
            "dx": np.round(np.linspace(-0.5, 0.5, 50), 6),
        }
    )
    parquet, csv = save_table(table, tmp_path / "sensitivity")
    pd.testing.assert_frame_equal(pd.read_parquet(parquet), table, check_dtype=False)
    back = pd.read_csv(csv)
    assert list(back.columns) == list(table.columns)
    assert back["model"].tolist() == table["model"].tolist()
    assert back["image_id"].tolist() == table["image_id"].tolist()
    assert back["correct"].dtype == bool and back["correct"].tolist() == table["correct"].tolist()
    for column in ("input_iou", "dx"):
        expected = table[column].to_numpy().astype(np.float32)
        np.testing.assert_array_equal(back[column].to_numpy().astype(np.float32), expected)
