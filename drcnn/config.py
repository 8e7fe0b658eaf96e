"""Typed configuration: dataclass schema, YAML files with ``_base_`` inheritance, dotted overrides.

A config file is YAML whose keys must exist in :class:`Config` (an unknown key or a wrong type is
an error naming the key and the file). ``_base_: [a.yaml, b.yaml]`` merges those files first
(paths relative to the file that names them; later entries and the file itself win; lists are
replaced, not concatenated). Command-line overrides are dotted ``key=value`` strings whose value
is parsed as YAML (``model.backbone.pretrained=null``, ``model.rpn.nms_thresh=[0.7,0.85]``).
OmegaConf interpolations (``${...}``) are refused, in files, overrides and stored configs alike:
a config must say its values itself, so that the file (and the copy stored in a checkpoint) is
the whole record of a run and no value depends on another key, the environment or a resolver.

``load_config`` returns an OmegaConf ``DictConfig`` backed by the schema: attribute access,
type-checked assignment, and ``to_yaml`` for saving the resolved config beside a run.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from drcnn.errors import DrcnnError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

BACKBONE_ARCHS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnext101_32x4d",
    "resnext101_64x4d",
)
# Backbone BatchNorm: "eval_bn" = statistics frozen, affine trainable outside the frozen stages
# (mmdetection's norm_eval=True with requires_grad=True, the official configs); "frozen_bn" =
# statistics and affine frozen (torchvision's FrozenBatchNorm2d); "bn" = ordinary trainable
# BatchNorm (batch statistics in training; the from-scratch synthetic configs).
NORM_TYPES = ("eval_bn", "frozen_bn", "bn")
# FPN conv init: mmdetection's FPN.init_weights (xavier_uniform) or torchvision's
# FeaturePyramidNetwork (kaiming_uniform, a=1).
FPN_INITS = ("xavier_uniform", "kaiming_uniform")
ROI_HEAD_TYPES = ("standard", "cascade", "decoupled", "dynamic")
# Box heads of the RoI stages (RoIHeadConfig.box_head; null = the RoI head type's own). The
# official repository's head ablations: "shared" (one 2-fc trunk for both tasks), "unshared"
# (separate cls / reg 2-fc trunks), "double" (Double-Head: 2-fc classification, residual conv
# regression; decoupled only).
BOX_HEAD_TYPES = ("shared", "unshared", "double")
DECOUPLED_ONLY_BOX_HEADS = ("double",)
NMS_TYPES = ("nms", "soft_nms_linear", "soft_nms_gaussian")
# Box regression losses and the fields each one uses (every other field must stay unset).
BOX_LOSS_FIELDS: dict[str, tuple[str, ...]] = {"l1": (), "smooth_l1": ("beta",)}
# RoI samplers and the fields each one uses (drcnn.models.sampling.build_sampler builds them).
SAMPLER_FIELDS: dict[str, tuple[str, ...]] = {
    "random": ("num", "pos_fraction", "add_gt"),
    "positive": ("num", "add_gt"),
}
# How the RPN lays out and labels its anchors (see RPNConfig.anchor_convention).
ANCHOR_CONVENTIONS = ("torchvision", "mmdet")
AMP_MODES = ("none", "bf16", "fp16", "auto")  # auto: bf16 where the device computes it natively
OPTIMIZERS = ("sgd", "adamw")
SCHEDULE_UNITS = ("epoch", "iter")
# TensorBoard scalars beside metrics.jsonl: auto = when the tensorboard package is installed.
TENSORBOARD_MODES = ("auto", True, False)


@dataclass
class BackboneConfig:
    """ResNet/ResNeXt + FPN (P2-P6)."""

    arch: str = "resnet50"
    # null: random init. "torchvision://resnet50": the weights mmcv 1.x loaded under that name
    # with the official torchvision 0.7, i.e. today's ResNet50_Weights.IMAGENET1K_V1 (not the
    # current DEFAULT, V2); any torchvision weights enum by name, e.g.
    # "torchvision://ResNet50_Weights.IMAGENET1K_V2". "open-mmlab://resnext101_32x4d" or
    # "open-mmlab://resnext101_64x4d": open-mmlab's ResNeXt weights of mmcv's model zoo (the
    # official X-101 configs). These are read from torch hub's checkpoint folder (downloaded
    # once). Otherwise a local file path to a state dict.
    pretrained: str | None = None
    # 0: nothing frozen; 1: stem + layer1 (official); up to 4.
    frozen_stages: int = 1
    # One of NORM_TYPES; official: "eval_bn".
    norm: str = "eval_bn"
    fpn_channels: int = 256
    # One of FPN_INITS; official: "xavier_uniform".
    fpn_init: str = "xavier_uniform"
    # Convolutions in channels-last (NHWC) layout: about 1.4x faster on CPU (oneDNN); the GPU
    # effect is unmeasured here. false: PyTorch's default NCHW layout.
    channels_last: bool = True


@dataclass
class TransformConfig:
    """Resize / normalise / pad, done inside the model (torchvision convention)."""

    # Short-side choices for training; one is drawn per image (multi-scale when > 1 entry).
    min_size: list[int] = field(default_factory=lambda: [800])
    test_min_size: int = 800
    max_size: int = 1333
    image_mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    size_divisible: int = 32


@dataclass
class BoxLossConfig:
    """A box regression loss, summed over the positive rows; the head divides by its normaliser.

    ``type``: "l1" or "smooth_l1". ``beta`` (smooth_l1 only, and required there): where the
    loss turns from quadratic to linear, in normalised delta units (mmdetection's
    ``SmoothL1Loss`` beta: 1/9 in its RPN, 1.0 in its RoI heads; torchvision uses 1/9 in both).
    A field that the type does not use must stay unset (null): it is an error, not ignored.
    """

    type: str = "l1"
    beta: float | None = None


@dataclass
class RPNConfig:
    # One anchor size per FPN level (P2..P6) = anchor scale 8 x stride 4..64.
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    pre_nms_top_n_train: int = 2000
    post_nms_top_n_train: int = 1000
    pre_nms_top_n_test: int = 1000
    post_nms_top_n_test: int = 1000
    # Training NMS: a float (one proposal set) or a pair [cls_thresh, reg_thresh] giving the
    # classification and regression proposal sets of Decoupled R-CNN.
    nms_thresh: Any = 0.7
    test_nms_thresh: float = 0.7
    score_thresh: float = 0.0
    min_size: float = 0.0
    loss_bbox: BoxLossConfig = field(default_factory=BoxLossConfig)
    # Anchor layout and training labels. "torchvision": torchvision's RPN (each level's stride is
    # the padded batch size // the feature-map size, e.g. 61 instead of 64 on P6 for an 800-px
    # side; base anchors rounded to whole pixels; every anchor labelled, batch padding included;
    # a gt's best anchors are positive whatever their IoU, matched to their own best gt).
    # "mmdet": mmdetection 2.x's AnchorGenerator + MaxIoUAssigner (nominal strides 4..64, base
    # anchors not rounded; anchors on grid cells outside an image's own padded area (size
    # rounded up to transform.size_divisible) are ignored in training; low-quality matches need
    # IoU >= min_pos_iou and go to that gt), with allowed_border below.
    anchor_convention: str = "torchvision"
    # mmdet only (null for torchvision): the IoU floor of low-quality matches (official 0.3).
    min_pos_iou: float | None = None
    # mmdet only (null for torchvision): -1 keeps anchors crossing the image border (official
    # Faster / Decoupled R-CNN); b >= 0 ignores, in training, anchors reaching more than b
    # pixels beyond the unpadded image (Cascade R-CNN: 0).
    allowed_border: int | None = None


@dataclass
class SamplerConfig:
    """How a RoI stage picks the RoIs it trains on, per image (:data:`SAMPLER_FIELDS`).

    ``type``: "random" (``num`` RoIs, at most ``pos_fraction`` of them positive, negatives fill
    up: mmdetection's RandomSampler) or "positive" (every positive RoI, at most ``num``, no
    negatives: Decoupled R-CNN's regression sampler). ``add_gt``: the gt boxes join the
    proposals before sampling. A field that the type does not use must stay unset (null).
    """

    type: str = "random"
    num: int = 512
    pos_fraction: float | None = 0.25
    add_gt: bool = True


@dataclass
class StageConfig:
    """One RoI stage: assignment IoU threshold, delta std-devs, loss weight."""

    iou_thresh: float = 0.5
    target_stds: list[float] = field(default_factory=lambda: [0.1, 0.1, 0.2, 0.2])
    loss_weight: float = 1.0


@dataclass
class TestConfig:
    """Post-processing of the final detections."""

    score_thresh: float = 0.001
    nms: str = "nms"
    nms_iou: float = 0.5
    soft_nms_sigma: float = 0.5
    soft_nms_min_score: float = 0.001
    max_per_image: int = 100
    # drop detections narrower/shorter than this (pixels) before NMS; torchvision uses 1e-2
    min_box_size: float = 0.0


@dataclass
class DynamicConfig:
    """Dynamic R-CNN's running statistics (mmdetection 2.x ``train_cfg.rcnn.dynamic_rcnn``).

    Per iteration: the ``iou_topk``-th largest IoU of each image's candidate RoIs with their gt
    (mean over images), and the ``beta_topk`` x images-th smallest regression target (mean
    ``|dx|, |dy|`` of a positive, normalised units). Every ``update_interval`` iterations the
    stage-0 assignment threshold becomes max(``initial_iou``, the IoU statistics' mean) and the
    SmoothL1 beta min(``initial_beta``, the target statistics' median).
    """

    iou_topk: int = 75
    beta_topk: int = 10
    update_interval: int = 100
    initial_iou: float = 0.4
    initial_beta: float = 1.0


@dataclass
class RoIHeadConfig:
    # standard: Faster R-CNN; cascade: Cascade R-CNN; decoupled: Decoupled R-CNN; dynamic:
    # Dynamic R-CNN (Faster R-CNN with the adaptive threshold and beta of ``dynamic``).
    type: str = "decoupled"
    num_classes: int = 80  # foreground classes
    roi_size: int = 7
    sampling_ratio: int = 0
    # RoIAlign pixel model: true = mmcv's (and the official code's), box edges on pixel edges;
    # false = torchvision's detection models (sampling half a pixel later).
    aligned: bool = False
    fc_dim: int = 1024  # width of the fc layers (and of the Double-Head conv branch)
    # The box head of every stage, one of BOX_HEAD_TYPES or null = the type's own: standard /
    # cascade "shared" (Faster R-CNN's 2-fc trunk), decoupled "unshared" (+ 2-fc refine stages).
    # "unshared" on standard / cascade: the official Unshared2FCBBoxHead (ordinary sampling);
    # "shared" on decoupled: DecoupledSharedBBoxHead (decoupled sampling, one trunk, half the
    # stage-0 box normaliser); "double" (decoupled only): DoubleDecoupledBBoxHead, refine stages
    # DoubleRefineBBoxHead (docs/fidelity.md, "Ablation heads").
    box_head: str | None = None
    # Stage 0 first. decoupled: stage 0 = decoupled cls+reg head, later = regression-only
    # refine stages; cascade: every stage a full cls+reg head.
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    cls_sampler: SamplerConfig = field(default_factory=SamplerConfig)
    # decoupled only: the sampler of the regression branch (type positive: the head regresses
    # every RoI it returns).
    reg_sampler: SamplerConfig = field(
        default_factory=lambda: SamplerConfig(
            type="positive", num=512, pos_fraction=None, add_gt=False
        )
    )
    reg_class_agnostic: bool = False  # standard / cascade heads
    loss_bbox: BoxLossConfig = field(default_factory=BoxLossConfig)
    test: TestConfig = field(default_factory=TestConfig)
    dynamic: DynamicConfig | None = None  # type dynamic only (and required there)


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_head: RoIHeadConfig = field(default_factory=RoIHeadConfig)


@dataclass
class DataConfig:
    # Dataset root; the annotation/image paths below are relative to it (absolute paths work).
    root: str = "data/synthetic"
    train_ann: str = "annotations/instances_train.json"
    train_images: str = "train"
    val_ann: str = "annotations/instances_val.json"
    val_images: str = "val"
    batch_size: int = 2  # images per process (per GPU)
    test_batch_size: int = 1
    workers: int = 2
    # The val loader's workers (None: as many as `workers`). Each worker process starts by
    # importing torch and torchvision: 3 s on a 2-core Xeon, 10 s on an H200 machine
    # (2026-11-27), longer than a small val split takes to load in the main process.
    test_workers: int | None = None
    flip_prob: float = 0.5
    # Training batches whose images are all wider than tall or all not (mmdetection's
    # GroupSampler; official COCO configs). Each group's last incomplete global batch is filled
    # by repeating that group's first images of the epoch, so an epoch has
    # sum(ceil(group size / global batch)) global batches (drcnn.data.group_sampler).
    group_by_aspect_ratio: bool = False
    max_val_images: int | None = None  # evaluate on the first N val images only


@dataclass
class TrainConfig:
    epochs: int = 24
    max_iters: int | None = None  # caps a run (smoke runs, quick experiments)
    optimizer: str = "sgd"  # "sgd" (official, uses momentum) or "adamw"
    lr: float = 0.01
    reference_batch_size: int = 8  # total batch that `lr` is for; scaled linearly otherwise
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    lr_steps: list[int] = field(default_factory=lambda: [16, 22])
    lr_step_unit: str = "epoch"
    gamma: float = 0.1
    amp: str = "none"
    grad_clip: float | None = None
    accumulate: int = 1
    log_interval: int = 20
    # Also write each metrics.jsonl record as TensorBoard scalars into WORK_DIR/tensorboard/:
    # "auto" (when the tensorboard package is installed), true (an error without it) or false.
    tensorboard: Any = "auto"
    checkpoint_interval: int = 1
    checkpoint_unit: str = "epoch"
    keep_checkpoints: int = 3
    eval_interval: int = 1  # epochs; 0 disables periodic evaluation
    seed: int = 0
    # Seconds a collective operation (DDP gradient sync, barrier, broadcast) may wait for the
    # other processes before the process group fails the run (torch.distributed's timeout).
    dist_timeout: float = 3600.0
    # Seconds without progress (no training step finished, no evaluation batch done) after
    # which a watchdog ends the run with an error naming the rank, the iteration and what the
    # loop was waiting for; 0 turns the watchdog off. Shorter than dist_timeout, so a stuck
    # run ends with the watchdog's message rather than a collective's timeout.
    stall_timeout: float = 1800.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise DrcnnError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DrcnnError(f"config file {path} is not valid YAML: {exc}".splitlines()[0]) from exc
    if not isinstance(data, dict):
        raise DrcnnError(f"config file {path}: expected a mapping at the top level")
    return data


def reject_interpolations(value: Any, where: str, key: str = "") -> None:
    """Refuse an OmegaConf interpolation (a string with ``${``) anywhere in ``value``, a plain
    YAML value (dicts, lists, scalars); ``where`` names the file, the error the dotted key."""
    if isinstance(value, dict):
        for name, item in value.items():
            reject_interpolations(item, where, f"{key}.{name}" if key else str(name))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            reject_interpolations(item, where, f"{key}[{index}]")
    elif isinstance(value, str) and "${" in value:
        at = f" key '{key}':" if key else ""
        raise DrcnnError(
            f"{where}:{at} interpolations (${{...}}) are not supported; "
            f"write the value itself, got {value!r}"
        )


def _base_files(data: dict, path: Path) -> list[str]:
    """The ``_base_`` entry of a config file as a list of file names (a name alone is a list)."""
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise DrcnnError(
            f"config file {path}: _base_: expected a file name or a list of file names, "
            f"got {bases!r}"
        )
    return bases


def _merge_file(schema: DictConfig, path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """Merge ``path`` (after its ``_base_`` files) into ``schema``; errors name the file."""
    path = path.resolve()
    if path in seen:
        raise DrcnnError(f"config file {path}: _base_ inheritance cycle")
    data = _read_yaml(path)
    bases = _base_files(data, path)
    reject_interpolations(data, f"config file {path}")
    for base in bases:
        schema = _merge_file(schema, path.parent / base, (*seen, path))
    try:
        return OmegaConf.merge(schema, data)
    except OmegaConfBaseException as exc:
        raise DrcnnError(f"config file {path}: {_describe(exc)}") from exc


def _describe(exc: OmegaConfBaseException) -> str:
    """One line: the offending dotted key and what went wrong."""
    key = getattr(exc, "full_key", None)
    if isinstance(exc, ConfigKeyError):
        return f"unknown key '{key}'"
    message = str(exc).splitlines()[0]
    return f"key '{key}': {message}" if key else message


def _check_choice(value: object, key: str, choices: Sequence[object]) -> None:
    """``value`` is one of ``choices``, of the same type (``1`` is not ``true``)."""
    if not any(type(value) is type(choice) and value == choice for choice in choices):
        listed = ", ".join(_yaml_scalar(choice) for choice in choices)
        raise DrcnnError(f"config {key}: expected one of {listed}, got {value!r}")


def _yaml_scalar(value: object) -> str:
    """A choice as a YAML file or override writes it (``true``, not ``True``)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


@dataclass(frozen=True)
class Bound:
    """The allowed values of a numeric config key (for :func:`validate`).

    ``low``/``high``: inclusive limits (``low_open``: ``low`` itself excluded); ``null``: what
    a null value means where the key may be null. NaN and infinities are always refused.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    null: str | None = None

    def admits(self, value: object) -> bool:
        if value is None:
            return self.null is not None
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high

    def describe(self, integer: bool) -> str:
        """E.g. ``an integer >= 1 or null (all images)``, ``a number in [0, 1]``."""
        kind = "an integer" if integer else "a number"
        if self.low is not None and self.high is not None:
            text = f"{kind} in [{self.low:g}, {self.high:g}]"
        elif self.low is not None:
            text = f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        else:
            text = kind
        return text if self.null is None else f"{text} or null ({self.null})"


# Numeric keys whose range the schema's types cannot express; list values are checked entry by
# entry. A value outside its range would fail only after a training step, or silently do
# something else (a negative grad_clip flips the gradient, max_iters=0 saves untrained weights).
NUMBER_BOUNDS: dict[str, Bound] = {
    "model.transform.min_size": Bound(low=1),
    "model.transform.test_min_size": Bound(low=1),
    "model.transform.max_size": Bound(low=1),
    "model.roi_head.cls_sampler.num": Bound(low=1),
    "model.roi_head.cls_sampler.pos_fraction": Bound(low=0, high=1, null="type positive"),
    "model.roi_head.reg_sampler.num": Bound(low=1),
    "model.roi_head.reg_sampler.pos_fraction": Bound(low=0, high=1, null="type positive"),
    "data.workers": Bound(low=0),
    "data.test_workers": Bound(low=0, null="as data.workers"),
    "data.flip_prob": Bound(low=0, high=1),
    "data.max_val_images": Bound(low=1, null="all images"),
    "train.epochs": Bound(low=1),
    "train.max_iters": Bound(low=1, null="train.epochs decides"),
    "train.lr": Bound(low=0, low_open=True),
    "train.grad_clip": Bound(low=0, low_open=True, null="no clipping"),
    "train.log_interval": Bound(low=1),
    "train.checkpoint_interval": Bound(low=1),
    "train.keep_checkpoints": Bound(low=1),
    "train.eval_interval": Bound(low=0),
    "train.dist_timeout": Bound(low=0, low_open=True),
    "train.stall_timeout": Bound(low=0),
}


def _check_numbers(cfg: DictConfig) -> None:
    """Every :data:`NUMBER_BOUNDS` key in its range; the error names the key and the range."""
    for key, bound in NUMBER_BOUNDS.items():
        value = OmegaConf.select(cfg, key)
        values = list(value) if OmegaConf.is_list(value) else [value]
        for item in values:
            if not bound.admits(item):
                integer = isinstance(item, int) and not isinstance(item, bool)
                each = "every entry to be " if OmegaConf.is_list(value) else ""
                raise DrcnnError(
                    f"config {key}: expected {each}{bound.describe(integer)}, got {item!r}"
                )


def validate(cfg: DictConfig) -> DictConfig:
    """Checks the schema's types cannot express (choices, ranges, the NMS float-or-pair)."""
    _check_choice(cfg.model.backbone.arch, "model.backbone.arch", BACKBONE_ARCHS)
    _check_choice(cfg.model.backbone.norm, "model.backbone.norm", NORM_TYPES)
    _check_choice(cfg.model.backbone.fpn_init, "model.backbone.fpn_init", FPN_INITS)
    if not 0 <= cfg.model.backbone.frozen_stages <= 4:
        raise DrcnnError("config model.backbone.frozen_stages: expected 0..4")
    _check_choice(cfg.model.roi_head.type, "model.roi_head.type", ROI_HEAD_TYPES)
    validate_box_head(cfg.model.roi_head)
    validate_dynamic(cfg.model.roi_head)
    _check_choice(cfg.model.roi_head.test.nms, "model.roi_head.test.nms", NMS_TYPES)
    validate_box_loss(cfg.model.roi_head.loss_bbox, "model.roi_head.loss_bbox")
    validate_box_loss(cfg.model.rpn.loss_bbox, "model.rpn.loss_bbox")
    for name in ("cls_sampler", "reg_sampler"):
        check_typed_entry(cfg.model.roi_head[name], f"model.roi_head.{name}", SAMPLER_FIELDS)
    validate_anchor_convention(cfg.model.rpn)
    _check_choice(cfg.train.amp, "train.amp", AMP_MODES)
    _check_choice(cfg.train.optimizer, "train.optimizer", OPTIMIZERS)
    _check_choice(cfg.train.lr_step_unit, "train.lr_step_unit", SCHEDULE_UNITS)
    _check_choice(cfg.train.checkpoint_unit, "train.checkpoint_unit", SCHEDULE_UNITS)
    _check_choice(cfg.train.tensorboard, "train.tensorboard", TENSORBOARD_MODES)
    rpn_nms_thresholds(cfg.model.rpn)
    num_stages = len(cfg.model.roi_head.stages)
    if not 1 <= num_stages <= 4:
        raise DrcnnError(f"config model.roi_head.stages: expected 1..4 stages, got {num_stages}")
    for i, stage in enumerate(cfg.model.roi_head.stages):
        if len(stage.target_stds) != 4:
            raise DrcnnError(f"config model.roi_head.stages[{i}].target_stds: expected 4 numbers")
    if cfg.model.roi_head.num_classes < 1:
        raise DrcnnError("config model.roi_head.num_classes: expected a positive integer")
    if len(cfg.model.rpn.anchor_sizes) != 5:
        raise DrcnnError("config model.rpn.anchor_sizes: expected 5 sizes (one per level P2-P6)")
    if not cfg.model.transform.min_size:
        raise DrcnnError("config model.transform.min_size: expected at least one short side")
    for key in ("batch_size", "test_batch_size"):
        if cfg.data[key] < 1:
            raise DrcnnError(f"config data.{key}: expected a positive integer")
    if cfg.train.accumulate < 1:
        raise DrcnnError("config train.accumulate: expected a positive integer")
    _check_numbers(cfg)
    return cfg


def check_typed_entry(entry: DictConfig, key: str, used_fields: dict[str, tuple[str, ...]]) -> None:
    """An entry with a ``type`` (a loss, a sampler): the type is a key of ``used_fields``, each
    field it uses is set and every other field is unset (null), so that a value the type would
    ignore is an error instead of a silent no-op."""
    _check_choice(entry.type, f"{key}.type", tuple(used_fields))
    used = used_fields[entry.type]
    for name in (name for name in entry if name != "type"):
        value = entry[name]
        if name in used and value is None:
            raise DrcnnError(f"config {key}.{name}: type {entry.type} needs a {name}")
        if name not in used and value is not None:
            raise DrcnnError(
                f"config {key}.{name}: type {entry.type} takes no {name} (got {value}; set null)"
            )


def validate_box_head(roi: DictConfig) -> None:
    """``box_head`` null or one of :data:`BOX_HEAD_TYPES`, and one the RoI head type can run:
    the Double-Head variants exist only with decoupled sampling in the official code."""
    if roi.box_head is None:
        return
    _check_choice(roi.box_head, "model.roi_head.box_head", BOX_HEAD_TYPES)
    if roi.box_head in DECOUPLED_ONLY_BOX_HEADS and roi.type != "decoupled":
        raise DrcnnError(
            f"config model.roi_head.box_head: {roi.box_head} needs type decoupled "
            f"(the official Double-Head variant trains with decoupled sampling), got {roi.type}"
        )


def validate_dynamic(roi: DictConfig) -> None:
    """``dynamic`` set exactly when the type is dynamic, which needs a smooth-L1 box loss (its
    beta is what adapts) and the one shared 2-fc stage of Faster R-CNN."""
    key = "config model.roi_head.dynamic"
    if roi.type != "dynamic":
        if roi.dynamic is not None:
            raise DrcnnError(f"{key}: type {roi.type} takes no dynamic settings (set null)")
        return
    if roi.dynamic is None:
        raise DrcnnError(f"{key}: type dynamic needs its settings (iou_topk, beta_topk, ...)")
    if roi.loss_bbox.type != "smooth_l1":
        raise DrcnnError(
            f"config model.roi_head.loss_bbox.type: type dynamic adapts a smooth_l1 beta, "
            f"got {roi.loss_bbox.type}"
        )
    if roi.box_head not in (None, "shared"):
        raise DrcnnError(
            f"config model.roi_head.box_head: type dynamic runs shared, got {roi.box_head}"
        )
    for name in ("iou_topk", "beta_topk", "update_interval"):
        if roi.dynamic[name] < 1:
            raise DrcnnError(f"{key}.{name}: expected a positive integer")
    if not 0 < roi.dynamic.initial_iou < 1 or roi.dynamic.initial_beta <= 0:
        raise DrcnnError(f"{key}: expected 0 < initial_iou < 1 and initial_beta > 0")


def validate_box_loss(entry: DictConfig, key: str) -> None:
    """A known ``type``; each field it uses set (beta > 0), every other field unset."""
    check_typed_entry(entry, key, BOX_LOSS_FIELDS)
    if entry.type == "smooth_l1" and entry.beta <= 0:
        raise DrcnnError(f"config {key}.beta: type smooth_l1 needs a positive beta")


def require_same_names(table: Mapping[str, object], names: Sequence[str], table_name: str) -> None:
    """A model-side table keyed by one of this module's name lists has exactly those names.

    The lists live here, so that validating a config imports no model code; each table checks
    itself against its list when its module is imported, so a name added on one side only
    fails at once instead of as a late KeyError or a choice the config refuses.
    """
    if set(table) != set(names):
        raise RuntimeError(
            f"{table_name}: names {sorted(table)} differ from drcnn.config's {sorted(names)}"
        )


def validate_anchor_convention(rpn: DictConfig) -> None:
    """``mmdet`` needs ``min_pos_iou`` in [0, 1] and ``allowed_border`` >= -1; ``torchvision``
    takes neither."""
    key = "model.rpn"
    _check_choice(rpn.anchor_convention, f"{key}.anchor_convention", ANCHOR_CONVENTIONS)
    if rpn.anchor_convention == "torchvision":
        for name in ("min_pos_iou", "allowed_border"):
            if rpn[name] is not None:
                raise DrcnnError(
                    f"config {key}.{name}: anchor_convention torchvision takes no {name} "
                    f"(got {rpn[name]}; set null)"
                )
        return
    if rpn.min_pos_iou is None or not 0 <= rpn.min_pos_iou <= 1:
        raise DrcnnError(f"config {key}.min_pos_iou: anchor_convention mmdet needs 0..1")
    if rpn.allowed_border is None or rpn.allowed_border < -1:
        raise DrcnnError(
            f"config {key}.allowed_border: anchor_convention mmdet needs -1 (keep every "
            "anchor) or a border in pixels >= 0"
        )


def upgrade_stored_model(data: dict) -> dict:
    """A stored config (checkpoint) as this schema reads it, as a new dict: a ``loss_bbox``
    written as a plain string (before the typed entry) becomes the entry that code meant
    (its smooth_l1 had beta 1/9); a sampler entry without ``type`` gets one
    (:func:`typed_sampler`)."""
    data = copy.deepcopy(data)
    model = data.get("model") if isinstance(data, dict) else None
    for part in ("rpn", "roi_head"):
        section = model.get(part) if isinstance(model, dict) else None
        if isinstance(section, dict) and isinstance(section.get("loss_bbox"), str):
            kind = section["loss_bbox"]
            section["loss_bbox"] = {"type": kind, "beta": 1 / 9 if kind == "smooth_l1" else None}
    roi = model.get("roi_head") if isinstance(model, dict) else None
    for slot in ("cls_sampler", "reg_sampler"):
        entry = roi.get(slot) if isinstance(roi, dict) else None
        if isinstance(entry, dict) and "type" not in entry:
            roi[slot] = typed_sampler(slot, entry)
    return data


# The sampler each slot ran before sampler entries had a ``type``: the classification sampler
# was always random, the regression sampler always positive (its pos_fraction, 1.0 in every
# shipped config, was read nowhere).
UNTYPED_SAMPLER_TYPES = {"cls_sampler": "random", "reg_sampler": "positive"}


def typed_sampler(slot: str, entry: dict) -> dict:
    """A stored ``{num, pos_fraction, add_gt}`` sampler entry (written before samplers had a
    ``type``) as the typed entry that ran: the slot's type (:data:`UNTYPED_SAMPLER_TYPES`),
    its fields kept, a ``pos_fraction`` the type does not use dropped."""
    kind = UNTYPED_SAMPLER_TYPES[slot]
    unused = {name for names in SAMPLER_FIELDS.values() for name in names} - {*SAMPLER_FIELDS[kind]}
    return {"type": kind, **{k: v for k, v in entry.items() if k not in unused}}


def rpn_nms_thresholds(rpn: DictConfig) -> tuple[float, ...]:
    """The training NMS threshold(s): ``(t,)`` for one proposal set, ``(t_cls, t_reg)`` for two."""
    value = rpn.nms_thresh
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    values = list(value) if isinstance(value, list | tuple) else [value]
    ok = 1 <= len(values) <= 2 and all(
        isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= 1 for v in values
    )
    if not ok:
        raise DrcnnError(
            "config model.rpn.nms_thresh: expected a float in (0, 1] or a pair "
            f"[cls_thresh, reg_thresh], got {value!r}"
        )
    return tuple(float(v) for v in values)


def default_config() -> DictConfig:
    """The schema with its defaults (struct mode: unknown keys are errors)."""
    cfg = OmegaConf.structured(Config)
    OmegaConf.set_struct(cfg, True)
    return cfg


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """Apply dotted ``key=value`` overrides (values parsed as YAML); errors name the key."""
    for item in overrides:
        if "=" not in item:
            raise DrcnnError(f"override {item!r}: expected KEY=VALUE, e.g. train.max_iters=20")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise DrcnnError(f"override {key}: value {raw!r} is not valid YAML") from exc
        reject_interpolations(value, f"override {key}")
        if OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
            raise DrcnnError(f"override {key}: unknown config key")
        try:
            OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException as exc:
            raise DrcnnError(f"override {key}: {str(exc).splitlines()[0]}") from exc
    return cfg


def load_config(
    path: str | Path | None = None, overrides: Sequence[str] = (), base: DictConfig | None = None
) -> DictConfig:
    """Load a YAML config (with ``_base_`` inheritance) over the schema, then apply overrides.

    ``path=None`` gives the schema defaults (plus overrides). ``base`` starts from an already
    resolved config (e.g. the one stored in a checkpoint) instead of the schema defaults.
    """
    cfg = default_config() if base is None else config_from_dict(OmegaConf.to_container(base))
    if path is not None:
        cfg = _merge_file(cfg, Path(path))
        OmegaConf.set_struct(cfg, True)
    apply_overrides(cfg, overrides)
    return validate(cfg)


def config_from_dict(data: dict, source: str = "stored config") -> DictConfig:
    """Rebuild a typed config from a plain dict (e.g. the one saved in a checkpoint); errors
    start with ``source`` (e.g. ``checkpoint PATH: stored config``)."""
    reject_interpolations(data, source)
    try:
        cfg = OmegaConf.merge(default_config(), upgrade_stored_model(data))
    except OmegaConfBaseException as exc:
        raise DrcnnError(f"{source}: {_describe(exc)}") from exc
    OmegaConf.set_struct(cfg, True)
    try:
        return validate(cfg)
    except DrcnnError as exc:
        raise DrcnnError(f"{source}: {exc}") from exc


def to_dict(cfg: DictConfig) -> dict:
    """Plain-Python copy (for checkpoints and JSON)."""
    return OmegaConf.to_container(cfg, resolve=True)


def to_yaml(cfg: DictConfig) -> str:
    """YAML text of the resolved config (saved beside every run)."""
    return OmegaConf.to_yaml(cfg, resolve=True)
