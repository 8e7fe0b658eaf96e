"""Hostile inputs and accidents in training (issue 10): no hang without an error, no run
overwritten, nothing non-finite saved, torn files survived, bad numbers refused up front.

Bad input goes through the public command (:func:`hostile.expect_refusal`: exit 2, one
``error:`` line, no existing file changed, nothing written outside the output folder).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hostile import expect_refusal
from test_train import FASTER, read_jsonl, tiny_overrides

import drcnn.engine.train as train_module
from drcnn.config import load_config, to_dict
from drcnn.engine.checkpoint import load_checkpoint, save_checkpoint
from drcnn.engine.train import claim_work_dir, train
from drcnn.engine.watchdog import Watchdog
from drcnn.io import FolderLock
from drcnn.models.detector import build_detector

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

# smaller images than tiny_overrides: the trainings here only need a few steps to happen
SMALL = ["model.transform.min_size=[96]", "model.transform.max_size=96"]
PER_ITER = ["train.checkpoint_unit=iter", "train.checkpoint_interval=1"]


def train_argv(root: Path, work_dir: Path, *extra: str) -> list:
    return ["train", FASTER, "--work-dir", work_dir, "--device", "cpu", "--set",
            *tiny_overrides(root), *SMALL, *extra]  # fmt: skip


def subprocess_env() -> dict[str, str]:
    """This checkout and the tests folder first on the path; one intra-op thread."""
    path = os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def trained_run(synthetic_root, tmp_path_factory) -> Path:
    """A finished 2-iteration run with checkpoints iter_1, iter_2, latest (at 2) and a log."""
    work_dir = tmp_path_factory.mktemp("run") / "work"
    overrides = [*tiny_overrides(synthetic_root), *SMALL, *PER_ITER, "train.max_iters=2"]
    train(load_config(FASTER, overrides), work_dir, device="cpu")
    return work_dir


def copy_run(trained_run: Path, tmp_path: Path) -> Path:
    work_dir = tmp_path / "work"
    shutil.copytree(trained_run, work_dir)
    return work_dir


# ----------------------------------------------------------------------------- item 1: hang
def test_loader_iterator_recreated_under_threads_never_hangs():
    """40 new iterators (new epochs, restarts) while a thread pool works, threads start and
    end, tqdm's monitor runs and a thread holds a lock every sample needs. A worker forked
    from this process inherits that lock held and blocks forever (the old per-epoch DataLoader
    with the default fork context hung here on its first batch, every time); workers from the
    fork server are started once and keep their pids."""
    code = "import loader_stress; loader_stress.main(rounds=40, workers=2)"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["start_method"] in ("forkserver", "spawn")
    assert len(result["pids"]) == 2 and result["me"] not in result["pids"]


def wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_watchdog_names_rank_iteration_and_the_wait():
    messages: list[str] = []
    watchdog = Watchdog(0.2, rank=3, expire=messages.append).start()
    watchdog.waiting("the evaluation", 7)
    wait_for(lambda: messages)
    watchdog.stop()
    assert messages == [
        "training stalled: rank 3 made no progress for 0.2 s at iteration 7, waiting for the "
        "evaluation (train.stall_timeout; 0 turns this check off)"
    ]


def test_watchdog_quiet_while_progress_comes_and_off_at_zero():
    messages: list[str] = []
    watchdog = Watchdog(0.3, rank=0, expire=messages.append).start()
    for _ in range(20):  # 1 s of steps of 0.05 s
        time.sleep(0.05)
        watchdog.progress()
    watchdog.stop()
    off = Watchdog(0, rank=0, expire=messages.append).start()
    time.sleep(0.1)
    off.stop()
    assert messages == [] and off._thread is None


# Runs ``drcnn`` with a training loader that never delivers a batch, blocked in a C call (where
# no exception or signal handler in the main thread would run). It stalls before the first batch
# so that the test does not depend on how long a training step takes on a loaded machine.
STALLED_LOADER = textwrap.dedent(
    """
    import sys, time
    import drcnn.engine.data_order as data_order
    from drcnn.cli import main

    def never_delivers(self, epoch, start_batch):
        time.sleep(600)
        yield

    data_order.TrainingLoader.epoch = never_delivers
    raise SystemExit(main(sys.argv[1:]))
    """
)


def test_stalled_loader_ends_the_run_with_one_error_line(synthetic_root, tmp_path):
    work_dir = tmp_path / "work"
    argv = train_argv(synthetic_root, work_dir, "train.max_iters=3", "train.stall_timeout=2")
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", STALLED_LOADER, *map(str, argv)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [
        "error: training stalled: rank 0 made no progress for 2 s at iteration 0, waiting for "
        "the next batch from the loader (train.stall_timeout; 0 turns this check off)"
    ]
    assert time.monotonic() - started < 290  # not the 600 s sleep
    FolderLock(work_dir).release()  # the killed run left no stale lock


# ----------------------------------------------------------------------------- item 4: no overwrite
@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["metrics.jsonl", "latest.pth"], "holds a training run (latest.pth); pass --resume"),
        (["iter_best.pth"], "holds a training run (iter_best.pth); pass --resume"),
        (["metrics.jsonl"], "holds the log of a run that saved no checkpoint (metrics.jsonl)"),
    ],
)
def test_train_refuses_a_work_dir_that_holds_a_run(
    synthetic_root, tmp_path, capsys, names, message
):
    """Without --resume: max_iters=1 (or 0, before it was refused) overwrote latest.pth and
    deleted metrics.jsonl without a word."""
    work_dir = tmp_path / "work"
    work_dir.mkdir()
    for name in names:
        (work_dir / name).write_text("a run's file\n")
    argv = train_argv(synthetic_root, work_dir, "train.max_iters=1")
    err = expect_refusal(argv, capsys, watch=[work_dir, synthetic_root])
    assert err.startswith(f"error: {work_dir}: {message}") and "--work-dir" in err
    assert sorted(p.name for p in work_dir.iterdir()) == sorted(names)


def test_second_training_in_a_locked_work_dir_names_the_holder(synthetic_root, tmp_path, capsys):
    work_dir = tmp_path / "work"
    lock = FolderLock(work_dir)  # as a running training holds it
    try:
        argv = train_argv(synthetic_root, work_dir, "train.max_iters=1")
        err = expect_refusal(argv, capsys, watch=[work_dir, synthetic_root])
    finally:
        lock.release()
    assert f"{work_dir}: in use by another drcnn process (pid {os.getpid()} on " in err


def test_work_dir_that_is_a_file_is_refused(synthetic_root, tmp_path, capsys):
    work_dir = tmp_path / "work"
    work_dir.write_text("a file of the user's\n")
    argv = train_argv(synthetic_root, work_dir, "train.max_iters=1")
    err = expect_refusal(argv, capsys, watch=[work_dir, synthetic_root])
    assert err.startswith(f"error: {work_dir}: cannot write there (")


def test_lock_is_released_when_training_ends(trained_run):
    FolderLock(trained_run).release()  # the same process: a lock still held would refuse


# ----------------------------------------------------------------------------- item 6: temp files
def test_temp_files_of_killed_writes_are_removed_when_a_run_claims_the_dir(tmp_path):
    stale = [".latest.pth.k2j4_9zq.tmp", ".iter_3.pth.abcdefgh.tmp", ".metrics.jsonl.0a1b2c3d.tmp"]
    kept = [
        ".results.bbox.json.abcdefgh.tmp",  # not a training output: maybe a live `drcnn test`
        ".latest.pth.tmp",  # not the writer's pattern
        ".latest.pth.ABCDEFGH.tmp",
        "notes.tmp",
        "latest.pth",
    ]
    for name in stale + kept:
        (tmp_path / name).write_text("x")
    lock = claim_work_dir(tmp_path, fresh=False)
    lock.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, ".lock"])


# ----------------------------------------------------------------------------- item 7: torn log
def test_resume_drops_a_torn_last_log_line_and_prune_spares_other_files(
    synthetic_root, trained_run, tmp_path
):
    """The log ends in half a line (a full disk during the append); iter_best.pth and
    iter_05.pth are the user's files among the periodic checkpoints."""
    work_dir = copy_run(trained_run, tmp_path)
    log = work_dir / "metrics.jsonl"
    log.write_text(log.read_text() + '{"type": "train", "iter": 3, "lo')
    for name in ("iter_best.pth", "iter_05.pth"):
        shutil.copy(work_dir / "iter_1.pth", work_dir / name)
    overrides = [*tiny_overrides(synthetic_root), *SMALL, *PER_ITER, "train.max_iters=3",
                 "train.keep_checkpoints=1"]  # fmt: skip
    cfg = load_config(FASTER, overrides)
    with pytest.warns(UserWarning, match=rf"{log}: line 3 is incomplete"):
        train(cfg, work_dir, resume=work_dir / "latest.pth", device="cpu")
    assert [entry["iter"] for entry in read_jsonl(log)] == [1, 2, 3]
    names = sorted(p.name for p in work_dir.glob("*.pth"))
    assert names == ["iter_05.pth", "iter_3.pth", "iter_best.pth", "latest.pth"]


