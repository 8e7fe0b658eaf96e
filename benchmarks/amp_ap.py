"""AP of checkpoints under inference mixed precision against fp32, with its noise over images.

    .venv/bin/python benchmarks/amp_ap.py CKPT [CKPT ...] [--data-root DIR] [--amp bf16]
        [--device cpu] [--boot 200] [--seed 0] [--out benchmarks/results/amp_ap.json]

For each checkpoint, the val split of its stored config (``--data-root``: another dataset root,
e.g. a larger synthetic val split) goes through ``drcnn test``'s inference twice, in fp32 and
with ``--amp`` (:func:`drcnn.engine.amp.inference_autocast`: the backbone in bf16, the RPN and
RoI heads in fp32), on one thread. Reported: COCO AP of both runs, their difference, and the
difference's 95% interval over ``--boot`` paired bootstrap resamples of the images (the same
resample for both runs, :func:`drcnn.engine.coco_eval.resampled_ap`). Issue #13 item 2 asks
for AP within 0.2 points of fp32. Prints a table and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from drcnn.analysis.sensitivity import bootstrap_counts
from drcnn.data.loader import build_dataloader
from drcnn.engine.amp import inference_amp
from drcnn.engine.checkpoint import load_model
from drcnn.engine.coco_eval import detections_to_coco, match_detections, resampled_ap
from drcnn.engine.evaluate import DET_KEYS, inference
from drcnn.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "amp_ap.json"


def compare(
    checkpoint: Path, data_root: Path | None, amp: str, device: torch.device, boot: int, seed: int
) -> dict:
    """fp32 and ``amp`` AP of one checkpoint, the difference in points and its interval."""
    model, cfg = load_model(checkpoint, None, device)
    if data_root is not None:
        cfg.data.root = str(data_root)
    cfg.data.workers = 0
    loader = build_dataloader(cfg, "val", distributed=False, pin_memory=device.type == "cuda")
    dataset = loader.dataset
    evaluators, seconds = {}, {}
    for mode in ("none", amp):
        start = time.perf_counter()
        detections = inference(model, loader, device, mode)
        seconds[mode] = time.perf_counter() - start
        results = detections_to_coco(
            [{key: d[key] for key in DET_KEYS} for d in detections],
            [d["image_id"] for d in detections],
            dataset.cat_ids,
        )
        evaluators[mode] = match_detections(dataset.coco, results, dataset.ids)
        if evaluators[mode] is None:
            raise SystemExit(f"{checkpoint}: no detections on the val split (--amp {mode})")
    num_images = len(dataset.ids)
    ones = np.ones(num_images, dtype=int)
    ap = {mode: 100 * resampled_ap(ev, ones) for mode, ev in evaluators.items()}
    replicates = bootstrap_counts(num_images, boot, seed)
    differences = [
        100 * (resampled_ap(evaluators[amp], c) - resampled_ap(evaluators["none"], c))
        for c in replicates
    ]
    low, high = np.percentile(differences, [2.5, 97.5])
    return {
        "checkpoint": str(checkpoint),
        "images": num_images,
        "ap_fp32": ap["none"],
        f"ap_{amp}": ap[amp],
        "difference": ap[amp] - ap["none"],
        "interval95": [float(low), float(high)],
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--amp", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--boot", type=int, default=200, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="seed of the resamples")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    amp = inference_amp(args.amp, device)
    if amp == "none":
        parser.error(f"--amp {args.amp} computes in fp32 on {device}: nothing to compare")
    rows = [
        compare(path, args.data_root, amp, device, args.boot, args.seed)
        for path in args.checkpoints
    ]
    result = {"amp": amp, "device": str(device), "boot": args.boot, "rows": rows}
    atomic_write_json(args.out, result)
    print(f"{'checkpoint':<32}{'images':>7}{'AP fp32':>9}{'AP ' + amp:>9}{'diff':>7}  95% interval")
    for row in rows:
        low, high = row["interval95"]
        path = Path(row["checkpoint"])
        print(
            f"{path.parent.name + '/' + path.name:<32}{row['images']:>7}{row['ap_fp32']:>9.2f}"
            f"{row[f'ap_{amp}']:>9.2f}{row['difference']:>+7.2f}  [{low:+.2f}, {high:+.2f}]"
        )
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
