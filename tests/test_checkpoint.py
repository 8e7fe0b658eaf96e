"""Checkpoints: weights_only round trip, RNG states, config-only rebuild, clean rejections."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from test_train import DECOUPLED, FASTER, tiny_overrides

from drcnn.config import load_config, to_dict
from drcnn.engine.checkpoint import (
    capture_rng_state,
    first_non_finite,
    load_checkpoint,
    load_model,
    restore_rng_state,
    save_checkpoint,
)
from drcnn.errors import DrcnnError
from drcnn.models.detector import build_detector
from drcnn.models.sync_audit import SyncAudit


def draws() -> tuple:
    return (
        random.random(),
        float(np.random.rand()),
        float(np.random.randn()),
        torch.rand(3).tolist(),
    )


def save_model(path, cfg) -> torch.nn.Module:
    torch.manual_seed(1)
    model = build_detector(cfg)
    save_checkpoint(path, {"model": model.state_dict(), "config": to_dict(cfg), "iter": 7})
    return model.eval()


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    np.random.randn()  # leave a cached gaussian in numpy's state
    save_checkpoint(tmp_path / "c.pth", {"model": {}, "rng": [capture_rng_state()]})
    expected = draws()
    draws()
    state = torch.load(tmp_path / "c.pth", weights_only=True)  # the safe loader accepts it
    restore_rng_state(state["rng"][0])
    assert draws() == expected


def test_rng_restore_skips_the_cuda_states_of_devices_this_machine_lacks(monkeypatch):
    """A checkpoint from a process that saw 3 GPUs resumes on a machine with 1: device 0's
    state is restored, the others are dropped (``set_rng_state_all`` fails on device 1)."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for module in (torch.cuda, torch.cuda.random):
        monkeypatch.setattr(module, "set_rng_state", lambda s, d=0: restored.append((int(s[0]), d)))
    state = capture_rng_state()
    state["cuda"] = [torch.full((4,), k, dtype=torch.uint8) for k in (5, 6, 7)]
    restore_rng_state(state)
    assert restored == [(5, 0)]


def test_load_model_rebuilds_from_the_stored_config(synthetic_root, tmp_path):
    cfg = load_config(FASTER, tiny_overrides(synthetic_root))
    original = save_model(tmp_path / "m.pth", cfg)
    loaded, stored_cfg = load_model(tmp_path / "m.pth")
    assert stored_cfg == cfg
    image = [torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        expected, got = original(image)[0], loaded(image)[0]
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(expected[key], got[key])


# an ImageNet weight file that is not there (offline, a COCO config's torchvision://resnet50
# is the same: the hub cache lacks it)
MISSING_WEIGHTS = "model.backbone.pretrained=/nonexistent/imagenet_resnet18.pth"


def test_load_model_reads_no_imagenet_weights(synthetic_root, tmp_path):
    """The checkpoint holds every weight, so loading it never reads the ImageNet file that its
    config names (it failed when that file could not be had)."""
    cfg = load_config(FASTER, [*tiny_overrides(synthetic_root), MISSING_WEIGHTS])
    with pytest.raises(DrcnnError, match=r"model\.backbone\.pretrained: /nonexistent/"):
        build_detector(cfg)  # what the config asks for cannot be had
    torch.manual_seed(1)
    original = build_detector(load_config(FASTER, tiny_overrides(synthetic_root))).eval()
    path = save_checkpoint(
        tmp_path / "m.pth", {"model": original.state_dict(), "config": to_dict(cfg)}
    )
    image = [torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(0))]
    for given in (None, cfg):  # the stored config, a config file's
        loaded, returned = load_model(path, given)
        assert returned == cfg  # the config is not changed
        with torch.no_grad():
            assert torch.equal(original(image)[0]["boxes"], loaded(image)[0]["boxes"])


def test_other_architecture_names_the_first_mismatching_key(synthetic_root, tmp_path):
    faster = load_config(FASTER, tiny_overrides(synthetic_root))
    decoupled = load_config(DECOUPLED, tiny_overrides(synthetic_root))
    save_model(tmp_path / "faster.pth", faster)
    stored = load_checkpoint(tmp_path / "faster.pth")["model"]
    wanted = build_detector(decoupled).state_dict()
    first = next(k for k in wanted if k not in stored or stored[k].shape != wanted[k].shape)
    with pytest.raises(DrcnnError, match=f"'{first}'"):
        load_model(tmp_path / "faster.pth", decoupled)


@pytest.mark.parametrize("content", ["text", "tensor", "plain_state_dict"])
def test_files_that_are_not_checkpoints_are_rejected(tmp_path, content):
    path = tmp_path / "bad.pth"
    if content == "text":
        path.write_text("not a checkpoint\n")
    elif content == "tensor":
        torch.save(torch.zeros(3), path)
    else:
        torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(DrcnnError, match="not a drcnn checkpoint"):
        load_checkpoint(path)


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "latest.pth"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "iter": 1})
    real_save = torch.save

    def disk_full(obj, handle, *args, **kwargs):
        real_save(obj, handle, *args, **kwargs)
        handle.truncate(10)  # half-written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(DrcnnError, match="previous checkpoint is kept"):
        save_checkpoint(path, {"model": {"w": torch.zeros(2)}, "iter": 2})
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["iter"] == 1 and torch.equal(state["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pth"]


def test_first_non_finite_names_the_first_nan_or_infinity_in_a_few_launches():
    """Any NaN or infinity, in any floating dtype, is found, and the first such tensor named;
    finite values whose L1 norm overflows (near float32's largest, a long float16 tensor) are
    not reported; integer tensors are not looked at. 106 finite tensors (as many as a synthetic
    Decoupled R-CNN trains) take a handful of kernel launches and one wait: a check per tensor
    took 532 launches."""
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(7, 5, generator=g) for i in range(106)}
    tensors["t4"] = torch.randn(3, generator=g).to(torch.bfloat16)
    tensors["count"] = torch.tensor([1, 2, 3])
    assert first_non_finite(tensors) is None
    with SyncAudit() as audit:
        assert first_non_finite(tensors) is None
    assert audit.launches <= 10 and audit.total == 1, audit.report()
    huge = {**tensors, "t3": torch.full((4, 4), 3e38), "t5": torch.ones(70000).half()}
    assert first_non_finite(huge) is None  # both norms overflow; every value is finite
    for bad in (float("nan"), float("inf"), float("-inf")):
        broken = {**huge, "t70": tensors["t70"].clone(), "t90": tensors["t90"].clone()}
        broken["t70"][2, 3] = bad
        broken["t90"][0, 0] = float("nan")
        assert first_non_finite(broken) == "t70"
    half = {**tensors, "t4": torch.tensor([1.0, float("inf")], dtype=torch.float16)}
    assert first_non_finite(half) == "t4"
