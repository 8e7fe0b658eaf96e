"""RoI heads (second stage of the detector), chosen by ``cfg.model.roi_head.type``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from drcnn.config import ROI_HEAD_TYPES, require_same_names
from drcnn.errors import DrcnnError
from drcnn.models.roi_heads.cascade import CascadeRoIHeads
from drcnn.models.roi_heads.decoupled import DecoupledRoIHeads
from drcnn.models.roi_heads.dynamic import DynamicRoIHeads
from drcnn.models.roi_heads.standard import StandardRoIHeads

ROI_HEADS: dict[str, type[nn.Module]] = {
    "standard": StandardRoIHeads,  # Faster R-CNN
    "cascade": CascadeRoIHeads,  # Cascade R-CNN
    "decoupled": DecoupledRoIHeads,  # Decoupled R-CNN
    "dynamic": DynamicRoIHeads,  # Dynamic R-CNN (baseline)
}
require_same_names(ROI_HEADS, ROI_HEAD_TYPES, "drcnn.models.roi_heads.ROI_HEADS")

__all__ = [
    "ROI_HEADS",
    "CascadeRoIHeads",
    "DecoupledRoIHeads",
    "DynamicRoIHeads",
    "StandardRoIHeads",
    "build_roi_heads",
]


def build_roi_heads(
    cfg: Any, in_channels: int, featmap_names: Sequence[str] = ("0", "1", "2", "3")
) -> nn.Module:
    """The RoI head of ``cfg.model.roi_head.type`` on features with ``in_channels`` channels."""
    kind = cfg.model.roi_head.type
    if kind not in ROI_HEADS:
        raise DrcnnError(
            f"config model.roi_head.type: expected one of {', '.join(ROI_HEADS)}, got {kind!r}"
        )
    return ROI_HEADS[kind](cfg, in_channels, tuple(featmap_names))
