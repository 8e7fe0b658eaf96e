"""COCO dataset: id <-> label mapping, crowd/degenerate/empty handling, image modes, errors,
and the config-driven dataset/loader builders."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler
from torchvision import tv_tensors

from drcnn.config import load_config
from drcnn.data.coco import CocoDetection
from drcnn.data.loader import build_dataloader, build_dataset
from drcnn.engine import evaluate
from drcnn.engine.infer import load_image as infer_load_image
from drcnn.errors import DrcnnError

GRAY, RGBA, PALETTE_RGB = 128, (10, 200, 30, 77), (250, 5, 90)


def _write_images(folder: Path) -> None:
    """Image 10: grayscale PNG; 11: RGBA PNG; 12: palette PNG; 13: JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("L", (40, 30), GRAY).save(folder / "gray.png")
    Image.new("RGBA", (40, 30), RGBA).save(folder / "rgba.png")
    palette = Image.new("P", (40, 30), 3)
    palette.putpalette([0, 0, 0] * 3 + list(PALETTE_RGB) + [0, 0, 0] * 252)
    palette.save(folder / "palette.png")
    Image.new("RGB", (40, 30), (0, 0, 255)).save(folder / "photo.jpg")


def _coco(**overrides) -> dict:
    data = {
        "images": [
            {"id": 10, "file_name": "gray.png", "width": 40, "height": 30},
            {"id": 11, "file_name": "rgba.png", "width": 40, "height": 30},
            {"id": 12, "file_name": "palette.png", "width": 40, "height": 30},
            {"id": 13, "file_name": "photo.jpg", "width": 40, "height": 30},
        ],
        # non-contiguous, unsorted ids: labels follow sorted ids 2 -> 1, 7 -> 2, 40 -> 3
        "categories": [{"id": 7, "name": "b"}, {"id": 2, "name": "a"}, {"id": 40, "name": "c"}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 40, "bbox": [3, 4, 10, 6], "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 7, "bbox": [0, 0, 20, 20], "iscrowd": 1},
            {"id": 3, "image_id": 10, "category_id": 2, "bbox": [5, 5, 0.5, 9], "iscrowd": 0},
            {"id": 4, "image_id": 10, "category_id": 2, "bbox": [20, 10, 8, 12.5], "iscrowd": 0},
            {"id": 5, "image_id": 11, "category_id": 7, "bbox": [1, 1, 5, 5], "iscrowd": 1},
            {"id": 6, "image_id": 13, "category_id": 7, "bbox": [2, 3, 4, 0.2]},
        ],
    }
    data.update(overrides)
    return data


@pytest.fixture
def handmade(tmp_path: Path) -> tuple[Path, Path]:
    _write_images(tmp_path / "images")
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(_coco()))
    return ann, tmp_path / "images"


def test_category_ids_map_to_contiguous_labels(handmade) -> None:
    dataset = CocoDetection(*handmade)
    assert dataset.cat_ids == [2, 7, 40]
    assert dataset.class_names == ["a", "b", "c"]
    assert dataset.num_classes == 3
    assert [dataset.label_to_cat_id(k) for k in (1, 2, 3)] == [2, 7, 40]
    _, target = dataset[dataset.ids.index(10)]
    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes)
    assert target["boxes"].format == tv_tensors.BoundingBoxFormat.XYXY
    assert target["boxes"].canvas_size == (30, 40)
    # crowd box (id 2) and the 0.5-pixel-wide box (id 3) are gone; xywh -> xyxy by hand
    assert target["boxes"].tolist() == [[3, 4, 13, 10], [20, 10, 28, 22.5]]
    assert target["labels"].tolist() == [3, 1]
    assert target["labels"].dtype == torch.int64
    assert target["image_id"] == 10


def test_train_skips_images_without_usable_boxes_eval_keeps_them(handmade, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="drcnn"):
        train = CocoDetection(*handmade, train=True)
    assert "dropped 2 degenerate boxes" in caplog.text
    assert train.ids == [10]  # 11: crowd only, 12: nothing, 13: degenerate only
    evaluation = CocoDetection(*handmade, train=False)
    assert evaluation.ids == [10, 11, 12, 13]
    _, target = evaluation[1]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert CocoDetection(*handmade, max_images=2).ids == [10, 11]


