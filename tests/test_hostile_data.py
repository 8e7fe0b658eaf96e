"""Hostile-input catalogue, data and evaluation: bad annotation files, result files and images
given to ``drcnn data check``, ``drcnn eval``, ``drcnn infer`` and ``drcnn test``.

Each case must end in exit 2 with one ``error:`` line naming the file and the entry (and field),
change no file and write nothing (:func:`hostile.expect_refusal`). The ground-truth cases edit
the synthetic val annotation file; the images stay those of the shared synthetic dataset.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hostile import expect_refusal
from PIL import Image
from test_coco_eval import without_area_and_iscrowd
from test_train import FASTER, tiny_overrides

from drcnn.cli import main
from drcnn.config import load_config, to_dict
from drcnn.engine.checkpoint import save_checkpoint
from drcnn.engine.infer import infer
from drcnn.models.detector import build_detector

VAL_ANN = Path("annotations") / "instances_val.json"

Edit = Callable[[dict, Path], None]


def _set(*keys: str | int, value: object) -> Edit:
    """An edit that sets ``gt[keys[0]][keys[1]]... = value`` (``value(root)`` if callable)."""

    def edit(gt: dict, root: Path) -> None:
        target = gt
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value(root) if callable(value) else value

    return edit


def _crowd_one_image(gt: dict, root: Path) -> None:
    """1,001 boxes on image 1: one over the per-image cap."""
    template = gt["annotations"][0]
    gt["annotations"] = [
        {**template, "id": i, "image_id": 1, "bbox": [i % 100, 2, 8, 8]} for i in range(1, 1002)
    ]


# name -> (edit of the synthetic val ground truth, regex the error line must match)
GROUND_TRUTH_DEFECTS: dict[str, tuple[Edit, str]] = {
    "nan_box": (
        _set("annotations", 3, "bbox", value=[1, 2, math.nan, 4]),
        r"annotations\[3\]\.bbox must be 4 finite numbers \[x, y, w, h\] .*got \[1, 2, nan, 4\]",
    ),
    "inf_box": (
        _set("annotations", 3, "bbox", value=[math.inf, 2, 3, 4]),
        r"annotations\[3\]\.bbox must be 4 finite .*got \[inf, 2, 3, 4\]",
    ),
    "negative_height": (
        _set("annotations", 3, "bbox", value=[1, 2, 3, -4]),
        r"annotations\[3\]\.bbox .*with w, h >= 0, got \[1, 2, 3, -4\]",
    ),
    "duplicate_image_id": (
        _set("images", 1, "id", value=1),
        r"images\[1\] repeats id 1 of images\[0\]",
    ),
    "duplicate_annotation_id": (
        _set("annotations", 4, "id", value=1),
        r"annotations\[4\] repeats id 1 of annotations\[0\]",
    ),
    "duplicate_category_id": (
        _set("categories", 2, "id", value=1),
        r"categories\[2\] repeats id 1 of categories\[0\]",
    ),
    "float_image_id": (
        _set("images", 0, "id", value=1.0),
        r"images\[0\]\.id must be an integer, got 1\.0",
    ),
    "null_image_id": (
        _set("images", 0, "id", value=None),
        r"images\[0\]\.id must be an integer, got None",
    ),
    "list_image_id": (
        _set("images", 0, "id", value=[1]),
        r"images\[0\]\.id must be an integer, got \[1\]",
    ),
    "string_image_id": (
        _set("images", 2, "id", value="3"),
        r"images\[2\]\.id must be an integer, got '3'",
    ),
    "string_annotation_image_id": (
        _set("annotations", 0, "image_id", value="1"),
        r"annotations\[0\]\.image_id must be an integer, got '1'",
    ),
    "float_category_id": (
        _set("annotations", 0, "category_id", value=1.5),
        r"annotations\[0\]\.category_id must be an integer, got 1\.5",
    ),
    "null_file_name": (
        _set("images", 1, "file_name", value=None),
        r"images\[1\]\.file_name must be a non-empty string, got None",
    ),
    "numeric_file_name": (
        _set("images", 1, "file_name", value=7),
        r"images\[1\]\.file_name must be a non-empty string, got 7",
    ),
    "list_file_name": (
        _set("images", 1, "file_name", value=["a.png"]),
        r"images\[1\]\.file_name must be a non-empty string, got \['a\.png'\]",
    ),
    "nul_file_name": (
        _set("images", 1, "file_name", value="a\0b.png"),
        r"images\[1\]\.file_name must be a name without NUL characters, got 'a\\x00b\.png'",
    ),
    "empty_file_name": (
        _set("images", 1, "file_name", value=""),
        r"images\[1\]\.file_name must be a non-empty string, got ''",
    ),
    # both name an existing image outside the val folder: the old code read it
    "absolute_file_name": (
        _set("images", 1, "file_name", value=lambda root: str(root / "train" / "000000.png")),
        r"images\[1\] \(image id 2\): file_name '/.*/train/000000\.png' must be a path inside the "
        r"image folder",
    ),
    "parent_file_name": (
        _set("images", 1, "file_name", value="../train/000000.png"),
        r"images\[1\] \(image id 2\): file_name '\.\./train/000000\.png' must be a path inside",
    ),
    "string_width": (
        _set("images", 0, "width", value="128"),
        r"images\[0\]\.width must be a positive integer, got '128'",
    ),
    "nan_area": (
        _set("annotations", 5, "area", value=math.nan),
        r"annotations\[5\]\.area must be a finite number >= 0, got nan",
    ),
    "iscrowd_two": (
        _set("annotations", 5, "iscrowd", value=2),
        r"annotations\[5\]\.iscrowd must be 0 or 1, got 2",
    ),
    "null_category_name": (
        _set("categories", 0, "name", value=None),
        r"categories\[0\]\.name must be a string, got None",
    ),
    "too_many_boxes": (
        _crowd_one_image,
        r"image 1 \('000000\.png'\) has 1001 boxes; at most 1000 per image are supported",
    ),
    # the decoded image is 128x128: its boxes would not fit a 100-pixel-wide image
    "size_mismatch": (
        _set("images", 0, "width", value=100),
        r"000000\.png: image 1 decodes to 128x128 pixels .* gives width x height 100x128",
    ),
}


def _bad_ground_truth(root: Path, name: str, out: Path) -> Path:
    """The synthetic val annotation file of ``root`` with defect ``name``, written to ``out``."""
    gt = json.loads((root / VAL_ANN).read_text())
    GROUND_TRUTH_DEFECTS[name][0](gt, root)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(gt))
    return out


@pytest.mark.parametrize("name", GROUND_TRUTH_DEFECTS)
def test_data_check_refuses_bad_ground_truth(synthetic_root, tmp_path, capsys, name) -> None:
    ann = _bad_ground_truth(synthetic_root, name, tmp_path / "ann.json")
    argv = ["data", "check", "--ann", ann, "--images", synthetic_root / "val"]
    err = expect_refusal(argv, capsys, watch=[tmp_path, synthetic_root])
    assert re.search(GROUND_TRUTH_DEFECTS[name][1], err), err
    assert str(synthetic_root / "val" if name == "size_mismatch" else ann) in err


@pytest.mark.parametrize("name", ["nan_box", "duplicate_annotation_id", "string_image_id"])
def test_eval_refuses_bad_ground_truth(synthetic_root, tmp_path, capsys, name) -> None:
    ann = _bad_ground_truth(synthetic_root, name, tmp_path / "ann.json")
    results = tmp_path / "results.json"
    results.write_text(json.dumps(_ground_truth_as_results(synthetic_root)))
    argv = ["eval", "--ann", ann, "--results", results, "--out", tmp_path / "out" / "m.json"]
    err = expect_refusal(argv, capsys, watch=[tmp_path, synthetic_root])
    assert re.search(f"{re.escape(str(ann))}: .*{GROUND_TRUTH_DEFECTS[name][1]}", err), err


@pytest.mark.parametrize("target", ["--ann", "--results"])
def test_eval_refuses_out_over_an_input(synthetic_root, tmp_path, capsys, target) -> None:
    """``--out`` equal to an input would have overwritten it with the metrics."""
    ann = shutil.copy(synthetic_root / VAL_ANN, tmp_path / "ann.json")
    results = tmp_path / "results.json"
    results.write_text(json.dumps(_ground_truth_as_results(synthetic_root)))
    out = {"--ann": ann, "--results": results}[target]
    argv = ["eval", "--ann", ann, "--results", results, "--out", out]
    err = expect_refusal(argv, capsys, watch=[tmp_path])
    assert err.startswith(f"error: {out}: --out would overwrite the "), err


def _ground_truth_as_results(root: Path) -> list[dict]:
    """The val ground truth as a perfect COCO result list (score 1)."""
    gt = json.loads((root / VAL_ANN).read_text())
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1}
        for a in gt["annotations"]
    ]


# name -> (change made to every result entry, regex the error line must match)
RESULT_DEFECTS: dict[str, tuple[dict, str]] = {
    # the reproduction: pycocotools scored this AP 1.0
    "all_nan_boxes": ({"bbox": [math.nan] * 4}, r"entry 0: bbox must be 4 finite numbers .*nan"),
    "inf_box": ({"bbox": [0, 0, math.inf, 5]}, r"entry 0: bbox .*got \[0, 0, inf, 5\]"),
    "negative_width": ({"bbox": [0, 0, -5, 5]}, r"entry 0: bbox .*w, h >= 0, got \[0, 0, -5, 5\]"),
    "null_box": ({"bbox": None}, r"entry 0: bbox must be 4 finite numbers .*got None"),
    "nan_score": ({"score": math.nan}, r"entry 0: score must be a finite number, got nan"),
    "inf_score": ({"score": -math.inf}, r"entry 0: score must be a finite number, got -inf"),
    "string_image_id": ({"image_id": "1"}, r"entry 0: image_id must be an integer, got '1'"),
    "list_image_id": ({"image_id": [1]}, r"entry 0: image_id must be an integer, got \[1\]"),
    "float_category_id": (
        {"category_id": 1.0},
        r"entry 0: category_id must be an integer, got 1\.0",
    ),
}


@pytest.mark.parametrize("name", RESULT_DEFECTS)
def test_eval_refuses_bad_results(synthetic_root, tmp_path, capsys, name) -> None:
    change, pattern = RESULT_DEFECTS[name]
    results = tmp_path / "results.json"
    results.write_text(
        json.dumps([{**r, **change} for r in _ground_truth_as_results(synthetic_root)])
    )
    argv = ["eval", "--ann", synthetic_root / VAL_ANN, "--results", results,
            "--out", tmp_path / "out" / "metrics.json"]  # fmt: skip
    err = expect_refusal(argv, capsys, watch=[tmp_path, synthetic_root])
    assert re.search(f"{re.escape(str(results))}: {pattern}", err), err


def _png_header(width: int, height: int) -> bytes:
    """A 1-bit grayscale PNG that declares ``width`` x ``height`` pixels and holds one byte of
    image data: what PIL reads at open (the size) is that of a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def _write_bad_image(name: str, path: Path) -> tuple[int, int]:
    """Write bad image ``name`` to ``path``; returns the (width, height) it declares."""
    if name in BOMBS:
        path.write_bytes(_png_header(*BOMBS[name]))
        return BOMBS[name]
    pixels = {
        "one_by_5000": np.zeros((1, 5000, 3), np.uint8),
        "float_pixels": np.full((8, 8), 0.5, np.float32),
        "int32_over_16_bit": np.full((8, 8), 70000, np.int32),
    }[name]
    Image.fromarray(pixels).save(path)
    return pixels.shape[1], pixels.shape[0]


