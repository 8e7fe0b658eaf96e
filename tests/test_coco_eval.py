"""COCO evaluation equals pycocotools run independently; conversion of model outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from drcnn.data.coco import CocoDetection
from drcnn.engine.coco_eval import detections_to_coco, evaluate_coco, format_metrics

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
