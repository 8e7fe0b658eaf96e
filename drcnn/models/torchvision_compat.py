"""Load torchvision ``fasterrcnn_resnet50_fpn`` weights into drcnn's Faster R-CNN.

The backbone, FPN and RPN share torchvision's parameter names; only the box head moves:
torchvision's ``roi_heads.box_head`` (``fc6``, ``fc7``) and ``roi_heads.box_predictor``
(``cls_score``, ``bbox_pred``) become stage 0 of drcnn's standard RoI head. The target model
is built from ``configs/baselines/faster_rcnn_r50_fpn_torchvision.yaml`` (90 foreground classes
+ background, class-specific boxes), so the shapes match one to one.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from drcnn.errors import DrcnnError

# torchvision key prefix -> drcnn key prefix (first match wins; unlisted keys keep their name)
KEY_PREFIXES = (
    ("roi_heads.box_head.", "roi_heads.stages.0."),
    ("roi_heads.box_predictor.", "roi_heads.stages.0."),
)


def torchvision_key(key: str) -> str:
    """The drcnn parameter name of torchvision's parameter ``key``."""
    for old, new in KEY_PREFIXES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def convert_torchvision_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a torchvision Faster R-CNN state dict's keys to drcnn's."""
    return {torchvision_key(k): v for k, v in state_dict.items()}


def load_torchvision_weights(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Load torchvision Faster R-CNN weights; any missing, extra or mis-shaped key is an error.

    Raises ``DrcnnError`` naming the first mismatching key (by drcnn name, with the torchvision
    name when it differs) and the shapes involved.
    """
    own = model.state_dict()
    # trainable-BN checkpoints (torchvision without pretrained weights) carry step counters
    # that frozen BatchNorm does not have; they hold no weights
    state_dict = {
        k: v
        for k, v in state_dict.items()
        if not (k.endswith(".num_batches_tracked") and torchvision_key(k) not in own)
    }
    converted = convert_torchvision_state_dict(state_dict)
    origin = {torchvision_key(k): k for k in state_dict}

    def describe(key: str) -> str:
        return key if origin.get(key, key) == key else f"{key} (torchvision {origin[key]})"

    for key, value in converted.items():
        if key not in own:
            raise DrcnnError(f"torchvision weights: key {describe(key)} has no place in the model")
        if tuple(own[key].shape) != tuple(value.shape):
            raise DrcnnError(
                f"torchvision weights: {describe(key)} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(own[key].shape)}"
            )
    missing = [k for k in own if k not in converted]
    if missing:
        raise DrcnnError(f"torchvision weights: no value for model key {missing[0]}")
    model.load_state_dict(converted)
