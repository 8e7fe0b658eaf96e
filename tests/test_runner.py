"""``drcnn run``: spec validation, step planning, resuming, and failing steps.

One real run (papermill, a few training iterations) checks resume and a failing model end to
end; the planning logic (dependencies, partial studies, invalidation, --force) is checked with a
stand-in notebook executor that writes each step's output files.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import torch
import yaml

from drcnn import cli, load_config
from drcnn.analysis import report, runner, study
from drcnn.config import to_dict
from drcnn.engine.checkpoint import load_checkpoint, save_checkpoint
from drcnn.engine.thread_share import SHARE_ENV
from drcnn.errors import DrcnnError

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "synthetic"
FASTER = str(CONFIGS / "faster_rcnn_r18_fpn_synthetic.yaml")
DECOUPLED = str(CONFIGS / "decoupled_rcnn_r18_fpn_synthetic.yaml")
# what ap_table.ipynb writes that the runner checks (the error analysis's tables and figure too)
AP_TABLE_OUTPUTS = (
    "ap_table.csv",
    "ap_contrasts.csv",
    "error_breakdown.csv",
    "per_class_ap.csv",
    "error_breakdown.png",
)
TINY = [
    "train.max_iters=2",
    "data.batch_size=2",
    "data.workers=0",
    "train.eval_interval=0",
    "model.transform.min_size=[128]",
    "model.transform.test_min_size=128",
]


def write_spec(path: Path, root: Path, steps: list[str], **extra) -> Path:
    spec = {
        "name": "tiny",
        "dataset": {"type": "synthetic", "root": str(root)},
        "overrides": TINY,
        "models": [
            {"name": "faster", "config": FASTER},
            {"name": "broken", "config": DECOUPLED, "overrides": ["train.no_such_key=1"]},
        ],
        "steps": steps,
        **extra,
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def test_real_run_resumes_and_reports_the_failing_model(tmp_path, synthetic_root, capsys):
    spec = write_spec(tmp_path / "spec.yaml", synthetic_root, ["train", "report"])
    out = tmp_path / "out"
    assert cli.main(["run", str(spec), "--out", str(out)]) == 1
    first = capsys.readouterr().out
    assert "train-faster: done" in first
    running = f"train-faster: running (notebook saved as it goes: {out / 'notebooks'}"
    assert first.index(running) < first.index("train-faster: done")
    broken_nb = out / "notebooks" / "train-broken.ipynb"
    assert "train-broken: FAILED (DrcnnError: override train.no_such_key" in first
    assert str(broken_nb) in first and broken_nb.is_file()
    checkpoint = out / "models" / "faster" / "latest.pth"
    stamp = checkpoint.stat().st_mtime_ns
    assert (out / "report.md").is_file() and "FAILED" in (out / "report.md").read_text()
    # second run: the finished model is skipped, the broken one fails again
    assert cli.main(["run", str(spec), "--out", str(out)]) == 1
    second = capsys.readouterr().out
    assert "train-faster: skipped" in second and "train-broken: FAILED" in second
    assert checkpoint.stat().st_mtime_ns == stamp
    assert yaml.safe_load((out / "spec.yaml").read_text())["name"] == "tiny"
    # a training without its record (as after an interrupted run) continues from latest.pth:
    # here already at max_iters, so nothing is trained or written again
    log = (out / "models" / "faster" / "metrics.jsonl").read_text()
    (out / "steps" / "train-faster.json").unlink()
    assert cli.main(["run", str(spec), "--out", str(out)]) == 1
    third = capsys.readouterr().out
    assert f"train-faster: running (continuing {checkpoint};" in third
    assert "train-faster: done" in third
    assert checkpoint.stat().st_mtime_ns == stamp
    assert (out / "models" / "faster" / "metrics.jsonl").read_text() == log
    record = json.loads((out / "steps" / "train-faster.json").read_text())
    assert record["status"] == "done" and record["resumed_from"] == str(checkpoint)


class FakeExecutor:
    """Stands in for papermill: loads the model config like the real notebook (so a bad
    override fails) and writes each step's output files."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def __call__(self, notebook: str, executed: Path, parameters: dict, cwd: Path) -> None:
        step = executed.stem
        self.calls.append((step, parameters))
        executed.parent.mkdir(parents=True, exist_ok=True)
        executed.write_text("{}")
        if notebook == "train.ipynb":
            load_config(parameters["config"], parameters["overrides"])
            work = Path(parameters["work_dir"])
            work.mkdir(parents=True, exist_ok=True)
            name = "latest.pth" if parameters["run_train"] else "metrics.json"
            (work / name).write_text("x")
        elif notebook == "sensitivity_part.ipynb":
            part = Path(parameters["part_dir"])
            part.mkdir(parents=True, exist_ok=True)
            for name in study.PART_FILES:
                (part / name).write_text("x")
        elif notebook == "translation_sensitivity.ipynb":
            out = Path(parameters["out_dir"])
            out.mkdir(parents=True, exist_ok=True)
            for name in ("sensitivity.parquet", "summary.csv", "proposal_iou.csv"):
                (out / name).write_text("x")
        else:
            (cwd / "tables").mkdir(exist_ok=True)
            for name in AP_TABLE_OUTPUTS:
                (cwd / "tables" / name).write_text("model\n")

    def steps(self) -> list[str]:
        return [step for step, _ in self.calls]


