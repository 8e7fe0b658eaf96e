"""``drcnn test`` / ``infer`` / ``benchmark`` outputs checked against the model and pycocotools."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import amp_ap
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from test_train import FASTER, tiny_overrides
from torchvision.ops import box_iou, clip_boxes_to_image

from drcnn.cli import main
from drcnn.config import load_config, to_dict
from drcnn.engine import amp as amp_module
from drcnn.engine import benchmark as benchmark_module
from drcnn.engine import evaluate as evaluate_module
from drcnn.engine import fixed_load
from drcnn.engine.benchmark import use_anchor_proposals
from drcnn.engine.checkpoint import load_model, save_checkpoint
from drcnn.engine.infer import drawing_names
from drcnn.engine.train import train
from drcnn.models.detector import build_detector


def save_random_model(path: Path, root: Path, **extra) -> Path:
    """A randomly initialised Faster R-CNN (tiny settings for the dataset at ``root``) saved as
    a drcnn checkpoint with class names; ``extra`` entries go into the checkpoint as well."""
    cfg = load_config(FASTER, tiny_overrides(root))
    torch.manual_seed(0)
    gt = json.loads((root / "annotations" / "instances_val.json").read_text())
    names = [c["name"] for c in sorted(gt["categories"], key=lambda c: c["id"])]
    state = {"model": build_detector(cfg).state_dict(), "config": to_dict(cfg)}
    return save_checkpoint(path, {**state, "class_names": names, **extra})


@pytest.fixture(scope="module")
def checkpoint(synthetic_root, tmp_path_factory):
    """A randomly initialised Faster R-CNN saved as a drcnn checkpoint with class names."""
    return save_random_model(tmp_path_factory.mktemp("ckpt") / "model.pth", synthetic_root)


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
    # Matched as sets: the test ran in batches of 4, this pass on one image, and detections
    # whose scores tie to float rounding may come out in either order.
    expected = [
        (cat_ids[int(label) - 1], float(score), [x1, y1, x2 - x1, y2 - y1])
        for (x1, y1, x2, y2), score, label in zip(
            det["boxes"].tolist(), det["scores"], det["labels"], strict=True
        )
    ]
    for r in mine:
        match = next(
            i
            for i, (category, score, box) in enumerate(expected)
            if r["category_id"] == category
            and r["score"] == pytest.approx(score, abs=1e-6)
            and r["bbox"] == pytest.approx(box, abs=1e-3)
        )
        expected.pop(match)

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
    assert [e["drawing"] for e in entries] == [f"{image.stem}.png", "gray.png"]
    drawn = Image.open(out / f"{image.stem}.png")
    assert drawn.size == Image.open(image).size
    assert (out / "gray.png").is_file()


def test_infer_keeps_inputs_with_the_same_stem_apart(synthetic_root, checkpoint, tmp_path):
    """Same-stem images from two folders get a drawing each; the inputs stay as they were; a
    second run into the same folder replaces its own drawings."""
    first, second = sorted((synthetic_root / "val").glob("*.png"))[:2]
    for folder, image in (("a", first), ("b", second)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.png").write_bytes(image.read_bytes())
    inputs = [tmp_path / "a", tmp_path / "b" / "x.png", tmp_path / "b"]  # b/x.png listed twice
    out = tmp_path / "out"
    argv = ["infer", FASTER, checkpoint, *inputs, "--out", out, "--score-thr", "0.05",
            "--device", "cpu", "--set", *tiny_overrides(synthetic_root)]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    entries = json.loads((out / "detections.json").read_text())
    files = [str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png")]
    assert [(e["file"], e["drawing"]) for e in entries] == list(
        zip(files, ["x-1.png", "x-2.png"], strict=True)
    )

    def pixels(path: Path) -> np.ndarray:
        return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)

    for source, other, entry in zip((first, second), (second, first), entries, strict=True):
        assert Path(entry["file"]).read_bytes() == source.read_bytes()  # the input is unchanged
        # the drawing is of its own input: nearer to it than to the other image
        drawn = pixels(out / entry["drawing"])
        assert np.abs(drawn - pixels(source)).mean() < np.abs(drawn - pixels(other)).mean()
    assert sorted(p.name for p in out.iterdir()) == ["detections.json", "x-1.png", "x-2.png"]

    stamp = (out / "x-1.png").stat().st_mtime_ns
    (out / "x-1.png").unlink()  # as after an interrupted run: detections.json lists it
    assert main([str(a) for a in argv]) == 0
    assert (out / "x-1.png").is_file() and (out / "x-2.png").stat().st_mtime_ns >= stamp


def test_drawing_names_are_unique_and_stable():
    paths = [Path(p) for p in ("a/x.png", "b/x.jpg", "c/X.png", "x-1.png", "y.png", "d/y-1.png")]
    names = drawing_names(paths)
    # x, x, X share a stem (case-insensitively); x-1.png is taken by the input named x-1
    assert names == ["x-2.png", "x-3.png", "X-4.png", "x-1.png", "y.png", "y-1.png"]
    assert len({n.casefold() for n in names}) == len(names)


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
    classes = load_config(FASTER).model.roi_head.num_classes
    candidates, confident = fixed_load.pair_counts(classes)
    assert result["class_scores"] == (
        f"fixed table (random weights): {candidates} of 1000 RoIs x {classes} classes above "
        f"score 0.001, {confident} above 0.05"
    )


def test_benchmark_of_random_weights_scores_with_the_fixed_table(monkeypatch, tmp_path):
    """The timed model's classification outputs are the fixed table, not the random init's: every
    detection's score is an entry of its class's column of the table."""
    timed = []
    monkeypatch.setattr(
        benchmark_module, "time_passes", lambda model, *a: timed.append(model) or [1.0]
    )
    cfg = load_config(FASTER, ["model.backbone.pretrained=null"])
    benchmark_module.benchmark(cfg, device="cpu", size=(96, 128), out=tmp_path / "b.json")
    (model,) = timed
    table = fixed_load.class_probabilities(
        list(range(1, cfg.model.roi_head.num_classes + 1)), cfg.model.roi_head.num_classes + 1
    )
    with torch.no_grad():
        detections = model([torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(0))])[0]
    assert len(detections["scores"]) > 0
    column = table[:, detections["labels"]].float()
    assert ((column - detections["scores"]).abs() < 1e-6).any(dim=0).all()


@pytest.mark.parametrize("command", ["test", "infer", "benchmark"])
def test_commands_load_a_checkpoint_without_its_imagenet_weights(
    synthetic_root, checkpoint, tmp_path, command
):
    """``drcnn test COCO_CONFIG CKPT`` read torchvision://resnet50 first, and failed offline."""
    missing = "model.backbone.pretrained=/nonexistent/imagenet_resnet18.pth"
    options = ["--device", "cpu", "--set", *tiny_overrides(synthetic_root), missing]
    argv, written = {
        "test": (["test", FASTER, checkpoint, "--out", tmp_path / "r.json"], "metrics.json"),
        "infer": (["infer", FASTER, checkpoint, synthetic_root / "val" / "000000.png",
                   "--out", tmp_path / "drawn"], "drawn/detections.json"),
        "benchmark": (["benchmark", FASTER, checkpoint, "--images", "1", "--warmup", "0",
                       "--size", "96", "128", "--out", tmp_path / "bench.json"], "bench.json"),
    }[command]  # fmt: skip
    assert main([str(a) for a in [*argv, *options]]) == 0
    assert (tmp_path / written).is_file()


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


