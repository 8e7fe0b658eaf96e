"""The box regression loss of the RPN and the RoI heads, chosen by a typed config entry.

``loss_bbox: {type: l1}`` or ``{type: smooth_l1, beta: B}`` (:class:`drcnn.config.BoxLossConfig`,
validated when the config loads). The official Decoupled R-CNN and mmdetection 2.x's Faster
R-CNN use L1 everywhere; mmdetection's Cascade R-CNN uses smooth L1 with beta 1/9 in the RPN
and 1.0 in the RoI stages; torchvision's Faster R-CNN beta 1/9 in both.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor


def box_loss(pred: Tensor, target: Tensor, loss: Any) -> Tensor:
    """The loss summed over every element of ``pred - target``; the caller normalises it.

    ``loss`` has ``type`` ("l1" or "smooth_l1") and ``beta`` (smooth_l1's switch point from the
    quadratic to the linear part, ``0.5 x^2 / beta`` below it, ``|x| - beta / 2`` above).
    """
    if loss.type == "l1":
        return F.l1_loss(pred, target, reduction="sum")
    if loss.type == "smooth_l1":
        return F.smooth_l1_loss(pred, target, beta=loss.beta, reduction="sum")
    raise ValueError(f"box_loss: unknown type {loss.type!r}")
