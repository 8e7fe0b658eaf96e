"""The shipped experiment specs parse, and every model's config + overrides resolve."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from drcnn.analysis.runner import load_spec, model_overrides
from drcnn.config import load_config
from drcnn.models.roi_heads import build_roi_heads

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "experiments").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # specs name configs relative to the repository root


def test_specs_are_shipped():
    assert {p.stem for p in SPECS} >= {"synthetic_quick", "synthetic_study", "coco_r50_2x"}


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_spec_models_resolve(path):
    spec = load_spec(path)
    for model in spec.models:
        cfg = load_config(model.config, model_overrides(spec, model))
        build_roi_heads(cfg, cfg.model.backbone.fpn_channels)  # stages/samplers are consistent


def test_study_grid_differs_only_in_the_nms_pair():
    """The 2 x 2 proposal-availability grid: [cls, reg] RPN NMS, everything else the same."""
    spec = load_spec("experiments/synthetic_study.yaml")
    assert len(spec.seeds) >= 3
    cfgs = {m.name: load_config(m.config, model_overrides(spec, m)) for m in spec.models}
    grid = {
        name: tuple(cfg.model.rpn.nms_thresh)
        for name, cfg in cfgs.items()
        if cfg.model.roi_head.type == "decoupled"
    }
    assert sorted(grid.values()) == [(0.7, 0.7), (0.7, 0.85), (0.85, 0.7), (0.85, 0.85)]
    assert grid["decoupled_c07_r085"] == (0.7, 0.85)  # the official setting
    assert {c.model.roi_head.type for c in cfgs.values()} == {"standard", "cascade", "decoupled"}
    decoupled = [c for c in cfgs.values() if c.model.roi_head.type == "decoupled"]
    for cfg in decoupled[1:]:  # the grid's cells differ only in model.rpn.nms_thresh
        a, b = OmegaConf.to_container(cfg), OmegaConf.to_container(decoupled[0])
        a["model"]["rpn"].pop("nms_thresh"), b["model"]["rpn"].pop("nms_thresh")
        assert a == b
    schedules = {(c.train.max_iters, c.train.lr, c.train.seed) for c in cfgs.values()}
    assert len(schedules) == 1  # same schedule and seed for every model


def test_study_contrasts_are_the_grid_effects():
    """ap_table.contrasts: the regression- and classification-NMS main effects (each level of
    the other factor on both sides) and the interaction (equal levels minus unequal ones)."""
    spec = load_spec("experiments/synthetic_study.yaml")
    contrasts = {c.name: c for c in spec.ap_table.contrasts}
    nms = {
        m.name: tuple(load_config(m.config, model_overrides(spec, m)).model.rpn.nms_thresh)
        for m in spec.models
        if m.name.startswith("decoupled")
    }
    assert list(contrasts) == [
        "decoupled_c07_r085 - cascade_rcnn",
        "reg NMS 0.85 - 0.7",
        "cls NMS 0.85 - 0.7",
        "interaction",
    ]
    ranking = contrasts["decoupled_c07_r085 - cascade_rcnn"]
    assert (list(ranking.plus), list(ranking.minus)) == (["decoupled_c07_r085"], ["cascade_rcnn"])
    for name, factor in (("reg NMS 0.85 - 0.7", 1), ("cls NMS 0.85 - 0.7", 0)):
        plus = [nms[m] for m in contrasts[name].plus]
        minus = [nms[m] for m in contrasts[name].minus]
        assert {p[factor] for p in plus} == {0.85} and {m[factor] for m in minus} == {0.7}
        other = 1 - factor
        assert sorted(p[other] for p in plus) == sorted(m[other] for m in minus) == [0.7, 0.85]
    interaction = contrasts["interaction"]
    assert {nms[m] for m in interaction.plus} == {(0.7, 0.7), (0.85, 0.85)}
    assert {nms[m] for m in interaction.minus} == {(0.7, 0.85), (0.85, 0.7)}


def test_head_ablation_is_a_two_by_two_at_one_stage_with_its_main_effects():
    """Shared / unshared trunk x ordinary / decoupled sampling at N = 1, each cell once, plus
    the official N = 3 and its Double-Head variant; each main-effect contrast has one level of
    its factor on each side and both levels of the other factor on both sides."""
    spec = load_spec("experiments/head_ablation.yaml")
    assert len(spec.seeds) >= 3 and "sensitivity" not in spec.steps
    cells = {}
    for m in spec.models:
        roi = load_config(m.config, model_overrides(spec, m)).model.roi_head
        decoupled = roi.type == "decoupled"
        shared = roi.box_head == "shared" or (roi.box_head is None and not decoupled)
        head = "double" if roi.box_head == "double" else ("shared" if shared else "unshared")
        cells[m.name] = (head, "decoupled" if decoupled else "ordinary", len(roi.stages))
    grid = sorted(c for c in cells.values() if c[2] == 1)
    assert grid == [
        ("shared", "decoupled", 1),
        ("shared", "ordinary", 1),
        ("unshared", "decoupled", 1),
        ("unshared", "ordinary", 1),
    ]
    assert sorted(c for c in cells.values() if c[2] == 3) == [
        ("double", "decoupled", 3),
        ("unshared", "decoupled", 3),
    ]
    contrasts = {c.name: c for c in spec.ap_table.contrasts}
    for name, factor, level in (
        ("decoupled sampling (N = 1, both heads)", 1, "decoupled"),
        ("unshared head (N = 1, both samplings)", 0, "unshared"),
    ):
        plus = [cells[m] for m in contrasts[name].plus]
        minus = [cells[m] for m in contrasts[name].minus]
        assert {p[factor] for p in plus} == {level} and level not in {m[factor] for m in minus}
        assert sorted(p[1 - factor] for p in plus) == sorted(m[1 - factor] for m in minus)


def test_main_specs_use_the_gpu_when_there_is_one():
    """Issue 13: the quickstart and the study say ``device: auto``; the GPU study stays cuda."""
    devices = {p.stem: load_spec(p).device for p in SPECS}
    assert devices["synthetic_quick"] == devices["synthetic_study"] == "auto"
    assert devices["synthetic_study_gpu"] == "cuda"
