"""``drcnn report``: (re)write the report of an experiment directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from drcnn.errors import DrcnnError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "report", help="write report.md and report.html of an experiment directory"
    )
    parser.add_argument("exp_dir", help="the --out folder of `drcnn run`")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from drcnn.analysis.report import write_report

    if not Path(args.exp_dir).is_dir():
        raise DrcnnError(f"{args.exp_dir}: experiment directory not found")
    for path in write_report(args.exp_dir):
        print(path)
    return 0
