"""The fully connected box heads that run on RoIAlign features.

All three flatten a ``(N, C, S, S)`` RoI feature and apply two ReLU fully connected layers, as
torchvision's ``TwoMLPHead`` does:

- :class:`FastRCNNHead` (Faster / Cascade R-CNN): one shared trunk -> class logits + deltas.
- :class:`DecoupledHead` (Decoupled R-CNN stage 0): two *unshared* trunks, one for
  classification and one for class-specific regression, so each branch can run on its own
  samples (``forward_cls`` / ``forward_reg``). Two switches give the official repository's head
  ablations: ``shared_trunk`` (``DecoupledSharedBBoxHead``: one trunk for both branches, with
  decoupled sampling) and, under the standard RoI head, the plain unshared head with ordinary
  sampling (``Unshared2FCBBoxHead``, the same layers as ``DecoupledBBoxHead``).
- :class:`RefineHead` (Decoupled R-CNN stages 1..N-1): a regression-only trunk with
  class-agnostic deltas.

The Double-Head variant (conv regression branch) is in :mod:`drcnn.models.double_head`.

Initialisation follows the official code as it runs: the 2-fc trunks of :class:`FastRCNNHead`
(mmdetection's ``ConvFCBBoxHead.init_weights``) and :class:`DecoupledHead`
(``DecoupledBBoxHead.init_weights``) are xavier-uniform with zero bias; :class:`RefineHead`'s
trunk keeps PyTorch's default ``nn.Linear`` init, because ``RefineBBoxHead`` names its xavier
init ``__init_weights`` (name-mangled, never called) and so runs ``BBoxHead.init_weights``,
which only sets the output layer. Output layers: normal(0, 0.01) logits, normal(0, 0.001)
deltas, zero bias.

Deltas are in the std-normalised units of the stage's ``BoxCoder``. Class ``k`` (1..K) reads its
deltas from slot ``k`` when the head has a background slot (torchvision ``FastRCNNPredictor``
layout) and from slot ``k - 1`` otherwise; :meth:`BoxHead.deltas_for_labels` and
:meth:`BoxHead.foreground_deltas` hide that layout from the RoI heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# DecoupledSharedBBoxHead's stage-0 box normaliser over DecoupledBBoxHead's: avg_factor
# 0.5 * labels_reg.size(0) against labels_reg.size(0) (decoupled_shared_bbox_head.py:224,
# decoupled_bbox_head.py:235), i.e. twice the box-loss gradient for the shared trunk.
SHARED_NORMALISER_SCALE = 0.5


def _two_fc(in_features: int, fc_dim: int, xavier: bool = True) -> tuple[nn.Linear, nn.Linear]:
    """The 2-fc trunk; ``xavier``: xavier-uniform weights and zero bias, else PyTorch's init."""
    layers = nn.Linear(in_features, fc_dim), nn.Linear(fc_dim, fc_dim)
    if xavier:
        for layer in layers:
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    return layers


def _mlp(x: Tensor, fc6: nn.Linear, fc7: nn.Linear) -> Tensor:
    return F.relu(fc7(F.relu(fc6(x.flatten(start_dim=1)))))


def _output_layer(in_features: int, out_features: int, std: float) -> nn.Linear:
    """A prediction layer initialised normal(0, std) with zero bias (0.01 cls, 0.001 deltas)."""
    layer = nn.Linear(in_features, out_features)
    nn.init.normal_(layer.weight, std=std)
    nn.init.zeros_(layer.bias)
    return layer


class BoxHead(nn.Module):
    """Shared delta-layout helpers; subclasses define ``bbox_pred`` and ``background_slot``.

    ``reg_roi_scale``: the regression branch pools its RoIs enlarged by this factor about their
    centre (the Double-Head heads), ``None`` = as given. ``box_normaliser_scale``: the factor
    the head's own loss puts on the decoupled stage-0 box normaliser (the official
    ``avg_factor`` of its bbox head over that of ``DecoupledBBoxHead``).
    """

    background_slot: bool = False
    bbox_pred: nn.Linear
    reg_roi_scale: float | None = None
    box_normaliser_scale: float = 1.0

    @property
    def class_specific(self) -> bool:
        return self.bbox_pred.out_features > 4

    def deltas_for_labels(self, deltas: Tensor, labels: Tensor) -> Tensor:
        """``(N, 4)`` deltas of each row's class ``labels`` (1..K); class-agnostic deltas as is."""
        if not self.class_specific:
            return deltas
        per_class = deltas.unflatten(1, (-1, 4))
        slots = labels if self.background_slot else labels - 1
        return per_class[torch.arange(deltas.shape[0], device=deltas.device), slots]

    def foreground_deltas(self, deltas: Tensor) -> Tensor:
        """``(N, K, 4)`` class-specific deltas of the foreground classes 1..K."""
        per_class = deltas.unflatten(1, (-1, 4))
        return per_class[:, 1:] if self.background_slot else per_class


