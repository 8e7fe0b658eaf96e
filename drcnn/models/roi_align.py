"""Multi-scale RoIAlign: torchvision's FPN pooling with mmcv's ``aligned`` switch, on every device.

:class:`MultiScaleRoIAlign` pools each RoI on the FPN level of its size, with torchvision's
level rule and scales (:func:`drcnn.models.torchvision_private.setup_scales`) and torchvision's
``roi_align`` kernel, so its output equals :class:`torchvision.ops.MultiScaleRoIAlign`'s bit for
bit. It sorts the RoIs by level and pools one block per level
(:meth:`MultiScaleRoIAlign._pool_levels`), so the host waits for the device once per call, not
once per level as torchvision's ``torch.where`` selection does.

``aligned=True`` samples half a pixel earlier (a box edge is a pixel edge, not a pixel centre),
as mmcv's RoIAlign does by default and so the official mmdetection 2.4 code; torchvision's
detection models use ``aligned=False``.

How each level's block is run is separate (:func:`cpu_roi_align` on the CPU path, torchvision's
``roi_align`` elsewhere). torchvision's CPU ``roi_align`` kernels (forward and backward) run on
one core whatever ``torch.get_num_threads()`` says, so on a CPU the RoI heads' pooling leaves the
other cores idle; with the official ``sampling_ratio: 0`` (adaptive sampling, work growing with
box size) and three pooling rounds per image, Decoupled R-CNN spent 40% of its CPU inference
time there. On the CPU path (:func:`drcnn.models.threads.cpu_path`; ``cpu_kernels=True``):

- the forward kernel releases the GIL, so a block big enough is cut into contiguous chunks that
  run it in threads (:func:`drcnn.models.threads.thread_map`). Every output value is computed by
  the same kernel from the same box, so the result is the same bit for bit;
- the input gradient is one sparse matrix product over the whole block
  (:func:`drcnn.models.roi_align_grad.roi_align_input_grad`, equal up to float rounding), several
  times faster than the backward kernel, which recomputes every sample's weights per channel.

On a device (or under :func:`drcnn.models.threads.device_code_path`) torchvision's kernels run
as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torchvision.ops import roi_align

from drcnn.models.host_data import row_images, to_device
from drcnn.models.roi_align_grad import roi_align_input_grad
from drcnn.models.threads import cpu_path, thread_map
from drcnn.models.torchvision_private import setup_scales

# Work (RoIs x channels) below which a chunk is not worth a thread: small calls handed to a
# thread compete for the cores with PyTorch's OpenMP threads, still spinning after the previous
# op. Synthetic R-18 model, 300 RoIs of 64 channels, threshold 512 instead: median 32 ms per
# image in most runs, 42 ms in 2 of 5 (with 16384: 31-33 ms in all 5; 2 cores, commit c7795c1).
MIN_WORK_PER_CHUNK = 16384


def rescale_boxes(boxes: Tensor, factor: float) -> Tensor:
    """``(N, 4)`` boxes with width and height times ``factor``, centres kept (mmdetection 2.x
    ``BaseRoIExtractor.roi_rescale``, no +1 pixel)."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) * factor * 0.5
    return torch.cat([centre - half, centre + half], dim=1)


def chunk_bounds(rois: Tensor, chunks: int) -> list[tuple[int, int, int, int]]:
    """``(first_row, end_row, first_image, end_image)`` of ``chunks`` contiguous row ranges.

    ``rois`` rows are ``(image_index, x1, y1, x2, y2)`` sorted by image index, so each chunk
    only touches the images ``first_image..end_image - 1``.
    """
    edges = torch.linspace(0, len(rois), chunks + 1).round().long().tolist()
    images = rois[:, 0].long()
    bounds = []
    for start, end in pairwise(edges):
        if end > start:
            bounds.append((start, end, int(images[start]), int(images[end - 1]) + 1))
    return bounds


def chunk_rois(rois: Tensor, bound: tuple[int, int, int, int]) -> Tensor:
    """The chunk's rows of ``rois``, image indices made relative to its first image."""
    start, end, first, _ = bound
    part = rois[start:end].float().clone()
    part[:, 0] -= first
    return part


