"""TensorBoard scalars of training (``train.tensorboard``): read back from the event files with
TensorBoard's own reader and compared with ``metrics.jsonl``, on tiny CPU trainings."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from hostile import expect_refusal
from tensorboard.backend.event_processing.plugin_event_accumulator import (
    TENSORS,
    EventAccumulator,
)
from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
from tensorboard.util import tensor_util
from test_train import FASTER, read_jsonl, tiny_overrides

from drcnn.config import load_config
from drcnn.engine import train as train_module
from drcnn.engine.tensorboard_log import TensorBoardLog
from drcnn.engine.train import train
from drcnn.errors import DrcnnError

SMALL = [  # smaller images and val split than tiny_overrides: a faster test
    "model.transform.min_size=[96]",
    "model.transform.max_size=96",
    "model.transform.test_min_size=96",
    "data.max_val_images=2",
]


def run(root: Path, work_dir: Path, *extra: str, resume: Path | None = None) -> dict:
    """A tiny CPU training of the Faster R-CNN synthetic config into ``work_dir``."""
    cfg = load_config(FASTER, [*tiny_overrides(root), *SMALL, *extra])
    return train(cfg, work_dir, resume=resume, device="cpu")


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the event files in ``folder``, as TensorBoard's Python loader
    reads them (events a later writer's ``purge_step`` superseded are dropped): ``(step, value)``
    per tag."""
    events = EventAccumulator(str(folder), size_guidance={TENSORS: 0}).Reload()
    return {
        tag: [
            (e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in events.Tensors(tag)
        ]
        for tag in events.Tags()[TENSORS]
    }


def expected_scalars(log: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard should show for ``metrics.jsonl`` entries: each number at the entry's
    ``iter``, tagged ``<type>/<key>`` (``eval/AP_per_iou/<iou>`` for the per-IoU APs)."""
    expected: dict[str, list[tuple[int, float]]] = {}
    for entry in log:
        for key, value in entry.items():
            if key in ("type", "iter"):
                continue
            items = value.items() if isinstance(value, dict) else [(None, value)]
            for sub, number in items:
                tag = f"{entry['type']}/{key}" + (f"/{sub}" if sub is not None else "")
                expected.setdefault(tag, []).append((entry["iter"], number))
    return expected


def hide_tensorboard(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import tensorboard`` (and torch's writer, which needs it) fail, as without it."""
    for name in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)


def test_scalars_equal_the_metrics_log_for_every_key(synthetic_root, tmp_path):
    """Train records at 2 and 4, the final evaluation at 4: every number of each, nothing else."""
    work = tmp_path / "work"
    run(synthetic_root, work, "train.max_iters=4", "train.log_interval=2", "train.eval_interval=1")
    log = read_jsonl(work / "metrics.jsonl")
    assert [(e["type"], e["iter"]) for e in log] == [("train", 2), ("train", 4), ("eval", 4)]
    expected = expected_scalars(log)
    for tag in ("train/loss", "train/rpn.loss_cls", "train/s0.acc", "train/lr", "train/time"):
        assert tag in expected, tag
    for tag in (
        "train/data_time",
        "train/memory_mb",
        "eval/AP",
        "eval/AP50",
        "eval/AP_per_iou/0.75",
    ):
        assert tag in expected, tag
    assert read_scalars(work / "tensorboard") == expected


def test_records_are_readable_during_the_run_and_an_interrupt_closes_the_writer(
    synthetic_root, tmp_path, monkeypatch
):
    """Read while the run is still going (at its final step), then the run is interrupted."""
    work, seen, closed = tmp_path / "work", {}, []

    def interrupted(trainer: train_module.Trainer) -> None:
        seen.update(read_scalars(work / "tensorboard"))
        raise KeyboardInterrupt

    close = TensorBoardLog.close
    monkeypatch.setattr(train_module.Trainer, "finish", interrupted)
    monkeypatch.setattr(TensorBoardLog, "close", lambda log: closed.append(close(log)))
    with pytest.raises(KeyboardInterrupt):
        run(synthetic_root, work, "train.max_iters=2")
    assert [step for step, _ in seen["train/loss"]] == [1, 2]
    assert len(closed) == 1


def test_false_writes_no_tensorboard_folder(synthetic_root, tmp_path):
    work = tmp_path / "work"
    run(synthetic_root, work, "train.max_iters=1", "train.tensorboard=false")
    assert (work / "metrics.jsonl").is_file()
    assert not (work / "tensorboard").exists()


@pytest.mark.parametrize("value", ["1", "0", "always", "'true'", "null"])
def test_tensorboard_setting_is_auto_true_or_false(value):
    with pytest.raises(
        DrcnnError, match=re.escape("config train.tensorboard: expected one of auto, true, false")
    ):
        load_config(FASTER, [f"train.tensorboard={value}"])


def test_true_without_the_package_is_one_line_before_any_work(
    synthetic_root, tmp_path, monkeypatch, capsys
):
    hide_tensorboard(monkeypatch)

    def no_training(*args: object) -> None:
        raise AssertionError("training work started")

    monkeypatch.setattr(train_module, "prepare", no_training)
    work = tmp_path / "work"
    argv = ["train", FASTER, "--work-dir", work, "--device", "cpu", "--set",
            *tiny_overrides(synthetic_root), "train.tensorboard=true"]  # fmt: skip
    error = expect_refusal(argv, capsys, watch=[tmp_path, synthetic_root])
    assert "train.tensorboard: true needs the tensorboard package" in error
    assert "pip install tensorboard" in error
    assert not work.exists()


def test_auto_without_the_package_trains_without_tensorboard(synthetic_root, tmp_path, monkeypatch):
    hide_tensorboard(monkeypatch)
    work = tmp_path / "work"
    summary = run(synthetic_root, work, "train.max_iters=1")
    assert summary["iter"] == 1
    assert [e["iter"] for e in read_jsonl(work / "metrics.jsonl")] == [1]
    assert not (work / "tensorboard").exists()


def test_resume_leaves_one_scalar_per_step(synthetic_root, tmp_path):
    """4 iterations, then a resume from the checkpoint at 2 to 6: TensorBoard drops the first
    run's steps 3 and 4, which the resumed run logs again."""
    work = tmp_path / "work"
    per_iter = ["train.checkpoint_unit=iter", "train.checkpoint_interval=2"]
    run(synthetic_root, work, *per_iter, "train.max_iters=4")
    assert [step for step, _ in read_scalars(work / "tensorboard")["train/loss"]] == [1, 2, 3, 4]
    run(synthetic_root, work, *per_iter, "train.max_iters=6", resume=work / "iter_2.pth")
    log = read_jsonl(work / "metrics.jsonl")
    assert [e["iter"] for e in log] == [1, 2, 3, 4, 5, 6]
    scalars = read_scalars(work / "tensorboard")
    assert len(list((work / "tensorboard").iterdir())) == 2  # one event file per run
    assert {tag: [step for step, _ in series] for tag, series in scalars.items()} == {
        tag: [1, 2, 3, 4, 5, 6] for tag in scalars
    }
    assert scalars == expected_scalars(log)


def test_each_work_dir_is_one_run_under_a_common_logdir(synthetic_root, tmp_path):
    """``drcnn run`` trains each model in ``OUT/models/<run>/``: ``tensorboard --logdir
    OUT/models`` shows one run per model, named by its folder."""
    models = tmp_path / "models"
    for name in ("faster", "decoupled"):
        run(synthetic_root, models / name, "train.max_iters=1")
    runs = EventMultiplexer().AddRunsFromDirectory(str(models)).Reload().Runs()
    assert sorted(runs) == ["decoupled/tensorboard", "faster/tensorboard"]
