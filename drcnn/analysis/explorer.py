"""Interactive translation-sensitivity explorer (ipywidgets in JupyterLab), with a static fallback.

Pick a model, an image, one of its ground-truth objects and a translation (``dx, dy``: fractions
of the box's width and height; a scale factor around the moved centre). The explorer moves the
object's box as the study does (:func:`drcnn.analysis.sensitivity.shifted_proposals`), runs the
model's RoI head on it (``analyze_boxes``, the RPN bypassed) and draws on the image the ground
truth, the shifted proposal, each regression stage's output box and the top-3 class
probabilities; beside it the study's response curves of that model
(:func:`drcnn.analysis.plots.draw_response_curves`) with this box's point marked.

ipywidgets is optional (the ``notebooks`` extra) and imported only when the widgets are built, so
this module imports without it. :func:`show` draws the widgets when asked for them and ipywidgets
is installed, else one static example: what a papermill run (no frontend to draw widgets) gets.
"""

from __future__ import annotations

import importlib
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd
import torch
from IPython.display import Image, display
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from drcnn.analysis.plots import draw_response_curves
from drcnn.analysis.sensitivity import num_stages, shifted_proposals
from drcnn.errors import DrcnnError
from drcnn.io import atomic_write

TOP_CLASSES = 3
STAGE_COLORS = ("deepskyblue", "orange", "magenta", "yellow", "white")  # stage k: k-th color
EXAMPLE_SHIFT = (0.2, 0.1, 1.0)  # the static example: (dx, dy, scale)
SHIFT_RANGE = (-0.5, 0.5)  # the dx / dy sliders (fractions of box size)
SCALE_RANGE = (0.5, 2.0)


@dataclass(frozen=True)
class Probe:
    """One shifted box through one model: what the explorer draws (xyxy input-image pixels)."""

    gt: np.ndarray  # (4,) the ground-truth box
    label: int  # its class (1..K)
    shift: tuple[float, float, float]  # (dx, dy, scale)
    proposal: np.ndarray  # (4,) the shifted box, clipped to the image
    stage_boxes: list[np.ndarray]  # (4,) per regression stage: its output box
    pred_deltas: list[np.ndarray]  # (4,) per stage: predicted deltas (normalised units)
    ideal_deltas: list[np.ndarray]  # (4,) per stage: the deltas onto the ground truth
    probs: np.ndarray  # (K+1,) class probabilities, background first

    @property
    def true_prob(self) -> float:
        """The probability of the true class."""
        return float(self.probs[self.label])

    @property
    def radius(self) -> float:
        """The translation's size ``|s| = sqrt(dx^2 + dy^2)`` (fraction of box size)."""
        return math.hypot(self.shift[0], self.shift[1])


@torch.no_grad()
def probe(
    model: torch.nn.Module,
    image: torch.Tensor,
    gt_box: torch.Tensor,
    label: int,
    shift: tuple[float, float, float],
    device: torch.device | str = "cpu",
) -> Probe:
    """Move ``gt_box`` by ``shift`` as the study does and run ``model``'s RoI head on it."""
    gt = torch.as_tensor(gt_box, dtype=torch.float64).reshape(1, 4).cpu()
    grid = torch.tensor([shift], dtype=torch.float64)
    boxes, _, _ = shifted_proposals(gt, grid, tuple(image.shape[-2:]))
    if len(boxes) == 0:
        raise DrcnnError(f"shift (dx, dy, scale) = {shift}: the box leaves the image")
    labels = torch.tensor([int(label)], device=device)
    analysis = model.analyze_boxes([image.to(device)], [boxes.float().to(device)], [labels])
    coders = analysis["box_coders"]
    ideal = [
        coder.encode_single(gt, inputs.detach().double().cpu())[0].numpy()
        for coder, inputs in zip(coders, analysis["stage_inputs"], strict=True)
    ]
    return Probe(
        gt=gt[0].numpy(),
        label=int(label),
        shift=tuple(float(v) for v in shift),
        proposal=boxes[0].numpy(),
        stage_boxes=[b[0].detach().double().cpu().numpy() for b in analysis["stage_boxes"]],
        pred_deltas=[d[0].detach().double().cpu().numpy() for d in analysis["stage_deltas"]],
        ideal_deltas=ideal,
        probs=analysis["class_probs"][0].detach().double().cpu().numpy(),
    )