def test_plan_dependencies_partial_study_and_resume(tmp_path, synthetic_root, monkeypatch):
    fake = FakeExecutor()
    monkeypatch.setattr(runner, "execute_notebook", fake)
    spec = write_spec(tmp_path / "spec.yaml", synthetic_root, list(runner.STEP_KINDS))
    out = tmp_path / "out"
    status = runner.run_experiment(spec, out, echo=lambda line: None)
    assert status == {
        "train-faster": "done",
        "train-broken": "failed",
        "test-faster": "done",
        "test-broken": "blocked",
        "sensitivity-faster": "done",
        "sensitivity-broken": "blocked",
        "sensitivity": "done",
        "ap_table": "done",
        "report": "done",
    }
    # the AP table step is done only once the error analysis is written too
    ap_step = next(s for s in runner.plan(runner.load_spec(spec), out) if s.id == "ap_table")
    assert [p.name for p in ap_step.outputs] == list(AP_TABLE_OUTPUTS)
    summary = dict(fake.calls)["sensitivity"]
    assert list(summary["checkpoints"]) == ["faster"]  # only the model that trained
    assert summary["proposal_images"] == runner.SensitivitySpec().proposal_images  # passed on
    # the study reads the part that sensitivity-faster computed with the same settings
    part = dict(fake.calls)["sensitivity-faster"]
    assert Path(part["part_dir"]) == Path(summary["parts_dir"]) / "faster"
    assert part["checkpoint"] == summary["checkpoints"]["faster"]
    shared = ["data_overrides", "low", "high", "steps", "scales", "max_images", "device"]
    assert all(part[key] == summary[key] for key in [*shared, "proposal_images"])
    # overrides: dataset root, spec-wide, then the model's own (the model's win)
    train = dict(fake.calls)["train-broken"]
    assert train["overrides"][0] == f"data.root={synthetic_root.resolve()}"
    assert train["overrides"][-1] == "train.no_such_key=1"
    record = json.loads((out / "steps" / "train-broken.json").read_text())
    assert record["status"] == "failed" and "no_such_key" in record["error"]
    assert record["notebook"] == str(out / "notebooks" / "train-broken.ipynb")

    # resume: only the failed model is tried again
    fake.calls.clear()
    status = runner.run_experiment(spec, out, echo=lambda line: None)
    assert fake.steps() == ["train-broken"]
    assert status["test-faster"] == "skipped" and status["sensitivity"] == "skipped"

    # a new checkpoint invalidates what was computed from it (and, through the new metrics
    # file, the AP table), not the training itself
    fake.calls.clear()
    checkpoint = out / "models" / "faster" / "latest.pth"
    checkpoint.write_text("retrained")
    stat = checkpoint.stat()
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    runner.run_experiment(spec, out, echo=lambda line: None)
    assert fake.steps() == [
        "train-broken",
        "test-faster",
        "sensitivity-faster",
        "sensitivity",
        "ap_table",
    ]

    # --force redoes everything
    fake.calls.clear()
    runner.run_experiment(spec, out, force=True, echo=lambda line: None)
    assert fake.steps() == [
        "train-faster",
        "train-broken",
        "test-faster",
        "sensitivity-faster",
        "sensitivity",
        "ap_table",
    ]


