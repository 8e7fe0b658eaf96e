"""The Double-Head box heads of the official repository's head ablation (``box_head: double``).

Double-Head R-CNN (Wu et al. 2020) classifies with fully connected layers and regresses with
convolutions; the official Decoupled R-CNN repository trains that pair with decoupled sampling
(``mmdet/models/roi_heads/bbox_heads/double_decoupled_bbox_head.py``, "DDH" below, with
``double_decoupled_refine_roi_head.py``, "DDRH") and regresses again in refine stages with the
conv branch alone (``double_refine_bbox_head.py``, "DRH"). Layers, as the official code builds
them (``C`` = FPN channels, ``D`` = ``fc_dim``, ``S`` = RoI size, K classes):

- :class:`ResBlock` (``BasicResBlock``, DDH:12-73): 3x3 conv ``C -> C`` + BN + ReLU, 1x1 conv
  ``C -> D`` + BN; identity path 1x1 conv ``C -> D`` + BN; ReLU of the sum. Convs without bias,
  kaiming-normal (fan_out, relu) as mmcv's ``ConvModule`` initialises them; BN weight 1, bias 0.
- :data:`NUM_CONVS` torchvision ``Bottleneck(D, D // 4)`` blocks (DDH:117-131, mmdetection's
  ResNet ``Bottleneck``, stride 1, no downsample: the same layers), PyTorch's default conv init
  (the head's ``init_weights`` does not touch them, DDH:146-153).
- average pooling over the ``S x S`` RoI (``with_avg_pool`` forced on, DDH:90, 162-163), then
  ``bbox_pred``: ``D -> 4K`` (stage 0) or ``D -> 4`` (refine), normal(0, 0.01), zero bias
  (DDH:149, DRH:120; not 0.001 as in the fc heads).
- classification (stage 0 only): 2 fc ``C*S*S -> D -> D`` with ReLU (DDH:133-144), xavier
  uniform (DDH:151-153), then ``cls_score`` ``D -> K+1``, normal(0, 0.01) (DDH:148).

The regression branch pools its RoIs enlarged :data:`REG_ROI_SCALE` times about their centre
(DDRH:164-169 stage 0, 179-184 refine stages; the FPN level is still chosen from the RoI as
given, mmdetection's ``SingleRoIExtractor``). Its BatchNorm layers train on batch statistics, so
in stage 0 the conv branch runs on every RoI of the stage, the classification samples included,
as the official head does (DDRH:193-194 pools both samples and runs both branches on all rows).

Losses are those of the fc heads, normalisers included: cross-entropy averaged over the
classification samples (DDH:297), stage-0 box loss over ``labels_reg.size(0)`` = classification
samples + padded regression rows (DDH:330, as ``DecoupledBBoxHead``), refine stages over twice
the padded rows (DRH:208, as ``RefineBBoxHead``); :mod:`drcnn.models.roi_heads.decoupled`
computes them for every box head.

The official repository ships no config for these heads; the counts it leaves to a config are
mmdetection's Double-Head config's (``configs/double_heads/dh_faster_rcnn_r50_fpn_1x_coco.py``:
``reg_roi_scale_factor=1.3`` line 5, ``num_convs=4`` line 9, ``num_fcs=2`` line 10) and the conv
width is ``fc_dim`` (both 1024 there, line 12-13), so the synthetic configs shrink both at once.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck

from drcnn.models.box_heads import BoxHead, _mlp, _output_layer, _two_fc

NUM_CONVS = 4  # Bottleneck blocks after the ResBlock (mmdetection Double-Head num_convs)
REG_ROI_SCALE = 1.3  # regression RoIs pooled 1.3x larger (mmdetection reg_roi_scale_factor)


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """mmcv ``ConvModule`` without activation: bias-free conv (kaiming-normal, fan_out) + BN."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels))


class ResBlock(nn.Module):
    """``BasicResBlock``: widens ``C`` RoI channels to ``D`` with a residual 3x3 + 1x1 path."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(in_channels, in_channels, 3)
        self.conv2 = _conv_bn(in_channels, out_channels, 1)
        self.conv_identity = _conv_bn(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x))) + self.conv_identity(x))


class ConvBranch(nn.Module):
    """The regression trunk: ResBlock, :data:`NUM_CONVS` bottlenecks, average pool -> ``(N, D)``."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.res_block = ResBlock(in_channels, width)
        self.bottlenecks = nn.Sequential(*(Bottleneck(width, width // 4) for _ in range(NUM_CONVS)))

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C, S, S)`` RoI features -> ``(N, D)``; the mean over the S x S grid is
        mmdetection's ``AvgPool2d(roi_feat_size)``."""
        return self.bottlenecks(self.res_block(x)).mean(dim=(2, 3))


class DoubleHead(BoxHead):
    """Stage 0 of ``box_head: double``: fc classification, conv class-specific regression."""

    background_slot = False
    reg_roi_scale = REG_ROI_SCALE

    def __init__(self, in_channels: int, roi_size: int, width: int, num_classes: int) -> None:
        super().__init__()
        self.reg_convs = ConvBranch(in_channels, width)
        self.bbox_pred = _output_layer(width, 4 * num_classes, 0.01)
        self.cls_fc6, self.cls_fc7 = _two_fc(in_channels * roi_size**2, width)
        self.cls_score = _output_layer(width, num_classes + 1, 0.01)

    def forward_cls(self, x: Tensor) -> Tensor:
        """Classification branch: RoI features (as given) -> K+1 logits."""
        return self.cls_score(_mlp(x, self.cls_fc6, self.cls_fc7))

    def forward_reg(self, x: Tensor) -> Tensor:
        """Regression branch: RoI features (pooled :attr:`reg_roi_scale` larger) -> 4K deltas."""
        return self.bbox_pred(self.reg_convs(x))


class ConvRefineHead(BoxHead):
    """A refine stage of ``box_head: double`` (``DoubleRefineBBoxHead``): conv branch -> 4."""

    reg_roi_scale = REG_ROI_SCALE

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.reg_convs = ConvBranch(in_channels, width)
        self.bbox_pred = _output_layer(width, 4, 0.01)

    def forward(self, x: Tensor) -> Tensor:
        """RoI features (pooled :attr:`reg_roi_scale` larger) -> ``(N, 4)`` deltas."""
        return self.bbox_pred(self.reg_convs(x))
