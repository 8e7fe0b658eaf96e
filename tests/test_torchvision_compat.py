"""torchvision fasterrcnn_resnet50_fpn weights give the same detections in drcnn's Faster R-CNN."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import fasterrcnn_resnet50_fpn

from drcnn.config import load_config
from drcnn.errors import DrcnnError
from drcnn.models.detector import build_detector
from drcnn.models.torchvision_compat import load_torchvision_weights

CONFIG = "configs/baselines/faster_rcnn_r50_fpn_torchvision.yaml"
SIZE = [
    "model.transform.min_size=[320]",
    "model.transform.test_min_size=320",
    "model.transform.max_size=320",
    "model.backbone.pretrained=null",
]


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    reference = fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=320, max_size=320, box_score_thresh=0.05
    ).eval()
    with torch.no_grad():  # spread the class scores so that some pass the 0.05 threshold
        reference.roi_heads.box_predictor.cls_score.weight.normal_(std=0.05)
        reference.roi_heads.box_predictor.bbox_pred.weight.normal_(std=0.01)
    ours = build_detector(load_config(CONFIG, SIZE)).eval()
    load_torchvision_weights(ours, reference.state_dict())
    return reference, ours


def test_same_detections(pair):
    reference, ours = pair
    torch.manual_seed(1)
    images = [torch.rand(3, 240, 320), torch.rand(3, 300, 200)]
    with torch.no_grad():
        expected = reference(images)
        got = ours(images)
    assert sum(len(d["boxes"]) for d in expected) > 20
    for theirs, mine in zip(expected, got, strict=True):
        assert torch.equal(mine["labels"], theirs["labels"])
        torch.testing.assert_close(mine["scores"], theirs["scores"], atol=1e-4, rtol=0)
        torch.testing.assert_close(mine["boxes"], theirs["boxes"], atol=1e-3, rtol=1e-4)


def test_mismatch_names_the_key(pair):
    reference, ours = pair
    state = dict(reference.state_dict())
    state["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(81, 1024)
    with pytest.raises(DrcnnError, match=r"roi_heads\.stages\.0\.cls_score\.weight.*box_predictor"):
        load_torchvision_weights(ours, state)
    del state["roi_heads.box_predictor.cls_score.weight"]
    with pytest.raises(DrcnnError, match=r"no value for model key roi_heads\.stages\.0\.cls_score"):
        load_torchvision_weights(ours, state)
    with pytest.raises(DrcnnError, match="has no place"):
        load_torchvision_weights(ours, {**reference.state_dict(), "extra.weight": torch.zeros(1)})
