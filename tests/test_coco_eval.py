"""COCO evaluation equals pycocotools run independently; conversion of model outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from drcnn.data.coco import CocoDetection
from drcnn.engine.coco_eval import (
    detections_to_coco,
    evaluate_coco,
    format_metrics,
    match_detections,
    resampled_ap,
)
from drcnn.errors import DrcnnError

NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
STAT_INDEX = (0, 1, 2, 3, 4, 5, 8)  # COCOeval.stats positions, from pycocotools' summarize


def _val_ann(root: Path) -> Path:
    return root / "annotations" / "instances_val.json"


def _check_ap_per_iou(metrics: dict, coco_reference, ann: Path, results: Path, **params) -> None:
    """AP at one IoU threshold must equal pycocotools' AP run with only that threshold."""
    thresholds = coco_reference(ann, results, **params).params.iouThrs
    assert list(metrics["AP_per_iou"]) == [f"{t:.2f}" for t in thresholds]
    for t, key in enumerate(metrics["AP_per_iou"]):
        single = coco_reference(ann, results, iouThrs=thresholds[t : t + 1], **params)
        assert metrics["AP_per_iou"][key] == pytest.approx(single.stats[0], abs=1e-12), key


def test_equals_pycocotools_on_perturbed_ground_truth(
    synthetic_root: Path, perturbed_results: Path, coco_reference
) -> None:
    ann = _val_ann(synthetic_root)
    metrics = evaluate_coco(ann, perturbed_results)
    reference = coco_reference(ann, perturbed_results)
    for name, index in zip(NAMES, STAT_INDEX, strict=True):
        value = reference.stats[index]
        assert metrics[name] == (value if value >= 0 else 0.0), name  # -1: no GT in range
    assert 0.05 < metrics["AP"] < 0.95  # the perturbation is neither nothing nor everything
    _check_ap_per_iou(metrics, coco_reference, ann, perturbed_results)
    per_iou = list(metrics["AP_per_iou"].values())
    assert per_iou == sorted(per_iou, reverse=True)  # stricter IoU, lower AP
    assert metrics["AP"] == pytest.approx(sum(per_iou) / len(per_iou), abs=1e-12)


def test_restricting_to_some_images(synthetic_root, perturbed_results, coco_reference) -> None:
    ids = [2]
    ann = _val_ann(synthetic_root)
    metrics = evaluate_coco(ann, perturbed_results, image_ids=ids)
    reference = coco_reference(ann, perturbed_results, imgIds=ids)
    assert metrics["AP"] == reference.stats[0]
    # one image: some classes have no ground truth here (pycocotools' -1 entries)
    gt = json.loads(ann.read_text())
    present = {a["category_id"] for a in gt["annotations"] if a["image_id"] in ids}
    assert len(present) < len(gt["categories"])
    _check_ap_per_iou(metrics, coco_reference, ann, perturbed_results, imgIds=ids)
    assert metrics["AP"] != evaluate_coco(_val_ann(synthetic_root), perturbed_results)["AP"]


def with_images_repeated(ann: Path, results: Path, counts: list[int], out: Path) -> list[dict]:
    """Write to ``out`` the ground truth with val image ``k`` (in id order) held ``counts[k]``
    times, each copy under a new id with its own annotations; returns the results moved along."""
    gt, dets = json.loads(ann.read_text()), json.loads(results.read_text())
    images = sorted(gt["images"], key=lambda image: image["id"])
    copies = {"images": [], "annotations": [], "results": []}
    for image, count in zip(images, counts, strict=True):
        for copy in range(count):
            new_id = 1000 * (copy + 1) + image["id"]
            copies["images"].append({**image, "id": new_id})
            for kind, source in (("annotations", gt["annotations"]), ("results", dets)):
                copies[kind] += [
                    {**e, "image_id": new_id} for e in source if e["image_id"] == image["id"]
                ]
    for k, annotation in enumerate(copies["annotations"], 1):
        annotation["id"] = k
    out.write_text(
        json.dumps({**gt, "images": copies["images"], "annotations": copies["annotations"]})
    )
    return copies["results"]


def test_resampled_ap_is_pycocotools_ap_of_the_repeated_images(
    synthetic_root: Path, perturbed_results: Path, tmp_path: Path
) -> None:
    """A bootstrap replicate's AP equals pycocotools' AP on a dataset that holds each image as
    often as the replicate draws it; drawing every image once gives the plain AP."""
    ann = _val_ann(synthetic_root)
    evaluator = match_detections(ann, perturbed_results)
    num_images = len(evaluator.params.imgIds)
    assert (
        resampled_ap(evaluator, np.ones(num_images, int))
        == evaluate_coco(ann, perturbed_results)["AP"]
    )
    counts = [(2, 0, 1, 3)[k % 4] for k in range(num_images)]
    repeated = with_images_repeated(ann, perturbed_results, counts, tmp_path / "repeated.json")
    expected = evaluate_coco(tmp_path / "repeated.json", repeated)["AP"]
    assert resampled_ap(evaluator, np.array(counts)) == pytest.approx(expected, abs=1e-12)
    assert expected != pytest.approx(evaluate_coco(ann, perturbed_results)["AP"], abs=1e-4)


