"""``drcnn convert mmdet``: an mmdetection 2.x checkpoint as a drcnn checkpoint.

Official Decoupled R-CNN checkpoints and mmdetection 2.x Faster / Cascade R-CNN checkpoints
become drcnn checkpoints that ``drcnn test``, ``infer`` and ``sensitivity`` take; the config
describes the network (``drcnn.models.mmdet_compat``).
"""

from __future__ import annotations

import argparse

FORMATS = ("mmdet",)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="turn an mmdetection 2.x checkpoint into a drcnn checkpoint",
        description="Convert an mmdetection 2.x checkpoint (official Decoupled R-CNN, "
        "Faster / Cascade R-CNN) into a drcnn checkpoint for the model of CONFIG.",
    )
    parser.add_argument(
        "format", choices=FORMATS, help="checkpoint format (mmdet: mmdetection 2.x)"
    )
    parser.add_argument("checkpoint", help="the mmdetection checkpoint (.pth)")
    parser.add_argument(
        "--config", required=True, help="drcnn YAML config describing the checkpoint's network"
    )
    parser.add_argument(
        "--out", required=True, help="the drcnn checkpoint to write (must not exist)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from drcnn.config import load_config
    from drcnn.models.mmdet_compat import convert_mmdet_checkpoint

    out = convert_mmdet_checkpoint(args.checkpoint, load_config(args.config), args.out)
    print(f"wrote {out} (weights of {args.checkpoint}, model of {args.config})")
    return 0
