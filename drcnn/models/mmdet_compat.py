"""Load mmdetection 2.x checkpoints: the official Decoupled R-CNN, Faster R-CNN, Cascade R-CNN.

mmdetection (and the official Decoupled R-CNN code built on mmdetection 2.4) saves checkpoints
with mmcv's ``save_checkpoint``: ``{"meta": {...}, "state_dict": {...}}`` (plus ``optimizer``
until ``publish_model`` strips it). Every drcnn weight has exactly one mmdetection source:

====================================  =========================================================
drcnn                                 mmdetection 2.x
====================================  =========================================================
``backbone.body.<name>``              ``backbone.<name>`` (ResNet / ResNeXt, same names; the
                                      BatchNorm step counters are dropped for frozen BN)
``backbone.fpn.inner_blocks.i.0.*``   ``neck.lateral_convs.i.conv.*``
``backbone.fpn.layer_blocks.i.0.*``   ``neck.fpn_convs.i.conv.*``
``rpn.head.conv.0.0.*``               ``rpn_head.rpn_conv.*``
``rpn.head.cls_logits.*``             ``rpn_head.rpn_cls.*`` (sigmoid: one logit per anchor)
``rpn.head.bbox_pred.*``              ``rpn_head.rpn_reg.*``
``roi_heads.stages.i.<layer>.*``      ``roi_head.bbox_head[.i].<layer>.*`` (see HEAD_LAYERS)
====================================  =========================================================

Both RPNs order a location's anchors ratio-major in the configured ratio order (mmdetection's
``scale_major`` default; torchvision's ``generate_anchors``) and both predict
``(dx, dy, dw, dh)`` per anchor, so the RPN rows map one to one. The RoI heads differ in class
layout: mmdetection puts the background *last* in ``fc_cls`` (K+1 rows) and has no background
slot in class-specific ``fc_reg`` (4K rows); drcnn puts the background first (labels 1..K), and
its :class:`FastRCNNHead` keeps a background slot (4(K+1) rows, filled with zeros here: it is
never read), while :class:`DecoupledHead` has 4K rows like mmdetection.

Shapes come from the model, so any depth, width or number of classes converts as long as the
config describes the checkpoint's network; any key or shape that does not fit is refused.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

from drcnn.config import to_dict
from drcnn.engine.checkpoint import load_weights_only, save_checkpoint
from drcnn.errors import DrcnnError
from drcnn.models.box_heads import DecoupledHead, FastRCNNHead, RefineHead
from drcnn.models.detector import build_detector
from drcnn.models.roi_heads import ROI_HEADS, CascadeRoIHeads

# drcnn key pattern -> mmdetection key (backbone, FPN, RPN; first match wins)
KEY_RULES = (
    (re.compile(r"backbone\.body\.(.+)"), r"backbone.\1"),
    (re.compile(r"backbone\.fpn\.inner_blocks\.(\d+)\.0\.(\w+)"), r"neck.lateral_convs.\1.conv.\2"),
    (re.compile(r"backbone\.fpn\.layer_blocks\.(\d+)\.0\.(\w+)"), r"neck.fpn_convs.\1.conv.\2"),
    (re.compile(r"rpn\.head\.conv\.0\.0\.(\w+)"), r"rpn_head.rpn_conv.\1"),
    (re.compile(r"rpn\.head\.cls_logits\.(\w+)"), r"rpn_head.rpn_cls.\1"),
    (re.compile(r"rpn\.head\.bbox_pred\.(\w+)"), r"rpn_head.rpn_reg.\1"),
)
STAGE_KEY = re.compile(r"roi_heads\.stages\.(\d+)\.(\w+)\.(\w+)")

# drcnn box head -> its layers' mmdetection names: Shared2FCBBoxHead (Faster / Cascade),
# DecoupledBBoxHead (Decoupled stage 0) and RefineBBoxHead (Decoupled stages 1..N-1)
HEAD_LAYERS: dict[type[nn.Module], dict[str, str]] = {
    FastRCNNHead: {
        "fc6": "shared_fcs.0",
        "fc7": "shared_fcs.1",
        "cls_score": "fc_cls",
        "bbox_pred": "fc_reg",
    },
    DecoupledHead: {
        "fc6": "shared_fcs.0",  # shared_trunk: DecoupledSharedBBoxHead
        "fc7": "shared_fcs.1",
        "cls_fc6": "cls_fcs.0",
        "cls_fc7": "cls_fcs.1",
        "cls_score": "fc_cls",
        "reg_fc6": "reg_fcs.0",
        "reg_fc7": "reg_fcs.1",
        "bbox_pred": "fc_reg",
    },
    RefineHead: {"fc6": "reg_fcs.0", "fc7": "reg_fcs.1", "bbox_pred": "fc_reg"},
}
COUNTER = ".num_batches_tracked"


class Source(NamedTuple):
    """Where one drcnn weight comes from: the mmdetection key, its shape there, the conversion."""

    key: str
    shape: tuple[int, ...]
    convert: Callable[[Tensor], Tensor]


def same(value: Tensor) -> Tensor:
    """Weights whose layout is the same on both sides."""
    return value


def background_first(value: Tensor) -> Tensor:
    """Class rows ``fg_0..fg_{K-1}, bg`` (mmdetection) -> ``bg, fg_0..fg_{K-1}`` (drcnn)."""
    return torch.cat([value[-1:], value[:-1]])


def background_slot(value: Tensor) -> Tensor:
    """Class-specific deltas, 4K rows -> 4(K+1) rows with a zero background slot first."""
    return torch.cat([value.new_zeros((4, *value.shape[1:])), value])


def stage_prefix(roi_heads: nn.Module, stage: int) -> str:
    """mmdetection's name of RoI stage ``stage``: one ``bbox_head`` or a list of them.

    ``StandardRoIHead`` (Faster R-CNN) and ``DecoupledRoIHead`` (Decoupled R-CNN without refine
    stages) hold a single head; ``CascadeRoIHead`` and ``DecoupledRefineRoIHead`` a list.
    """
    indexed = isinstance(roi_heads, CascadeRoIHeads) or len(roi_heads.stages) > 1
    return f"roi_head.bbox_head.{stage}." if indexed else "roi_head.bbox_head."


def stage_source(model: nn.Module, key: str, shape: tuple[int, ...]) -> Source | None:
    """The source of an RoI-stage weight ``roi_heads.stages.<i>.<layer>.<param>``."""
    match = STAGE_KEY.fullmatch(key)
    if match is None:
        return None
    stage, layer, param = int(match[1]), match[2], match[3]
    head = model.roi_heads.stages[stage]
    layers = HEAD_LAYERS.get(type(head), {})  # no mapping (Double-Head heads): refused later
    if layer not in layers:
        return None
    name = f"{stage_prefix(model.roi_heads, stage)}{layers[layer]}.{param}"
    if layer == "cls_score":
        return Source(name, shape, background_first)
    if layer == "bbox_pred" and head.class_specific and head.background_slot:
        return Source(name, (shape[0] - 4, *shape[1:]), background_slot)
    return Source(name, shape, same)


def generic_source(key: str, shape: tuple[int, ...]) -> Source | None:
    """The source of a backbone, FPN or RPN weight (same layout on both sides)."""
    for pattern, replacement in KEY_RULES:
        if pattern.fullmatch(key):
            return Source(pattern.sub(replacement, key), shape, same)
    return None


def mmdet_sources(model: nn.Module) -> dict[str, Source]:
    """The mmdetection source of every entry of ``model.state_dict()``, by drcnn key."""
    sources = {}
    unsaved = running_state_keys(model)
    for key, value in model.state_dict().items():
        if key in unsaved:
            continue
        shape = tuple(value.shape)
        source = stage_source(model, key, shape) or generic_source(key, shape)
        if source is None:  # a drcnn module without an mmdetection layout here (Double-Head)
            raise DrcnnError(
                f"mmdetection import: the config's model ({describe_model(model)}) has a weight "
                f"{key} that no mmdetection name maps to; this head cannot be imported"
            )
        sources[key] = source
    return sources


def running_state_keys(model: nn.Module) -> list[str]:
    """State-dict keys of training statistics that mmdetection never saves (Dynamic R-CNN keeps
    its threshold, beta and histories in Python attributes): an import keeps the model's
    initial values for them, as mmdetection starts from its config's."""
    return [f"roi_heads.{name}" for name in getattr(model.roi_heads, "running_state", ())]


