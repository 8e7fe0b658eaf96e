"""``drcnn test``: run a checkpoint over the val split, write COCO results, print the metrics."""

from __future__ import annotations

import argparse

from drcnn.commands.train import add_model_options, load_cfg


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "test",
        help="COCO results and metrics of a checkpoint on the val split (torchrun works too)",
    )
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("checkpoint", help="a drcnn checkpoint (.pth)")
    parser.add_argument(
        "--out",
        default=None,
        help="COCO result file (default: results.bbox.json beside the checkpoint); "
        "metrics.json is written beside it. Outputs that would overwrite an input (checkpoint, "
        "config, annotation file, images) or each other are refused",
    )
    parser.add_argument(
        "--eval",
        default="bbox",
        choices=("bbox", "none"),
        help="metric to compute (none: only write the result file)",
    )
    parser.add_argument("--show", default=None, metavar="DIR", help="draw detections into DIR")
    parser.add_argument(
        "--score-thr", type=float, default=None, help="minimum score of drawn boxes (default 0.3)"
    )
    add_amp_option(parser)
    add_model_options(parser)
    parser.set_defaults(func=run)


def add_amp_option(parser: argparse.ArgumentParser) -> None:
    """``--amp``: mixed precision of the backbone (test, infer, benchmark)."""
    parser.add_argument(
        "--amp",
        default="none",
        help="mixed precision of the backbone (the RPN and the RoI heads stay in fp32): none "
        "(fp32, default), bf16 (CUDA or CPU), fp16 (CUDA; fp32 on a CPU), auto (bf16 where the "
        "device computes it natively, as train.amp=auto)",
    )


def run(args: argparse.Namespace) -> int:
    from drcnn.engine import distributed
    from drcnn.engine.coco_eval import format_metrics
    from drcnn.engine.evaluate import test

    cfg = load_cfg(args)
    try:
        metrics = test(
            cfg,
            args.checkpoint,
            out=args.out,
            show_dir=args.show,
            score_thr=args.score_thr,
            device=args.device,
            compute_metrics=args.eval == "bbox",
            config_file=args.config,
            amp=args.amp,
        )
        if distributed.is_main_process() and metrics:
            print(format_metrics(metrics))
    finally:
        distributed.cleanup()
    return 0
