"""The AP table of an experiment: one row per model, AP at several IoU thresholds, speed, size.

Measured rows come from the experiment directory's model work dirs (``models/<name>/``:
``metrics.json``, ``benchmark.json`` for fps, ``config.yaml``, ``latest.pth`` for the parameter
count; layout in docs/design.md). AP values are percentages. Each AP column also gets a
``d<column>`` delta against the baseline (by default the first model whose RoI head is
``standard``, i.e. Faster R-CNN). Published COCO numbers (:data:`REPORTED_COCO`, from
METHOD.md) can be appended as rows whose ``source`` is ``reported``; their deltas are taken
against the reported Faster R-CNN (2x) number with the same backbone, never against a measured
row.

An experiment run with several seeds has one work dir per model and seed, ``<model>-seed<k>``;
:func:`mean_over_seeds` turns their rows into one row per model: the mean, its 95% t-interval
and the sample standard deviation over its seeds; :func:`ap_contrasts` gives the differences
between models paired by seed, with their intervals (statistics: :mod:`drcnn.analysis.seeds`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from drcnn.analysis import seeds
from drcnn.analysis.seeds import model_of, seed_of
from drcnn.errors import DrcnnError
from drcnn.io import atomic_write_text

IOU_COLUMNS = {"AP80": "0.80", "AP85": "0.85", "AP90": "0.90", "AP95": "0.95"}
AP_COLUMNS = ["AP", "AP50", "AP75", *IOU_COLUMNS, "APs", "APm", "APl"]
DELTA_OF = ["AP", "AP50", "AP75", *IOU_COLUMNS]
COLUMNS = ["model", "source", "type", "backbone", *AP_COLUMNS, "fps", "params_M"]

# Published COCO val2017 box AP (METHOD.md): Decoupled R-CNN (official, 2x, fps on a TITAN X)
# and the mmdetection baselines (Dynamic R-CNN: mmdetection 2.x's model zoo).
REPORTED_COCO = [
    ("Decoupled R-CNN (2x)", "decoupled", "resnet50", 41.5, 6.1),
    ("Decoupled R-CNN (2x)", "decoupled", "resnet101", 42.8, 5.0),
    ("Decoupled R-CNN (2x)", "decoupled", "resnext101_32x4d", 44.4, 4.2),
    ("Decoupled R-CNN (2x, MS train)", "decoupled", "resnext101_32x4d", 46.0, 4.2),
    ("Decoupled R-CNN (2x, MS train)", "decoupled", "resnext101_64x4d", 46.8, 3.1),
    ("Faster R-CNN (1x, mmdet)", "standard", "resnet50", 37.4, None),
    ("Faster R-CNN (2x, mmdet)", "standard", "resnet50", 38.4, None),
    ("Cascade R-CNN (1x, mmdet)", "cascade", "resnet50", 40.3, None),
    ("Cascade R-CNN (20e, mmdet)", "cascade", "resnet50", 41.0, None),
    ("Cascade R-CNN (20e, mmdet)", "cascade", "resnet101", 42.5, None),
    ("Cascade R-CNN (1x, mmdet)", "cascade", "resnext101_32x4d", 43.7, None),
    ("Dynamic R-CNN (1x, mmdet)", "dynamic", "resnet50", 38.9, None),
]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DrcnnError(f"{path}: expected a JSON file ({exc})".splitlines()[0]) from exc


def model_dirs(exp_dir: str | Path) -> list[Path]:
    """The model work dirs of an experiment that have test metrics, in the spec's order."""
    exp_dir = Path(exp_dir)
    names = [p.name for p in sorted((exp_dir / "models").glob("*/")) if p.is_dir()]
    spec = exp_dir / "spec.yaml"
    if spec.is_file():
        order = [m["name"] for m in (yaml.safe_load(spec.read_text()) or {}).get("models", [])]
        names = sorted(names, key=lambda n: spec_position(n, order))
    return [
        exp_dir / "models" / n for n in names if (exp_dir / "models" / n / "metrics.json").is_file()
    ]


