"""``drcnn infer`` (placeholder until its issue lands)."""

from drcnn.errors import DrcnnError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("infer", help="(not implemented yet)")
    parser.set_defaults(func=run)


def run(args) -> int:
    raise DrcnnError("'drcnn infer' is not implemented yet")
