"""COCO box evaluation with pycocotools (the reference metric), plus result conversion.

``evaluate_coco`` returns COCOeval's summary numbers under stable names and the AP at each IoU
threshold 0.50:0.05:0.95 (averaged over classes the way ``COCOeval.summarize`` averages, i.e.
ignoring the ``-1`` entries of categories without ground truth). A summary value that
pycocotools reports as ``-1`` (no ground-truth box in that area range) is reported as 0, so
every value lies in ``[0, 1]``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from drcnn.data.coco import BOX_EXPECTED, field_error, is_box, is_int, is_number, load_coco
from drcnn.errors import DrcnnError
from drcnn.io import read_json

# metric name -> index into COCOeval.stats
SUMMARY_INDEX = {"AP": 0, "AP50": 1, "AP75": 2, "APs": 3, "APm": 4, "APl": 5, "AR100": 8}
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RESULT_KEYS = ("image_id", "category_id", "bbox", "score")


def detections_to_coco(
    detections: Sequence[dict], image_ids: Sequence[int], cat_ids: Sequence[int]
) -> list[dict]:
    """Model outputs (``boxes`` XYXY, ``scores``, ``labels`` 1..K; one dict per image) ->
    COCO result dicts with ``bbox`` in XYWH and the dataset's ``category_id``."""
    from torchvision.ops import box_convert

    results = []
    for det, image_id in zip(detections, image_ids, strict=True):
        boxes = box_convert(det["boxes"].detach().float().cpu(), "xyxy", "xywh").tolist()
        scores = det["scores"].detach().float().cpu().tolist()
        labels = det["labels"].detach().cpu().tolist()
        results.extend(
            {
                "image_id": int(image_id),
                "category_id": int(cat_ids[label - 1]),
                "bbox": box,
                "score": score,
            }
            for box, score, label in zip(boxes, scores, labels, strict=True)
        )
    return results


def load_results(results: str | Path | list[dict]) -> list[dict]:
    """A COCO result list from a list or a JSON file, each entry checked (:func:`check_result`)."""
    source = results if not isinstance(results, list) else "results"
    if not isinstance(results, list):
        path = Path(results)
        results = read_json(path, "results file")
        if not isinstance(results, list):
            raise DrcnnError(f"{path}: expected a JSON list of COCO results")
    for index, entry in enumerate(results):
        check_result(entry, index, source)
    return results


def check_result(entry: Any, index: int, source: str | Path) -> None:
    """One result: a dict with integer ``image_id`` and ``category_id``, a finite ``bbox`` with
    width and height >= 0, a finite ``score``. pycocotools accepts NaN boxes and scores NaN as
    a match of every ground-truth box (AP 1.0), so they are refused here."""
    if not (isinstance(entry, dict) and all(k in entry for k in RESULT_KEYS)):
        raise DrcnnError(
            f"{source}: entry {index} must have image_id, category_id, bbox [x, y, w, h], score"
        )
    for field in ("image_id", "category_id"):
        if not is_int(entry[field]):
            raise field_error(source, f"entry {index}: {field}", "an integer", entry[field])
    if not is_box(entry["bbox"]):
        raise field_error(source, f"entry {index}: bbox", BOX_EXPECTED, entry["bbox"])
    score = entry["score"]
    if not (is_number(score) and math.isfinite(score)):
        raise field_error(source, f"entry {index}: score", "a finite number", score)


def check_references(coco: COCO, results: list[dict], source: str) -> None:
    """Refuse a result whose image or category the annotation file does not have."""
    for i, entry in enumerate(results):
        if entry["image_id"] not in coco.imgs:
            raise DrcnnError(
                f"{source}: entry {i} has image_id {entry['image_id']} that the "
                "annotation file does not contain"
            )
        if entry["category_id"] not in coco.cats:
            raise DrcnnError(f"{source}: entry {i} has unknown category_id {entry['category_id']}")


def _ap_per_iou(evaluator: COCOeval) -> dict[str, float]:
    """AP at each IoU threshold: area 'all', 100 detections, -1 (undefined) entries excluded."""
    params = evaluator.params
    area = params.areaRngLbl.index("all")
    max_dets = params.maxDets.index(100)
    out = {}
    for t, thr in enumerate(params.iouThrs):
        precision = evaluator.eval["precision"][t, :, :, area, max_dets]
        valid = precision[precision > -1]
        out[f"{thr:.2f}"] = float(valid.mean()) if valid.size else 0.0
    return out


