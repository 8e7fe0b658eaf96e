"""The IoU of the proposals each branch trains on: ``Samples.iou``, hand-built proposals whose
IoUs are computed independently with torchvision, the positive sampler's threshold, NMS
thresholds on the same candidates, and the study's files."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torchvision.ops import box_iou, nms

from drcnn.analysis.proposals import (
    BRANCH_PROPOSALS,
    HIST_EDGES,
    IOU_LEVELS,
    histograms,
    nms_settings,
    proposal_ious,
    summarize,
    write_proposal_study,
)
from drcnn.analysis.sensitivity import BRANCH_CLS, BRANCH_REG
from drcnn.config import load_config
from drcnn.data.loader import build_dataset
from drcnn.errors import DrcnnError
from drcnn.models.detector import build_detector
from drcnn.models.rpn import Candidates
from drcnn.models.sampling import positive_sample, random_sample, sample_rois

SYNTHETIC = "configs/synthetic/{}_rcnn_r18_fpn_synthetic.yaml"
HEIGHT, WIDTH = 128, 160
GT = torch.tensor([[20.0, 20.0, 80.0, 70.0], [90.0, 30.0, 150.0, 110.0]])
GT_LABELS = torch.tensor([1, 2])


def detector(kind: str, *overrides: str):
    """A small random-weight detector whose training resize keeps a 128 x 160 image as it is."""
    torch.manual_seed(0)
    cfg = load_config(
        SYNTHETIC.format(kind),
        ["model.transform.min_size=[128]", "model.transform.max_size=1000", *overrides],
    )
    return build_detector(cfg, pretrained=False)


def jittered(boxes: torch.Tensor, n: int, scale: float, g: torch.Generator) -> torch.Tensor:
    """``n`` copies of each box with corners moved by up to ``scale`` x its size, in the image."""
    rep = boxes.repeat_interleave(n, dim=0)
    wh = (rep[:, 2:] - rep[:, :2]).repeat(1, 2)
    moved = rep + (torch.rand(rep.shape, generator=g) * 2 - 1) * scale * wh
    return moved.clamp(min=0).minimum(torch.tensor([WIDTH, HEIGHT, WIDTH, HEIGHT]) - 1.0)


def known_candidates(per_gt: int, scale: float, seed: int = 0) -> Candidates:
    """Boxes around each gt and far from them, with random scores, all on one FPN level."""
    g = torch.Generator().manual_seed(seed)
    far = torch.tensor([[0.0, 90.0, 15.0, 125.0], [100.0, 112.0, 158.0, 127.0]])
    boxes = torch.cat([jittered(GT, per_gt, scale, g), far])
    return Candidates(boxes, torch.rand(len(boxes), generator=g), torch.zeros(len(boxes)).long())


def stub_candidates(model, candidates: Candidates) -> None:
    """The RPN's candidates before NMS become ``candidates`` (the rest of the RPN is its own)."""
    model.rpn.propose_candidates = lambda images, feature_maps: (None, None, None, [candidates])


def one_image_dataset(image_id: int = 7) -> list:
    image = torch.rand(3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(image_id))
    return [(image, {"boxes": GT.clone(), "labels": GT_LABELS, "image_id": image_id})]


def reference_ious(candidates: Candidates, thresh: float, top_n: int) -> np.ndarray:
    """Max IoU with the gt of the boxes torchvision's NMS keeps (best ``top_n``), sorted."""
    kept = candidates.boxes[nms(candidates.boxes, candidates.scores, thresh)][:top_n]
    return np.sort(box_iou(kept, GT).max(dim=1).values.double().numpy())


def rows(table: pd.DataFrame, branch: str, nms_label: str, set_nms: float | None = None):
    part = table[(table["branch"] == branch) & (table["nms"] == nms_label)]
    return part if set_nms is None else part[np.isclose(part["set_nms"], set_nms)]


# ---- Samples.iou ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampler",
    [partial(random_sample, num=32, pos_fraction=0.25), partial(positive_sample, num=8)],
)
def test_samples_iou_is_box_iou_of_the_sampled_boxes_with_their_best_gt(sampler):
    candidates = known_candidates(20, 0.3).boxes
    torch.manual_seed(0)
    [samples] = sample_rois([candidates], [GT], [GT_LABELS], 0.5, sampler, add_gt=True)
    assert len(samples.boxes) > 5
    expected = box_iou(samples.boxes, GT).max(dim=1).values
    torch.testing.assert_close(samples.iou, expected, rtol=0, atol=1e-6)
    assert (samples.iou[samples.is_gt] == 1).all()
    positive = samples.labels > 0
    assert (samples.iou[positive] >= 0.5).all() and (samples.iou[~positive] < 0.5).all()
    [none] = sample_rois([candidates], [GT[:0]], [GT_LABELS[:0]], 0.5, sampler, add_gt=True)
    assert (none.iou == 0).all() and len(none.iou) == len(none.boxes)


