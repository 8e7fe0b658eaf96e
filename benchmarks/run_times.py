"""Where an experiment run's time went: each step's start and length, and inside its notebook the
kernel's start, the first cell (in ``train.ipynb`` the imports alone; a study notebook's first
cell also does its work) and the longest other cells.

    python benchmarks/run_times.py experiments/runs/synthetic_quick [--out run_times.json]

Reads what ``drcnn run`` leaves in its output folder: the step records (``steps/<step>.json``:
started, finished, seconds) and the executed notebooks (papermill's duration of the notebook and
of each cell), and each training's log (``metrics.jsonl`` in the step's ``work_dir``: seconds
per iteration and how much of it waited for data). A notebook's time beyond its cells is the
kernel's start and papermill's own work. Every step is a new Python process, so its imports
(torch, torchvision) come again in each one: on an H200 machine on 2026-11-27 they took 10 to 16
s per notebook (README, "GPU figures"). A training with one loader worker (the main job's
``data.workers=1``) may wait for its data on a GPU, where a step takes about 0.1 s and loading
the 8 images of a batch took 25 ms on a 2-core Xeon. Prints a table and writes the figures as
JSON (default: ``run_times.json`` in the run folder).
"""

from __future__ import annotations

import argparse
import statistics
from datetime import datetime
from pathlib import Path
from typing import Any

from drcnn.io import atomic_write_json, read_json, read_json_lines

LONG_CELLS = 3  # cells listed per notebook besides the first
PARAMETER_TAGS = {"parameters", "injected-parameters"}  # papermill's cells of parameters


def notebook_times(path: Path) -> dict[str, Any]:
    """Papermill's timing of one executed notebook: the whole, the code cells together, the
    first code cell after the parameters (the imports) and the :data:`LONG_CELLS` longest of the
    others, each with its source's first line."""
    notebook = read_json(path, "executed notebook")
    cells = [
        (cell["metadata"].get("papermill", {}).get("duration") or 0.0, "".join(cell["source"]))
        for cell in notebook["cells"]
        if cell["cell_type"] == "code"
        and not PARAMETER_TAGS & set(cell["metadata"].get("tags", []))
    ]
    total = notebook["metadata"].get("papermill", {}).get("duration") or 0.0
    in_cells = sum(seconds for seconds, _ in cells)
    longest = sorted(cells[1:], key=lambda cell: -cell[0])[:LONG_CELLS]
    return {
        "seconds": total,
        "outside_cells_s": total - in_cells,
        "first_cell_s": cells[0][0] if cells else 0.0,
        "longest_cells": [
            {"seconds": seconds, "source": source.strip().splitlines()[0] if source else ""}
            for seconds, source in longest
        ],
    }


def training_times(log: Path) -> dict[str, Any]:
    """From a training's ``metrics.jsonl`` (one ``train`` record per log interval, its ``time``
    and ``data_time`` the interval's mean seconds per iteration): the last iteration, the
    medians of both over the records, and the share of all iterations' time spent waiting for
    the data loader (``data_time`` / ``time``, each weighted by its interval's length)."""
    records = [r for r in read_json_lines(log) if r.get("type") == "train"]
    if not records:
        return {"iterations": 0}
    ends = [r["iter"] for r in records]
    lengths = [end - start for start, end in zip([0, *ends[:-1]], ends, strict=True)]
    total = sum(r["time"] * n for r, n in zip(records, lengths, strict=True))
    waited = sum(r["data_time"] * n for r, n in zip(records, lengths, strict=True))
    return {
        "iterations": ends[-1],
        "median_s_per_iteration": statistics.median(r["time"] for r in records),
        "median_data_s_per_iteration": statistics.median(r["data_time"] for r in records),
        "data_share": waited / total if total else 0.0,
    }


def run_times(run_dir: Path) -> dict[str, Any]:
    """Every finished step of the run in ``run_dir``, in the order they started: its start (s
    after the first step's), length, where it ran a notebook :func:`notebook_times`, and where it
    trained :func:`training_times`."""
    records = [read_json(p, "step record") for p in sorted((run_dir / "steps").glob("*.json"))]
    records = [r for r in records if r.get("started") and r.get("finished")]
    if not records:
        raise SystemExit(f"{run_dir / 'steps'}: no finished step records")
    records.sort(key=lambda r: r["started"])
    origin = datetime.fromisoformat(records[0]["started"])
    end = max(datetime.fromisoformat(r["finished"]) for r in records)
    steps = []
    for record in records:
        step = {
            "step": record["step_id"],
            "status": record["status"],
            "start_s": (datetime.fromisoformat(record["started"]) - origin).total_seconds(),
            "seconds": record["seconds"],
        }
        notebook = run_dir / "notebooks" / f"{record['step_id']}.ipynb"
        if notebook.is_file():
            step["notebook"] = notebook_times(notebook)
        parameters = record.get("parameters", {})
        log = Path(parameters.get("work_dir", "")) / "metrics.jsonl"
        if parameters.get("run_train") and log.is_file():
            step["training"] = training_times(log)
        steps.append(step)
    return {"run_dir": str(run_dir), "steps_s": (end - origin).total_seconds(), "steps": steps}


def table(times: dict[str, Any]) -> str:
    """The figures as a text table, one line per step."""
    lines = [
        f"{'step':<30}{'start':>7}{'seconds':>9}{'kernel':>8}{'1st cell':>9}  longest other cell",
    ]
    for step in times["steps"]:
        notebook = step.get("notebook")
        kernel = f"{notebook['outside_cells_s']:.1f}" if notebook else "-"
        first = f"{notebook['first_cell_s']:.1f}" if notebook else "-"
        longest = notebook["longest_cells"][:1] if notebook else []
        cell = f"{longest[0]['seconds']:.1f} s {longest[0]['source'][:40]}" if longest else ""
        lines.append(
            f"{step['step']:<30}{step['start_s']:>7.1f}{step['seconds']:>9.1f}{kernel:>8}"
            f"{first:>9}  {cell}"
        )
    lines.append(f"first step's start to last step's end: {times['steps_s']:.1f} s")
    for step in times["steps"]:
        training = step.get("training")
        if training and training["iterations"]:
            lines.append(
                f"{step['step']}: {training['iterations']} iterations, median "
                f"{training['median_s_per_iteration']:.3f} s each, of which data "
                f"{training['median_data_s_per_iteration']:.3f} s; data wait "
                f"{100 * training['data_share']:.1f}% of the training's time"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a drcnn run output folder")
    parser.add_argument("--out", type=Path, default=None, help="JSON (default: RUN_DIR/...)")
    args = parser.parse_args()
    times = run_times(args.run_dir)
    print(table(times))
    out = args.out or args.run_dir / "run_times.json"
    atomic_write_json(out, times)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
