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

import pandas as pd
import yaml

from drcnn.analysis import provenance
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


def ap_section(exp_dir: Path) -> Section:
    """The AP table (``tables/ap_table.csv``), its means over seeds, the AP-vs-IoU figure."""
    section = Section("AP table (COCO-style box AP, %)")
    csv = exp_dir / "tables" / "ap_table.csv"
    if not csv.is_file():
        section.blocks.append(_missing("the AP table step has not produced tables/ap_table.csv"))
        return section
    section.blocks.append(
        _text(
            "Rows marked `reported` are published numbers, not measured here; `d*` columns "
            "are differences against the baseline of the same source."
        )
    )
    section.blocks.append(("table", pd.read_csv(csv), 1))
    seeds = exp_dir / "tables" / "ap_table_seeds.csv"
    if seeds.is_file():
        section.blocks.append(
            _text(
                "Over seeds: one row per model, the mean of its `runs` seed runs and the sample "
                "standard deviation (`*_std`)."
            )
        )
        section.blocks.append(("table", pd.read_csv(seeds), 1))
    if (exp_dir / "tables" / "ap_vs_iou.png").is_file():
        section.blocks.append(("image", "tables/ap_vs_iou.png", "AP vs IoU threshold"))
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
    section.blocks.append(("table", select_columns(pd.read_csv(csv), KEY_COLUMNS), 3))
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
    """Per model: config, overrides, checkpoint, and when / with which code it was trained and
    tested; per step: status, date, commit, executed notebook."""
    section = Section("Provenance")
    spec_path = exp_dir / "spec.yaml"
    spec = yaml.safe_load(spec_path.read_text()) if spec_path.is_file() else {}
    rows = []
    for model in (spec or {}).get("models", []):
        name = model["name"]
        checkpoint, digest = _checkpoint_cell(exp_dir / "models" / name / "latest.pth")
        trained = provenance.read_record(exp_dir, f"train-{name}")
        # the overrides the model really trained with (spec-wide ones included)
        overrides = (
            (trained or {}).get("parameters", {}).get("overrides", model.get("overrides", []))
        )
        rows.append(
            {
                "model": name,
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
                    "notebook": r.get("notebook") or "",
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
        header.blocks.append(
            _text(
                "Step {} FAILED: {} (executed notebook: {}).",
                record.get("step_id"),
                record.get("error", ""),
                record.get("notebook"),
            )
        )
    sections = [
        header,
        ap_section(exp_dir),
        sensitivity_section(exp_dir),
        provenance_section(exp_dir),
    ]
    md = atomic_write_text(exp_dir / "report.md", _render_markdown(title, sections))
    page = atomic_write_text(exp_dir / "report.html", _render_html(title, sections))
    return md, page