class CheckpointExecutor(FakeExecutor):
    """A FakeExecutor whose training writes a checkpoint holding the step's config (what the
    runner compares to decide whether to continue it) and can be interrupted after that."""

    def __init__(self, interrupt: bool = False) -> None:
        super().__init__()
        self.interrupt = interrupt

    def __call__(self, notebook: str, executed: Path, parameters: dict, cwd: Path) -> None:
        super().__call__(notebook, executed, parameters, cwd)
        if notebook == "train.ipynb" and parameters["run_train"]:
            config = to_dict(load_config(parameters["config"], parameters["overrides"]))
            save_checkpoint(
                Path(parameters["work_dir"]) / "latest.pth", {"model": {}, "config": config}
            )
            if self.interrupt:
                raise KeyboardInterrupt


def one_model_spec(tmp_path: Path, root: Path, overrides: list[str] = ()) -> Path:
    models = [{"name": "faster", "config": FASTER, "overrides": list(overrides)}]
    return write_spec(tmp_path / "spec.yaml", root, ["train", "test"], models=models)


def test_an_interrupted_forced_run_redoes_the_training(tmp_path, synthetic_root, monkeypatch):
    """--force interrupted during a training: the next plain run must not take the earlier,
    complete training's record for this half-done one."""
    spec = one_model_spec(tmp_path, synthetic_root)
    out = tmp_path / "out"
    monkeypatch.setattr(runner, "execute_notebook", CheckpointExecutor())
    runner.run_experiment(spec, out, echo=lambda line: None)
    first = (out / "models" / "faster" / "latest.pth").read_bytes()

    monkeypatch.setattr(runner, "execute_notebook", CheckpointExecutor(interrupt=True))
    with pytest.raises(KeyboardInterrupt):
        runner.run_experiment(spec, out, force=True, echo=lambda line: None)
    assert not (out / "steps" / "train-faster.json").exists()
    # the complete run was moved aside, not deleted: work dir, notebooks, records
    (moved,) = (out / "superseded").iterdir()
    assert re.fullmatch(r"\d{8}T\d{6}Z", moved.name)
    assert (moved / "models" / "faster" / "latest.pth").read_bytes() == first
    assert (moved / "models" / "faster" / "metrics.json").is_file()
    for kept in ("notebooks/train-faster.ipynb", "notebooks/test-faster.ipynb",
                 "steps/train-faster.json", "steps/test-faster.json"):  # fmt: skip
        assert (moved / kept).is_file(), kept
        assert not (out / kept).exists() or kept.startswith("notebooks/train"), kept

    fake = CheckpointExecutor()
    monkeypatch.setattr(runner, "execute_notebook", fake)
    status = runner.run_experiment(spec, out, echo=lambda line: None)
    assert fake.steps() == ["train-faster", "test-faster"]
    assert status == {"train-faster": "done", "test-faster": "done"}
    # the interrupted training is continued (same config), not started again
    latest = out / "models" / "faster" / "latest.pth"
    assert dict(fake.calls)["train-faster"]["resume"] == str(latest)


