"""The private torchvision names drcnn uses: one module, a version check, a clear error."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import torchvision
import torchvision.models.detection._utils as det_utils
import torchvision.ops.poolers as poolers

from drcnn.models import torchvision_private as tvp

DRCNN = Path(__file__).resolve().parents[1] / "drcnn"


@pytest.fixture
def reload_after(monkeypatch):
    """Undo the test's patches, then put the module back as imported (a test re-ran it)."""
    yield
    monkeypatch.undo()
    importlib.reload(tvp)


def is_private(name: str) -> bool:
    """A leading underscore, not a dunder (``__version__`` is public)."""
    return name.startswith("_") and not name.startswith("__")


def private_torchvision_uses(source: str) -> list[str]:
    """The private torchvision names that ``source`` imports or reads: a name or module part
    with a leading underscore under ``torchvision``, or an operator ``torch.ops.torchvision._x``
    (docstrings and comments do not count)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torchvision"):
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            found += [n for n in names if any(is_private(p) for p in n.split("."))]
        elif isinstance(node, ast.Import):
            found += [
                a.name for a in node.names if a.name.startswith("torchvision") and "._" in a.name
            ]
        elif isinstance(node, ast.Attribute) and is_private(node.attr):
            owner = ast.unparse(node.value)
            if owner.split(".")[-1] == "torchvision" or owner.startswith("torchvision."):
                found.append(f"{owner}.{node.attr}")
    return found


def test_names_are_torchvisions_own():
    assert tvp.setup_scales is poolers._setup_scales
    assert tvp.DetectionBoxCoder is det_utils.BoxCoder


def test_drcnn_reaches_private_torchvision_names_only_through_the_lookups():
    """No module imports or reads one directly (torchvision_private names them as strings)."""
    users = {
        str(path.relative_to(DRCNN)): private_torchvision_uses(path.read_text())
        for path in sorted(DRCNN.rglob("*.py"))
    }
    assert {path: names for path, names in users.items() if names} == {}


def test_the_source_scan_finds_each_form_of_private_use():
    source = (
        "from torchvision.ops.poolers import _setup_scales\n"
        "from torchvision.models.detection._utils import Matcher\n"
        "import torchvision.models.detection._utils as u\n"
        "torch.ops.torchvision._roi_align_backward(x)\n"
        "torchvision.ops.boxes._batched_nms_coordinate_trick\n"
        "from torchvision.ops import roi_align\n"
        '"""torchvision.models.detection._utils.BoxCoder in a docstring"""\n'
        "torchvision.__version__\n"
    )
    assert sorted(private_torchvision_uses(source)) == sorted(
        [
            "torchvision.ops.poolers._setup_scales",
            "torchvision.models.detection._utils.Matcher",
            "torchvision.models.detection._utils",
            "torch.ops.torchvision._roi_align_backward",
            "torchvision.ops.boxes._batched_nms_coordinate_trick",
        ]
    )


@pytest.mark.parametrize("version", ["0.26.0", "0.29.1+cu130", "0.19.0", torchvision.__version__])
def test_tested_versions(version):
    assert tvp.is_tested(version)


@pytest.mark.parametrize("version", ["0.18.1", "0.30.0", "1.2.0"])
def test_untested_versions(version):
    assert not tvp.is_tested(version)


def test_an_untested_torchvision_is_warned_about(monkeypatch):
    monkeypatch.setattr(torchvision, "__version__", "0.31.0")
    with pytest.warns(UserWarning, match=r"tested with torchvision 0\.19 to 0\.29, found 0\.31\.0"):
        tvp.warn_if_untested()


def test_missing_name_names_the_version_and_the_name(monkeypatch, reload_after):
    monkeypatch.delattr(poolers, "_setup_scales")
    monkeypatch.setattr(torchvision, "__version__", "0.26.0")
    expected = (
        r"^torchvision 0\.26\.0 has no torchvision\.ops\.poolers\._setup_scales, a private name "
        r"drcnn uses \(this version is within the tested range 0\.19 to 0\.29\)"
    )
    with pytest.raises(tvp.TorchvisionPrivateNameError, match=expected):
        tvp.private_name("torchvision.ops.poolers", "_setup_scales")
    # and importing the module fails at once with that error, not later at first use
    with pytest.raises(ImportError, match=r"has no torchvision\.ops\.poolers\._setup_scales"):
        importlib.reload(tvp)


def test_missing_module_is_named(monkeypatch):
    monkeypatch.setattr(torchvision, "__version__", "0.40.0")
    with pytest.raises(
        tvp.TorchvisionPrivateNameError,
        match=r"^torchvision 0\.40\.0 has no torchvision\.x\.Y, .*outside the tested",
    ):
        tvp.private_name("torchvision.x", "Y")