def test_ground_truth_scores_ap_one_and_empty_scores_zero(synthetic_root: Path) -> None:
    gt = json.loads(_val_ann(synthetic_root).read_text())
    results = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1}
        for a in gt["annotations"]
    ]
    metrics = evaluate_coco(_val_ann(synthetic_root), results)
    areas = [a["area"] for a in gt["annotations"]]
    present = {"APs": min(areas) < 32**2, "APm": max(areas) >= 32**2, "APl": max(areas) > 96**2}
    for name in ("AP", "AP50", "AP75", "AR100"):
        assert metrics[name] == 1.0
    for name, has_boxes in present.items():
        assert metrics[name] == (1.0 if has_boxes else 0.0)
    assert set(metrics["AP_per_iou"].values()) == {1.0}
    assert "bbox" in results[0] and "segmentation" not in results[0]  # input left untouched
    empty = evaluate_coco(_val_ann(synthetic_root), [])
    assert all(empty[name] == 0.0 for name in NAMES)
    assert set(empty["AP_per_iou"].values()) == {0.0} and len(empty["AP_per_iou"]) == 10


def test_detections_to_coco_hand_worked() -> None:
    detections = [
        {
            "boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 1.5, 2.5]]),
            "scores": torch.tensor([0.875, 0.25]),
            "labels": torch.tensor([2, 3]),
        },
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0).long()},
    ]
    results = detections_to_coco(detections, [7, 8], cat_ids=[1, 3, 5])
    assert results == [
        {"image_id": 7, "category_id": 3, "bbox": [10.0, 20.0, 20.0, 40.0], "score": 0.875},
        {"image_id": 7, "category_id": 5, "bbox": [0.0, 0.0, 1.5, 2.5], "score": 0.25},
    ]


def test_dataset_targets_round_trip_to_ap_one(synthetic_root: Path) -> None:
    """Dataset labels -> detections_to_coco -> evaluation recovers the ground truth."""
    dataset = CocoDetection(_val_ann(synthetic_root), synthetic_root / "val")
    detections, ids = [], []
    for index in range(len(dataset)):
        _, target = dataset[index]
        n = len(target["labels"])
        detections.append(
            {"boxes": target["boxes"], "labels": target["labels"], "scores": torch.ones(n)}
        )
        ids.append(target["image_id"])
    results = detections_to_coco(detections, ids, dataset.cat_ids)
    assert evaluate_coco(dataset.coco, results)["AP"] == 1.0


def test_format_metrics_lists_every_value() -> None:
    metrics = {name: 0.1 * (i + 1) for i, name in enumerate(NAMES)}
    metrics["AP_per_iou"] = {f"{0.5 + 0.05 * i:.2f}": 0.9 - 0.05 * i for i in range(10)}
    text = format_metrics(metrics)
    for i, name in enumerate(NAMES):
        assert f"{name}" in text and f"{0.1 * (i + 1):.4f}" in text
    assert "0.95" in text and "0.450" in text


def _ground_truth_as_results(ann: Path) -> list[dict]:
    gt = json.loads(ann.read_text())
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1}
        for a in gt["annotations"]
    ]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"bbox": [math.nan] * 4}, r"entry 0: bbox must be 4 finite numbers .*, got \[nan, nan"),
        ({"bbox": [1, 2, math.inf, 3]}, r"entry 0: bbox .*got \[1, 2, inf, 3\]"),
        ({"bbox": [1, 2, -4, 3]}, r"entry 0: bbox .*with w, h >= 0, got \[1, 2, -4, 3\]"),
        ({"score": math.nan}, r"entry 0: score must be a finite number, got nan"),
    ],
)
def test_non_finite_results_are_refused_not_scored(synthetic_root: Path, bad, message) -> None:
    """pycocotools scores all-NaN boxes AP 1.0 (its test ``iou < threshold`` is false for NaN):
    every entry must be finite, and the error names the entry."""
    results = [{**r, **bad} for r in _ground_truth_as_results(_val_ann(synthetic_root))]
    with pytest.raises(DrcnnError, match=f"^results: {message}"):
        evaluate_coco(_val_ann(synthetic_root), results)


def test_non_finite_ground_truth_is_refused(synthetic_root: Path, tmp_path: Path) -> None:
    gt = json.loads(_val_ann(synthetic_root).read_text())
    gt["annotations"][2]["bbox"][1] = math.nan
    ann = tmp_path / "nan.json"
    ann.write_text(json.dumps(gt))
    with pytest.raises(DrcnnError, match=r"nan\.json: annotations\[2\]\.bbox must be 4 finite"):
        evaluate_coco(ann, _ground_truth_as_results(_val_ann(synthetic_root)))


def without_area_and_iscrowd(ann_file: Path, bare: Path, filled: Path) -> None:
    """Write ``ann_file``'s ground truth to ``bare`` without the annotations' area and iscrowd
    (as other tools write it) and to ``filled`` with area = w * h and iscrowd = 0 written in
    (what pycocotools' loaders assume); ``bare`` may be ``ann_file`` itself."""
    gt = json.loads(ann_file.read_text())
    for ann in gt["annotations"]:
        del ann["area"], ann["iscrowd"]
    bare.write_text(json.dumps(gt))
    for ann in gt["annotations"]:
        ann["area"], ann["iscrowd"] = ann["bbox"][2] * ann["bbox"][3], 0
    filled.write_text(json.dumps(gt))


def test_missing_area_and_iscrowd_evaluate_as_if_filled_in(
    synthetic_root: Path, perturbed_results: Path, tmp_path: Path, coco_reference
) -> None:
    """A ground-truth file without area/iscrowd (written by other tools) scores what pycocotools
    gives the same file with area = w * h and iscrowd = 0 written in."""
    bare, filled = tmp_path / "bare.json", tmp_path / "filled.json"
    without_area_and_iscrowd(_val_ann(synthetic_root), bare, filled)
    metrics = evaluate_coco(bare, perturbed_results)
    reference = coco_reference(filled, perturbed_results)
    for name, index in zip(NAMES, STAT_INDEX, strict=True):
        assert metrics[name] == max(reference.stats[index], 0.0), name
    assert 0.05 < metrics["AP"] < 0.95