# ---- hand-built proposals ---------------------------------------------------------------------

BIG_SAMPLES = ["model.roi_head.cls_sampler.num=512", "model.roi_head.reg_sampler.num=512"]


def test_recorded_ious_equal_torchvision_box_iou_of_the_known_proposals():
    """Samplers larger than the proposals keep all of them: every recorded IoU is known."""
    model = detector("decoupled", *BIG_SAMPLES)
    candidates = known_candidates(12, 0.25)
    stub_candidates(model, candidates)
    top_n = model.rpn.post_nms_top_n()
    table = proposal_ious({"dec": model}, one_image_dataset(), [(0.7, 0.85)], progress=False)
    assert set(table["model"]) == {"dec"} and set(table["image_id"]) == {7}
    assert not table["shared_sample"].any()
    for t in (0.7, 0.85):
        got = np.sort(rows(table, BRANCH_PROPOSALS, "0.7/0.85", t)["iou"].to_numpy())
        np.testing.assert_allclose(got, reference_ious(candidates, t, top_n), atol=1e-6)
    # classification: every 0.7 proposal and the two gt boxes (IoU 1)
    cls = rows(table, BRANCH_CLS, "0.7/0.85", 0.7)
    expected = np.sort(np.r_[reference_ious(candidates, 0.7, top_n), 1.0, 1.0])
    np.testing.assert_allclose(np.sort(cls["iou"].to_numpy()), expected, atol=1e-6)
    assert cls["is_gt"].sum() == 2
    # regression: the positives (IoU >= 0.5) of the 0.85 proposals, no gt added
    reg = rows(table, BRANCH_REG, "0.7/0.85", 0.85)
    ref = reference_ious(candidates, 0.85, top_n)
    np.testing.assert_allclose(np.sort(reg["iou"].to_numpy()), ref[ref >= 0.5], atol=1e-6)
    assert not reg["is_gt"].any() and 0 < len(reg) < len(ref)


def test_standard_head_records_one_sample_for_both_branches():
    model = detector("faster", *BIG_SAMPLES[:1])
    candidates = known_candidates(12, 0.25)
    stub_candidates(model, candidates)
    table = proposal_ious({"faster": model}, one_image_dataset(), [(0.7, 0.85)], progress=False)
    assert table["shared_sample"].all()
    cls, reg = rows(table, BRANCH_CLS, "0.7/0.85"), rows(table, BRANCH_REG, "0.7/0.85")
    assert (reg["set_nms"] == 0.7).all()  # the one sample comes from the classification set
    np.testing.assert_array_equal(cls["iou"].to_numpy(), reg["iou"].to_numpy())
    expected = np.sort(np.r_[reference_ious(candidates, 0.7, model.rpn.post_nms_top_n()), 1, 1])
    np.testing.assert_allclose(np.sort(cls["iou"].to_numpy()), expected, atol=1e-6)
    assert nms_settings(model) == [(0.7, 0.7), (0.85, 0.85)]


@pytest.mark.parametrize("iou_thresh", [0.5, 0.7])
def test_positive_sampler_samples_are_all_at_or_above_the_stage_threshold(iou_thresh):
    model = detector("decoupled", "model.roi_head.reg_sampler.num=6")
    model.roi_heads.cfg.stages[0].iou_thresh = iou_thresh
    stub_candidates(model, known_candidates(30, 0.3))
    table = proposal_ious({"dec": model}, one_image_dataset(), [(0.85, 0.85)], progress=False)
    reg = table[table["branch"] == BRANCH_REG]
    proposal = table[table["branch"] == BRANCH_PROPOSALS]
    assert len(reg) == 6 < (proposal["iou"] >= iou_thresh).sum()  # a subset was drawn
    assert (reg["iou"] >= iou_thresh).all()
    assert (table[table["branch"] == BRANCH_CLS]["iou"] < iou_thresh).any()  # not vacuous


def test_higher_nms_threshold_keeps_at_least_as_many_proposals_at_iou_09():
    """On one set of candidates (dense jitter around the gt, random scores, no top-n cut).

    Not a theorem of greedy NMS (a box kept at the higher threshold can suppress a better one
    that a lower threshold kept), but what the analysis must show on such candidates.
    """
    model = detector("decoupled", "model.rpn.post_nms_top_n_train=1000")
    stub_candidates(model, known_candidates(80, 0.12, seed=3))
    thresholds = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
    settings = [(t, t) for t in thresholds]
    table = proposal_ious({"dec": model}, one_image_dataset(), settings, progress=False)
    proposal = table[table["branch"] == BRANCH_PROPOSALS]
    counts = [int((proposal[proposal["set_nms"] == t]["iou"] >= 0.9).sum()) for t in thresholds]
    assert counts == sorted(counts) and counts[-1] > counts[0]


