"""Synthetic dataset: determinism, COCO validity, scale coverage, visible-pixel boxes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from drcnn.data.synthetic import (
    MIN_VISIBLE_FRACTION,
    SHAPES,
    ShapePose,
    ensure_synthetic_dataset,
    generate_synthetic_coco,
    image_rng,
    occlusion_ok,
    render_mask,
    render_scene,
    visible_parts,
)
from drcnn.errors import DrcnnError


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _extent_box(mask: np.ndarray) -> list[int]:
    """COCO [x, y, w, h] of a mask's pixels, straight from np.nonzero."""
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_same_seed_same_files_whatever_the_worker_count(tmp_path: Path) -> None:
    generate_synthetic_coco(tmp_path / "a", 6, 3, seed=5, size=96, workers=1)
    generate_synthetic_coco(tmp_path / "b", 6, 3, seed=5, size=96, workers=2)
    generate_synthetic_coco(tmp_path / "c", 6, 3, seed=6, size=96, workers=1)
    a, b, c = (_tree(tmp_path / name) for name in "abc")
    assert len(a) == 6 + 3 + 2
    assert a == b
    assert a.keys() == c.keys()
    assert a["annotations/instances_train.json"] != c["annotations/instances_train.json"]


def test_pycocotools_reads_it_and_categories_are_shape_classes(synthetic_root: Path) -> None:
    for split, count in (("train", 16), ("val", 8)):
        coco = COCO(str(synthetic_root / "annotations" / f"instances_{split}.json"))
        assert sorted(coco.getCatIds()) == [1, 3, 5, 7, 9, 11, 13, 15]
        assert [coco.cats[i]["name"] for i in sorted(coco.cats)] == list(SHAPES)
        assert len(coco.getImgIds()) == count
        assert len(coco.getAnnIds()) > count  # several objects per image
        for image in coco.imgs.values():
            with Image.open(synthetic_root / split / image["file_name"]) as pil:
                assert pil.size == (image["width"], image["height"]) == (128, 128)
                assert pil.mode == "RGB"
        for ann in coco.anns.values():
            x, y, w, h = ann["bbox"]
            assert ann["iscrowd"] == 0
            assert min(x, y) >= 0 and max(x + w, y + h) <= 128
            assert 0 < ann["area"] <= w * h


def test_all_coco_size_ranges_present_at_256(tmp_path: Path) -> None:
    generate_synthetic_coco(tmp_path, 30, 0, seed=1, size=256, workers=2)
    anns = json.loads((tmp_path / "annotations" / "instances_train.json").read_text())
    areas = np.array([a["area"] for a in anns["annotations"]])
    assert (areas < 32**2).sum() > 0
    assert ((areas >= 32**2) & (areas <= 96**2)).sum() > 0
    assert (areas > 96**2).sum() > 0
    widths = np.array([a["bbox"][2] for a in anns["annotations"]], dtype=float)
    heights = np.array([a["bbox"][3] for a in anns["annotations"]], dtype=float)
    ratios = widths / heights
    assert ratios.min() < 0.6 and ratios.max() > 1.7  # stretched shapes


def test_box_of_a_rendered_square_is_tight() -> None:
    # axis-aligned square stretched to half-extents (20, 10) around (50, 40): PIL fills the
    # polygon including its edges, so columns 30..70 and rows 30..50 (hand-worked)
    mask = render_mask("square", ShapePose(cx=50, cy=40, rx=20, ry=10, angle=0.0), size=128)
    assert _extent_box(mask) == [30, 30, 41, 21]
    label_map = mask.astype(np.int16)
    [(bbox, area)] = visible_parts(label_map, 1)
    assert bbox == [30, 30, 41, 21]
    assert area == 41 * 21 == mask.sum()


@pytest.mark.parametrize("shape", SHAPES)
def test_box_of_each_rotated_shape_equals_its_pixel_extent(shape: str) -> None:
    mask = render_mask(shape, ShapePose(cx=60, cy=70, rx=30, ry=14, angle=0.7), size=128)
    [(bbox, area)] = visible_parts(mask.astype(np.int16), 1)
    assert bbox == _extent_box(mask)
    assert area == mask.sum()


def test_occlusion_hand_worked() -> None:
    label_map = np.zeros((40, 40), dtype=np.int16)
    label_map[10:30, 10:30] = 1  # a 20x20 square ...
    label_map[0:40, 20:40] = 2  # ... whose right half is covered by a later object
    (box1, area1), (box2, area2) = visible_parts(label_map, 2)
    assert box1 == [10, 10, 10, 20] and area1 == 200
    assert box2 == [20, 0, 20, 40] and area2 == 800
    assert occlusion_ok(label_map, [400, 800])  # exactly half visible: kept
    label_map[0:40, 18:20] = 2  # now only 160 of 400 pixels visible
    assert not occlusion_ok(label_map, [400, 800])
    label_map[10:30, 10:18] = 2  # fully hidden
    assert visible_parts(label_map, 1) == [([0, 0, 0, 0], 0)]


