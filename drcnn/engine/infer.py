"""Run a trained detector on image files: detections as JSON plus images with the boxes drawn.

``detections.json`` lists, per input image, the detections scoring at least ``score_thr``:
class name, score and the ``[x1, y1, x2, y2]`` box in the image's pixels. Drawing uses
torchvision's ``draw_bounding_boxes`` (also used by ``drcnn test --show``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as F
from torchvision.utils import draw_bounding_boxes
from tqdm import tqdm

from drcnn.data.images import load_image
from drcnn.engine.checkpoint import class_names, load_checkpoint, load_model
from drcnn.engine.distributed import resolve_device
from drcnn.errors import DrcnnError
from drcnn.io import atomic_write, atomic_write_json

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_SCORE_THR = 0.3


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named directly or found (non-recursively) in the given folders."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            paths.append(item)
        else:
            raise DrcnnError(f"{item}: no such image file or folder")
    if not paths:
        raise DrcnnError(
            f"{', '.join(map(str, inputs))}: no images found ({', '.join(IMAGE_SUFFIXES)})"
        )
    return paths


def draw_detections(
    image: Tensor, detection: dict[str, Tensor], names: Sequence[str], score_thr: float
) -> Tensor:
    """``image`` (float in ``[0, 1]``) as uint8 with the boxes scoring ``>= score_thr`` drawn."""
    keep = detection["scores"] >= score_thr
    labels = [
        f"{names[int(label) - 1]} {float(score):.2f}"
        for label, score in zip(detection["labels"][keep], detection["scores"][keep], strict=True)
    ]
    pixels = F.to_dtype(torch.as_tensor(image).clamp(0, 1), torch.uint8, scale=True)
    return draw_bounding_boxes(pixels, detection["boxes"][keep], labels=labels, width=2)


def save_png(image: Tensor, path: Path) -> Path:
    """Write a uint8 ``(3, H, W)`` tensor as PNG (atomically)."""
    pixels = Image.fromarray(image.cpu().permute(1, 2, 0).numpy())
    return atomic_write(path, lambda handle: pixels.save(handle, format="PNG"))


def describe(detection: dict[str, Tensor], names: Sequence[str], score_thr: float) -> list[dict]:
    """JSON-ready detections above the threshold: class name, score, xyxy box."""
    keep = detection["scores"] >= score_thr
    return [
        {"label": names[int(label) - 1], "score": float(score), "box": [float(v) for v in box]}
        for box, score, label in zip(
            detection["boxes"][keep],
            detection["scores"][keep],
            detection["labels"][keep],
            strict=True,
        )
    ]


@torch.inference_mode()
def infer(
    cfg: DictConfig | None,
    checkpoint: str | Path,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    score_thr: float = DEFAULT_SCORE_THR,
    device: str | None = None,
) -> list[dict[str, Any]]:
    """Detect objects in ``inputs`` (files or folders); writes ``out_dir/detections.json`` and
    ``out_dir/<image stem>.png`` with the boxes drawn. ``cfg=None`` uses the checkpoint's config.
    Returns the JSON entries: ``{"file", "width", "height", "detections": [...]}`` per image."""
    paths = collect_images(inputs)
    torch_device = resolve_device(device)
    state = load_checkpoint(checkpoint)
    model, cfg = load_model(state, cfg, torch_device)
    names = class_names(state, cfg.model.roi_head.num_classes)
    out_dir = Path(out_dir)
    entries = []
    for path in tqdm(paths, desc="infer", disable=None):
        image = load_image(path)
        detection = {k: v.cpu() for k, v in model([image.to(torch_device)])[0].items()}
        entries.append(
            {
                "file": str(path),
                "width": image.shape[-1],
                "height": image.shape[-2],
                "detections": describe(detection, names, score_thr),
            }
        )
        save_png(draw_detections(image, detection, names, score_thr), out_dir / f"{path.stem}.png")
    atomic_write_json(out_dir / "detections.json", entries)
    return entries