def spec_position(run: str, order: list[str]) -> tuple[int, int]:
    """Sort key of a run: its model's place in the spec (unknown models last), then its seed."""
    model = run if run in order else model_of(run)
    seed = seed_of(run) if model != run else -1
    return (order.index(model) if model in order else len(order), seed)


def mean_over_seeds(table: pd.DataFrame) -> pd.DataFrame | None:
    """One row per model of the measured rows: for every AP column and fps the mean over the
    model's seed runs, its 95% t-interval over the seeds (``<column>_lo``, ``<column>_hi``:
    ``mean -/+ t(0.975, n-1) * s / sqrt(n)``, :func:`drcnn.analysis.seeds.mean_interval`) and
    the sample standard deviation ``s`` (``<column>_std``); ``runs``: the number of seed runs.

    None when no model has more than one run (nothing to average).
    """
    measured = table[table["source"] == "measured"]
    if not seeds.has_seeds(measured):
        return None
    values = [*AP_COLUMNS, "fps"]
    groups = measured.groupby(measured["model"].map(model_of), sort=False)
    out = seeds.over_seeds(measured, [], values).rename(columns={"seeds": "runs"})
    out = out.set_index("model").join(groups[["type", "backbone"]].first())
    out = out.join(groups[values].std(ddof=1).add_suffix("_std"))
    spread = [f"{c}{s}" for c in values for s in ("", "_lo", "_hi", "_std")]
    return out[["runs", "type", "backbone", *spread]].rename_axis("model").reset_index()


def ap_contrasts(
    table: pd.DataFrame,
    contrasts: Sequence[Mapping[str, Any]] = (),
    baseline: str | None = None,
) -> pd.DataFrame:
    """Differences in AP between models, paired by seed, with their 95% t-interval over seeds
    (:func:`drcnn.analysis.seeds.paired_contrasts`): every model minus the baseline, then
    ``contrasts`` (``{name, plus, minus}``, e.g. a spec's 2 x 2 main effects), on the columns
    :data:`DELTA_OF` of the measured rows of an :func:`ap_table`.

    ``baseline`` defaults to the first model whose RoI head is ``standard`` (no baseline
    contrasts without one). Columns: :data:`drcnn.analysis.seeds.CONTRAST_COLUMNS`.
    """
    measured = table[table["source"] == "measured"]
    models = list(dict.fromkeys(measured["model"].map(model_of)))
    if baseline is None:
        standard = measured[measured["type"] == "standard"]
        baseline = model_of(standard["model"].iloc[0]) if not standard.empty else None
    elif baseline not in models:
        raise DrcnnError(f"ap table: baseline model {baseline!r} has no test metrics")
    every = seeds.default_contrasts(models, baseline, contrasts)
    return seeds.paired_contrasts(measured, every, DELTA_OF)


def measured_row(work_dir: Path) -> dict:
    """One table row from a model work dir (AP in percent; NaN for what was not measured)."""
    metrics = _read_json(work_dir / "metrics.json")
    per_iou = metrics.get("AP_per_iou", {})
    row = {"model": work_dir.name, "source": "measured"}
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        row[key] = 100 * metrics.get(key, math.nan)
    for key, iou in IOU_COLUMNS.items():
        row[key] = 100 * per_iou.get(iou, math.nan)
    config = (
        yaml.safe_load((work_dir / "config.yaml").read_text())
        if (work_dir / "config.yaml").is_file()
        else {}
    )
    model_cfg = (config or {}).get("model", {})
    row["type"] = model_cfg.get("roi_head", {}).get("type")
    row["backbone"] = model_cfg.get("backbone", {}).get("arch")
    bench_path = work_dir / "benchmark.json"
    bench = _read_json(bench_path) if bench_path.is_file() else {}
    row["fps"] = bench.get("fps", math.nan)
    checkpoint = work_dir / "latest.pth"
    row["params_M"] = parameter_count(checkpoint) / 1e6 if checkpoint.is_file() else math.nan
    return row


