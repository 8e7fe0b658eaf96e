"""The benchmark scripts' own logic (benchmarks/*.py, benchmarks/gpu_check.sh), on tiny models.

The timings themselves are not tested (they are what the scripts measure); what is: the fixed
classification load of ``inference.py`` (``drcnn.engine.fixed_load``: its exact counts, in
drcnn's and torchvision's column layouts, through the real postprocessing of both), the count
of boxes entering the final NMS, the sync-warning tally of ``sync_count.py``, the launch
count of ``launch_count.py`` (two independent counters agree), the training
overrides of ``profile_train.py``, and ``gpu_check.sh``'s bookkeeping (a failing step does not
stop it, ``--amp`` missing is a skip, a spent budget skips, ``summary.json`` always written).
The CPU mode of ``gpu_check.sh`` end to end takes minutes (six R-50 models): it is run by hand,
not here.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import inference
import launch_count
import profile_train
import pytest
import run_times
import sync_count
import torch
import torchvision
import train_step
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

from drcnn.config import load_config
from drcnn.engine import fixed_load
from drcnn.engine.benchmark import use_anchor_proposals
from drcnn.models.detector import build_detector

ROOT = Path(__file__).resolve().parents[1]

TORCHVISION_UNUSED_IDS = [12, 26, 29, 30, 45, 66, 68, 69, 71, 83]  # COCO ids without a class


def expected_pairs(table: torch.Tensor, threshold: float) -> int:
    """Foreground (RoI, class) pairs of a probability table above ``threshold``."""
    return int((table[:, 1:] > threshold).sum())


@pytest.mark.parametrize(
    "layout, classes, counts",
    [("drcnn", 80, (3000, 300)), ("torchvision", 80, (3000, 300)), ("drcnn", 4, (150, 15))],
)
def test_class_probabilities_have_the_stated_counts(layout, classes, counts):
    """3.75 % of the (RoI, class) pairs above 0.001, a tenth of those above 0.05: COCO's
    numbers in both column layouts, and a small dataset's."""
    width = classes + 1 if layout == "drcnn" else 91
    columns = [i for i in range(1, width) if layout == "drcnn" or i not in TORCHVISION_UNUSED_IDS]
    table = fixed_load.class_probabilities(columns, width)
    assert table.shape == (fixed_load.TABLE_ROIS, width)
    torch.testing.assert_close(table.sum(dim=1), torch.ones(len(table), dtype=torch.float64))
    assert (expected_pairs(table, 0.001), expected_pairs(table, 0.05)) == counts
    assert fixed_load.pair_counts(classes) == counts
    assert (table[:, 0] > 0.05).all()
    if layout == "torchvision":
        assert (table[:, TORCHVISION_UNUSED_IDS] == fixed_load.FLOOR).all()
    # the softmax of the hook's logits gives the table back, float32 rounding aside
    logits = fixed_load.FixedLogits(table).logits
    torch.testing.assert_close(logits.softmax(dim=1).double(), table, rtol=1e-5, atol=1e-7)
    assert (inference.CANDIDATES, inference.CONFIDENT) == (3000, 300)


def test_torchvision_columns_skip_coco_unused_ids():
    model = tiny_torchvision_detector()
    assert inference.foreground_columns(model) == [
        i for i in range(1, 91) if i not in TORCHVISION_UNUSED_IDS
    ]


def tiny_torchvision_detector() -> nn.Module:
    """torchvision's FasterRCNN (its RoI heads and postprocessing, 91 classes) on a one-level
    8-channel backbone, resizing to 64 px."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU())
    backbone.out_channels = 8
    return FasterRCNN(
        backbone,
        num_classes=91,
        min_size=64,
        max_size=96,
        rpn_anchor_generator=AnchorGenerator(((8, 16, 32),), ((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2),
        rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=300,
    )


def tiny_drcnn_detector() -> nn.Module:
    """The synthetic R-18 Decoupled R-CNN with COCO's 80 classes, resizing to 64 px."""
    torch.manual_seed(0)
    cfg = load_config(
        ROOT / "configs/synthetic/decoupled_rcnn_r18_fpn_synthetic.yaml",
        [
            "model.roi_head.num_classes=80",
            "model.transform.min_size=[64]",
            "model.transform.test_min_size=64",
            "model.transform.max_size=96",
        ],
    )
    return build_detector(cfg)


