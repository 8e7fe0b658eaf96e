"""The two-stage detector: transform -> backbone/FPN -> RPN -> RoI heads (torchvision layout).

``Detector`` is torchvision's ``GeneralizedRCNN`` (so training returns a loss dict and
evaluation returns per-image ``boxes/scores/labels`` in input-image pixels), whose forward pass
checks the batch's gt boxes for zero area at once (:func:`first_box_without_area`), plus
``analyze_boxes``, which runs the RoI heads on given boxes for the translation-sensitivity
study. ``build_detector(cfg)`` assembles Faster R-CNN, Cascade R-CNN or Decoupled R-CNN from
the config; the RoI-head type alone tells them apart.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from drcnn.models.backbone import build_backbone
from drcnn.models.roi_heads import build_roi_heads
from drcnn.models.rpn import build_rpn

Size = tuple[int, int]


def resize_boxes(boxes: Tensor, original_size: Sequence[int], new_size: Sequence[int]) -> Tensor:
    """``(N, 4)`` boxes scaled from an ``(H, W)`` image to another, as torchvision's
    ``resize_boxes`` does (float32 ratios, the same products), with the ratios as Python
    numbers: torchvision builds them as tensors on the boxes' device, blocking copies on CUDA."""
    ratio_h, ratio_w = (
        float(np.float32(new) / np.float32(old))
        for new, old in zip(new_size, original_size, strict=True)
    )
    xmin, ymin, xmax, ymax = boxes.unbind(1)
    return torch.stack((xmin * ratio_w, ymin * ratio_h, xmax * ratio_w, ymax * ratio_h), dim=1)