def test_every_image_mode_becomes_float_rgb(handmade) -> None:
    dataset = CocoDetection(*handmade)
    expected = {10: (GRAY,) * 3, 11: RGBA[:3], 12: PALETTE_RGB}
    for index, image_id in enumerate(dataset.ids):
        image, _ = dataset[index]
        assert isinstance(image, tv_tensors.Image)
        assert image.shape == (3, 30, 40) and image.dtype == torch.float32
        assert image.min() >= 0 and image.max() <= 1
        if image_id in expected:
            want = torch.tensor(expected[image_id], dtype=torch.float32) / 255
            assert torch.allclose(image[:, 7, 9], want)
        else:  # JPEG: lossy, but clearly blue
            assert image[2].mean() > 0.9 and image[0].mean() < 0.1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"categories": None}, "missing list 'categories'"),
        ({"images": [{"id": 10}]}, "lacks file_name"),
        (
            {"annotations": [{"id": 1, "image_id": 99, "category_id": 2, "bbox": [0, 0, 1, 1]}]},
            "unknown image_id 99",
        ),
        (
            {"annotations": [{"id": 1, "image_id": 10, "category_id": 5, "bbox": [0, 0, 1, 1]}]},
            "unknown category_id 5",
        ),
        (
            {"annotations": [{"id": 1, "image_id": 10, "category_id": 2, "bbox": [0, 0, 1]}]},
            "bbox must be 4 finite numbers",
        ),
    ],
)
def test_bad_annotation_files_fail_at_construction(handmade, change, message) -> None:
    ann, images = handmade
    ann.write_text(json.dumps({k: v for k, v in _coco(**change).items() if v is not None}))
    with pytest.raises(DrcnnError, match=message) as info:
        CocoDetection(ann, images)
    assert str(ann) in str(info.value) and "\n" not in str(info.value)


def test_unreadable_annotation_file_and_missing_folder(handmade, tmp_path: Path) -> None:
    ann, images = handmade
    with pytest.raises(DrcnnError, match="annotation file not found"):
        CocoDetection(tmp_path / "nope.json", images)
    ann.write_text("{not json")
    with pytest.raises(DrcnnError, match="not a valid JSON"):
        CocoDetection(ann, images)
    with pytest.raises(DrcnnError, match="image folder not found"):
        CocoDetection(ann, tmp_path / "no_images")


def test_missing_or_corrupt_image_fails_when_loaded_naming_the_file(handmade) -> None:
    ann, images = handmade
    dataset = CocoDetection(ann, images)  # construction does not read images
    (images / "gray.png").unlink()
    (images / "rgba.png").write_bytes(b"not a png at all")
    with pytest.raises(DrcnnError, match=r"gray\.png: image file not found"):
        dataset[0]
    with pytest.raises(DrcnnError, match=r"rgba\.png: cannot read image"):
        dataset[1]


def _single_image_dataset(folder: Path, image: Image.Image, size: tuple[int, int], **save) -> Path:
    """``folder/ann.json`` for one image ``img.png`` (saved with ``save`` options) whose
    annotation gives ``size`` (width, height) and one box; returns the annotation file."""
    (folder / "images").mkdir(parents=True)
    image.save(folder / "images" / "img.png", **save)
    ann = {
        "images": [{"id": 1, "file_name": "img.png", "width": size[0], "height": size[1]}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 2]}],
    }
    (folder / "ann.json").write_text(json.dumps(ann))
    return folder / "ann.json"


def _both_loaders(folder: Path) -> list[torch.Tensor]:
    """The image of a :func:`_single_image_dataset` as the dataset and ``drcnn infer`` load it."""
    dataset_image, _ = CocoDetection(folder / "ann.json", folder / "images")[0]
    return [
        dataset_image.as_subclass(torch.Tensor),
        infer_load_image(folder / "images" / "img.png"),
    ]


def test_16_bit_png_scales_by_65535_like_its_8_bit_twin(tmp_path: Path) -> None:
    """A 16-bit gradient v * 257 (PIL mode I;16) must decode like the 8-bit gradient v."""
    levels = np.arange(24 * 32, dtype=np.int64).reshape(24, 32) % 256
    _single_image_dataset(
        tmp_path / "16", Image.fromarray((levels * 257).astype(np.uint16)), (32, 24)
    )
    _single_image_dataset(tmp_path / "8", Image.fromarray(levels.astype(np.uint8)), (32, 24))
    assert Image.open(tmp_path / "16" / "images" / "img.png").mode == "I;16"
    reference = torch.from_numpy(levels / 255).float().expand(3, -1, -1)
    for eight_bit, sixteen_bit in zip(
        _both_loaders(tmp_path / "8"), _both_loaders(tmp_path / "16"), strict=True
    ):
        assert sixteen_bit.shape == (3, 24, 32) and sixteen_bit.dtype == torch.float32
        torch.testing.assert_close(sixteen_bit, reference, rtol=0, atol=1e-7)
        torch.testing.assert_close(sixteen_bit, eight_bit, rtol=0, atol=1e-7)


