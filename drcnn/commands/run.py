"""``drcnn run``: execute (or resume) an experiment spec: train, test, studies, report."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run an experiment spec (YAML): train -> test -> sensitivity -> AP table -> report",
    )
    parser.add_argument("spec", help="experiment spec, e.g. experiments/synthetic_quick.yaml")
    parser.add_argument(
        "--out", default=None, help="output folder (default: experiments/runs/<spec name>)"
    )
    parser.add_argument(
        "--force", action="store_true", help="redo every step, even those already complete"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from drcnn.analysis.runner import run_experiment

    status = run_experiment(args.spec, args.out, force=args.force)
    return 1 if any(v in ("failed", "blocked") for v in status.values()) else 0
