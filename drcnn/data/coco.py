"""COCO-format detection dataset: any ``instances_*.json`` + image folder (COCO 2017 too).

The annotation file is validated when the dataset is built, so a bad file fails at once with
one line naming it and the offending entry (``annotations[12].bbox``): readable JSON, required
keys, integer ids used once per section, annotations pointing at known images and categories
with finite, non-negative boxes. Absent ``area`` (box width x height) and ``iscrowd`` (0) are
filled in, as pycocotools fills them for results. A ``file_name`` must be a relative path
without ``..``: an annotation file cannot make drcnn read outside the image folder. The check
is on the name, not the resolved path, so symbolic links inside the folder (a dataset linked
from another disk, git-annex or DVC files) are followed as the folder's owner set them up.

Category ids (any, e.g. COCO's non-contiguous 1..90) map to contiguous labels ``1..K`` in
sorted id order; ``0`` is background. Crowd boxes are never training targets; boxes thinner
than one pixel are dropped (counted in the log). With ``train=True`` images left without any
box are skipped; for evaluation every image is kept. An image may have at most
``MAX_BOXES_PER_IMAGE`` boxes. Images are decoded by :func:`drcnn.data.images.load_image`
(EXIF orientation applied) and must have the annotation's ``width`` and ``height``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import reprlib
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from torchvision import tv_tensors

from drcnn.data.images import load_image
from drcnn.errors import DrcnnError
from drcnn.io import read_json

logger = logging.getLogger("drcnn")

REQUIRED_KEYS = {
    "images": ("id", "file_name"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}
# Ground-truth boxes of one image at most. Training compares every box with every anchor (the
# RPN's IoU matrix and its temporaries: about 7 GB at 1,000 boxes on an 800x1333 image), so a
# file with 100,000 boxes in one image would exhaust memory mid-run. COCO has at most 93 boxes
# per image, LVIS and Objects365 a few hundred, dense retail shelves (SKU-110K) about 700.
MAX_BOXES_PER_IMAGE = 1000
BOX_EXPECTED = "4 finite numbers [x, y, w, h] with w, h >= 0"


def _read_json(path: Path) -> dict:
    data = read_json(path, "annotation file")
    if not isinstance(data, dict):
        raise DrcnnError(f"{path}: expected a JSON object with images/annotations/categories")
    return data


def is_number(value: Any) -> bool:
    """An int or float JSON value (not a bool)."""
    return isinstance(value, int | float) and type(value) is not bool


def is_int(value: Any) -> bool:
    """An integer JSON value (not a bool, not a float such as ``1.0``)."""
    return isinstance(value, int) and type(value) is not bool


def is_box(value: Any) -> bool:
    """A COCO box ``[x, y, w, h]``: 4 finite numbers, width and height not negative (NaN boxes
    would match everything in pycocotools, whose IoU test ``iou < threshold`` is false for NaN).
    Written as a loop: it runs once per box of files with a million boxes."""
    if not (isinstance(value, list) and len(value) == 4):
        return False
    for v in value:
        if not (is_number(v) and math.isfinite(v)):
            return False
    return value[2] >= 0 and value[3] >= 0


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 200  # whole file names; huge values cut


def show(value: Any) -> str:
    """A value as it appears in an error message: ``repr`` (quoted strings), shortened."""
    return _SHORT_REPR.repr(value)


def field_error(path: Path | str, where: str, expected: str, value: Any) -> DrcnnError:
    """``<file>: <where> must be <expected>, got <value>`` (``where``: entry and field)."""
    return DrcnnError(f"{path}: {where} must be {expected}, got {show(value)}")


def _check_coco_dict(data: dict, path: Path | str) -> None:
    """Every section a list of entries with the required keys and well-typed, unique ids; images
    with safe file names; annotations with finite boxes referring to known images and
    categories. Fills in ``area`` and ``iscrowd`` where absent (see :func:`_fill_defaults`)."""
    for section, fields in REQUIRED_KEYS.items():
        entries = data.get(section)
        if not isinstance(entries, list):
            raise DrcnnError(f"{path}: missing list '{section}' (COCO instances format expected)")
        for index, entry in enumerate(entries):
            missing = [f for f in fields if not isinstance(entry, dict) or f not in entry]
            if missing:
                raise DrcnnError(f"{path}: {section}[{index}] lacks {', '.join(missing)}")
        _check_unique_ids(entries, section, path)
    for index, image in enumerate(data["images"]):
        _check_image(image, f"images[{index}]", path)
    for index, category in enumerate(data["categories"]):
        if not isinstance(category["name"], str):
            raise field_error(path, f"categories[{index}].name", "a string", category["name"])
    image_ids = {image["id"] for image in data["images"]}
    cat_ids = {cat["id"] for cat in data["categories"]}
    for index, ann in enumerate(data["annotations"]):
        _check_annotation(ann, f"annotations[{index}]", path, image_ids, cat_ids)
    _fill_defaults(data["annotations"])


def _check_unique_ids(entries: list[dict], section: str, path: Path | str) -> None:
    """Integer ids, each used once (pycocotools indexes by id: a repeated image id pairs one
    image's boxes with another file, a repeated annotation id drops a box from evaluation)."""
    first: dict[int, int] = {}
    for index, entry in enumerate(entries):
        entry_id = entry["id"]
        if not is_int(entry_id):
            raise field_error(path, f"{section}[{index}].id", "an integer", entry_id)
        if entry_id in first:
            raise DrcnnError(
                f"{path}: {section}[{index}] repeats id {entry_id} of {section}[{first[entry_id]}]"
            )
        first[entry_id] = index


def _check_image(image: dict, entry: str, path: Path | str) -> None:
    """A relative ``file_name`` that stays inside the image folder; ``width``/``height``, where
    given, positive integers."""
    name = image["file_name"]
    if not isinstance(name, str) or not name:
        raise field_error(path, f"{entry}.file_name", "a non-empty string", name)
    if "\0" in name:
        raise field_error(path, f"{entry}.file_name", "a name without NUL characters", name)
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise DrcnnError(
            f"{path}: {entry} (image id {image['id']}): file_name {show(name)} must be a path "
            "inside the image folder (relative, without '..')"
        )
    for field in ("width", "height"):
        if field in image and not (is_int(image[field]) and image[field] >= 1):
            raise field_error(path, f"{entry}.{field}", "a positive integer", image[field])


def _check_annotation(
    ann: dict, entry: str, path: Path | str, image_ids: set[int], cat_ids: set[int]
) -> None:
    """Known ``image_id`` and ``category_id``, a finite box, and ``area`` / ``iscrowd``, where
    given, of the types pycocotools expects."""
    _check_reference(ann, "image_id", image_ids, entry, path)
    _check_reference(ann, "category_id", cat_ids, entry, path)
    if not is_box(ann["bbox"]):
        raise field_error(path, f"{entry}.bbox", BOX_EXPECTED, ann["bbox"])
    area = ann.get("area", 0)
    if not (is_number(area) and 0 <= area < math.inf):
        raise field_error(path, f"{entry}.area", "a finite number >= 0", area)
    if ann.get("iscrowd", 0) not in (0, 1):
        raise field_error(path, f"{entry}.iscrowd", "0 or 1", ann["iscrowd"])


def _check_reference(ann: dict, field: str, known: set[int], entry: str, path: Path | str) -> None:
    """``ann[field]`` is an integer in ``known`` (an image or category id of the file)."""
    value = ann[field]
    if not is_int(value):
        raise field_error(path, f"{entry}.{field}", "an integer", value)
    if value not in known:
        raise DrcnnError(f"{path}: {entry} (id {ann['id']}) refers to unknown {field} {value}")


def _fill_defaults(annotations: list[dict]) -> None:
    """``area`` (box width x height) and ``iscrowd`` (0) where absent, as pycocotools' ``loadRes``
    fills them for results; its evaluation needs both and files written by other tools often
    lack them."""
    for ann in annotations:
        ann.setdefault("area", ann["bbox"][2] * ann["bbox"][3])
        ann.setdefault("iscrowd", 0)


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
            self._check_box_count(image_id)
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

    def _check_box_count(self, image_id: int) -> None:
        """Refuse an image with more than ``MAX_BOXES_PER_IMAGE`` annotations."""
        count = len(self.coco.imgToAnns[image_id])
        if count > MAX_BOXES_PER_IMAGE:
            raise DrcnnError(
                f"{self.ann_file}: image {image_id} ({show(self.coco.imgs[image_id]['file_name'])})"
                f" has {count} boxes; at most {MAX_BOXES_PER_IMAGE} per image are supported"
            )

    def _check_size(self, image_id: int, path: Path, height: int, width: int) -> None:
        """The decoded image must have the size the annotation file gives (where it gives one),
        else its boxes would not fit its pixels."""
        info = self.coco.imgs[image_id]
        expected = (info.get("width", width), info.get("height", height))
        if expected != (width, height):
            raise DrcnnError(
                f"{path}: image {image_id} decodes to {width}x{height} pixels (EXIF orientation "
                f"applied) but {self.ann_file} gives width x height {expected[0]}x{expected[1]}"
            )

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
        path = self.image_dir / self.coco.imgs[image_id]["file_name"]
        image = tv_tensors.Image(load_image(path))
        self._check_size(image_id, path, *image.shape[-2:])
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
        return image, target
