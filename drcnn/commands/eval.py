"""``drcnn eval``: COCO box AP of a result file against an annotation file (pycocotools)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="COCO box AP of a results JSON against a COCO annotation file"
    )
    parser.add_argument("--ann", required=True, help="COCO instances JSON (ground truth)")
    parser.add_argument("--results", required=True, help="COCO results JSON (list of boxes)")
    parser.add_argument(
        "--out",
        default=None,
        help="also write the metrics to this JSON file (refused if it is --ann or --results)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from drcnn.engine.coco_eval import evaluate_coco, format_metrics
    from drcnn.io import atomic_write_json, refuse_collisions

    if args.out:
        inputs = [(args.ann, "the annotation file"), (args.results, "the results file")]
        refuse_collisions(inputs, [(args.out, "--out")])
    metrics = evaluate_coco(args.ann, args.results)
    print(format_metrics(metrics))
    if args.out:
        atomic_write_json(args.out, metrics)
        print(f"wrote {args.out}")
    return 0