class FastRCNNHead(BoxHead):
    """Shared 2-fc trunk -> ``cls_score`` (K+1 logits) and ``bbox_pred`` (4(K+1) or 4 deltas)."""

    background_slot = True

    def __init__(
        self, in_features: int, fc_dim: int, num_classes: int, class_agnostic: bool = False
    ) -> None:
        super().__init__()
        self.fc6, self.fc7 = _two_fc(in_features, fc_dim)
        self.cls_score = _output_layer(fc_dim, num_classes + 1, 0.01)
        self.bbox_pred = _output_layer(
            fc_dim, 4 if class_agnostic else 4 * (num_classes + 1), 0.001
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """RoI features -> (class logits, deltas)."""
        x = _mlp(x, self.fc6, self.fc7)
        return self.cls_score(x), self.bbox_pred(x)


class DecoupledHead(BoxHead):
    """Unshared ``cls_fc6/cls_fc7/cls_score`` (K+1) and ``reg_fc6/reg_fc7/bbox_pred`` (4K, or 4
    with ``class_agnostic``), or with ``shared_trunk`` one ``fc6/fc7`` trunk under both outputs.

    ``shared_trunk`` is the official ``DecoupledSharedBBoxHead``
    (``decoupled_shared_bbox_head.py:25, 66-69``): the same output layers, and a stage-0 box
    loss divided by ``0.5 * labels_reg.size(0)`` (line 224) where ``DecoupledBBoxHead`` divides
    by ``labels_reg.size(0)``, hence :data:`SHARED_NORMALISER_SCALE`. Its ``init_weights``
    (lines 46-57) loops over ``self.cls_fcs`` and ``self.reg_fcs``, which that class does not
    have, so as committed it stops with an AttributeError once the output layers are set; drcnn
    gives the shared trunk the xavier init those lines meant, as ``DecoupledBBoxHead`` does.
    """

    background_slot = False

    def __init__(
        self,
        in_features: int,
        fc_dim: int,
        num_classes: int,
        shared_trunk: bool = False,
        class_agnostic: bool = False,
    ) -> None:
        super().__init__()
        if shared_trunk:
            self.fc6, self.fc7 = _two_fc(in_features, fc_dim)
            self.box_normaliser_scale = SHARED_NORMALISER_SCALE
        else:
            self.cls_fc6, self.cls_fc7 = _two_fc(in_features, fc_dim)
        self.cls_score = _output_layer(fc_dim, num_classes + 1, 0.01)
        if not shared_trunk:
            self.reg_fc6, self.reg_fc7 = _two_fc(in_features, fc_dim)
        self.bbox_pred = _output_layer(fc_dim, 4 if class_agnostic else 4 * num_classes, 0.001)
        self.shared_trunk = shared_trunk

    def forward_cls(self, x: Tensor) -> Tensor:
        """Classification branch: RoI features -> K+1 logits."""
        trunk = (self.fc6, self.fc7) if self.shared_trunk else (self.cls_fc6, self.cls_fc7)
        return self.cls_score(_mlp(x, *trunk))

    def forward_reg(self, x: Tensor) -> Tensor:
        """Regression branch: RoI features -> 4K class-specific (or 4) deltas."""
        trunk = (self.fc6, self.fc7) if self.shared_trunk else (self.reg_fc6, self.reg_fc7)
        return self.bbox_pred(_mlp(x, *trunk))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Both branches on the same RoIs (inference): (class logits, deltas)."""
        return self.forward_cls(x), self.forward_reg(x)


class RefineHead(BoxHead):
    """Regression-only refine stage: 2-fc trunk -> 4 class-agnostic deltas."""

    def __init__(self, in_features: int, fc_dim: int) -> None:
        super().__init__()
        self.fc6, self.fc7 = _two_fc(in_features, fc_dim, xavier=False)  # as the official runs
        self.bbox_pred = _output_layer(fc_dim, 4, 0.001)

    def forward(self, x: Tensor) -> Tensor:
        """RoI features -> (N, 4) deltas."""
        return self.bbox_pred(_mlp(x, self.fc6, self.fc7))
