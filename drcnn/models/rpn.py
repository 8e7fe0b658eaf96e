"""Region proposal network that can emit Decoupled R-CNN's two proposal sets.

torchvision's ``RegionProposalNetwork`` supplies anchors, the head, matching and box coding; its
anchors are sampled with drcnn's batched sampler (:mod:`drcnn.models.sampling`). This subclass
changes what happens after the per-level pre-NMS top-k in training when ``nms_thresh`` is a pair
``(t_cls, t_reg)``: the same candidates go through the per-level NMS twice, giving the
*classification* proposals (``t_cls``, usually 0.7) and the *regression* proposals (``t_reg``,
usually 0.85: more highly overlapping boxes survive). Its box loss is the configured one
(:func:`drcnn.models.losses.box_loss`) and its losses are named ``rpn.loss_*``.

With ``anchor_convention: mmdet`` it lays out and labels anchors as mmdetection 2.x does (the
official code and its baselines): :class:`MMDetAnchorGenerator` puts each level's anchors at the
level's nominal stride with unrounded base anchors, and training ignores the anchors of grid
cells outside an image's own padded area (they lie in the batch padding), optionally those
crossing the image border (``allowed_border``), and accepts a gt's best anchors as positives
only from IoU ``min_pos_iou`` on (:func:`mmdet_anchor_labels`). ``torchvision`` keeps
torchvision's behaviour for all of these.

Its anchors, proposals, scores and losses are float32 also under autocast (the head's convolutions
run in bf16 or fp16), and the anchors are kept across forward passes for each batch shape
(:meth:`DecoupledRPN.anchors`).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import (
    RegionProposalNetwork,
    RPNHead,
    concat_box_prediction_layers,
)

from drcnn.config import rpn_nms_thresholds
from drcnn.models.box_coder import BoxCoder
from drcnn.models.host_data import clip_rows, to_device
from drcnn.models.losses import box_loss
from drcnn.models.postprocess import batched_nms
from drcnn.models.sampling import Sampler, random_sample
from drcnn.models.shape_cache import ShapeCache
from drcnn.models.threads import cpu_path, thread_map

# Nominal strides of the FPN levels P2..P6 the RPN runs on.
LEVEL_STRIDES = (4, 8, 16, 32, 64)


class ProposalSets(NamedTuple):
    """Training proposals of Decoupled R-CNN: one list of ``(P_i, 4)`` boxes per image, per set."""

    cls: list[Tensor]
    reg: list[Tensor]


class Candidates(NamedTuple):
    """One image's proposals after top-k, clipping and filtering, before NMS."""

    boxes: Tensor
    scores: Tensor
    levels: Tensor


