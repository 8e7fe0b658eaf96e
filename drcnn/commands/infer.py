"""``drcnn infer``: detect objects in image files; JSON detections plus drawn images."""

from __future__ import annotations

import argparse

from drcnn.commands.test import add_amp_option
from drcnn.commands.train import add_model_options, load_cfg


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "infer", help="detections of a checkpoint on image files (JSON + drawn PNGs)"
    )
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("checkpoint", help="a drcnn checkpoint (.pth)")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="images or folders")
    parser.add_argument(
        "--out",
        required=True,
        help="output folder: detections.json and one drawing per image, <stem>.png (<stem>-<k>.png "
        "when inputs share a stem); never overwrites an input or a file infer did not write",
    )
    parser.add_argument(
        "--score-thr", type=float, default=0.3, help="minimum score of reported boxes (0.3)"
    )
    add_amp_option(parser)
    add_model_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from drcnn.engine.infer import infer

    entries = infer(
        load_cfg(args),
        args.checkpoint,
        args.inputs,
        args.out,
        args.score_thr,
        args.device,
        config_file=args.config,
        amp=args.amp,
    )
    count = sum(len(entry["detections"]) for entry in entries)
    print(f"{count} detections in {len(entries)} images; wrote {args.out}/detections.json")
    return 0