# width x height over PIL's MAX_IMAGE_PIXELS (89,478,485): PIL warns; over twice it: PIL raises
BOMBS = {"bomb_over_limit": (10_000, 9_000), "bomb_over_twice_limit": (14_000, 13_000)}
IMAGE_DEFECTS = {
    "one_by_5000": r"5000x1 pixels; the long side may be at most 100 times the short side",
    "bomb_over_limit": r"refused as a possible decompression bomb .*\(90000000 pixels\)",
    "bomb_over_twice_limit": r"refused as a possible decompression bomb .*\(182000000 pixels\)",
    "float_pixels": r"floating-point pixels \(PIL mode F\) have no defined range",
    "int32_over_16_bit": r"32-bit pixel values 70000\.\.70000 lie outside 0\.\.65535",
}
SUFFIX = {"float_pixels": ".tif", "int32_over_16_bit": ".tif"}


def _one_image_dataset(folder: Path, name: str) -> tuple[Path, Path]:
    """``(annotation file, image folder)`` of one bad image ``name`` with a box."""
    (folder / "images").mkdir(parents=True)
    file_name = f"{name}{SUFFIX.get(name, '.png')}"
    width, height = _write_bad_image(name, folder / "images" / file_name)
    ann = {
        "images": [{"id": 1, "file_name": file_name, "width": width, "height": height}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}],
    }
    (folder / "ann.json").write_text(json.dumps(ann))
    return folder / "ann.json", folder / "images"