# --- --amp: mixed-precision inference (issue 13 item 2) ---------------------------------------


@pytest.fixture(scope="module")
def trained_checkpoint(synthetic_root, tmp_path_factory) -> Path:
    """A Faster R-CNN that detects the val objects: trained 100 iterations on the 8 val images
    themselves (tiny settings, the main job's AdamW), AP about 0.33 and AP50 about 0.64 there.

    A model trained 20 iterations on the train split (this fixture before) has AP50 near 0 and
    many near-tied proposal scores, so bf16's rounding decided its detections by chance: over
    train seeds 0-3 the bf16 run's AP50 against its fp32 detections went from 0.83 to 0.96 (and
    0.86 to 1.0 with the per-image sampler drawing the anchors and RoIs)."""
    work = tmp_path_factory.mktemp("trained")
    on_val = [
        "data.train_ann=annotations/instances_val.json",
        "data.train_images=val",
        "train.optimizer=adamw",
        "train.lr=0.001",
        "train.grad_clip=10.0",
        "train.max_iters=100",
    ]
    cfg = load_config(FASTER, [*tiny_overrides(synthetic_root), *on_val])
    train(cfg, work, device="cpu")
    return work / "latest.pth"


def detections_as_ground_truth(results_file: Path, ann_file: Path, out: Path) -> Path:
    """A COCO ground-truth file whose objects are the detections in ``results_file``."""
    gt = json.loads(ann_file.read_text())
    results = json.loads(results_file.read_text())
    gt["annotations"] = [
        {**r, "id": k, "area": r["bbox"][2] * r["bbox"][3], "iscrowd": 0}
        for k, r in enumerate(results, 1)
    ]
    out.write_text(json.dumps(gt))
    return out


