"""``drcnn sensitivity``: the translation-sensitivity study of one or more checkpoints."""

from __future__ import annotations

import argparse

from drcnn.errors import DrcnnError


def _named(items: list[str] | None, option: str) -> dict[str, str]:
    """``NAME=PATH`` strings -> dict (one-line error on a missing ``=``)."""
    pairs = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise DrcnnError(f"{option} {item!r}: expected NAME=PATH")
        pairs[name] = path
    return pairs


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "sensitivity",
        help="shift ground-truth boxes and record how classifier and regressor respond",
    )
    parser.add_argument(
        "checkpoints",
        nargs="+",
        metavar="NAME=CHECKPOINT",
        help="models to compare, e.g. faster=work_dirs/faster/latest.pth",
    )
    parser.add_argument("--out", required=True, help="output folder (table, summary, figures)")
    parser.add_argument(
        "--config",
        action="append",
        metavar="NAME=CONFIG",
        help="config for a model (default: the config stored in its checkpoint)",
    )
    parser.add_argument(
        "--range",
        nargs=3,
        type=float,
        default=(-0.5, 0.5, 11),
        metavar=("LOW", "HIGH", "STEPS"),
        help="dx and dy offsets as fractions of box size (default -0.5 0.5 11)",
    )
    parser.add_argument(
        "--scales", nargs="+", type=float, default=[1.0], help="box scale factors (default 1)"
    )
    parser.add_argument(
        "--max-images", type=int, default=200, help="validation images to use (default 200)"
    )
    parser.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="data.* override for the evaluation split, e.g. data.root=data/synthetic",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from drcnn.analysis.sensitivity import KEY_COLUMNS, ShiftGrid
    from drcnn.analysis.study import translation_study
    from drcnn.analysis.tables import select_columns

    low, high, steps = args.range
    if steps != int(steps):
        raise DrcnnError(f"--range STEPS: expected a whole number, got {steps}")
    grid = ShiftGrid.from_range(low, high, int(steps), args.scales)
    _, summary, figures = translation_study(
        _named(args.checkpoints, "checkpoint"),
        args.out,
        grid,
        _named(args.config, "--config"),
        args.data,
        args.max_images,
        args.device,
    )
    key = select_columns(summary, KEY_COLUMNS)
    print(key.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"table, full summary (summary.csv) and {len(figures)} figures in {args.out}")
    return 0
