"""``drcnn eval`` (placeholder until its issue lands)."""

from drcnn.errors import DrcnnError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="(not implemented yet)")
    parser.set_defaults(func=run)


def run(args) -> int:
    raise DrcnnError("'drcnn eval' is not implemented yet")
