"""Inference cost of drcnn's detectors against torchvision's Faster R-CNN, measured in one run.

Times the median per-image forward pass (eval mode, no grad, models timed in interleaved
rounds) of torchvision's ``fasterrcnn_resnet50_fpn`` and drcnn's R-50 detectors (the
torchvision-compatible and the official Faster R-CNN, Cascade R-CNN, Decoupled R-CNN, and
Decoupled R-CNN with torchvision's RoIAlign sampling) on the same random image, with random
weights. The drcnn models take torchvision's backbone, FPN and RPN weights (same parameter
names) and its RPN ``min_size``, so all of them see the same 1000 proposals up to float rounding
(drcnn's channels-last backbone sums in another order) and differ only in their RoI heads
(checked: ``proposals_shared_with_torchvision``, the share of a model's proposals within 1 px of
one of torchvision's). With independent random
weights the proposals differed from model to model, and with them the cost of adaptive
RoIAlign, whose work grows with box size: the ratios swung by tens of percent from one
initialisation to the next.

The proposals' shapes still set the cost of adaptive RoIAlign (``sampling_ratio: 0``), so every
model is timed under two proposal regimes, one after the other:

- ``anchors``: the RPN's box-regression layer is zeroed, so the proposals are anchors (sides 32
  to 512 px, aspect ratios 0.5 to 2) picked by random objectness: shaped like a trained RPN's.
- ``random``: the random RPN's deltas move the anchors by up to e^4 in scale, which leaves many
  proposals as slivers under a pixel thick or as wide as the image (none of which a trained RPN
  emits); adaptive RoIAlign samples such a box's long side at up to 48 points per bin.

Reports time ratios to torchvision, parameter counts, a FLOP estimate
(``torch.utils.flop_counter.FlopCounterMode``; RoIAlign is not counted) and the proposals'
shapes per regime, prints a table and writes ``benchmarks/results/inference.json``.

    python benchmarks/inference.py --size 320x512 --repeats 5          # quick CPU run
    python benchmarks/inference.py --device cuda                        # 800x1333, 20 repeats
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.detection import fasterrcnn_resnet50_fpn

from drcnn.config import load_config
from drcnn.engine.benchmark import use_anchor_proposals
from drcnn.io import atomic_write_json
from drcnn.models.detector import build_detector

ROOT = Path(__file__).resolve().parents[1]
# name -> (config, extra overrides). The official (mmdetection) configs pool with adaptive
# RoIAlign (sampling_ratio 0: about (box side / 7 / stride)^2 points per bin, 4 to 16 for most
# boxes); torchvision uses 2 (4 points). The two extra rows separate that setting from the
# architecture: Faster R-CNN with the official setting, Decoupled R-CNN with torchvision's.
DRCNN_MODELS = {
    "drcnn_faster_rcnn_torchvision": (
        "configs/baselines/faster_rcnn_r50_fpn_torchvision.yaml",
        [],
    ),
    "drcnn_faster_rcnn_r50": ("configs/baselines/faster_rcnn_r50_fpn_2x_coco.yaml", []),
    "drcnn_cascade_rcnn_r50": ("configs/baselines/cascade_rcnn_r50_fpn_20e_coco.yaml", []),
    "drcnn_decoupled_rcnn_r50": (
        "configs/decoupled_rcnn/decoupled_rcnn_r50_fpn_2x_coco.yaml",
        [],
    ),
    "drcnn_decoupled_rcnn_r50_sampling2": (
        "configs/decoupled_rcnn/decoupled_rcnn_r50_fpn_2x_coco.yaml",
        ["model.roi_head.sampling_ratio=2"],
    ),
}


SHARED_PREFIXES = ("backbone.", "rpn.")


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
    """torchvision's Faster R-CNN and the drcnn models, all resizing to ``size`` (short, long)."""
    short, long = min(size), max(size)
    torch.manual_seed(0)
    models = {
        "torchvision_faster_rcnn": fasterrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, min_size=short, max_size=long
        )
    }
    overrides = [
        "model.backbone.pretrained=null",
        "model.rpn.min_size=0.001",  # torchvision's: drops degenerate boxes, so proposals match
        f"model.transform.min_size=[{short}]",
        f"model.transform.test_min_size={short}",
        f"model.transform.max_size={long}",
    ]
    shared = {
        k: v
        for k, v in models["torchvision_faster_rcnn"].state_dict().items()
        if k.startswith(SHARED_PREFIXES) and not k.endswith("num_batches_tracked")
    }
    for name, (config, extra) in DRCNN_MODELS.items():
        model = build_detector(load_config(ROOT / config, [*overrides, *extra]))
        own = [
            k
            for k in model.state_dict()
            if k.startswith(SHARED_PREFIXES) and not k.endswith("num_batches_tracked")
        ]
        if sorted(own) != sorted(shared):
            raise RuntimeError(f"{name}: backbone/RPN keys differ from torchvision's")
        model.load_state_dict(shared, strict=False)
        models[name] = model
    return models


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    runs: dict[str, Callable[[], object]], repeats: int, device: torch.device
) -> dict[str, float]:
    """Median wall time of each run over ``repeats`` rounds, after one warm-up call each.

    Every round times each model once, so slow spells of a shared machine hit all models
    alike instead of whichever model happened to be measured then.
    """
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


