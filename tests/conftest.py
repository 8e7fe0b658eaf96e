"""Shared fixtures: a small synthetic COCO-format dataset, and an independent pycocotools
reference evaluation (for checking drcnn's evaluation against the library itself).

Under pytest-xdist each worker process gets an equal share of the cores for its intra-op
threads (and the processes it starts, through ``OMP_NUM_THREADS``). With every worker using all
cores, idle OpenMP threads spinning in one process took the cores another needed: on 2 cores
with 2 workers the suite ran 2.7x longer. Tests of multi-threaded code set their thread count.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from drcnn.data.synthetic import generate_synthetic_coco

# the benchmark scripts (benchmarks/*.py) import as modules in the tests
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def pytest_configure(config: pytest.Config) -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        share = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(share)
        os.environ["OMP_NUM_THREADS"] = str(share)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a synthetic dataset (16 train / 8 val images, 128 px), generated once."""
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic_coco(root, num_train=16, num_val=8, seed=0, size=128, workers=1)
    return root


@pytest.fixture(scope="session")
def perturbed_results(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A COCO results file made from the synthetic val ground truth: jittered boxes, random
    scores, some boxes missed, some with the wrong class, and some false positives."""
    gt = json.loads((synthetic_root / "annotations" / "instances_val.json").read_text())
    rng = np.random.default_rng(123)
    cat_ids = [c["id"] for c in gt["categories"]]
    results = []
    for ann in gt["annotations"]:
        if rng.random() < 0.15:
            continue
        x, y, w, h = ann["bbox"]
        jitter = rng.normal(0, 0.08, size=4) * [w, h, w, h]
        category = ann["category_id"] if rng.random() > 0.1 else int(rng.choice(cat_ids))
        box = [x + jitter[0], y + jitter[1], max(w + jitter[2], 1.0), max(h + jitter[3], 1.0)]
        results.append(
            {
                "image_id": ann["image_id"],
                "category_id": category,
                "bbox": box,
                "score": float(rng.uniform(0.05, 1.0)),
            }
        )
    for image in gt["images"]:
        for _ in range(2):
            x, y = rng.uniform(0, 96, size=2)
            results.append(
                {
                    "image_id": image["id"],
                    "category_id": int(rng.choice(cat_ids)),
                    "bbox": [float(x), float(y), 20.0, 12.0],
                    "score": float(rng.uniform(0, 0.5)),
                }
            )
    path = tmp_path_factory.mktemp("results") / "perturbed.bbox.json"
    path.write_text(json.dumps(results))
    return path


def pycocotools_eval(ann_file: Path, results_file: Path, **params) -> COCOeval:
    """Plain pycocotools evaluation, written independently of drcnn.engine.coco_eval;
    ``params`` set COCOeval.params attributes (e.g. iouThrs, imgIds) before evaluating."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        evaluator = COCOeval(gt, gt.loadRes(str(results_file)), "bbox")
        for name, value in params.items():
            setattr(evaluator.params, name, value)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


@pytest.fixture
def coco_reference():
    """The independent pycocotools evaluation function (see :func:`pycocotools_eval`)."""
    return pycocotools_eval