def test_a_training_of_another_config_is_moved_aside(tmp_path, synthetic_root, monkeypatch):
    """A plain run whose model config changed trains from scratch; the old run is kept."""
    out = tmp_path / "out"
    fake = CheckpointExecutor()
    monkeypatch.setattr(runner, "execute_notebook", fake)
    runner.run_experiment(one_model_spec(tmp_path, synthetic_root), out, echo=lambda line: None)
    assert dict(fake.calls)["train-faster"]["resume"] is None
    fake.calls.clear()
    lines: list[str] = []
    spec = one_model_spec(tmp_path, synthetic_root, ["train.seed=7"])
    runner.run_experiment(spec, out, echo=lines.append)
    assert fake.steps() == ["train-faster", "test-faster"]
    assert dict(fake.calls)["train-faster"]["resume"] is None
    (moved,) = (out / "superseded").iterdir()
    assert f"[1/2] train-faster: earlier outputs moved to {moved}" in lines
    old = load_checkpoint(moved / "models" / "faster" / "latest.pth")
    new = load_checkpoint(out / "models" / "faster" / "latest.pth")
    assert (old["config"]["train"]["seed"], new["config"]["train"]["seed"]) == (0, 7)


def test_seeds_train_every_model_once_per_seed(tmp_path, synthetic_root, monkeypatch):
    fake = FakeExecutor()
    monkeypatch.setattr(runner, "execute_notebook", fake)
    models = [
        {"name": "faster", "config": FASTER},
        {"name": "dec", "config": DECOUPLED, "overrides": ["train.seed=5"]},
    ]
    spec = write_spec(
        tmp_path / "spec.yaml",
        synthetic_root,
        ["train", "test", "sensitivity", "ap_table"],
        models=models,
        seeds=[0, 3],
        sensitivity={"models": ["dec"]},
        ap_table={
            "baseline": "faster",
            "contrasts": [{"name": "dec - faster", "plus": ["dec"], "minus": ["faster"]}],
        },
    )
    status = runner.run_experiment(spec, tmp_path / "out", echo=lambda line: None)
    runs = ["faster-seed0", "faster-seed3", "dec-seed0", "dec-seed3"]
    assert list(status) == [
        *(f"train-{r}" for r in runs),
        *(f"test-{r}" for r in runs),
        "sensitivity-dec-seed0",
        "sensitivity-dec-seed3",
        "sensitivity",
        "ap_table",
    ]
    assert set(status.values()) == {"done"}
    calls = dict(fake.calls)
    # the seed comes last, so it wins over the model's own train.seed
    assert calls["train-dec-seed3"]["overrides"][-2:] == ["train.seed=5", "train.seed=3"]
    assert calls["test-faster-seed0"]["overrides"][-1] == "train.seed=0"
    assert calls["train-dec-seed3"]["work_dir"] == str(tmp_path / "out" / "models" / "dec-seed3")
    assert list(calls["sensitivity"]["checkpoints"]) == ["dec-seed0", "dec-seed3"]
    # both notebooks get the spec's contrasts (plain data) and baseline
    contrasts = [{"name": "dec - faster", "plus": ["dec"], "minus": ["faster"]}]
    for step in ("sensitivity", "ap_table"):
        assert calls[step]["contrasts"] == contrasts and calls[step]["baseline"] == "faster"


