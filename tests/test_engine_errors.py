"""Bad input to train/test/infer/benchmark: exit 2, one line on stderr, nothing written lost."""

from __future__ import annotations

import pytest
import torch
from test_train import DECOUPLED, FASTER, tiny_overrides

import drcnn.engine.train as train_module
from drcnn.cli import main
from drcnn.config import load_config, to_dict
from drcnn.engine.checkpoint import load_checkpoint, save_checkpoint
from drcnn.models.detector import build_detector


def run_cli(argv, capsys) -> str:
    """Run the CLI, expect exit 2 with a single ``error:`` line; return that line."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def train_args(root, work_dir, *extra):
    return ["train", FASTER, "--work-dir", work_dir, "--device", "cpu", "--set",
            *tiny_overrides(root), *extra]  # fmt: skip


def test_missing_dataset_root_hints_the_generator(tmp_path, capsys):
    err = run_cli(train_args(tmp_path / "nowhere", tmp_path / "w"), capsys)
    assert "drcnn data synth" in err


def test_unknown_set_key(synthetic_root, tmp_path, capsys):
    err = run_cli(train_args(synthetic_root, tmp_path / "w", "train.no_such_key=1"), capsys)
    assert "train.no_such_key" in err


def test_cuda_requested_but_absent(synthetic_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = train_args(synthetic_root, tmp_path / "w")
    args[args.index("cpu")] = "cuda"
    assert "CUDA is not available" in run_cli(args, capsys)


def test_test_rejects_non_checkpoint_and_other_architecture(synthetic_root, tmp_path, capsys):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00garbage")
    base = ["--device", "cpu", "--set", *tiny_overrides(synthetic_root)]
    assert "not a drcnn checkpoint" in run_cli(["test", FASTER, junk, *base], capsys)
    cfg = load_config(FASTER, tiny_overrides(synthetic_root))
    faster = tmp_path / "faster.pth"
    save_checkpoint(faster, {"model": build_detector(cfg).state_dict(), "config": to_dict(cfg)})
    err = run_cli(["test", DECOUPLED, faster, *base], capsys)
    assert "does not fit the model" in err and "key 'roi_heads." in err


def test_failed_checkpoint_write_keeps_the_previous_one(
    synthetic_root, tmp_path, capsys, monkeypatch
):
    """Checkpoints at iterations 1 and 2; the second write dies half-way (disk full)."""
    work_dir = tmp_path / "w"
    real_save = torch.save
    calls = []

    def dies_on_later_saves(obj, handle, *args, **kwargs):
        calls.append(obj.get("iter"))
        real_save(obj, handle, *args, **kwargs)
        if obj.get("iter") == 2:
            handle.truncate(100)
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_on_later_saves)
    args = train_args(
        synthetic_root, work_dir, "train.max_iters=3", "train.checkpoint_unit=iter",
        "train.checkpoint_interval=1",
    )  # fmt: skip
    assert "could not be written" in run_cli(args, capsys)
    monkeypatch.undo()
    assert 2 in calls
    assert load_checkpoint(work_dir / "latest.pth")["iter"] == 1
    assert load_checkpoint(work_dir / "iter_1.pth")["iter"] == 1
    assert not list(work_dir.glob(".*.tmp"))


def test_non_finite_loss_names_the_iteration(synthetic_root, tmp_path, capsys, monkeypatch):
    real_build = train_module.build_detector

    def nan_from_third_call(cfg, **options):
        model = real_build(cfg, **options)
        forward, calls = model.forward, []

        def poisoned(images, targets=None):
            losses = forward(images, targets)
            calls.append(1)
            if len(calls) >= 3:
                losses["rpn.loss_cls"] = losses["rpn.loss_cls"] * float("nan")
            return losses

        model.forward = poisoned
        return model

    monkeypatch.setattr(train_module, "build_detector", nan_from_third_call)
    work_dir = tmp_path / "w"
    args = train_args(
        synthetic_root, work_dir, "train.max_iters=5", "train.checkpoint_unit=iter",
        "train.checkpoint_interval=1",
    )  # fmt: skip
    err = run_cli(args, capsys)
    assert "non-finite loss at iteration 3" in err
    state = load_checkpoint(work_dir / "latest.pth")
    assert state["iter"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("extra", [["--images", "0"], ["--size", "0", "64"]])
def test_benchmark_rejects_bad_counts(synthetic_root, capsys, extra):
    run_cli(["benchmark", FASTER, "--device", "cpu", *extra], capsys)
