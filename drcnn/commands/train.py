"""``drcnn train``: train a detector (one process, or DDP under ``torchrun -m drcnn train``).

Also holds the options every model command shares (``--set``, ``--device``) and the config
loading they all do.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE ...`` config overrides and ``--device``."""
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override config entries, e.g. --set train.max_iters=100 data.workers=0",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:N or auto (default auto: cuda when available)",
    )


def load_cfg(args: argparse.Namespace):
    """The config file of ``args.config`` with the ``--set`` overrides applied."""
    from drcnn.config import load_config

    return load_config(args.config, args.overrides)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a detector (multi-GPU: torchrun --nproc_per_node N -m drcnn train ...)",
        description="Train a detector. Multi-GPU / multi-node: "
        "torchrun --nproc_per_node N -m drcnn train CONFIG ...",
    )
    parser.add_argument("config", help="YAML config file")
    parser.add_argument(
        "--work-dir", default=None, help="output folder (default: work_dirs/<config name>)"
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="CKPT",
        help="continue from CKPT (default when given without a path: WORK_DIR/latest.pth)",
    )
    parser.add_argument("--seed", type=int, default=None, help="sets train.seed")
    add_model_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from drcnn.engine import distributed
    from drcnn.engine.train import train

    cfg = load_cfg(args)
    if args.seed is not None:
        cfg.train.seed = args.seed
    work_dir = Path(args.work_dir or Path("work_dirs") / Path(args.config).stem)
    resume = None if args.resume is None else Path(args.resume or work_dir / "latest.pth")
    try:
        summary = train(cfg, work_dir, resume=resume, device=args.device)
        if distributed.is_main_process():
            print(f"trained {summary['iter']} iterations; checkpoint {summary['checkpoint']}")
    finally:
        distributed.cleanup()
    return 0
