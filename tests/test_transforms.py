"""Transforms move boxes with pixels: a marked rectangle and its box stay aligned."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision import tv_tensors

from drcnn.config import load_config
from drcnn.data.coco import CocoDetection
from drcnn.data.transforms import build_transforms

HEIGHT, WIDTH = 20, 30


def _marked_sample() -> tuple[tv_tensors.Image, dict]:
    """A black float image with a white rectangle on columns 5..9, rows 3..7, and its box;
    plus a box lying outside the image (must be removed with its label)."""
    image = torch.zeros(3, HEIGHT, WIDTH)
    image[:, 3:8, 5:10] = 1.0
    boxes = tv_tensors.BoundingBoxes(
        [[5, 3, 10, 8], [40, 2, 50, 9]], format="XYXY", canvas_size=(HEIGHT, WIDTH)
    )
    return tv_tensors.Image(image), {"boxes": boxes, "labels": torch.tensor([4, 2]), "image_id": 3}


def _pixel_box(image: torch.Tensor) -> list[float]:
    """XYXY box of the image's non-zero pixels (edges at pixel borders)."""
    ys, xs = torch.nonzero(image.sum(0) > 0, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_training_flip_moves_box_with_pixels() -> None:
    transforms = build_transforms(load_config(None, ["data.flip_prob=1.0"]), train=True)
    image, target = transforms(*_marked_sample())
    assert image.dtype == torch.float32 and image.max() == 1.0
    # hand-worked: columns 5..9 of a 30-wide image flip to 20..24
    assert torch.all(image[:, 3:8, 20:25] == 1.0) and image.sum() == 3 * 25
    assert target["boxes"].tolist() == [[20, 3, 25, 8]] == [_pixel_box(image)]
    assert target["labels"].tolist() == [4]  # the outside box went with its label
    assert target["image_id"] == 3


def test_evaluation_never_flips() -> None:
    transforms = build_transforms(load_config(None, ["data.flip_prob=1.0"]), train=False)
    image, target = transforms(*_marked_sample())
    assert target["boxes"].tolist() == [[5, 3, 10, 8]] == [_pixel_box(image)]
    assert image.shape == (3, HEIGHT, WIDTH)  # no resizing in the data pipeline


def test_flip_probability_zero_keeps_image() -> None:
    transforms = build_transforms(load_config(None, ["data.flip_prob=0"]), train=True)
    image, target = transforms(*_marked_sample())
    assert target["boxes"].tolist() == [[5, 3, 10, 8]] == [_pixel_box(image)]


def test_dataset_flip_mirrors_image_and_boxes(synthetic_root: Path) -> None:
    cfg = load_config(None, ["data.flip_prob=1.0"])
    args = (synthetic_root / "annotations" / "instances_train.json", synthetic_root / "train")
    plain = CocoDetection(*args, train=True)
    flipped = CocoDetection(*args, transforms=build_transforms(cfg, train=True), train=True)
    image, target = plain[0]
    image_f, target_f = flipped[0]
    assert torch.equal(image_f, image.flip(-1))
    width = image.shape[-1]
    x1, y1, x2, y2 = target["boxes"].unbind(1)
    expected = torch.stack([width - x2, y1, width - x1, y2], dim=1)
    assert torch.equal(target_f["boxes"].as_subclass(torch.Tensor), expected)
    assert torch.equal(target_f["labels"], target["labels"])
