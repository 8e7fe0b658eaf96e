"""``drcnn run``: execute (or resume) an experiment spec: train, test, studies, report."""

from __future__ import annotations

import argparse


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
        type=int,
        default=1,
        help="run this many trainings (then tests) at once, each with an equal share of the "
        "CPU threads (default 1); on a small CPU, single-thread jobs use the cores better; on "
        "CUDA the jobs share the GPU",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from drcnn.analysis.runner import run_experiment

    status = run_experiment(args.spec, args.out, force=args.force, jobs=args.jobs)
    return 1 if any(v in ("failed", "blocked") for v in status.values()) else 0