def describe_model(model: nn.Module) -> str:
    """``decoupled RoI head, 3 stages`` (for error messages)."""
    kind = next(name for name, cls in ROI_HEADS.items() if type(model.roi_heads) is cls)
    stages = len(model.roi_heads.stages)
    return f"{kind} RoI head, {stages} stage{'s' if stages > 1 else ''}"


def _more(items: list[str]) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def check_keys(
    model: nn.Module, sources: dict[str, Source], state_dict: Mapping, where: str
) -> None:
    """Refuse missing and unexpected keys, naming the first of each in one line.

    BatchNorm step counters without a place in the model (frozen BatchNorm has none) are not
    unexpected: they hold no weights.
    """
    wanted = {source.key: key for key, source in sources.items()}
    missing = [name for name in wanted if name not in state_dict]
    unexpected = [
        name for name in state_dict if name not in wanted and not str(name).endswith(COUNTER)
    ]
    problems = []
    if missing:
        problems.append(f"no key {missing[0]} (drcnn {wanted[missing[0]]}){_more(missing)}")
    if unexpected:
        problems.append(f"unexpected key {unexpected[0]}{_more(unexpected)}")
    if problems:
        raise DrcnnError(
            f"{where}: does not fit the config's model ({describe_model(model)}): "
            + "; ".join(problems)
        )


