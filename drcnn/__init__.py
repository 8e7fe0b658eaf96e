"""drcnn: Decoupled R-CNN and its baselines on plain PyTorch + torchvision.

The Python API mirrors the command line; heavy modules (torch) load on first use, so that
``import drcnn`` and ``drcnn --help`` stay fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
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


def lazy_attributes(package: str, table: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) for ``package`` that imports each name of ``table``
    (name -> ``"module:attribute"``) on first use, so that importing the package stays light."""

    def get(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, attr = table[name].split(":")
        return getattr(importlib.import_module(module), attr)

    return get


__getattr__ = lazy_attributes(__name__, _LAZY)
