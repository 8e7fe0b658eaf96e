"""The sensitivity explorer, headless: a fake ``ipywidgets`` module stands in for the frontend
and the widgets' callback is called directly; the drawn boxes must be the model's outputs."""

from __future__ import annotations

import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from test_sensitivity import GT_FREE, LABELS, StandInModel

from drcnn.analysis.explorer import Explorer, show
from drcnn.analysis.sensitivity import ShiftGrid, run_sensitivity
from drcnn.errors import DrcnnError

CLASS_NAMES = ["a", "b", "c"]


class FakeWidget:
    """What the explorer uses of an ipywidgets control: keyword traits and ``observe``."""

    def __init__(self, **traits) -> None:
        self.__dict__.update(traits)
        self.observers: list = []

    def observe(self, callback, names: str) -> None:
        assert names == "value"
        self.observers.append(callback)


class FakeOutput(FakeWidget):
    """An Output widget: a context manager that counts its clears."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def clear_output(self, wait: bool = False) -> None:
        self.clears = getattr(self, "clears", 0) + 1


class FakeBox(FakeWidget):
    def __init__(self, children) -> None:
        super().__init__(children=list(children))


def fake_ipywidgets() -> types.ModuleType:
    module = types.ModuleType("ipywidgets")
    for name in ("Dropdown", "IntSlider", "FloatSlider"):
        setattr(module, name, FakeWidget)
    module.Output, module.VBox, module.HBox = FakeOutput, FakeBox, FakeBox
    return module


@pytest.fixture
def explorer() -> Explorer:
    """Two stand-in models (half regressor and oracle, Gaussian classifier) over one image with
    the two GT_FREE objects, and their study table."""
    models = {
        "half": StandInModel(GT_FREE, "half", "gauss"),
        "oracle": StandInModel(GT_FREE, "oracle", "gauss", sigma=0.3),
    }
    image = torch.rand(3, 400, 400, generator=torch.Generator().manual_seed(0))
    dataset = [(image, {"boxes": GT_FREE.float(), "labels": LABELS, "image_id": 3})]
    grid = ShiftGrid.from_range(-0.4, 0.4, 5)
    table = run_sensitivity(models, dataset, grid, CLASS_NAMES, progress=False)
    return Explorer(models, dataset, table, CLASS_NAMES)


def _rectangles(fig) -> dict[str, list[float]]:
    """Every labelled rectangle of the image panel as ``label -> [x0, y0, x1, y1]``."""
    image_ax = fig.subfigs[0].axes[0]
    return {
        p.get_label(): [p.get_x(), p.get_y(), p.get_x() + p.get_width(), p.get_y() + p.get_height()]
        for p in image_ax.patches
        if isinstance(p, Rectangle) and not p.get_label().startswith("_")
    }


def test_widget_callback_draws_the_models_stage_outputs(explorer, monkeypatch):
    module = fake_ipywidgets()
    monkeypatch.setitem(sys.modules, "ipywidgets", module)
    box = explorer.widget()
    controls = explorer.controls
    assert isinstance(box, FakeBox) and explorer.output in box.children
    assert controls["object"].max == 1  # two objects in the image
    # every control calls back into update
    assert all(c.observers == [explorer.update] for c in controls.values())
    controls["model"].value, controls["object"].value = "half", 1
    controls["dx"].value, controls["dy"].value, controls["scale"].value = 0.2, -0.1, 1.25
    explorer.update({"name": "value", "new": 1.25})
    # the second object (240, 250, 300, 330): 60 x 80, centre (270, 290); moved by 0.2 * 60 and
    # -0.1 * 80 to (282, 282), then scaled to 75 x 100
    shifted = [244.5, 232.0, 319.5, 332.0]
    drawn = _rectangles(explorer.last_figure)
    assert drawn["ground truth"] == pytest.approx(GT_FREE[1].tolist())
    assert drawn["shifted proposal"] == pytest.approx(shifted)
    # the stand-in run on that box by hand
    analysis = explorer.models["half"].analyze_boxes(
        [torch.zeros(3, 400, 400)], [torch.tensor([shifted])], [torch.tensor([3])]
    )
    assert len(analysis["stage_boxes"]) == 2
    for k, stage in enumerate(analysis["stage_boxes"]):
        assert drawn[f"stage {k}"] == pytest.approx(stage[0].tolist(), abs=1e-3)
    # the half regressor moves the box half-way: its output is not the ground truth
    assert not np.allclose(drawn["stage 0"], GT_FREE[1].tolist(), atol=1)
    # top-3 probabilities, highest first: the Gaussian classifier at |s| = sqrt(0.05)
    text = explorer.last_figure.subfigs[0].axes[0].texts[0].get_text().splitlines()
    true_prob = math.exp(-0.05 / (2 * 0.2**2))
    assert text[0] == f"c: {true_prob:.3f}" and text[1] == f"background: {1 - true_prob:.3f}"
    assert len(text) == 3
    # the point on the classifier's response curve
    marks = [
        line
        for ax in explorer.last_figure.subfigs[1].axes
        for line in ax.lines
        if line.get_label().startswith("this box")
    ]
    assert isinstance(marks[0], Line2D)
    assert marks[0].get_xydata()[0] == pytest.approx([math.sqrt(0.05), true_prob], abs=1e-5)
    assert len(marks) == 3  # the classifier and the two regression stages
    assert explorer.output.clears == 2  # drawn once when built, once on the change


def test_widget_callback_follows_the_model_and_reports_bad_shifts(explorer, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ipywidgets", fake_ipywidgets())
    explorer.widget()
    explorer.controls["model"].value = "oracle"
    explorer.update()
    drawn = _rectangles(explorer.last_figure)
    assert drawn["stage 0"] == pytest.approx(GT_FREE[0].tolist(), abs=1e-3)  # oracle: onto gt
    before = explorer.last_figure
    explorer.controls["object"].value = 5  # a fake slider does not clamp: the explorer refuses
    explorer.update()
    assert "error: image 0: has 2 objects, not 5" in capsys.readouterr().out
    assert explorer.last_figure is before


def test_static_example_without_ipywidgets(explorer, monkeypatch, tmp_path: Path, capsys):
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # import ipywidgets -> ImportError
    fig = show(explorer, interactive=True, path=tmp_path / "example.png")
    assert "ipywidgets is not installed" in capsys.readouterr().out
    assert (tmp_path / "example.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    drawn = _rectangles(fig)
    # the example: first model (half), first object, shift (0.2, 0.1), scale 1
    assert drawn["shifted proposal"] == pytest.approx([112.0, 104.0, 172.0, 144.0])
    # interactive=False never builds widgets, even with ipywidgets installed
    monkeypatch.setitem(sys.modules, "ipywidgets", fake_ipywidgets())
    assert show(explorer, interactive=False) is not None and explorer.controls == {}


def test_a_shift_out_of_the_image_is_a_user_error(explorer):
    with pytest.raises(DrcnnError, match="leaves the image"):
        explorer.render("half", 0, 0, (0.0, 0.0, 0.001))


def test_the_sensitivity_notebook_imports_leave_seaborn_unimported():
    """The sensitivity steps' imports (explorer, study, plots) do not import seaborn, which
    imports scipy.stats where scipy is installed (1.5 s on an H200 machine); the figures that
    draw with it import it when called."""
    code = (
        "import sys; import drcnn.analysis.explorer, drcnn.analysis.study, drcnn.analysis.plots;"
        "assert 'seaborn' not in sys.modules, 'seaborn imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-500:]