def test_bf16_inference_keeps_the_fp32_detections_and_ap(
    synthetic_root, trained_checkpoint, tmp_path, coco_reference, monkeypatch
):
    """``test --amp bf16`` runs the backbone in bf16 on the CPU, the RPN and the RoI heads in
    fp32 (:func:`drcnn.engine.amp.inference_autocast`), and writes detections that match the
    fp32 run's (AP50 >= 0.9 taking the fp32 detections as ground truth) with about its AP and
    AP50.

    The bounds are what 8 val images can resolve: one changed detection moves AP by about half
    a point there, AP50 by up to about three. Over train seeds 0-4 of this fixture (the test
    trains seed 0), bf16 minus fp32 was -0.45 to +0.59 AP points and -3.1 to 0.0 AP50 points,
    the agreement 0.966 to 1.0 (a 2-core Intel Xeon with AMX, 2026-11-27; with the whole model
    under autocast, before, on the AMD EPYC: -0.2 to +0.9, -1.8 to +0.4, 0.91 to 0.97). Issue
    #13's target, AP within 0.2 points of fp32, is measured on the main job's checkpoints and
    100 or 600 val images by ``benchmarks/amp_ap.py`` (README, "bf16 inference"). The bounds
    leave room for CPUs that round differently (the fixture's model differs between the AMD
    EPYC and the Xeon)."""
    seen: dict[str, set[torch.dtype]] = {"fpn": set(), "rpn": set(), "box head": set()}

    def load_and_watch(*args, **kwargs):
        model, cfg = load_model(*args, **kwargs)
        watched = {
            "fpn": (model.backbone.fpn, lambda m, a, out: seen["fpn"].add(out["0"].dtype)),
            "rpn": (model.rpn.head, lambda m, a, out: seen["rpn"].add(a[0][0].dtype)),
            "box head": (
                model.roi_heads.stages[0],
                lambda m, a, out: seen["box head"].add(a[0].dtype),
            ),
        }
        for module, hook in watched.values():
            module.register_forward_hook(hook)
        return model, cfg

    monkeypatch.setattr(evaluate_module, "load_model", load_and_watch)
    metrics = {}
    for amp in ("none", "bf16"):
        out = tmp_path / amp / "results.bbox.json"
        argv = ["test", FASTER, trained_checkpoint, "--out", out, "--amp", amp,
                "--device", "cpu", "--set", *tiny_overrides(synthetic_root)]  # fmt: skip
        assert main([str(a) for a in argv]) == 0
        metrics[amp] = json.loads((out.parent / "metrics.json").read_text())
        backbone = torch.float32 if amp == "none" else torch.bfloat16
        assert seen == {"fpn": {backbone}, "rpn": {torch.float32}, "box head": {torch.float32}}
        for dtypes in seen.values():
            dtypes.clear()
    assert metrics["none"]["AP50"] > 0.5  # a model that detects, or the comparison says little
    for key, bound in (("AP", 0.015), ("AP50", 0.04)):
        assert abs(metrics["bf16"][key] - metrics["none"][key]) <= bound, key
    ann_file = synthetic_root / "annotations" / "instances_val.json"
    fp32_gt = detections_as_ground_truth(
        tmp_path / "none" / "results.bbox.json", ann_file, tmp_path / "fp32_gt.json"
    )
    agreement = coco_reference(fp32_gt, tmp_path / "bf16" / "results.bbox.json")
    assert agreement.stats[1] >= 0.9  # AP50 of bf16 against the fp32 detections


