"""``drcnn data`` and ``drcnn eval`` from the command line: results and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from drcnn.cli import main

NAMES_AND_STATS = {"AP": 0, "AP50": 1, "AP75": 2, "APs": 3, "APm": 4, "APl": 5, "AR100": 8}


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_eval_writes_the_pycocotools_numbers(
    synthetic_root: Path, perturbed_results: Path, tmp_path: Path, coco_reference, capsys
) -> None:
    ann = synthetic_root / "annotations" / "instances_val.json"
    out = tmp_path / "sub" / "metrics.json"
    assert (
        main(["eval", "--ann", str(ann), "--results", str(perturbed_results), "--out", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    metrics = json.loads(out.read_text())
    reference = coco_reference(ann, perturbed_results)
    for name, index in NAMES_AND_STATS.items():
        assert metrics[name] == max(reference.stats[index], 0.0), name
        assert f"{metrics[name]:.4f}" in printed
    assert len(metrics["AP_per_iou"]) == 10


def test_data_synth_writes_a_dataset(tmp_path: Path, capsys) -> None:
    argv = ["data", "synth", "--out", str(tmp_path), "--num-train", "3", "--num-val", "2"]
    assert main([*argv, "--seed", "4", "--size", "64", "--workers", "1"]) == 0
    assert "train" in capsys.readouterr().out
    val = json.loads((tmp_path / "annotations" / "instances_val.json").read_text())
    assert len(val["images"]) == 2 and len(list((tmp_path / "train").glob("*.png"))) == 3
    err = _one_line_error(capsys, [*argv, "--seed", "5"])  # the folder now holds a dataset
    assert f"{tmp_path} already holds a dataset" in err and "--force" in err
    assert main([*argv, "--seed", "5", "--size", "64", "--workers", "1", "--force"]) == 0
    val = json.loads((tmp_path / "annotations" / "instances_val.json").read_text())
    assert val["info"]["seed"] == 5


def test_data_check_reads_every_image(synthetic_root: Path, capsys) -> None:
    ann = synthetic_root / "annotations" / "instances_val.json"
    assert main(["data", "check", "--ann", str(ann), "--images", str(synthetic_root / "val")]) == 0
    boxes = len(json.loads(ann.read_text())["annotations"])
    assert f"8 images, {boxes} boxes, 8 classes" in capsys.readouterr().out


def _bad_files(tmp_path: Path, ann: dict) -> dict[str, Path]:
    """name -> a file with that defect."""
    files = {
        "not_json": "{oops",
        "no_categories": json.dumps({k: v for k, v in ann.items() if k != "categories"}),
        "unknown_category": json.dumps(
            {**ann, "annotations": [{**ann["annotations"][0], "category_id": 4}]}
        ),
        "unknown_image": json.dumps(
            {**ann, "annotations": [{**ann["annotations"][0], "image_id": 999}]}
        ),
        "results_not_list": json.dumps({"image_id": 1}),
        "results_missing_score": json.dumps(
            [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2]}]
        ),
        "results_unknown_image": json.dumps(
            [{"image_id": 999, "category_id": 1, "bbox": [0, 0, 2, 2], "score": 0.5}]
        ),
    }
    paths = {}
    for name, text in files.items():
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(text)
    return paths


@pytest.mark.parametrize(
    ("ann_case", "results_case", "expected"),
    [
        ("missing", "good", "annotation file not found"),
        ("not_json", "good", "not a valid JSON annotation file"),
        ("no_categories", "good", "missing list 'categories'"),
        ("unknown_category", "good", "unknown category_id 4"),
        ("unknown_image", "good", "unknown image_id 999"),
        ("good", "missing", "results file not found"),
        ("good", "not_json", "not a valid JSON results file"),
        ("good", "results_not_list", "expected a JSON list"),
        ("good", "results_missing_score", "entry 0 must have"),
        ("good", "results_unknown_image", "image_id 999"),
    ],
)
def test_eval_bad_inputs_give_one_line_errors(
    synthetic_root: Path,
    perturbed_results: Path,
    tmp_path: Path,
    capsys,
    ann_case,
    results_case,
    expected,
) -> None:
    good_ann = synthetic_root / "annotations" / "instances_val.json"
    bad = _bad_files(tmp_path, json.loads(good_ann.read_text()))
    paths = {"good": good_ann, "missing": tmp_path / "missing.json", **bad}
    ann = paths[ann_case]
    results = perturbed_results if results_case == "good" else paths[results_case]
    err = _one_line_error(capsys, ["eval", "--ann", str(ann), "--results", str(results)])
    assert expected in err
    assert str(results if ann_case == "good" else ann) in err  # names the offending file


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--num-train", "-1"], "must be >= 0"),
        (["--size", "10"], "at least 64 pixels"),
        (["--workers", "0"], "--workers must be >= 1"),
    ],
)
def test_data_synth_bad_arguments(tmp_path: Path, capsys, args, expected) -> None:
    err = _one_line_error(capsys, ["data", "synth", "--out", str(tmp_path), *args])
    assert expected in err


def test_data_check_names_missing_and_corrupt_images(synthetic_root, tmp_path, capsys) -> None:
    ann = synthetic_root / "annotations" / "instances_val.json"
    images = tmp_path / "val"
    images.mkdir()
    for path in sorted((synthetic_root / "val").glob("*.png"))[1:]:
        (images / path.name).write_bytes(path.read_bytes())
    first = sorted((synthetic_root / "val").glob("*.png"))[0].name
    argv = ["data", "check", "--ann", str(ann), "--images", str(images)]
    assert f"{images / first}: image file not found" in _one_line_error(capsys, argv)
    (images / first).write_bytes(b"\x89PNG broken")
    assert f"{images / first}: cannot read image" in _one_line_error(capsys, argv)
