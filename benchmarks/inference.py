"""Inference cost of drcnn's detectors against torchvision's Faster R-CNN, measured in one run.

Times the median per-image forward pass (eval mode, no grad, models timed in interleaved
rounds) of torchvision's ``fasterrcnn_resnet50_fpn`` and drcnn's R-50 detectors (the
torchvision-compatible and the official Faster R-CNN, Cascade R-CNN, Decoupled R-CNN, and
Decoupled R-CNN with torchvision's RoIAlign sampling) on the same random image, with random
weights, at both final score thresholds: 0.001 (the official configs') and 0.05 (torchvision's).
The drcnn models take torchvision's backbone, FPN and RPN weights (same parameter names) and its
RPN ``min_size``, so all of them see the same 1000 proposals up to float rounding (drcnn's
channels-last backbone sums in another order) and differ only in their RoI heads (checked:
``proposals_shared_with_torchvision``, the share of a model's proposals within 1 px of one of
torchvision's).

**The final NMS's load is fixed, not left to the initialisation.** With random weights the
number of (box, class) pairs above the score threshold, which the final NMS sorts and scans,
depended on the init: one H200 saw Faster R-CNN go from 15.5 to 24.5 ms between thresholds and
Decoupled R-CNN not move. Here every classification layer's output (each ``cls_score``, all
stages alike) is replaced by a forward hook with one seeded table of logits whose softmax is
known exactly (``drcnn.engine.fixed_load``, which ``drcnn benchmark`` uses for random weights
too): of the 1000 RoIs x 80 classes = 80,000 pairs,
``CANDIDATES`` = 3,000 (3.75 %) score above 0.001 and ``CONFIDENT`` = 300 of them above 0.05,
every other foreground pair 1e-5 and the background the rest. Why these numbers: a trained COCO
detector keeps "a few thousand" pairs per image above 0.001 (issue 13) spread over many RoIs and
a few classes each, and only the confident tail, about a tenth, above 0.05. The layers still
run, so their cost is kept; only their values are set. The RoI heads' box regression stays
random. torchvision's head has 91 columns (COCO's 90 ids, 10 unused): the 80 used ones get the
table's columns, the unused ones 1e-5. Reported per model and threshold: ``nms_candidates``,
the boxes entering the final NMS (counted by wrapping torchvision's ``nms`` during the RoI
heads' forward in one untimed pass; ``None`` if the head calls no ``nms``), and
``pairs_above_threshold``, what the table puts above it for the RoIs the head saw.

The proposals' shapes set the cost of adaptive RoIAlign (``sampling_ratio: 0``); two proposal
regimes (``--proposals``, default ``anchors``):

- ``anchors``: the RPN's box-regression layer is zeroed, so the proposals are anchors (sides 32
  to 512 px, aspect ratios 0.5 to 2) picked by random objectness: shaped like a trained RPN's.
- ``random``: the random RPN's deltas move the anchors by up to e^4 in scale, which leaves many
  proposals as slivers under a pixel thick or as wide as the image (none of which a trained RPN
  emits); adaptive RoIAlign samples such a box's long side at up to 48 points per bin.

Reports time ratios to torchvision, parameter counts, a FLOP estimate
(``torch.utils.flop_counter.FlopCounterMode``; RoIAlign is not counted), the NMS load and the
proposals' shapes per regime and threshold, prints a table and writes
``benchmarks/results/inference.json``.

    python benchmarks/inference.py --size 320x512 --repeats 5          # quick CPU run
    python benchmarks/inference.py --device cuda                        # 800x1333, 20 repeats
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
import torchvision.ops.boxes
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights, fasterrcnn_resnet50_fpn

import drcnn.models.postprocess
from drcnn.config import load_config
from drcnn.engine import fixed_load
from drcnn.engine.benchmark import use_anchor_proposals
from drcnn.engine.fixed_load import TABLE_ROIS, FixedLogits, pair_counts
from drcnn.io import atomic_write_json
from drcnn.models.detector import build_detector

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = "torchvision_faster_rcnn"
# name -> (config, extra overrides). The official (mmdetection) configs pool with adaptive
# RoIAlign (sampling_ratio 0: about (box side / 7 / stride)^2 points per bin, 4 to 16 for most
# boxes); torchvision uses 2 (4 points). The last row separates that setting from the
# architecture: Decoupled R-CNN with torchvision's.
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
SCORE_THRESHOLDS = (0.001, 0.05)
PROPOSAL_REGIMES = ("anchors", "random")

COCO_CLASSES = 80
# The classification load (see the top; drcnn.engine.fixed_load): of TABLE_ROIS x COCO_CLASSES
# (RoI, class) pairs, CANDIDATES score above 0.001 and CONFIDENT of them above 0.05.
CANDIDATES, CONFIDENT = pair_counts(COCO_CLASSES)


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
        REFERENCE: fasterrcnn_resnet50_fpn(
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
        for k, v in models[REFERENCE].state_dict().items()
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


def foreground_columns(model: nn.Module) -> list[int]:
    """The model's logit columns of COCO's 80 classes: 1..80 for drcnn (its RoI heads carry
    their ``cfg``); torchvision's 91-column head (COCO's category ids, background 0) leaves out
    the ids COCO does not use."""
    if hasattr(model.roi_heads, "cfg"):
        return list(range(1, COCO_CLASSES + 1))
    names = FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    return [i for i, name in enumerate(names) if i > 0 and name != "N/A"]


def fix_classification(model: nn.Module, device: torch.device) -> FixedLogits:
    """The fixed classification load on ``model``, in its own column layout."""
    return fixed_load.fix_classification(model, device, foreground_columns(model))


def set_score_thresh(model: nn.Module, threshold: float) -> None:
    """Set the final score threshold: drcnn's ``roi_head.test.score_thresh`` or torchvision's
    ``roi_heads.score_thresh``."""
    heads = model.roi_heads
    if hasattr(heads, "cfg"):
        heads.cfg.test.score_thresh = threshold
    else:
        heads.score_thresh = threshold


@contextmanager
def counting_final_nms(model: nn.Module) -> Iterator[list[int]]:
    """Record the number of boxes of each NMS call made inside ``model.roi_heads`` (the final
    NMS; the RPN's calls are outside it). Patches ``nms`` in torchvision's box ops, which its
    ``batched_nms`` calls on every path (one call, or one per class), and in drcnn's
    postprocess module if it imports the name."""
    sizes: list[int] = []
    inside = [False]
    original = torchvision.ops.boxes.nms

    def counted(boxes: Tensor, *args, **kwargs) -> Tensor:
        if inside[0]:
            sizes.append(int(boxes.shape[0]))
        return original(boxes, *args, **kwargs)

    def enter(*_) -> None:
        inside[0] = True

    def leave(*_) -> None:
        inside[0] = False

    handles = [
        model.roi_heads.register_forward_pre_hook(enter),
        model.roi_heads.register_forward_hook(leave),
    ]
    patched = [
        module
        for module in (torchvision.ops.boxes, drcnn.models.postprocess)
        if getattr(module, "nms", None) is original
    ]
    for module in patched:
        module.nms = counted
    try:
        yield sizes
    finally:
        for module in patched:
            module.nms = original
        for handle in handles:
            handle.remove()


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
def proposals(model: nn.Module, image: Tensor) -> Tensor:
    """The RPN's proposals for ``image`` (eval mode: one set), in the resized image's pixels."""
    images, _ = model.transform([image])
    boxes, _ = model.rpn(images, model.backbone(images.tensors))
    return boxes[0]


def count_flops(run: Callable[[], object]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return counter.get_total_flops()


def shared_share(boxes: Tensor, reference: Tensor, tolerance: float = 1.0) -> float:
    """Share of ``boxes`` whose corners all lie within ``tolerance`` px of one reference box."""
    if len(boxes) == 0 or len(reference) == 0:
        return 0.0
    distance = (boxes[:, None, :] - reference[None, :, :]).abs().amax(dim=2).amin(dim=1)
    return (distance <= tolerance).float().mean().item()


def proposal_shapes(boxes: Tensor) -> dict[str, float]:
    """Median width/height (px), median long/short side ratio, share with a side < 4 px."""
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    short, long = torch.minimum(width, height), torch.maximum(width, height)
    return {
        "median_width": width.median().item(),
        "median_height": height.median().item(),
        "median_aspect": (long / short.clamp(min=1e-3)).median().item(),
        "share_thinner_than_4px": (short < 4).float().mean().item(),
    }


def nms_load(model: nn.Module, hook: FixedLogits, image: Tensor, threshold: float) -> dict:
    """One untimed pass: boxes entering the final NMS and the table's pairs above the threshold
    for the RoIs the head saw (equal unless tiny boxes are dropped before the NMS)."""
    with counting_final_nms(model) as sizes, torch.no_grad():
        model([image])
    fg = hook.logits[: hook.rois].softmax(dim=1)[:, 1:]
    return {
        "rois": hook.rois,
        "nms_candidates": sum(sizes) if sizes else None,
        "pairs_above_threshold": int((fg > threshold).sum().item()),
    }


def measure(
    models: dict[str, nn.Module],
    hooks: dict[str, FixedLogits],
    image: Tensor,
    repeats: int,
    device: torch.device,
) -> dict:
    """Per-model median seconds per image, ratio to torchvision, NMS load, parameters, GFLOPs
    (at the models' current proposal regime and score threshold)."""
    runs = {name: torch.no_grad()(partial(model, [image])) for name, model in models.items()}
    boxes = {name: proposals(model, image) for name, model in models.items()}
    reference = boxes[REFERENCE]
    threshold = score_thresh(models[REFERENCE])
    rows = {}
    for name, model in models.items():
        rows[name] = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "gflops": count_flops(runs[name]) / 1e9,
            "proposals": len(boxes[name]),
            "proposals_shared_with_torchvision": shared_share(boxes[name], reference),
            **nms_load(model, hooks[name], image, threshold),
        }
    for name, seconds in interleaved_medians(runs, repeats, device).items():
        rows[name]["seconds_per_image"] = seconds
    base = rows[REFERENCE]["seconds_per_image"]
    for row in rows.values():
        row["time_ratio_to_torchvision"] = row["seconds_per_image"] / base
    return {"proposal_shapes": proposal_shapes(reference.cpu()), "models": rows}


def score_thresh(model: nn.Module) -> float:
    """The model's final score threshold (see :func:`set_score_thresh`)."""
    heads = model.roi_heads
    return heads.cfg.test.score_thresh if hasattr(heads, "cfg") else heads.score_thresh


def prepare_models(
    size: tuple[int, int], device: torch.device
) -> tuple[dict[str, nn.Module], dict[str, FixedLogits]]:
    """:func:`build_models` on ``device`` in eval mode, with the fixed classification load."""
    models = {name: m.to(device).eval() for name, m in build_models(size).items()}
    hooks = {name: fix_classification(model, device) for name, model in models.items()}
    return models, hooks


def benchmark(
    size: tuple[int, int],
    repeats: int,
    device: torch.device,
    regimes: tuple[str, ...] = ("anchors",),
    thresholds: tuple[float, ...] = SCORE_THRESHOLDS,
) -> dict:
    """:func:`measure` under each proposal regime (``random`` first: ``anchors`` zeroes the
    RPN's regression for good) and each score threshold."""
    image = torch.rand(3, *size, generator=torch.Generator().manual_seed(0)).to(device)
    models, hooks = prepare_models(size, device)
    results = {}
    for regime in sorted(regimes, key=lambda r: r != "random"):
        if regime == "anchors":
            for model in models.values():
                use_anchor_proposals(model)
        for threshold in thresholds:
            for model in models.values():
                set_score_thresh(model, threshold)
            measured = measure(models, hooks, image, repeats, device)
            results[f"{regime}, score {threshold:g}"] = {
                "proposals": regime,
                "score_thresh": threshold,
                **measured,
            }
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "image_size": list(size),
        "repeats": repeats,
        "timing": "interleaved rounds, median per model",
        "classification_load": {
            "rois": TABLE_ROIS,
            "classes": COCO_CLASSES,
            "pairs_above_0.001": CANDIDATES,
            "pairs_above_0.05": CONFIDENT,
            "seed": 0,
        },
        "torch": torch.__version__,
        "regimes": results,
    }