@pytest.mark.parametrize("build", [tiny_torchvision_detector, tiny_drcnn_detector])
def test_fixed_load_reaches_the_final_nms(build):
    """Through each library's real postprocessing, the boxes entering the final NMS are the
    table's pairs above each threshold for the RoIs the head saw (anchor proposals, zero box
    regression: no box is small enough to be dropped), and the RPN's NMS is not counted."""
    model = build().eval()
    use_anchor_proposals(model)
    hook = inference.fix_classification(model, torch.device("cpu"))
    image = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(0))
    table = fixed_load.class_probabilities(
        inference.foreground_columns(model), fixed_load.classification_layers(model)[0].out_features
    )
    original = torchvision.ops.boxes.nms
    for threshold in (0.001, 0.05):
        inference.set_score_thresh(model, threshold)
        assert inference.score_thresh(model) == threshold
        load = inference.nms_load(model, hook, image, threshold)
        assert 0 < load["rois"] <= 300
        assert load["pairs_above_threshold"] == expected_pairs(table[: load["rois"]], threshold)
        assert load["nms_candidates"] == load["pairs_above_threshold"]
    assert torchvision.ops.boxes.nms is original
    with torch.no_grad():
        detections = model([image])[0]
    # every detection's score is an entry of its class's column (labels are column indices)
    assert len(detections["scores"]) > 0
    column = table[:, detections["labels"]].float()
    assert ((column - detections["scores"]).abs() < 1e-6).any(dim=0).all()


class ClassNms(nn.Module):
    """Per-class NMS through torchvision's ``batched_nms``."""

    def forward(self, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor):
        return torchvision.ops.batched_nms(boxes, scores, labels, 0.5)


