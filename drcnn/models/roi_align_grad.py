"""RoIAlign's input gradient on the CPU as one sparse matrix product.

torchvision's CPU backward kernel (``_roi_align_backward``) visits every (RoI, channel, bin,
sample), recomputes the sample's bilinear weights for each channel and runs on one core. The
gradient is linear in the output gradient, with weights that do not depend on the channel:

    grad_input[n, c, y, x] = sum over bins b of S[(n, y, x), b] * grad_output[b, c]

where ``S`` (feature pixels x output bins) holds, for every sampling point of bin ``b``, its
four bilinear weights divided by the bin's number of samples. :func:`sampling_matrices` builds
``S`` once per call with tensor ops, with the kernel's sample positions and border rules, as
CSR matrices sorted by feature pixel (one sort of the sampling points serves the four
corners); :func:`roi_align_input_grad` multiplies them with the output gradient in
channels-last order, every channel at once, on the intra-op threads. Same gradient up to float
rounding (the sums run in another order).

Why it matters: late in a synthetic Decoupled R-CNN training run (about 1,000 regression RoIs
per stage of batch 8, three stages) torchvision's backward took about a quarter of the CPU step
even with its calls split over two threads; with this product the step went from 2.72 s to
1.92 s (``benchmarks/profile_train.py --trained-rpn``, 256 px, 2 threads).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor


def sampling_matrices(
    rois: Tensor,
    scale: float,
    size: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
    shape: tuple[int, int, int],
) -> list[Tensor]:
    """``S`` of the module docstring as four ``(N * H * W, R * PH * PW)`` CSR matrices, one per
    bilinear corner, each with its rows offset so that one sort serves all four.

    ``rois``: ``(R, 5)`` rows ``(image_index, x1, y1, x2, y2)`` in image pixels; ``scale``: the
    feature map's pixels per image pixel; ``size``: ``(PH, PW)``; ``shape``: ``(N, H, W)`` of the
    feature map. Columns index ``(r * PH + ph) * PW + pw``. Every matrix's row ``p`` is the
    sampling points whose top-left neighbour is pixel ``p = (n * H + y) * W + x``; the four
    matrices hold the weights of the top-left, top-right, bottom-left and bottom-right
    neighbours, pixels ``p``, ``p + 1``, ``p + W`` and ``p + W + 1``.
    Where a neighbour would leave the map (the last row or column) the kernel repeats the border
    pixel with weight zero, so the shifted row carries weight zero too.

    Follows torchvision's CPU kernel in float32 (``roi_align_kernel.cpp``): the box scaled in
    double and rounded to float, ``aligned`` moves it half a pixel, an unaligned box is at least
    one pixel wide and high, ``sampling_ratio <= 0`` takes ``ceil(side / bins)`` samples per bin
    side, a sample more than one pixel outside the map has weight zero, one within is clamped to
    the border pixels.
    """
    num_images, height, width = shape
    bins_h, bins_w = size
    device = rois.device
    offset = 0.5 if aligned else 0.0
    start = (rois[:, 1:3].double() * scale - offset).float()  # (x1, y1)
    end = (rois[:, 3:5].double() * scale - offset).float()
    extent = end - start
    if not aligned:
        extent = extent.clamp(min=1.0)
    bin_size = extent / extent.new_tensor([bins_w, bins_h])
    if sampling_ratio > 0:
        grid = torch.full_like(extent, sampling_ratio, dtype=torch.int64)
    else:
        grid = torch.ceil(bin_size).long().clamp(min=0)
    per_bin = grid[:, 0] * grid[:, 1]
    count = per_bin.clamp(min=1).float()

    # one row per sampling point: its RoI, bin and position within the bin's grid
    per_roi = per_bin * (bins_h * bins_w)
    total = int(per_roi.sum())
    roi = torch.arange(len(rois), device=device).repeat_interleave(per_roi, output_size=total)
    first = torch.cumsum(per_roi, 0) - per_roi
    local = torch.arange(total, device=device) - first[roi]
    bin_index, sub = local // per_bin[roi], local % per_bin[roi]
    grid_w, grid_h = grid[roi, 0], grid[roi, 1]
    ph, pw = bin_index // bins_w, bin_index % bins_w
    iy, ix = sub // grid_w, sub % grid_w
    bin_w, bin_h = bin_size[roi, 0], bin_size[roi, 1]
    y = start[roi, 1] + ph * bin_h + (iy + 0.5) * bin_h / grid_h
    x = start[roi, 0] + pw * bin_w + (ix + 0.5) * bin_w / grid_w

    inside = (y >= -1.0) & (y <= height) & (x >= -1.0) & (x <= width)
    y_low, ly = _low_corner(y.clamp(min=0), height)
    x_low, lx = _low_corner(x.clamp(min=0), width)
    hy, hx = 1 - ly, 1 - lx
    scaled = inside / count[roi]
    pixels = (rois[roi, 0].long() * height + y_low) * width + x_low
    order = torch.argsort(pixels, stable=True)
    columns = (roi * (bins_h * bins_w) + bin_index)[order]
    rows = num_images * height * width
    crow = torch.zeros(rows + 1, dtype=torch.int64, device=device)
    crow[1:] = torch.cumsum(torch.bincount(pixels, minlength=rows), 0)
    matrices = []
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        for weight in (hy * hx, hy * lx, ly * hx, ly * lx):
            matrices.append(
                torch.sparse_csr_tensor(
                    crow,
                    columns,
                    (weight * scaled)[order],
                    (rows, len(rois) * bins_h * bins_w),
                    check_invariants=False,
                )
            )
    return matrices


def _low_corner(coord: Tensor, limit: int) -> tuple[Tensor, Tensor]:
    """Lower neighbour pixel and the fraction towards the upper one, for coordinates already
    clamped at 0; at or past the last pixel: the last pixel, fraction 0 (the kernel's rule)."""
    low = coord.long()
    last = low >= limit - 1
    return torch.where(last, limit - 1, low), torch.where(last, 0.0, coord - low)


def roi_align_input_grad(
    grad_output: Tensor,
    rois: Tensor,
    scale: float,
    sampling_ratio: int,
    aligned: bool,
    shape: tuple[int, int, int, int],
) -> Tensor:
    """Gradient of ``roi_align(features, rois, (PH, PW), scale, sampling_ratio, aligned)`` with
    respect to ``features`` of ``shape`` ``(N, C, H, W)``, given ``grad_output`` ``(R, C, PH,
    PW)``; float32, in channels-last memory order."""
    num_images, channels, height, width = shape
    matrices = sampling_matrices(
        rois,
        scale,
        tuple(grad_output.shape[-2:]),
        sampling_ratio,
        aligned,
        (num_images, height, width),
    )
    by_bin = grad_output.float().permute(0, 2, 3, 1).reshape(-1, channels)
    grad = matrices[0] @ by_bin
    for matrix, shift in zip(matrices[1:], (1, width, width + 1), strict=True):
        grad[shift:] += (matrix @ by_bin)[:-shift]
    return grad.view(num_images, height, width, channels).permute(0, 3, 1, 2)
