"""torchvision's box coder without its host-device synchronisation.

torchvision's ``BoxCoder.decode_single`` builds ``torch.tensor(0.5, device=...)`` twice per call:
on CUDA each is a blocking copy from the host, so every decode (the RPN's, each RoI-head
stage's) stopped the CPU until the GPU had caught up. :class:`BoxCoder` multiplies by the
Python number instead: the same float32 products (halving is exact), so the same boxes bit for
bit; encoding is torchvision's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from drcnn.models.torchvision_private import DetectionBoxCoder


class BoxCoder(DetectionBoxCoder):
    """``torchvision.models.detection._utils.BoxCoder`` whose decode creates no tensors."""

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        """``(N, 4k)`` boxes from ``(N, 4k)`` deltas relative to ``(N, 4)`` reference boxes
        (torchvision's arithmetic, step for step)."""
        boxes = boxes.to(rel_codes.dtype)
        widths = boxes[:, 2] - boxes[:, 0]
        heights = boxes[:, 3] - boxes[:, 1]
        ctr_x = boxes[:, 0] + 0.5 * widths
        ctr_y = boxes[:, 1] + 0.5 * heights

        wx, wy, ww, wh = self.weights
        dx = rel_codes[:, 0::4] / wx
        dy = rel_codes[:, 1::4] / wy
        dw = torch.clamp(rel_codes[:, 2::4] / ww, max=self.bbox_xform_clip)
        dh = torch.clamp(rel_codes[:, 3::4] / wh, max=self.bbox_xform_clip)

        pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
        pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
        half_w = 0.5 * (torch.exp(dw) * widths[:, None])
        half_h = 0.5 * (torch.exp(dh) * heights[:, None])
        corners = (
            pred_ctr_x - half_w,
            pred_ctr_y - half_h,
            pred_ctr_x + half_w,
            pred_ctr_y + half_h,
        )
        return torch.stack(corners, dim=2).flatten(1)
