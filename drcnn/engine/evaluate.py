"""Inference over the val split, COCO result files and metrics; the ``test`` command's logic.

Under torchrun every rank runs its share of the val images; the detections are gathered on
rank 0, which writes the COCO result file (dataset category ids, xywh boxes) and
``metrics.json`` beside it. pycocotools computes the metrics (``coco_eval.evaluate_coco``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from drcnn.data.loader import build_dataloader
from drcnn.engine import distributed as dist
from drcnn.engine.amp import inference_amp, inference_autocast
from drcnn.engine.checkpoint import load_model
from drcnn.engine.coco_eval import detections_to_coco, evaluate_coco
from drcnn.engine.infer import draw_detections, save_png
from drcnn.io import atomic_write_json, refuse_collisions

DEFAULT_SHOW_SCORE = 0.3
DET_KEYS = ("boxes", "scores", "labels")


@torch.inference_mode()
def inference(
    model: nn.Module, loader: DataLoader, device: torch.device | str, amp: str = "none"
) -> list[dict]:
    """Detections of this process's share of ``loader``: ``{"image_id", "boxes", "scores",
    "labels"}`` per image, on the CPU, boxes in input-image pixels, in fp32. ``amp``: a resolved
    mixed-precision mode for the backbone (:func:`drcnn.engine.amp.inference_autocast`)."""
    model.eval()
    results = []
    batches = tqdm(loader, desc="test", disable=None if dist.is_main_process() else True)
    with inference_autocast(model, amp, torch.device(device)):
        for images, targets in batches:
            outputs = model([image.to(device) for image in images])
            for output, target in zip(outputs, targets, strict=True):
                detection = {key: output[key].cpu() for key in DET_KEYS}
                results.append({"image_id": int(target["image_id"]), **detection})
    return results


def gather_detections(detections: list[dict]) -> list[dict]:
    """All ranks' detections, one per image id (the distributed sampler pads with repeats)."""
    merged: dict[int, dict] = {}
    for part in dist.all_gather_object(detections):
        for detection in part:
            merged.setdefault(detection["image_id"], detection)
    return [merged[image_id] for image_id in sorted(merged)]


def predict(
    model: nn.Module, cfg: DictConfig, device: torch.device | str
) -> tuple[Any, list[dict]]:
    """``(val dataset, detections of all its images)``; run by every rank, data-parallel."""
    cuda = torch.device(device).type == "cuda"
    loader = build_dataloader(cfg, "val", distributed=dist.is_distributed(), pin_memory=cuda)
    return loader.dataset, gather_detections(inference(model, loader, device))


def write_results(
    dataset: Any, detections: list[dict], out: Path, compute_metrics: bool = True
) -> dict[str, Any]:
    """Write the COCO result file ``out`` and, when asked, evaluate it into ``metrics.json``."""
    results = detections_to_coco(
        [{key: det[key] for key in DET_KEYS} for det in detections],
        [det["image_id"] for det in detections],
        dataset.cat_ids,
    )
    atomic_write_json(out, results, indent=None)
    if not compute_metrics:
        return {}
    metrics = evaluate_coco(dataset.coco, results, image_ids=dataset.ids)
    atomic_write_json(out.parent / "metrics.json", metrics)
    return metrics


def evaluate(
    model: nn.Module, cfg: DictConfig, device: torch.device | str, out_dir: str | Path
) -> dict[str, Any]:
    """COCO metrics of ``model`` on the val split; writes ``out_dir/results.bbox.json`` and
    ``out_dir/metrics.json``. Every rank returns the same metrics."""
    dataset, detections = predict(model, cfg, device)
    metrics = None
    if dist.is_main_process():
        metrics = write_results(dataset, detections, Path(out_dir) / "results.bbox.json")
    return dist.broadcast_object(metrics)


def show(dataset: Any, detections: list[dict], show_dir: Path, score_thr: float) -> None:
    """Draw each image's detections (class name and score) into ``show_dir/<image_id>.png``."""
    index_of = {image_id: index for index, image_id in enumerate(dataset.ids)}
    for detection in detections:
        image, _ = dataset[index_of[detection["image_id"]]]
        drawn = draw_detections(image, detection, dataset.class_names, score_thr)
        save_png(drawn, show_dir / f"{detection['image_id']}.png")


def check_test_outputs(
    dataset: Any,
    inputs: list[tuple[Path | None, str]],
    out: Path,
    compute_metrics: bool,
    show_dir: Path | None,
) -> None:
    """Refuse a ``test`` whose outputs (result file, ``metrics.json``, drawings) would overwrite
    each other, ``inputs`` (checkpoint, config file) or the val split's files."""
    images = [img.get("file_name") for img in dataset.coco.imgs.values()]
    inputs = [*inputs, (dataset.ann_file, "the annotation file")]
    inputs += [(dataset.image_dir / name, "the image") for name in images if isinstance(name, str)]
    outputs = [(out, "the result file")]
    if compute_metrics:
        outputs.append((out.parent / "metrics.json", "the metrics file"))
    if show_dir is not None:
        outputs += [(show_dir / f"{image_id}.png", "a drawing") for image_id in dataset.ids]
    refuse_collisions(inputs, outputs)


def test(
    cfg: DictConfig | None,
    checkpoint: str | Path,
    out: str | Path | None = None,
    show_dir: str | Path | None = None,
    score_thr: float | None = None,
    device: str | None = None,
    compute_metrics: bool = True,
    config_file: str | Path | None = None,
    amp: str = "none",
) -> dict[str, Any]:
    """Run a checkpoint over the val split; returns the COCO metrics (``{}`` without them).

    ``out`` (default ``results.bbox.json`` beside the checkpoint) receives the COCO results and
    ``metrics.json`` goes beside it. ``show_dir`` receives one PNG per image with the detections
    scoring at least ``score_thr`` (default 0.3; the result file keeps every detection, as COCO
    AP needs). ``cfg=None`` uses the config stored in the checkpoint. Outputs that would
    overwrite each other or an input (the checkpoint, ``config_file``, the val split's files)
    are refused before inference starts. ``amp``: mixed precision of the backbone
    (``none``, ``bf16``, ``fp16``, ``auto``: :mod:`drcnn.engine.amp`).
    """
    torch_device = dist.setup(device)
    mode = inference_amp(amp, torch_device)
    model, cfg = load_model(checkpoint, cfg, torch_device)
    cuda = torch_device.type == "cuda"
    loader = build_dataloader(cfg, "val", distributed=dist.is_distributed(), pin_memory=cuda)
    out_path = Path(out) if out is not None else Path(checkpoint).parent / "results.bbox.json"
    show_path = Path(show_dir) if show_dir is not None else None
    inputs = [(Path(checkpoint), "the checkpoint"), (config_file, "the config file")]
    check_test_outputs(loader.dataset, inputs, out_path, compute_metrics, show_path)
    if dist.is_main_process():  # a folder that cannot be made fails now, not after inference
        out_path.parent.mkdir(parents=True, exist_ok=True)
    detections = gather_detections(inference(model, loader, torch_device, mode))
    metrics: dict[str, Any] = {}
    if dist.is_main_process():
        metrics = write_results(loader.dataset, detections, out_path, compute_metrics)
        if show_path is not None:
            threshold = DEFAULT_SHOW_SCORE if score_thr is None else score_thr
            show(loader.dataset, detections, show_path, threshold)
    return dist.broadcast_object(metrics)