class _CpuRoIAlign(torch.autograd.Function):
    """torchvision ``roi_align`` forward (on row chunks of ``rois`` in threads when ``chunks >
    1``), input gradient by :func:`~drcnn.models.roi_align_grad.roi_align_input_grad`."""

    @staticmethod
    def forward(
        ctx: Any,
        features: Tensor,
        rois: Tensor,
        scale: float,
        size: tuple[int, int],
        sampling_ratio: int,
        aligned: bool,
        chunks: int,
    ) -> Tensor:
        # torchvision's autocast rule for roi_align: compute in fp32, return the input's dtype
        feats = features.float()
        if chunks > 1:

            def run(bound: tuple[int, int, int, int]) -> Tensor:
                _, _, first, last = bound
                part = chunk_rois(rois, bound)
                return torch.ops.torchvision.roi_align(
                    feats[first:last], part, scale, *size, sampling_ratio, aligned
                )

            out = torch.cat(thread_map(run, chunk_bounds(rois, chunks)))
        else:
            out = torch.ops.torchvision.roi_align(
                feats, rois.float(), scale, *size, sampling_ratio, aligned
            )
        ctx.save_for_backward(rois)
        ctx.shape, ctx.dtype = features.shape, features.dtype
        ctx.args = (scale, sampling_ratio, aligned)
        return out.to(features.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (rois,) = ctx.saved_tensors
        scale, sampling_ratio, aligned = ctx.args
        grad = roi_align_input_grad(grad_out, rois, scale, sampling_ratio, aligned, ctx.shape)
        return grad.to(ctx.dtype), None, None, None, None, None, None


def cpu_roi_align(
    features: Tensor,
    rois: Tensor,
    scale: float,
    size: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
    threads: int,
) -> Tensor:
    """torchvision's ``roi_align`` of ``rois`` (sorted by image) on ``features`` with drcnn's CPU
    kernels: cut into up to ``threads`` chunks of at least :data:`MIN_WORK_PER_CHUNK` work run
    side by side (the same values), the input gradient as one sparse product. A small block
    without gradient is one plain kernel call."""
    chunks = max(1, min(threads, len(rois) * features.shape[1] // MIN_WORK_PER_CHUNK))
    if chunks > 1 or (torch.is_grad_enabled() and features.requires_grad):
        return _CpuRoIAlign.apply(features, rois, scale, size, sampling_ratio, aligned, chunks)
    return roi_align(features, rois, size, scale, sampling_ratio, aligned)


class MultiScaleRoIAlign(nn.Module):
    """torchvision's :class:`~torchvision.ops.MultiScaleRoIAlign` (same levels, same values)
    with mmcv's ``aligned`` switch, one host wait per call, and drcnn's CPU kernels.

    ``cpu_kernels``: on the CPU path, pool with :func:`cpu_roi_align` (threaded forward of big
    blocks, sparse-product input gradient); never on a device. False: torchvision's kernels.
    """

    # torchvision's defaults: a 224-px box is pooled on level 4 (P4)
    canonical_scale = 224
    canonical_level = 4

    def __init__(
        self,
        featmap_names: Sequence[str],
        output_size: int | tuple[int, int],
        sampling_ratio: int,
        *,
        aligned: bool = False,
        cpu_kernels: bool = True,
    ) -> None:
        super().__init__()
        self.featmap_names = list(featmap_names)
        size = (output_size, output_size) if isinstance(output_size, int) else output_size
        self.output_size = tuple(size)
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.cpu_kernels = cpu_kernels
        # per-level scales and the box -> level mapper, set up from the first call's inputs
        self.scales: list[float] | None = None
        self.map_levels: Callable[[list[Tensor]], Tensor] | None = None

    def forward(
        self,
        x: dict[str, Tensor],
        boxes: list[Tensor],
        image_shapes: list[tuple[int, int]],
        roi_scale_factor: float | None = None,
    ) -> Tensor:
        """``(sum of boxes, C, S, S)`` RoI features, rows in the order of ``boxes``.

        ``roi_scale_factor``: pool each box enlarged by this factor about its centre, on the
        FPN level of the box as given (mmdetection's ``SingleRoIExtractor`` with
        ``roi_scale_factor``: levels mapped first, then ``roi_rescale``; the Double-Head
        regression branch).
        """
        # the maps of featmap_names in the dict's order, as torchvision's _filter_input
        features = [v for k, v in x.items() if k in self.featmap_names]
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = setup_scales(
                features, image_shapes, self.canonical_scale, self.canonical_level
            )
        # every image's boxes at once: the mapper and the rescale work box by box
        all_boxes = torch.cat(boxes)
        levels = self.map_levels([all_boxes])
        if roi_scale_factor is not None:
            all_boxes = rescale_boxes(all_boxes, roi_scale_factor)
        # (K, 5) rows (image, x1, y1, x2, y2); the image column is made on the host
        image = to_device(row_images([len(b) for b in boxes]), all_boxes, all_boxes.dtype)
        rois = torch.cat([image[:, None], all_boxes], dim=1)
        return self._pool_levels(features, rois, levels)

    def _pool_levels(self, features: list[Tensor], rois: Tensor, levels: Tensor) -> Tensor:
        """Each RoI pooled on the map of its level, rows in the order of ``rois``.

        The RoIs are sorted by level (stably: by image within a level, as the threaded chunks
        need), each level pools its block, and the results are written to its RoIs' rows.
        One wait for the device per call, for the block sizes: selecting each level's rows with
        ``torch.where`` (torchvision's way) waited once per level.
        """
        order = torch.argsort(levels, stable=True)
        level_ids = torch.arange(len(features), device=levels.device)
        counts = (levels[None, :] == level_ids[:, None]).sum(dim=1).tolist()
        size = self.output_size
        # every RoI is in exactly one block, so every row is written below
        result = features[0].new_empty((len(rois), features[0].shape[1], *size))
        rows_by_level = order.split(counts)
        on_cpu = self.cpu_kernels and cpu_path(features[0].device)
        for feature, scale, rows in zip(features, self.scales, rows_by_level, strict=True):
            if len(rows) == 0:
                continue
            block, ratio = rois[rows], self.sampling_ratio
            if on_cpu:
                threads = torch.get_num_threads()
                pooled = cpu_roi_align(feature, block, scale, size, ratio, self.aligned, threads)
            else:
                pooled = roi_align(feature, block, size, scale, ratio, self.aligned)
            result.index_copy_(0, rows, pooled.to(result.dtype))
        return result
