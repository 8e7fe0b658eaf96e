"""The training loop: SGD with warm-up and step decay, DDP, AMP, checkpoints, exact resume.

One process or many (``torchrun --nproc_per_node N -m drcnn train ...``): each rank trains on its
shard of every global batch, DDP averages the gradients, rank 0 alone logs and writes files.

Exact resume. A checkpoint stores the iteration counter and the RNG states of every rank, so a
resumed run skips the batches already done in the epoch (the data order depends only on the seed
and the epoch, see :mod:`drcnn.engine.data_order`), restores the RNGs and continues with exactly
the losses the uninterrupted run would have had (on the CPU, bit for bit).

Safety. A work dir that holds a run is refused unless the run is resumed; a lock on the work dir
keeps a second training out while one runs (:class:`drcnn.io.FolderLock`); temp files left by a
checkpoint write that was killed are removed at the start. A step that makes the weights
non-finite stops the run before anything is saved, so the last checkpoint stays the last good
one. A :class:`~drcnn.engine.watchdog.Watchdog` ends a run that stops making progress.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from drcnn.config import to_dict, to_yaml
from drcnn.data.loader import build_dataloader
from drcnn.engine import distributed as dist
from drcnn.engine.amp import amp_notice, resolve_amp
from drcnn.engine.amp import autocast as amp_autocast
from drcnn.engine.benchmark import peak_memory_mb
from drcnn.engine.checkpoint import (
    capture_rng_state,
    first_non_finite,
    load_checkpoint,
    load_model_state,
    restore_rng_state,
    save_checkpoint,
)
from drcnn.engine.data_order import TrainingLoader, mix_seed
from drcnn.engine.evaluate import evaluate
from drcnn.engine.optim import Schedule, build_optimizer, build_schedule
from drcnn.engine.tensorboard_log import TENSORBOARD_DIR, TensorBoardLog, summary_writer_class
from drcnn.engine.thread_share import follow_thread_share
from drcnn.engine.watchdog import Watchdog
from drcnn.errors import DrcnnError
from drcnn.io import (
    FolderLock,
    append_line,
    atomic_write_text,
    read_json_lines,
    remove_stale_temp_files,
)
from drcnn.models.detector import build_detector

Batch = tuple[list[Tensor], list[dict[str, Any]]]


# ----------------------------------------------------------------------------- one step
def total_loss(losses: dict[str, Tensor]) -> Tensor:
    """Sum of the entries whose last dotted part starts with ``loss`` (``s0.acc`` is a metric)."""
    return sum(v for k, v in losses.items() if k.rsplit(".", 1)[-1].startswith("loss"))


def to_device(batch: Batch, device: torch.device) -> Batch:
    images, targets = batch
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [
        {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in t.items()}
        for t in targets
    ]
    return images, targets


@dataclass
class StepContext:
    """What a training step needs besides the data."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    amp: str
    grad_clip: float | None


def autocast(ctx: StepContext) -> Any:
    """Autocast as ``train.amp`` asks (:func:`drcnn.engine.amp.autocast`): fp16 needs the
    GradScaler, which only CUDA has, so ``fp16`` on a CPU trains in fp32."""
    return amp_autocast(ctx.amp, ctx.device)


def train_step(ctx: StepContext, micro_batches: list[Batch], iteration: int) -> dict[str, float]:
    """One optimiser step over ``accumulate`` micro-batches; returns rank-averaged loss values.

    Gradients of the micro-batches add up (each loss divided by their number, DDP syncs only on
    the last one). A non-finite total loss stops training before the weights are touched; a
    step that leaves a weight non-finite (a finite loss can still give an infinite gradient)
    stops it before the weights can be saved.
    """
    ctx.optimizer.zero_grad(set_to_none=True)
    logged: dict[str, float] = {}
    for index, batch in enumerate(micro_batches):
        images, targets = to_device(batch, ctx.device)
        last = index == len(micro_batches) - 1
        sync = nullcontext() if last or not hasattr(ctx.model, "no_sync") else ctx.model.no_sync()
        with sync:
            with autocast(ctx):
                losses = ctx.model(images, targets)
                loss = total_loss(losses)
            values = reduced_values(losses, loss)
            if not math.isfinite(values["loss"]):
                raise DrcnnError(
                    f"training: non-finite loss at iteration {iteration + 1} "
                    f"({', '.join(f'{k}={v:.4g}' for k, v in values.items())}); "
                    "the last good checkpoint is kept"
                )
            ctx.scaler.scale(loss / len(micro_batches)).backward()
        for key, value in values.items():
            logged[key] = logged.get(key, 0.0) + value / len(micro_batches)
    if ctx.grad_clip is not None:
        ctx.scaler.unscale_(ctx.optimizer)
        params = [p for group in ctx.optimizer.param_groups for p in group["params"]]
        nn.utils.clip_grad_norm_(params, ctx.grad_clip)
    ctx.scaler.step(ctx.optimizer)
    ctx.scaler.update()
    broken = first_non_finite_parameter(ctx.model)
    if broken is not None:
        raise DrcnnError(
            f"training: the step of iteration {iteration + 1} made parameter '{broken}' "
            "non-finite (NaN or infinite); stopped before saving it, the last good checkpoint "
            "is kept"
        )
    return logged


