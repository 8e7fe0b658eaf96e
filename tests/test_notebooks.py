"""Every notebook executes under papermill on a tiny run and writes its files.

One tiny training (a few iterations on the 128-px ``synthetic_root`` fixture) through
``notebooks/train.ipynb`` is shared by all tests of this file (session fixture).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from drcnn import cli
from drcnn.analysis import study
from drcnn.analysis.runner import KERNEL, NOTEBOOK_DIR, execute_notebook
from drcnn.analysis.sensitivity import ShiftGrid, load_study, run_sensitivity
from drcnn.errors import DrcnnError

CONFIG = (
    Path(__file__).resolve().parents[1] / "configs/synthetic/decoupled_rcnn_r18_fpn_synthetic.yaml"
)
NOTEBOOKS = ["train", "translation_sensitivity", "sensitivity_part", "ap_table", "inference_demo"]


def tiny_overrides(root: Path) -> list[str]:
    """A few iterations on 128-px images; no periodic evaluation."""
    return [
        f"data.root={root}",
        "train.max_iters=3",
        "data.batch_size=2",
        "data.workers=0",
        "train.eval_interval=0",
        "model.transform.min_size=[128]",
        "model.transform.test_min_size=128",
        "train.log_interval=1",
    ]


@pytest.fixture(scope="session")
def experiment(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path) -> Path:
    """An experiment folder with one model trained and tested by train.ipynb."""
    exp = tmp_path_factory.mktemp("exp")
    parameters = {
        "config": str(CONFIG),
        "work_dir": str(exp / "models" / "decoupled"),
        "overrides": tiny_overrides(synthetic_root),
        "benchmark_images": 2,
    }
    execute_notebook("train.ipynb", exp / "notebooks" / "train.ipynb", parameters, exp)
    return exp


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebooks_are_committed_clean(name: str):
    """A parameters cell, no outputs, no execution counts."""
    nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == KERNEL
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


def test_kernel_runs_this_interpreter_over_private_sockets(tmp_path: Path, capfd):
    """The kernel is this interpreter, reached without TCP (so ipykernel prints no warning)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": "Python 3", "language": "python"}
    target = tmp_path / "executable.txt"
    nb.cells = [
        nbformat.v4.new_code_cell(f"import sys; open({str(target)!r}, 'w').write(sys.executable)")
    ]
    source = tmp_path / "probe.ipynb"
    nbformat.write(nb, source)
    execute_notebook(str(source), tmp_path / "out.ipynb", {}, tmp_path)
    assert Path(target.read_text()).resolve() == Path(sys.executable).resolve()
    assert "without encryption" not in capfd.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "executable.txt",
        "out.ipynb",
        "probe.ipynb",
    ]


def test_train_notebook_trains_tests_and_plots(experiment: Path):
    work = experiment / "models" / "decoupled"
    for name in (
        "latest.pth",
        "config.yaml",
        "metrics.jsonl",
        "loss_curves.png",
        "results.bbox.json",
        "benchmark.json",
    ):
        assert (work / name).is_file(), name
    log = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert max(entry["iter"] for entry in log) == 3
    metrics = json.loads((work / "metrics.json").read_text())
    assert set(metrics["AP_per_iou"]) >= {"0.50", "0.95"}


def test_sensitivity_notebook_writes_table_summary_and_figures(
    experiment: Path, synthetic_root: Path, tmp_path: Path
):
    out = tmp_path / "sensitivity"
    parameters = {
        "checkpoints": {"decoupled": str(experiment / "models" / "decoupled" / "latest.pth")},
        "data_overrides": [f"data.root={synthetic_root}"],
        "out_dir": str(out),
        "steps": 3,
        "max_images": 3,
        "proposal_images": 2,
    }
    execute_notebook(
        "translation_sensitivity.ipynb", tmp_path / "executed.ipynb", parameters, tmp_path
    )
    proposal_iou = pd.read_csv(out / "proposal_iou.csv")  # two training images, seeded samples
    assert set(proposal_iou["images"]) == {2} and set(proposal_iou["nms"]) >= {"0.7/0.85"}
    assert (out / "proposal_iou_hist.csv").is_file() and (out / "proposal_iou.png").is_file()
    for name in (
        "sensitivity.parquet",
        "sensitivity.csv",
        "summary.csv",
        "summary.md",
        "confidence_vs_iou.png",
        "regression_vs_iou.png",
        "shift_heatmaps.png",
    ):
        assert (out / name).is_file(), name
    table = pd.read_parquet(out / "sensitivity.parquet")
    # 3 x 3 shifts of every annotated box of the analysed images (counted from the annotations)
    annotations = json.loads((synthetic_root / "annotations" / "instances_val.json").read_text())
    boxes = Counter(a["image_id"] for a in annotations["annotations"])
    rows = table.groupby("image_id").size()
    assert 1 <= len(rows) <= 3
    for image_id, count in rows.items():
        assert count == 9 * boxes[image_id]
    zero = table[(table["dx"] == 0) & (table["dy"] == 0)]
    assert len(zero) == sum(boxes[i] for i in rows.index)
    assert (zero["input_iou"] > 1 - 1e-6).all()
    # three regression stages for Decoupled R-CNN
    assert {"iou_s0", "iou_s1", "iou_s2", "final_iou"} <= set(table.columns)
    summary = pd.read_csv(out / "summary.csv")
    assert set(summary["branch"]) == {"classification", "regression"}


