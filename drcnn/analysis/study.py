"""The translation-sensitivity study end to end: checkpoints -> table, summary and figures.

Shared by ``drcnn sensitivity`` and ``notebooks/translation_sensitivity.ipynb`` so that both
write the same files into ``out_dir``: ``sensitivity.{parquet,csv}`` (one row per shifted box),
``summary.{csv,md,html}`` (response metrics and quality figures per model and branch),
``regression_fit.{csv,md,html}`` (predicted vs ideal deltas per stage and coordinate) and the
figures ``response_curves.png`` (the responses the summary measures), ``confidence_vs_iou.png``
(classifier quality), ``regression_vs_iou.png`` (regressor quality) and ``shift_heatmaps.png``;
:func:`proposal_study` adds the proposal-IoU files (:mod:`drcnn.analysis.proposals`).

Every model is analysed on its own: its rows depend on nothing but its checkpoint, the data and
the settings. So a model's share can be computed apart, as soon as its training ends
(:func:`study_part`: ``drcnn run``'s ``sensitivity-<model>`` steps), and the study then reads
the parts (``parts_dir``) instead of analysing the models itself: the same table, row for row.
A part records what it was computed from (``part.json``); one computed from another checkpoint
or with other settings is refused, not used.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drcnn.engine.distributed import resolve_device
from drcnn.errors import DrcnnError
from drcnn.io import atomic_write, atomic_write_json, read_json

if TYPE_CHECKING:  # the analysis modules load pandas and matplotlib: imported where used, so
    # that drcnn.analysis.runner can plan the parts' steps without them
    import pandas as pd

    from drcnn.analysis.sensitivity import ShiftGrid

PART_TABLE = "sensitivity.parquet"  # the model's rows of the study's table
PART_PROPOSALS = "proposal_iou.parquet"  # its rows of the proposal-IoU long table
PART_RECORD = "part.json"  # what it was computed from; written last
PART_FILES = (PART_TABLE, PART_PROPOSALS, PART_RECORD)


def source_settings(
    checkpoint: str | Path, config: str | Path | None, data_overrides: Sequence[str]
) -> dict[str, Any]:
    """What every table of a model's part depends on: the checkpoint (path, size, modification
    time), the config (None: the one stored in the checkpoint) and the data overrides."""
    path = Path(checkpoint).resolve()
    stat = path.stat() if path.is_file() else None
    return {
        "checkpoint": str(path),
        "checkpoint_stamp": [stat.st_size, stat.st_mtime_ns] if stat else None,
        "config": str(Path(config).resolve()) if config else None,
        "data_overrides": list(data_overrides),
    }


def grid_settings(grid: ShiftGrid | None, max_images: int | None) -> dict[str, Any]:
    """What the study's table depends on besides :func:`source_settings`."""
    from drcnn.analysis.sensitivity import ShiftGrid

    grid = grid or ShiftGrid()
    return {
        "grid": {"offsets": list(grid.offsets), "scales": list(grid.scales)},
        "max_images": max_images,
    }


def _load(
    name: str, checkpoint: str | Path, config: str | Path | None, device: str
) -> tuple[dict[str, Any], Any]:
    """``({name: model}, its config)``."""
    from drcnn.analysis import sensitivity

    return sensitivity.load_models({name: checkpoint}, {name: config} if config else None, device)


def _model_rows(
    loaded: tuple[dict[str, Any], Any],
    data_overrides: Sequence[str],
    grid: ShiftGrid | None,
    max_images: int | None,
    device: str,
) -> pd.DataFrame:
    """A model's rows of the study's table (``loaded``: :func:`_load`), on the validation
    split."""
    from drcnn.analysis import sensitivity

    models, cfg = loaded
    dataset = sensitivity.study_split(cfg, data_overrides, "val")
    return sensitivity.run_sensitivity(
        models, dataset, grid, dataset.class_names, device, max_images
    )


def _model_proposals(
    loaded: tuple[dict[str, Any], Any],
    data_overrides: Sequence[str],
    proposal_images: int | None,
    device: str,
) -> pd.DataFrame:
    """A model's rows of the proposal-IoU long table (``loaded``: :func:`_load`), on the
    training split."""
    from drcnn.analysis import proposals, sensitivity

    models, cfg = loaded
    train_split = sensitivity.study_split(cfg, data_overrides, "train")
    return proposals.proposal_ious(models, train_split, None, proposal_images, device=device)