@pytest.mark.parametrize("name", IMAGE_DEFECTS)
def test_data_check_refuses_bad_images(tmp_path, capsys, name) -> None:
    ann, images = _one_image_dataset(tmp_path, name)
    argv = ["data", "check", "--ann", ann, "--images", images]
    err = expect_refusal(argv, capsys, watch=[tmp_path])
    image = images / f"{name}{SUFFIX.get(name, '.png')}"
    assert re.search(f"^error: {re.escape(str(image))}: {IMAGE_DEFECTS[name]}", err), err


@pytest.fixture(scope="module")
def checkpoint(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised tiny Faster R-CNN saved as a drcnn checkpoint."""
    cfg = load_config(FASTER, tiny_overrides(synthetic_root))
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pth"
    save_checkpoint(path, {"model": build_detector(cfg).state_dict(), "config": to_dict(cfg)})
    return path


@pytest.mark.parametrize("name", ["one_by_5000", "bomb_over_limit", "float_pixels"])
def test_infer_refuses_bad_images(synthetic_root, checkpoint, tmp_path, capsys, name) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    image = inputs / f"{name}{SUFFIX.get(name, '.png')}"
    _write_bad_image(name, image)
    out = tmp_path / "out"
    argv = ["infer", FASTER, checkpoint, image, "--out", out, "--device", "cpu",
            "--set", *tiny_overrides(synthetic_root)]  # fmt: skip
    err = expect_refusal(argv, capsys, watch=[inputs, checkpoint.parent, out], may_create=[out])
    assert re.search(f"^error: {re.escape(str(image))}: {IMAGE_DEFECTS[name]}", err), err


def test_infer_runs_the_most_elongated_image_allowed(checkpoint, tmp_path) -> None:
    """100:1, the limit: the tiny model's resize (max_size 128) leaves it 1 pixel high."""
    Image.new("RGB", (100, 1), (200, 100, 50)).save(tmp_path / "strip.png")
    entries = infer(None, checkpoint, [tmp_path / "strip.png"], tmp_path / "out", device="cpu")
    assert (entries[0]["width"], entries[0]["height"]) == (100, 1)


def _dataset_root(synthetic_root: Path, folder: Path) -> Path:
    """A copy of the synthetic val split (images and annotation file) under ``folder``."""
    shutil.copytree(synthetic_root / "val", folder / "val")
    (folder / VAL_ANN).parent.mkdir(parents=True)
    shutil.copy(synthetic_root / VAL_ANN, folder / VAL_ANN)
    return folder


@pytest.mark.parametrize(
    ("name", "workers"),
    [("nan_box", 0), ("parent_file_name", 0), ("size_mismatch", 0), ("size_mismatch", 1)],
)
def test_test_refuses_bad_ground_truth(
    synthetic_root, checkpoint, tmp_path, capsys, name, workers
) -> None:
    """With a loader worker the error of an image refused in that process must still be one
    line (torch re-raises it with the worker's traceback in the message)."""
    root = _dataset_root(synthetic_root, tmp_path / "data")
    _bad_ground_truth(root, name, root / VAL_ANN)
    shutil.copytree(synthetic_root / "train", root / "train")  # what '../train/...' names
    out = tmp_path / "out"
    argv = ["test", FASTER, checkpoint, "--out", out / "results.bbox.json", "--device", "cpu",
            "--set", *tiny_overrides(root), f"data.workers={workers}"]  # fmt: skip
    err = expect_refusal(argv, capsys, watch=[root, checkpoint.parent, out], may_create=[out])
    assert re.search(GROUND_TRUTH_DEFECTS[name][1], err), err


def test_test_fills_in_missing_area_and_iscrowd(
    synthetic_root, checkpoint, tmp_path, coco_reference
) -> None:
    """Files written by other tools often lack area and iscrowd: ``drcnn test`` failed on them
    after the whole inference. Now it scores what pycocotools gives the file with area = w * h
    and iscrowd = 0 written in."""
    root = _dataset_root(synthetic_root, tmp_path / "data")
    filled = tmp_path / "filled.json"
    without_area_and_iscrowd(root / VAL_ANN, root / VAL_ANN, filled)
    out = tmp_path / "out" / "results.bbox.json"
    argv = ["test", FASTER, checkpoint, "--out", out, "--device", "cpu",
            "--set", *tiny_overrides(root)]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    metrics = json.loads((out.parent / "metrics.json").read_text())
    reference = coco_reference(filled, out)
    assert metrics["AP50"] == max(reference.stats[1], 0.0)
    assert metrics["AR100"] == max(reference.stats[8], 0.0)
