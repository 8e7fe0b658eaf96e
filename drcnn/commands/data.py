"""``drcnn data`` (placeholder until its issue lands)."""

from drcnn.errors import DrcnnError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("data", help="(not implemented yet)")
    parser.set_defaults(func=run)


def run(args) -> int:
    raise DrcnnError("'drcnn data' is not implemented yet")
