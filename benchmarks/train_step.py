"""Training-step time of drcnn's Faster R-CNN and Decoupled R-CNN against torchvision's.

    .venv/bin/python benchmarks/train_step.py [--device cpu|cuda] [--steps 5] [--warmup 2]
        [--amp none|bf16] [--no-fps] [--compile-backbone] [--models NAME ...] [--host-time]

One training step = zero_grad, forward with targets, summed losses, backward, SGD step (with
``--amp bf16`` the forward and losses under bf16 autocast, as ``train.amp: bf16`` runs them). All
three models use a randomly initialised ResNet-50 + FPN, the same batch of random images with
random boxes, and the same resize setting, measured in the same run: torchvision's
``fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)``, drcnn with
``configs/baselines/faster_rcnn_r50_fpn_torchvision.yaml`` (the same hyper-parameters) and
drcnn with ``configs/decoupled_rcnn/decoupled_rcnn_r50_fpn_2x_coco.yaml``. Default size: 2
images of 320 px on the CPU, 2 images of 800x1333 on CUDA, where the inference fps of the R-50
Decoupled R-CNN COCO config is measured too (``drcnn.engine.benchmark``; ``--no-fps`` skips
it). Prints a table and writes ``benchmarks/results/train_step.json`` with the median times and
their ratios to torchvision.

``--compile-backbone`` compiles every model's backbone (trunk and FPN, the same in all three
models) with ``torch.compile`` before the steps; the compilation falls in the warm-up steps.
It measures what a compiled backbone would give issue #13's bf16 step target (35 ms); the
library does not compile anything. On an H200 (2026-11-27) it took the Decoupled bf16 step from
70.8 to 62.4 ms, with the GPU busy 33 ms of it (README, "GPU figures"). On the 2-core CPU it made
the step slower (2.0 s -> 2.6 s for the Decoupled model at 2 x 192x320, after a 47-s compile).
``--models`` runs only the named models (the ratios need ``torchvision_faster_rcnn`` among them).

On CUDA one more step of each model runs under ``torch.profiler`` and the JSON gets its GPU
activity: how many kernels, copies and sets the device ran, and the time it was busy with them
(the union of their intervals). A step whose wall time is far above its busy time is bound by
the host (the Python and dispatch work of launching those kernels), which a compiler or CUDA
graphs can cut; one near it is bound by the kernels themselves. ``--host-time`` records that
step with Python stacks (on any device) and adds where its host time went: the self time of
Python functions and of operators on the step's thread, in total and the largest of each
(:func:`host_time`). On an H200 the Decoupled R-CNN bf16 step took 18 ms more host time than
torchvision's with fewer launches and waits (README, "GPU figures"): this says where.

On the CPU the steps run with denormal floats flushed to zero (``torch.set_flush_denormal``):
drcnn's Faster R-CNN config has frozen BatchNorm, which at random initialisation is the
identity, and after a few SGD steps its RoI head's weight gradients held hundreds of thousands
of denormals (fc6: 692,803 of 12.8 M after two steps), each computed many times slower by the
CPU; its step time then grew from 6.5 to 13.6 s over the five timed steps (2026-11-27, the
2-core AMD EPYC). Trained weights have none (a late ``make demo`` Decoupled R-CNN step: 0), so
that cost measures the random weights, not the model. torchvision's model (trainable BatchNorm
at random init) runs as fast either way (3.45 s and 3.33 s per step, alternated), so the
machine reference figure in the README keeps its meaning.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torchvision.models.detection import fasterrcnn_resnet50_fpn

from drcnn.config import load_config
from drcnn.engine.benchmark import benchmark, synchronize
from drcnn.engine.distributed import resolve_device
from drcnn.engine.train import total_loss
from drcnn.io import atomic_write_json
from drcnn.models.detector import build_detector

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "train_step.json"
HOST_ROWS = 25  # functions and operators listed by --host-time
OBJECT_ADDRESS = re.compile(r" at 0x[0-9a-f]+")  # in the names of built-in methods' events
DRCNN_CONFIGS = {
    "drcnn_faster_rcnn": ROOT / "configs/baselines/faster_rcnn_r50_fpn_torchvision.yaml",
    "drcnn_decoupled_rcnn": ROOT / "configs/decoupled_rcnn/decoupled_rcnn_r50_fpn_2x_coco.yaml",
}


def random_batch(
    batch: int, height: int, width: int, num_classes: int, device: torch.device
) -> tuple[list[torch.Tensor], list[dict]]:
    """Random images, each with 5 random boxes (at least 16 px) and labels."""
    generator = torch.Generator().manual_seed(0)
    images, targets = [], []
    for _ in range(batch):
        images.append(torch.rand(3, height, width, generator=generator).to(device))
        xy = torch.rand(5, 2, generator=generator) * torch.tensor([width - 48, height - 48])
        wh = 16 + torch.rand(5, 2, generator=generator) * 32
        boxes = torch.cat([xy, xy + wh], dim=1).to(device)
        labels = torch.randint(1, num_classes + 1, (5,), generator=generator).to(device)
        targets.append({"boxes": boxes, "labels": labels})
    return images, targets


def drcnn_overrides(height: int, width: int) -> list[str]:
    """Random init and the benchmark's resize setting for the drcnn configs."""
    return [
        "model.backbone.pretrained=null",
        f"model.transform.min_size=[{min(height, width)}]",
        f"model.transform.test_min_size={min(height, width)}",
        f"model.transform.max_size={max(height, width)}",
    ]