class NmsTwice(nn.Module):
    """One NMS outside ``roi_heads`` (as the RPN's), then one inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.roi_heads = ClassNms()

    def forward(self, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor):
        torchvision.ops.batched_nms(boxes, scores, labels, 0.5)
        return self.roi_heads(boxes, scores, labels)


@pytest.mark.parametrize("count", [50, 2000])  # torchvision: one NMS call; one per class on CPU
def test_final_nms_count_sums_every_call_inside_the_roi_heads(count):
    generator = torch.Generator().manual_seed(1)
    xy = torch.rand(count, 2, generator=generator) * 100
    boxes, scores = torch.cat([xy, xy + 10], dim=1), torch.rand(count, generator=generator)
    model = NmsTwice()
    with inference.counting_final_nms(model) as sizes:
        model(boxes, scores, torch.arange(count) % 3)
    assert sum(sizes) == count
    assert len(sizes) == (1 if count == 50 else 3)


def test_sync_tally_counts_only_sync_warnings_by_line(monkeypatch):
    """The tally, on a fake CUDA device: two sync warnings from one line, one from another, and
    an unrelated warning."""
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    line = 0

    def run():
        nonlocal line
        for _ in range(2):
            line = sys._getframe().f_lineno + 1
            warnings.warn(sync_count.SYNC_WARNING, stacklevel=1)
        warnings.warn(f"{sync_count.SYNC_WARNING}!", stacklevel=1)
        warnings.warn("something else", stacklevel=1)

    tally = sync_count.synchronising_calls(run, torch.device("cuda"))
    assert modes == ["warn", "default"]
    name = sync_count.short_path(__file__)
    assert name == "tests/test_benchmarks.py"
    assert tally[f"{name}:{line}"] == 2
    assert sum(tally.values()) == 3


def test_sync_tally_on_cpu_runs_and_reports_none():
    calls = []
    assert sync_count.synchronising_calls(lambda: calls.append(1), torch.device("cpu")) is None
    assert calls == [1]


def test_profile_overrides_load(tmp_path):
    cfg = load_config(
        profile_train.CONFIG, profile_train.overrides(tmp_path, 8, 256, 13, "bf16", workers=1)
    )
    assert (cfg.data.batch_size, cfg.train.max_iters, cfg.train.amp) == (8, 13, "bf16")
    assert cfg.data.workers == 1
    assert cfg.train.optimizer == "adamw" and cfg.train.eval_interval == 0
    assert cfg.model.transform.min_size == [256] and cfg.data.root == str(tmp_path)


def test_jittered_proposals_overlap_their_boxes():
    gen = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[10.0, 10.0, 50.0, 40.0], [100.0, 80.0, 200.0, 240.0]])
    proposals = profile_train.jittered_proposals(boxes, 4000, gen)
    best = torchvision.ops.box_iou(proposals, boxes).max(dim=1).values
    assert proposals.shape == (4000, 4)
    assert 0.75 < (best >= 0.5).float().mean() < 0.85  # the docstring's figures
    assert 0.2 < (best >= 0.7).float().mean() < 0.3
    assert profile_train.jittered_proposals(boxes[:0], 5, gen).shape == (0, 4)


def test_trained_rpn_replaces_training_proposals_only():
    """Inside the block a training RPN proposes jittered ground truth (both sets, clipped to
    the image), its losses stay; in eval mode and after the block the real proposals."""
    cfg = load_config(
        ROOT / "configs/synthetic/decoupled_rcnn_r18_fpn_synthetic.yaml",
        ["model.rpn.post_nms_top_n_train=50"],
    )
    torch.manual_seed(0)
    model = build_detector(cfg)
    images = model.transform([torch.rand(3, 256, 256)])[0]  # the config's size: not resized
    features = model.backbone(images.tensors)
    target = {"boxes": torch.tensor([[20.0, 30.0, 90.0, 100.0]]), "labels": torch.tensor([1])}
    rpn = model.rpn.train()
    with profile_train.trained_rpn(True, 50):
        sets, losses = rpn(images, features, [target])
        assert set(losses) == {"rpn.loss_cls", "rpn.loss_bbox"}
        for proposals in (sets.cls[0], sets.reg[0]):
            assert proposals.shape == (50, 4)
            assert proposals.min() >= 0 and proposals.max() <= 256
            iou = torchvision.ops.box_iou(proposals, target["boxes"])
            assert (iou >= 0.5).float().mean() > 0.5
        rpn.eval()
        plain, _ = rpn(images, features)
        assert torchvision.ops.box_iou(plain[0], target["boxes"]).max() < 0.5
    rpn.train()
    real, _ = rpn(images, features, [target])
    assert torchvision.ops.box_iou(real.reg[0], target["boxes"]).mean() < 0.5


FAKE_PYTHON = """#!/usr/bin/env bash
# A stand-in interpreter: inference.py writes its --out, drcnn's help lacks --amp, the summary
# heredoc runs in the real Python, everything else fails.
case "$1" in
  -) exec {python} "$@" ;;
  benchmarks/inference.py)
    while [ $# -gt 0 ]; do [ "$1" = --out ] && echo '{{"ms": 1}}' > "$2"; shift; done ;;
  -m) [ "$4" = --help ] && echo "usage: drcnn benchmark [--images N] $FAKE_HELP" || exit 3 ;;
  *) echo "boom"; exit 1 ;;
esac
"""


def run_gpu_check(tmp_path: Path, budget: int, help_text: str = "", steps: str = "") -> dict:
    """Run gpu_check.sh in its CPU mode with the fake interpreter (whose ``drcnn benchmark
    --help`` ends with ``help_text``), running only ``steps`` when given (GPU_CHECK_STEPS);
    returns its summary.json."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PYTHON": str(fake),
        "GPU_CHECK_BUDGET": str(budget),
        "FAKE_HELP": help_text,
        "GPU_CHECK_STEPS": steps,
    }
    subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--device", "cpu", str(out)],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=60,
    )
    return json.loads((out / "summary.json").read_text())


