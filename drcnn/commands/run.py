"""``drcnn run``: execute (or resume) an experiment spec: train, test, studies, report."""

from __future__ import annotations

import argparse
import os

# ``--jobs auto``'s most steps at once. A model's test and its share of the study need only its
# training, so a two-model spec such as the main job has at most four steps ready at a time; on
# an H200 machine (16 cores) the main job's steps are bound by their processes' start and Python
# work, not by the GPU (README, "GPU figures").
AUTO_JOBS_MAX = 4


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run an experiment spec (YAML): train -> test -> sensitivity -> AP table -> report",
        description="Run an experiment spec. Running it again resumes: finished steps are "
        "skipped and an unfinished training continues from its latest.pth. One run at a time "
        "per output folder (a lock on OUT/.lock).",
    )
    parser.add_argument("spec", help="experiment spec, e.g. experiments/synthetic_quick.yaml")
    parser.add_argument(
        "--out", default=None, help="output folder (default: experiments/runs/<spec name>)"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="redo every step, even those already complete, and train every model from "
        "scratch; the earlier outputs of a model (its models/<name> folder, notebooks, step "
        "records) are moved to OUT/superseded/<UTC time>/, not deleted",
    )
    parser.add_argument(
        "--jobs",
        type=jobs_count,
        default=1,
        help="run this many steps at once, each as soon as the steps it needs have ended (a "
        "model's test while another trains), each with an equal share of the CPU threads "
        "(default 1); on a small CPU, single-thread jobs use the cores better; on CUDA the "
        f"jobs share the GPU; auto: one per CPU core, at most {AUTO_JOBS_MAX}",
    )
    parser.add_argument(
        "--status",
        action="store_true",
        help="show each step's state (done, failed, queued, running, not started) and its log "
        "or notebook, then exit; runs nothing",
    )
    add_launcher_options(parser)
    parser.set_defaults(func=run)


def add_launcher_options(parser: argparse.ArgumentParser) -> None:
    """``--launcher`` and the cluster settings; each given one wins over the spec's
    ``launcher:`` section (drcnn.analysis.launchers.LauncherSpec, docs/cluster.md)."""
    group = parser.add_argument_group(
        "cluster (spec section launcher:; see docs/cluster.md)",
        "With --launcher submitit every training, test and sensitivity step is a job submitted "
        "through submitit (pip install 'drcnn[slurm]'); a training job starts torchrun on "
        "each of its nodes. The job ids go to OUT/jobs/.",
    )
    group.add_argument("--launcher", choices=("local", "submitit"), dest="type")
    group.add_argument(
        "--cluster", choices=("slurm", "local"), help="submitit executor (default slurm)"
    )
    group.add_argument("--partition")
    group.add_argument("--account")
    group.add_argument("--nodes", type=int, help="nodes per training job")
    group.add_argument("--gpus-per-node", type=int, dest="gpus_per_node")
    group.add_argument("--cpus-per-task", type=int, dest="cpus_per_task")
    group.add_argument("--time", type=int, help="minutes a job may run")
    group.add_argument(
        "--sbatch",
        nargs="+",
        action="extend",
        metavar="KEY=VALUE",
        help="more sbatch options, e.g. --sbatch qos=high constraint=a100",
    )


def launcher_settings(args: argparse.Namespace) -> dict:
    """The launcher options given on the command line (the others stay as the spec says)."""
    from drcnn.analysis.launchers import parse_sbatch

    keys = ("type", "cluster", "partition", "account", "nodes", "gpus_per_node")
    keys += ("cpus_per_task", "time")
    settings = {key: getattr(args, key) for key in keys if getattr(args, key) is not None}
    if args.sbatch:
        settings["sbatch"] = parse_sbatch(args.sbatch)
    return settings


def auto_jobs() -> int:
    """``--jobs auto``: one step per CPU core, at most :data:`AUTO_JOBS_MAX` (2 on a 2-core
    machine, as the main job was measured; 4 on a GPU machine's 16 cores)."""
    return max(1, min(AUTO_JOBS_MAX, os.cpu_count() or 1))


def jobs_count(text: str) -> int:
    """``--jobs``: a whole number, or ``auto`` (:func:`auto_jobs`)."""
    if text == "auto":
        return auto_jobs()
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or auto, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from drcnn.analysis.runner import experiment_status, run_experiment

    if args.status:
        for line in experiment_status(args.spec, args.out):
            print(line)
        return 0
    status = run_experiment(
        args.spec, args.out, force=args.force, jobs=args.jobs, launcher=launcher_settings(args)
    )
    return 1 if any(v in ("failed", "blocked") for v in status.values()) else 0