class DetectorTransform(GeneralizedRCNNTransform):
    """``GeneralizedRCNNTransform`` with a separate test-time short side, and without blocking
    copies to the device.

    torchvision draws the training short side from ``min_size`` per image and tests at
    ``min_size[-1]``; here ``min_size`` reads as the training choices in training mode and as
    ``(test_min_size,)`` in eval mode, so multi-scale training can test at any scale.
    torchvision's ``normalize``, ``resize`` (of training targets) and ``postprocess`` build
    tensors from Python numbers on the images' device (on CUDA, four blocking copies per image
    in inference, two more per training image); here the mean and std are built on the host and
    copied without blocking, and boxes are rescaled by Python numbers.
    """

    def __init__(self, min_size: Sequence[int], test_min_size: int, **kwargs: Any) -> None:
        super().__init__(min_size=tuple(min_size), **kwargs)
        self.test_min_size = int(test_min_size)

    @property
    def min_size(self) -> tuple[int, ...]:
        return self.train_min_size if self.training else (self.test_min_size,)

    @min_size.setter
    def min_size(self, sizes: Sequence[int]) -> None:
        self.train_min_size = tuple(int(s) for s in sizes)

    def normalize(self, image: Tensor) -> Tensor:
        """``(image - mean) / std`` per channel (torchvision's, same arithmetic)."""
        if not image.is_floating_point():
            return super().normalize(image)  # torchvision's error message
        mean, std = (
            torch.tensor(values, dtype=image.dtype).to(image.device, non_blocking=True)
            for values in (self.image_mean, self.image_std)
        )
        return (image - mean[:, None, None]) / std[:, None, None]

    def resize(
        self, image: Tensor, target: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        """torchvision's resize (the same short side drawn in training), with the target's boxes
        rescaled by Python numbers (:func:`resize_boxes`; drcnn targets hold boxes and
        labels only)."""
        height, width = image.shape[-2:]
        image, _ = super().resize(image, None)
        if target is not None:
            target["boxes"] = resize_boxes(target["boxes"], (height, width), image.shape[-2:])
        return image, target

    def postprocess(
        self,
        result: list[dict[str, Tensor]],
        image_shapes: list[tuple[int, int]],
        original_image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Detections' boxes back in each input image's pixels (eval mode; boxes only: drcnn
        predicts no masks or keypoints)."""
        if self.training:
            return result
        for pred, size, original in zip(result, image_shapes, original_image_sizes, strict=True):
            pred["boxes"] = resize_boxes(pred["boxes"], size, original)
        return result


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Temporarily put ``module`` in eval mode, restoring its training flag afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def rescale_per_image(
    boxes: Tensor, counts: Sequence[int], sizes_from: Sequence[Size], sizes_to: Sequence[Size]
) -> Tensor:
    """Rescale concatenated per-image boxes (``counts[i]`` rows for image ``i``) between frames."""
    parts = boxes.split(list(counts))
    return torch.cat(
        [resize_boxes(b, src, dst) for b, src, dst in zip(parts, sizes_from, sizes_to, strict=True)]
    )


def first_box_without_area(targets: Sequence[dict[str, Tensor]]) -> tuple[int, Tensor] | None:
    """``(image index, box)`` of the first gt box whose x2 <= x1 or y2 <= y1, else None.

    Every image at once: one wait for the device per batch, where torchvision's
    ``GeneralizedRCNN.forward`` waits once per image (on CUDA 8 of a synthetic training step's
    42 waits, with two kernel launches each).
    """
    boxes = torch.cat([t["boxes"] for t in targets])
    flat = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
    if not bool(flat.any()):
        return None
    row = int(flat.nonzero()[0, 0])
    image = int(np.searchsorted(np.cumsum([len(t["boxes"]) for t in targets]), row, "right"))
    return image, boxes[row]


class Detector(GeneralizedRCNN):
    """Faster / Cascade / Decoupled R-CNN with torchvision's ``GeneralizedRCNN`` interface."""

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Training: the loss dict (RoI heads', then the RPN's); eval: per-image detections in
        input-image pixels. torchvision's ``GeneralizedRCNN.forward`` step for step, but the gt
        boxes are checked for zero area once per batch (:func:`first_box_without_area`)."""
        if self.training:
            if targets is None:
                raise ValueError("Detector: targets are required in training mode")
            for index, target in enumerate(targets):
                shape = tuple(target["boxes"].shape)
                if len(shape) != 2 or shape[1] != 4:
                    raise ValueError(
                        f"Detector: target {index} boxes: expected shape (N, 4), got {shape}"
                    )
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        image_list, targets = self.transform(images, targets)
        if targets is not None and (flat := first_box_without_area(targets)) is not None:
            raise ValueError(
                f"Detector: target {flat[0]} has a box without area after resizing: "
                f"{flat[1].tolist()} (x1, y1, x2, y2; x2 > x1 and y2 > y1 expected)"
            )
        features = self.backbone(image_list.tensors)
        proposals, proposal_losses = self.rpn(image_list, features, targets)
        detections, detector_losses = self.roi_heads(
            features, proposals, image_list.image_sizes, targets
        )
        if self.training:
            return {**detector_losses, **proposal_losses}
        return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)

    @torch.no_grad()
    def analyze_boxes(
        self, images: list[Tensor], boxes: list[Tensor], labels: list[Tensor]
    ) -> dict[str, Any]:
        """Run the RoI heads on given boxes (input-image pixels) without RPN, sampling or NMS.

        Images go through the eval-mode transform; the boxes are scaled into the resized frame,
        analysed by ``roi_heads.analyze``, and the returned ``stage_inputs`` / ``stage_boxes``
        are mapped back to input-image pixels (``class_probs``, ``stage_deltas`` and
        ``box_coders`` are scale-free and passed through).
        """
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        with eval_mode(self):
            image_list, _ = self.transform(images)
            resized_sizes = [(int(h), int(w)) for h, w in image_list.image_sizes]
            scaled = [
                resize_boxes(b, src, dst)
                for b, src, dst in zip(boxes, original_sizes, resized_sizes, strict=True)
            ]
            features = self.backbone(image_list.tensors)
            result = dict(self.roi_heads.analyze(features, scaled, resized_sizes, labels))
        counts = [len(b) for b in boxes]
        for key in ("stage_inputs", "stage_boxes"):
            result[key] = [
                rescale_per_image(stage, counts, resized_sizes, original_sizes)
                for stage in result[key]
            ]
        return result


def build_transform(cfg: DictConfig) -> DetectorTransform:
    """Resize (per-image short side), normalise and pad, as set in ``cfg.model.transform``."""
    tcfg = cfg.model.transform
    return DetectorTransform(
        min_size=list(tcfg.min_size),
        test_min_size=tcfg.test_min_size,
        max_size=tcfg.max_size,
        image_mean=list(tcfg.image_mean),
        image_std=list(tcfg.image_std),
        size_divisible=tcfg.size_divisible,
    )


def build_detector(cfg: DictConfig, pretrained: bool = True) -> Detector:
    """The detector of ``cfg.model``: backbone + FPN, RPN, RoI heads of ``roi_head.type``.

    ``pretrained=False`` skips the ImageNet weights that ``model.backbone.pretrained`` names:
    for a model whose every weight a checkpoint is about to replace (no download, no file)."""
    backbone = build_backbone(cfg, pretrained)
    rpn = build_rpn(cfg, backbone.out_channels)
    roi_heads = build_roi_heads(cfg, backbone.out_channels)
    return Detector(backbone, rpn, roi_heads, build_transform(cfg))
