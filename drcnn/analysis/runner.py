"""``drcnn run SPEC.yaml``: an experiment spec -> trained models, studies, tables and a report.

A spec (YAML, schema :class:`Spec`) names the dataset, the models (name, config, overrides),
the device, the steps and, optionally, seeds: with ``seeds: [0, 1, 2]`` every model trains once
per seed, as the run ``<model>-seed<k>`` (``train.seed=k``), and the AP table and sensitivity
steps add the mean and 95% interval over seeds and the differences between models paired by
seed (:mod:`drcnn.analysis.seeds`; ``ap_table.contrasts`` names extra differences). The runner

1. writes the resolved spec to ``OUT/spec.yaml`` and, for a synthetic dataset, generates it if
   missing (``drcnn.data.synthetic.ensure_synthetic_dataset``); with ``dataset.generate`` an
   existing one must have been generated with those settings, without it any existing one is
   used as it is;
2. plans the steps: ``train-<model>`` and ``test-<model>`` (``notebooks/train.ipynb``),
   ``sensitivity-<model>`` (``sensitivity_part.ipynb``: the model's share of the study) and
   ``sensitivity`` (``translation_sensitivity.ipynb``: the study over those shares),
   ``ap_table`` (``ap_table.ipynb``) and
   ``report`` (:func:`drcnn.analysis.report.write_report`);
3. executes each notebook with papermill (kernel ``python3``, i.e. this interpreter), keeping
   the executed copy in ``OUT/notebooks/<step>.ipynb``, and prints a line when each step starts
   and when it ends. With ``launcher.type: submitit`` the training, test and sensitivity steps
   run as cluster jobs instead (:mod:`drcnn.analysis.launchers`), under the same rules below.

Resuming: a step whose record (``OUT/steps/<step>.json``) says ``done`` with the same
parameters and inputs (checkpoint / metrics file modification times) and whose output files
exist is skipped; ``force=True`` redoes everything. A step's record is removed before the step
is redone and written again only when it ends, with its outcome, so an interrupted step is
never taken for a finished one. A failing step is recorded with its error and executed
notebook; the steps that need it are skipped, the others still run, and :func:`run_experiment`
reports the failures in its result (the CLI then exits with status 1).

A training step that is redone continues its model's unfinished training (``latest.pth`` of the
same config) unless ``force=True``; otherwise, and always with ``force=True``, the model's
earlier outputs (its work dir, the executed notebooks and records of its training and test) are
moved to ``OUT/superseded/<UTC time of the run>/``, never deleted. One run at a time uses an
output folder: ``run_experiment`` holds an exclusive lock on ``OUT/.lock`` while it runs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from drcnn.analysis import launchers, provenance, study
from drcnn.analysis.launchers import LauncherSpec
from drcnn.analysis.seeds import seed_run
from drcnn.config import reject_interpolations
from drcnn.engine.distributed import AUTO_DEVICE, DEVICE_CHOICES, device_kind, device_name
from drcnn.engine.thread_share import ThreadShare
from drcnn.errors import DrcnnError
from drcnn.io import FolderLock, atomic_write_text

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"
STEP_KINDS = ("train", "test", "sensitivity", "ap_table", "report")  # a spec's steps
# the spec's sensitivity step is two kinds of steps: one per model ("sensitivity"), then this
SUMMARY_KIND = "sensitivity_summary"
STEP_ORDER = ("train", "test", "sensitivity", SUMMARY_KIND, "ap_table", "report")
DATASET_TYPES = ("synthetic", "coco")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a plain folder name (fullmatch)
# what a second run on the same OUT is told (drcnn.io.FolderLock fills in folder and holder)
RUN_BUSY = (
    "{folder}: another drcnn run ({holder}) is using this folder; "
    "wait for it to end or choose another --out"
)
SUPERSEDED_DIR = "superseded"
KERNEL = "python3"


@dataclass
class SyntheticSpec:
    """How to generate the synthetic dataset when it is missing, and what an existing one must
    have been generated with (ensure_synthetic_dataset)."""

    num_train: int = 1000
    num_val: int = 200
    size: int = 256  # image side in pixels
    seed: int = 0
    workers: int | None = None  # None: every CPU


@dataclass
class DatasetSpec:
    type: str = "synthetic"  # synthetic (generated when missing) or coco
    root: str = "data/synthetic"  # relative to the working directory; becomes data.root
    # synthetic only; None: an existing dataset is used as it is, a missing one gets the defaults
    generate: SyntheticSpec | None = None
    overrides: list[str] = field(default_factory=list)  # data.* overrides for every model


@dataclass
class ModelSpec:
    name: str = MISSING  # the model's folder under OUT/models/
    config: str = MISSING  # config file, relative to the working directory
    overrides: list[str] = field(default_factory=list)


@dataclass
class SensitivitySpec:
    models: list[str] | None = None  # default: every model
    low: float = -0.5  # dx, dy offsets from low to high (fractions of box size)
    high: float = 0.5
    steps: int = 11
    scales: list[float] = field(default_factory=lambda: [1.0])
    max_images: int | None = 200
    proposal_images: int | None = 100  # training images of the proposal-IoU histograms


@dataclass
class ContrastSpec:
    """A difference between models, paired by seed: mean(plus models) - mean(minus models)
    (:func:`drcnn.analysis.seeds.paired_contrasts`)."""

    name: str = MISSING
    plus: list[str] = field(default_factory=list)
    minus: list[str] = field(default_factory=list)


@dataclass
class ApTableSpec:
    baseline: str | None = None  # default: the first model with roi_head.type == standard
    include_reported: bool | None = None  # default: yes for a coco dataset
    # besides every model - baseline (AP table and sensitivity summary), e.g. 2 x 2 main effects
    contrasts: list[ContrastSpec] = field(default_factory=list)


@dataclass
class Spec:
    name: str = "experiment"
    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    device: str = "cpu"  # cpu, cuda, cuda:N, or auto (cuda when available): resolved per run
    models: list[ModelSpec] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)  # for every model, before its own
    # empty: one run per model; else one run per model and seed, <model>-seed<k>, train.seed=k
    seeds: list[int] = field(default_factory=list)
    steps: list[str] = field(default_factory=lambda: list(STEP_KINDS))
    sensitivity: SensitivitySpec = field(default_factory=SensitivitySpec)
    ap_table: ApTableSpec = field(default_factory=ApTableSpec)
    launcher: LauncherSpec = field(default_factory=LauncherSpec)  # where steps run (launchers)


@dataclass
class Step:
    """One unit of work: a notebook run (or the report) with its parameters and outputs."""

    id: str
    kind: str
    notebook: str | None
    parameters: dict[str, Any]
    outputs: list[Path]
    inputs: list[Path] = field(default_factory=list)
    needs: list[str] = field(default_factory=list)
    needs_any: bool = False  # run when at least one (not all) of ``needs`` succeeded
    after: list[str] = field(default_factory=list)  # steps that must end first, however they end


def _read_spec(path: Path, chain: tuple[Path, ...] = ()) -> Any:
    """The raw YAML of a spec, merged over the spec its ``base:`` names (a path relative to the
    spec file; the file's own keys win, lists are replaced, not appended)."""
    if not path.is_file():
        raise DrcnnError(f"spec {path}: file not found")
    if path.resolve() in chain:
        raise DrcnnError(f"spec {path}: base: specs name each other in a cycle")
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # YAML syntax errors come in several types
        raise DrcnnError(f"spec {path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    reject_interpolations(OmegaConf.to_container(loaded, resolve=False), f"spec {path}")
    base = loaded.pop("base", None) if isinstance(loaded, DictConfig) else None
    if base is None:
        return loaded
    if not isinstance(base, str):
        raise DrcnnError(f"spec {path}: base: expected the path of another spec")
    return OmegaConf.merge(_read_spec(path.parent / base, (*chain, path.resolve())), loaded)


def load_spec(path: str | Path, launcher: dict[str, Any] | None = None) -> Any:
    """Read and validate a spec file (unknown keys, wrong types, bad names, interpolations:
    one-line errors). A spec may start from another: ``base: other_spec.yaml``. ``launcher``:
    settings that win over the spec's ``launcher:`` section (command-line options)."""
    path = Path(path)
    loaded = _read_spec(path)
    try:
        spec = OmegaConf.merge(OmegaConf.structured(Spec), loaded, {"launcher": launcher or {}})
    except OmegaConfBaseException as exc:
        raise DrcnnError(f"spec {path}: {str(exc).splitlines()[0]}") from exc
    _validate(spec, path)
    return spec


def _check_name(name: str, what: str, path: Path) -> None:
    """Refuse a name that is not a plain folder name (it becomes one under OUT or the runs)."""
    if not NAME_PATTERN.fullmatch(name):
        raise DrcnnError(
            f"spec {path}: {what} {name!r}: use letters, digits, _ . - (a folder name)"
        )


def _validate(spec: Any, path: Path) -> None:
    _check_name(spec.name, "name", path)
    if spec.dataset.type not in DATASET_TYPES:
        raise DrcnnError(f"spec {path}: dataset.type must be one of {DATASET_TYPES}")
    if not spec.models:
        raise DrcnnError(f"spec {path}: models: expected at least one model")
    for index, model in enumerate(spec.models):
        for key in ("name", "config"):
            if OmegaConf.is_missing(model, key):
                raise DrcnnError(f"spec {path}: models[{index}].{key}: missing")
    names = [m.name for m in spec.models]
    for name in names:
        _check_name(name, "model name", path)
    if len(set(names)) != len(names):
        raise DrcnnError(f"spec {path}: models: names must be unique, got {names}")
    for model in spec.models:
        if not Path(model.config).is_file():
            raise DrcnnError(f"spec {path}: model {model.name}: config {model.config} not found")
    if spec.device != AUTO_DEVICE and device_kind(spec.device) is None:
        raise DrcnnError(f"spec {path}: device: expected {DEVICE_CHOICES}, got {spec.device!r}")
    for step in spec.steps:
        if step not in STEP_KINDS:
            raise DrcnnError(f"spec {path}: steps: {step!r} is not one of {STEP_KINDS}")
    unknown = set(spec.sensitivity.models or []) - set(names)
    if unknown:
        raise DrcnnError(f"spec {path}: sensitivity.models: unknown models {sorted(unknown)}")
    if len(set(spec.seeds)) != len(spec.seeds):
        raise DrcnnError(f"spec {path}: seeds: expected distinct seeds, got {list(spec.seeds)}")
    _validate_contrasts(spec.ap_table.contrasts, names, path)
    launchers.validate(spec.launcher, f"spec {path}")


def _validate_contrasts(contrasts: Sequence[Any], names: list[str], path: Path) -> None:
    """Every contrast has a unique name and names spec models on both of its sides."""
    seen = set()
    for index, contrast in enumerate(contrasts):
        where = f"spec {path}: ap_table.contrasts[{index}]"
        if OmegaConf.is_missing(contrast, "name"):
            raise DrcnnError(f"{where}.name: missing")
        if contrast.name in seen:
            raise DrcnnError(f"{where}.name: {contrast.name!r} is used twice")
        seen.add(contrast.name)
        for side in ("plus", "minus"):
            models = list(contrast[side])
            if not models:
                raise DrcnnError(f"{where}.{side}: expected at least one model")
            unknown = sorted(set(models) - set(names))
            if unknown:
                raise DrcnnError(f"{where}.{side}: unknown models {unknown} (models: {names})")


def data_overrides(spec: Any) -> list[str]:
    """The dataset part of every model's overrides: its root (absolute), then the spec's."""
    return [f"data.root={Path(spec.dataset.root).resolve()}", *spec.dataset.overrides]


def model_overrides(spec: Any, model: Any) -> list[str]:
    """The overrides a model trains with: dataset, spec-wide, then its own (which win)."""
    return [*data_overrides(spec), *spec.overrides, *model.overrides]


@dataclass
class Run:
    """One training run of a model: the model itself, or one of its seeds."""

    name: str  # the folder under OUT/models/ and the step names' suffix
    model: Any  # its ModelSpec
    overrides: list[str]


def model_runs(spec: Any, models: Sequence[str] | None = None) -> list[Run]:
    """The runs of ``models`` (default: all), in spec order and, within a model, seed order."""
    runs = []
    for model in spec.models:
        if models is not None and model.name not in models:
            continue
        overrides = model_overrides(spec, model)
        if not spec.seeds:
            runs.append(Run(model.name, model, overrides))
        for seed in spec.seeds:
            # last, so that it wins over a train.seed among the spec's or the model's overrides
            name = seed_run(model.name, seed)
            runs.append(Run(name, model, [*overrides, f"train.seed={seed}"]))
    return runs


def _model_steps(spec: Any, out: Path, kind: str) -> list[Step]:
    """``train-<run>`` or ``test-<run>`` for every run (both run notebooks/train.ipynb)."""
    steps = []
    for run in model_runs(spec):
        model = run.model
        work = out / "models" / run.name
        params = {
            "config": str(Path(model.config).resolve()),
            "work_dir": str(work),
            "overrides": run.overrides,
            "device": spec.device,
            "run_train": kind == "train",
            "run_test": kind == "test",
        }
        if kind == "train":
            steps.append(
                Step(f"train-{run.name}", kind, "train.ipynb", params, [work / "latest.pth"])
            )
            continue
        needs = [f"train-{run.name}"] if "train" in spec.steps else []
        outputs, inputs = [work / "metrics.json"], [work / "latest.pth"]
        steps.append(Step(f"test-{run.name}", kind, "train.ipynb", params, outputs, inputs, needs))
    return steps


def _sensitivity_steps(spec: Any, out: Path) -> list[Step]:
    """``sensitivity-<run>`` for each of the chosen models' runs: its share of the study
    (``sensitivity_part.ipynb``, :func:`drcnn.analysis.study.study_part`), started as soon as
    its training has ended; then ``sensitivity``, the study over those parts
    (``translation_sensitivity.ipynb``: summary, figures, seeds, explorer, proposal IoU)."""
    names = [run.name for run in model_runs(spec, spec.sensitivity.models)]
    checkpoints = {n: str(out / "models" / n / "latest.pth") for n in names}
    parts_dir = out / "sensitivity" / "parts"
    settings = {
        "data_overrides": data_overrides(spec),
        "low": spec.sensitivity.low,
        "high": spec.sensitivity.high,
        "steps": spec.sensitivity.steps,
        "scales": list(spec.sensitivity.scales),
        "max_images": spec.sensitivity.max_images,
        "proposal_images": spec.sensitivity.proposal_images,
        "device": spec.device,
    }
    steps = []
    for name, checkpoint in checkpoints.items():
        params = {"name": name, "checkpoint": checkpoint, "part_dir": str(parts_dir / name)}
        steps.append(
            Step(
                f"sensitivity-{name}",
                "sensitivity",
                "sensitivity_part.ipynb",
                {**params, **settings},
                [parts_dir / name / file for file in study.PART_FILES],
                [Path(checkpoint)],
                [f"train-{name}"] if "train" in spec.steps else [],
            )
        )
    params = {
        "checkpoints": checkpoints,
        "out_dir": str(out / "sensitivity"),
        "parts_dir": str(parts_dir),
        **settings,
        "interactive": False,  # papermill has no frontend: the explorer draws a static example
        "baseline": spec.ap_table.baseline,
        "contrasts": _contrasts(spec),
    }
    outputs = [
        out / "sensitivity" / name
        for name in ("sensitivity.parquet", "summary.csv", "proposal_iou.csv")
    ]
    records = [parts_dir / name / study.PART_RECORD for name in names]
    inputs = [*(Path(p) for p in checkpoints.values()), *records]
    needs = [step.id for step in steps]
    notebook = "translation_sensitivity.ipynb"
    summary = Step("sensitivity", SUMMARY_KIND, notebook, params, outputs, inputs, needs, True)
    return [*steps, summary]


def _contrasts(spec: Any) -> list[dict[str, Any]]:
    """The spec's contrasts as plain data (a notebook parameter)."""
    return OmegaConf.to_container(spec.ap_table.contrasts)


def _ap_table_step(spec: Any, out: Path) -> Step:
    """The AP table over every tested model (published rows for COCO by default), the
    differences between models paired by seed (every model - baseline, the spec's contrasts)
    and the COCO error analysis (per-class AP, error breakdown and its figure)."""
    include = spec.ap_table.include_reported
    params = {
        "exp_dir": str(out),
        "include_reported": spec.dataset.type == "coco" if include is None else include,
        "baseline": spec.ap_table.baseline,
        "contrasts": _contrasts(spec),
    }
    names = [run.name for run in model_runs(spec)]
    inputs = [out / "models" / n / "metrics.json" for n in names]
    needs = [f"test-{n}" for n in names] if "test" in spec.steps else []
    written = ["ap_table.csv", "ap_contrasts.csv", "error_breakdown.csv", "per_class_ap.csv"]
    outputs = [out / "tables" / name for name in [*written, "error_breakdown.png"]]
    return Step("ap_table", "ap_table", "ap_table.ipynb", params, outputs, inputs, needs, True)


def plan(spec: Any, out: Path) -> list[Step]:
    """The spec's steps in execution order (train all, test all, studies, report)."""
    steps: list[Step] = []
    for kind in ("train", "test"):
        if kind in spec.steps:
            steps += _model_steps(spec, out, kind)
    if "sensitivity" in spec.steps:
        steps += _sensitivity_steps(spec, out)
    if "ap_table" in spec.steps:
        steps.append(_ap_table_step(spec, out))
    if "report" in spec.steps:
        report = Step("report", "report", None, {"exp_dir": str(out)}, [out / "report.html"])
        report.after = [step.id for step in steps]  # it reports on whatever they left
        steps.append(report)
    return steps


def fingerprint(step: Step) -> str:
    """Hash of a step's parameters and its inputs' modification times (changes -> redo)."""
    stamps = {str(p): p.stat().st_mtime_ns for p in step.inputs if p.is_file()}
    text = json.dumps({"parameters": step.parameters, "inputs": stamps}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def is_complete(step: Step, out: Path) -> bool:
    """Whether a previous run finished this step with the same fingerprint and outputs."""
    if step.kind == "report":
        return False  # cheap; always rebuilt from whatever the other steps left
    record = provenance.read_record(out, step.id)
    return bool(
        record
        and record.get("status") == "done"
        and record.get("fingerprint") == fingerprint(step)
        and all(p.is_file() for p in step.outputs)
    )


@functools.cache
def ipc_kernel_manager() -> type | None:
    """A kernel manager that talks to the kernel over Unix sockets in a private temp folder.

    The default (TCP on localhost, unencrypted) opens ports and makes ipykernel print a warning
    into every run; Unix sockets need neither. None (papermill's default) off POSIX systems.
    Shutting a kernel down sends no interrupt first (jupyter_client does, to stop a running
    cell): papermill shuts kernels down after the last cell, and an interrupt that lands while
    the kernel still handles a message makes ipykernel print "ERROR | KeyboardInterrupt caught
    in kernel" into the run's output (seen with steps running side by side).
    """
    if os.name != "posix":
        return None
    from jupyter_client.manager import AsyncKernelManager

    class IPCKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._sockets = tempfile.TemporaryDirectory(prefix="drcnn-kernel-")
            self.transport = "ipc"
            self.ip = os.path.join(self._sockets.name, "kernel")

        async def _async_interrupt_kernel(self) -> None:
            if not self.shutting_down:
                await super()._async_interrupt_kernel()

    return IPCKernelManager


def execute_notebook(notebook: str, executed: Path, parameters: dict[str, Any], cwd: Path) -> None:
    """Run ``notebooks/<notebook>`` (or a notebook at an absolute path) with papermill; the
    executed copy goes to ``executed``."""
    import papermill

    source = NOTEBOOK_DIR / notebook
    if not source.is_file():
        raise DrcnnError(
            f"notebook {source} not found (drcnn must be installed from its source tree)"
        )
    executed.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(
        str(source),
        str(executed),
        parameters=parameters,
        kernel_name=KERNEL,
        cwd=str(cwd),
        progress_bar=False,
        log_output=False,
        kernel_manager_class=ipc_kernel_manager(),
    )


def error_line(exc: BaseException) -> str:
    """A one-line description of a step failure (papermill: the cell's exception)."""
    name = getattr(exc, "ename", None) or type(exc).__name__
    value = getattr(exc, "evalue", None) or str(exc)
    return f"{name}: {value}".splitlines()[0][:300]


def _run_step(step: Step, out: Path, resume: Path | None = None) -> None:
    """Execute a step; ``resume``: the checkpoint a training step continues from."""
    if step.kind == "report":
        from drcnn.analysis.report import write_report

        write_report(out)
        return
    parameters = step.parameters
    if "device" in parameters:  # auto: this machine's device (the record keeps "auto")
        parameters = {**parameters, "device": device_name(parameters["device"])}
    if step.kind == "train":
        parameters = {**parameters, "resume": None if resume is None else str(resume)}
    execute_notebook(step.notebook, out / "notebooks" / f"{step.id}.ipynb", parameters, out)


def _ready(step: Step, status: dict[str, str]) -> tuple[bool, dict[str, Any]]:
    """Whether a step can run given the earlier steps' status; restricts multi-model steps to
    the models whose prerequisite succeeded."""
    ok = [n for n in step.needs if status.get(n) in ("done", "skipped")]
    if not step.needs or len(ok) == len(step.needs):
        return True, step.parameters
    if not (step.needs_any and ok):
        return False, step.parameters
    if step.kind == SUMMARY_KIND:  # the study over the parts that were computed
        keep = {n.split("-", 1)[1] for n in ok}
        checkpoints = {k: v for k, v in step.parameters["checkpoints"].items() if k in keep}
        return True, {**step.parameters, "checkpoints": checkpoints}
    return True, step.parameters


@dataclass
class Superseded:
    """Moves outputs a run replaces to ``OUT/superseded/<UTC time of the run>/``, at the same
    place relative to OUT (``models/<run>``, ``notebooks/<step>.ipynb``, ``steps/<step>.json``)."""

    out: Path
    stamp: str = field(
        default_factory=lambda: datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    )
    root: Path | None = None  # made on the first move
    # steps run at once (--jobs) move their outputs from several threads: one root for all
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def move(self, path: Path) -> Path:
        with self.lock:
            if self.root is None:
                base = self.out / SUPERSEDED_DIR / self.stamp
                self.root, count = base, 1
                while self.root.exists():  # an earlier run in the same second
                    count += 1
                    self.root = base.with_name(f"{self.stamp}-{count}")
            target = self.root / path.relative_to(self.out)
            target.parent.mkdir(parents=True, exist_ok=True)
            path.rename(target)
            return target


def run_experiment(
    spec_path: str | Path,
    out: str | Path | None = None,
    force: bool = False,
    echo: Callable[[str], None] = print,
    jobs: int = 1,
    launcher: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Run (or resume) an experiment; returns ``{step id: done | skipped | failed | blocked}``.

    ``out`` defaults to ``experiments/runs/<spec name>``. Output layout: docs/design.md. Another
    run already using ``out`` is a ``DrcnnError``. ``jobs`` > 1 runs that many steps at once,
    each with an equal share of the CPU threads, each as soon as what it needs has ended
    (:func:`_run_when_ready`).
    ``launcher``: settings over the spec's ``launcher:`` section (``drcnn run --launcher ...``);
    with ``type: submitit`` the training, test and sensitivity steps run as cluster jobs
    (:mod:`drcnn.analysis.launchers`).
    """
    if jobs < 1:
        raise DrcnnError(f"--jobs {jobs}: expected at least 1")
    spec = load_spec(spec_path, launcher)
    if spec.launcher.type == "submitit":
        if jobs != 1:
            raise DrcnnError("--jobs: for local runs only (submitit submits every step at once)")
        launchers.check_available(spec.launcher)
    out = experiment_dir(spec, out)
    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out, busy=RUN_BUSY):
        return _run_locked(spec, out, force, echo, jobs)


def experiment_dir(spec: Any, out: str | Path | None) -> Path:
    """The output folder: ``out``, or ``experiments/runs/<spec name>`` (absolute)."""
    return Path(out if out is not None else Path("experiments/runs") / spec.name).resolve()


def experiment_status(spec_path: str | Path, out: str | Path | None = None) -> list[str]:
    """``drcnn run SPEC --status``: one line per step of the spec (done, failed, queued,
    running or not started, with its log), read from OUT without writing to it."""
    spec = load_spec(spec_path)
    out = experiment_dir(spec, out)
    return launchers.status_lines(plan(spec, out), out)


def _run_when_ready(
    steps: list[tuple[int, Step]],
    run_one: Callable[[int, Step], str],
    jobs: int,
    status: dict[str, str],
) -> None:
    """Run the steps, ``jobs`` at a time, each as soon as the steps it needs (and those it comes
    ``after``) have ended, however they ended (:func:`_ready` then decides whether it can run),
    in plan order among those ready; every outcome goes into ``status`` as its step ends. With
    ``--jobs 2`` a model's test starts while another model is still training, instead of
    waiting for all trainings; steps wait for their kernels on threads."""
    if jobs == 1:  # plan order already puts every step after what it needs
        for index, step in steps:
            status[step.id] = run_one(index, step)
        return
    planned = {step.id for _, step in steps}
    waiting, running = list(steps), {}  # running: future -> step id
    with ThreadShare(jobs) as share, ThreadPoolExecutor(max_workers=jobs) as pool:
        while waiting or running:
            for pair in list(waiting):
                ended = [n in status for n in [*pair[1].needs, *pair[1].after] if n in planned]
                if len(running) < jobs and all(ended):
                    waiting.remove(pair)
                    running[pool.submit(run_one, *pair)] = pair[1].id
            if not running:  # plan() never makes steps wait on each other
                raise RuntimeError(f"steps waiting on each other: {[s.id for _, s in waiting]}")
            share.running(len(running))
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                status[running.pop(future)] = future.result()


def _run_locked(
    spec: Any, out: Path, force: bool, echo: Callable[[str], None], jobs: int = 1
) -> dict[str, str]:
    """The body of :func:`run_experiment`, run while holding the folder's lock."""
    atomic_write_text(out / "spec.yaml", OmegaConf.to_yaml(spec))
    if spec.dataset.type == "synthetic" and {"train", "test", "sensitivity"} & set(spec.steps):
        from drcnn.data.synthetic import ensure_synthetic_dataset, synthetic_dataset_exists

        echo(f"[dataset] synthetic data in {spec.dataset.root}")
        generate = spec.dataset.generate
        if generate is not None:
            ensure_synthetic_dataset(spec.dataset.root, **OmegaConf.to_container(generate))
        elif not synthetic_dataset_exists(spec.dataset.root):
            ensure_synthetic_dataset(spec.dataset.root, **asdict(SyntheticSpec()))
    steps = plan(spec, out)
    status: dict[str, str] = {}
    superseded = Superseded(out)
    lines = threading.Lock()
    launcher = None
    if spec.launcher.type == "submitit":
        launcher = launchers.SubmititLauncher(spec.launcher, out, spec.name, force)

    def say(line: str) -> None:  # whole lines, also from the steps of a wave run at once
        with lines:
            echo(line)

    def run_one(index: int, step: Step) -> str:
        prefix = f"[{index}/{len(steps)}] {step.id}"
        return _execute(step, out, force, status, prefix, say, superseded, launcher)

    numbered = list(enumerate(steps, 1))
    if launcher is None:
        _run_when_ready(numbered, run_one, jobs, status)
    else:  # one kind at a time, every job of a kind submitted at once
        for kind in STEP_ORDER:
            wave = [(i, s) for i, s in numbered if s.kind == kind]
            if kind in launchers.SUBMITTED_KINDS:
                status.update(launchers.run_at_once(wave, run_one))
            else:
                _run_when_ready(wave, run_one, 1, status)
    failed = [s for s, v in status.items() if v in ("failed", "blocked")]
    if failed:
        echo(f"{len(failed)} step(s) did not complete: {', '.join(failed)}")
    echo(f"results in {out}")
    return status


def resumable(step: Step) -> Path | None:
    """``latest.pth`` of a training step's work dir when it holds an unfinished (or finished)
    training of exactly the step's config, which the step then continues; else None."""
    from drcnn.config import load_config, to_dict
    from drcnn.engine.checkpoint import load_checkpoint

    checkpoint = Path(step.parameters["work_dir"]) / "latest.pth"
    if not checkpoint.is_file():
        return None
    try:
        cfg = load_config(step.parameters["config"], step.parameters["overrides"])
        stored = load_checkpoint(checkpoint).get("config")
    except DrcnnError:  # no usable config or checkpoint: nothing to continue
        return None
    return checkpoint if stored == to_dict(cfg) else None


def _model_files(out: Path, run: str) -> list[Path]:
    """What a model's run leaves: its work dir, the executed notebooks and records of its
    training and test steps."""
    steps = (f"train-{run}", f"test-{run}")
    return [
        out / "models" / run,
        *(out / "notebooks" / f"{s}.ipynb" for s in steps),
        *(provenance.record_path(out, s) for s in steps),
    ]


def _prepare_training(
    step: Step, out: Path, force: bool, superseded: Superseded, echo: Callable
) -> Path | None:
    """Before a training step runs: the checkpoint to continue from, or None after moving the
    model's earlier outputs aside (``force``, or no training of this config to continue)."""
    resume = None if force else resumable(step)
    if resume is not None:
        return resume
    work = Path(step.parameters["work_dir"])
    if work.is_dir() and any(work.iterdir()):
        for path in _model_files(out, work.name):
            if path.exists():
                superseded.move(path)
        echo(f"earlier outputs moved to {superseded.root}")
    return None


def _execute(
    step: Step,
    out: Path,
    force: bool,
    status: dict[str, str],
    prefix: str,
    echo: Callable,
    superseded: Superseded,
    launcher: launchers.SubmititLauncher | None = None,
) -> str:
    """Run one step (or skip it) and record the outcome; returns its status. With a
    ``launcher`` that submits the step, it runs as a job (or the run waits for its job of an
    earlier run: then the model's outputs are left as they are)."""
    ready, parameters = _ready(step, status)
    if not ready:
        echo(f"{prefix}: blocked (needs {', '.join(step.needs)})")
        return "blocked"
    step = Step(**{**step.__dict__, "parameters": parameters})
    if not force and is_complete(step, out):
        echo(f"{prefix}: skipped (already complete)")
        return "skipped"
    submit = launcher is not None and launcher.submits(step)
    earlier = launcher.earlier_job(step) if submit else None
    resume = None
    if step.kind == "train" and earlier is None:
        resume = _prepare_training(
            step, out, force, superseded, lambda line: echo(f"{prefix}: {line}")
        )
    # invalidate first: if this run is interrupted, the next one must not take the step as done
    provenance.record_path(out, step.id).unlink(missing_ok=True)
    # a training job runs torchrun, not the notebook: its log is the job's
    in_notebook = step.notebook and not (submit and step.kind == "train")
    notebook = str(out / "notebooks" / f"{step.id}.ipynb") if in_notebook else None
    record = {
        "step_id": step.id,
        "parameters": step.parameters,
        "notebook": notebook,
        "git_commit": provenance.git_commit(),
        "started": provenance.now_utc(),
    }
    if resume is not None:
        record["resumed_from"] = str(resume)
    # a line before each step too: a training step can run for many minutes without output
    notes = [f"continuing {resume}"] if resume is not None else []
    notes += [f"notebook saved as it goes: {notebook}"] if notebook else []
    echo(f"{prefix}: running" + (f" ({'; '.join(notes)})" if notes else ""))
    sys.stdout.flush()
    start = time.perf_counter()
    where = notebook  # what to look at if the step fails
    try:
        if submit:
            job = launcher.start(
                step, resume, earlier, fingerprint(step), lambda line: echo(f"{prefix}: {line}")
            )
            record.update(job_id=job["job_id"], log=job["log"])
            where = notebook or job["log"]
            launcher.wait(job)
        else:
            _run_step(step, out, resume)
        missing = [str(p) for p in step.outputs if not p.is_file()]
        if missing:
            raise DrcnnError(f"step finished without writing {', '.join(missing)}")
    except Exception as exc:  # a failing step must not stop the others
        record.update(status="failed", error=error_line(exc))
        echo(f"{prefix}: FAILED ({record['error']}); see {where or out}")
    else:
        record.update(status="done", fingerprint=fingerprint(step))
        echo(f"{prefix}: done in {time.perf_counter() - start:.1f} s")
    record.update(finished=provenance.now_utc(), seconds=round(time.perf_counter() - start, 1))
    provenance.write_record(out, step.id, record)
    return record["status"]
