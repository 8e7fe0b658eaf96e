"""Per-row tensors built on the host from Python sizes and copied to the device without waiting.

A batch's RoIs, candidates and boxes are concatenated image by image, and several steps need a
per-row value that only depends on the images' row counts and sizes: the row's image, the
image's height and width. Made on the device, each would take one small kernel per image (or a
tensor from Python data, a blocking copy on CUDA); made here with numpy and moved with
``non_blocking=True``, it is one copy, queued behind the device's work. On the CPU the array is
used in place.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def to_device(array: np.ndarray, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``array`` as a tensor on ``like``'s device (``dtype``: default the array's own), copied
    without blocking the host."""
    return torch.from_numpy(array).to(like.device, dtype=dtype, non_blocking=True)


def row_images(counts: Sequence[int]) -> np.ndarray:
    """Each row's image (int64) when image ``i`` has ``counts[i]`` rows."""
    return np.repeat(np.arange(len(counts), dtype=np.int64), counts)


def clip_rows(
    boxes: Tensor, counts: Sequence[int], image_shapes: Sequence[tuple[int, int]]
) -> Tensor:
    """Clip concatenated per-image ``(x1, y1, x2, y2)`` boxes (``counts`` rows per image) to
    their image's ``(H, W)``: torchvision's ``clip_boxes_to_image`` on every image at once
    (the same values: ``min(max(v, 0), side)``)."""
    sides = np.array([[w, h, w, h] for h, w in image_shapes], dtype=np.float32).reshape(-1, 4)
    limits = to_device(np.repeat(sides, counts, axis=0), boxes, boxes.dtype)
    return torch.minimum(boxes.clamp(min=0), limits)
