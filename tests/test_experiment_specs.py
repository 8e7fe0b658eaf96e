"""The shipped experiment specs parse, and every model's config + overrides resolve."""

from pathlib import Path

import pytest

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


def test_study_ablations_differ_only_where_intended():
    spec = load_spec("experiments/synthetic_study.yaml")
    cfgs = {m.name: load_config(m.config, model_overrides(spec, m)) for m in spec.models}
    assert [len(cfgs[f"decoupled_n{n}"].model.roi_head.stages) for n in (1, 2, 3)] == [1, 2, 3]
    assert list(cfgs["decoupled_n3"].model.rpn.nms_thresh) == [0.7, 0.85]
    assert list(cfgs["decoupled_n3_regnms07"].model.rpn.nms_thresh) == [0.7, 0.7]
    schedules = {(c.train.max_iters, c.train.lr, c.train.seed) for c in cfgs.values()}
    assert len(schedules) == 1  # same schedule and seed for every model
