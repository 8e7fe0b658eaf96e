"""Kernel launches and synchronising calls of one training step of the synthetic models.

A training step of the small synthetic models on a GPU is bound by the host's kernel launches
(README, "GPU figures"), so their count is the figure to hold down, and it can be taken on a
CPU: :class:`drcnn.models.sync_audit.SyncAudit` runs the step along the device code path and
counts the aten ops that would launch a CUDA kernel and the calls that would make the host
wait. Each model (the synthetic ResNet-18 configs at 192 px: Faster, Cascade and Decoupled
R-CNN) takes one warm-up step, then one counted step (forward with targets, summed losses,
backward; no optimizer) on ``--batch`` random images of 192 px with 1, 3, 5, 2, ... boxes.
``--lines N`` also lists each model's N drcnn source lines that launch the most. Prints a table
and writes JSON (``--out``).

    python benchmarks/launch_count.py                     # batch 8
    python benchmarks/launch_count.py --batch 2 --lines 15
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


def count(config: Path, num_images: int, lines: int) -> dict[str, Any]:
    """One model's counted training step."""
    torch.manual_seed(0)
    model = build_detector(load_config(config, OVERRIDES)).train()
    images, targets = batch(num_images)

    def step() -> None:
        losses = model(images, targets)
        torch.stack(list(losses.values())).sum().backward()

    step()  # the first call sets up RoIAlign's scales (on the host only)
    by_line = LaunchLines()
    with by_line, SyncAudit() as audit:
        step()
    return {
        "launches": audit.launches,
        "launches_per_image": audit.launches / num_images,
        "waits": audit.total,
        "top_lines": by_line.lines.most_common(lines),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="images per step (default 8)")
    parser.add_argument("--lines", type=int, default=0, help="list each model's top N lines")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {name: count(config, args.batch, args.lines) for name, config in MODELS.items()}
    print(f"training step, {args.batch} images of {SIZE} px, counted along the device path")
    print(f"{'model':<10} {'launches':>9} {'per image':>10} {'waits':>6}")
    for name, r in results.items():
        print(f"{name:<10} {r['launches']:>9} {r['launches_per_image']:>10.1f} {r['waits']:>6}")
    for name, r in results.items():
        if r["top_lines"]:
            print(f"\n{name}: launches by source line")
            for line, n in r["top_lines"]:
                print(f"{n:>6}  {line}")
    atomic_write_json(args.out, {"batch": args.batch, "size": SIZE, "models": results})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