class MMDetAnchorGenerator(AnchorGenerator):
    """mmdetection 2.x's ``AnchorGenerator`` (scale-major, centre offset 0) in torchvision's API.

    Two differences from torchvision's: each level's anchors sit at the level's nominal
    ``strides`` (torchvision divides the padded batch size by the feature-map size, which
    gives 61 instead of 64 on P6 when a padded side is 800), and the base anchors keep their
    fractional half-sizes (torchvision rounds them to whole pixels). Anchor order is the same:
    level, then row, column, then aspect ratio.
    """

    def __init__(
        self,
        sizes: tuple[tuple[int, ...], ...],
        aspect_ratios: tuple[tuple[float, ...], ...],
        strides: tuple[int, ...],
    ) -> None:
        super().__init__(sizes, aspect_ratios)
        self.strides = tuple(int(s) for s in strides)

    def generate_anchors(
        self,
        scales: list[int],
        aspect_ratios: list[float],
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> Tensor:
        """Zero-centred base anchors ``(-w/2, -h/2, w/2, h/2)``, not rounded."""
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        aspect_ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(aspect_ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        """The same anchors for every image of the batch, ``(sum over levels of H*W*A, 4)``."""
        if len(feature_maps) != len(self.strides):
            raise ValueError(
                f"MMDetAnchorGenerator: {len(feature_maps)} feature maps for "
                f"{len(self.strides)} strides"
            )
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        grid_sizes = [list(f.shape[-2:]) for f in feature_maps]
        # filled on the device, not copied from the host (a blocking copy on CUDA)
        strides = [
            [torch.empty((), dtype=torch.int64, device=device).fill_(s)] * 2 for s in self.strides
        ]
        self.set_cell_anchors(dtype, device)
        anchors = torch.cat(self.grid_anchors(grid_sizes, strides))
        return [anchors for _ in image_list.image_sizes]

    def valid_mask(
        self, grid_sizes: list[tuple[int, int]], valid_size: tuple[int, int], device: torch.device
    ) -> Tensor:
        """``(num_anchors,)`` True for the anchors of grid cells inside ``valid_size`` ``(H, W)``.

        mmdetection's ``AnchorGenerator.valid_flags``: a cell (row ``i``, column ``j``) of a
        level with stride ``s`` is valid when ``i * s < H`` and ``j * s < W``.
        """
        masks = []
        for (rows, cols), stride, per_cell in zip(
            grid_sizes, self.strides, self.num_anchors_per_location(), strict=True
        ):
            inside_y = torch.arange(rows, device=device) * stride < valid_size[0]
            inside_x = torch.arange(cols, device=device) * stride < valid_size[1]
            cells = (inside_y[:, None] & inside_x[None, :]).flatten()
            masks.append(cells.repeat_interleave(per_cell))
        return torch.cat(masks)


def inside_border(anchors: Tensor, image_size: tuple[int, int], border: int) -> Tensor:
    """``(N,)`` True for anchors that reach at most ``border`` pixels beyond the ``(H, W)`` image
    (mmdetection's ``anchor_inside_flags``: ``x1, y1 >= -b``, ``x2 < W + b``, ``y2 < H + b``)."""
    height, width = image_size
    return (
        (anchors[:, 0] >= -border)
        & (anchors[:, 1] >= -border)
        & (anchors[:, 2] < width + border)
        & (anchors[:, 3] < height + border)
    )


def mmdet_anchor_labels(
    iou: Tensor,
    usable: Tensor,
    fg_iou_thresh: float,
    bg_iou_thresh: float,
    min_pos_iou: float,
    real_gt: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """mmdetection's ``MaxIoUAssigner`` on the ``usable`` anchors: ``(labels, matched_gt)``.

    ``iou``: ``(..., G, N)`` gt x anchor IoU (``G >= 1``; a leading batch dimension labels every
    image at once, ``usable`` then ``(..., N)``). Labels (float, as torchvision's RPN keeps
    them): 1 when the anchor's best IoU is >= ``fg_iou_thresh``, 0 when it is below
    ``bg_iou_thresh``, -1 in between and for anchors not ``usable``. Then every gt whose best
    IoU over the usable anchors is >= ``min_pos_iou`` takes all anchors with that IoU as
    positives matched to itself (gts in order, so a later gt wins a shared anchor); torchvision
    instead keeps them whatever their IoU, matched to their own best gt.

    ``real_gt`` ``(..., G)``: False for padding rows (images with fewer gts than ``G``), whose
    IoU must be 0: they never take anchors, and an image with padding rows only labels its
    usable anchors 0 (negatives), matched to row 0.
    """
    iou = torch.where(usable[..., None, :], iou, -1.0)
    best_iou, matched = iou.max(dim=-2)
    # masked_fill, not mask assignment: the same values without waiting for the device
    labels = torch.full_like(best_iou, -1.0)
    labels = labels.masked_fill((best_iou >= 0) & (best_iou < bg_iou_thresh), 0.0)
    labels = labels.masked_fill(best_iou >= fg_iou_thresh, 1.0)
    gt_best = iou.max(dim=-1, keepdim=True).values
    low_quality = (iou == gt_best) & (gt_best >= min_pos_iou)
    if real_gt is not None:
        low_quality &= real_gt[..., None]
    # each anchor's last low-quality gt (-1: none), as the largest 1-based row number among
    # them: one reduction over the gts (the argmax of the flipped uint8 mask before took 12x
    # as long on a CPU); int32 keeps it at the IoU matrix's size
    rows = torch.arange(1, iou.shape[-2] + 1, dtype=torch.int32, device=iou.device)[:, None]
    last_gt = (low_quality * rows).amax(dim=-2) - 1
    taken = last_gt >= 0
    matched = torch.where(taken, last_gt, matched)
    return labels.masked_fill(taken, 1.0), matched


def usable_candidates(
    boxes: Tensor, scores: Tensor, min_size: float, score_thresh: float
) -> Tensor:
    """``(..., K)`` True for the boxes with both sides >= ``min_size`` and a score >=
    ``score_thresh``: torchvision's ``remove_small_boxes`` then its score filter, as one mask
    (the same boxes)."""
    sides = boxes[..., 2:] - boxes[..., :2]
    return (sides >= min_size).all(dim=-1) & (scores >= score_thresh)


class DecoupledRPN(RegionProposalNetwork):
    """RPN returning ``ProposalSets`` in training with two NMS thresholds, else ``list[Tensor]``.

    ``train_nms_thresh`` holds one or two thresholds; ``nms_thresh`` (torchvision's attribute)
    is the test-time threshold. ``loss_bbox`` (``type`` l1 / smooth_l1, ``beta``) is summed over
    positive anchors and divided by the number of sampled anchors. ``anchor_convention``
    "mmdet" labels anchors with :func:`mmdet_anchor_labels` (``min_pos_iou``), ignoring those
    outside each image's padded size (its size rounded up to ``size_divisible``) and, with
    ``allowed_border >= 0``, those crossing the image border; "torchvision" labels every anchor
    with torchvision's matcher.
    """

    def __init__(
        self,
        anchor_generator: AnchorGenerator,
        head: RPNHead,
        *,
        fg_iou_thresh: float,
        bg_iou_thresh: float,
        batch_size_per_image: int,
        positive_fraction: float,
        pre_nms_top_n: dict[str, int],
        post_nms_top_n: dict[str, int],
        train_nms_thresh: tuple[float, ...],
        test_nms_thresh: float,
        score_thresh: float,
        min_size: float,
        loss_bbox: Any,
        anchor_convention: str = "torchvision",
        min_pos_iou: float | None = None,
        allowed_border: int | None = None,
        size_divisible: int = 32,
    ) -> None:
        super().__init__(
            anchor_generator,
            head,
            fg_iou_thresh,
            bg_iou_thresh,
            batch_size_per_image,
            positive_fraction,
            pre_nms_top_n,
            post_nms_top_n,
            test_nms_thresh,
            score_thresh,
        )
        self.box_coder = BoxCoder(self.box_coder.weights)  # torchvision's, without syncs
        del self.fg_bg_sampler  # torchvision's per-image sampler: drawn batched instead
        self.sampler: Sampler = partial(
            random_sample, num=batch_size_per_image, pos_fraction=positive_fraction
        )
        self.train_nms_thresh = tuple(train_nms_thresh)
        self.min_size = min_size
        self.loss_bbox = loss_bbox
        self.anchor_convention = anchor_convention
        self.min_pos_iou = min_pos_iou
        self.allowed_border = allowed_border
        self.size_divisible = size_divisible
        self.shape_cache: ShapeCache[Tensor] = ShapeCache()

    def _apply(self, fn: Any, recurse: bool = True) -> DecoupledRPN:
        """``to()``, ``cuda()``...: the kept anchors would stay on the old device, so drop them."""
        self.shape_cache.clear()
        return super()._apply(fn, recurse)

    def active_nms_thresholds(self) -> tuple[float, ...]:
        """The NMS thresholds of the current mode: one or two in training, one in eval."""
        return self.train_nms_thresh if self.training else (self.nms_thresh,)

    def select_candidates(
        self,
        proposals: Tensor,
        objectness: Tensor,
        image_shapes: list[tuple[int, int]],
        num_anchors_per_level: list[int],
    ) -> list[Candidates]:
        """Per-level top-k by objectness, clip to the image, drop tiny and low-scoring boxes;
        per image, its candidates in the order of the top-k."""
        num_images = proposals.shape[0]
        objectness = objectness.detach().reshape(num_images, -1)
        levels = torch.cat(
            [
                torch.full((n,), idx, dtype=torch.int64, device=proposals.device)
                for idx, n in enumerate(num_anchors_per_level)
            ]
        ).expand_as(objectness)
        top_n_idx = self._get_top_n_idx(objectness, num_anchors_per_level)
        batch_idx = torch.arange(num_images, device=proposals.device)[:, None]
        objectness = objectness[batch_idx, top_n_idx].sigmoid()
        levels = levels[batch_idx, top_n_idx]
        proposals = proposals[batch_idx, top_n_idx]

        # every image at once: clipped, filtered, and the kept rows taken in one selection
        # (the host waits once, for each image's count, which the split needs)
        per_image = [proposals.shape[1]] * num_images
        boxes = clip_rows(proposals.flatten(0, 1), per_image, image_shapes)
        keep = usable_candidates(boxes, objectness.flatten(), self.min_size, self.score_thresh)
        counts = keep.view(num_images, -1).sum(dim=1).tolist()
        rows = torch.nonzero_static(keep, size=sum(counts)).squeeze(1)
        columns = [t[rows].split(counts) for t in (boxes, objectness.flatten(), levels.flatten())]
        return [Candidates(*parts) for parts in zip(*columns, strict=True)]

    def nms_proposals(self, candidates: list[Candidates], thresh: float) -> list[Tensor]:
        """Per-level NMS at ``thresh``, then the ``post_nms_top_n`` best boxes of each image."""
        limit = self.post_nms_top_n()

        def keep(cand: Candidates) -> Tensor:
            return cand.boxes[batched_nms(cand.boxes, cand.scores, cand.levels, thresh)]

        run = thread_map if candidates and cpu_path(candidates[0].boxes.device) else map
        return [boxes[:limit] for boxes in run(keep, candidates)]

    def compute_loss(
        self,
        objectness: Tensor,
        pred_bbox_deltas: Tensor,
        labels: list[Tensor],
        regression_targets: list[Tensor],
    ) -> tuple[Tensor, Tensor]:
        """Objectness BCE over the sampled anchors (mean); box loss summed over the sampled
        positives / number sampled. The anchors are drawn by ``self.sampler`` (drcnn's batched
        :func:`~drcnn.models.sampling.random_sample`, torchvision's sizes), not torchvision's
        per-image ``fg_bg_sampler``."""
        label = torch.stack(labels)  # (images, anchors): every image has the same anchors
        sampled = self.sample_anchors(label).flatten()
        label = label.flatten()
        positive = (sampled & (label > 0))[:, None]
        num_sampled = sampled.sum().clamp(min=1)
        # every anchor's loss, the unsampled ones selected out (torch.where, not a product: an
        # image without gt has infinite targets), so nothing waits for the device
        bce = F.binary_cross_entropy_with_logits(
            objectness.flatten(), label.clamp(min=0), reduction="none"
        )
        cls_loss = torch.where(sampled, bce, 0.0).sum() / num_sampled
        deltas = torch.where(positive, pred_bbox_deltas, 0.0)
        targets = torch.where(positive, torch.cat(regression_targets), 0.0)
        return cls_loss, box_loss(deltas, targets, self.loss_bbox) / num_sampled

    def sample_anchors(self, labels: Tensor) -> Tensor:
        """``(images, anchors)`` True for the anchors the losses train on, drawn by
        ``self.sampler`` from the ``(images, anchors)`` labels (1 / 0 / -1 ignored)."""
        image = torch.arange(len(labels), device=labels.device)[:, None].expand_as(labels)
        return self.sampler(labels.flatten(), image.flatten(), len(labels)).view_as(labels)

    def label_anchors(
        self,
        anchors: list[Tensor],
        targets: list[dict[str, Tensor]],
        image_sizes: list[tuple[int, int]],
        grid_sizes: list[tuple[int, int]],
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Per image: anchor labels (1 / 0 / -1 ignored) and each anchor's matched gt box."""
        if self.anchor_convention == "torchvision":
            return self.assign_targets_to_anchors(anchors, targets)
        if any(a is not anchors[0] for a in anchors):
            raise ValueError("DecoupledRPN: the mmdet convention needs one anchor tensor per batch")
        # images of one size share their usable anchors: made once per size and batch shape,
        # not once per image and step (about 40 small ops each, kernel launches on a GPU)
        usable = torch.stack(
            [
                self.shape_cache.get(
                    ("usable", tuple(size), tuple(grid_sizes), anchors[0].device),
                    partial(self.usable_anchors, anchors[0], size, grid_sizes),
                )
                for size in image_sizes
            ]
        )
        # every image at once: its gts' IoU rows in a (images, most gts, anchors) block, the
        # rows of images with fewer gts left at IoU 0 and marked as padding (at most `images`
        # times the per-image matrices' memory, of the order of the IoU's own temporaries)
        gt_boxes = [t["boxes"].to(anchors[0].dtype) for t in targets]
        counts = [len(g) for g in gt_boxes]
        most = max(max(counts), 1)
        rows = to_device(
            np.concatenate([i * most + np.arange(c) for i, c in enumerate(counts)]), anchors[0]
        )
        all_gt = torch.cat(gt_boxes)
        pair_iou = self.box_similarity(all_gt, anchors[0])  # float32 also under bf16 autocast
        iou = pair_iou.new_zeros(len(counts) * most, len(anchors[0]))
        iou.index_copy_(0, rows, pair_iou)
        real_gt = torch.zeros(len(counts) * most, dtype=torch.bool, device=iou.device)
        real_gt.index_fill_(0, rows, True)
        labels, matched = mmdet_anchor_labels(
            iou.view(len(counts), most, -1),
            usable,
            self.proposal_matcher.high_threshold,
            self.proposal_matcher.low_threshold,
            self.min_pos_iou,
            real_gt.view(len(counts), most),
        )
        padded_gt = anchors[0].new_zeros(len(counts) * most, 4).index_copy_(0, rows, all_gt)
        image = torch.arange(len(counts), device=iou.device)[:, None]
        matched_boxes = padded_gt.view(len(counts), most, 4)[image, matched]
        return list(labels), list(matched_boxes)

    def usable_anchors(
        self, anchors: Tensor, image_size: tuple[int, int], grid_sizes: list[tuple[int, int]]
    ) -> Tensor:
        """mmdet convention: the anchors one image trains on (``(N,)`` bool).

        Those of grid cells inside the image's padded size (mmdetection pads each image to a
        multiple of ``size_divisible`` and marks anchors beyond it, in the batch padding, as
        invalid) and, when ``allowed_border >= 0``, inside the image by that border.
        """
        pad = self.size_divisible
        padded = (math.ceil(image_size[0] / pad) * pad, math.ceil(image_size[1] / pad) * pad)
        usable = self.anchor_generator.valid_mask(grid_sizes, padded, anchors.device)
        if self.allowed_border >= 0:
            usable &= inside_border(anchors, image_size, self.allowed_border)
        return usable

    def anchors(self, images: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        """Every image's anchors (one tensor, shared), float32 whatever the features' dtype,
        made once per batch shape (:class:`~drcnn.models.shape_cache.ShapeCache`).

        float32 as mmdetection and detectron2 make them under mixed precision. torchvision's
        generators take the features' dtype, so under bf16 autocast the anchors, the proposals
        decoded from them and the gt boxes matched to them were bf16, whose 8-bit significand
        rounds a coordinate between 512 and 1024 px to a multiple of 4 px (8 px beyond).
        """
        device = feature_maps[0].device
        grid_sizes = tuple(tuple(f.shape[-2:]) for f in feature_maps)

        def make() -> Tensor:
            # the generator reads only the feature maps' shape, dtype and device
            stand_ins = [
                torch.empty((), dtype=torch.float32, device=device).expand(f.shape)
                for f in feature_maps
            ]
            return self.anchor_generator(images, stand_ins)[0]

        key = ("anchors", tuple(images.tensors.shape[-2:]), grid_sizes, device)
        return [self.shape_cache.get(key, make)] * len(images.image_sizes)

    def propose_candidates(
        self, images: ImageList, feature_maps: list[Tensor]
    ) -> tuple[Tensor, Tensor, list[Tensor], list[Candidates]]:
        """Head outputs and each image's NMS candidates: ``(objectness, deltas, anchors,
        candidates)``; the proposal sets are :meth:`nms_proposals` of the candidates, at each
        threshold (the proposal-IoU analysis tries several on the same candidates)."""
        objectness, pred_bbox_deltas = self.head(feature_maps)
        anchors = self.anchors(images, feature_maps)
        num_anchors_per_level = [o[0].numel() for o in objectness]
        objectness, pred_bbox_deltas = concat_box_prediction_layers(objectness, pred_bbox_deltas)
        # boxes, scores and losses in float32 under autocast too (see `anchors`)
        objectness, pred_bbox_deltas = objectness.float(), pred_bbox_deltas.float()
        # proposals do not back-propagate into the RPN (as in Faster R-CNN)
        proposals = self.box_coder.decode(pred_bbox_deltas.detach(), anchors)
        proposals = proposals.view(len(anchors), -1, 4)
        candidates = self.select_candidates(
            proposals, objectness, images.image_sizes, num_anchors_per_level
        )
        return objectness, pred_bbox_deltas, anchors, candidates

    def forward(
        self,
        images: ImageList,
        features: dict[str, Tensor],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[Tensor] | ProposalSets, dict[str, Tensor]]:
        """Proposals (one set, or ``ProposalSets`` when training with two thresholds) + losses."""
        feature_maps = list(features.values())
        objectness, pred_bbox_deltas, anchors, candidates = self.propose_candidates(
            images, feature_maps
        )
        sets = [self.nms_proposals(candidates, t) for t in self.active_nms_thresholds()]
        boxes = ProposalSets(*sets) if len(sets) == 2 else sets[0]

        losses: dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("DecoupledRPN: targets are required in training mode")
            grid_sizes = [tuple(f.shape[-2:]) for f in feature_maps]
            labels, matched_gt_boxes = self.label_anchors(
                anchors, targets, images.image_sizes, grid_sizes
            )
            regression_targets = self.box_coder.encode(matched_gt_boxes, anchors)
            loss_cls, loss_bbox = self.compute_loss(
                objectness, pred_bbox_deltas, labels, regression_targets
            )
            losses = {"rpn.loss_cls": loss_cls, "rpn.loss_bbox": loss_bbox}
        return boxes, losses


def build_rpn(cfg: DictConfig, in_channels: int) -> DecoupledRPN:
    """The RPN of ``cfg.model.rpn`` on FPN features with ``in_channels`` channels."""
    rcfg = cfg.model.rpn
    sizes = tuple((int(s),) for s in rcfg.anchor_sizes)
    ratios = (tuple(float(r) for r in rcfg.aspect_ratios),) * len(rcfg.anchor_sizes)
    if rcfg.anchor_convention == "mmdet":
        anchor_generator = MMDetAnchorGenerator(sizes, ratios, LEVEL_STRIDES)
    else:
        anchor_generator = AnchorGenerator(sizes=sizes, aspect_ratios=ratios)
    head = RPNHead(in_channels, anchor_generator.num_anchors_per_location()[0])
    return DecoupledRPN(
        anchor_generator,
        head,
        fg_iou_thresh=rcfg.fg_iou_thresh,
        bg_iou_thresh=rcfg.bg_iou_thresh,
        batch_size_per_image=rcfg.batch_size_per_image,
        positive_fraction=rcfg.positive_fraction,
        pre_nms_top_n={"training": rcfg.pre_nms_top_n_train, "testing": rcfg.pre_nms_top_n_test},
        post_nms_top_n={
            "training": rcfg.post_nms_top_n_train,
            "testing": rcfg.post_nms_top_n_test,
        },
        train_nms_thresh=rpn_nms_thresholds(rcfg),
        test_nms_thresh=rcfg.test_nms_thresh,
        score_thresh=rcfg.score_thresh,
        min_size=rcfg.min_size,
        loss_bbox=OmegaConf.to_object(rcfg.loss_bbox),
        anchor_convention=rcfg.anchor_convention,
        min_pos_iou=rcfg.min_pos_iou,
        allowed_border=rcfg.allowed_border,
        size_divisible=cfg.model.transform.size_divisible,
    )