def parameter_count(checkpoint: Path) -> int:
    """Number of parameters (trainable or frozen) of the detector a checkpoint holds."""
    from drcnn.engine.checkpoint import load_model

    model, _ = load_model(checkpoint)
    return sum(p.numel() for p in model.parameters())


def reported_rows() -> list[dict]:
    """The published COCO numbers as table rows (``source = reported``)."""
    rows = []
    for model, kind, backbone, ap, fps in REPORTED_COCO:
        row = dict.fromkeys(COLUMNS, math.nan)
        row.update(model=model, source="reported", type=kind, backbone=backbone, AP=ap)
        row["fps"] = math.nan if fps is None else fps
        rows.append(row)
    return rows


def _add_deltas(table: pd.DataFrame, baseline: str | None) -> pd.DataFrame:
    """``d<AP column>`` = row - baseline row of the same source (and backbone, for reported)."""
    for column in DELTA_OF:
        table[f"d{column}"] = math.nan
    measured = table["source"] == "measured"
    if measured.any():
        if baseline:  # a model, or a model with seed runs (then its lowest seed's run)
            pick = (table["model"] == baseline) | (table["model"].map(model_of) == baseline)
        else:
            pick = table["type"] == "standard"
        base = table[measured & pick]
        if baseline and base.empty:
            raise DrcnnError(f"ap table: baseline model {baseline!r} has no test metrics")
        if not base.empty:
            for column in DELTA_OF:
                table.loc[measured, f"d{column}"] = (
                    table.loc[measured, column] - base.iloc[0][column]
                )
    for _, group in table[~measured].groupby("backbone"):
        base = group[group["model"].str.startswith("Faster R-CNN (2x")]
        if not base.empty:
            rows = group.index
            table.loc[rows, "dAP"] = table.loc[rows, "AP"] - base.iloc[0]["AP"]
    return table


def ap_table(
    exp_dir: str | Path, include_reported: bool = False, baseline: str | None = None
) -> pd.DataFrame:
    """The AP table of an experiment directory (see the module docstring)."""
    rows = [measured_row(d) for d in model_dirs(exp_dir)]
    if include_reported:
        rows += reported_rows()
    if not rows:
        raise DrcnnError(f"{Path(exp_dir) / 'models'}: no model with test metrics (metrics.json)")
    table = pd.DataFrame(rows).reindex(columns=COLUMNS)
    return _add_deltas(table, baseline)


def ap_per_iou(exp_dir: str | Path) -> pd.DataFrame:
    """Long table ``model, iou, AP`` (percent) of every measured model, for the AP-vs-IoU plot."""
    rows = []
    for work_dir in model_dirs(exp_dir):
        per_iou = _read_json(work_dir / "metrics.json").get("AP_per_iou", {})
        rows += [
            {"model": work_dir.name, "iou": float(k), "AP": 100 * v} for k, v in per_iou.items()
        ]
    return pd.DataFrame(rows, columns=["model", "iou", "AP"])


def _cell(value: object, digits: int) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.{digits}f}"
    return "" if value is None else str(value)


def to_markdown(table: pd.DataFrame, digits: int = 1) -> str:
    """A GitHub-style Markdown table (floats rounded, NaN left blank)."""
    header = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = [
        "| " + " | ".join(_cell(v, digits) for v in row) + " |"
        for row in table.itertuples(index=False)
    ]
    return "\n".join([header, rule, *body]) + "\n"


def to_html(table: pd.DataFrame, digits: int = 1) -> str:
    """An HTML table (floats rounded, NaN left blank)."""
    return table.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.{digits}f}")


def write_table(table: pd.DataFrame, stem: str | Path, digits: int = 1) -> list[Path]:
    """Write ``stem.csv`` (full precision), ``stem.md`` and ``stem.html``; return the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(s) for s in (".csv", ".md", ".html")]
    atomic_write_text(paths[0], table.to_csv(index=False))
    atomic_write_text(paths[1], to_markdown(table, digits))
    atomic_write_text(paths[2], to_html(table, digits))
    return paths


def select_columns(table: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """The given columns that exist in ``table`` (for compact report views)."""
    return table[[c for c in columns if c in table.columns]]
