"""Synchronising CUDA calls per image of each detector of ``inference.py``, with source lines.

On CUDA, one inference pass per model and score threshold (after one warm-up pass) runs under
``torch.cuda.set_sync_debug_mode("warn")``, which warns at each call that makes the CPU wait for
the GPU (``nonzero``, ``.item()``, a copy to the host, ...): the warnings are recorded and
counted by the Python line that called the op. Models, weights, proposals (anchors) and the
classification load are those of ``benchmarks/inference.py``, so the final NMS sees the same
candidates. On a CPU nothing synchronises with a GPU: the passes still run (so the script is
tested there) and every count is reported as ``None`` ("n/a"); the op-level count that works
on a CPU is the test suite's.

    python benchmarks/sync_count.py --device cuda                 # 800x1333
    python benchmarks/sync_count.py --device cpu --size 128x192   # smoke test: n/a
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from drcnn.engine.benchmark import use_anchor_proposals
from drcnn.io import atomic_write_json

# the sibling script (on the path when this one runs as a script; also when imported by tests)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import (
    ROOT,
    SCORE_THRESHOLDS,
    parse_size,
    prepare_models,
    set_score_thresh,
)

SYNC_WARNING = "called a synchronizing CUDA operation"


def short_path(filename: str) -> str:
    """A source file named from ``site-packages/`` or the project root, else as given."""
    for marker in ("site-packages/", f"{ROOT}/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def synchronising_calls(run: Callable[[], object], device: torch.device) -> Counter[str] | None:
    """``file:line`` -> number of synchronising CUDA calls made while ``run()`` runs, or None
    on a device without CUDA's sync debug mode (``run`` still runs)."""
    counted = device.type == "cuda"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if counted:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            if counted:
                torch.cuda.set_sync_debug_mode("default")
    if not counted:
        return None
    return Counter(
        f"{short_path(w.filename)}:{w.lineno}" for w in caught if SYNC_WARNING in str(w.message)
    )


def count_all(size: tuple[int, int], device: torch.device) -> dict:
    """Per model and score threshold: synchronising calls in one pass and their sources."""
    image = torch.rand(3, *size, generator=torch.Generator().manual_seed(0)).to(device)
    models, _ = prepare_models(size, device)
    rows: dict[str, dict] = {}
    for name, model in models.items():
        use_anchor_proposals(model)
        rows[name] = {}
        for threshold in SCORE_THRESHOLDS:
            set_score_thresh(model, threshold)
            with torch.no_grad():
                model([image])  # warm-up: lazy initialisation, cuDNN's choices
                sources = synchronising_calls(lambda m=model: m([image]), device)
            rows[name][f"score {threshold:g}"] = {
                "syncs_per_image": None if sources is None else sum(sources.values()),
                "sources": None if sources is None else dict(sources.most_common()),
            }
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "image_size": list(size),
        "method": 'torch.cuda.set_sync_debug_mode("warn"), one pass after one warm-up',
        "torch": torch.__version__,
        "models": rows,
    }


def format_table(result: dict) -> str:
    """One line per model and threshold: the count, then its three commonest sources."""
    lines = []
    for name, per_threshold in result["models"].items():
        for label, row in per_threshold.items():
            count = row["syncs_per_image"]
            top = ", ".join(f"{k} x{v}" for k, v in list((row["sources"] or {}).items())[:3])
            lines.append(f"{name:36s} {label:12s} {'n/a' if count is None else count:>5}  {top}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=(800, 1333), help="HxW image size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/sync_count.json")
    args = parser.parse_args()
    with torch.no_grad():
        result = count_all(args.size, torch.device(args.device))
    print(format_table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