def build_models(
    height: int, width: int, names: list[str] | None = None
) -> dict[str, tuple[torch.nn.Module, int]]:
    """name -> (model, number of foreground classes), for ``names`` (default: all three). All
    three are built in turn from one seed whichever are kept, so a model has the same weights
    alone as beside the others."""
    torch.manual_seed(0)
    models = {
        "torchvision_faster_rcnn": (
            fasterrcnn_resnet50_fpn(
                weights=None,
                weights_backbone=None,
                min_size=min(height, width),
                max_size=max(height, width),
            ),
            90,
        )
    }
    for name, path in DRCNN_CONFIGS.items():
        cfg = load_config(path, drcnn_overrides(height, width))
        models[name] = (build_detector(cfg), cfg.model.roi_head.num_classes)
    return {name: entry for name, entry in models.items() if names is None or name in names}


def forward_backward(model: torch.nn.Module, batch: tuple, amp: str) -> None:
    """Forward with targets and summed losses (under bf16 autocast for ``amp="bf16"``, as
    ``train.amp: bf16`` runs them), then backward."""
    with torch.autocast(batch[0][0].device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
        loss = total_loss(model(*batch))
    loss.backward()


def one_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: tuple, amp: str
) -> None:
    """zero_grad, :func:`forward_backward`, optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    forward_backward(model, batch, amp)
    optimizer.step()


def add_ratios(rows: dict[str, dict[str, Any]], key: str) -> None:
    """Each row's ``ratio_to_torchvision``: its ``key`` over torchvision's Faster R-CNN row's,
    when that row is among ``rows``."""
    if "torchvision_faster_rcnn" in rows:
        reference = rows["torchvision_faster_rcnn"][key]
        for row in rows.values():
            row["ratio_to_torchvision"] = row[key] / reference


def step_times(
    model: torch.nn.Module,
    batch: tuple,
    steps: int,
    warmup: int,
    amp: str = "none",
    host: bool = False,
) -> tuple[list[float], dict[str, Any] | None]:
    """Seconds per training step (after ``warmup`` untimed steps), and the figures of one more
    step under ``torch.profiler``: on CUDA its GPU activity (:func:`gpu_activity`), with
    ``host=True`` where its host time went (:func:`host_time`); None when neither applies."""
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    device = batch[0][0].device
    times = []
    for index in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        one_step(model, optimizer, batch, amp)
        synchronize(device)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    cuda = device.type == "cuda"
    if not (cuda or host):
        return times, None
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, with_stack=host) as prof:
        one_step(model, optimizer, batch, amp)
        synchronize(device)
    events = prof.events()
    figures: dict[str, Any] = gpu_activity(events) if cuda else {}
    if host:
        figures["host"] = host_time(events)
    return times, figures


def gpu_activity(events) -> dict[str, float]:
    """The device events among a profiler's ``events`` (kernels, copies, sets): their number and
    the seconds the device was busy with them, overlapping intervals counted once."""
    spans = sorted(
        (e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA
    )
    busy_us, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop > end:
            busy_us += stop - max(start, end)
            end = stop
    return {"gpu_activities": len(spans), "gpu_busy_s": busy_us / 1e6}


def host_time(events, rows: int = HOST_ROWS) -> dict[str, Any]:
    """Where a profiled step's host time went, from a profiler's ``events`` recorded with
    ``with_stack=True``: on the thread that ran the step (the one with the most events; helper
    threads, such as the CPU path's RoIAlign pool, mostly wait), the self time of the Python
    functions (the interpreter's own work between operators, plus C++ work it calls that the
    profiler records as no operator: on the CPU, torchvision's RoIAlign kernels under
    ``torch/_ops.py: redispatch``) and of the operators (dispatch, launches, CPU kernels), in
    ms, each in total and for the ``rows`` functions or operators with the most, as
    ``[name, ms, calls]``."""
    host = [event for event in events if event.device_type == DeviceType.CPU]
    if not host:
        return {"python_self_ms": 0.0, "ops_self_ms": 0.0, "top_python": [], "top_ops": []}
    main = Counter(event.thread for event in host).most_common(1)[0][0]
    python: dict[str, list[float]] = {}
    ops: dict[str, list[float]] = {}
    for event in host:
        if event.thread != main:
            continue
        table = python if event.is_python_function else ops
        entry = table.setdefault(OBJECT_ADDRESS.sub("", event.name), [0.0, 0])
        entry[0] += event.self_cpu_time_total / 1e3
        entry[1] += 1

    def top(table: dict[str, list[float]]) -> list[list]:
        ranked = sorted(table.items(), key=lambda item: -item[1][0])[:rows]
        return [[name, round(ms, 3), calls] for name, (ms, calls) in ranked]

    return {
        "python_self_ms": round(sum(ms for ms, _ in python.values()), 3),
        "ops_self_ms": round(sum(ms for ms, _ in ops.values()), 3),
        "top_python": top(python),
        "top_ops": top(ops),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"))
    parser.add_argument("--amp", choices=("none", "bf16"), default="none")
    parser.add_argument(
        "--fps",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on CUDA, also the R-50 Decoupled R-CNN inference fps (default: yes)",
    )
    parser.add_argument(
        "--compile-backbone",
        action="store_true",
        help="torch.compile every model's backbone first (compiled in the warm-up steps)",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=("torchvision_faster_rcnn", *DRCNN_CONFIGS),
        default=None,
        help="only these models (default: all three)",
    )
    parser.add_argument(
        "--host-time",
        action="store_true",
        help="profile one more step with Python stacks: where its host time went (JSON)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # random-weight denormals (module docstring)
    height, width = args.size or ((800, 1333) if device.type == "cuda" else (320, 320))
    rows = {}
    for name, (model, num_classes) in build_models(height, width, args.models).items():
        if args.compile_backbone:
            model.backbone.compile()
        batch = random_batch(args.batch, height, width, num_classes, device)
        times, figures = step_times(
            model.to(device), batch, args.steps, args.warmup, args.amp, args.host_time
        )
        rows[name] = {"median_s": statistics.median(times), "times_s": times, **(figures or {})}
        model.cpu()
    add_ratios(rows, "median_s")
    result = {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "batch": args.batch,
        "amp": args.amp,
        "compile_backbone": args.compile_backbone,
        "input_size": [height, width],
        "steps": args.steps,
        "warmup": args.warmup,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "threads": torch.get_num_threads(),
        "models": rows,
    }
    if device.type == "cuda" and args.fps:
        cfg = load_config(DRCNN_CONFIGS["drcnn_decoupled_rcnn"], ["model.backbone.pretrained=null"])
        fps_out = args.out.with_name("decoupled_r50_fps.json")
        result["decoupled_r50_coco_inference"] = benchmark(
            cfg, images=50, device=str(device), size=(800, 1333), out=fps_out
        )
    atomic_write_json(args.out, result)
    print(f"{'model':<26}{'median step (s)':>16}{'x torchvision':>15}{'GPU busy (s)':>14}")
    for name, row in rows.items():
        ratio = f"{row['ratio_to_torchvision']:.2f}" if "ratio_to_torchvision" in row else "-"
        busy = f"{row['gpu_busy_s']:.3f}" if "gpu_busy_s" in row else "-"
        print(f"{name:<26}{row['median_s']:>16.3f}{ratio:>15}{busy:>14}")
        if "host" in row:
            host = row["host"]
            print(
                f"  profiled step's host time: Python {host['python_self_ms']:.1f} ms, operators "
                f"{host['ops_self_ms']:.1f} ms; most in Python: {host['top_python'][0][0]}"
            )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
