"""Inference speed: median frames per second and peak memory of one detector on one device.

The model (random weights, or a checkpoint's) runs on fixed random images of one size, one image
per forward pass as in the paper's fps column. With random weights the load is set to what a
trained model's would be, not left to the initialisation:

- the RPN's box-regression layer is zeroed (:func:`use_anchor_proposals`): a random RPN turns
  many anchors into slivers under a pixel thick or as wide as the image, which no trained RPN
  emits and which adaptive RoIAlign (``sampling_ratio: 0``) samples at up to 48 points per bin
  along their long side, so the fps of an untrained model would understate a trained one's;
- the classification layers' outputs are a fixed seeded table (:mod:`drcnn.engine.fixed_load`):
  3.75 % of the (RoI, class) pairs above score 0.001, a tenth of those above 0.05, so the final
  NMS gets a trained detector's number of candidates whatever the initialisation (which moved
  an untrained Faster R-CNN by 1.6x on one GPU).

After ``warmup`` passes, each pass is timed (CUDA synchronised); fps is ``1 / median time``.
Peak memory: CUDA ``max_memory_allocated`` during the timed passes, or on the CPU the process's
maximum resident set size (which includes everything the process allocated before).
"""

from __future__ import annotations

import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torchvision
from omegaconf import DictConfig

from drcnn.engine.amp import inference_amp, inference_autocast
from drcnn.engine.checkpoint import load_model
from drcnn.engine.distributed import resolve_device
from drcnn.engine.fixed_load import TABLE_ROIS, fix_classification, pair_counts
from drcnn.io import atomic_write_json
from drcnn.models.detector import build_detector

DISTINCT_INPUTS = 4  # different random images cycled through (avoid caching effects)
RPN_DELTA_LAYER = "rpn.head.bbox_pred"


def use_anchor_proposals(model: torch.nn.Module) -> None:
    """Zero the RPN's box-regression layer, so the proposals are anchors picked by objectness.

    Anchors (sides 32-512 px, aspect ratios 0.5-2 in the COCO configs) are shaped like a
    trained RPN's proposals; a random regression layer's deltas are not.
    """
    with torch.no_grad():
        for name in ("weight", "bias"):
            model.get_parameter(f"{RPN_DELTA_LAYER}.{name}").zero_()


def default_size(cfg: DictConfig) -> tuple[int, int]:
    """A 3:4 landscape image at the test short side (COCO's typical 480x640, rescaled)."""
    short = cfg.model.transform.test_min_size
    return short, min(round(short * 4 / 3), cfg.model.transform.max_size)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_passes(
    model: torch.nn.Module,
    images: list[torch.Tensor],
    passes: int,
    warmup: int,
    amp: str = "none",
) -> list[float]:
    """Seconds of each timed forward pass (one image each), after ``warmup`` untimed ones;
    ``amp``: a resolved mixed-precision mode for the backbone
    (:func:`drcnn.engine.amp.inference_autocast`)."""
    device = images[0].device
    times = []
    with inference_autocast(model, amp, device):
        for index in range(warmup + passes):
            image = images[index % len(images)]
            synchronize(device)
            start = time.perf_counter()
            model([image])
            synchronize(device)
            if index >= warmup:
                times.append(time.perf_counter() - start)
    return times


def benchmark(
    cfg: DictConfig,
    checkpoint: str | Path | None = None,
    images: int = 50,
    device: str | None = None,
    size: tuple[int, int] | None = None,
    out: str | Path | None = None,
    warmup: int = 5,
    amp: str = "none",
) -> dict[str, Any]:
    """Measure inference fps and peak memory; writes the result as JSON to ``out`` (default
    ``benchmark.json`` beside the checkpoint, or in the current folder) and returns it.
    ``amp``: mixed precision of the backbone (:mod:`drcnn.engine.amp`; the result's
    ``amp`` is the mode that ran, ``auto`` resolved)."""
    torch_device = resolve_device(device)
    mode = inference_amp(amp, torch_device)
    if checkpoint is not None:
        model, cfg = load_model(checkpoint, cfg, torch_device)
    else:
        model = build_detector(cfg).to(torch_device).eval()
        use_anchor_proposals(model)
        fix_classification(model, torch_device)
    height, width = size or default_size(cfg)
    classes = cfg.model.roi_head.num_classes
    candidates, confident = pair_counts(classes)
    generator = torch.Generator().manual_seed(0)
    inputs = [
        torch.rand(3, height, width, generator=generator).to(torch_device)
        for _ in range(DISTINCT_INPUTS)
    ]
    if torch_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(torch_device)
    times = time_passes(model, inputs, images, warmup, mode)
    median = statistics.median(times)
    result = {
        "arch": cfg.model.backbone.arch,
        "roi_head": cfg.model.roi_head.type,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "proposals": "from the checkpoint's RPN"
        if checkpoint is not None
        else "anchors (random weights, RPN box regression zeroed)",
        "class_scores": "from the checkpoint's RoI heads"
        if checkpoint is not None
        else f"fixed table (random weights): {candidates} of {TABLE_ROIS} RoIs x {classes} "
        f"classes above score 0.001, {confident} above 0.05",
        "device": torch.cuda.get_device_name(torch_device)
        if torch_device.type == "cuda"
        else platform.processor() or "cpu",
        "input_size": [height, width],
        "amp": mode,
        "images": images,
        "warmup": warmup,
        "median_ms": median * 1000,
        "fps": 1.0 / median,
        "peak_memory_mb": peak_memory_mb(torch_device),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }
    default_dir = Path(checkpoint).parent if checkpoint is not None else Path.cwd()
    atomic_write_json(Path(out) if out is not None else default_dir / "benchmark.json", result)
    return result


def peak_memory_mb(device: torch.device) -> float:
    """CUDA allocator peak since the reset, or the CPU process's max RSS, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
