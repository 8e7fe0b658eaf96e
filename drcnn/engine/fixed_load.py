"""A fixed, seeded classification load for timing detectors with random weights.

With random weights, how many (box, class) pairs pass the final score threshold, and so how
much work the final NMS does, depends on the initialisation: one H200 saw an untrained Faster
R-CNN go from 15.5 to 24.5 ms per image between score thresholds 0.001 and 0.05 while the
Decoupled R-CNN did not move (issue #13). Timings of random-weight models therefore fix that
load: a forward hook on every classification layer (each ``cls_score``, all stages alike)
replaces its output by the log of one seeded score table whose softmax is known exactly
(:func:`class_probabilities`). The layers still run, so their cost is kept; only their values
are set.

The load: of ``TABLE_ROIS`` RoIs x K classes, 3.75 % of the (RoI, class) pairs score above 0.001
and a tenth of those above 0.05 (:func:`pair_counts`); for COCO's 80 classes that is 3,000 and
300 of 80,000 pairs. Why: a trained COCO detector keeps "a few thousand" pairs per image above
0.001 (issue #13), spread over many RoIs and a few classes each, and only its confident tail,
about a tenth, above 0.05. Every other foreground pair scores ``FLOOR``; the background takes the
rest of each row. Used by ``drcnn benchmark`` (random weights) and ``benchmarks/inference.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

TABLE_ROIS = 1000  # rows of the table; more RoIs than this reuse it cyclically
CANDIDATE_SHARE = 3000 / 80000  # share of (RoI, class) pairs above 0.001
CONFIDENT_SHARE = 0.1  # share of those above 0.05
# Score ranges, with a margin to each threshold so float rounding of the softmax never moves
# a pair across one: the uncertain pairs log-uniform in (0.0011, 0.045), the confident ones in
# (0.055, 0.5) (one per RoI at most), all other foreground pairs at FLOOR.
LOW_RANGE = (0.0011, 0.045)
HIGH_RANGE = (0.055, 0.5)
FLOOR = 1e-5


def pair_counts(num_classes: int) -> tuple[int, int]:
    """``(pairs above 0.001, pairs above 0.05)`` of the table for ``num_classes`` classes:
    ``(3000, 300)`` for COCO's 80."""
    candidates = round(TABLE_ROIS * num_classes * CANDIDATE_SHARE)
    return candidates, min(round(candidates * CONFIDENT_SHARE), TABLE_ROIS)


def _log_uniform(count: int, bounds: tuple[float, float], generator: torch.Generator) -> Tensor:
    low, high = torch.tensor(bounds, dtype=torch.float64).log()
    return (low + (high - low) * torch.rand(count, generator=generator, dtype=torch.float64)).exp()


def class_probabilities(foreground_columns: list[int], num_columns: int, seed: int = 0) -> Tensor:
    """``(TABLE_ROIS, num_columns)`` softmax scores, one row per RoI, column 0 the background.

    K = ``len(foreground_columns)`` classes, mapped to the model's columns by
    ``foreground_columns``; the same seeded draw for any column layout of K classes. The
    :func:`pair_counts` confident pairs go to distinct RoIs, one class each, in ``HIGH_RANGE``;
    the further candidates, (RoI, class) pairs drawn uniformly, in ``LOW_RANGE``; every other
    column scores ``FLOOR``.
    """
    classes = len(foreground_columns)
    candidates, confident = pair_counts(classes)
    generator = torch.Generator().manual_seed(seed)
    scores = torch.full((TABLE_ROIS, classes), FLOOR, dtype=torch.float64)
    confident_rois = torch.randperm(TABLE_ROIS, generator=generator)[:confident]
    confident_classes = torch.randint(classes, (confident,), generator=generator)
    scores[confident_rois, confident_classes] = _log_uniform(confident, HIGH_RANGE, generator)
    free = (scores == FLOOR).flatten().nonzero()[:, 0]
    chosen = free[torch.randperm(len(free), generator=generator)[: candidates - confident]]
    scores.view(-1)[chosen] = _log_uniform(len(chosen), LOW_RANGE, generator)
    table = torch.full((TABLE_ROIS, num_columns), FLOOR, dtype=torch.float64)
    table[:, foreground_columns] = scores
    table[:, 0] = 0.0
    table[:, 0] = 1.0 - table.sum(dim=1)
    if table[:, 0].min() <= 0.05:
        raise RuntimeError("class_probabilities: a row's foreground scores sum to over 0.95")
    return table


def classification_layers(model: nn.Module) -> list[nn.Linear]:
    """Every RoI-head layer that outputs class logits (one per classifying stage)."""
    layers = [m for n, m in model.named_modules() if n.split(".")[-1] == "cls_score"]
    if not layers:
        raise RuntimeError("no cls_score layer found: the classification load cannot be set")
    return layers


class FixedLogits:
    """Forward hook giving a classification layer the log of a fixed score table (row ``i``
    for the ``i``-th RoI), so softmax reproduces the table; records how many RoIs it saw."""

    def __init__(self, probabilities: Tensor) -> None:
        self.logits = probabilities.log().float()
        self.rois = 0

    def to(self, device: torch.device) -> FixedLogits:
        self.logits = self.logits.to(device)
        return self

    def __call__(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        count = output.shape[0]
        self.rois = count
        rows = self.logits[:count]
        if count > len(self.logits):  # more RoIs than the table: repeat it
            rows = self.logits[torch.arange(count, device=output.device) % len(self.logits)]
        return rows.to(output.dtype)


def fix_classification(
    model: nn.Module, device: torch.device, foreground_columns: list[int] | None = None
) -> FixedLogits:
    """Install one :class:`FixedLogits` on every ``cls_score`` layer of ``model``.
    ``foreground_columns``: the classes' logit columns (default drcnn's: 1 to K, column 0 the
    background)."""
    layers = classification_layers(model)
    width = layers[0].out_features
    columns = foreground_columns if foreground_columns is not None else list(range(1, width))
    hook = FixedLogits(class_probabilities(columns, width)).to(device)
    for layer in layers:
        layer.register_forward_hook(hook)
    return hook