def convert_mmdet_state_dict(
    model: nn.Module, state_dict: Mapping[str, Any], where: str = "mmdetection state dict"
) -> dict[str, Tensor]:
    """drcnn's state dict for ``model`` from an mmdetection 2.x one, checked key by key.

    Raises ``DrcnnError`` (one line, starting with ``where``) naming the first missing or
    unexpected key, a value that is not a tensor, or a key whose shape does not fit the model.
    """
    sources = mmdet_sources(model)
    check_keys(model, sources, state_dict, where)
    own = model.state_dict()
    converted = {}
    for key, source in sources.items():
        value = state_dict[source.key]
        if not isinstance(value, Tensor):
            raise DrcnnError(f"{where}: key {source.key} is not a tensor")
        if tuple(value.shape) != source.shape:
            raise DrcnnError(
                f"{where}: key {source.key} has shape {tuple(value.shape)}, the config's model "
                f"expects {source.shape} (drcnn {key})"
            )
        converted[key] = source.convert(value).to(own[key].dtype)
    converted.update({key: own[key].clone() for key in running_state_keys(model)})
    return converted


def load_mmdet_checkpoint(
    model: nn.Module, state_dict: Mapping[str, Any], where: str = "mmdetection state dict"
) -> None:
    """Load an mmdetection 2.x state dict (``checkpoint["state_dict"]``) into ``model``."""
    model.load_state_dict(convert_mmdet_state_dict(model, state_dict, where))


def read_mmdet_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state_dict, meta)`` of an mmcv checkpoint file (or of a bare state-dict file).

    The file is read with ``torch.load(weights_only=True)``: mmcv checkpoints hold tensors and
    plain Python values only (``meta``: strings, numbers, the ``CLASSES`` tuple).
    """
    path = Path(path)
    if not path.is_file():
        raise DrcnnError(f"{path}: mmdetection checkpoint not found")
    data = load_weights_only(
        path,
        f"{path}: not loadable with torch.load(weights_only=True), which reads tensors and "
        "plain Python values only",
    )
    if isinstance(data, dict) and isinstance(data.get("state_dict"), Mapping):
        meta = data.get("meta")
        return dict(data["state_dict"]), dict(meta) if isinstance(meta, Mapping) else {}
    if isinstance(data, dict) and data and all(isinstance(v, Tensor) for v in data.values()):
        return data, {}
    raise DrcnnError(
        f"{path}: not an mmdetection checkpoint (expected a dict with 'state_dict' and 'meta', "
        "as mmcv saves it, or a state dict)"
    )


def coco_categories() -> tuple[list[int], list[str]]:
    """COCO 2017's 80 category ids and names in id order (mmdetection's ``CocoDataset`` order)."""
    names = FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]  # index = category id
    pairs = [(i, name) for i, name in enumerate(names) if name not in ("__background__", "N/A")]
    return [i for i, _ in pairs], [name for _, name in pairs]


def class_meta(meta: Mapping[str, Any], num_classes: int, where: str) -> dict[str, list]:
    """``class_names`` and ``cat_ids`` of a converted checkpoint.

    Names come from ``meta["CLASSES"]`` (mmdetection stores the dataset's classes there); a
    checkpoint without them is taken for a COCO model when it has 80 classes. COCO's category
    ids are stored when the names are COCO's (mmdetection label ``i`` is the ``i``-th COCO
    category by id, drcnn label ``i + 1``); other datasets' ids are unknown (empty list).
    """
    coco_ids, coco_names = coco_categories()
    names = meta.get("CLASSES")
    if names is None:
        names = coco_names if num_classes == len(coco_names) else []
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise DrcnnError(f"{where}: meta CLASSES is not a list of class names")
    if names and len(names) != num_classes:
        raise DrcnnError(
            f"{where}: meta CLASSES has {len(names)} classes, the config's "
            f"model.roi_head.num_classes is {num_classes}"
        )
    names = list(names)
    return {"class_names": names, "cat_ids": coco_ids if names == coco_names else []}


def convert_mmdet_checkpoint(checkpoint: str | Path, cfg: DictConfig, out: str | Path) -> Path:
    """Write the drcnn checkpoint ``out`` holding an mmdetection 2.x checkpoint's weights.

    ``cfg`` describes the network (``drcnn convert mmdet CKPT --config CONFIG --out OUT``). The
    stored config has ``model.backbone.pretrained: null``, since the checkpoint holds every
    weight. An existing ``out`` is never overwritten.
    """
    out = Path(out)
    if out.exists():
        raise DrcnnError(f"{out}: already exists; give a new output path (nothing is overwritten)")
    state_dict, meta = read_mmdet_checkpoint(checkpoint)
    cfg = copy.deepcopy(cfg)
    cfg.model.backbone.pretrained = None
    model = build_detector(cfg)
    load_mmdet_checkpoint(model, state_dict, str(checkpoint))
    classes = class_meta(meta, cfg.model.roi_head.num_classes, str(checkpoint))
    return save_checkpoint(out, {"model": model.state_dict(), "config": to_dict(cfg), **classes})
