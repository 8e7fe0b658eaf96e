"""Kernel launches and synchronising calls of one training step of a detector.

A training step on a GPU is bound by the host's kernel launches (README, "GPU figures"), so
their count is the figure to hold down, and it can be taken on a CPU:
:class:`drcnn.models.sync_audit.SyncAudit` runs the step along the device code path and counts
the aten ops that would launch a CUDA kernel and the calls that would make the host wait. Each
model takes one warm-up step, then one counted step (forward with targets, summed losses,
backward; no optimizer).

- default: the synthetic ResNet-18 configs at 192 px (Faster, Cascade and Decoupled R-CNN) on
  ``--batch`` random images with 1, 3, 5, 2, ... boxes;
- ``--r50``: the three models of ``benchmarks/train_step.py`` (torchvision's Faster R-CNN,
  drcnn's with its config, drcnn's Decoupled R-CNN R-50) on its batch of ``--batch`` random
  images of 320x533 (the count hardly depends on the size), with the ratio to torchvision's
  count, the figure behind issue #13's training-step target.

``--amp bf16`` counts the step under bf16 autocast (CPU autocast: its cast lists are close to,
not the same as, CUDA's). ``--lines N`` also lists each model's N drcnn source lines that launch
the most. Prints a table and writes JSON (``--out``).

    python benchmarks/launch_count.py                     # batch 8
    python benchmarks/launch_count.py --batch 2 --lines 15
    python benchmarks/launch_count.py --r50 [--amp bf16]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from train_step import add_ratios, build_models, forward_backward, random_batch

from drcnn.config import load_config
from drcnn.io import atomic_write_json
from drcnn.models import sync_audit
from drcnn.models.detector import build_detector
from drcnn.models.sync_audit import SyncAudit, launches_kernel

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "launch_count.json"
MODELS_DIR = str(ROOT / "drcnn" / "models")
MODELS = {
    name: ROOT / f"configs/synthetic/{name}_rcnn_r18_fpn_synthetic.yaml"
    for name in ("faster", "cascade", "decoupled")
}
SIZE = 192
R50_SIZE = (320, 533)
OVERRIDES = [
    "model.backbone.pretrained=null",
    f"model.transform.min_size=[{SIZE}]",
    f"model.transform.test_min_size={SIZE}",
    f"model.transform.max_size={SIZE}",
]
BOX_COUNTS = (1, 3, 5, 2)


def batch(num_images: int) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Seeded random images and targets (``BOX_COUNTS`` boxes per image, in turn)."""
    g = torch.Generator().manual_seed(8)
    images = [torch.rand(3, SIZE, SIZE, generator=g) for _ in range(num_images)]
    targets = []
    for i in range(num_images):
        count = BOX_COUNTS[i % len(BOX_COUNTS)]
        xy = torch.rand(count, 2, generator=g) * (SIZE * 0.6)
        boxes = torch.cat([xy, xy + 16 + torch.rand(count, 2, generator=g) * 50], dim=1)
        targets.append({"boxes": boxes, "labels": torch.randint(1, 8, (count,), generator=g)})
    return images, targets


def model_line() -> str:
    """``file:line`` of the innermost frame in ``drcnn/models`` (not the audit), else
    ``backward``: the autograd engine runs the backward without a Python frame of drcnn's."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(MODELS_DIR) and name != sync_audit.__file__:
            return f"{Path(name).relative_to(ROOT)}:{frame.f_lineno}"
        frame = frame.f_back
    return "backward"


class LaunchLines(TorchDispatchMode):
    """Kernel launches by :func:`model_line`."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if launches_kernel(func):
            self.lines[model_line()] += 1
        return func(*args, **(kwargs or {}))


def synthetic_models(num_images: int) -> dict[str, tuple[torch.nn.Module, tuple]]:
    """name -> (model, batch): the synthetic R-18 configs on :func:`batch`."""
    models = {}
    for name, config in MODELS.items():
        torch.manual_seed(0)
        models[name] = (build_detector(load_config(config, OVERRIDES)), batch(num_images))
    return models


def r50_models(
    num_images: int, size: tuple[int, int] = R50_SIZE
) -> dict[str, tuple[torch.nn.Module, tuple]]:
    """name -> (model, batch): ``train_step.py``'s R-50 models on its random batch of ``size``."""
    return {
        name: (model, random_batch(num_images, *size, classes, torch.device("cpu")))
        for name, (model, classes) in build_models(*size).items()
    }


def count(model: torch.nn.Module, inputs: tuple, lines: int, amp: str) -> dict[str, Any]:
    """One model's counted training step."""
    model.train()

    forward_backward(model, inputs, amp)  # sets up RoIAlign's scales and the kept anchors
    by_line = LaunchLines()
    with by_line, SyncAudit() as audit:
        forward_backward(model, inputs, amp)
    num_images = len(inputs[0])
    return {
        "launches": audit.launches,
        "launches_per_image": audit.launches / num_images,
        "waits": audit.total,
        "top_lines": by_line.lines.most_common(lines),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=None, help="images (default 8; --r50: 2)")
    parser.add_argument("--r50", action="store_true", help="train_step.py's R-50 models")
    parser.add_argument("--amp", choices=("none", "bf16"), default="none")
    parser.add_argument("--lines", type=int, default=0, help="list each model's top N lines")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    num_images = args.batch or (2 if args.r50 else 8)
    torch.set_num_threads(1)
    models = r50_models(num_images, R50_SIZE) if args.r50 else synthetic_models(num_images)
    results = {
        name: count(model, inputs, args.lines, args.amp) for name, (model, inputs) in models.items()
    }
    size = "x".join(map(str, R50_SIZE)) if args.r50 else f"{SIZE}"
    add_ratios(results, "launches")
    print(f"training step, {num_images} images of {size} px, amp {args.amp}, device path")
    print(f"{'model':<24} {'launches':>9} {'per image':>10} {'waits':>6} {'x torchvision':>14}")
    for name, r in results.items():
        ratio = f"{r['ratio_to_torchvision']:.2f}" if "ratio_to_torchvision" in r else ""
        print(
            f"{name:<24} {r['launches']:>9} {r['launches_per_image']:>10.1f} {r['waits']:>6} "
            f"{ratio:>14}"
        )
    for name, r in results.items():
        if r["top_lines"]:
            print(f"\n{name}: launches by source line")
            for line, n in r["top_lines"]:
                print(f"{n:>6}  {line}")
    summary = {"batch": num_images, "size": size, "amp": args.amp, "models": results}
    atomic_write_json(args.out, summary)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
