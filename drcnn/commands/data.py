"""``drcnn data``: create the synthetic dataset (``synth``) or check a COCO dataset (``check``)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("data", help="create or check detection datasets")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    synth = actions.add_parser(
        "synth", help="write the synthetic COCO-format shapes dataset (8 classes)"
    )
    synth.add_argument("--out", required=True, help="dataset root to write")
    synth.add_argument("--num-train", type=int, default=2000, help="training images")
    synth.add_argument("--num-val", type=int, default=500, help="validation images")
    synth.add_argument("--seed", type=int, default=0, help="same seed -> identical files")
    synth.add_argument("--size", type=int, default=256, help="image side in pixels")
    synth.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")
    synth.add_argument(
        "--force", action="store_true", help="replace a dataset that --out already holds"
    )
    synth.set_defaults(func=run_synth)

    check = actions.add_parser(
        "check",
        help="validate a COCO-format split (annotation file and every image), print statistics",
    )
    check.add_argument("--ann", required=True, help="COCO instances JSON file")
    check.add_argument("--images", required=True, help="image folder")
    check.set_defaults(func=run_check)


def run_synth(args: argparse.Namespace) -> int:
    from drcnn.data.synthetic import describe, generate_synthetic_coco

    stats = generate_synthetic_coco(
        args.out, args.num_train, args.num_val, args.seed, args.size, args.workers, args.force
    )
    print(describe(stats))
    print(f"wrote {args.out}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    import torch

    from drcnn.data.coco import CocoDetection
    from drcnn.data.synthetic import size_range_counts

    dataset = CocoDetection(args.ann, args.images)
    counts = torch.zeros(dataset.num_classes + 1, dtype=torch.int64)
    for index in range(len(dataset)):
        _, target = dataset[index]  # decodes every image: unreadable files fail here
        counts += torch.bincount(target["labels"], minlength=len(counts))
    print(f"{len(dataset)} images, {int(counts.sum())} boxes, {dataset.num_classes} classes")
    for name, count in zip(dataset.class_names, counts[1:].tolist(), strict=True):
        print(f"  {name:<20}{count:>8}")
    anns = list(dataset.coco.anns.values())
    print("area ranges: " + ", ".join(f"{k} {v}" for k, v in size_range_counts(anns).items()))
    return 0
