"""RoI heads (second stage of the detector), chosen by ``cfg.model.roi_head.type``."""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig

from drcnn.config import ROI_HEAD_TYPES, require_same_names
from drcnn.errors import DrcnnError
from drcnn.models.roi_heads.base import FEATMAP_NAMES, RoIHeadsBase, roi_config
from drcnn.models.roi_heads.cascade import CascadeRoIHeads
from drcnn.models.roi_heads.decoupled import DecoupledRoIHeads
from drcnn.models.roi_heads.dynamic import DynamicRoIHeads
from drcnn.models.roi_heads.standard import StandardRoIHeads

ROI_HEADS: dict[str, type[RoIHeadsBase]] = {
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
    cfg: DictConfig, in_channels: int, featmap_names: Sequence[str] = FEATMAP_NAMES
) -> RoIHeadsBase:
    """The RoI head of ``cfg.model.roi_head.type`` on FPN maps ``featmap_names`` with
    ``in_channels`` channels, built from the typed ``model.roi_head`` part."""
    roi = roi_config(cfg.model.roi_head)
    if roi.type not in ROI_HEADS:
        raise DrcnnError(
            f"config model.roi_head.type: expected one of {', '.join(ROI_HEADS)}, got {roi.type!r}"
        )
    return ROI_HEADS[roi.type](roi, in_channels, tuple(featmap_names))