def test_study_from_per_model_parts_equals_the_study_in_one_pass(
    experiment: Path, synthetic_root: Path, tmp_path: Path
):
    """``drcnn run`` analyses each model apart as its training ends (sensitivity_part.ipynb);
    the study read from those parts has the rows one pass over all models gives, and a part
    computed from another checkpoint, with other settings or left unfinished is refused."""
    checkpoint = experiment / "models" / "decoupled" / "latest.pth"
    shutil.copy2(checkpoint, tmp_path / "copy.pth")  # a second model: the same weights
    checkpoints = {"dec": str(checkpoint), "copy": str(tmp_path / "copy.pth")}
    data = [f"data.root={synthetic_root}"]
    grid = ShiftGrid.from_range(-0.2, 0.2, 3)
    parts = tmp_path / "parts"
    settings = {"data_overrides": data, "low": -0.2, "high": 0.2, "steps": 3, "max_images": 3}
    parameters = {"name": "dec", "checkpoint": checkpoints["dec"], "part_dir": str(parts / "dec")}
    parameters.update(settings, proposal_images=2)
    execute_notebook("sensitivity_part.ipynb", tmp_path / "part.ipynb", parameters, tmp_path)
    assert all((parts / "dec" / name).is_file() for name in study.PART_FILES)
    study.study_part("copy", checkpoints["copy"], parts / "copy", None, data, grid, 3, 2)

    table, summary, _ = study.translation_study(
        checkpoints, tmp_path / "study", grid, None, data, 3, parts_dir=parts
    )
    # the reference: every model over each image in one pass, as the study ran before parts
    models, dataset = load_study(checkpoints, None, data)
    reference = run_sensitivity(models, dataset, grid, dataset.class_names, max_images=3)
    reference = pd.concat([reference[reference["model"] == name] for name in checkpoints])
    pd.testing.assert_frame_equal(table, reference.reset_index(drop=True))
    one_pass = study.translation_study(checkpoints, tmp_path / "one", grid, None, data, 3)
    pd.testing.assert_frame_equal(summary, one_pass[1])
    with_parts = study.proposal_study(checkpoints, tmp_path / "study", None, data, 2, "cpu", parts)
    pd.testing.assert_frame_equal(
        with_parts[1], study.proposal_study(checkpoints, tmp_path / "one", None, data, 2)[1]
    )
    assert set(with_parts[0]["model"]) == {"dec", "copy"}

    def refused(**changes) -> str:
        arguments = {"grid": grid, "data_overrides": data, "max_images": 3, **changes}
        with pytest.raises(DrcnnError) as error:
            study.translation_study(checkpoints, tmp_path / "x", parts_dir=parts, **arguments)
        return str(error.value)

    assert "max_images is 3, this study expects 2" in refused(max_images=2)
    assert "grid is" in refused(grid=ShiftGrid.from_range(-0.3, 0.3, 3))
    stat = (tmp_path / "copy.pth").stat()
    os.utime(tmp_path / "copy.pth", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert f"sensitivity part {parts / 'copy'}: checkpoint_stamp is" in refused()
    (parts / "dec" / study.PART_RECORD).unlink()
    assert "missing or incomplete" in refused()


def test_ap_table_notebook(experiment: Path):
    execute_notebook(
        "ap_table.ipynb",
        experiment / "notebooks" / "ap_table.ipynb",
        {"exp_dir": str(experiment)},
        experiment,
    )
    folder = experiment / "tables"
    for name in (
        *("ap_table.csv", "ap_table.md", "ap_table.html", "ap_vs_iou.png"),
        *("error_breakdown.csv", "error_breakdown.md", "per_class_ap.csv", "error_breakdown.png"),
    ):
        assert (folder / name).is_file(), name
    table = pd.read_csv(folder / "ap_table.csv")
    metrics = json.loads((experiment / "models" / "decoupled" / "metrics.json").read_text())
    assert table["AP"].item() == pytest.approx(100 * metrics["AP"])
    # the error analysis re-evaluates results.bbox.json on the same images: its C50 is AP50
    breakdown = pd.read_csv(folder / "error_breakdown.csv").set_index("class")
    assert breakdown.loc["all", "C50"] == pytest.approx(100 * metrics["AP50"])
    assert table["params_M"].item() > 1  # a ResNet-18 detector has millions of parameters
    assert (table["source"] == "measured").all()
    # one model, no baseline (its head is not standard): the differences table has no rows
    assert pd.read_csv(folder / "ap_contrasts.csv").empty


def test_ap_table_notebook_averages_seed_runs(experiment: Path, tmp_path: Path):
    """Two models with two ``<model>-seed<k>`` runs each (copies of one trained model): a
    means-over-seeds table and their paired differences (all zero, with zero-width intervals)."""
    for model in ("dec", "ref"):
        for seed in (0, 1):
            shutil.copytree(
                experiment / "models" / "decoupled", tmp_path / "models" / f"{model}-seed{seed}"
            )
    contrasts = [{"name": "dec - ref", "plus": ["dec"], "minus": ["ref"]}]
    parameters = {"exp_dir": str(tmp_path), "contrasts": contrasts}
    execute_notebook("ap_table.ipynb", tmp_path / "executed.ipynb", parameters, tmp_path)
    seeds = pd.read_csv(tmp_path / "tables" / "ap_table_seeds.csv")
    metrics = json.loads((experiment / "models" / "decoupled" / "metrics.json").read_text())
    assert seeds["model"].tolist() == ["dec", "ref"] and seeds["runs"].tolist() == [2, 2]
    assert seeds["AP"].tolist() == pytest.approx([100 * metrics["AP"]] * 2)
    assert (seeds["AP_std"] == 0).all() and (seeds["AP_lo"] == seeds["AP_hi"]).all()
    differences = pd.read_csv(tmp_path / "tables" / "ap_contrasts.csv")
    assert (tmp_path / "tables" / "ap_contrasts.md").is_file()
    assert set(differences["contrast"]) == {"dec - ref"}  # no standard head: no baseline
    row = differences.set_index("column").loc["AP"]
    assert row["mean"] == 0 and row["seeds"] == 2 and not row["exceeds_noise"]


def test_sensitivity_notebook_over_seeds(experiment: Path, synthetic_root: Path, tmp_path: Path):
    """Seed runs of two models (one checkpoint): summary over seeds and paired contrasts."""
    checkpoint = str(experiment / "models" / "decoupled" / "latest.pth")
    out = tmp_path / "sensitivity"
    parameters = {
        "checkpoints": {f"{m}-seed{k}": checkpoint for m in ("a", "b") for k in (0, 1)},
        "data_overrides": [f"data.root={synthetic_root}"],
        "out_dir": str(out),
        "steps": 3,
        "max_images": 2,
        "interactive": False,
        "baseline": "a",
    }
    execute_notebook(
        "translation_sensitivity.ipynb", tmp_path / "executed.ipynb", parameters, tmp_path
    )
    summary = pd.read_csv(out / "summary.csv")
    over = pd.read_csv(out / "summary_seeds.csv")
    assert set(over["model"]) == {"a", "b"} and (over["seeds"] == 2).all()
    assert len(over) == len(summary) // 2  # one row per model for two runs, per branch and stage
    first = summary[summary["model"] == "a-seed0"].set_index(["branch", "stage"])
    means = over[over["model"] == "a"].set_index(["branch", "stage"])
    assert means["sensitivity"].to_numpy() == pytest.approx(
        first["sensitivity"].to_numpy(), nan_ok=True
    )
    differences = pd.read_csv(out / "contrasts.csv")
    assert set(differences["contrast"]) == {"b - a"}
    assert set(differences["branch"]) == {"classification", "regression"}
    defined = differences.dropna(subset=["mean"])  # inf - inf (e.g. radius) is undefined
    assert (defined["mean"] == 0).all() and not differences["exceeds_noise"].any()
    assert (differences["seeds"] == 2).sum() == len(defined)


def test_inference_demo_notebook(experiment: Path, synthetic_root: Path, tmp_path: Path):
    out = tmp_path / "demo"
    parameters = {
        "checkpoint": str(experiment / "models" / "decoupled" / "latest.pth"),
        "images": [str(synthetic_root / "val")],
        "max_images": 2,
        "out_dir": str(out),
        "score_thr": 0.0,
    }
    execute_notebook("inference_demo.ipynb", tmp_path / "executed.ipynb", parameters, tmp_path)
    entries = json.loads((out / "detections.json").read_text())
    assert len(entries) == 2
    for entry in entries:
        assert (out / f"{Path(entry['file']).stem}.png").is_file()


def test_sensitivity_and_report_commands(
    experiment: Path, synthetic_root: Path, tmp_path: Path, capsys
):
    checkpoint = experiment / "models" / "decoupled" / "latest.pth"
    out = tmp_path / "cli"
    argv = ["sensitivity", f"dec={checkpoint}", "--out", str(out), "--range", "-0.2", "0.2", "3"]
    argv += ["--max-images", "2", "--data", f"data.root={synthetic_root}"]
    assert cli.main(argv) == 0
    table = pd.read_csv(out / "sensitivity.csv")
    assert set(table["model"]) == {"dec"} and sorted(set(table["dx"])) == [-0.2, 0.0, 0.2]
    assert "classification" in capsys.readouterr().out
    assert cli.main(["sensitivity", str(checkpoint), "--out", str(out)]) == 2
    assert "expected NAME=PATH" in capsys.readouterr().err
    assert cli.main(["report", str(experiment)]) == 0
    assert (experiment / "report.html").is_file() and (experiment / "report.md").is_file()
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
