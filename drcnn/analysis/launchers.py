"""Where ``drcnn run`` executes its steps: in this process (default) or as cluster jobs.

With ``launcher.type: submitit`` (spec section ``launcher:`` or ``drcnn run --launcher
submitit``) every training, test and sensitivity step becomes a job submitted through
`submitit <https://github.com/facebookincubator/submitit>`_: a SLURM job (``cluster: slurm``)
or a process of submitit's local executor on this machine (``cluster: local``; tests, or a dry
run). A training job holds ``nodes`` nodes with ``gpus_per_node`` GPUs each and starts
``torchrun`` on every node (one process per GPU, ``drcnn train``); a test or sensitivity job
holds one GPU of one node and executes its notebook as a local run would. The AP table and the
report, cheap, run in the ``drcnn run`` process once their inputs are complete.

Each submission is recorded in ``OUT/jobs/<step>.json`` (job id, log paths, the step's
fingerprint, the ids of earlier jobs of the step); submitit keeps its files and the job's logs
in ``OUT/jobs/<job id>/``. ``drcnn run`` waits for its jobs; a run started again (after the
``drcnn run`` process, a node or a job died) skips the complete steps as a local run does,
waits for a job of the same step and fingerprint that is still queued or running, or that
ended well (instead of submitting it twice), and submits the others again; a training job
continues its model's ``latest.pth``. :func:`status_lines` (``drcnn run SPEC --status``) shows
each step's state.

submitit is an optional dependency (``pip install 'drcnn[slurm]'``), imported only when a
submitit launcher is used.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from drcnn.errors import DrcnnError
from drcnn.io import atomic_write_text

if TYPE_CHECKING:  # runner imports this module
    from drcnn.analysis.runner import Step

LAUNCHER_TYPES = ("local", "submitit")
CLUSTERS = ("slurm", "local")  # submitit's executors drcnn uses
# the steps that need the accelerators (the sensitivity summary's explorer loads the models)
SUBMITTED_KINDS = ("train", "test", "sensitivity", "sensitivity_summary")
JOBS_DIR = "jobs"
# SLURM states (sacct) of a job that has not ended (submitit's InfoWatcher.is_done list)
QUEUED_STATES = ("PENDING", "REQUEUED", "READY", "UNKNOWN")
RUNNING_STATES = ("RUNNING", "COMPLETING", "PREEMPTED")
POLL_S = 2.0  # how often a waiting run looks at its jobs (submitit throttles its sacct calls)


@dataclass
class LauncherSpec:
    """The spec's ``launcher:`` section (``drcnn run --launcher ...`` options override it)."""

    type: str = "local"  # local: steps run in the drcnn run process; submitit: as jobs
    cluster: str = "slurm"  # submitit executor: slurm, or local (this machine, no scheduler)
    partition: str | None = None  # sbatch --partition
    account: str | None = None  # sbatch --account
    nodes: int = 1  # nodes of each training job (tests and studies: one)
    gpus_per_node: int = 1  # torchrun processes per node (0: one CPU process)
    cpus_per_task: int | None = None  # CPUs per node (data loading workers + 1)
    time: int = 4320  # minutes a job may run (sbatch --time)
    sbatch: dict[str, str] = field(default_factory=dict)  # more sbatch options, e.g. qos: high
    setup: list[str] = field(default_factory=list)  # shell lines run before each SLURM job


def validate(launcher: Any, where: str) -> None:
    """One-line errors for launcher settings no executor could use."""
    if launcher.type not in LAUNCHER_TYPES:
        raise DrcnnError(f"{where}: launcher.type must be one of {LAUNCHER_TYPES}")
    if launcher.cluster not in CLUSTERS:
        raise DrcnnError(f"{where}: launcher.cluster must be one of {CLUSTERS}")
    for key, low in (("nodes", 1), ("gpus_per_node", 0), ("time", 1), ("cpus_per_task", 1)):
        value = launcher[key]
        if value is not None and value < low:
            raise DrcnnError(f"{where}: launcher.{key}: expected at least {low}, got {value}")
    if launcher.cluster == "local" and launcher.nodes > 1:
        raise DrcnnError(f"{where}: launcher.nodes: the local cluster has one node")


def parse_sbatch(options: list[str]) -> dict[str, str]:
    """``["qos=high", "constraint=a100"]`` (``--sbatch KEY=VALUE``) -> ``{"qos": "high", ...}``."""
    parsed = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key:
            raise DrcnnError(f"--sbatch {option}: expected KEY=VALUE, e.g. qos=high")
        parsed[key] = value
    return parsed