def first_non_finite_parameter(model: nn.Module) -> str | None:
    """Name of the first trainable parameter holding a NaN or an infinity, else None."""
    return first_non_finite(
        {name: p for name, p in unwrap(model).named_parameters() if p.requires_grad}
    )


def reduced_values(losses: dict[str, Tensor], loss: Tensor) -> dict[str, float]:
    """Loss-dict entries and their total as floats, averaged over ranks (one all-reduce)."""
    keys = sorted(losses)
    stacked = torch.stack([losses[k].detach().float() for k in keys] + [loss.detach().float()])
    values = dist.all_reduce_mean(stacked).tolist()
    return dict(zip([*keys, "loss"], values, strict=True))


# ----------------------------------------------------------------------------- bookkeeping
class MetricsLog:
    """``metrics.jsonl``: one JSON object per logging step or evaluation (rank 0 writes).

    Each entry is appended whole or not at all (:func:`drcnn.io.append_line`); on resume a torn
    last line (a run killed mid-append) is dropped with a warning. With a ``writer_class``
    (``train.tensorboard``, :func:`summary_writer_class`) each entry also goes to TensorBoard,
    ``tensorboard/`` beside the log, from :meth:`start` to :meth:`close`.
    """

    def __init__(self, path: Path, writer_class: type | None = None) -> None:
        self.path = path
        self.enabled = dist.is_main_process()
        self.kept: list[dict[str, Any]] | None = None
        self.writer_class = writer_class if self.enabled else None
        self.tensorboard: TensorBoardLog | None = None

    def read_until(self, iteration: int) -> None:
        """Read the entries up to ``iteration`` (a resumed checkpoint's) of an existing log;
        nothing is written before :meth:`start`."""
        if self.enabled and self.path.is_file():
            self.kept = [e for e in read_json_lines(self.path) if e.get("iter", 0) <= iteration]

    def start(self, iteration: int) -> None:
        """Open the log at ``iteration`` (0, or a resumed checkpoint's): drop the entries logged
        after it (they will be logged again), in TensorBoard too (events from ``iteration + 1``
        on; the checkpoint's own step keeps its entries, which are not logged again)."""
        if self.kept is not None:
            atomic_write_text(self.path, "".join(f"{json.dumps(e)}\n" for e in self.kept))
        if self.writer_class is not None:
            folder = self.path.parent / TENSORBOARD_DIR
            self.tensorboard = TensorBoardLog(folder, self.writer_class, iteration + 1)

    def write(self, entry: dict[str, Any]) -> None:
        if self.enabled:
            append_line(self.path, json.dumps(entry))
        if self.tensorboard is not None:
            self.tensorboard.write(entry)

    def close(self) -> None:
        """Close the TensorBoard writer (its events are on disk already); idempotent."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


class Window:
    """Averages of the values logged since the last logging step."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1

    def pop(self) -> dict[str, float]:
        means = {key: value / self.count for key, value in self.sums.items()}
        self.sums, self.count = {}, 0
        return means


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


