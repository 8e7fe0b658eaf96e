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
