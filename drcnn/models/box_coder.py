"""torchvision's box coder with fewer kernels and without host-device synchronisation.

torchvision's ``BoxCoder`` computes each coordinate of a box on its own (about 25 elementwise
ops per encode or decode, each a kernel launch on a GPU, where a training step of a detector is
bound by the host's launches), and builds tensors from Python data on the device: the weights in
``encode_single``, ``torch.tensor(0.5)`` twice in ``decode_single``; on CUDA each is a blocking
copy from the host. :class:`BoxCoder` computes the x and y halves of a box as one ``(N, 2)``
pair (about 15 ops) and multiplies by Python numbers. Every element goes through the same
float operations in the same order as in torchvision, so it gives the same boxes and deltas bit
for bit (tested, also in bf16). It needs equal weights for x and y and for w and h, which every
config has (``1 / target_stds``); other weights take torchvision's code, syncs included.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

from drcnn.models.torchvision_private import DetectionBoxCoder


@cache
def _as_dtype(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype`` (torchvision makes a ``dtype`` tensor of it), on the host
    and once per value and dtype."""
    return torch.tensor(value, dtype=dtype).item()


class BoxCoder(DetectionBoxCoder):
    """``torchvision.models.detection._utils.BoxCoder``, pairwise and without tensors built
    from Python data."""

    def paired_weights(self) -> tuple[float, float] | None:
        """``(w_xy, w_wh)`` when x and y share a weight and so do w and h, else None."""
        wx, wy, ww, wh = self.weights
        return (wx, ww) if wx == wy and ww == wh else None

    def encode_single(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        """``(N, 4)`` deltas of ``reference_boxes`` (the targets) relative to ``proposals``."""
        weights = self.paired_weights()
        if weights is None:
            return super().encode_single(reference_boxes, proposals)
        w_ctr, w_size = (_as_dtype(w, reference_boxes.dtype) for w in weights)
        ex_size = proposals[:, 2:] - proposals[:, :2]
        ex_ctr = proposals[:, :2] + 0.5 * ex_size
        gt_size = reference_boxes[:, 2:] - reference_boxes[:, :2]
        gt_ctr = reference_boxes[:, :2] + 0.5 * gt_size
        d_ctr = w_ctr * (gt_ctr - ex_ctr) / ex_size
        d_size = w_size * torch.log(gt_size / ex_size)
        return torch.cat((d_ctr, d_size), dim=1)

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        """``(N, 4k)`` boxes from ``(N, 4k)`` deltas relative to ``(N, 4)`` reference boxes."""
        weights = self.paired_weights()
        if weights is None:
            return super().decode_single(rel_codes, boxes)
        w_ctr, w_size = weights
        boxes = boxes.to(rel_codes.dtype)
        size = boxes[:, 2:] - boxes[:, :2]
        ctr = boxes[:, :2] + 0.5 * size
        codes = rel_codes.reshape(len(rel_codes), rel_codes.shape[1] // 4, 4)
        d_ctr = codes[..., :2] / w_ctr
        d_size = torch.clamp(codes[..., 2:] / w_size, max=self.bbox_xform_clip)
        pred_ctr = d_ctr * size[:, None] + ctr[:, None]
        half = 0.5 * (torch.exp(d_size) * size[:, None])
        return torch.cat((pred_ctr - half, pred_ctr + half), dim=2).flatten(1)