@dataclass
class Trainer:
    """The state a run carries between iterations, and its checkpoint/evaluation side effects."""

    cfg: DictConfig
    work_dir: Path
    ctx: StepContext
    scheduler: torch.optim.lr_scheduler.LambdaLR
    schedule: Schedule
    meta: dict[str, Any]
    log: MetricsLog
    watchdog: Watchdog
    iteration: int = 0
    last_saved: int = -1
    last_evaluated: int = -1
    metrics: dict[str, Any] | None = None

    @property
    def epoch(self) -> int:
        """Completed epochs."""
        return self.iteration // self.schedule.iters_per_epoch

    def state(self) -> dict[str, Any]:
        """Checkpoint content; RNG states gathered from every rank (a collective call)."""
        return {
            "model": unwrap(self.ctx.model).state_dict(),
            "optimizer": self.ctx.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.ctx.scaler.state_dict(),
            "epoch": self.epoch,
            "iter": self.iteration,
            "rng": dist.all_gather_object(capture_rng_state()),
            "config": to_dict(self.cfg),
            **self.meta,
        }

    def restore(self, path: Path) -> None:
        """Continue from a checkpoint: weights, optimiser, schedule, counters, this rank's RNG."""
        state = load_checkpoint(path)
        load_model_state(unwrap(self.ctx.model), state["model"], str(path))
        self.ctx.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.ctx.scaler.load_state_dict(state["scaler"])
        self.iteration = self.last_saved = int(state["iter"])
        rng = state.get("rng") or []
        if len(rng) == dist.get_world_size():
            restore_rng_state(rng[dist.get_rank()])

    def save(self, name: str | None) -> Path:
        """``latest.pth`` (and ``name`` if given), keeping the last ``keep_checkpoints`` named."""
        self.watchdog.waiting("a checkpoint to be written", self.iteration)
        state = self.state()
        latest = self.work_dir / "latest.pth"
        if dist.is_main_process():
            if name is not None:
                save_checkpoint(self.work_dir / name, state)
                self._prune(name.split("_")[0])
            save_checkpoint(latest, state)
        dist.barrier()
        self.last_saved = self.iteration
        return latest

    def _prune(self, prefix: str) -> None:
        """Delete all but the newest ``keep_checkpoints`` periodic ``<prefix>_<N>.pth`` files.

        Only names this loop writes are candidates: ``iter_best.pth``, ``iter_05.pth`` or any
        other file of the user's is never touched.
        """
        periodic = re.compile(rf"{prefix}_(0|[1-9][0-9]*)\.pth")
        numbered = sorted(
            (int(match[1]), path)
            for path in self.work_dir.iterdir()
            if (match := periodic.fullmatch(path.name))
        )
        for _, old in numbered[: -self.cfg.train.keep_checkpoints]:
            old.unlink()

    def evaluate(self) -> None:
        """Evaluate on the val split (RNG untouched, so training continues identically)."""
        model = unwrap(self.ctx.model)
        out_dir = self.work_dir / "eval" / f"iter_{self.iteration}"
        devices = [self.ctx.device.index] if self.ctx.device.type == "cuda" else []
        self.watchdog.waiting("the evaluation", self.iteration)
        # every evaluated batch is progress: a long evaluation is not a stalled run
        beat = model.register_forward_pre_hook(lambda *_: self.watchdog.progress())
        try:
            with torch.random.fork_rng(devices=devices):
                self.metrics = evaluate(model, self.cfg, self.ctx.device, out_dir)
        finally:
            beat.remove()
        model.train()
        self.log.write(
            {"type": "eval", "iter": self.iteration, "epoch": self.epoch, **self.metrics}
        )
        self.last_evaluated = self.iteration

    def after_iteration(self) -> None:
        """Periodic checkpoints (per iteration or epoch) and evaluation."""
        tcfg = self.cfg.train
        epoch_end = self.iteration % self.schedule.iters_per_epoch == 0
        if tcfg.checkpoint_unit == "iter" and self.iteration % tcfg.checkpoint_interval == 0:
            self.save(f"iter_{self.iteration}.pth")
        if (
            epoch_end
            and tcfg.checkpoint_unit == "epoch"
            and self.epoch % tcfg.checkpoint_interval == 0
        ):
            self.save(f"epoch_{self.epoch}.pth")
        if epoch_end and tcfg.eval_interval > 0 and self.epoch % tcfg.eval_interval == 0:
            self.evaluate()

    def finish(self) -> Path:
        """Final checkpoint and evaluation, unless this iteration already had them."""
        latest = self.work_dir / "latest.pth"
        if self.last_saved != self.iteration:
            latest = self.save(None)
        if self.cfg.train.eval_interval > 0 and self.last_evaluated != self.iteration:
            self.evaluate()
        return latest


