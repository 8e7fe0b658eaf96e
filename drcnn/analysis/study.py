"""The translation-sensitivity study end to end: checkpoints -> table, summary and figures.

Shared by ``drcnn sensitivity`` and ``notebooks/translation_sensitivity.ipynb`` so that both
write the same files into ``out_dir``: ``sensitivity.{parquet,csv}`` (one row per shifted box),
``summary.{csv,md,html}`` (response metrics and quality figures per model and branch),
``regression_fit.{csv,md,html}`` (predicted vs ideal deltas per stage and coordinate) and the
figures ``response_curves.png`` (the responses the summary measures), ``confidence_vs_iou.png``
(classifier quality), ``regression_vs_iou.png`` (regressor quality) and ``shift_heatmaps.png``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from drcnn.analysis import plots, sensitivity, tables
from drcnn.engine.distributed import resolve_device


def translation_study(
    checkpoints: Mapping[str, str | Path],
    out_dir: str | Path,
    grid: sensitivity.ShiftGrid | None = None,
    configs: Mapping[str, str | Path] | None = None,
    data_overrides: Sequence[str] = (),
    max_images: int | None = 200,
    device: str = "cpu",
) -> tuple[pd.DataFrame, pd.DataFrame, list[Path]]:
    """Run the study on the validation split; returns ``(table, summary, figure paths)``.
    ``device``: cpu, cuda, cuda:N or auto (cuda when available)."""
    device = str(resolve_device(device))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)  # an unusable folder fails now, not after the study
    models, dataset = sensitivity.load_study(checkpoints, configs, data_overrides, device)
    table = sensitivity.run_sensitivity(
        models, dataset, grid, dataset.class_names, device, max_images
    )
    sensitivity.save_table(table, out_dir / "sensitivity")
    summary = sensitivity.summarize(table)
    tables.write_table(summary, out_dir / "summary", digits=3)
    tables.write_table(sensitivity.regression_fit(table), out_dir / "regression_fit", digits=3)
    figures = [
        plots.response_curves(table, out_dir / "response_curves.png"),
        plots.confidence_vs_iou(table, out_dir / "confidence_vs_iou.png"),
        plots.regression_vs_iou(table, out_dir / "regression_vs_iou.png"),
        plots.shift_heatmaps(table, out_dir / "shift_heatmaps.png"),
    ]
    return table, summary, figures
