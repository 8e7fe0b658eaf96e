"""Speed of the synthetic dataset generator: images per second by worker count.

    .venv/bin/python benchmarks/synthetic_speed.py [--num-images 2000] [--size 256] [--workers 1 2]

Generates the images into a temporary folder (deleted afterwards), prints a table and writes
``benchmarks/results/synthetic_speed.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
from pathlib import Path

from drcnn.data.synthetic import generate_synthetic_coco
from drcnn.io import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results" / "synthetic_speed.json"


def _cpu_seconds() -> float:
    """CPU time used so far by this process and its finished children (the pool workers)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def measure(num_images: int, size: int, workers: int) -> dict:
    """Generate ``num_images`` training images once; return the timing row. CPU seconds per
    image are reported too: on a shared machine they stay meaningful when wall time is not."""
    cpu = _cpu_seconds()
    with tempfile.TemporaryDirectory() as tmp:
        stats = generate_synthetic_coco(tmp, num_images, 0, seed=0, size=size, workers=workers)
    cpu_ms = (_cpu_seconds() - cpu) / num_images * 1000
    return {
        "images": num_images,
        "size": size,
        "workers": workers,
        "seconds": round(stats["seconds"], 3),
        "images_per_s": round(stats["images_per_s"], 1),
        "cpu_ms_per_image": round(cpu_ms, 2),
        "boxes": stats["train"]["annotations"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = [measure(args.num_images, args.size, w) for w in args.workers]
    print(f"{'workers':>8} {'images':>7} {'size':>5} {'seconds':>8} {'images/s':>9} {'cpu ms':>7}")
    for row in rows:
        print(
            f"{row['workers']:>8} {row['images']:>7} {row['size']:>5} "
            f"{row['seconds']:>8.2f} {row['images_per_s']:>9.1f} {row['cpu_ms_per_image']:>7.2f}"
        )
    machine = {
        "cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "processor": platform.processor(),
        "python": platform.python_version(),
    }
    atomic_write_json(args.out, {"machine": machine, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
