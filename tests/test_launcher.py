"""``drcnn run --launcher submitit``: steps as cluster jobs (submitit's local executor here, no
SLURM), job records, resubmission after a killed job, ``--status``, and the refusals.

The end-to-end test is the only heavy one (four tiny jobs, each a few processes); the others
check the pieces (settings, torchrun command, waiting for an earlier job) without a job.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import yaml
from hostile import expect_refusal
from test_runner import DECOUPLED, FASTER, TINY, FakeExecutor
from test_runner import write_spec as runner_spec

from drcnn import cli
from drcnn.analysis import launchers, runner
from drcnn.errors import DrcnnError

LOCAL_JOBS = {"type": "submitit", "cluster": "local", "gpus_per_node": 0, "time": 30}


def write_spec(path: Path, root: Path, launcher: dict | None = None) -> Path:
    """Two tiny models, trained and tested as local submitit jobs, then the report."""
    spec = {
        "name": "jobs",
        "dataset": {"type": "synthetic", "root": str(root)},
        "overrides": TINY,
        "models": [{"name": "faster", "config": FASTER}, {"name": "dec", "config": DECOUPLED}],
        "steps": ["train", "test", "report"],
        "launcher": LOCAL_JOBS if launcher is None else launcher,
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def kill_job(job_id: str) -> None:
    """End a local job as a failing node would: its controller and every process below it at
    once (stopped first, so that none starts a child while the others are killed)."""
    stopped: dict[int, psutil.Process] = {}
    root = psutil.Process(int(job_id))
    while True:
        tree = [root, *root.children(recursive=True)]
        new = [p for p in tree if p.pid not in stopped]
        if not new:
            break
        for process in new:
            process.send_signal(signal.SIGSTOP)
            stopped[process.pid] = process
    for process in stopped.values():
        process.send_signal(signal.SIGKILL)


def wait_for(path: Path, timeout_s: float = 120.0) -> None:
    start = time.monotonic()
    while not path.is_file():
        assert time.monotonic() - start < timeout_s, f"{path} did not appear"
        time.sleep(0.2)


def job(out: Path, step: str) -> dict:
    return json.loads((out / "jobs" / f"{step}.json").read_text())


def test_two_models_run_as_jobs_a_killed_job_is_resubmitted_finished_ones_are_not(
    tmp_path, synthetic_root, capsys
):
    spec, out = write_spec(tmp_path / "spec.yaml", synthetic_root), tmp_path / "out"
    argv = ["run", str(spec), "--out", str(out)]
    codes = []
    first = threading.Thread(target=lambda: codes.append(cli.main(argv)))
    first.start()
    wait_for(out / "jobs" / "train-faster.json")
    killed = job(out, "train-faster")
    kill_job(killed["job_id"])
    first.join()
    printed = capsys.readouterr().out
    # the killed training fails with its job's log; the other model goes on to its test
    assert codes == [1]
    assert f"train-faster: FAILED (DrcnnError: job {killed['job_id']} ended without" in printed
    assert killed["log"] in printed
    assert "train-dec: done" in printed and "test-dec: done" in printed
    assert "test-faster: blocked" in printed
    failed = json.loads((out / "steps" / "train-faster.json").read_text())
    assert (failed["job_id"], failed["log"]) == (killed["job_id"], killed["log"])
    report = (out / "report.html").read_text()  # paths unescaped in HTML
    assert f"Step train-faster FAILED: DrcnnError: job {killed['job_id']} ended" in report
    assert f"(job log: {killed['log']})" in report
    dec_train, dec_test = job(out, "train-dec"), job(out, "test-dec")
    # the training ran torchrun (its command is the first line of its log)
    assert "-m torch.distributed.run --standalone --nproc_per_node=1 -m drcnn train" in (
        Path(dec_train["log"]).read_text()
    )
    record = json.loads((out / "steps" / "train-dec.json").read_text())
    assert record["job_id"] == dec_train["job_id"] and record["notebook"] is None
    assert (out / "notebooks" / "test-dec.ipynb").is_file()  # a test job runs the notebook

    assert cli.main(["run", str(spec), "--out", str(out), "--status"]) == 0
    status = capsys.readouterr().out.splitlines()
    assert status[0].startswith(f"train-faster: failed (DrcnnError: job {killed['job_id']}")
    assert status[0].endswith(f"; {launchers.describe(killed)}")
    assert status[1] == f"train-dec: done; {launchers.describe(dec_train)}"
    assert status[2] == "test-faster: not started"

    # again: only the killed training is submitted again, then its test
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "train-dec: skipped" in printed and "test-dec: skipped" in printed
    assert "train-faster: done" in printed and "test-faster: done" in printed
    again = job(out, "train-faster")
    assert again["job_id"] != killed["job_id"] and again["earlier_jobs"] == [killed["job_id"]]
    assert job(out, "train-dec") == dec_train and job(out, "test-dec") == dec_test
    for name in ("faster", "dec"):
        assert (out / "models" / name / "metrics.json").is_file()
    assert cli.main(["run", str(spec), "--out", str(out), "--status"]) == 0
    assert capsys.readouterr().out.count(": done") == 5
    # a job that ended well while no drcnn run recorded it (say the run was stopped) is taken
    # as it is, not submitted again
    (out / "steps" / "train-dec.json").unlink()
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"train-dec: waiting for the earlier {launchers.describe(dec_train)}" in printed
    assert "train-dec: done" in printed and "test-dec: skipped" in printed
    assert job(out, "train-dec") == dec_train


@pytest.fixture
def planned(tmp_path, synthetic_root):
    """A spec with local jobs, its output folder and its first training step."""
    spec = runner.load_spec(write_spec(tmp_path / "spec.yaml", synthetic_root))
    out = tmp_path / "out"
    return spec, out, runner.plan(spec, out)[0]


def test_a_run_waits_for_a_job_still_running_instead_of_submitting_it_again(planned):
    spec, out, step = planned
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        entry = {
            "step_id": step.id,
            "job_id": str(process.pid),
            "cluster": "local",
            "folder": str(out / "jobs" / str(process.pid)),
            "tasks": 1,
            "log": str(out / "jobs" / str(process.pid) / "log.out"),
            "fingerprint": runner.fingerprint(step),
            "earlier_jobs": [],
        }
        path = launchers.job_record_path(out, step.id)
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(entry))
        launcher = launchers.SubmititLauncher(spec.launcher, out, spec.name, force=False)
        assert launcher.earlier_job(step) == entry
        lines = launchers.status_lines([step], out)
        assert lines == [f"{step.id}: running; {launchers.describe(entry)}"]
        # a job of other inputs (or --force) is not waited for, nor submitted beside it
        other = {**entry, "fingerprint": "another"}
        with pytest.raises(DrcnnError, match=f"scancel {process.pid}"):
            launcher.start(step, None, other, runner.fingerprint(step), print)
    finally:
        process.kill()
        process.wait()
    assert launchers.job_outcome(entry) == (
        "failed",
        f"job {process.pid} ended without a result (ENDED)",
    )
    assert launcher.earlier_job(step) is None  # ended without a result: submitted again


def test_command_line_settings_win_over_the_spec(tmp_path, synthetic_root):
    launcher = {**LOCAL_JOBS, "partition": "gpu", "sbatch": {"qos": "low", "mem": "64G"}}
    path = write_spec(tmp_path / "spec.yaml", synthetic_root, launcher)
    args = cli.build_parser().parse_args(
        ["run", str(path), "--partition", "big", "--sbatch", "qos=high", "--time", "60"]
    )
    from drcnn.commands.run import launcher_settings

    settings = launcher_settings(args)
    assert settings == {"partition": "big", "time": 60, "sbatch": {"qos": "high"}}
    spec = runner.load_spec(path, settings)
    assert (spec.launcher.partition, spec.launcher.time) == ("big", 60)
    assert dict(spec.launcher.sbatch) == {"qos": "high", "mem": "64G"}
    assert spec.launcher.cluster == "local"  # not given on the command line: the spec's


def test_torchrun_command_of_one_node_of_a_multi_node_training(planned):
    _, out, step = planned
    env = SimpleNamespace(num_nodes=2, global_rank=1, hostnames=["n7", "n8"], job_id="4242")
    command = launchers.torchrun_command(step.parameters, "/ckpt/latest.pth", 8, env)
    assert command[:2] == [sys.executable, "-m"]
    assert command[2:9] == [
        "torch.distributed.run",
        "--nnodes=2",
        "--node_rank=1",
        "--master_addr=n7",
        f"--master_port={29500 + 4242}",
        "--nproc_per_node=8",
        "-m",
    ]
    assert command[9:] == [
        "drcnn",
        "train",
        step.parameters["config"],
        "--work-dir",
        str(out / "models" / "faster"),
        "--device",
        "cpu",
        "--set",
        *step.parameters["overrides"],
        "--resume",
        "/ckpt/latest.pth",
    ]


def test_without_submitit_the_launcher_is_a_one_line_error(
    tmp_path, synthetic_root, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if it were not installed
    spec, out = write_spec(tmp_path / "spec.yaml", synthetic_root), tmp_path / "out"
    err = expect_refusal(["run", spec, "--out", out], capsys, watch=[tmp_path, synthetic_root])
    assert err == (
        "error: launcher submitit: the submitit package is not installed "
        "(pip install 'drcnn[slurm]' or pip install submitit)"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--sbatch", "qos"], "--sbatch qos: expected KEY=VALUE, e.g. qos=high"),
        (["--nodes", "0"], "launcher.nodes: expected at least 1, got 0"),
        (["--nodes", "2"], "launcher.nodes: the local cluster has one node"),
        (["--cluster", "slurm"], "launcher.cluster slurm: sbatch not found on this machine"),
        (["--jobs", "2"], "--jobs: for local runs only (submitit submits every step at once)"),
    ],
)
def test_bad_launcher_settings_are_refused(
    tmp_path, synthetic_root, capsys, monkeypatch, options, message
):
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no sbatch here (nor anywhere)
    spec, out = write_spec(tmp_path / "spec.yaml", synthetic_root), tmp_path / "out"
    argv = ["run", spec, "--out", out, *options]
    err = expect_refusal(argv, capsys, watch=[tmp_path, synthetic_root])
    assert message in err
    assert not out.exists()


def test_a_requeued_training_job_continues_its_latest_checkpoint(planned):
    _, out, step = planned
    job = launchers.StepJob()
    again = job.checkpoint(step, out, None, 8)  # preempted before its first checkpoint
    assert (again.function, again.args) == (job, (step, out, None, 8))
    latest = Path(step.parameters["work_dir"]) / "latest.pth"
    latest.parent.mkdir(parents=True)
    latest.write_bytes(b"")
    assert job.checkpoint(step, out, None, 8).args == (step, out, str(latest), 8)


def test_a_local_run_does_not_import_submitit(tmp_path, synthetic_root):
    """The CPU quickstart path (CLI, spec, plan, a local run's launcher check) leaves submitit
    unimported: it is an optional extra, imported when a submitit launcher is used."""
    spec = write_spec(tmp_path / "spec.yaml", synthetic_root, {"type": "local"})
    code = (
        "import sys\n"
        "from drcnn import cli\n"
        "from drcnn.analysis import runner\n"
        f"args = cli.build_parser().parse_args(['run', {str(spec)!r}])\n"
        f"spec = runner.load_spec({str(spec)!r})\n"
        f"runner.plan(spec, runner.experiment_dir(spec, {str(tmp_path / 'out')!r}))\n"
        "assert spec.launcher.type == 'local'\n"
        "assert 'submitit' not in sys.modules, 'submitit imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture
def python_ctrl_c():
    """Python's own SIGINT handler (KeyboardInterrupt), as in a terminal: pytest-xdist's
    workers ignore SIGINT, and the test of Ctrl-C must not depend on how it is run."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_ends_the_run_at_once_while_its_jobs_go_on(python_ctrl_c):
    """``drcnn run`` waits for its jobs on threads; Ctrl-C must end it at once, not after the
    jobs (days on a cluster). The next run waits for the jobs that went on."""
    release = threading.Event()
    threading.Timer(8.0, release.set).start()  # a bounded "job" should Ctrl-C not stop the wait

    def run_one(index: int, step: SimpleNamespace) -> str:  # a job that does not end soon
        release.wait()
        return "done"

    steps = [(1, SimpleNamespace(id="train-a")), (2, SimpleNamespace(id="train-b"))]
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        launchers.run_at_once(steps, run_one)
    assert time.monotonic() - start < 4.0
    release.set()
    # without Ctrl-C: every step's status, in the steps' order; a step's crash is raised
    assert launchers.run_at_once(steps, run_one) == {"train-a": "done", "train-b": "done"}
    with pytest.raises(ZeroDivisionError):
        launchers.run_at_once(steps, lambda index, step: str(1 / (index - 1)))


def test_status_of_a_local_run_reads_the_records_and_writes_nothing(
    tmp_path, synthetic_root, monkeypatch, capsys
):
    monkeypatch.setattr(runner, "execute_notebook", FakeExecutor())  # no real notebooks
    spec = runner_spec(tmp_path / "spec.yaml", synthetic_root, ["train", "test", "report"])
    out = tmp_path / "out"
    status = ["run", str(spec), "--out", str(out), "--status"]
    assert cli.main(status) == 0
    steps = ["train-faster", "train-broken", "test-faster", "test-broken", "report"]
    assert capsys.readouterr().out.splitlines() == [f"{s}: not started" for s in steps]
    assert not out.exists()
    assert cli.main(["run", str(spec), "--out", str(out)]) == 1
    record = out / "steps" / "test-faster.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "fingerprint": "old"}))
    capsys.readouterr()
    assert cli.main(status) == 0
    lines = capsys.readouterr().out.splitlines()
    notebooks = out / "notebooks"
    assert lines[0] == f"train-faster: done; notebook {notebooks / 'train-faster.ipynb'}"
    assert lines[1] == (
        "train-broken: failed (DrcnnError: override train.no_such_key: unknown config key); "
        f"notebook {notebooks / 'train-broken.ipynb'}"
    )
    assert lines[2] == (
        f"test-faster: done, outdated: will be redone; notebook {notebooks / 'test-faster.ipynb'}"
    )
    assert lines[3:] == ["test-broken: not started", "report: done"]


@pytest.mark.parametrize(
    ("sacct", "state"),
    [
        ("PENDING", ("queued", None)),
        ("REQUEUED", ("queued", None)),
        ("RUNNING", ("running", None)),
        ("CANCELLED by 1234", ("failed", "job 77 ended without a result (CANCELLED)")),
        ("NODE_FAIL", ("failed", "job 77 ended without a result (NODE_FAIL)")),
        ("TIMEOUT", ("failed", "job 77 ended without a result (TIMEOUT)")),
    ],
)
def test_the_state_of_a_slurm_job_without_result_is_sacct_s(tmp_path, monkeypatch, sacct, state):
    import submitit

    asked = []

    def get_state(job_id: str, mode: str = "standard") -> str:
        asked.append((job_id, mode))
        return sacct

    monkeypatch.setattr(submitit.SlurmJob.watcher, "get_state", get_state)
    entry = {"job_id": "77", "cluster": "slurm", "folder": str(tmp_path), "tasks": 2}
    assert launchers.job_outcome(entry) == state
    assert asked == [("77", "force")]