def test_missing_outputs_fail_the_step(tmp_path, synthetic_root, monkeypatch):
    monkeypatch.setattr(runner, "execute_notebook", lambda *args: None)
    spec = write_spec(tmp_path / "spec.yaml", synthetic_root, ["train"])
    status = runner.run_experiment(spec, tmp_path / "out", echo=lambda line: None)
    assert status == {"train-faster": "failed", "train-broken": "failed"}
    record = json.loads((tmp_path / "out" / "steps" / "train-faster.json").read_text())
    assert "without writing" in record["error"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"unknown_key": 1}, "unknown_key"),
        ({"steps": ["train", "deploy"]}, "steps: 'deploy'"),
        ({"models": [{"name": "a", "config": FASTER}, {"name": "a", "config": FASTER}]}, "unique"),
        ({"models": [{"name": "a/b", "config": FASTER}]}, "model name 'a/b'"),
        ({"models": [{"name": "a", "config": "nope.yaml"}]}, "config nope.yaml not found"),
        ({"models": []}, "at least one model"),
        ({"dataset": {"type": "voc"}}, "dataset.type"),
        ({"sensitivity": {"models": ["zzz"]}}, "sensitivity.models"),
        ({"seeds": [1, 2, 1]}, "seeds: expected distinct seeds"),
        ({"base": "missing.yaml"}, "missing.yaml: file not found"),
        ({"base": "spec.yaml"}, "base: specs name each other in a cycle"),
        ({"base": 3}, "base: expected the path of another spec"),
        (
            {"ap_table": {"contrasts": [{"name": "c", "plus": ["a"], "minus": ["zzz"]}]}},
            "ap_table.contrasts[0].minus: unknown models ['zzz']",
        ),
        (
            {"ap_table": {"contrasts": [{"name": "c", "plus": [], "minus": ["a"]}]}},
            "ap_table.contrasts[0].plus: expected at least one model",
        ),
        ({"ap_table": {"contrasts": [{"plus": ["a"], "minus": ["a"]}]}}, "contrasts[0].name"),
        (
            {"ap_table": {"contrasts": [{"name": "c", "plus": ["a"], "minus": ["a"]}] * 2}},
            "ap_table.contrasts[1].name: 'c' is used twice",
        ),
        ({"ap_table": {"contrasts": [{"name": "c", "weight": 2}]}}, "weight"),
    ],
)
def test_bad_specs_are_one_line_errors(tmp_path, synthetic_root, change, message, capsys):
    spec = {"name": "bad", "models": [{"name": "a", "config": FASTER}], **change}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(DrcnnError, match=re.escape(message)):
        runner.load_spec(path)
    assert cli.main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: spec ") and err.count("\n") == 1


def test_a_spec_starts_from_its_base(tmp_path, synthetic_root):
    """``base:`` merges the named spec first; the file's own keys win, lists are replaced."""
    base = {"name": "b", "seeds": [0, 1], "models": [{"name": "a", "config": FASTER}]}
    base["overrides"] = ["train.max_iters=5", "train.lr=0.1"]
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "sub").mkdir()
    child = {"base": "../base.yaml", "name": "c", "overrides": ["train.max_iters=7"]}
    (tmp_path / "sub" / "child.yaml").write_text(yaml.safe_dump(child))
    spec = runner.load_spec(tmp_path / "sub" / "child.yaml")
    assert spec.name == "c" and list(spec.seeds) == [0, 1]
    assert [m.name for m in spec.models] == ["a"]
    assert list(spec.overrides) == ["train.max_iters=7"]


class TimedExecutor(FakeExecutor):
    """A FakeExecutor whose steps take a moment (``seconds`` by step id, else 0.2 s) and note
    when they ran, with how many OpenMP threads their kernel would start, and the thread
    shares the runner wrote meanwhile (``shares``: step id -> the values as they changed)."""

    def __init__(self, seconds: dict[str, float] | None = None) -> None:
        super().__init__()
        self.seconds = seconds or {}
        self.spans: dict[str, tuple[float, float, str | None]] = {}
        self.shares: dict[str, list[str]] = {}

    def __call__(self, notebook: str, executed: Path, parameters: dict, cwd: Path) -> None:
        start = time.perf_counter()
        seen = self.shares.setdefault(executed.stem, [])
        share = os.environ.get(SHARE_ENV)
        while time.perf_counter() - start < self.seconds.get(executed.stem, 0.2):
            value = Path(share).read_text() if share else None
            if value and (not seen or seen[-1] != value):
                seen.append(value)
            time.sleep(0.01)
        super().__call__(notebook, executed, parameters, cwd)
        threads = os.environ.get("OMP_NUM_THREADS")
        self.spans[executed.stem] = (start, time.perf_counter(), threads)