# ----------------------------------------------------------------------------- the loop
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch; each rank gets its own stream from ``(seed, rank)``."""
    rank_seed = mix_seed(seed, dist.get_rank())
    random.seed(rank_seed)
    np.random.seed(rank_seed % 2**32)
    torch.manual_seed(rank_seed)


def train(
    cfg: DictConfig,
    work_dir: str | Path,
    resume: str | Path | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Train the detector of ``cfg`` on ``cfg.data``'s train split; returns a run summary.

    Writes into ``work_dir``: ``config.yaml``, ``metrics.jsonl``, ``latest.pth`` plus periodic
    ``epoch_N.pth`` / ``iter_N.pth`` and ``eval/iter_N/`` (metrics of the periodic evaluations,
    every ``train.eval_interval`` epochs and at the end; 0 turns evaluation off).
    The learning rate follows the linear scaling rule of :func:`scaled_lr`; warm-up and decay
    steps follow :class:`Schedule`. ``resume`` continues from a checkpoint exactly where it
    stopped; without it, a ``work_dir`` that already holds a run is refused (nothing in it is
    changed). The work dir is locked for the whole run (see :func:`claim_work_dir`). Under
    torchrun (``WORLD_SIZE`` > 1) the run is data-parallel (DDP).
    """
    torch_device = dist.setup(device, cfg.train.dist_timeout)
    work_dir = Path(work_dir)
    fresh = resume is None
    if fresh:
        dist.on_main_process(refuse_existing_run, work_dir)
    # rank 0 alone logs, so only its environment needs the tensorboard package
    writer_class = dist.on_main_process(summary_writer_class, cfg.train.tensorboard)
    watchdog = Watchdog(cfg.train.stall_timeout, dist.get_rank())
    # everything that can refuse the run reads only, before the work dir is claimed
    trainer, loader = prepare(cfg, work_dir, resume, torch_device, watchdog, writer_class)
    lock = dist.on_main_process(claim_work_dir, work_dir, fresh)
    try:
        if dist.is_main_process():
            atomic_write_text(work_dir / "config.yaml", to_yaml(cfg))
        trainer.log.start(trainer.iteration)
        watchdog.start()
        run_loop(trainer, loader)
        latest = trainer.finish()
    finally:
        watchdog.stop()
        trainer.log.close()
        if lock is not None:
            lock.release()
    return {
        "work_dir": str(work_dir),
        "iter": trainer.iteration,
        "epoch": trainer.epoch,
        "checkpoint": str(latest),
        "metrics": trainer.metrics,
    }


# The files a training run writes at the top of its work dir (their temp files are its own).
RUN_OUTPUTS = re.compile(r"latest\.pth|(iter|epoch)_[0-9]+\.pth|metrics\.jsonl|config\.yaml")


def refuse_existing_run(work_dir: Path) -> None:
    """A fresh run must not overwrite a run's checkpoints (``*.pth``) or log: one line instead,
    naming the first such file (``latest.pth`` first)."""
    if not work_dir.is_dir():
        return
    checkpoints = [work_dir / "latest.pth", *sorted(work_dir.glob("*.pth"))]
    found = next((path for path in checkpoints if path.is_file()), None)
    if found is not None:
        raise DrcnnError(
            f"{work_dir}: holds a training run ({found.name}); pass --resume to continue it "
            "or choose another --work-dir"
        )
    if (work_dir / "metrics.jsonl").exists():
        raise DrcnnError(
            f"{work_dir}: holds the log of a run that saved no checkpoint (metrics.jsonl); "
            "remove it to start again or choose another --work-dir"
        )


def claim_work_dir(work_dir: Path, fresh: bool) -> FolderLock:
    """Lock ``work_dir`` for the run (rank 0) and clear what killed writes left there.

    A ``fresh`` run checks again under the lock that the dir holds no run (:func:`train` checks
    before, so that a refusal leaves the dir untouched; a run may have started in between).
    Under the lock no other training writes there, so temp files of a run's outputs are
    leftovers of a killed write and are removed.
    """
    lock = FolderLock(work_dir)
    try:
        if fresh:
            refuse_existing_run(work_dir)
        remove_stale_temp_files(work_dir, RUN_OUTPUTS)
    except BaseException:
        lock.release()
        raise
    return lock