def class_name(label: int, class_names: Sequence[str] | None) -> str:
    """``background`` for 0, else ``class_names[label - 1]`` (the label number without names)."""
    if label == 0:
        return "background"
    return class_names[label - 1] if class_names else str(label)


def _box(ax: Axes, box: np.ndarray, label: str, color: str, **style: Any) -> None:
    x0, y0, x1, y1 = (float(v) for v in box)
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=color, label=label, **style))


def draw_probe(
    ax: Axes, image: torch.Tensor, result: Probe, class_names: Sequence[str] | None = None
) -> None:
    """The image with the ground truth, the shifted proposal, every stage's output box (labelled
    ``stage k``) and the top-3 class probabilities."""
    ax.imshow(image.detach().cpu().permute(1, 2, 0).clamp(0, 1).numpy())
    _box(ax, result.gt, "ground truth", "lime", lw=3)
    for k, box in enumerate(result.stage_boxes):
        _box(ax, box, f"stage {k}", STAGE_COLORS[k % len(STAGE_COLORS)], lw=1.5)
    _box(ax, result.proposal, "shifted proposal", "red", lw=2, ls="--")  # on top: stages start here
    top = np.argsort(-result.probs, kind="stable")[:TOP_CLASSES]
    lines = [f"{class_name(int(c), class_names)}: {result.probs[c]:.3f}" for c in top]
    legend = {"facecolor": "white", "alpha": 0.8}
    ax.text(0.01, 0.99, "\n".join(lines), transform=ax.transAxes, va="top", size=8, bbox=legend)
    dx, dy, scale = result.shift
    truth = class_name(result.label, class_names)
    ax.set_title(f"{truth}: dx {dx:+.2f}, dy {dy:+.2f}, scale {scale:.2f}", fontsize=9)
    ax.legend(loc="lower right", fontsize=7)
    ax.set_axis_off()


def mark_probe(axes: Sequence[Axes], result: Probe) -> None:
    """Mark ``result`` on the response curves (:func:`draw_response_curves`' axes): its
    translation size and true-class probability; per stage its ideal and predicted dx and dy."""
    style = {"marker": "*", "markersize": 14, "color": "black", "linestyle": "none", "zorder": 5}
    axes[0].plot([result.radius], [result.true_prob], label="this box", **style)
    for ax, ideal, pred in zip(axes[1:], result.ideal_deltas, result.pred_deltas, strict=False):
        ax.plot(ideal[:2], pred[:2], label="this box (dx, dy)", **style)


