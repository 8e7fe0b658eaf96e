"""Detector models: backbone/FPN, RPN with two proposal sets, RoI heads, detector assembly.

Import from the modules themselves (kept import-light here to avoid cycles):
``drcnn.models.detector.build_detector(cfg)`` builds Faster / Cascade / Decoupled R-CNN;
``backbone``, ``rpn``, ``sampling``, ``box_heads``, ``postprocess`` and ``roi_heads`` hold the
parts, ``torchvision_compat`` loads torchvision Faster R-CNN weights and ``mmdet_compat``
mmdetection 2.x checkpoints (``drcnn.models.load_mmdet_checkpoint`` is loaded on first use).
"""

from __future__ import annotations

from drcnn import lazy_attributes

# public name -> "module:attribute", imported lazily by __getattr__
_LAZY = {"load_mmdet_checkpoint": "drcnn.models.mmdet_compat:load_mmdet_checkpoint"}

__all__ = list(_LAZY)

__getattr__ = lazy_attributes(__name__, _LAZY)