def test_16_bit_pgm_read_as_mode_i_scales_by_65535(tmp_path: Path) -> None:
    """PIL opens a 16-bit PGM as 32-bit mode I: values 0..65535 still mean 16 bits."""
    values = np.array([[0, 1, 257], [32768, 65534, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "gray16.pgm")
    assert Image.open(tmp_path / "gray16.pgm").mode == "I"
    image = infer_load_image(tmp_path / "gray16.pgm")
    expected = torch.from_numpy(values / 65535).float().expand(3, -1, -1)
    torch.testing.assert_close(image, expected, rtol=0, atol=1e-7)


def test_long_side_at_most_100_times_the_short_side(tmp_path: Path) -> None:
    Image.new("RGB", (100, 1)).save(tmp_path / "ok.png")
    Image.new("RGB", (1, 101)).save(tmp_path / "thin.png")
    assert infer_load_image(tmp_path / "ok.png").shape == (3, 1, 100)
    with pytest.raises(DrcnnError, match=r"thin\.png: 1x101 pixels; the long side may be at most"):
        infer_load_image(tmp_path / "thin.png")


def _upright() -> Image.Image:
    """A 40x30 black image with a red block in the top-left corner (orientation visible)."""
    image = Image.new("RGB", (40, 30))
    image.paste((255, 0, 0), (0, 0, 10, 5))
    return image


def test_exif_orientation_is_applied_by_both_loaders(tmp_path: Path) -> None:
    """EXIF orientation 6 (rotate 90 degrees clockwise to display): the pixels stored on disk
    are the upright image turned 90 degrees counter-clockwise; both loaders return it upright,
    at the displayed size the annotation gives."""
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = _upright().transpose(Image.Transpose.ROTATE_90)
    _single_image_dataset(tmp_path, stored, (40, 30), exif=exif)
    upright = torch.from_numpy(np.array(_upright())).permute(2, 0, 1).float() / 255
    for image in _both_loaders(tmp_path):
        assert torch.equal(image, upright)


def test_decoded_size_must_match_the_annotation(tmp_path: Path) -> None:
    """An annotation giving the stored size of an EXIF-rotated image: its boxes would not fit."""
    exif = Image.Exif()
    exif[0x0112] = 6
    ann = _single_image_dataset(
        tmp_path, _upright().transpose(Image.Transpose.ROTATE_90), (30, 40), exif=exif
    )
    dataset = CocoDetection(ann, tmp_path / "images")
    with pytest.raises(DrcnnError, match=r"img\.png: image 1 decodes to 40x30 pixels .* 30x40"):
        dataset[0]


def test_missing_area_and_iscrowd_are_filled_in(handmade) -> None:
    """As pycocotools' loadRes fills results: area = box width x height, iscrowd = 0; given
    values are kept."""
    ann, images = handmade
    anns = CocoDetection(ann, images).coco.anns
    assert anns[6]["iscrowd"] == 0 and anns[6]["area"] == 4 * 0.2
    assert anns[1]["area"] == 10 * 6 and anns[2]["iscrowd"] == 1


def test_box_count_per_image_is_capped(handmade) -> None:
    """At most MAX_BOXES_PER_IMAGE (1,000) boxes per image: the RPN's box-anchor IoU matrix."""
    ann, images = handmade

    def with_boxes(count: int) -> None:
        boxes = [
            {"id": i, "image_id": 12, "category_id": 2, "bbox": [i % 30, 1, 5, 5]}
            for i in range(1, count + 1)
        ]
        ann.write_text(json.dumps(_coco(annotations=boxes)))

    with_boxes(1000)
    assert len(CocoDetection(ann, images)[2][1]["boxes"]) == 1000
    with_boxes(1001)
    with pytest.raises(
        DrcnnError, match=r"image 12 \('palette.png'\) has 1001 boxes; at most 1000"
    ):
        CocoDetection(ann, images)


def _cfg(root: Path, *overrides: str):
    return load_config(
        None, [f"data.root={root}", "model.roi_head.num_classes=8", "data.workers=0", *overrides]
    )


def test_build_dataset_from_config(synthetic_root: Path) -> None:
    train = build_dataset(_cfg(synthetic_root), "train")
    assert train.train and train.num_classes == 8
    assert train.cat_ids == [1, 3, 5, 7, 9, 11, 13, 15]
    val = build_dataset(_cfg(synthetic_root, "data.max_val_images=3"), "val")
    assert len(val) == 3 and not val.train
    # absolute annotation/image paths stay as they are, whatever the root
    absolute = _cfg(
        "/nonexistent-root",
        f"data.val_ann={synthetic_root / 'annotations' / 'instances_val.json'}",
        f"data.val_images={synthetic_root / 'val'}",
    )
    assert len(build_dataset(absolute, "val")) == 8


def test_build_dataset_errors(synthetic_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DrcnnError, match=r"8 categories.*num_classes is 80"):
        build_dataset(_cfg(synthetic_root, "model.roi_head.num_classes=80"), "train")
    with pytest.raises(
        DrcnnError, match=re.escape(f"run `drcnn data synth --out {tmp_path / 'x'}`")
    ):
        build_dataset(_cfg(tmp_path / "x"), "train")
    with pytest.raises(DrcnnError, match="expected one of train, val"):
        build_dataset(_cfg(synthetic_root), "test")


def test_dataloader_batches_lists(synthetic_root: Path) -> None:
    cfg = _cfg(synthetic_root, "data.batch_size=3", "data.test_batch_size=2", "data.flip_prob=0")
    images, targets = next(iter(build_dataloader(cfg, "train")))
    assert len(images) == len(targets) == 3
    assert all(type(image) is torch.Tensor and image.shape == (3, 128, 128) for image in images)
    assert all(type(t["boxes"]) is torch.Tensor and t["boxes"].shape[1] == 4 for t in targets)
    loader = build_dataloader(cfg, "val")
    batches = list(loader)
    assert [len(b[0]) for b in batches] == [2, 2, 2, 2]
    # val is not shuffled: image ids come in dataset order
    assert [t["image_id"] for b in batches for t in b[1]] == loader.dataset.ids
    # the val loader's images are the dataset's own pixels (no flip, no resize)
    image, _ = loader.dataset[0]
    assert torch.equal(batches[0][0][0], image.as_subclass(torch.Tensor))


def test_val_loader_takes_test_workers_when_set(synthetic_root: Path) -> None:
    """``data.test_workers`` sets the val loader's worker count (0: loads in this process, no
    worker to start); unset, the val loader has ``data.workers``; training keeps
    ``data.workers`` either way."""
    cfg = _cfg(synthetic_root, "data.workers=2", "data.test_workers=0")
    assert build_dataloader(cfg, "val").num_workers == 0
    assert build_dataloader(cfg, "train").num_workers == 2
    assert build_dataloader(_cfg(synthetic_root, "data.workers=2"), "val").num_workers == 2
    with pytest.raises(DrcnnError, match=r"data\.test_workers"):
        _cfg(synthetic_root, "data.test_workers=-1")


def test_val_loader_pins_memory_only_for_a_cuda_run(synthetic_root: Path, monkeypatch) -> None:
    """On a GPU machine a CPU run's val loader does not pin (pinning starts a CUDA context);
    evaluation asks for pinning when it runs on CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine
    cfg = _cfg(synthetic_root)
    assert not build_dataloader(cfg, "val").pin_memory
    assert build_dataloader(cfg, "val", pin_memory=True).pin_memory
    asked = []

    def capture(*args, **kwargs):
        asked.append(kwargs["pin_memory"])
        raise RuntimeError("loader built")

    monkeypatch.setattr(evaluate, "build_dataloader", capture)
    for device in ("cpu", "cuda:0"):
        with pytest.raises(RuntimeError, match="loader built"):
            evaluate.predict(torch.nn.Identity(), cfg, device)
    assert asked == [False, True]


def test_distributed_loader_uses_a_distributed_sampler(synthetic_root: Path, tmp_path) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1
    )
    try:
        loader = build_dataloader(_cfg(synthetic_root), "train", distributed=True)
        assert isinstance(loader.sampler, DistributedSampler) and loader.sampler.shuffle
        loader.sampler.set_epoch(1)
        first = list(loader.sampler)
        loader.sampler.set_epoch(2)
        assert sorted(first) == sorted(loader.sampler) == list(range(len(loader.dataset)))
    finally:
        torch.distributed.destroy_process_group()