def study_part(
    name: str,
    checkpoint: str | Path,
    part_dir: str | Path,
    config: str | Path | None = None,
    data_overrides: Sequence[str] = (),
    grid: ShiftGrid | None = None,
    max_images: int | None = 200,
    proposal_images: int | None = 100,
    device: str = "cpu",
) -> pd.DataFrame:
    """Analyse one model and write its part into ``part_dir``: its rows of the study's table
    and of the proposal-IoU table, then ``part.json`` (what they were computed from), which
    marks the part complete. Returns the model's rows of the study's table."""
    device = str(resolve_device(device))
    part_dir = Path(part_dir)
    part_dir.mkdir(parents=True, exist_ok=True)
    (part_dir / PART_RECORD).unlink(missing_ok=True)  # incomplete until the end
    record = {
        "model": name,
        **source_settings(checkpoint, config, data_overrides),
        **grid_settings(grid, max_images),
        "proposal_images": proposal_images,
    }
    loaded = _load(name, checkpoint, config, device)  # once for both tables
    table = _model_rows(loaded, data_overrides, grid, max_images, device)
    found = _model_proposals(loaded, data_overrides, proposal_images, device)
    for rows, file in ((table, PART_TABLE), (found, PART_PROPOSALS)):
        atomic_write(
            part_dir / file, lambda handle, rows=rows: rows.to_parquet(handle, index=False)
        )
    atomic_write_json(part_dir / PART_RECORD, record)
    return table


def read_part(part_dir: str | Path, file: str, expected: Mapping[str, Any]) -> pd.DataFrame:
    """The ``file`` of a model's part, after checking that the part is complete and that its
    record has the ``expected`` values (model name and settings)."""
    part_dir = Path(part_dir)
    record_path = part_dir / PART_RECORD
    if not record_path.is_file():
        raise DrcnnError(
            f"sensitivity part {part_dir}: missing or incomplete (no {PART_RECORD}); "
            "run its sensitivity step again"
        )
    record = read_json(record_path, "sensitivity part record")
    for key, value in expected.items():
        if record.get(key) != value:
            raise DrcnnError(
                f"sensitivity part {part_dir}: {key} is {record.get(key)!r}, this study "
                f"expects {value!r}; run its sensitivity step again"
            )
    import pandas as pd

    return pd.read_parquet(part_dir / file)


def _tables(
    checkpoints: Mapping[str, str | Path],
    configs: Mapping[str, str | Path] | None,
    data_overrides: Sequence[str],
    parts_dir: str | Path | None,
    file: str,
    settings: Mapping[str, Any],
    compute: Callable[[str, str | Path, str | Path | None], pd.DataFrame],
) -> pd.DataFrame:
    """Every model's rows of one table, in ``checkpoints`` order: without ``parts_dir``
    ``compute(name, checkpoint, config)``, else read from the part ``parts_dir/<name>``, which
    must have been computed from the same checkpoint, config and data overrides and with the
    table's own ``settings``."""
    import pandas as pd

    if not checkpoints:
        raise DrcnnError("sensitivity checkpoints: expected at least one name -> checkpoint")
    frames = []
    for name, checkpoint in checkpoints.items():
        config = (configs or {}).get(name)
        if parts_dir is None:
            frames.append(compute(name, checkpoint, config))
            continue
        source = source_settings(checkpoint, config, data_overrides)
        expected = {"model": name, **source, **settings}
        frames.append(read_part(Path(parts_dir) / name, file, expected))
    return pd.concat(frames, ignore_index=True)


def translation_study(
    checkpoints: Mapping[str, str | Path],
    out_dir: str | Path,
    grid: ShiftGrid | None = None,
    configs: Mapping[str, str | Path] | None = None,
    data_overrides: Sequence[str] = (),
    max_images: int | None = 200,
    device: str = "cpu",
    parts_dir: str | Path | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, list[Path]]:
    """Run the study on the validation split; returns ``(table, summary, figure paths)``.
    ``device``: cpu, cuda, cuda:N or auto (cuda when available). ``parts_dir``: read each
    model's rows from its part (:func:`study_part`) under ``parts_dir/<name>``."""
    from drcnn.analysis import plots, sensitivity, tables

    device = str(resolve_device(device))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)  # an unusable folder fails now, not after the study
    table = _tables(
        checkpoints,
        configs,
        data_overrides,
        parts_dir,
        PART_TABLE,
        grid_settings(grid, max_images),
        lambda name, checkpoint, config: _model_rows(
            _load(name, checkpoint, config, device), data_overrides, grid, max_images, device
        ),
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


def proposal_study(
    checkpoints: Mapping[str, str | Path],
    out_dir: str | Path,
    configs: Mapping[str, str | Path] | None = None,
    data_overrides: Sequence[str] = (),
    proposal_images: int | None = 100,
    device: str = "cpu",
    parts_dir: str | Path | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, Path]:
    """The proposal-availability part of the study on the first ``proposal_images`` training
    images (:mod:`drcnn.analysis.proposals`): writes ``proposal_iou.{csv,md,html}``,
    ``proposal_iou_hist.csv`` and ``proposal_iou.png`` into ``out_dir``; returns
    ``(summary, histograms, figure path)``. ``parts_dir``: as :func:`translation_study`."""
    from drcnn.analysis import proposals

    device = str(resolve_device(device))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    table = _tables(
        checkpoints,
        configs,
        data_overrides,
        parts_dir,
        PART_PROPOSALS,
        {"proposal_images": proposal_images},
        lambda name, checkpoint, config: _model_proposals(
            _load(name, checkpoint, config, device), data_overrides, proposal_images, device
        ),
    )
    return proposals.write_proposal_study(table, out_dir)