def format_table(result: dict) -> str:
    """One row per model: ms/image, ratio and final-NMS candidates under each regime and score
    threshold, then params and GFLOPs; one line per regime on the proposals' shapes."""
    regimes = result["regimes"]
    lines = ["columns: " + " | ".join(regimes)]
    header = f"{'model':36s}"
    for _ in regimes:
        header += f" {'ms':>8s} {'ratio':>6s} {'nms in':>7s}"
    lines.append(header + f" {'params(M)':>10s} {'GFLOPs':>8s} {'shared props':>12s}")
    first = next(iter(regimes.values()))["models"]
    for name, row in first.items():
        line = f"{name:36s}"
        for regime in regimes.values():
            cell = regime["models"][name]
            candidates = cell["nms_candidates"]
            line += (
                f" {cell['seconds_per_image'] * 1e3:8.1f} {cell['time_ratio_to_torchvision']:6.2f}"
            )
            line += f" {'n/a' if candidates is None else candidates:>7}"
        shared = min(
            r["models"][name]["proposals_shared_with_torchvision"] for r in regimes.values()
        )
        lines.append(line + f" {row['parameters'] / 1e6:10.2f} {row['gflops']:8.1f} {shared:12.1%}")
    for regime, data in regimes.items():
        shapes = data["proposal_shapes"]
        lines.append(
            f"{regime}: {data['models'][REFERENCE]['proposals']} proposals, "
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
    parser.add_argument(
        "--proposals",
        nargs="+",
        choices=PROPOSAL_REGIMES,
        default=["anchors"],
        help="proposal regimes (default: anchors)",
    )
    parser.add_argument(
        "--score-thresh",
        type=float,
        nargs="+",
        default=list(SCORE_THRESHOLDS),
        help="final score thresholds (default: 0.001 0.05)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/inference.json")
    args = parser.parse_args()
    result = benchmark(
        args.size,
        args.repeats,
        torch.device(args.device),
        tuple(args.proposals),
        tuple(args.score_thresh),
    )
    print(f"{result['device_name']}, image {args.size[0]}x{args.size[1]}, median of {args.repeats}")
    print(format_table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