def test_gpu_check_goes_on_after_failures_and_skips_missing_amp(tmp_path):
    summary = run_gpu_check(tmp_path, budget=1000)
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert status == {
        "environment": "ok",
        "inference": "ok",
        "sync_count": "failed",
        "train_step_fp32": "failed",
        "train_step_bf16": "failed",
        "benchmark_fp32": "failed",
        "benchmark_bf16": "skipped (no --amp)",
        "profile_train": "failed",
        "profile_train_bf16": "failed",
        "demo": "skipped (cuda only)",
        "demo_times": "skipped (cuda only)",
        "train_step_bf16_compiled": "failed",
    }
    assert summary["results"] == {"inference": {"ms": 1}}
    assert "boom" in (tmp_path / "out" / "log.txt").read_text()


def test_gpu_check_runs_the_bf16_benchmark_when_drcnn_has_amp(tmp_path):
    summary = run_gpu_check(tmp_path, budget=1000, help_text="[--amp AMP]")
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert status["benchmark_bf16"] == "failed"  # it ran (and the fake interpreter failed it)
    assert "--amp bf16 --out" in (tmp_path / "out" / "log.txt").read_text()


def test_gpu_check_skips_steps_once_the_budget_is_spent(tmp_path):
    summary = run_gpu_check(tmp_path, budget=20)
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert set(status.values()) == {"skipped", "skipped (no --amp)", "skipped (cuda only)"}
    assert len(status) == 12


def test_gpu_check_runs_only_the_selected_steps(tmp_path):
    summary = run_gpu_check(tmp_path, budget=1000, steps="inference train_step_bf16")
    status = {s["step"]: s["status"] for s in summary["steps"]}
    ran = {"inference": "ok", "train_step_bf16": "failed"}
    assert {k: v for k, v in status.items() if k in ran} == ran
    assert len(status) == 12
    assert {v for k, v in status.items() if k not in ran} == {"skipped (not selected)"}
    log = (tmp_path / "out" / "log.txt").read_text()
    assert "--amp bf16" in log and "--amp none" not in log  # train_step_fp32 did not run


FAKE_RUN = """#!/usr/bin/env bash
# A stand-in python3 for gpu_study.sh: `-m drcnn run SPEC --out DIR ...` writes a run folder,
# leaves a child holding its output open (as notebook kernels do) and outlasts any limit;
# `-c CODE` is the real interpreter.
if [ "$1" = -c ]; then exec {python} "$@"; fi
out=$6
mkdir -p "$out/models/m" "$out/sensitivity/parts/m" "$out/tables"
echo w > "$out/models/m/latest.pth"; echo dets > "$out/models/m/results.bbox.json"
echo rows > "$out/sensitivity/sensitivity.csv"
echo rows > "$out/sensitivity/parts/m/sensitivity.parquet"
echo {{}} > "$out/sensitivity/parts/m/part.json"
echo ap > "$out/tables/ap_table.csv"; echo "[1/2] train-m: done in 1.0 s"
setsid sleep 30 &  # its own session, as jupyter starts kernels: out of timeout's reach
sleep 60
"""