# ---- a real run: training images, no updates, seeded -----------------------------------------


def tiny_train_split(root: Path):
    cfg = load_config(SYNTHETIC.format("decoupled"), [f"data.root={root}"])
    return build_dataset(cfg, "train")


def test_real_run_changes_nothing_is_seeded_and_keeps_thresholds(synthetic_root):
    model = detector(
        "decoupled", "model.rpn.post_nms_top_n_train=100", "model.roi_head.cls_sampler.num=64"
    )
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    dataset = tiny_train_split(synthetic_root)
    first = proposal_ious({"dec": model}, dataset, max_images=3, progress=False)
    second = proposal_ious({"dec": model}, dataset, max_images=3, progress=False)
    pd.testing.assert_frame_equal(first, second)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and model.rpn.training and model.backbone.training
    assert first["image_id"].nunique() == 3
    assert list(dict.fromkeys(first["nms"])) == ["0.7/0.85", "0.7/0.7", "0.85/0.85"]
    reg = first[first["branch"] == BRANCH_REG]
    assert len(reg) > 0 and (reg["iou"] >= 0.5).all()
    per_image = first[first["branch"] == BRANCH_PROPOSALS].groupby(["nms", "set_nms", "image_id"])
    assert per_image.size().max() <= 100


# ---- summary, histograms, files -----------------------------------------------------------


def test_summary_and_histograms_agree_with_direct_counts(tmp_path):
    model = detector("decoupled", *BIG_SAMPLES)  # every gt box is sampled
    stub_candidates(model, known_candidates(40, 0.2))
    dataset = one_image_dataset(1) + one_image_dataset(2)
    table = proposal_ious({"dec": model}, dataset, progress=False)
    summary, hist, figure = write_proposal_study(table, tmp_path)
    for name in ("proposal_iou.csv", "proposal_iou.md", "proposal_iou_hist.csv"):
        assert (tmp_path / name).is_file(), name
    assert figure == tmp_path / "proposal_iou.png" and figure.stat().st_size > 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "proposal_iou.csv"), summary)
    assert len(hist) == len(summary) * (len(HIST_EDGES) - 1)
    for row in summary.itertuples():
        group = table[
            (table["nms"] == row.nms)
            & (table["branch"] == row.branch)
            & np.isclose(table["set_nms"], row.set_nms)
        ]["iou"]
        assert row.images == 2 and row.per_image == pytest.approx(len(group) / 2)
        added = 2 * len(GT) if row.branch == BRANCH_CLS else 0  # gt boxes of the two images
        assert row.gt_per_image == added / 2
        for level in IOU_LEVELS:
            above = (group >= level).sum()
            assert summary.at[row.Index, f"per_image_iou_{level:g}"] == above / 2
            assert summary.at[row.Index, f"frac_iou_{level:g}"] == pytest.approx(above / len(group))
        assert row.mean_pos_iou == pytest.approx(group[group >= 0.5].mean())
        bins = hist[
            (hist["nms"] == row.nms)
            & (hist["branch"] == row.branch)
            & np.isclose(hist["set_nms"], row.set_nms)
        ]
        assert bins["count"].sum() == len(group)
        assert bins["fraction"].sum() == pytest.approx(1.0)
        high = bins[bins["bin_lo"] >= 0.9 - 1e-9]["per_image"].sum()
        assert high == pytest.approx(summary.at[row.Index, "per_image_iou_0.9"])
    # a histogram computed independently with numpy
    cls = table[(table["branch"] == BRANCH_CLS) & (table["nms"] == "0.7/0.85")]["iou"]
    expected, _ = np.histogram(cls, bins=HIST_EDGES)
    got = histograms(table)
    got = got[(got["branch"] == BRANCH_CLS) & (got["nms"] == "0.7/0.85")]["count"].to_numpy()
    np.testing.assert_array_equal(got, expected)
    assert summarize(table).equals(summary)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_images": 0}, "proposal_images"),
        ({"settings": [(0.7, 1.5)]}, "settings"),
        ({"settings": [(0.7,)]}, "settings"),
    ],
)
def test_bad_arguments_are_user_errors(kwargs, message):
    model = detector("decoupled")
    with pytest.raises(DrcnnError, match=message):
        proposal_ious({"dec": model}, one_image_dataset(), progress=False, **kwargs)


def test_dataset_without_ground_truth_is_a_user_error():
    image = torch.rand(3, HEIGHT, WIDTH)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0).long(), "image_id": 1}
    with pytest.raises(DrcnnError, match="no image with ground truth"):
        proposal_ious({"dec": detector("decoupled")}, [(image, empty)], progress=False)
