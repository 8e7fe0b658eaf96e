"""Inference cost of drcnn's detectors against torchvision's Faster R-CNN, measured in one run.

Times the median per-image forward pass (eval mode, no grad) of torchvision's
``fasterrcnn_resnet50_fpn``, drcnn's torchvision-compatible Faster R-CNN, Cascade R-CNN R-50 and
Decoupled R-CNN R-50 on the same random image, with random weights (cost does not depend on the
weights, apart from how many boxes survive to NMS). Reports time ratios to torchvision,
parameter counts and a FLOP estimate (``torch.utils.flop_counter.FlopCounterMode``), prints a
table and writes ``benchmarks/results/inference.json``.

    python benchmarks/inference.py --size 320x512 --repeats 5          # quick CPU run
    python benchmarks/inference.py --device cuda                        # 800x1333, 20 repeats
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.detection import fasterrcnn_resnet50_fpn

from drcnn.config import load_config
from drcnn.io import atomic_write_json
from drcnn.models.detector import build_detector

ROOT = Path(__file__).resolve().parents[1]
DRCNN_MODELS = {
    "drcnn_faster_rcnn_torchvision": "configs/baselines/faster_rcnn_r50_fpn_torchvision.yaml",
    "drcnn_cascade_rcnn_r50": "configs/baselines/cascade_rcnn_r50_fpn_20e_coco.yaml",
    "drcnn_decoupled_rcnn_r50": "configs/decoupled_rcnn/decoupled_rcnn_r50_fpn_2x_coco.yaml",
}


def parse_size(text: str) -> tuple[int, int]:
    """``HxW`` -> (height, width)."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"--size: expected HxW such as 800x1333, got {text!r}"
        ) from exc
    return height, width


def build_models(size: tuple[int, int]) -> dict[str, nn.Module]:
    """The four detectors, all resizing to ``size`` (short side, long side)."""
    short, long = min(size), max(size)
    torch.manual_seed(0)
    models = {
        "torchvision_faster_rcnn": fasterrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, min_size=short, max_size=long
        )
    }
    overrides = [
        "model.backbone.pretrained=null",
        f"model.transform.min_size=[{short}]",
        f"model.transform.test_min_size={short}",
        f"model.transform.max_size={long}",
    ]
    for name, config in DRCNN_MODELS.items():
        models[name] = build_detector(load_config(ROOT / config, overrides))
    return models


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(run: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of ``run`` over ``repeats`` calls, after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def count_flops(run: Callable[[], object]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return counter.get_total_flops()


def benchmark(size: tuple[int, int], repeats: int, device: torch.device) -> dict:
    """Per-model median seconds per image, ratio to torchvision, parameters and GFLOPs."""
    image = torch.rand(3, *size, generator=torch.Generator().manual_seed(0)).to(device)
    rows = {}
    for name, model in build_models(size).items():
        model = model.to(device).eval()

        @torch.no_grad()
        def run(model: nn.Module = model) -> object:
            return model([image])

        rows[name] = {
            "seconds_per_image": median_seconds(run, repeats, device),
            "parameters": sum(p.numel() for p in model.parameters()),
            "gflops": count_flops(run) / 1e9,
        }
        del model
    base = rows["torchvision_faster_rcnn"]["seconds_per_image"]
    for row in rows.values():
        row["time_ratio_to_torchvision"] = row["seconds_per_image"] / base
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "image_size": list(size),
        "repeats": repeats,
        "torch": torch.__version__,
        "models": rows,
    }


def format_table(result: dict) -> str:
    lines = [
        f"{'model':32s} {'ms/img':>9s} {'ratio':>6s} {'params(M)':>10s} {'GFLOPs':>8s}",
    ]
    for name, row in result["models"].items():
        lines.append(
            f"{name:32s} {row['seconds_per_image'] * 1e3:9.1f} "
            f"{row['time_ratio_to_torchvision']:6.2f} {row['parameters'] / 1e6:10.2f} "
            f"{row['gflops']:8.1f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=(800, 1333), help="HxW image size")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/inference.json")
    args = parser.parse_args()
    result = benchmark(args.size, args.repeats, torch.device(args.device))
    print(f"{result['device_name']}, image {args.size[0]}x{args.size[1]}, median of {args.repeats}")
    print(format_table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
