"""ResNet / ResNeXt + FPN (P2-P6) backbones, with frozen stages and ImageNet weight loading.

The module tree is torchvision's ``BackboneWithFPN`` (``body`` = the ResNet trunk, ``fpn`` = the
pyramid with a max-pooled P6), so parameter names equal those of torchvision's
``fasterrcnn_resnet50_fpn`` backbone and its state dicts load directly. Output: an ordered dict
with keys ``"0".."3"`` (P2-P5, strides 4-32) and ``"pool"`` (P6, stride 64).

With ``channels_last`` (the default) the convolution weights and the activations inside the
backbone are stored channels-last (NHWC), the layout oneDNN's CPU convolutions work in; in
PyTorch's default layout every convolution converts its input and output. Measured on 2 CPU
cores, R-50-FPN at 800x1344: 1.59 s -> 1.13 s per image. The returned features are ordinary
contiguous (NCHW) tensors, as the RPN and torchvision's RoIAlign expect.

At inference (eval mode, no gradients) every BatchNorm of the trunk that computes a fixed affine
map (``eval_bn``, the official setting, and ``bn`` in eval mode; :func:`fixed_affine`) is folded
into the convolution before it, as inference toolchains do (torch's ``fuse_conv_bn_eval``):
``conv(x, w) * s + t`` is ``conv(x, w * s) + t``. A CUDA profile of R-50 at 800x1333 showed 53
separate BatchNorm kernels taking more time than all the convolutions. The folded trunk is a
cached copy (not a registered submodule), so parameters, ``state_dict()`` and training are
untouched (:meth:`ResNetFPN.inference_body`).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlparse

import torch
import torchvision
from omegaconf import DictConfig
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from drcnn.config import BACKBONE_ARCHS, NORM_TYPES, require_same_names
from drcnn.errors import DrcnnError

TORCHVISION_PREFIX = "torchvision://"
OPEN_MMLAB_PREFIX = "open-mmlab://"
# torch hub's file-name convention: "<name>-<first hex digits of the SHA-256>.pth"
HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")
# mmcv's model zoo (mmcv/model_zoo/open_mmlab.json): open-mmlab's ImageNet ResNeXt weights, which
# the official X-101 configs name; mmcv caches them in torch hub's checkpoint folder.
OPEN_MMLAB_URLS = {
    "resnext101_32x4d": (
        "https://download.openmmlab.com/pretrain/third_party/resnext101_32x4d-a5af3160.pth"
    ),
    "resnext101_64x4d": (
        "https://download.openmmlab.com/pretrain/third_party/resnext101_64x4d-ee2c6f71.pth"
    ),
}
STAGE_NAMES = ("layer1", "layer2", "layer3", "layer4")
STEM_NAMES = ("conv1", "bn1")


class ResNetSpec(NamedTuple):
    """How to build one trunk: block type, blocks per stage, ResNeXt groups and group width."""

    block: type[nn.Module]
    layers: tuple[int, int, int, int]
    groups: int = 1
    width_per_group: int = 64


# One explicit table: config arch name -> trunk shape (torchvision's definitions).
RESNET_SPECS: dict[str, ResNetSpec] = {
    "resnet18": ResNetSpec(BasicBlock, (2, 2, 2, 2)),
    "resnet34": ResNetSpec(BasicBlock, (3, 4, 6, 3)),
    "resnet50": ResNetSpec(Bottleneck, (3, 4, 6, 3)),
    "resnet101": ResNetSpec(Bottleneck, (3, 4, 23, 3)),
    "resnext101_32x4d": ResNetSpec(Bottleneck, (3, 4, 23, 3), groups=32, width_per_group=4),
    "resnext101_64x4d": ResNetSpec(Bottleneck, (3, 4, 23, 3), groups=64, width_per_group=4),
}
require_same_names(RESNET_SPECS, BACKBONE_ARCHS, "drcnn.models.backbone.RESNET_SPECS")


class ResNetFPN(BackboneWithFPN):
    """torchvision's ``BackboneWithFPN`` whose frozen stages also stay in eval mode.

    Freezing (mmdetection's ``frozen_stages``) stops gradients *and* keeps the frozen stages'
    BatchNorm statistics fixed when the model is put in training mode. ``fpn_init``:
    ``"kaiming_uniform"`` keeps torchvision's FPN init, ``"xavier_uniform"`` re-initialises the
    FPN convolutions as mmdetection's ``FPN.init_weights`` does.
    """

    def __init__(
        self,
        trunk: ResNet,
        frozen_stages: int,
        out_channels: int,
        channels_last: bool = True,
        fpn_init: str = "kaiming_uniform",
    ) -> None:
        stage_channels = [trunk.inplanes // 8 * 2**i for i in range(4)]
        super().__init__(
            trunk,
            return_layers={name: str(i) for i, name in enumerate(STAGE_NAMES)},
            in_channels_list=stage_channels,
            out_channels=out_channels,
            extra_blocks=LastLevelMaxPool(),
        )
        if fpn_init == "xavier_uniform":
            xavier_init_convs(self.fpn)
        frozen = (*STEM_NAMES, *STAGE_NAMES[:frozen_stages]) if frozen_stages > 0 else ()
        self.frozen_names = frozen
        for name in frozen:
            self.body[name].requires_grad_(False)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # the folded trunk and the weight versions it was made from; a plain dict, so that it
        # is neither a submodule nor in the state dict (see inference_body)
        self.folded: dict[str, Any] = {}
        self.register_load_state_dict_post_hook(lambda module, _: module.folded.clear())
        self.to(memory_format=self.memory_format)
        self.train()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """FPN features (NCHW) of a batch ``x``, computed in the backbone's memory format; at
        inference (eval mode, no gradients) by the trunk with its BatchNorms folded."""
        x = x.contiguous(memory_format=self.memory_format)
        inference = not self.training and not torch.is_grad_enabled()
        body = self.inference_body() if inference else self.body
        features = self.fpn(body(x))
        return {name: f.contiguous() for name, f in features.items()}

    def inference_body(self) -> nn.Module:
        """The trunk with every fixed-affine BatchNorm folded into its convolution
        (:func:`fold_norms`), made on first use and again after any weight of the trunk changed:
        in place (an optimiser step, ``copy_``: the tensors' version counters), by
        ``load_state_dict``, ``to()`` or training mode (all of which drop it), or after a
        submodule's mode changed (which norms fold). Kept across ``eval()`` calls: analysis code
        switches to eval mode around every image (``eval_mode``), and a copy per call cost the
        sensitivity study 6 s per model in ``make demo``. Weights created under
        ``torch.inference_mode`` have no version counter: such a trunk runs unfolded."""
        tensors = [*self.body.parameters(), *self.body.buffers()]
        if any(t.is_inference() for t in tensors):
            return self.body
        key = (
            tuple(t._version for t in tensors),
            tuple(module.training for module in self.body.modules()),
        )
        if self.folded.get("key") != key:
            self.folded.clear()  # the stale copy goes before the new one is made
            # normal tensors even when called under inference_mode: usable in any later mode
            with torch.inference_mode(False), torch.no_grad():
                body = fold_norms(self.body).to(memory_format=self.memory_format)
            self.folded.update(key=key, body=body)
        return self.folded["body"]

    def train(self, mode: bool = True) -> ResNetFPN:
        """Switch modes, but leave the frozen stages in eval mode. Training mode drops the
        folded trunk (its weights are about to change; the copy would only hold memory)."""
        super().train(mode)
        for name in self.frozen_names:
            self.body[name].eval()
        if mode:
            self.folded.clear()
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> ResNetFPN:
        """``to()``, ``cuda()``, ``half()``...: the folded copy would stay behind, so drop it."""
        self.folded.clear()
        return super()._apply(fn, recurse)


def fixed_affine(norm: nn.Module) -> bool:
    """Whether ``norm`` is a BatchNorm that folds: one in eval mode normalising with running
    statistics (``eval_bn``, and ``bn`` at inference), which computes a fixed per-channel affine
    map. Not GroupNorm, not a BatchNorm in training mode, and not torchvision's
    ``FrozenBatchNorm2d`` (``frozen_bn``): the torchvision-parity config uses it to compute as
    torchvision does, and folding moved a random R-50's boxes by up to 0.007 px there, beyond
    the parity test's 0.001."""
    return isinstance(norm, nn.BatchNorm2d) and not norm.training and norm.running_mean is not None


def conv_norm_pairs(module: nn.Module) -> Iterator[tuple[nn.Module, str, str]]:
    """``(parent, conv name, norm name)`` of each convolution followed by a fixed-affine norm in
    a torchvision ResNet: ``conv1``/``bn1`` (stem), ``convK``/``bnK`` (blocks), and ``0``/``1``
    of a block's ``downsample``."""
    for parent in module.modules():
        children = dict(parent.named_children())
        for name, child in children.items():
            if not fixed_affine(child):
                continue
            conv = f"conv{name[2:]}" if name.startswith("bn") else None
            if name.isdigit() and int(name) > 0:
                conv = str(int(name) - 1)
            if isinstance(children.get(conv), nn.Conv2d):
                yield parent, conv, name


def fold_norms(body: nn.Module) -> nn.Module:
    """A copy of ``body`` for inference in which each convolution followed by a fixed-affine
    BatchNorm carries the BatchNorm (weight scaled, bias added, torch's
    ``fuse_conv_bn_weights``) and the BatchNorm is an ``nn.Identity``. Equal to ``body`` in
    eval mode up to float rounding; its weights take no gradients."""
    folded = copy.deepcopy(body).requires_grad_(False)
    for parent, conv_name, norm_name in list(conv_norm_pairs(folded)):
        conv, norm = getattr(parent, conv_name), getattr(parent, norm_name)
        conv.weight, conv.bias = fuse_conv_bn_weights(
            conv.weight,
            conv.bias,
            norm.running_mean,
            norm.running_var,
            norm.eps,
            norm.weight,
            norm.bias,
        )
        setattr(parent, norm_name, nn.Identity())
    return folded


def xavier_init_convs(module: nn.Module) -> None:
    """mmdetection's ``FPN.init_weights``: every conv xavier-uniform (gain 1), biases zero.

    (mmcv's ``xavier_init(m, distribution='uniform')``.) torchvision's FPN uses
    ``kaiming_uniform_(a=1)``, whose bound ``sqrt(3 / fan_in)`` equals xavier's
    ``sqrt(6 / (fan_in + fan_out))`` only where the two fans are equal (the 3x3 output convs);
    the 1x1 lateral convs (``fan_in`` 256..2048 -> ``fan_out`` 256) get larger weights here.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class EvalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm with frozen statistics and a trainable affine transform (the official setting).

    mmdetection's ``norm_eval=True`` with ``norm_cfg=dict(type='BN', requires_grad=True)``: the
    running mean and variance (ImageNet's) normalise in training and inference alike and are
    never updated, while ``weight`` and ``bias`` receive gradients (unless their stage is
    frozen). Computed in any module mode by one fused ``batch_norm`` call, as an eval-mode
    ``nn.BatchNorm2d`` would be; same state-dict keys as ``nn.BatchNorm2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


class FusedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """torchvision's frozen BatchNorm computed by the fused ``batch_norm`` kernel.

    Same buffers (so state dicts are interchangeable) and the same function (statistics and
    affine fixed, gradients reach only the input), but one fused kernel instead of a multiply
    and an add per layer: about 0.27 s less per 800x1333 image for a ResNet-50 on a CPU.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


# config model.backbone.norm -> BatchNorm layer (the names of drcnn.config.NORM_TYPES).
NORM_LAYERS: dict[str, type[nn.Module]] = {
    "eval_bn": EvalBatchNorm2d,
    "frozen_bn": FusedFrozenBatchNorm2d,
    "bn": nn.BatchNorm2d,
}
require_same_names(NORM_LAYERS, NORM_TYPES, "drcnn.models.backbone.NORM_LAYERS")


def build_trunk(arch: str, norm: str) -> ResNet:
    """A ResNet/ResNeXt trunk (randomly initialised) with the BatchNorm of ``norm``."""
    spec = RESNET_SPECS[arch]
    norm_layer = NORM_LAYERS[norm]
    return ResNet(
        spec.block,
        list(spec.layers),
        groups=spec.groups,
        width_per_group=spec.width_per_group,
        norm_layer=norm_layer,
    )


def build_backbone(cfg: DictConfig, pretrained: bool = True) -> ResNetFPN:
    """The backbone of ``cfg.model.backbone``: trunk, the pretrained weights it names (unless
    ``pretrained`` is False: see :func:`drcnn.models.detector.build_detector`), FPN, freezing."""
    bcfg = cfg.model.backbone
    weights = read_pretrained(str(bcfg.pretrained)) if pretrained and bcfg.pretrained else None
    trunk = build_trunk(bcfg.arch, bcfg.norm)
    if weights is not None:
        load_trunk_weights(trunk, weights, str(bcfg.pretrained))
    return ResNetFPN(
        trunk, bcfg.frozen_stages, bcfg.fpn_channels, bcfg.channels_last, bcfg.fpn_init
    )


def read_pretrained(source: str) -> dict[str, torch.Tensor]:
    """The state dict named by ``model.backbone.pretrained``.

    ``torchvision://NAME`` and ``open-mmlab://NAME`` are resolved as mmcv 1.x (the official
    code's) resolved them, and read from torch hub's checkpoint folder, where they are
    downloaded once; anything else is a local file.
    """
    if source.startswith(TORCHVISION_PREFIX):
        weights = _torchvision_weights(source[len(TORCHVISION_PREFIX) :])
        return _file_state_dict(_hub_file(weights.url, f"torchvision weights {weights}", True))
    if source.startswith(OPEN_MMLAB_PREFIX):
        name = source[len(OPEN_MMLAB_PREFIX) :]
        return _file_state_dict(_hub_file(_open_mmlab_url(name), f"open-mmlab weights {name}"))
    return _file_state_dict(Path(source))


def _torchvision_weights(name: str) -> torchvision.models.WeightsEnum:
    """``resnet50`` -> ``ResNet50_Weights.IMAGENET1K_V1``; ``ResNet50_Weights.X`` -> those.

    A model name means the first ImageNet weights torchvision published for it, IMAGENET1K_V1:
    what ``torchvision://resnet50`` loaded in the official code (mmcv 1.x looked the name up in
    torchvision 0.7's ``model_urls``, ``resnet50-19c8e357.pth``, since re-saved by torchvision
    as ``resnet50-0676ba61.pth``), not today's DEFAULT (IMAGENET1K_V2, a later recipe).
    """
    try:
        if "." in name:
            return torchvision.models.get_weight(name)
        return torchvision.models.get_model_weights(name)["IMAGENET1K_V1"]
    except (KeyError, ValueError, AttributeError) as exc:
        raise DrcnnError(
            f"config model.backbone.pretrained: unknown torchvision weights {name!r} "
            "(expected e.g. torchvision://resnet50 or torchvision://ResNet50_Weights.IMAGENET1K_V2)"
        ) from exc


def _open_mmlab_url(name: str) -> str:
    """The URL of mmcv's model-zoo name ``name`` (the ResNeXt weights of the X-101 configs)."""
    if name not in OPEN_MMLAB_URLS:
        raise DrcnnError(
            f"config model.backbone.pretrained: unknown open-mmlab weights {name!r} (expected "
            f"one of {', '.join(OPEN_MMLAB_PREFIX + n for n in OPEN_MMLAB_URLS)})"
        )
    return OPEN_MMLAB_URLS[name]


def _hub_file(url: str, what: str, check_hash: bool = False) -> Path:
    """``url``'s file in torch hub's checkpoint folder, downloaded there first if missing.

    ``check_hash``: the file name carries the start of the file's SHA-256 (torchvision's
    convention; mmcv did not check open-mmlab's files). Without network and without the file, a
    one-line error says which file to put where.
    """
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if path.is_file():
        return path
    match = HASH_IN_NAME.search(path.name) if check_hash else None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(
            url, str(path), hash_prefix=match.group(1) if match else None, progress=False
        )
    except (OSError, RuntimeError) as exc:  # no network, unwritable folder, hash mismatch
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DrcnnError(
            f"config model.backbone.pretrained: cannot fetch {what} ({reason}); put {path.name} "
            f"(from {url}) into {path.parent}, give a local file path, or run with "
            "`--set model.backbone.pretrained=null` for random initialisation"
        ) from exc
    return path


def _file_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The weights in a state-dict file, unwrapped as mmcv's ``load_checkpoint`` unwraps them.

    A plain state dict, or a checkpoint holding it under ``state_dict`` (mmcv's layout) or
    ``model`` (drcnn's); a ``module.`` prefix (weights saved from a data-parallel model) is
    stripped. The key names themselves need no mapping: mmdetection's ResNet/ResNeXt modules are
    named as torchvision's (``conv1``, ``bn1``, ``layerN.M.convK`` / ``bnK``,
    ``downsample.0`` / ``.1``).
    """
    if not path.is_file():
        raise DrcnnError(
            f"config model.backbone.pretrained: {path} is not a file (expected a state-dict file, "
            "torchvision://<name>, open-mmlab://<name>, or null)"
        )
    try:
        data: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling/format problem is the user's file
        raise DrcnnError(
            f"{path}: not a loadable PyTorch state dict ({exc})".splitlines()[0]
        ) from exc
    for key in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict):
        raise DrcnnError(f"{path}: expected a state dict (a mapping of parameter names)")
    return {_strip_prefix(str(k), "module."): v for k, v in data.items()}


def _strip_prefix(key: str, prefix: str) -> str:
    return key[len(prefix) :] if key.startswith(prefix) else key


def load_trunk_weights(trunk: ResNet, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load ImageNet weights into the trunk; the classifier (``fc``) may be absent or ignored.

    BatchNorm step counters (``num_batches_tracked``) may be absent too (older files; mmcv
    ignores them as well): they hold no weights.
    """
    result = _load_checked(trunk, state_dict, source)
    missing = [
        k
        for k in result.missing_keys
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    ]
    if missing:
        raise DrcnnError(f"{source}: weight {missing[0]!r} of the backbone is missing")
    if result.unexpected_keys:
        raise DrcnnError(f"{source}: unexpected weight {result.unexpected_keys[0]!r}")


def _load_checked(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> Any:
    """``load_state_dict(strict=False)``, with shape mismatches named in one line."""
    own = module.state_dict()
    for key, value in state_dict.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise DrcnnError(
                f"{source}: weight {key!r} has shape {tuple(value.shape)}, "
                f"expected {tuple(own[key].shape)}"
            )
    return module.load_state_dict(state_dict, strict=False)