@pytest.mark.parametrize("index", range(6))
def test_scene_boxes_are_tight_to_visible_pixels(index: int) -> None:
    """Re-render every placed object, paint them in order with numpy, and compare each
    annotation with the extent of what stays visible."""
    size = 160
    scene = render_scene(image_rng(3, "train", index), size)
    owner = np.zeros((size, size), dtype=int)
    full = []
    for i, (shape, pose) in enumerate(scene.placed):
        mask = render_mask(shape, pose, size)
        owner[mask] = i + 1
        full.append(mask.sum())
    assert len(scene.objects) == len(scene.placed)
    for i, obj in enumerate(scene.objects):
        visible = owner == i + 1
        assert obj["bbox"] == _extent_box(visible)
        assert obj["area"] == visible.sum() >= MIN_VISIBLE_FRACTION * full[i]
        assert obj["category_id"] == 2 * SHAPES.index(scene.placed[i][0]) + 1


def test_scenes_have_several_objects_and_some_overlap() -> None:
    counts, overlaps = [], 0
    for index in range(8):
        scene = render_scene(image_rng(0, "val", index), 128)
        counts.append(len(scene.objects))
        overlaps += sum(obj["area"] < obj["bbox"][2] * obj["bbox"][3] for obj in scene.objects)
    assert np.mean(counts) >= 2
    assert overlaps > 0


def test_ensure_generates_only_when_missing(tmp_path: Path, synthetic_root: Path) -> None:
    before = _tree(synthetic_root)
    ensure_synthetic_dataset(synthetic_root, 16, 8, seed=0, size=128)  # the fixture's settings
    assert _tree(synthetic_root) == before
    root = ensure_synthetic_dataset(tmp_path / "new", 3, 2, seed=9, size=64)
    assert len(json.loads((root / "annotations" / "instances_val.json").read_text())["images"]) == 2


@pytest.mark.parametrize(
    ("asked", "named"),
    [
        ({"num_train": 17}, "generated with num_train=16, but num_train=17 was asked for"),
        (
            {"num_val": 4, "seed": 3},
            "generated with num_val=8, seed=0, but num_val=4, seed=3 was asked for",
        ),
        ({"size": 256}, "generated with size=128, but size=256 was asked for"),
    ],
)
def test_ensure_refuses_a_dataset_generated_otherwise(
    synthetic_root: Path, asked: dict, named: str
) -> None:
    """An existing folder of other settings is an error naming them, and is left untouched."""
    before = _tree(synthetic_root)
    settings = {"num_train": 16, "num_val": 8, "seed": 0, "size": 128, **asked}
    with pytest.raises(DrcnnError, match=re.escape(f"synthetic dataset {synthetic_root}: {named}")):
        ensure_synthetic_dataset(synthetic_root, **settings)
    assert _tree(synthetic_root) == before


def test_ensure_refuses_a_dataset_of_an_older_generator(tmp_path: Path) -> None:
    generate_synthetic_coco(tmp_path, 2, 1, seed=0, size=64, workers=1)
    path = tmp_path / "annotations" / "instances_val.json"
    coco = json.loads(path.read_text())
    coco["info"]["version"] = "0"
    path.write_text(json.dumps(coco))
    expected = "generated with generator_version=0, but generator_version=1 was asked for"
    with pytest.raises(DrcnnError, match=expected):
        ensure_synthetic_dataset(tmp_path, 2, 1, seed=0, size=64)


def test_ensure_names_annotation_files_it_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "annotations").mkdir()
    for split in ("train", "val"):
        (tmp_path / "annotations" / f"instances_{split}.json").write_text('{"images": []}')
    with pytest.raises(
        DrcnnError, match=r"instances_train\.json is not an annotation file of drcnn"
    ):
        ensure_synthetic_dataset(tmp_path, 3, 2)


def test_generating_over_a_dataset_needs_overwrite(tmp_path: Path) -> None:
    generate_synthetic_coco(tmp_path, 3, 2, seed=1, size=64, workers=1)
    before = _tree(tmp_path)
    with pytest.raises(DrcnnError, match=re.escape(f"{tmp_path} already holds a dataset")):
        generate_synthetic_coco(tmp_path, 3, 2, seed=2, size=64, workers=1)
    assert _tree(tmp_path) == before
    generate_synthetic_coco(tmp_path, 3, 2, seed=2, size=64, workers=1, overwrite=True)
    val = json.loads((tmp_path / "annotations" / "instances_val.json").read_text())
    assert val["info"]["seed"] == 2 and _tree(tmp_path) != before