def require_submitit() -> ModuleType:
    """The submitit module, or a one-line error saying how to install it."""
    try:
        import submitit
    except ImportError as exc:
        raise DrcnnError(
            "launcher submitit: the submitit package is not installed "
            "(pip install 'drcnn[slurm]' or pip install submitit)"
        ) from exc
    return submitit


def check_available(settings: Any) -> ModuleType:
    """Before a run writes anything: submitit (installed) and, for SLURM, ``sbatch``."""
    submitit = require_submitit()
    if settings.cluster == "slurm" and shutil.which("sbatch") is None:
        raise DrcnnError(
            "launcher.cluster slurm: sbatch not found on this machine "
            "(run drcnn run on a SLURM login node, or use launcher.cluster local)"
        )
    return submitit


def job_record_path(out: Path, step_id: str) -> Path:
    return out / JOBS_DIR / f"{step_id}.json"


def read_job_record(out: Path, step_id: str) -> dict[str, Any] | None:
    path = job_record_path(out, step_id)
    return json.loads(path.read_text()) if path.is_file() else None


# ------------------------------------------------------------------------------ the jobs
def torchrun_command(
    parameters: dict[str, Any], resume: str | None, gpus: int, env: Any
) -> list[str]:
    """``torchrun ... -m drcnn train`` for this node of a training job: ``gpus`` processes
    (one without GPUs); ``env``: submitit's JobEnvironment (one task per node, so the task's
    rank is the node's rank)."""
    nodes = env.num_nodes
    if nodes == 1:  # a free port of this node: jobs sharing a node don't collide
        rendezvous = ["--standalone"]
    else:
        port = 29500 + int("".join(c for c in str(env.job_id) if c.isdigit()) or 0) % 10000
        rendezvous = [
            f"--nnodes={nodes}",
            f"--node_rank={env.global_rank}",
            f"--master_addr={env.hostnames[0]}",
            f"--master_port={port}",
        ]
    command = [sys.executable, "-m", "torch.distributed.run", *rendezvous]
    command += [f"--nproc_per_node={max(gpus, 1)}", "-m", "drcnn", "train"]
    command += [parameters["config"], "--work-dir", parameters["work_dir"]]
    command += ["--device", parameters["device"]]
    if parameters["overrides"]:
        command += ["--set", *parameters["overrides"]]
    if resume is not None:
        command += ["--resume", resume]
    return command


def _run_torchrun(command: list[str]) -> None:
    """Run torchrun in its own process group and end the whole group if this task is stopped
    (scancel, time limit), so no training process outlives its job."""
    process = subprocess.Popen(command, start_new_session=True)
    try:
        code = process.wait()
    except BaseException:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait()
        raise
    if code != 0:
        raise DrcnnError(f"torchrun exited with status {code} (its output is in this job's log)")


class StepJob:
    """What a job runs on its node(s), the callable submitit pickles: the step, as a local run
    would, but a training through torchrun.

    It returns ``{"error": None}`` or the failure's one-line description, so that the run reads
    why a step failed instead of a pickled traceback. Its :meth:`checkpoint` makes the job
    requeueable: submitit calls it when SLURM preempts the job or its time limit nears, and
    requeues the job with what it returns.
    """

    def __call__(self, step: Step, out: Path, resume: str | None, gpus: int) -> dict[str, Any]:
        from drcnn.analysis import runner

        try:
            if step.kind == "train":
                import submitit

                env = submitit.JobEnvironment()
                command = torchrun_command(step.parameters, resume, gpus, env)
                print(" ".join(command), flush=True)
                _run_torchrun(command)
            else:
                runner.execute_notebook(
                    step.notebook, out / "notebooks" / f"{step.id}.ipynb", step.parameters, out
                )
        except Exception as exc:
            return {"error": runner.error_line(exc)}
        return {"error": None}

    def checkpoint(self, step: Step, out: Path, resume: str | None, gpus: int) -> Any:
        """The requeued job's submission: the same step; a training continues from the
        ``latest.pth`` its job has saved so far (the job's own: the run moved any other aside
        before submitting it)."""
        from submitit.helpers import DelayedSubmission

        latest = Path(step.parameters["work_dir"]) / "latest.pth"
        if step.kind == "train" and latest.is_file():
            resume = str(latest)
        return DelayedSubmission(self, step, out, resume, gpus)


