"""drcnn: Decoupled R-CNN and its baselines on plain PyTorch + torchvision.

The Python API mirrors the command line; heavy modules (torch) load on first use, so that
``import drcnn`` and ``drcnn --help`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from drcnn.config import load_config
from drcnn.errors import DrcnnError

__version__ = "0.1.0"

# public name -> "module:attribute", imported lazily by __getattr__
_LAZY = {
    "build_detector": "drcnn.models.detector:build_detector",
    "train": "drcnn.engine.train:train",
    "evaluate": "drcnn.engine.evaluate:evaluate",
    "test": "drcnn.engine.evaluate:test",
    "infer": "drcnn.engine.infer:infer",
    "benchmark": "drcnn.engine.benchmark:benchmark",
    "generate_synthetic_coco": "drcnn.data.synthetic:generate_synthetic_coco",
    "evaluate_coco": "drcnn.engine.coco_eval:evaluate_coco",
    "run_experiment": "drcnn.analysis.runner:run_experiment",
    "convert_mmdet": "drcnn.models.mmdet_compat:convert_mmdet_checkpoint",
}

__all__ = ["DrcnnError", "load_config", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'drcnn' has no attribute {name!r}")
    module, attr = _LAZY[name].split(":")
    return getattr(importlib.import_module(module), attr)