def figure_png(fig: Figure) -> bytes:
    """The figure as PNG bytes (independent of the notebook's matplotlib backend)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    return buffer.getvalue()


class Explorer:
    """The models' response to one shifted box, drawn by :meth:`render`; :meth:`widget` puts
    controls around it, and its callback :meth:`update` redraws on every change."""

    def __init__(
        self,
        models: Mapping[str, torch.nn.Module],
        dataset: Any,
        table: pd.DataFrame,
        class_names: Sequence[str] | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if not models or len(dataset) == 0:
            raise DrcnnError("explorer: expected at least one model and one image")
        self.models, self.dataset, self.table = dict(models), dataset, table
        self.class_names, self.device = class_names, device
        self.controls: dict[str, Any] = {}
        self.output: Any = None
        self.last_figure: Figure | None = None
        self.last_probe: Probe | None = None
        self._item: tuple[int, Any] | None = None
        self._updating = False  # update() changes a control, whose callback is update()

    def item(self, index: int) -> tuple[torch.Tensor, dict]:
        """``dataset[index]`` (the last one is kept: every slider move needs it again)."""
        if self._item is None or self._item[0] != index:
            self._item = (index, self.dataset[index])
        return self._item[1]

    def render(
        self,
        model: str,
        image_index: int,
        object_index: int,
        shift: tuple[float, float, float],
    ) -> tuple[Figure, Probe]:
        """Draw the shifted box through ``model``: image on the left, response curves right."""
        image, target = self.item(image_index)
        boxes = torch.as_tensor(target["boxes"])
        if not 0 <= object_index < len(boxes):
            raise DrcnnError(f"image {image_index}: has {len(boxes)} objects, not {object_index}")
        label = int(torch.as_tensor(target["labels"])[object_index])
        image = torch.as_tensor(image)
        result = probe(self.models[model], image, boxes[object_index], label, shift, self.device)
        fig = Figure(figsize=(13, 5.5), layout="constrained")
        left, right = fig.subfigures(1, 2, width_ratios=[1.1, 1])
        draw_probe(left.subplots(), image, result, self.class_names)
        curves = self.table[self.table["model"] == model].dropna(axis=1, how="all")
        panels = 1 + num_stages(curves)  # the stages this model has columns for
        axes = list(right.subplots(math.ceil(panels / 2), 2, squeeze=False).flat)
        for ax in axes[panels:]:
            ax.set_axis_off()
        draw_response_curves(axes[:panels], curves)
        mark_probe(axes[:panels], result)
        return fig, result

    def example(self) -> tuple[str, int, int, tuple[float, float, float]]:
        """The static example: the first model, first object of the first image with objects."""
        for index in range(len(self.dataset)):
            if len(self.item(index)[1]["boxes"]):
                return next(iter(self.models)), index, 0, EXAMPLE_SHIFT
        raise DrcnnError("explorer: the dataset has no ground-truth boxes")

    def widget(self, widgets: ModuleType | None = None) -> Any:
        """The controls (model, image, object, dx, dy, scale) above the drawing, drawn once.

        ``widgets``: the ipywidgets module (imported here by default: ImportError without it).
        """
        widgets = widgets or importlib.import_module("ipywidgets")
        model, image, _, (dx, dy, scale) = self.example()
        objects = len(self.item(image)[1]["boxes"])
        self.controls = {
            "model": widgets.Dropdown(options=list(self.models), value=model, description="model"),
            "image": widgets.IntSlider(
                min=0, max=len(self.dataset) - 1, value=image, description="image"
            ),
            "object": widgets.IntSlider(min=0, max=objects - 1, value=0, description="object"),
            "dx": widgets.FloatSlider(
                min=SHIFT_RANGE[0], max=SHIFT_RANGE[1], step=0.05, value=dx, description="dx"
            ),
            "dy": widgets.FloatSlider(
                min=SHIFT_RANGE[0], max=SHIFT_RANGE[1], step=0.05, value=dy, description="dy"
            ),
            "scale": widgets.FloatSlider(
                min=SCALE_RANGE[0], max=SCALE_RANGE[1], step=0.05, value=scale, description="scale"
            ),
        }
        self.output = widgets.Output()
        self.update()
        for control in self.controls.values():
            control.observe(self.update, names="value")
        c = self.controls
        rows = [[c["model"], c["image"], c["object"]], [c["dx"], c["dy"], c["scale"]]]
        return widgets.VBox([*(widgets.HBox(row) for row in rows), self.output])

    def update(self, change: Any = None) -> None:
        """The widgets' callback: redraw for the controls' values (an error is printed)."""
        if self._updating:
            return
        self._updating = True
        try:
            self._redraw()
        finally:
            self._updating = False

    def _redraw(self) -> None:
        values = {name: control.value for name, control in self.controls.items()}
        count = len(self.item(values["image"])[1]["boxes"])
        self.controls["object"].max = max(count - 1, 0)  # may clamp the object's value
        values["object"] = self.controls["object"].value
        with self.output:
            self.output.clear_output(wait=True)
            try:
                shift = (values["dx"], values["dy"], values["scale"])
                fig, result = self.render(values["model"], values["image"], values["object"], shift)
            except DrcnnError as exc:
                print(f"error: {exc}")
                return
            self.last_figure, self.last_probe = fig, result
            display(Image(data=figure_png(fig)))


def _ipywidgets() -> ModuleType | None:
    """The ipywidgets module, None when it is not installed."""
    try:
        return importlib.import_module("ipywidgets")
    except ImportError:
        return None


def show(explorer: Explorer, interactive: bool, path: str | Path | None = None) -> Figure | None:
    """The widgets when ``interactive`` and ipywidgets is installed; else one static example,
    displayed and, with ``path``, saved as PNG. Returns the static figure (None for widgets)."""
    widgets = _ipywidgets() if interactive else None
    if widgets is not None:
        display(explorer.widget(widgets))
        return None
    if interactive:
        print("ipywidgets is not installed (pip install 'drcnn[notebooks]'): a static example")
    model, image, obj, shift = explorer.example()
    fig, _ = explorer.render(model, image, obj, shift)
    png = figure_png(fig)
    if path is not None:
        atomic_write(Path(path), lambda handle: handle.write(png))
    display(Image(data=png))
    return fig
