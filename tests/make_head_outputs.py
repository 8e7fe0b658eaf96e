"""Record the RoI heads' outputs on fixed weights and inputs (tests/test_head_outputs.py).

Each case of :data:`CASES` is a tiny head (3 classes, 4 channels, 64-px images) whose
parameters are drawn from a generator seeded by their name, so the weights do not depend on
the order in which a head creates its layers. For each case the fixture holds the training
losses (fixed torch seed for the samplers; the Dynamic R-CNN head trains twice, so its second
pass runs at the adapted threshold and beta) and the eval-mode detections on the CPU path and
on the device code path. The test rebuilds every case with the current code and compares with
``torch.equal``: a refactor that keeps a config keeps its results bit for bit.

Regenerate (only when a change of results is intended, and say so in the commit):
``PYTHONPATH=. python tests/make_head_outputs.py``, which writes :data:`FIXTURE`.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch
from torch import Tensor, nn

from drcnn.config import load_config
from drcnn.models.roi_heads import build_roi_heads
from drcnn.models.threads import device_code_path

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "head_outputs.pt"
K = 3  # foreground classes
CHANNELS = 4
SIZE = 64  # image side
SYNTHETIC = Path(__file__).resolve().parents[1] / "configs" / "synthetic"

# case name -> (config file or None for the defaults, overrides)
CASES: dict[str, tuple[str | None, list[str]]] = {
    "standard": (None, ["model.roi_head.type=standard"]),
    "standard_unshared": (
        None,
        ["model.roi_head.type=standard", "model.roi_head.box_head=unshared"],
    ),
    "cascade": (
        None,
        [
            "model.roi_head.type=cascade",
            "model.roi_head.stages=[{iou_thresh: 0.5},{iou_thresh: 0.6,"
            " target_stds: [0.05, 0.05, 0.1, 0.1]}]",
        ],
    ),
    "decoupled": (None, ["model.roi_head.type=decoupled"]),
    "decoupled_refine_aligned": (
        None,
        [
            "model.roi_head.type=decoupled",
            "model.roi_head.aligned=true",
            "model.roi_head.sampling_ratio=2",
            "model.roi_head.stages=[{iou_thresh: 0.5},{iou_thresh: 0.6,"
            " target_stds: [0.05, 0.05, 0.1, 0.1]}]",
        ],
    ),
    "decoupled_shared": (
        None,
        [
            "model.roi_head.type=decoupled",
            "model.roi_head.box_head=shared",
            "model.roi_head.stages=[{iou_thresh: 0.5},{iou_thresh: 0.6}]",
        ],
    ),
    "decoupled_double": (
        None,
        [
            "model.roi_head.type=decoupled",
            "model.roi_head.box_head=double",
            "model.roi_head.stages=[{iou_thresh: 0.5},{iou_thresh: 0.6}]",
        ],
    ),
    "dynamic": (
        "dynamic_rcnn_r18_fpn_synthetic.yaml",
        ["model.roi_head.dynamic.update_interval=1", "model.roi_head.dynamic.iou_topk=5"],
    ),
}
COMMON = [
    f"model.roi_head.num_classes={K}",
    "model.roi_head.fc_dim=16",
    "model.roi_head.cls_sampler.num=32",
    "model.roi_head.test.max_per_image=20",
]


def build_case(name: str) -> nn.Module:
    """The case's head, every parameter drawn from a generator seeded by its name."""
    config, overrides = CASES[name]
    path = SYNTHETIC / config if config else None
    cfg = load_config(path, [*overrides, *COMMON])
    head = build_roi_heads(cfg, CHANNELS)
    with torch.no_grad():
        for key, param in head.named_parameters():
            gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
            param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return head


def inputs() -> tuple[dict[str, Tensor], list[Tensor], list[tuple[int, int]], list[dict]]:
    """FPN features (4 levels), proposals, image shapes and targets of two 64-px images."""
    gen = torch.Generator().manual_seed(0)
    features = {
        str(i): torch.randn(2, CHANNELS, SIZE // 2 ** (i + 2), SIZE // 2 ** (i + 2), generator=gen)
        for i in range(4)
    }
    shapes = [(SIZE, SIZE), (56, SIZE)]
    targets, proposals = [], []
    for h, w in shapes:
        xy = torch.rand(3, 2, generator=gen) * torch.tensor([w * 0.5, h * 0.5])
        gt = torch.cat([xy, xy + 8 + torch.rand(3, 2, generator=gen) * 24], dim=1)
        labels = torch.randint(1, K + 1, (3,), generator=gen)
        near = gt.repeat_interleave(8, dim=0) + torch.randn(24, 4, generator=gen) * 3
        xy = torch.rand(16, 2, generator=gen) * torch.tensor([w * 0.7, h * 0.7])
        far = torch.cat([xy, xy + 4 + torch.rand(16, 2, generator=gen) * 30], dim=1)
        boxes = torch.cat([near, far])
        boxes = torch.cat([boxes[:, :2], torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)], dim=1)
        proposals.append(boxes.clamp(min=0, max=float(min(h, w))))
        targets.append({"boxes": gt, "labels": labels})
    return features, proposals, shapes, targets


def record(name: str) -> dict[str, Tensor]:
    """The case's losses (``train{i}.<loss>``) and detections (``{path}.{i}.<key>``)."""
    head = build_case(name)
    features, proposals, shapes, targets = inputs()
    out: dict[str, Tensor] = {}
    head.train()
    for step in range(2 if name == "dynamic" else 1):
        torch.manual_seed(step)
        _, losses = head(features, proposals, shapes, targets)
        out.update({f"train{step}.{k}": v.detach() for k, v in losses.items()})
    head.eval()
    with torch.no_grad():
        for path in ("cpu", "device"):
            if path == "device":
                with device_code_path():
                    detections, _ = head(features, proposals, shapes)
            else:
                detections, _ = head(features, proposals, shapes)
            for i, det in enumerate(detections):
                out.update({f"{path}.{i}.{k}": v for k, v in det.items()})
    return out


def main() -> None:
    """Write the fixture of every case."""
    FIXTURE.parent.mkdir(exist_ok=True)
    torch.save({name: record(name) for name in CASES}, FIXTURE)
    print(f"wrote {FIXTURE}")


if __name__ == "__main__":
    main()
