"""Detector models: backbone/FPN, RPN with two proposal sets, RoI heads, detector assembly.

Import from the modules themselves (kept import-light here to avoid cycles):
``drcnn.models.detector.build_detector(cfg)`` builds Faster / Cascade / Decoupled R-CNN;
``backbone``, ``rpn``, ``sampling``, ``box_heads``, ``postprocess`` and ``roi_heads`` hold the
parts, ``torchvision_compat`` loads torchvision Faster R-CNN weights.
"""
