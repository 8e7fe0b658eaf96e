"""Run a trained detector on image files: detections as JSON plus images with the boxes drawn.

``detections.json`` lists, per input image, the detections scoring at least ``score_thr``:
class name, score and the ``[x1, y1, x2, y2]`` box in the image's pixels, and the file name of
its drawing. Drawing uses torchvision's ``draw_bounding_boxes`` (also used by ``drcnn test
--show``).

Outputs never overwrite an input or each other, nor a file ``infer`` did not write: a drawing is
``<stem>.png``, or ``<stem>-<k>.png`` (``k`` = 1, 2, ... in input order) when several inputs
share a stem; an output folder holding one of the inputs is refused; and an existing file is
replaced only when it is ``detections.json`` or a drawing that the folder's ``detections.json``
lists (an earlier ``infer`` into the same folder). ``detections.json`` is written first with every
planned drawing (``detections: null``), so an interrupted run can be repeated into its folder.
"""

from __future__ import annotations

import json
from collections import Counter
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
from drcnn.engine.amp import inference_amp, inference_autocast
from drcnn.engine.checkpoint import class_names, load_checkpoint, load_model
from drcnn.engine.distributed import resolve_device
from drcnn.errors import DrcnnError
from drcnn.io import atomic_write, atomic_write_json, refuse_collisions

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_SCORE_THR = 0.3
DETECTIONS = "detections.json"


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named directly or found (non-recursively) in the given folders; a file
    reached twice (named and in a folder, or named twice) is listed once."""
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
    unique: dict[Path, Path] = {}
    for path in paths:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def drawing_names(paths: Sequence[Path]) -> list[str]:
    """One drawing file name per image, distinct even on case-insensitive file systems:
    ``<stem>.png``, or ``<stem>-<k>.png`` (k = 1, 2, ... in input order) for a shared stem."""
    shared = Counter(path.stem.casefold() for path in paths)
    taken = {f"{p.stem}.png".casefold() for p in paths if shared[p.stem.casefold()] == 1}
    counters: Counter[str] = Counter()
    names = []
    for path in paths:
        key = path.stem.casefold()
        name = f"{path.stem}.png"
        if shared[key] > 1:
            counters[key] += 1
            while f"{path.stem}-{counters[key]}.png".casefold() in taken:
                counters[key] += 1
            name = f"{path.stem}-{counters[key]}.png"
        taken.add(name.casefold())
        names.append(name)
    return names


def earlier_drawings(out_dir: Path) -> set[str] | None:
    """The drawings that an earlier ``infer`` into ``out_dir`` listed in its ``detections.json``
    (empty without one); None when a ``detections.json`` there is not one ``infer`` wrote."""
    path = out_dir / DETECTIONS
    if not path.exists():
        return set()
    try:
        entries = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and isinstance(e.get("drawing"), str) for e in entries
    ):
        return None
    return {entry["drawing"] for entry in entries}


def check_outputs(
    paths: Sequence[Path], drawings: Sequence[Path], out_dir: Path, others: Sequence[Path]
) -> None:
    """Refuse outputs that would overwrite an input (images, ``others``: checkpoint, config) or
    a file in ``out_dir`` that an earlier ``infer`` did not write."""
    refuse_collisions(
        [*((p, "the input image") for p in paths), *((p, "the input") for p in others)],
        [*((d, "the drawing") for d in drawings), (out_dir / DETECTIONS, "the detections file")],
    )
    earlier = earlier_drawings(out_dir)
    if earlier is None:
        raise DrcnnError(
            f"{out_dir / DETECTIONS}: exists and is not the detections file of an earlier "
            "drcnn infer; choose another --out"
        )
    for drawing in drawings:
        if drawing.exists() and drawing.name not in earlier:
            raise DrcnnError(
                f"{drawing}: exists and is not a drawing of an earlier drcnn infer into "
                f"{out_dir} (its {DETECTIONS} does not list it); choose another --out"
            )


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
    config_file: str | Path | None = None,
    amp: str = "none",
) -> list[dict[str, Any]]:
    """Detect objects in ``inputs`` (files or folders); writes ``out_dir/detections.json`` and
    one drawing per image (names: module docstring). ``cfg=None`` uses the checkpoint's config;
    ``config_file`` (the file ``cfg`` came from) is protected like the inputs. Returns the JSON
    entries: ``{"file", "drawing", "width", "height", "detections": [...]}`` per image.
    ``amp``: mixed precision of the backbone (:mod:`drcnn.engine.amp`)."""
    paths = collect_images(inputs)
    out_dir = Path(out_dir)
    drawings = [out_dir / name for name in drawing_names(paths)]
    others = [Path(p) for p in (checkpoint, config_file) if p is not None]
    check_outputs(paths, drawings, out_dir, others)
    torch_device = resolve_device(device)
    mode = inference_amp(amp, torch_device)
    state = load_checkpoint(checkpoint)
    model, cfg = load_model(state, cfg, torch_device, source=str(checkpoint))
    names = class_names(state, cfg.model.roi_head.num_classes)
    entries = [
        dict(file=str(path), drawing=drawing.name, width=None, height=None, detections=None)
        for path, drawing in zip(paths, drawings, strict=True)
    ]
    atomic_write_json(out_dir / DETECTIONS, entries)  # the plan: which drawings are ours
    work = zip(entries, paths, drawings, strict=True)
    progress = tqdm(work, total=len(paths), desc="infer", disable=None)
    with inference_autocast(model, mode, torch_device):
        for entry, path, drawing in progress:
            image = load_image(path)
            output = model([image.to(torch_device)])[0]
            detection = {k: v.cpu() for k, v in output.items()}
            entry.update(
                width=image.shape[-1],
                height=image.shape[-2],
                detections=describe(detection, names, score_thr),
            )
            save_png(draw_detections(image, detection, names, score_thr), drawing)
    atomic_write_json(out_dir / DETECTIONS, entries)
    return entries