def test_jobs_start_each_step_as_soon_as_what_it_needs_has_ended(
    tmp_path, synthetic_root, monkeypatch, capsys
):
    """--jobs 2: the two trainings overlap, each kernel gets half the CPU threads (and the
    slower training all of them once it runs alone), a model's test starts once its own
    training ended (while the slower model still trains), the report comes last, and the
    outcome equals a sequential run's."""
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    spec = {
        "name": "tiny",
        "dataset": {"type": "synthetic", "root": str(synthetic_root)},
        "overrides": TINY,
        "models": [{"name": n, "config": FASTER} for n in ("a", "b")],
        "steps": ["train", "test", "report"],
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    timed = TimedExecutor({"train-a": 0.2, "train-b": 1.5})
    monkeypatch.setattr(runner, "execute_notebook", timed)
    report_start = []
    write_report = report.write_report
    monkeypatch.setattr(
        report,
        "write_report",
        lambda out: report_start.append(time.perf_counter()) or write_report(out),
    )
    status = runner.run_experiment(tmp_path / "spec.yaml", tmp_path / "out", echo=print, jobs=2)
    assert status == {"train-a": "done", "train-b": "done", "test-a": "done", "test-b": "done",
                      "report": "done"}  # fmt: skip
    (a0, a1, a_threads), (b0, b1, _) = timed.spans["train-a"], timed.spans["train-b"]
    assert max(a0, b0) < min(a1, b1)  # the trainings overlapped
    assert a_threads == "2"  # 4 cores / 2 jobs
    assert timed.shares["train-b"] == ["2", "4"]  # all 4 once it ran alone
    test_a, test_b = timed.spans["test-a"], timed.spans["test-b"]
    assert a1 <= test_a[0] < b1  # test-a ran beside the slower training
    assert test_b[0] >= b1 and report_start[0] >= max(test_a[1], test_b[1])
    assert "OMP_NUM_THREADS" not in os.environ and SHARE_ENV not in os.environ  # restored
    lines = capsys.readouterr().out.splitlines()  # whole lines, though printed from threads
    assert all(re.fullmatch(r"\[\d/5\] [^\[]+|\[dataset\] .+|results in .+", x) for x in lines)
    sequential = TimedExecutor()
    monkeypatch.setattr(runner, "execute_notebook", sequential)
    again = runner.run_experiment(tmp_path / "spec.yaml", tmp_path / "seq", echo=print)
    assert again == status
    (a0, a1, threads), (b0, b1, _) = sequential.spans["train-a"], sequential.spans["train-b"]
    assert a1 <= b0 and threads is None  # one after the other, threads left alone


def test_jobs_analyse_a_model_for_the_study_as_soon_as_its_training_ended(
    tmp_path, synthetic_root, monkeypatch
):
    """The sensitivity study's share of a model runs beside the slower model's training; the
    study over the parts starts once both parts have ended."""
    spec = {
        "name": "tiny",
        "dataset": {"type": "synthetic", "root": str(synthetic_root)},
        "overrides": TINY,
        "models": [{"name": n, "config": FASTER} for n in ("a", "b")],
        "steps": ["train", "sensitivity"],
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    timed = TimedExecutor({"train-a": 0.2, "train-b": 1.5})
    monkeypatch.setattr(runner, "execute_notebook", timed)
    status = runner.run_experiment(tmp_path / "spec.yaml", tmp_path / "out", echo=print, jobs=2)
    assert list(status.values()) == ["done"] * 5
    spans = timed.spans
    assert spans["train-a"][1] <= spans["sensitivity-a"][0] < spans["train-b"][1]
    assert spans["sensitivity-b"][0] >= spans["train-b"][1]
    assert spans["sensitivity"][0] >= max(spans["sensitivity-a"][1], spans["sensitivity-b"][1])
    assert list(dict(timed.calls)["sensitivity"]["checkpoints"]) == ["a", "b"]


def test_jobs_never_start_a_step_before_a_failed_need_ended(tmp_path, synthetic_root, monkeypatch):
    """A training that fails blocks its test, also when the steps run at once."""
    spec = write_spec(tmp_path / "spec.yaml", synthetic_root, ["train", "test", "report"])
    timed = TimedExecutor({"train-faster": 0.5})

    def failing(notebook: str, executed: Path, parameters: dict, cwd: Path) -> None:
        timed(notebook, executed, parameters, cwd)
        if executed.stem == "train-faster":
            raise RuntimeError("diverged")

    monkeypatch.setattr(runner, "execute_notebook", failing)
    status = runner.run_experiment(spec, tmp_path / "out", echo=print, jobs=2)
    assert status["train-faster"] == "failed" and status["train-broken"] == "failed"
    assert status["test-faster"] == "blocked" and "test-faster" not in timed.spans
    assert status["report"] == "done"


def test_jobs_below_one_is_a_one_line_error(tmp_path, synthetic_root, capsys):
    spec = write_spec(tmp_path / "spec.yaml", synthetic_root, ["train"])
    assert cli.main(["run", str(spec), "--jobs", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --jobs 0: expected at least 1\n"


@pytest.mark.parametrize(("cores", "expected"), [(1, 1), (2, 2), (3, 3), (16, 4)])
def test_jobs_auto_is_one_step_per_core_at_most_four(monkeypatch, cores, expected):
    """``--jobs auto`` reaches ``run_experiment`` as one step per CPU core, capped at 4; a word
    other than auto is a usage error naming the option."""
    import drcnn.analysis.runner as runner_module

    seen = {}

    def fake_run(spec, out, force, jobs, launcher):
        seen["jobs"] = jobs
        return {}

    monkeypatch.setattr(runner_module, "run_experiment", fake_run)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert cli.main(["run", "spec.yaml", "--jobs", "auto"]) == 0
    assert seen["jobs"] == expected
    with pytest.raises(SystemExit):
        cli.main(["run", "spec.yaml", "--jobs", "two"])


@pytest.mark.parametrize("cuda", [False, True])
def test_device_auto_is_resolved_for_each_run_and_recorded_as_auto(
    tmp_path, synthetic_root, monkeypatch, cuda
):
    """``device: auto``: the notebooks get cuda where CUDA is available and cpu elsewhere (a
    CPU-only machine runs as with ``device: cpu``); the step records keep ``auto``, so a run
    resumed on another machine does not redo its finished steps."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    fake = FakeExecutor()
    monkeypatch.setattr(runner, "execute_notebook", fake)
    spec = write_spec(
        tmp_path / "spec.yaml", synthetic_root, ["train", "test", "sensitivity"], device="auto"
    )
    runner.run_experiment(spec, tmp_path / "out", echo=lambda line: None)
    devices = {step: parameters["device"] for step, parameters in fake.calls}
    assert set(devices) >= {"train-faster", "test-faster", "sensitivity"}
    assert set(devices.values()) == {"cuda" if cuda else "cpu"}
    record = json.loads((tmp_path / "out" / "steps" / "train-faster.json").read_text())
    assert record["parameters"]["device"] == "auto"


def test_a_dataset_generated_otherwise_stops_the_run(tmp_path, synthetic_root, capsys):
    """``dataset.generate`` is checked against an existing folder before anything runs; a spec
    without it uses the folder as it is (every other test here)."""
    spec = write_spec(tmp_path / "spec.yaml", synthetic_root, ["train"])
    data = yaml.safe_load(spec.read_text())
    data["dataset"]["generate"] = {"num_train": 16, "num_val": 8, "size": 128, "seed": 1}
    spec.write_text(yaml.safe_dump(data))
    assert cli.main(["run", str(spec), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"synthetic dataset {synthetic_root}: generated with seed=0, but seed=1" in err
    assert not (tmp_path / "out" / "models").exists()


@pytest.mark.skipif(os.name != "posix", reason="the IPC kernel manager is POSIX-only")
def test_kernels_are_shut_down_without_an_interrupt_but_can_still_be_interrupted():
    """jupyter_client interrupts a kernel before shutting it down; a finished notebook's kernel
    needs no interrupt, and one landing mid-message prints an ERROR into the run's output."""
    import asyncio
    import signal

    manager = runner.ipc_kernel_manager()(kernel_name=runner.KERNEL)
    sent: list[int] = []

    async def run() -> None:
        await manager.start_kernel()
        signal_kernel = manager._async_signal_kernel

        async def recorded(signum: int) -> None:
            sent.append(signum)
            await signal_kernel(signum)

        manager._async_signal_kernel = recorded
        await manager.interrupt_kernel()  # outside a shutdown: sent as before
        assert sent == [signal.SIGINT]
        await manager.shutdown_kernel()

    asyncio.run(run())
    assert sent == [signal.SIGINT] and not manager.has_kernel