def test_amp_ap_benchmark_compares_on_the_same_images(trained_checkpoint, tmp_path):
    """``benchmarks/amp_ap.py``: the fp32 AP is ``drcnn test``'s, the difference is bf16 minus
    fp32, and its bootstrap interval brackets it; all written to the JSON it prints from."""
    out = tmp_path / "amp_ap.json"
    result = amp_ap.main([str(trained_checkpoint), "--boot", "40", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    (row,) = result["rows"]
    metrics = evaluate_module.test(
        None, trained_checkpoint, tmp_path / "fp32" / "r.json", device="cpu"
    )
    assert row["ap_fp32"] == pytest.approx(100 * metrics["AP"], abs=1e-9)
    assert row["difference"] == pytest.approx(row["ap_bf16"] - row["ap_fp32"], abs=1e-9)
    low, high = row["interval95"]
    assert low <= row["difference"] <= high and high - low > 0
    assert row["images"] == 8


@pytest.mark.parametrize(
    ("amp", "native", "ran"),
    [
        ("auto", True, "bf16"),
        ("auto", False, "none"),
        ("bf16", False, "bf16"),
        ("fp16", True, "none"),
    ],
)
def test_benchmark_reports_the_amp_mode_that_ran(tmp_path, monkeypatch, amp, native, ran):
    """``auto`` resolves as train.amp=auto does (bf16 only on a CPU computing it natively);
    fp16 computes in fp32 on a CPU, with a warning, and the result says so."""
    monkeypatch.setattr(amp_module, "cpu_has_native_bf16", lambda: native)
    out = tmp_path / "bench.json"
    argv = ["benchmark", FASTER, "--images", "1", "--warmup", "0", "--size", "64", "64",
            "--out", out, "--device", "cpu", "--amp", amp]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([str(a) for a in argv]) == 0
    assert json.loads(out.read_text())["amp"] == ran
    assert any("--amp=fp16 needs CUDA" in str(w.message) for w in caught) == (amp == "fp16")


def test_infer_with_bf16_writes_fp32_detections(synthetic_root, trained_checkpoint, tmp_path):
    """``infer --amp bf16`` writes plain JSON numbers and mostly the fp32 run's detections.

    bf16's rounding reorders some proposals and NMS decisions, so a few detections differ
    between the runs (with another thread count, another few). So: about the same count, and
    at least 70% of the bf16 detections overlap an fp32 detection of the same label by IoU >=
    0.8 with a score within 0.02 (a broken bf16 path matches next to none)."""
    image = synthetic_root / "val" / "000000.png"
    entries = {}
    options = ["--device", "cpu", "--set", *tiny_overrides(synthetic_root)]
    for amp in ("none", "bf16"):
        argv = ["infer", FASTER, trained_checkpoint, image, "--out", tmp_path / amp,
                "--score-thr", "0.05", "--amp", amp, *options]  # fmt: skip
        assert main([str(a) for a in argv]) == 0
        entries[amp] = json.loads((tmp_path / amp / "detections.json").read_text())[0]
    fp32, bf16 = entries["none"]["detections"], entries["bf16"]["detections"]
    assert fp32 and len(bf16) == pytest.approx(len(fp32), rel=0.2, abs=2)
    assert all(type(v) is float for d in bf16 for v in [d["score"], *d["box"]])
    iou = box_iou(torch.tensor([d["box"] for d in bf16]), torch.tensor([d["box"] for d in fp32]))
    matched = [
        any(
            iou[i, j] >= 0.8 and b["label"] == f["label"] and abs(b["score"] - f["score"]) < 0.02
            for j, f in enumerate(fp32)
        )
        for i, b in enumerate(bf16)
    ]
    assert sum(matched) >= 0.7 * len(bf16), (sum(matched), len(bf16))