def test_resume_reads_no_imagenet_weights(synthetic_root, trained_run, tmp_path):
    """The checkpoint replaces every weight: a resumed run never reads the ImageNet file that its
    config names (offline, a COCO config's torchvision://resnet50 cannot be had)."""
    work_dir = copy_run(trained_run, tmp_path)
    missing = "model.backbone.pretrained=/nonexistent/imagenet_resnet18.pth"
    overrides = [*tiny_overrides(synthetic_root), *SMALL, *PER_ITER, "train.max_iters=3", missing]
    train(load_config(FASTER, overrides), work_dir, resume=work_dir / "latest.pth", device="cpu")
    assert load_checkpoint(work_dir / "latest.pth")["iter"] == 3


def test_resume_refuses_a_corrupt_line_inside_the_log(
    synthetic_root, trained_run, tmp_path, capsys
):
    work_dir = copy_run(trained_run, tmp_path)
    log = work_dir / "metrics.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(["{not json", *lines[1:]]) + "\n")
    argv = [*train_argv(synthetic_root, work_dir, *PER_ITER, "train.max_iters=3"), "--resume"]
    err = expect_refusal(argv, capsys, watch=[work_dir, synthetic_root])
    assert err.startswith(f"error: {log}: line 1 is not valid JSON")


# ----------------------------------------------------------------------------- item 9: non-finite
def test_lr_nan_is_refused_before_training(synthetic_root, tmp_path, capsys):
    """The issue's reproduction: train.lr=.nan used to save a checkpoint full of NaN."""
    work_dir = tmp_path / "work"
    argv = train_argv(synthetic_root, work_dir, "train.max_iters=3", "train.lr=.nan")
    err = expect_refusal(argv, capsys, watch=[work_dir, synthetic_root])
    assert err == "error: config train.lr: expected a number > 0, got nan"


def test_step_that_makes_weights_non_finite_is_never_saved(
    synthetic_root, tmp_path, capsys, monkeypatch
):
    """The third step runs at a NaN learning rate (what train.lr=.nan did from the start): the
    loss of that step is finite, its weights are not."""
    real_build = train_module.build_optimizer

    def nan_lr_at_third_step(model, cfg):
        optimizer = real_build(model, cfg)
        steps = []

        def hook(opt, args, kwargs):
            steps.append(1)
            if len(steps) == 3:
                for group in opt.param_groups:
                    group["lr"] = float("nan")

        optimizer.register_step_pre_hook(hook)
        return optimizer

    monkeypatch.setattr(train_module, "build_optimizer", nan_lr_at_third_step)
    work_dir = tmp_path / "work"
    argv = train_argv(synthetic_root, work_dir, *PER_ITER, "train.max_iters=3")
    err = expect_refusal(argv, capsys, watch=[work_dir, synthetic_root], may_create=[work_dir])
    assert "the step of iteration 3 made parameter 'backbone." in err and "non-finite" in err
    state = load_checkpoint(work_dir / "latest.pth")
    assert state["iter"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    names = sorted(p.name for p in work_dir.glob("*.pth"))
    assert names == ["iter_1.pth", "iter_2.pth", "latest.pth"]


@pytest.fixture
def nan_checkpoint(synthetic_root, tmp_path) -> tuple[Path, str]:
    """A checkpoint whose middle floating-point tensor holds a NaN; returns (path, its key)."""
    cfg = load_config(FASTER, [*tiny_overrides(synthetic_root), *SMALL])
    weights = build_detector(cfg).state_dict()
    keys = [k for k, v in weights.items() if v.is_floating_point()]
    key = keys[len(keys) // 2]
    weights[key][(0,) * weights[key].dim()] = float("nan")
    path = tmp_path / "ckpt" / "diverged.pth"
    save_checkpoint(path, {"model": weights, "config": to_dict(cfg), "iter": 5})
    return path, key


def test_test_refuses_a_checkpoint_with_nan_weights(synthetic_root, nan_checkpoint, capsys):
    path, key = nan_checkpoint
    argv = ["test", FASTER, path, "--device", "cpu", "--set", *tiny_overrides(synthetic_root)]
    err = expect_refusal(argv, capsys, watch=[path.parent, synthetic_root])
    assert err.startswith(f"error: checkpoint {path}: tensor '{key}' holds NaN or infinite")


def test_resume_refuses_a_checkpoint_with_nan_weights(
    synthetic_root, nan_checkpoint, tmp_path, capsys
):
    path, key = nan_checkpoint
    work_dir = tmp_path / "work"
    argv = [*train_argv(synthetic_root, work_dir, "train.max_iters=6"), "--resume", path]
    err = expect_refusal(argv, capsys, watch=[work_dir, path.parent, synthetic_root])
    assert f"tensor '{key}' holds NaN" in err


# ----------------------------------------------------------------------------- items 12, 15
@pytest.mark.parametrize(
    "override",
    [
        "train.grad_clip=-1",
        "train.grad_clip=0",
        "train.max_iters=0",
        "train.max_iters=-2",
        "train.epochs=0",
        "data.max_val_images=0",
        "data.workers=-1",
        "train.lr=-0.01",
        "train.lr=.inf",
        "data.flip_prob=1.5",
        "data.flip_prob=-0.1",
        "model.transform.min_size=[0]",
        "model.transform.min_size=[96,-1]",
        "train.log_interval=0",
        "train.checkpoint_interval=0",
        "train.keep_checkpoints=0",
        "train.stall_timeout=-1",
        "train.dist_timeout=0",
    ],
)
def test_out_of_range_numbers_are_refused_at_config_load(
    synthetic_root, tmp_path, capsys, override
):
    work_dir = tmp_path / "work"
    argv = train_argv(synthetic_root, work_dir, override)
    err = expect_refusal(argv, capsys, watch=[work_dir, synthetic_root])
    key = override.split("=")[0]
    assert err.startswith(f"error: config {key}: expected ")
    assert not work_dir.exists()


def test_empty_training_split_names_the_annotation_file(synthetic_root, tmp_path, capsys):
    data = json.loads((synthetic_root / "annotations" / "instances_train.json").read_text())
    ann = tmp_path / "no_boxes.json"
    ann.write_text(json.dumps({**data, "annotations": []}))
    work_dir = tmp_path / "work"
    argv = train_argv(synthetic_root, work_dir, f"data.train_ann={ann}")
    err = expect_refusal(argv, capsys, watch=[work_dir, synthetic_root, ann])
    assert err == f"error: {ann}: the training split has no image with a box to train on"


def test_full_disk_during_checkpoint_save_keeps_the_previous_one(
    synthetic_root, tmp_path, capsys, monkeypatch
):
    """torch's zip writer reports a failed write as a RuntimeError, not an OSError."""
    real_save = torch.save

    def disk_full_at_second(obj, handle, *args, **kwargs):
        real_save(obj, handle, *args, **kwargs)
        if obj.get("iter") == 2:
            handle.truncate(100)
            raise RuntimeError(
                "[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing "
                "file data/42: file write failed"
            )

    monkeypatch.setattr(torch, "save", disk_full_at_second)
    work_dir = tmp_path / "work"
    argv = train_argv(synthetic_root, work_dir, *PER_ITER, "train.max_iters=3")
    err = expect_refusal(argv, capsys, watch=[work_dir, synthetic_root], may_create=[work_dir])
    monkeypatch.undo()
    assert f"checkpoint {work_dir / 'iter_2.pth'}: could not be written (" in err
    assert "PytorchStreamWriter failed writing file" in err and "previous checkpoint is kept" in err
    assert load_checkpoint(work_dir / "latest.pth")["iter"] == 1
    assert not list(work_dir.glob(".*.tmp"))