def test_gpu_study_stops_at_its_limit_and_packs_the_run_without_weights(tmp_path):
    """LIMIT stops the run and the archive is written at once, although a child of the run
    still holds its output (on the H200, notebook kernels kept a pipe, and the script, open)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text(FAKE_RUN.format(python=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    results, run_dir = tmp_path / "results", tmp_path / "run"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "LIMIT": "2",
        "RUN_DIR": str(run_dir),
    }
    start = time.monotonic()
    done = subprocess.run(
        ["bash", "benchmarks/gpu_study.sh", "full", str(results)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert time.monotonic() - start < 20
    assert done.returncode == 124 and "train-m: done" in done.stdout
    record = json.loads((results / "full.json").read_text())
    assert (record["exit_status"], record["limit_s"], record["jobs"]) == (124, 2, 9)
    with tarfile.open(results / "full_outputs.tar.gz") as archive:
        names = {Path(n).as_posix().lstrip("./") for n in archive.getnames()}
    assert "tables/ap_table.csv" in names
    assert "models/m/latest.pth" not in names and "sensitivity/sensitivity.csv" not in names
    assert "models/m/results.bbox.json" not in names
    assert "sensitivity/parts/m/part.json" in names  # a part keeps its record, not its rows
    assert "sensitivity/parts/m/sensitivity.parquet" not in names


def run_train_step(tmp_path, monkeypatch, *args: str) -> dict:
    """``train_step.py`` on the CPU in this process (one step of one 64x96 image per model,
    ARGS added); its JSON."""
    out = tmp_path / "train_step.json"
    argv = ["train_step.py", "--device", "cpu", "--steps", "1", "--warmup", "0", "--batch", "1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--size", "64", "96", *args, "--out", str(out)])
    try:
        train_step.main()
    finally:
        torch.set_flush_denormal(False)  # main() flushes denormals on the CPU
    return json.loads(out.read_text())


def test_train_step_compiles_each_backbone_when_asked(tmp_path, monkeypatch):
    """``train_step.py --compile-backbone``: the backbone of each of the three models, and only
    it, goes through ``nn.Module.compile`` before its steps (compiling itself is left to the
    GPU check: on this CPU it takes most of a minute); the JSON says so, with a time per model."""
    compiled = []
    monkeypatch.setattr(nn.Module, "compile", lambda module: compiled.append(module))
    result = run_train_step(tmp_path, monkeypatch, "--compile-backbone")
    assert result["compile_backbone"] is True and len(compiled) == 3
    models = train_step.build_models(64, 96)
    assert [type(m) for m in compiled] == [type(m.backbone) for m, _ in models.values()]
    assert set(result["models"]) == set(models)
    assert all(row["median_s"] > 0 for row in result["models"].values())


def test_train_step_runs_only_the_named_models_with_their_weights(tmp_path, monkeypatch):
    """``train_step.py --models``: only the named models run, without a ratio when torchvision's
    is not among them, and a model kept alone has the weights it has beside the others."""
    rows = run_train_step(tmp_path, monkeypatch, "--models", "drcnn_decoupled_rcnn")["models"]
    assert (
        list(rows) == ["drcnn_decoupled_rcnn"]
        and "ratio_to_torchvision" not in rows["drcnn_decoupled_rcnn"]
    )
    alone = train_step.build_models(64, 96, ["drcnn_decoupled_rcnn"])["drcnn_decoupled_rcnn"][0]
    beside = train_step.build_models(64, 96)["drcnn_decoupled_rcnn"][0]
    for a, b in zip(alone.state_dict().values(), beside.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_gpu_activity_counts_device_events_and_their_union():
    """``train_step.gpu_activity``: only CUDA events count, and overlapping or nested intervals
    are busy time once (hand-worked: [0, 10] + [5, 12] + [6, 7] + [20, 25] = 17 us)."""
    from torch.autograd import DeviceType

    def event(start: float, end: float, device: DeviceType) -> SimpleNamespace:
        return SimpleNamespace(time_range=SimpleNamespace(start=start, end=end), device_type=device)

    cuda, cpu = DeviceType.CUDA, DeviceType.CPU
    events = [event(20, 25, cuda), event(0, 10, cuda), event(6, 7, cuda), event(5, 12, cuda)]
    events.append(event(0, 100, cpu))
    assert train_step.gpu_activity(events) == {"gpu_activities": 4, "gpu_busy_s": 17e-6}
    assert train_step.gpu_activity([event(0, 100, cpu)]) == {
        "gpu_activities": 0,
        "gpu_busy_s": 0.0,
    }


def test_host_time_sums_self_time_on_the_step_thread_by_function_and_operator():
    """``train_step.host_time``: self times summed per Python function and per operator, in ms,
    on the thread with the most events only (a helper thread's waits are left out), device
    events ignored, and built-in methods' object addresses dropped so that one method is one
    row (hand-worked: 2 + 3 = 5 ms for ``add_``)."""
    from torch.autograd import DeviceType

    def event(name: str, us: float, python: bool, thread: int = 1, cpu: bool = True):
        device = DeviceType.CPU if cpu else DeviceType.CUDA
        return SimpleNamespace(
            name=name,
            self_cpu_time_total=us,
            is_python_function=python,
            thread=thread,
            device_type=device,
        )

    events = [
        event("<built-in method add_ of Tensor object at 0x7f01>", 2000, True),
        event("<built-in method add_ of Tensor object at 0x7f02>", 3000, True),
        event("drcnn/models/rpn.py(10): forward", 4000, True),
        event("aten::mm", 7000, False),
        event("aten::mm", 1000, False),
        event("aten::add", 500, False),
        event("<built-in method get of SimpleQueue object at 0x7f03>", 90000, True, thread=2),
        event("kernel", 50000, False, cpu=False),
    ]
    host = train_step.host_time(events, rows=2)
    assert host["python_self_ms"] == 9.0 and host["ops_self_ms"] == 8.5
    assert host["top_python"] == [
        ["<built-in method add_ of Tensor object>", 5.0, 2],
        ["drcnn/models/rpn.py(10): forward", 4.0, 1],
    ]
    assert host["top_ops"] == [["aten::mm", 8.0, 2], ["aten::add", 0.5, 1]]


def run_launch_count(tmp_path, monkeypatch, *args: str) -> dict:
    """``launch_count.py ARGS`` in this process (thread count restored); its JSON."""
    out = tmp_path / "launches.json"
    monkeypatch.setattr(sys, "argv", ["launch_count.py", *args, "--out", str(out)])
    before = torch.get_num_threads()
    try:
        launch_count.main()
    finally:
        torch.set_num_threads(before)
    return json.loads(out.read_text())


def test_launch_count_lines_add_up_to_the_audit_count(tmp_path, monkeypatch):
    """``launch_count.py``: its per-line tally (every line listed) adds up to SyncAudit's
    launch count, for every model; the JSON holds what the table prints."""
    result = run_launch_count(tmp_path, monkeypatch, "--batch", "2", "--lines", "100000")
    assert result["batch"] == 2 and set(result["models"]) == {"faster", "cascade", "decoupled"}
    for r in result["models"].values():
        assert r["launches"] == sum(n for _, n in r["top_lines"]) > 500
        assert r["launches_per_image"] == r["launches"] / 2 and r["waits"] > 0
        assert any(line.startswith("drcnn/models/sampling.py") for line, _ in r["top_lines"])


def test_launch_count_r50_compares_with_torchvision(tmp_path, monkeypatch):
    """``launch_count.py --r50 --amp bf16``: train_step.py's three R-50 models, each with its
    ratio to torchvision's count (the table's reference row is 1)."""
    monkeypatch.setattr(launch_count, "R50_SIZE", (128, 160))
    result = run_launch_count(tmp_path, monkeypatch, "--r50", "--amp", "bf16")
    assert result["batch"] == 2 and result["amp"] == "bf16" and result["size"] == "128x160"
    models = result["models"]
    assert set(models) == {"torchvision_faster_rcnn", "drcnn_faster_rcnn", "drcnn_decoupled_rcnn"}
    reference = models["torchvision_faster_rcnn"]["launches"]
    for r in models.values():
        assert r["ratio_to_torchvision"] == r["launches"] / reference and r["launches"] > 500


def test_run_times_reads_step_records_and_notebook_cells(tmp_path, monkeypatch, capsys):
    """``run_times.py``: the steps in start order with their start after the first and their
    length; a notebook's kernel time is its papermill duration beyond its cells, its imports the
    first code cell after papermill's parameter cells (hand-worked: 10 s - (3 + 5.5 + 0.4) =
    1.1 s); a step without a notebook has no notebook figures; a training step has its log's
    seconds per iteration and data wait; the JSON holds what is printed."""

    def record(step: str, start: int, seconds: float, parameters: dict | None = None) -> None:
        begin = f"2026-11-27T19:00:{start:02d}+00:00"
        end = f"2026-11-27T19:00:{start + int(seconds):02d}+00:00"
        (tmp_path / "steps" / f"{step}.json").write_text(
            json.dumps(
                {
                    "step_id": step,
                    "parameters": parameters or {},
                    "status": "done",
                    "started": begin,
                    "finished": end,
                    "seconds": seconds,
                }
            )
        )

    def cell(source: str, seconds: float, tags: tuple[str, ...] = ()) -> dict:
        metadata = {"papermill": {"duration": seconds}, "tags": list(tags)}
        return {"cell_type": "code", "source": source, "metadata": metadata}

    (tmp_path / "steps").mkdir()
    (tmp_path / "notebooks").mkdir()
    work_dir = tmp_path / "models" / "a"
    work_dir.mkdir(parents=True)
    log = [  # iterations 1-10, 11-20, 21-25; an evaluation record between
        {"type": "train", "iter": 10, "time": 1.0, "data_time": 0.1},
        {"type": "train", "iter": 20, "time": 2.0, "data_time": 0.0},
        {"type": "eval", "iter": 20, "AP": 0.1},
        {"type": "train", "iter": 25, "time": 4.0, "data_time": 1.0},
    ]
    (work_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    record("test-a", 12, 4.0, {"work_dir": str(work_dir), "run_train": False})
    record("train-a", 2, 10.0, {"work_dir": str(work_dir), "run_train": True})
    record("report", 16, 0.0)
    cells = [
        {"cell_type": "markdown", "source": "# Train", "metadata": {}},
        cell("config = None", 0.01, ("parameters",)),
        cell("# Parameters\nconfig = 'x'", 0.02, ("injected-parameters",)),
        cell("import drcnn\nimport torch", 3.0),
        cell("summary = drcnn.train(cfg)", 5.5),
        cell("curves = plots.loss_curves()", 0.4),
    ]
    notebook = {"cells": cells, "metadata": {"papermill": {"duration": 10.0}}}
    (tmp_path / "notebooks" / "train-a.ipynb").write_text(json.dumps(notebook))
    out = tmp_path / "times.json"
    monkeypatch.setattr(sys, "argv", ["run_times.py", str(tmp_path), "--out", str(out)])
    run_times.main()
    times = json.loads(out.read_text())
    assert [s["step"] for s in times["steps"]] == ["train-a", "test-a", "report"]
    assert [s["start_s"] for s in times["steps"]] == [0.0, 10.0, 14.0]
    assert times["steps_s"] == 14.0
    train = times["steps"][0]["notebook"]
    assert train["first_cell_s"] == 3.0 and train["outside_cells_s"] == pytest.approx(1.1)
    assert [(c["seconds"], c["source"]) for c in train["longest_cells"]] == [
        (5.5, "summary = drcnn.train(cfg)"),
        (0.4, "curves = plots.loss_curves()"),
    ]
    assert "notebook" not in times["steps"][1] and "notebook" not in times["steps"][2]
    # the data wait weighted by each interval's iterations: (10 x 0.1 + 5 x 1.0) / (10 x 1.0 +
    # 10 x 2.0 + 5 x 4.0) = 6 / 50; the test step trained nothing
    assert times["steps"][0]["training"] == {
        "iterations": 25,
        "median_s_per_iteration": 2.0,
        "median_data_s_per_iteration": 0.1,
        "data_share": pytest.approx(0.12),
    }
    assert "training" not in times["steps"][1]
    printed = capsys.readouterr().out
    assert "train-a" in printed and "data wait 12.0%" in printed
