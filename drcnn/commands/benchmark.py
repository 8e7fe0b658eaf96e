"""``drcnn benchmark``: median inference fps and peak memory of a detector."""

from __future__ import annotations

import argparse
import json

from drcnn.commands.test import add_amp_option
from drcnn.commands.train import add_model_options, load_cfg


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "benchmark", help="inference fps and peak memory (random weights or a checkpoint)"
    )
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("checkpoint", nargs="?", default=None, help="optional checkpoint (.pth)")
    parser.add_argument("--images", type=int, default=50, help="timed forward passes (50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed passes first (5)")
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="input image size (default: test short side x 4/3 of it)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="JSON output (default: benchmark.json beside the checkpoint, or here)",
    )
    add_amp_option(parser)
    add_model_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from drcnn.engine.benchmark import benchmark
    from drcnn.errors import DrcnnError
    from drcnn.io import refuse_collisions

    if args.images < 1 or args.warmup < 0:
        raise DrcnnError("--images: expected at least 1 timed pass (and --warmup >= 0)")
    if args.size is not None and min(args.size) < 1:
        raise DrcnnError(f"--size: expected two positive integers H W, got {args.size}")
    if args.out is not None:
        inputs = [(args.config, "the config file"), (args.checkpoint, "the checkpoint")]
        refuse_collisions(inputs, [(args.out, "--out")])
    result = benchmark(
        load_cfg(args),
        args.checkpoint,
        images=args.images,
        device=args.device,
        size=tuple(args.size) if args.size else None,
        out=args.out,
        warmup=args.warmup,
        amp=args.amp,
    )
    print(json.dumps(result, indent=2))
    return 0