@torch.no_grad()
def proposals(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """The RPN's proposals for ``image`` (eval mode: one set), in the resized image's pixels."""
    images, _ = model.transform([image])
    boxes, _ = model.rpn(images, model.backbone(images.tensors))
    return boxes[0]


def count_flops(run: Callable[[], object]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return counter.get_total_flops()


REGIMES = ("anchors", "random")


def shared_share(boxes: torch.Tensor, reference: torch.Tensor, tolerance: float = 1.0) -> float:
    """Share of ``boxes`` whose corners all lie within ``tolerance`` px of one reference box."""
    if len(boxes) == 0 or len(reference) == 0:
        return 0.0
    distance = (boxes[:, None, :] - reference[None, :, :]).abs().amax(dim=2).amin(dim=1)
    return (distance <= tolerance).float().mean().item()


def proposal_shapes(boxes: torch.Tensor) -> dict[str, float]:
    """Median width/height (px), median long/short side ratio, share with a side < 4 px."""
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    short, long = torch.minimum(width, height), torch.maximum(width, height)
    return {
        "median_width": width.median().item(),
        "median_height": height.median().item(),
        "median_aspect": (long / short.clamp(min=1e-3)).median().item(),
        "share_thinner_than_4px": (short < 4).float().mean().item(),
    }


def measure(
    models: dict[str, nn.Module], image: torch.Tensor, repeats: int, device: torch.device
) -> dict:
    """Per-model median seconds per image, ratio to torchvision, parameters and GFLOPs."""
    runs = {name: torch.no_grad()(partial(model, [image])) for name, model in models.items()}
    boxes = {name: proposals(model, image) for name, model in models.items()}
    reference = boxes["torchvision_faster_rcnn"]
    rows = {}
    for name, model in models.items():
        rows[name] = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "gflops": count_flops(runs[name]) / 1e9,
            "proposals": len(boxes[name]),
            "proposals_shared_with_torchvision": shared_share(boxes[name], reference),
        }
    for name, seconds in interleaved_medians(runs, repeats, device).items():
        rows[name]["seconds_per_image"] = seconds
    base = rows["torchvision_faster_rcnn"]["seconds_per_image"]
    for row in rows.values():
        row["time_ratio_to_torchvision"] = row["seconds_per_image"] / base
    return {"proposal_shapes": proposal_shapes(reference.cpu()), "models": rows}


def benchmark(size: tuple[int, int], repeats: int, device: torch.device) -> dict:
    """:func:`measure` under the ``random`` proposals, then under ``anchors`` (see the top)."""
    image = torch.rand(3, *size, generator=torch.Generator().manual_seed(0)).to(device)
    models = {name: m.to(device).eval() for name, m in build_models(size).items()}
    regimes = {"random": measure(models, image, repeats, device)}
    for model in models.values():
        use_anchor_proposals(model)
    regimes["anchors"] = measure(models, image, repeats, device)
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "image_size": list(size),
        "repeats": repeats,
        "timing": "interleaved rounds, median per model",
        "torch": torch.__version__,
        "regimes": {name: regimes[name] for name in REGIMES},
    }


def format_table(result: dict) -> str:
    """One row per model: ms/image and ratio under each proposal regime, params, GFLOPs."""
    regimes = result["regimes"]
    header = f"{'model':36s}"
    for regime in regimes:
        header += f" {regime + ' ms':>12s} {'ratio':>6s}"
    lines = [header + f" {'params(M)':>10s} {'GFLOPs':>8s} {'shared props':>12s}"]
    first = next(iter(regimes.values()))["models"]
    for name, row in first.items():
        line = f"{name:36s}"
        for regime in regimes.values():
            ms = regime["models"][name]["seconds_per_image"] * 1e3
            line += f" {ms:12.1f} {regime['models'][name]['time_ratio_to_torchvision']:6.2f}"
        shared = min(
            r["models"][name]["proposals_shared_with_torchvision"] for r in regimes.values()
        )
        lines.append(line + f" {row['parameters'] / 1e6:10.2f} {row['gflops']:8.1f} {shared:12.1%}")
    for regime, data in regimes.items():
        shapes = data["proposal_shapes"]
        lines.append(
            f"{regime}: {data['models']['torchvision_faster_rcnn']['proposals']} proposals, "
            f"median {shapes['median_width']:.0f}x"
            f"{shapes['median_height']:.0f} px, median aspect {shapes['median_aspect']:.1f}, "
            f"{shapes['share_thinner_than_4px']:.0%} thinner than 4 px"
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
