"""COCO-format detection dataset: any ``instances_*.json`` + image folder (COCO 2017 too).

The annotation file is validated when the dataset is built (readable JSON, required keys, every
annotation pointing at a known image and category), so a bad file fails at once with one line
naming it. Category ids (any, e.g. COCO's non-contiguous 1..90) map to contiguous labels
``1..K`` in sorted id order; ``0`` is background. Crowd boxes are never training targets;
boxes thinner than one pixel are dropped (counted in the log). With ``train=True`` images left
without any box are skipped; for evaluation every image is kept.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools.coco import COCO
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from drcnn.errors import DrcnnError
from drcnn.io import read_json

logger = logging.getLogger("drcnn")

REQUIRED_KEYS = {
    "images": ("id", "file_name"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}


def _read_json(path: Path) -> dict:
    data = read_json(path, "annotation file")
    if not isinstance(data, dict):
        raise DrcnnError(f"{path}: expected a JSON object with images/annotations/categories")
    return data


def _check_coco_dict(data: dict, path: Path | str) -> None:
    """Required keys present, boxes of 4 numbers, references to known images and categories."""
    for section, fields in REQUIRED_KEYS.items():
        entries = data.get(section)
        if not isinstance(entries, list):
            raise DrcnnError(f"{path}: missing list '{section}' (COCO instances format expected)")
        for entry in entries:
            missing = [f for f in fields if not isinstance(entry, dict) or f not in entry]
            if missing:
                raise DrcnnError(f"{path}: an entry of '{section}' lacks {', '.join(missing)}")
    image_ids = {image["id"] for image in data["images"]}
    cat_ids = {cat["id"] for cat in data["categories"]}
    for ann in data["annotations"]:
        box = ann["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(is_number(v) for v in box)):
            raise DrcnnError(f"{path}: annotation {ann['id']}: bbox must be 4 numbers [x, y, w, h]")
        if ann["image_id"] not in image_ids:
            raise DrcnnError(
                f"{path}: annotation {ann['id']} refers to unknown image_id {ann['image_id']}"
            )
        if ann["category_id"] not in cat_ids:
            raise DrcnnError(
                f"{path}: annotation {ann['id']} refers to unknown category_id {ann['category_id']}"
            )


def is_number(value: Any) -> bool:
    """An int or float JSON value (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def load_coco(ann: str | Path | COCO) -> COCO:
    """A validated pycocotools ``COCO`` from a path (an existing ``COCO`` is returned as is)."""
    if isinstance(ann, COCO):
        return ann
    path = Path(ann)
    data = _read_json(path)
    _check_coco_dict(data, path)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        coco.createIndex()
    return coco


def load_rgb(path: Path) -> tv_tensors.Image:
    """Any PIL-readable image (grayscale, RGBA, palette, JPEG, PNG) as a uint8 RGB tensor."""
    try:
        with Image.open(path) as image:
            array = np.array(image.convert("RGB"))
    except FileNotFoundError as exc:
        raise DrcnnError(f"{path}: image file not found") from exc
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DrcnnError(f"{path}: cannot read image ({exc})") from exc
    return tv_tensors.Image(torch.from_numpy(array).permute(2, 0, 1))


class CocoDetection(torch.utils.data.Dataset):
    """``(image, target)`` pairs from a COCO annotation file and its image folder.

    ``image``: ``tv_tensors.Image`` float in ``[0, 1]``, ``(3, H, W)``. ``target``:
    ``{"boxes": BoundingBoxes (XYXY, pixels), "labels": int64 in 1..K, "image_id": int}``.
    ``transforms`` (e.g. :func:`drcnn.data.transforms.build_transforms`) is called as
    ``transforms(image, target)``. ``max_images`` keeps only the first N images (in id order).
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_dir: str | Path,
        transforms: Any = None,
        train: bool = False,
        max_images: int | None = None,
    ) -> None:
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise DrcnnError(f"{self.image_dir}: image folder not found (for {self.ann_file})")
        self.coco = load_coco(self.ann_file)
        self.transforms = transforms
        self.train = train
        self.cat_ids = sorted(self.coco.getCatIds())
        self.class_names = [self.coco.cats[c]["name"] for c in self.cat_ids]
        self.cat_id_to_label = {cat_id: k + 1 for k, cat_id in enumerate(self.cat_ids)}
        self._boxes: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        degenerate = 0
        for image_id in sorted(self.coco.imgs):
            boxes, labels, dropped = self._image_boxes(image_id)
            degenerate += dropped
            self._boxes[image_id] = (boxes, labels)
        if degenerate:
            logger.warning(
                "%s: dropped %d degenerate boxes (width or height < 1 pixel)",
                self.ann_file,
                degenerate,
            )
        ids = [i for i in self._boxes if not train or len(self._boxes[i][1])]
        self.ids = ids[:max_images] if max_images is not None else ids

    @property
    def num_classes(self) -> int:
        """Number of foreground categories K (labels are 1..K)."""
        return len(self.cat_ids)

    def label_to_cat_id(self, label: int) -> int:
        """The annotation file's category id of contiguous label ``label`` (1..K)."""
        return self.cat_ids[int(label) - 1]

    def _image_boxes(self, image_id: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Non-crowd XYXY boxes and labels of one image, and how many degenerate were dropped."""
        anns = [a for a in self.coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
        keep = (xywh[:, 2] >= 1) & (xywh[:, 3] >= 1)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)[keep]
        labels = np.array([self.cat_id_to_label[a["category_id"]] for a in anns], dtype=np.int64)
        return boxes, labels[keep], int((~keep).sum())

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict]:
        image_id = self.ids[index]
        image = load_rgb(self.image_dir / self.coco.imgs[image_id]["file_name"])
        boxes, labels = self._boxes[image_id]
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(boxes), format="XYXY", canvas_size=tuple(image.shape[-2:])
            ),
            "labels": torch.from_numpy(labels),
            "image_id": int(image_id),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        if not image.is_floating_point():
            image = F.to_dtype(image, torch.float32, scale=True)
        return image, target
