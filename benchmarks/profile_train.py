"""Where a training iteration's time goes: torch.profiler over a few iterations of ``train()``.

Trains the synthetic ResNet-18 Decoupled R-CNN config (``configs/synthetic/
decoupled_rcnn_r18_fpn_synthetic.yaml``: 256 px, batch 8; another with ``--config``) with the
GPU study's settings (``experiments/synthetic_study_gpu.yaml``: AdamW, gradient clipping, fp32;
4 loader workers unless ``--workers``) on a small synthetic dataset generated into a temporary
folder, through ``drcnn.engine.train.train`` itself, so data loading, the step, the scheduler
and logging are all in. A from-scratch RPN proposes almost nothing near the objects in the
first iterations, so the RoI heads see few positives; late in training the regression sampler
fills up (``reg_sampler.num`` per image) and a Decoupled step gets slower (issue #13 item 7).
``--trained-rpn`` stands in for that state: the RPN's proposals are replaced by jittered
ground-truth boxes (:func:`jittered_proposals`), so the heads run at the late-training load
from the first iteration. The profiler advances once per iteration (the benchmark wraps
``drcnn.engine.train.train_step``): ``--warmup`` iterations are run and discarded (cuDNN's
choices, worker start), the next ``--steps`` are profiled. Writes, as text: the run's own
seconds per iteration and data-loading seconds (from its ``metrics.jsonl``), the profiled wall
time per iteration, and the top ops by self CUDA time (on CUDA) and by self CPU time; and the
per-iteration figures as JSON beside it.

    python benchmarks/profile_train.py --device cuda                          # 10 iterations
    python benchmarks/profile_train.py --device cpu --batch 2 --size 128 --steps 2 --warmup 1
    python benchmarks/profile_train.py --device cpu --trained-rpn --workers 1 --steps 4
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor
from torch.profiler import ProfilerActivity, profile, schedule
from torchvision.ops import boxes as box_ops

import drcnn.engine.train
from drcnn.config import load_config
from drcnn.data.synthetic import generate_synthetic_coco
from drcnn.io import atomic_write_json, atomic_write_text, read_json_lines
from drcnn.models.rpn import DecoupledRPN, ProposalSets

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/synthetic/decoupled_rcnn_r18_fpn_synthetic.yaml"
STUDY_OVERRIDES = [  # experiments/synthetic_study_gpu.yaml's training settings
    "train.optimizer=adamw",
    "train.lr=0.002",
    "train.grad_clip=10.0",
    "train.warmup_iters=50",
]
ROWS = 25


def overrides(
    root: Path, batch: int, size: int, iterations: int, amp: str, workers: int = 4
) -> list[str]:
    """The study's settings plus this run's data, size, length, precision and loader workers;
    no evaluation, no periodic checkpoint, no TensorBoard."""
    return [
        *STUDY_OVERRIDES,
        f"data.workers={workers}",
        f"data.root={root}",
        f"data.batch_size={batch}",
        f"model.transform.min_size=[{size}]",
        f"model.transform.test_min_size={size}",
        f"model.transform.max_size={2 * size}",
        f"train.max_iters={iterations}",
        f"train.amp={amp}",
        "train.eval_interval=0",
        f"train.checkpoint_interval={iterations + 1}",
        "train.log_interval=1",
        "train.tensorboard=false",
    ]


def jittered_proposals(boxes: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """``count`` proposals around one image's ground-truth ``boxes`` (``(G, 4)`` xyxy), as a
    trained RPN gives them: each a box drawn at random, its centre moved by a normal shift of
    0.15 of its width / height and its sides scaled by ``exp(N(0, 0.15))``. About 80% overlap
    their box by IoU >= 0.5 and 25% by IoU >= 0.7. An image without boxes gets none."""
    if boxes.numel() == 0:
        return boxes.new_zeros((0, 4))
    pick = torch.randint(len(boxes), (count,), generator=generator)
    base = boxes[pick.to(boxes.device)]
    noise = torch.randn((count, 4), generator=generator).to(boxes)
    size = base[:, 2:] - base[:, :2]
    centre = (base[:, :2] + base[:, 2:]) / 2 + 0.15 * noise[:, :2] * size
    half = size * torch.exp(0.15 * noise[:, 2:]) / 2
    return torch.cat([centre - half, centre + half], dim=1)


@contextmanager
def trained_rpn(enabled: bool, per_image: int) -> Iterator[None]:
    """Within the block, every training RPN's proposal sets are :func:`jittered_proposals`
    (``per_image`` per image and set, clipped to the image); its losses are the real ones."""
    if not enabled:
        yield
        return
    original = DecoupledRPN.forward
    generator = torch.Generator().manual_seed(0)

    def forward(self, images, features, targets=None):
        boxes, losses = original(self, images, features, targets)
        if not self.training:
            return boxes, losses

        def one_set() -> list[Tensor]:
            return [
                box_ops.clip_boxes_to_image(
                    jittered_proposals(t["boxes"], per_image, generator), size
                )
                for t, size in zip(targets, images.image_sizes, strict=True)
            ]

        if isinstance(boxes, ProposalSets):
            return ProposalSets(one_set(), one_set()), losses
        return one_set(), losses

    DecoupledRPN.forward = forward
    try:
        yield
    finally:
        DecoupledRPN.forward = original


def profiled_training(
    work: Path, args: argparse.Namespace
) -> tuple[torch.profiler.profile, dict[str, float]]:
    """Train ``warmup + steps`` iterations under the profiler; returns it and the profiled
    iterations' wall seconds each plus the median ``time`` and ``data_time`` that the run's
    ``metrics.jsonl`` (one record per iteration) gives them."""
    iterations = args.warmup + args.steps
    data = work / "data"
    generate_synthetic_coco(data, iterations * args.batch, args.batch, seed=0, size=args.size)
    cfg = load_config(
        args.config, overrides(data, args.batch, args.size, iterations, args.amp, args.workers)
    )
    device = torch.device(args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    marks: list[float] = []
    original = drcnn.engine.train.train_step

    def stepped(*step_args, **kwargs):
        values = original(*step_args, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        marks.append(time.perf_counter())
        prof.step()
        return values

    plan = schedule(wait=0, warmup=args.warmup, active=args.steps, repeat=1)
    drcnn.engine.train.train_step = stepped
    try:
        with (
            trained_rpn(args.trained_rpn, cfg.model.rpn.post_nms_top_n_train),
            profile(activities=activities, schedule=plan) as prof,
        ):
            drcnn.engine.train.train(cfg, work / "run", device=args.device)
    finally:
        drcnn.engine.train.train_step = original
    records = [
        r
        for r in read_json_lines(work / "run" / "metrics.jsonl")
        if r["type"] == "train" and r["iter"] > args.warmup
    ]
    return prof, {
        "seconds_per_iteration_profiled": (marks[-1] - marks[args.warmup - 1]) / args.steps,
        "median_time": statistics.median(r["time"] for r in records),
        "median_data_time": statistics.median(r["data_time"] for r in records),
    }


def report(prof: torch.profiler.profile, figures: dict[str, float], args) -> str:
    """The text summary: the run's figures, then the op tables."""
    averages = prof.key_averages()
    lines = [
        f"device {args.device}, {args.config}, batch {args.batch}, {args.size} px, "
        f"amp {args.amp}, {torch.get_num_threads()} threads, {args.workers} loader workers"
        + (", trained-RPN stand-in" if args.trained_rpn else "")
        + f"; profiled iterations {args.warmup + 1}..{args.warmup + args.steps}",
        "profiled wall time per iteration (loader wait + step + bookkeeping): "
        f"{figures['seconds_per_iteration_profiled']:.4f} s",
        f"metrics.jsonl, median over those iterations: time {figures['median_time']:.4f} s, "
        f"of which data_time {figures['median_data_time']:.4f} s",
        "",
    ]
    if args.device.startswith("cuda"):
        lines += [
            f"== top {ROWS} ops by self CUDA time",
            averages.table(sort_by="self_cuda_time_total", row_limit=ROWS),
        ]
    lines += [
        f"== top {ROWS} ops by self CPU time",
        averages.table(sort_by="self_cpu_time_total", row_limit=ROWS),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--config", type=Path, default=CONFIG, help="a synthetic config (default: Decoupled R-18)"
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256, help="short side (px)")
    parser.add_argument("--steps", type=int, default=10, help="profiled iterations")
    parser.add_argument("--warmup", type=int, default=3, help="iterations run first (>= 1)")
    parser.add_argument("--amp", choices=("none", "bf16"), default="none")
    parser.add_argument("--workers", type=int, default=4, help="data loader processes")
    parser.add_argument(
        "--trained-rpn",
        action="store_true",
        help="jittered ground-truth boxes as proposals: the late-training load of the RoI heads",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/profile_train.txt")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps: expected at least 1")
    with tempfile.TemporaryDirectory(prefix="drcnn-profile-") as tmp:
        prof, figures = profiled_training(Path(tmp), args)
    text = report(prof, figures, args)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, text + "\n")
    summary = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "config": str(args.config),
        "batch": args.batch,
        "size": args.size,
        "amp": args.amp,
        "threads": torch.get_num_threads(),
        "workers": args.workers,
        "trained_rpn": args.trained_rpn,
        "profiled_iterations": args.steps,
        **figures,
    }
    atomic_write_json(args.out.with_suffix(".json"), summary)
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
