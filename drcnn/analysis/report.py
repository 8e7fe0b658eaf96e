"""The experiment report: ``OUT/report.md`` and ``OUT/report.html`` from an experiment directory.

The report collects what the steps left in the directory (layout in docs/design.md): the AP
table and its AP-vs-IoU figure, the sensitivity summary and figures, and a provenance section
that names, for every model, its config, overrides, checkpoint (path and SHA-256 prefix) and the
code commit and date of its training and test, and for every step its status, date, commit and
executed notebook. Parts whose step did not run or failed are marked as missing, so a partial
experiment still gets a report. Both files are built from the same list of blocks, so the
Markdown and the HTML always say the same thing. Everything that comes from the experiment
(names, paths, overrides, error messages, table cells) is escaped in both, so that it shows as
written and never becomes markup.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from drcnn.analysis import provenance
from drcnn.analysis.seeds import model_of, seed_run
from drcnn.analysis.sensitivity import KEY_COLUMNS
from drcnn.analysis.tables import select_columns, to_html, to_markdown
from drcnn.io import atomic_write_text

SENSITIVITY_FIGURES = {
    "response_curves.png": (
        "Response to translation: true-class probability vs shift size (half-height line: the "
        "invariance radius); predicted vs ideal delta per regression stage (diagonal: gain 1)"
    ),
    "confidence_vs_iou.png": "Classifier quality: true-class probability vs input IoU",
    "regression_vs_iou.png": "Regressor quality: output IoU vs input IoU per stage",
    "shift_heatmaps.png": "Mean true-class probability and final IoU over the (dx, dy) grid",
    "proposal_iou.png": "IoU with the ground truth of each branch's training samples, per image",
}
SENSITIVITY_TEXT = (
    "Ground-truth boxes of the evaluation images were shifted by s = (dx, dy) (fractions of the "
    "box size) and fed to the RoI head as proposals; statistics over input IoU in [0.5, 1]. "
    "Sensitivity is how much a branch's *output* responds to the shift. Regression: `gain_dx`, "
    "`gain_dy` are least-squares slopes of the predicted on the ideal deltas (1 = the stage "
    "undoes the shift, 0 = it ignores it). Classification: `prob_change` is the change of the "
    "true-class probability per 0.1 of box size of shift, `radius` the shift at which the mean "
    "probability falls to half its value at zero shift. `sensitivity` puts both on one scale "
    "(output change per 0.1 of shift relative to the output's range) and `ratio` is a "
    "regression stage's sensitivity over its model's classifier's; `_lo`/`_hi` are 95% "
    "bootstrap intervals over objects. `iou_gain` (output minus input IoU) and `frac_iou_0.9` "
    "(share of boxes brought to IoU >= 0.9) measure quality, not sensitivity."
)


# The columns each report table shows (the files keep every column).
RUN_AP_COLUMNS = ["model", "source", "AP", "AP50", "AP75", "AP85", "AP90", "AP95", "fps"]
SEED_AP_COLUMNS = ["AP", "AP50", "AP75", "AP90"]
SEED_SENSITIVITY_COLUMNS = ["sensitivity", "ratio", "prob_change", "iou_gain"]
PROPOSAL_COLUMNS = [
    "model",
    "nms",
    "branch",
    "set_nms",
    "per_image",
    "per_image_iou_0.7",
    "per_image_iou_0.9",
    "mean_pos_iou",
]
QUESTION_AP = (
    "Q1. Does each model beat the baseline, and which branch gains from highly overlapping "
    "proposals (the spec's contrasts, e.g. a 2 x 2 grid of RPN NMS thresholds)? AP points:"
)
QUESTION_SENSITIVITY = (
    "Q2. Is the regressor more sensitive to translation than the classifier? The output "
    "change per unit of shift relative to the output's range, regressor over classifier:"
)
ERROR_TEXT = (
    "COCO error analysis (as the COCO API's analyze; all classes, per class in "
    "tables/error_breakdown.csv): AP at IoU 0.75 (C75) and 0.5 (C50), then with localisation "
    "errors forgiven (Loc, IoU 0.1), confusion within the supercategory (Sim), any class "
    "confusion (Oth) and background false positives (BG) forgiven in turn; 100 - BG is "
    "missed objects (FN)."
)
PROPOSAL_TEXT = (
    "Proposal availability: on training images, as a training step sees them, the RPN "
    "proposals after NMS at each threshold and each branch's stage-0 training samples, counted "
    "per image by their IoU with the ground truth (nms = classification / regression "
    "threshold; Faster and Cascade R-CNN train both branches on one sample)."
)


@dataclass
class Section:
    """A titled list of blocks: ``("text", template, values)`` (Markdown ``template`` written
    here, with ``{}`` for the ``values`` from the experiment, which get escaped),
    ``("table", DataFrame, digits)``, ``("image", relative path, caption)``."""

    title: str
    blocks: list[tuple] = field(default_factory=list)


# backslash-escaped (CommonMark): HTML tags, links, code spans, table cells; emphasis (``_``,
# ``*``) is left alone, harmless and frequent in names and paths
MARKDOWN_SPECIAL = str.maketrans({c: f"\\{c}" for c in "\\`[]|<>"})


def markdown_escape(value: object) -> str:
    """``value`` as Markdown text that never becomes markup: ``&`` as an entity, the characters
    of HTML, links, code and tables backslash-escaped, line breaks as spaces (for table cells)."""
    text = " ".join(str(value).splitlines()).replace("&", "&amp;")
    return text.translate(MARKDOWN_SPECIAL)


def _markdown_table(table: pd.DataFrame, digits: int) -> str:
    """``to_markdown`` of the table with every text cell and column name escaped."""
    escaped = table.rename(columns=markdown_escape)
    for column in escaped.columns:  # Series.map: DataFrame.map needs pandas 2.1
        escaped[column] = escaped[column].map(
            lambda v: markdown_escape(v) if isinstance(v, str) else v
        )
    return to_markdown(escaped, digits)


def _render_markdown(title: str, sections: list[Section]) -> str:
    out = [f"# {markdown_escape(title)}\n"]
    for section in sections:
        out.append(f"## {section.title}\n")
        for kind, value, *rest in section.blocks:
            if kind == "text":
                out.append(value.format(*map(markdown_escape, rest[0])) + "\n")
            elif kind == "table":
                out.append(_markdown_table(value, rest[0]))
            else:
                out.append(f"![{rest[0]}]({value})\n")
    return "\n".join(out)


def _render_html(title: str, sections: list[Section]) -> str:
    out = [
        "<!DOCTYPE html>",
        f'<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>',
        "<style>body{font-family:sans-serif;max-width:80em;margin:auto}"
        "table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #ccc;"
        "padding:2px 6px}img{max-width:100%}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for section in sections:
        out.append(f"<h2>{html.escape(section.title)}</h2>")
        for kind, value, *rest in section.blocks:
            if kind == "text":
                out.append(f"<p>{html.escape(value.format(*rest[0]))}</p>")
            elif kind == "table":
                out.append(to_html(value, rest[0]))
            else:
                caption = html.escape(rest[0])
                out.append(
                    f'<figure><img src="{html.escape(value)}" alt="{caption}">'
                    f"<figcaption>{caption}</figcaption></figure>"
                )
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _text(template: str, *values: object) -> tuple:
    """A text block: Markdown ``template`` with ``{}`` for each value from the experiment."""
    return ("text", template, values)


def _missing(what: str) -> tuple:
    return _text(f"Not available: {what}.")


def interval_cell(mean: float, lo: float, hi: float, digits: int) -> str:
    """``mean [lo, hi]`` (just ``mean`` when the interval is undefined), for compact tables."""
    if not math.isfinite(mean):
        return f"{mean}"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def with_intervals(
    table: pd.DataFrame, keys: list[str], columns: list[str], digits: int
) -> pd.DataFrame:
    """``keys`` as they are and each of ``columns`` as one ``mean [lo, hi]`` cell (from the
    ``<column>``, ``<column>_lo``, ``<column>_hi`` columns of :mod:`drcnn.analysis.seeds`)."""
    out = table[keys].copy()
    for column in columns:
        out[column] = [
            interval_cell(m, lo, h, digits)
            for m, lo, h in zip(
                table[column], table[f"{column}_lo"], table[f"{column}_hi"], strict=True
            )
        ]
    return out


def contrast_table(contrasts: pd.DataFrame, keys: list[str], digits: int) -> pd.DataFrame:
    """Paired differences (``seeds.paired_contrasts``) as one row per contrast (and key group),
    one ``mean [lo, hi]`` cell per column, ``*`` marking those whose interval excludes 0."""
    cells = contrasts.assign(
        cell=[
            interval_cell(r.mean, r.lo, r.hi, digits) + (" *" if r.exceeds_noise else "")
            for r in contrasts.itertuples()
        ]
    )
    index = ["contrast", *keys]
    wide = cells.pivot_table(index=index, columns="column", values="cell", aggfunc="first")
    order = list(dict.fromkeys(contrasts["column"]))
    rows = cells[index].drop_duplicates()
    return rows.merge(wide[order].reset_index(), on=index, how="left")


def pooled_proposals(summary: pd.DataFrame) -> pd.DataFrame:
    """The proposal-availability summary with each model's seed runs averaged (one row per
    model, NMS setting, branch and proposal set), the columns :data:`PROPOSAL_COLUMNS`."""
    table = select_columns(summary, PROPOSAL_COLUMNS)
    keys = [c for c in ("model", "nms", "branch", "set_nms") if c in table.columns]
    table = table.assign(model=table["model"].map(model_of))
    return table.groupby(keys, sort=False).mean(numeric_only=True).reset_index()


def _read_csv(path: Path) -> pd.DataFrame | None:
    """The table at ``path``, or None when it does not exist or has no rows."""
    if not path.is_file():
        return None
    table = pd.read_csv(path)
    return None if table.empty else table


def _verdict(row: Any) -> str:
    if row.seeds < 2 or not math.isfinite(row.lo):
        return "no interval (fewer than 2 seeds)"
    return "exceeds the noise" if row.exceeds_noise else "within the noise"


def _ap_headline(rows: pd.DataFrame) -> tuple:
    """Q1 in one sentence (a text block): which AP differences exceed the noise, which don't
    (those without an interval, from fewer than 2 seeds, are said to have none)."""
    measured = [r for r in rows.itertuples() if r.seeds >= 2 and math.isfinite(r.lo)]
    exceeds = [r for r in measured if r.exceeds_noise]
    within = [r for r in measured if not r.exceeds_noise]
    parts, values = [], [len(rows)]
    if not measured:
        parts.append("none has an interval (fewer than 2 seeds)")
    elif exceeds:
        parts.append("beyond the noise: " + "; ".join(["{} ({} [{}, {}])"] * len(exceeds)))
        for r in exceeds:
            values += [r.contrast, f"{r.mean:+.1f}", f"{r.lo:+.1f}", f"{r.hi:+.1f}"]
    else:
        parts.append("none beyond the noise")
    if within:
        parts.append("within it: " + ", ".join(["{}"] * len(within)))
        values += [r.contrast for r in within]
    if measured and len(measured) < len(rows):
        parts.append("{} without an interval (fewer than 2 seeds)")
        values.append(len(rows) - len(measured))
    noun = "AP difference" if len(rows) == 1 else "AP differences"
    return _text(f"In short, of {{}} {noun}: " + "; ".join(parts) + ".", *values)


def _ratio_headline(first_reg: pd.DataFrame) -> tuple:
    """Q2 in one sentence (a text block): in how many models the regressor/classifier ratio's
    interval lies above 1 and in how many below 1."""
    return _text(
        "In short: the first regression stage responds more strongly than the classifier "
        "beyond the noise in {} of {} models, less strongly in {}; the ratios run from {} to {}.",
        int((first_reg["ratio_lo"] > 1).sum()),
        len(first_reg),
        int((first_reg["ratio_hi"] < 1).sum()),
        f"{first_reg['ratio'].min():.2f}",
        f"{first_reg['ratio'].max():.2f}",
    )


def answers_section(exp_dir: Path) -> Section:
    """The experiment's answers, each question first in one sentence, then one sentence per
    figure with its 95% interval over seeds: every AP difference of
    ``tables/ap_contrasts.csv`` (each model against the baseline, the spec's contrasts), and
    each model's regressor-to-classifier sensitivity ratio."""
    section = Section("Answers (95% intervals over seeds, differences paired by seed)")
    contrasts = _read_csv(exp_dir / "tables" / "ap_contrasts.csv")
    if contrasts is None:
        section.blocks.append(_missing("no AP differences (tables/ap_contrasts.csv)"))
    else:
        section.blocks.append(_text(QUESTION_AP))
        ap_rows = contrasts[contrasts["column"] == "AP"]
        section.blocks.append(_ap_headline(ap_rows))
        for row in ap_rows.itertuples():
            section.blocks.append(
                _text(
                    "AP difference {}: {} points [{}, {}] over {} seeds, {}.",
                    row.contrast,
                    f"{row.mean:+.1f}",
                    f"{row.lo:+.1f}",
                    f"{row.hi:+.1f}",
                    row.seeds,
                    _verdict(row),
                )
            )
    summary = _read_csv(exp_dir / "sensitivity" / "summary_seeds.csv")
    per_seed = summary is not None
    if summary is None:  # one run per model: the per-run bootstrap intervals over objects
        summary = _read_csv(exp_dir / "sensitivity" / "summary.csv")
    if summary is None:
        section.blocks.append(_missing("no sensitivity summary"))
        return section
    if not {"branch", "stage", "ratio", "ratio_lo", "ratio_hi"} <= set(summary.columns):
        section.blocks.append(_missing("no regressor/classifier ratio in the summary"))
        return section
    section.blocks.append(_text(QUESTION_SENSITIVITY))
    first_reg = summary[(summary["branch"] == "regression") & (summary["stage"] == 0)]
    section.blocks.append(_ratio_headline(first_reg))
    for row in first_reg.itertuples():
        section.blocks.append(
            _text(
                "Translation sensitivity of {}: its first regression stage responds {} times "
                "as strongly as its classifier [{}, {}] ({}).",
                row.model,
                f"{row.ratio:.2f}",
                f"{row.ratio_lo:.2f}",
                f"{row.ratio_hi:.2f}",
                f"t-interval over {row.seeds} seeds"
                if per_seed
                else "bootstrap interval over objects, one run",
            )
        )
    return section


def ap_section(exp_dir: Path) -> Section:
    """The AP table (``tables/ap_table.csv``), its means over seeds with intervals, the paired
    differences, the AP-vs-IoU figure. Columns are chosen so that each table fits the page."""
    section = Section("AP table (COCO-style box AP, %)")
    csv = exp_dir / "tables" / "ap_table.csv"
    if not csv.is_file():
        section.blocks.append(_missing("the AP table step has not produced tables/ap_table.csv"))
        return section
    seeds = _read_csv(exp_dir / "tables" / "ap_table_seeds.csv")
    if seeds is not None:
        section.blocks.append(
            _text("Mean over each model's seed runs and its 95% t-interval [lo, hi].")
        )
        keys = ["model", "runs"]
        section.blocks.append(("table", with_intervals(seeds, keys, SEED_AP_COLUMNS, 1), 1))
    contrasts = _read_csv(exp_dir / "tables" / "ap_contrasts.csv")
    if contrasts is not None:
        section.blocks.append(
            _text(
                "Differences in AP points, paired by seed, with their 95% t-interval; "
                "* = the interval excludes 0 (the difference exceeds the seed-to-seed noise)."
            )
        )
        section.blocks.append(("table", contrast_table(contrasts, [], 1), 1))
    table = pd.read_csv(csv)
    note = "Rows marked `reported` are published numbers, not measured here."
    if seeds is None:
        note += " `dAP` is the difference against the baseline of the same source."
        table = select_columns(table, [*RUN_AP_COLUMNS, "dAP"])
    else:
        note = "Every run. " + note
        table = select_columns(table, RUN_AP_COLUMNS)
    section.blocks.append(_text(note))
    section.blocks.append(("table", table, 1))
    if (exp_dir / "tables" / "ap_vs_iou.png").is_file():
        section.blocks.append(("image", "tables/ap_vs_iou.png", "AP vs IoU threshold"))
    errors = _read_csv(exp_dir / "tables" / "error_breakdown.csv")
    if errors is not None:
        section.blocks.append(_text(ERROR_TEXT))
        section.blocks.append(("table", errors[errors["class"] == "all"], 1))
    if (exp_dir / "tables" / "error_breakdown.png").is_file():
        section.blocks.append(("image", "tables/error_breakdown.png", "What each error costs"))
    return section


def sensitivity_section(exp_dir: Path) -> Section:
    """The sensitivity summary table and figures."""
    section = Section("Translation sensitivity")
    csv = exp_dir / "sensitivity" / "summary.csv"
    if not csv.is_file():
        section.blocks.append(
            _missing("the sensitivity step has not produced sensitivity/summary.csv")
        )
        return section
    section.blocks.append(_text(SENSITIVITY_TEXT))
    over_seeds = _read_csv(exp_dir / "sensitivity" / "summary_seeds.csv")
    if over_seeds is None:
        section.blocks.append(("table", select_columns(pd.read_csv(csv), KEY_COLUMNS), 3))
    else:
        section.blocks.append(
            _text(
                "Mean over each model's seed runs and its 95% t-interval [lo, hi] (every run: "
                "sensitivity/summary.csv)."
            )
        )
        keys = ["model", "branch", "stage", "seeds"]
        table = with_intervals(over_seeds, keys, SEED_SENSITIVITY_COLUMNS, 3)
        section.blocks.append(("table", table, 3))
    contrasts = _read_csv(exp_dir / "sensitivity" / "contrasts.csv")
    if contrasts is not None:
        section.blocks.append(
            _text("Differences paired by seed, 95% t-interval; * = the interval excludes 0.")
        )
        picked = contrasts[contrasts["column"].isin(SEED_SENSITIVITY_COLUMNS)]
        section.blocks.append(("table", contrast_table(picked, ["branch", "stage"], 3), 3))
    proposals = _read_csv(exp_dir / "sensitivity" / "proposal_iou.csv")
    if proposals is not None:
        section.blocks.append(_text(PROPOSAL_TEXT))
        section.blocks.append(("table", pooled_proposals(proposals), 2))
    for name, caption in SENSITIVITY_FIGURES.items():
        if (exp_dir / "sensitivity" / name).is_file():
            section.blocks.append(("image", f"sensitivity/{name}", caption))
    return section


def _checkpoint_cell(path: Path) -> tuple[str, str]:
    if not path.is_file():
        return "(missing)", ""
    return str(path), provenance.file_digest(path)


def _record_cell(record: dict | None) -> str:
    if not record:
        return "not run"
    when = record.get("finished") or record.get("started", "")
    return f"{record.get('status', '?')} {when} @ {record.get('git_commit', '?')}"


def provenance_section(exp_dir: Path) -> Section:
    """Per run (a model, or each of its seed runs when the spec has ``seeds``): config,
    overrides, checkpoint, and when / with which code it was trained and tested; per step:
    status, date, commit, executed notebook."""
    section = Section("Provenance")
    spec_path = exp_dir / "spec.yaml"
    spec = (yaml.safe_load(spec_path.read_text()) if spec_path.is_file() else None) or {}
    seeds = spec.get("seeds") or []
    rows = []
    for model in spec.get("models", []):
        runs = [seed_run(model["name"], seed) for seed in seeds] or [model["name"]]
        for name in runs:
            checkpoint, digest = _checkpoint_cell(exp_dir / "models" / name / "latest.pth")
            trained = provenance.read_record(exp_dir, f"train-{name}")
            # the overrides the run really trained with (spec-wide ones and its seed included)
            overrides = (
                (trained or {}).get("parameters", {}).get("overrides", model.get("overrides", []))
            )
            rows.append(
                {
                    "run": name,
                    "config": model.get("config"),
                    "overrides": " ".join(overrides),
                    "checkpoint": checkpoint,
                    "sha256": digest,
                    "trained": _record_cell(trained),
                    "tested": _record_cell(provenance.read_record(exp_dir, f"test-{name}")),
                }
            )
    if rows:
        section.blocks.append(("table", pd.DataFrame(rows), 1))
    records = provenance.read_records(exp_dir)
    if records:
        steps = pd.DataFrame(
            [
                {
                    "step": r.get("step_id"),
                    "status": r.get("status"),
                    "started": r.get("started"),
                    "finished": r.get("finished"),
                    "seconds": r.get("seconds", math.nan),
                    "commit": r.get("git_commit"),
                    "notebook": r.get("notebook") or r.get("log") or "",  # log: a job's
                }
                for r in records
            ]
        )
        section.blocks.append(("table", steps, 1))
    if not rows and not records:
        section.blocks.append(_missing("no spec.yaml and no step records in this directory"))
    return section


def write_report(exp_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``exp_dir``; return their paths."""
    exp_dir = Path(exp_dir)
    spec_path = exp_dir / "spec.yaml"
    spec = yaml.safe_load(spec_path.read_text()) if spec_path.is_file() else {}
    title = f"drcnn experiment: {(spec or {}).get('name', exp_dir.name)}"
    header = Section(
        "Summary",
        [
            _text(
                "Report written {} by drcnn at commit {} from {}.",
                provenance.now_utc(),
                provenance.git_commit(),
                exp_dir.resolve(),
            )
        ],
    )
    failed = [r for r in provenance.read_records(exp_dir) if r.get("status") == "failed"]
    for record in failed:
        where = "executed notebook" if record.get("notebook") else "job log"  # --launcher
        header.blocks.append(
            _text(
                "Step {} FAILED: {} ({}: {}).",
                record.get("step_id"),
                record.get("error", ""),
                where,
                record.get("notebook") or record.get("log"),
            )
        )
    sections = [
        header,
        answers_section(exp_dir),
        ap_section(exp_dir),
        sensitivity_section(exp_dir),
        provenance_section(exp_dir),
    ]
    md = atomic_write_text(exp_dir / "report.md", _render_markdown(title, sections))
    page = atomic_write_text(exp_dir / "report.html", _render_html(title, sections))
    return md, page
