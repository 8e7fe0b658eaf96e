"""Every private torchvision name drcnn uses, looked up in one place with a version check.

drcnn reuses a few torchvision internals rather than copy them, so that its results equal
torchvision's bit for bit: the multi-scale pooler's scale and level set-up, the detection box
coder. torchvision may rename or drop private names
in any release. They are resolved here when drcnn's models are imported: a missing one raises
:class:`TorchvisionPrivateNameError`, naming the installed torchvision and the missing name, and
a torchvision outside :data:`TESTED_TORCHVISION` gives a warning once.
"""

from __future__ import annotations

import importlib
import re
import warnings
from typing import Any

import torchvision

# first and last torchvision minor versions drcnn has been tested with (pyproject:
# torchvision>=0.19; CI: 0.29, the GPU machine: 0.26)
TESTED_TORCHVISION = ((0, 19), (0, 29))


class TorchvisionPrivateNameError(ImportError):
    """The installed torchvision lacks a private name that drcnn uses."""


def torchvision_version(version: str | None = None) -> tuple[int, int]:
    """``(major, minor)`` of ``version`` (default: the installed torchvision's, e.g.
    ``0.29.1+cu130`` -> ``(0, 29)``)."""
    text = torchvision.__version__ if version is None else version
    match = re.match(r"(\d+)\.(\d+)", text)
    if match is None:
        raise TorchvisionPrivateNameError(f"torchvision {text}: cannot read its version number")
    return int(match[1]), int(match[2])


def tested_range_text() -> str:
    """The tested range, e.g. ``0.19 to 0.29``."""
    (lo_major, lo_minor), (hi_major, hi_minor) = TESTED_TORCHVISION
    return f"{lo_major}.{lo_minor} to {hi_major}.{hi_minor}"


def is_tested(version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed one) is in :data:`TESTED_TORCHVISION`."""
    low, high = TESTED_TORCHVISION
    return low <= torchvision_version(version) <= high


def warn_if_untested() -> None:
    """A warning when the installed torchvision is outside the tested range: the private names
    may exist but compute something else."""
    if not is_tested():
        warnings.warn(
            f"drcnn was tested with torchvision {tested_range_text()}, found "
            f"{torchvision.__version__}: the private torchvision functions it reuses "
            "(drcnn.models.torchvision_private) may behave differently",
            stacklevel=2,
        )


def missing_name_error(qualified_name: str) -> TorchvisionPrivateNameError:
    """The error for a private name the installed torchvision lacks."""
    where = "within" if is_tested() else "outside"
    return TorchvisionPrivateNameError(
        f"torchvision {torchvision.__version__} has no {qualified_name}, a private name drcnn "
        f"uses (this version is {where} the tested range {tested_range_text()}); install a "
        "torchvision in that range"
    )


def private_name(module: str, name: str) -> Any:
    """torchvision's private ``module.name`` (``module`` a dotted module path)."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise missing_name_error(f"{module}.{name}") from exc


warn_if_untested()
# MultiScaleRoIAlign's per-level scales and box -> level mapper (drcnn.models.roi_align)
setup_scales = private_name("torchvision.ops.poolers", "_setup_scales")
# the detection box coder that drcnn.models.box_coder.BoxCoder extends
DetectionBoxCoder = private_name("torchvision.models.detection._utils", "BoxCoder")
