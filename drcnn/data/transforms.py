"""Training / evaluation augmentation with ``torchvision.transforms.v2`` (boxes move with pixels).

Only geometry-preserving steps live here: resizing to the configured short side (and the
multi-scale choice) happens inside the model (``cfg.model.transform``, torchvision's
``GeneralizedRCNNTransform``), so that the model's outputs come back in each input image's own
pixels.
"""

from __future__ import annotations

from omegaconf import DictConfig
from torchvision.transforms import v2


def build_transforms(cfg: DictConfig, train: bool) -> v2.Compose:
    """Flip (training only, probability ``cfg.data.flip_prob``), clamp boxes to the image and
    drop the ones left empty (with their labels). Images come in as float in ``[0, 1]``
    (:func:`drcnn.data.images.load_image`) and keep their values."""
    steps: list[v2.Transform] = []
    if train and cfg.data.flip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(cfg.data.flip_prob))
    steps += [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes()]
    return v2.Compose(steps)
