"""The ``drcnn`` command: one sub-command per module in :mod:`drcnn.commands`.

Every sub-command has ``--help``; on bad input, and when a file cannot be read or written
(read-only folder, full disk), it exits with status 2 and one line ``error: ...`` on stderr
(``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from drcnn.errors import DrcnnError

# name -> module under drcnn.commands; each module defines add_parser(subparsers), which
# registers the sub-command and sets ``func`` (called with the parsed args, returns exit code).
COMMANDS = (
    "data",
    "eval",
    "train",
    "test",
    "infer",
    "benchmark",
    "sensitivity",
    "report",
    "run",
    "convert",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drcnn", description="Decoupled R-CNN: train, test, study and report."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"drcnn.commands.{name}").add_parser(subparsers)
        # also accept --debug after the sub-command
        subparsers.choices[name].add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
        )
    return parser


def describe_error(exc: DrcnnError | OSError) -> str:
    """The ``error:`` line's text; an ``OSError`` as ``<file>: <reason>`` (for a rename, the
    destination: the file the user asked for)."""
    if isinstance(exc, DrcnnError):
        return str(exc)
    path = exc.filename2 if exc.filename2 is not None else exc.filename
    reason = " ".join((exc.strerror or str(exc) or type(exc).__name__).split())
    return f"{path}: {reason}" if path is not None else reason


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (DrcnnError, OSError) as exc:
        if args.debug:
            raise
        print(f"error: {describe_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
