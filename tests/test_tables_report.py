"""AP table and report on a hand-made experiment directory (no models needed)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from drcnn.analysis import provenance, seeds, tables
from drcnn.analysis.report import write_report
from drcnn.errors import DrcnnError

IOUS = [f"{0.5 + 0.05 * i:.2f}" for i in range(10)]


def _metrics(ap: float, slope: float) -> dict:
    """COCO-style metrics whose AP per IoU falls linearly from ``ap + 0.2``."""
    per_iou = {iou: max(ap + 0.2 - slope * i, 0.0) for i, iou in enumerate(IOUS)}
    return {
        "AP": ap,
        "AP50": per_iou["0.50"],
        "AP75": per_iou["0.75"],
        "APs": ap / 2,
        "APm": ap,
        "APl": ap * 1.5,
        "AR100": 0.9,
        "AP_per_iou": per_iou,
    }


def _model(exp: Path, name: str, kind: str, metrics: dict, fps: float | None) -> None:
    work = exp / "models" / name
    work.mkdir(parents=True)
    (work / "metrics.json").write_text(json.dumps(metrics))
    config = {"model": {"roi_head": {"type": kind}, "backbone": {"arch": "resnet18"}}}
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    if fps is not None:
        (work / "benchmark.json").write_text(json.dumps({"fps": fps}))


@pytest.fixture
def experiment(tmp_path: Path) -> Path:
    exp = tmp_path / "exp"
    _model(exp, "decoupled", "decoupled", _metrics(0.40, 0.03), 5.0)
    _model(exp, "faster", "standard", _metrics(0.35, 0.04), None)
    (exp / "models" / "untested").mkdir()  # a model whose test never ran: not in the table
    spec = {"name": "unit", "models": [{"name": "faster"}, {"name": "decoupled"}]}
    (exp / "spec.yaml").write_text(yaml.safe_dump(spec))
    return exp


def test_ap_table_rows_and_deltas(experiment: Path):
    table = tables.ap_table(experiment)
    assert list(table["model"]) == ["faster", "decoupled"]  # the spec's order
    row = table.set_index("model").loc["decoupled"]
    # AP per IoU .90 of "decoupled": 0.40 + 0.2 - 0.03 * 8 = 0.36 -> 36 %
    assert row["AP90"] == pytest.approx(36.0)
    assert row["AP"] == pytest.approx(40.0)
    assert row["fps"] == 5.0 and row["type"] == "decoupled" and row["source"] == "measured"
    # deltas against the standard head: AP 40 - 35; AP90 36 - (0.55 - 0.32) * 100 = 13
    assert row["dAP"] == pytest.approx(5.0)
    assert row["dAP90"] == pytest.approx(13.0)
    base = table.set_index("model").loc["faster"]
    assert base["dAP"] == 0.0 and math.isnan(base["fps"]) and math.isnan(base["params_M"])


def test_explicit_baseline_and_missing_baseline(experiment: Path):
    table = tables.ap_table(experiment, baseline="decoupled").set_index("model")
    assert table.loc["faster", "dAP"] == pytest.approx(-5.0)
    with pytest.raises(DrcnnError, match="baseline model 'nope'"):
        tables.ap_table(experiment, baseline="nope")
    with pytest.raises(DrcnnError, match="no model with test metrics"):
        tables.ap_table(experiment.parent / "empty")


def test_reported_rows_are_separate(experiment: Path):
    table = tables.ap_table(experiment, include_reported=True)
    reported = table[table["source"] == "reported"]
    measured = table[table["source"] == "measured"]
    assert len(measured) == 2 and len(reported) == len(tables.REPORTED_COCO)
    # measured deltas unchanged by the reported rows
    assert measured.set_index("model").loc["decoupled", "dAP"] == pytest.approx(5.0)
    r50 = reported[(reported["backbone"] == "resnet50") & (reported["type"] == "decoupled")]
    # Decoupled R-CNN R-50 41.5 vs Faster R-CNN R-50 2x 38.4 (METHOD.md)
    assert r50["AP"].item() == 41.5 and r50["dAP"].item() == pytest.approx(3.1)
    assert r50["fps"].item() == 6.1
    assert reported["AP50"].isna().all()


def test_markdown_and_written_files(tmp_path: Path):
    frame = pd.DataFrame({"model": ["a", "b"], "AP": [12.345, math.nan], "n": [1, 2]})
    assert tables.to_markdown(frame) == (
        "| model | AP | n |\n|---|---|---|\n| a | 12.3 | 1 |\n| b |  | 2 |\n"
    )
    paths = tables.write_table(frame, tmp_path / "t" / "table")
    assert [p.name for p in paths] == ["table.csv", "table.md", "table.html"]
    back = pd.read_csv(paths[0])
    assert back["AP"].iloc[0] == 12.345 and back["AP"].isna().iloc[1]
    assert "<table" in paths[2].read_text() and "12.3" in paths[2].read_text()


def test_ap_per_iou_long_table(experiment: Path):
    long = tables.ap_per_iou(experiment)
    assert len(long) == 2 * len(IOUS)
    faster = long[long["model"] == "faster"].set_index("iou")
    assert faster.loc[0.95, "AP"] == pytest.approx(100 * (0.55 - 0.04 * 9))


def test_report_collects_tables_figures_and_provenance(experiment: Path):
    table = tables.ap_table(experiment)
    tables.write_table(table, experiment / "tables" / "ap_table")
    (experiment / "tables" / "ap_vs_iou.png").write_bytes(b"png")
    provenance.write_record(
        experiment,
        "train-faster",
        {
            "step_id": "train-faster",
            "status": "done",
            "started": "2026-01-01T00:00:00+00:00",
            "finished": "2026-01-01T00:01:00+00:00",
            "git_commit": "abc123",
            "parameters": {"overrides": ["train.max_iters=7"]},
        },
    )
    provenance.write_record(
        experiment,
        "train-decoupled",
        {
            "step_id": "train-decoupled",
            "status": "failed",
            "started": "2026-01-01T00:02:00+00:00",
            "git_commit": "abc123",
            "error": "DrcnnError: override x: unknown config key",
            "notebook": "notebooks/train-decoupled.ipynb",
        },
    )
    md_path, html_path = write_report(experiment)
    md, page = md_path.read_text(), html_path.read_text()
    for text in (md, page):
        assert "40.0" in text and "35.0" in text  # the AP values (percent)
        assert "train.max_iters=7" in text and "abc123" in text
        assert "FAILED" in text and "notebooks/train-decoupled.ipynb" in text
        assert "Not available: the sensitivity step" in text
    assert "![AP vs IoU threshold](tables/ap_vs_iou.png)" in md
    assert '<img src="tables/ap_vs_iou.png"' in page
    # the sensitivity section appears once its summary exists
    (experiment / "sensitivity").mkdir()
    pd.DataFrame(
        {"model": ["faster"], "branch": ["classification"], "sensitivity": [0.125], "extra": [9.5]}
    ).to_csv(experiment / "sensitivity" / "summary.csv", index=False)
    md = write_report(experiment)[0].read_text()
    assert "0.125" in md and "Not available: the sensitivity" not in md
    assert "9.5" not in md  # the report shows the key columns of summary.csv only


@pytest.fixture
def seeded(tmp_path: Path) -> Path:
    """Two models, three seed runs each (AP of each run below), as ``drcnn run`` with seeds."""
    exp = tmp_path / "seeded"
    aps = {"faster": [0.30, 0.34, 0.29], "decoupled": [0.41, 0.38, 0.45]}
    for model, values in aps.items():
        kind = "standard" if model == "faster" else "decoupled"
        for seed, ap in zip((0, 1, 10), values, strict=True):
            _model(exp, f"{model}-seed{seed}", kind, _metrics(ap, 0.03), 10.0 + seed)
    spec = {"name": "unit", "models": [{"name": "faster"}, {"name": "decoupled"}]}
    (exp / "spec.yaml").write_text(yaml.safe_dump(spec))
    return exp


def test_seed_runs_keep_the_spec_order_then_seed_order(seeded: Path):
    names = [d.name for d in tables.model_dirs(seeded)]
    assert names == [f"{m}-seed{s}" for m in ("faster", "decoupled") for s in (0, 1, 10)]


def test_mean_over_seeds_against_numpy(seeded: Path):
    table = tables.ap_table(seeded)
    means = tables.mean_over_seeds(table).set_index("model")
    assert list(means.index) == ["faster", "decoupled"]
    for model, values in {"faster": [30, 34, 29], "decoupled": [41, 38, 45]}.items():
        row = means.loc[model]
        assert row["runs"] == 3 and row["type"] == (
            "standard" if model == "faster" else "decoupled"
        )
        assert row["AP"] == pytest.approx(np.mean(values))
        assert row["AP_std"] == pytest.approx(np.std(values, ddof=1))
        assert row["fps"] == pytest.approx(np.mean([10.0, 11.0, 20.0]))
        # AP75 = 100 * (AP + 0.2 - 5 * 0.03) per run, so its spread is AP's
        assert row["AP75_std"] == pytest.approx(row["AP_std"])
        # 95% t-interval over the 3 seeds: mean -/+ 4.303 (t, 2 dof) * s / sqrt(3)
        half = 4.303 * np.std(values, ddof=1) / np.sqrt(3)
        assert row["AP_lo"] == pytest.approx(np.mean(values) - half, abs=1e-3 * half)
        assert row["AP_hi"] == pytest.approx(np.mean(values) + half, abs=1e-3 * half)


def test_a_seeded_baseline_is_its_lowest_seed_run(seeded: Path):
    table = tables.ap_table(seeded, baseline="faster").set_index("model")
    base = table.loc["faster-seed0", "AP"]
    assert table.loc["decoupled-seed10", "dAP"] == pytest.approx(45 - base)
    assert table.loc["faster-seed0", "dAP"] == 0
    with pytest.raises(DrcnnError, match="baseline model 'fast'"):
        tables.ap_table(seeded, baseline="fast")


def test_ap_contrasts_are_paired_by_seed(seeded: Path):
    table = tables.ap_table(seeded)
    grid = [{"name": "faster - decoupled", "plus": ["faster"], "minus": ["decoupled"]}]
    out = tables.ap_contrasts(table, grid)  # default baseline: the standard head, "faster"
    assert list(out.columns) == seeds.CONTRAST_COLUMNS
    assert out["contrast"].unique().tolist() == ["decoupled - faster", "faster - decoupled"]
    assert out["column"].unique().tolist() == tables.DELTA_OF
    row = out.set_index(["contrast", "column"]).loc[("decoupled - faster", "AP")]
    diffs = [41 - 30, 38 - 34, 45 - 29]  # per seed 0, 1, 10
    half = 4.303 * np.std(diffs, ddof=1) / np.sqrt(3)
    assert row["seeds"] == 3 and row["mean"] == pytest.approx(np.mean(diffs))
    # (the printed t is rounded to 3 decimals: compare to a 1e-3 share of the half-width)
    assert row["lo"] == pytest.approx(np.mean(diffs) - half, abs=1e-3 * half)
    assert row["exceeds_noise"] == (np.mean(diffs) - half > 0)
    back = out.set_index(["contrast", "column"]).loc[("faster - decoupled", "AP90")]
    assert back["mean"] == pytest.approx(-np.mean(diffs))  # AP90 moves with AP here
    # a seed one model lacks is left out: seeds 0 and 1 remain (t with 1 dof: 12.706)
    (seeded / "models" / "faster-seed10" / "metrics.json").unlink()
    out = tables.ap_contrasts(tables.ap_table(seeded), baseline="faster")
    row = out.set_index("column").loc["AP"]
    half = 12.706 * np.std([11, 4], ddof=1) / np.sqrt(2)
    assert row["seeds"] == 2 and row["mean"] == pytest.approx(7.5)
    assert row["hi"] == pytest.approx(7.5 + half, abs=1e-3 * half) and not row["exceeds_noise"]
    with pytest.raises(DrcnnError, match="baseline model 'nope'"):
        tables.ap_contrasts(table, baseline="nope")


def test_mean_over_seeds_needs_two_runs_of_a_model(experiment: Path):
    assert tables.mean_over_seeds(tables.ap_table(experiment)) is None
    reported_only = pd.DataFrame(tables.reported_rows()).reindex(columns=tables.COLUMNS)
    assert tables.mean_over_seeds(reported_only) is None


def test_report_answers_first_and_compact_tables_over_seeds(seeded: Path):
    """With seeds the report opens with one sentence per AP difference and per model's
    regressor/classifier ratio (t-intervals over seeds), and its tables show ``mean [lo, hi]``
    cells instead of one column per statistic."""
    table = tables.ap_table(seeded)
    tables.write_table(table, seeded / "tables" / "ap_table")
    tables.write_table(tables.mean_over_seeds(table), seeded / "tables" / "ap_table_seeds")
    tables.write_table(tables.ap_contrasts(table), seeded / "tables" / "ap_contrasts")
    (seeded / "sensitivity").mkdir()
    runs = pd.DataFrame(
        {
            "model": [f"{m}-seed{k}" for m in ("faster", "decoupled") for k in (0, 1, 10)],
            "branch": "regression",
            "stage": 0,
            "sensitivity": 0.1,
            "ratio": [2.0, 2.5, 3.0, 4.0, 4.0, 4.6],
            "gain_dx": 0.5,
            "gain_dy": 0.5,
            "prob_change": 0.05,
            "radius": 0.3,
            "iou_gain": 0.1,
        }
    )
    runs.to_csv(seeded / "sensitivity" / "summary.csv", index=False)
    seeds.sensitivity_over_seeds(runs).to_csv(
        seeded / "sensitivity" / "summary_seeds.csv", index=False
    )
    md, page = (p.read_text() for p in write_report(seeded))
    diffs = [41 - 30, 38 - 34, 45 - 29]  # decoupled - faster per seed, AP points
    half = 4.303 * np.std(diffs, ddof=1) / np.sqrt(3)
    mean = np.mean(diffs)
    verdict = "exceeds the noise" if mean - half > 0 else "within the noise"
    sentence = (
        f"AP difference decoupled - faster: {mean:+.1f} points "
        f"[{mean - half:+.1f}, {mean + half:+.1f}] over 3 seeds, {verdict}."
    )
    ratio = [2.0, 2.5, 3.0]
    r_half = 4.303 * np.std(ratio, ddof=1) / np.sqrt(3)
    ratio_sentence = (
        f"Translation sensitivity of faster: its first regression stage responds 2.50 times as "
        f"strongly as its classifier [{2.5 - r_half:.2f}, {2.5 + r_half:.2f}] "
        "(t-interval over 3 seeds)."
    )
    # each question first in one sentence: here the one AP difference and both ratios
    verdict_short = "none beyond the noise; within it: decoupled - faster"
    if mean - half > 0:
        verdict_short = f"beyond the noise: decoupled - faster ({mean:+.1f} ["
    headline = f"In short, of 1 AP difference: {verdict_short}"
    lows = [np.mean(r) - 4.303 * np.std(r, ddof=1) / np.sqrt(3) for r in (ratio, [4.0, 4.0, 4.6])]
    above = sum(low > 1 for low in lows)
    ratio_headline = (
        f"In short: the first regression stage responds more strongly than the classifier "
        f"beyond the noise in {above} of 2 models, less strongly in 0; the ratios run from "
        f"2.50 to 4.20."
    )
    for text in (md, page):
        assert sentence in text and ratio_sentence in text
        assert text.index("Answers") < text.index("AP table (COCO")  # answers come first
        assert text.index(headline) < text.index(sentence)
        assert text.index(ratio_headline) < text.index(ratio_sentence)
    ap = np.mean([41, 38, 45])
    ap_half = 4.303 * np.std([41, 38, 45], ddof=1) / np.sqrt(3)
    assert f"{ap:.1f} [{ap - ap_half:.1f}, {ap + ap_half:.1f}]" in page
    assert f"| {ap:.1f} \\[{ap - ap_half:.1f}, {ap + ap_half:.1f}\\] |" in md  # escaped
    assert "AP_std" not in md and "AP_lo" not in md and "dAP" not in md  # compact columns
    # the error analysis shows its all-class rows
    errors = pd.DataFrame(
        {"model": ["faster", "faster"], "runs": 3, "class": ["all", "circle"], "C75": [12.5, 77.7]}
    )
    errors.to_csv(seeded / "tables" / "error_breakdown.csv", index=False)
    md = write_report(seeded)[0].read_text()
    assert "COCO error analysis" in md and "12.5" in md and "77.7" not in md


def test_one_run_per_model_gives_no_interval_in_the_short_answer(experiment: Path):
    """Without seeds no AP difference has an interval, and the short answer says so rather
    than calling the differences within the noise."""
    table = tables.ap_table(experiment)
    tables.write_table(table, experiment / "tables" / "ap_table")
    tables.write_table(tables.ap_contrasts(table), experiment / "tables" / "ap_contrasts")
    md = write_report(experiment)[0].read_text()
    assert "In short, of 1 AP difference: none has an interval (fewer than 2 seeds)." in md
    assert "none beyond the noise" not in md


def test_provenance_lists_every_seed_run(seeded: Path):
    """With ``seeds`` in the spec, the provenance table has a row per seed run, with that run's
    checkpoint and records (the runs live under ``models/<model>-seed<k>``)."""
    spec = yaml.safe_load((seeded / "spec.yaml").read_text())
    (seeded / "spec.yaml").write_text(yaml.safe_dump({**spec, "seeds": [0, 1, 10]}))
    checkpoint = seeded / "models" / "faster-seed1" / "latest.pth"
    checkpoint.write_bytes(b"weights")
    record = {"status": "done", "finished": "2026-01-02T00:00:00+00:00", "git_commit": "f00d"}
    provenance.write_record(
        seeded, "train-faster-seed1", {"step_id": "train-faster-seed1", **record}
    )
    md = write_report(seeded)[0].read_text()
    rows = {
        line.split(" | ")[0].lstrip("| "): line
        for line in md[md.index("## Provenance") :].splitlines()
        if line.startswith("| ")
    }
    runs = [f"{m}-seed{k}" for m in ("faster", "decoupled") for k in (0, 1, 10)]
    assert set(runs) <= set(rows)
    assert provenance.file_digest(checkpoint) in rows["faster-seed1"]
    assert "done 2026-01-02T00:00:00+00:00 @ f00d" in rows["faster-seed1"]
    assert "(missing)" in rows["faster-seed0"] and "not run" in rows["decoupled-seed10"]


def test_interval_cells():
    from drcnn.analysis.report import interval_cell

    assert interval_cell(1.234, 1.0, 1.5, 2) == "1.23 [1.00, 1.50]"
    assert interval_cell(1.234, math.nan, math.nan, 1) == "1.2"
    assert interval_cell(math.inf, math.nan, math.nan, 1) == "inf"


def test_report_md_escapes_what_comes_from_the_experiment(experiment: Path):
    """Names, paths, overrides and errors show as written in report.md and report.html: no tag,
    link or table cell of theirs becomes markup."""
    tag = "<img src=x onerror=alert(1)>"
    spec = {
        "name": f"unit {tag}",
        "models": [{"name": "faster", "config": f"configs/{tag}.yaml"}, {"name": "decoupled"}],
    }
    (experiment / "spec.yaml").write_text(yaml.safe_dump(spec))
    provenance.write_record(
        experiment,
        "train-faster",
        {
            "step_id": "train-faster",
            "status": "failed",
            "started": "2026-01-01T00:00:00+00:00",
            "error": f"ValueError: {tag} [link](javascript:alert(1)) a|b `code` &amp;",
            "parameters": {"overrides": ["model.rpn.nms_thresh=[0.7,0.8]", "data.root=x|y"]},
        },
    )
    md_path, html_path = write_report(experiment)
    md, page = md_path.read_text(), html_path.read_text()
    assert not re.search(r"(?<!\\)<", md) and "<img src=x" not in page  # only escaped ones
    assert r"\<img src=x onerror=alert(1)\>" in md
    assert r"\[link\](javascript:alert(1)) a\|b \`code\` &amp;amp;" in md
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    # every row of the provenance table keeps its cells: the | in an override is escaped
    header = next(line for line in md.splitlines() if line.startswith("| run | config"))
    row = next(line for line in md.splitlines() if line.startswith("| faster |"))
    cells = header.count(" | ")
    assert row.replace(r"\|", "").count(" | ") == cells
    assert r"data.root=x\|y" in row and r"model.rpn.nms\_thresh" not in row


def test_metrics_log_drops_a_torn_last_line(tmp_path: Path):
    """A training killed mid-append (or a full disk) leaves half a line; resume drops it, and
    so does the log reader of the figures (it raised a JSONDecodeError)."""
    from drcnn.analysis.plots import read_metrics_log

    log = tmp_path / "metrics.jsonl"
    entries = [{"iter": 1, "loss": 2.5}, {"iter": 2, "loss": 1.5}]
    log.write_text("".join(json.dumps(e) + "\n" for e in entries) + '{"iter": 3, "lo')
    with pytest.warns(UserWarning, match=rf"{re.escape(str(log))}: line 3 is incomplete"):
        table = read_metrics_log(log)
    assert table.to_dict("records") == entries