def prepare(
    cfg: DictConfig,
    work_dir: Path,
    resume: str | Path | None,
    device: torch.device,
    watchdog: Watchdog,
    writer_class: type | None = None,
) -> tuple[Trainer, TrainingLoader]:
    """Data, model, optimiser and schedule of the run, restored from ``resume`` if given (its log
    read up to the checkpoint; ``writer_class``: its TensorBoard writer, see
    :class:`MetricsLog`); nothing is written."""
    seed_everything(cfg.train.seed)
    base_loader = build_dataloader(cfg, "train")
    dataset = base_loader.dataset
    loader = TrainingLoader(base_loader, cfg, device)  # workers start with its first iterator
    schedule = build_schedule(cfg, len(dataset), loader.groups)
    # a resumed run's checkpoint replaces every weight: its ImageNet weights are not read
    model = build_detector(cfg, pretrained=resume is None).to(device)
    model.train()
    optimizer = build_optimizer(model, cfg)
    amp = resolve_amp(cfg.train.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16" and device.type == "cuda")
    ctx = StepContext(model, optimizer, scaler, device, amp, cfg.train.grad_clip)
    notice = amp_notice(amp, device)
    if notice and dist.is_main_process():
        warnings.warn(notice, stacklevel=3)
    trainer = Trainer(
        cfg=cfg,
        work_dir=work_dir,
        ctx=ctx,
        # a bound method: LambdaLR saves (and on resume restores) no fields of it
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.lr_factor),
        schedule=schedule,
        meta=dataset_meta(dataset),
        log=MetricsLog(work_dir / "metrics.jsonl", writer_class),
        watchdog=watchdog,
    )
    if resume is not None:
        trainer.restore(Path(resume))
        trainer.log.read_until(trainer.iteration)
    if dist.is_distributed():
        ctx.model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    return trainer, loader


def dataset_meta(dataset: Any) -> dict[str, Any]:
    """Class names and category ids stored with the weights (for ``infer`` and ``test``)."""
    return {
        "class_names": list(getattr(dataset, "class_names", [])),
        "cat_ids": [int(c) for c in getattr(dataset, "cat_ids", [])],
    }


def run_loop(trainer: Trainer, loader: TrainingLoader) -> None:
    """Iterate epochs from ``trainer.iteration`` to the schedule's end, logging on rank 0."""
    cfg, schedule, watchdog = trainer.cfg, trainer.schedule, trainer.watchdog
    accumulate = cfg.train.accumulate
    window = Window()
    bar = tqdm(
        total=schedule.total_iters,
        initial=trainer.iteration,
        desc="train",
        dynamic_ncols=True,
        disable=None if dist.is_main_process() else True,
    )
    while trainer.iteration < schedule.total_iters:
        epoch = trainer.epoch
        done_in_epoch = trainer.iteration - epoch * schedule.iters_per_epoch
        batches = loader.epoch(epoch, done_in_epoch * accumulate)
        for _ in range(done_in_epoch, schedule.iters_per_epoch):
            follow_thread_share()  # under drcnn run --jobs N: the cores other steps left
            start = time.perf_counter()
            watchdog.waiting("the next batch from the loader", trainer.iteration)
            micro_batches = [next(batches) for _ in range(accumulate)]
            data_time = time.perf_counter() - start
            lr = trainer.ctx.optimizer.param_groups[0]["lr"]
            watchdog.waiting("the training step", trainer.iteration)
            values = train_step(trainer.ctx, micro_batches, trainer.iteration)
            trainer.scheduler.step()
            trainer.iteration += 1
            watchdog.progress()
            window.add({**values, "time": time.perf_counter() - start, "data_time": data_time})
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.3g}")
            last = trainer.iteration == schedule.total_iters
            if trainer.iteration % cfg.train.log_interval == 0 or last:
                trainer.log.write(
                    {
                        "type": "train",
                        "iter": trainer.iteration,
                        "epoch": trainer.iteration / schedule.iters_per_epoch,
                        "lr": lr,
                        **window.pop(),
                        "memory_mb": peak_memory_mb(trainer.ctx.device),
                    }
                )
            trainer.after_iteration()
            if last:
                break
    bar.close()