def empty_metrics() -> dict[str, Any]:
    """All-zero metrics (nothing detected)."""
    return {
        **dict.fromkeys(SUMMARY_INDEX, 0.0),
        "AP_per_iou": {f"{t:.2f}": 0.0 for t in IOU_THRESHOLDS},
    }


def evaluate_coco(
    ann: str | Path | COCO,
    results: str | Path | list[dict],
    image_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """COCO box AP of ``results`` against ``ann`` (pycocotools COCOeval, its printing silenced).

    ``image_ids`` restricts the evaluation to those images (e.g. ``data.max_val_images``).
    Returns ``AP AP50 AP75 APs APm APl AR100`` and ``AP_per_iou`` ({"0.50": ..., "0.95": ...}).
    """
    evaluator = match_detections(ann, results, image_ids)
    if evaluator is None:
        return empty_metrics()
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.accumulate()
        evaluator.summarize()
    metrics: dict[str, Any] = {
        name: max(float(evaluator.stats[index]), 0.0) for name, index in SUMMARY_INDEX.items()
    }
    metrics["AP_per_iou"] = _ap_per_iou(evaluator)
    return metrics


def match_detections(
    ann: str | Path | COCO,
    results: str | Path | list[dict],
    image_ids: Sequence[int] | None = None,
) -> COCOeval | None:
    """pycocotools' COCOeval of ``results`` against ``ann`` after its per-image matching
    (``evaluate``), before ``accumulate``; None when there are no results. ``image_ids`` as in
    :func:`evaluate_coco`."""
    coco = load_coco(ann)
    source = str(results) if not isinstance(results, list) else "results"
    results = load_results(results)
    check_references(coco, results, source)
    if not results:
        return None
    with contextlib.redirect_stdout(io.StringIO()):
        detections = coco.loadRes(copy.deepcopy(results))  # loadRes edits its input
        evaluator = COCOeval(coco, detections, iouType="bbox")
        if image_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        evaluator.evaluate()
    return evaluator


def resampled_ap(evaluator: COCOeval, counts: np.ndarray) -> float:
    """COCO AP (IoU 0.50:0.95, all areas, 100 detections) of a resample of the evaluated
    images: image ``i`` of ``evaluator.params.imgIds`` taken ``counts[i]`` times (a bootstrap
    replicate: :func:`drcnn.analysis.sensitivity.bootstrap_counts`).

    pycocotools' own ``accumulate`` runs on the per-image matches of ``evaluator`` (after
    ``evaluate``) laid out for the resampled image list, so the value is the AP that COCOeval
    gives on a dataset holding each image ``counts[i]`` times; all ones give ``stats[0]``."""
    params = evaluator.params
    num_images, num_areas = len(params.imgIds), len(params.areaRng)
    area = params.areaRngLbl.index("all")
    drawn = np.repeat(np.arange(num_images), counts)
    resample = copy.copy(evaluator)
    resample.params = copy.deepcopy(params)
    resample.params.imgIds = [params.imgIds[i] for i in drawn]
    # only what AP reads (area "all", 100 detections): a twelfth of accumulate's loops
    resample.params.areaRng, resample.params.areaRngLbl = [params.areaRng[area]], ["all"]
    resample.params.maxDets = [100]
    resample._paramsEval = copy.deepcopy(resample.params)
    blocks = [k * num_areas + area for k in range(len(params.catIds))]  # [category][area][image]
    resample.evalImgs = [evaluator.evalImgs[b * num_images + i] for b in blocks for i in drawn]
    with contextlib.redirect_stdout(io.StringIO()):
        resample.accumulate()
    precision = resample.eval["precision"][:, :, :, 0, 0]
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else 0.0


def format_metrics(metrics: dict[str, Any]) -> str:
    """A two-column text table of the summary metrics, then AP per IoU threshold."""
    lines = [f"{'metric':<8}{'value':>8}"]
    lines += [f"{name:<8}{metrics[name]:>8.4f}" for name in SUMMARY_INDEX]
    lines.append("AP per IoU threshold:")
    per_iou = metrics["AP_per_iou"]
    lines.append("".join(f"{thr:>7}" for thr in per_iou))
    lines.append("".join(f"{value:>7.3f}" for value in per_iou.values()))
    return "\n".join(lines)