# ------------------------------------------------------------------------ job states
def _job(entry: dict[str, Any]) -> Any:
    """submitit's handle of a recorded job (no process handle for a local one)."""
    submitit = require_submitit()
    tasks = list(range(entry["tasks"]))
    if entry["cluster"] == "slurm":
        return submitit.SlurmJob(entry["folder"], entry["job_id"], tasks)
    return submitit.LocalJob(entry["folder"], entry["job_id"], tasks)


def _task_jobs(job: Any) -> list[Any]:
    return list(job._sub_jobs) or [job]  # a multi-node job has one sub-job per task


def job_outcome(entry: dict[str, Any], mode: str = "force") -> tuple[str, str | None]:
    """``(state, error)`` of a recorded job: ``queued``/``running`` (error None), ``succeeded``
    (None) or ``failed`` (why). A job has ended when every task left its result, or, without
    results, when the scheduler (a local job: its process) says it is gone. ``mode``: how
    submitit's SLURM watcher asks sacct (``standard``: throttled, while a run waits)."""
    from submitit.core.utils import pickle_load

    job = _job(entry)
    tasks = _task_jobs(job)
    if all(t.paths.result_pickle.is_file() for t in tasks):
        for task in tasks:
            outcome, result = pickle_load(task.paths.result_pickle)
            if outcome != "success":  # StepJob itself failed (e.g. drcnn not importable)
                lines = [line for line in str(result).splitlines() if line.strip()]
                return "failed", f"job {entry['job_id']}: {lines[-1] if lines else 'error'}"
            if result["error"] is not None:
                return "failed", result["error"]
        return "succeeded", None
    if entry["cluster"] == "local":
        state = "RUNNING" if _process_alive(int(entry["job_id"])) else "ENDED"
    else:
        state = job.watcher.get_state(entry["job_id"], mode=mode).split()[0].upper()
    if state in QUEUED_STATES:
        return "queued", None
    if state in RUNNING_STATES:
        return "running", None
    return "failed", f"job {entry['job_id']} ended without a result ({state})"


