"""``drcnn run`` (placeholder until its issue lands)."""

from drcnn.errors import DrcnnError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("run", help="(not implemented yet)")
    parser.set_defaults(func=run)


def run(args) -> int:
    raise DrcnnError("'drcnn run' is not implemented yet")
