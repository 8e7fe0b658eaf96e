"""``drcnn test`` / ``infer`` / ``benchmark`` outputs checked against the model and pycocotools."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from test_train import FASTER, tiny_overrides
from torchvision.ops import clip_boxes_to_image

from drcnn.cli import main
from drcnn.config import load_config, to_dict
from drcnn.engine.benchmark import use_anchor_proposals
from drcnn.engine.checkpoint import load_model, save_checkpoint
from drcnn.models.detector import build_detector


@pytest.fixture(scope="module")
def checkpoint(synthetic_root, tmp_path_factory):
    """A randomly initialised Faster R-CNN saved as a drcnn checkpoint with class names."""
    cfg = load_config(FASTER, tiny_overrides(synthetic_root))
    torch.manual_seed(0)
    gt = json.loads((synthetic_root / "annotations" / "instances_val.json").read_text())
    names = [c["name"] for c in sorted(gt["categories"], key=lambda c: c["id"])]
    path = tmp_path_factory.mktemp("ckpt") / "model.pth"
    save_checkpoint(
        path,
        {"model": build_detector(cfg).state_dict(), "config": to_dict(cfg), "class_names": names},
    )
    return path


def test_test_writes_coco_results_and_metrics(synthetic_root, checkpoint, tmp_path, coco_reference):
    out = tmp_path / "res" / "results.bbox.json"
    show = tmp_path / "show"
    argv = ["test", FASTER, checkpoint, "--out", out, "--show", show, "--score-thr", "0.0",
            "--device", "cpu", "--set", *tiny_overrides(synthetic_root)]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    ann_file = synthetic_root / "annotations" / "instances_val.json"
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        loaded = gt.loadRes(str(out))  # pycocotools accepts the file
    results = json.loads(out.read_text())
    assert results and {r["category_id"] for r in results} <= set(gt.getCatIds())
    assert len(loaded.getAnnIds()) == len(results)

    # the results are the model's detections of the first val image, converted independently
    model, _ = load_model(checkpoint)
    image_id = sorted(gt.getImgIds())[0]
    file_name = gt.loadImgs(image_id)[0]["file_name"]
    pixels = np.asarray(Image.open(synthetic_root / "val" / file_name).convert("RGB"))
    tensor = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        det = model([tensor])[0]
    cat_ids = sorted(gt.getCatIds())
    mine = [r for r in results if r["image_id"] == image_id]
    assert len(mine) == len(det["scores"])
    for r, box, score, label in zip(mine, det["boxes"], det["scores"], det["labels"], strict=True):
        x1, y1, x2, y2 = box.tolist()
        assert r["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=1e-3)
        assert r["score"] == pytest.approx(float(score), abs=1e-6)
        assert r["category_id"] == cat_ids[int(label) - 1]

    metrics = json.loads((out.parent / "metrics.json").read_text())
    reference = coco_reference(ann_file, out)
    assert metrics["AP"] == pytest.approx(max(reference.stats[0], 0.0))
    assert metrics["AP50"] == pytest.approx(max(reference.stats[1], 0.0))
    assert len(list(show.glob("*.png"))) == len(gt.getImgIds())


def test_infer_writes_detections_and_drawings(synthetic_root, checkpoint, tmp_path):
    image = sorted((synthetic_root / "val").glob("*.png"))[0]
    gray = tmp_path / "gray.png"
    Image.open(image).convert("L").save(gray)  # grayscale input is converted to RGB
    out = tmp_path / "out"
    argv = ["infer", FASTER, checkpoint, image, gray, "--out", out, "--score-thr", "0.05",
            "--device", "cpu", "--set", *tiny_overrides(synthetic_root)]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    entries = json.loads((out / "detections.json").read_text())
    assert [e["file"] for e in entries] == [str(image), str(gray)]
    model, _ = load_model(checkpoint)
    pixels = torch.from_numpy(np.asarray(Image.open(image).convert("RGB")).copy())
    with torch.no_grad():
        det = model([pixels.permute(2, 0, 1).float() / 255])[0]
    keep = det["scores"] >= 0.05
    gt = json.loads((synthetic_root / "annotations" / "instances_val.json").read_text())
    names = [c["name"] for c in sorted(gt["categories"], key=lambda c: c["id"])]
    got = entries[0]["detections"]
    assert [d["label"] for d in got] == [names[int(k) - 1] for k in det["labels"][keep]]
    np.testing.assert_allclose([d["box"] for d in got], det["boxes"][keep].numpy(), atol=1e-4)
    drawn = Image.open(out / f"{image.stem}.png")
    assert drawn.size == Image.open(image).size
    assert (out / "gray.png").is_file()


def test_benchmark_writes_fps(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["benchmark", FASTER, "--images", "3", "--warmup", "1", "--size", "96", "128",
            "--out", out, "--device", "cpu"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    result = json.loads(out.read_text())
    assert result["input_size"] == [96, 128] and result["images"] == 3
    assert result["fps"] == pytest.approx(1000 / result["median_ms"])
    assert result["peak_memory_mb"] > 0
    assert result["proposals"].startswith("anchors")


def rpn_proposals_and_anchors(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode proposals of one random image and the anchors clipped to it (resized pixels)."""
    image = torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        images, _ = model.transform([image])
        features = model.backbone(images.tensors)
        proposals = model.rpn(images, features)[0][0]
        anchors = model.rpn.anchor_generator(images, list(features.values()))[0]
    return proposals, clip_boxes_to_image(anchors, images.image_sizes[0])


def test_anchor_proposals_are_clipped_anchors():
    """Zeroing the RPN's regression layer leaves every proposal an anchor; without it, not."""
    torch.manual_seed(0)
    model = build_detector(load_config(FASTER, ["model.backbone.pretrained=null"])).eval()
    proposals, anchors = rpn_proposals_and_anchors(model)
    assert nearest_anchor_distance(proposals, anchors).max() > 1.0
    use_anchor_proposals(model)
    proposals, anchors = rpn_proposals_and_anchors(model)
    assert len(proposals) > 0
    assert nearest_anchor_distance(proposals, anchors).max() < 1e-3


def nearest_anchor_distance(boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Distance of each box to its nearest anchor, computed directly: cdist's default
    matrix-product shortcut is off by ~0.25 px on fractional (unrounded mmdet) anchors."""
    return torch.cdist(boxes, anchors, compute_mode="donot_use_mm_for_euclid_dist").min(1).values


def test_max_val_images_evaluates_only_the_images_run(
    synthetic_root, checkpoint, tmp_path, coco_reference
):
    """With data.max_val_images the images not run must not count as misses."""
    out = tmp_path / "results.bbox.json"
    argv = ["test", FASTER, checkpoint, "--out", out, "--device", "cpu",
            "--set", *tiny_overrides(synthetic_root), "data.max_val_images=3"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    ann_file = synthetic_root / "annotations" / "instances_val.json"
    with contextlib.redirect_stdout(io.StringIO()):
        first_three = sorted(COCO(str(ann_file)).getImgIds())[:3]
    assert {r["image_id"] for r in json.loads(out.read_text())} <= set(first_three)
    reference = coco_reference(ann_file, out, imgIds=first_three)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["AP50"] == pytest.approx(max(reference.stats[1], 0.0))
    assert metrics["AR100"] == pytest.approx(max(reference.stats[8], 0.0))