def _process_alive(pid: int) -> bool:
    """Whether a local job's controller process still runs (a zombie counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def describe(entry: dict[str, Any]) -> str:
    """``job 123 on slurm, log OUT/jobs/123/123_0_log.out``."""
    return f"job {entry['job_id']} on {entry['cluster']}, log {entry['log']}"


# --------------------------------------------------------------------- the launcher
class SubmititLauncher:
    """Runs a spec's training, test and sensitivity steps as submitit jobs and waits for them.

    Used by :func:`drcnn.analysis.runner.run_experiment` in place of executing those steps in
    its own process; the runner's skip / resume / supersede rules stay as they are.
    """

    def __init__(self, settings: Any, out: Path, name: str, force: bool) -> None:
        self.submitit = check_available(settings)
        self.settings = settings
        self.out = out
        self.name = name
        self.force = force

    def submits(self, step: Step) -> bool:
        return step.kind in SUBMITTED_KINDS

    def earlier_job(self, step: Step) -> dict[str, Any] | None:
        """The recorded job of ``step`` that the run must not submit again: one that is
        still queued or running, or (without --force) one that ended well."""
        entry = read_job_record(self.out, step.id)
        if entry is None:
            return None
        state, _ = job_outcome(entry)
        ended_well = state == "succeeded" and all(p.is_file() for p in step.outputs)
        if state in ("queued", "running") or (ended_well and not self.force):
            return entry
        return None

    def _executor(self, step: Step) -> tuple[Any, int]:
        """An executor for ``step`` and its GPUs per node: a training gets every node and GPU
        of the settings, the other steps one GPU (none without GPUs) of one node."""
        s = self.settings
        train = step.kind == "train"
        gpus = s.gpus_per_node if train else min(s.gpus_per_node, 1)
        executor = self.submitit.AutoExecutor(folder=self.out / JOBS_DIR / "%j", cluster=s.cluster)
        executor.update_parameters(
            name=f"drcnn-{self.name}-{step.id}",
            timeout_min=s.time,
            nodes=s.nodes if train else 1,
            tasks_per_node=1,
            gpus_per_node=gpus,
            cpus_per_task=s.cpus_per_task,
            stderr_to_stdout=True,  # one log per node: the step's output in order
            slurm_partition=s.partition,
            slurm_account=s.account,
            slurm_additional_parameters=dict(s.sbatch),
            slurm_setup=list(s.setup),
        )
        return executor, gpus

    def _submit(self, step: Step, resume: Path | None, fingerprint: str) -> dict[str, Any]:
        """Submit ``step`` and record the job in ``OUT/jobs/<step>.json``."""
        from drcnn.analysis import provenance

        earlier = read_job_record(self.out, step.id)
        executor, gpus = self._executor(step)
        job = executor.submit(
            StepJob(), step, self.out, None if resume is None else str(resume), gpus
        )
        first = _task_jobs(job)[0]
        entry = {
            "step_id": step.id,
            "job_id": str(job.job_id),
            "cluster": self.settings.cluster,
            "folder": str(first.paths.folder),
            "tasks": len(_task_jobs(job)),
            "log": str(first.paths.stdout),  # of the first node
            "fingerprint": fingerprint,
            "submitted": provenance.now_utc(),
            "earlier_jobs": []
            if earlier is None
            else [*earlier["earlier_jobs"], earlier["job_id"]],
        }
        path = job_record_path(self.out, step.id)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(entry, indent=2))
        return entry

    def start(
        self,
        step: Step,
        resume: Path | None,
        earlier: dict[str, Any] | None,
        fingerprint: str,
        echo: Callable[[str], None],
    ) -> dict[str, Any]:
        """Submit ``step``, or take ``earlier``, its job from a previous run (a job of other
        inputs, or any with --force, that has not ended is an error); returns the job's
        record."""
        if earlier is not None and (self.force or earlier["fingerprint"] != fingerprint):
            raise DrcnnError(
                f"{describe(earlier)}: a job of this step with other inputs (or before --force) "
                f"has not ended; wait for it or cancel it (scancel {earlier['job_id']})"
            )
        if earlier is not None:
            echo(f"waiting for the earlier {describe(earlier)}")
            return earlier
        entry = self._submit(step, resume, fingerprint)
        echo(f"submitted: {describe(entry)}")
        return entry

    @staticmethod
    def wait(entry: dict[str, Any]) -> None:
        """Wait until the job ends; a ``DrcnnError`` saying why if it failed."""
        while True:
            state, error = job_outcome(entry, mode="standard")
            if state in ("succeeded", "failed"):
                break
            time.sleep(POLL_S)
        if error is not None:
            raise DrcnnError(error)


def run_at_once(
    steps: list[tuple[int, Step]], run_one: Callable[[int, Step], str]
) -> dict[str, str]:
    """``run_one`` (submit a step's job and wait for it) for every step at once, on daemon
    threads: Ctrl-C ends ``drcnn run`` at once instead of waiting for the jobs, which go on (on
    SLURM) and which the next run waits for. ``{step id: status}`` in the steps' order."""
    results: dict[str, str | BaseException] = {}

    def target(index: int, step: Step) -> None:
        try:
            results[step.id] = run_one(index, step)
        except BaseException as exc:  # raised again in the calling thread
            results[step.id] = exc

    threads = [threading.Thread(target=target, args=pair, daemon=True) for pair in steps]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(timeout=POLL_S)  # a timeout: KeyboardInterrupt reaches this thread
    for result in results.values():
        if isinstance(result, BaseException):
            raise result
    return {step.id: results[step.id] for _, step in steps}


def status_lines(steps: list[Step], out: Path) -> list[str]:
    """One line per step: done / failed / queued / running / not started, with the job's log
    (submitit) or the executed notebook (local) where there is one."""
    from drcnn.analysis import provenance, runner

    lines = []
    for step in steps:
        record = provenance.read_record(out, step.id) or {}
        entry = read_job_record(out, step.id)
        where = f"; {describe(entry)}" if entry else ""
        if not where and record.get("notebook"):
            where = f"; notebook {record['notebook']}"
        status = record.get("status")
        if status == "done":
            current = step.kind == "report" or runner.is_complete(step, out)  # report: rebuilt
            stale = "" if current else ", outdated: will be redone"
            lines.append(f"{step.id}: done{stale}{where}")
        elif status == "failed":
            lines.append(f"{step.id}: failed ({record.get('error')}){where}")
        elif entry is not None:
            state, error = job_outcome(entry)
            note = {"succeeded": "job ended well, recorded by the next drcnn run"}.get(state, error)
            state = {"succeeded": "done"}.get(state, state)
            lines.append(f"{step.id}: {state}" + (f" ({note})" if note else "") + where)
        else:
            lines.append(f"{step.id}: not started")
    return lines
