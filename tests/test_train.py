"""Training loop: loss falls, schedule and lr scaling, exact resume, checkpoint rotation."""

from __future__ import annotations

import copy
import json
import math
import resource
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from drcnn.config import load_config
from drcnn.data.loader import build_dataloader
from drcnn.engine import amp as amp_module
from drcnn.engine.checkpoint import load_checkpoint
from drcnn.engine.optim import build_optimizer, build_schedule, scaled_lr
from drcnn.engine.train import (
    MetricsLog,
    StepContext,
    amp_notice,
    resolve_amp,
    total_loss,
    train,
    train_step,
)
from drcnn.errors import DrcnnError
from drcnn.models.detector import build_detector

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "synthetic"
FASTER = CONFIGS / "faster_rcnn_r18_fpn_synthetic.yaml"
DECOUPLED = CONFIGS / "decoupled_rcnn_r18_fpn_synthetic.yaml"


def tiny_overrides(root: Path) -> list[str]:
    """CPU-sized settings for the 128-px synthetic dataset of the ``synthetic_root`` fixture."""
    return [
        f"data.root={root}",
        "data.workers=0",
        "data.batch_size=2",
        "data.test_batch_size=4",
        "model.transform.min_size=[128]",
        "model.transform.test_min_size=128",
        "model.transform.max_size=128",
        "model.rpn.pre_nms_top_n_train=200",
        "model.rpn.post_nms_top_n_train=100",
        "model.rpn.pre_nms_top_n_test=100",
        "model.rpn.post_nms_top_n_test=50",
        "model.roi_head.cls_sampler.num=64",
        "model.roi_head.reg_sampler.num=64",
        "train.eval_interval=0",
        "train.log_interval=1",
        "train.warmup_iters=3",
    ]


def cpu_step_context(model: torch.nn.Module, cfg, amp: str) -> StepContext:
    """A CPU training context with the config's optimizer, no loss scaling, clip 10."""
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    optimizer = build_optimizer(model, cfg)
    return StepContext(model, optimizer, scaler, torch.device("cpu"), amp, grad_clip=10.0)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_total_loss_sums_only_loss_entries():
    losses = {
        "rpn.loss_cls": torch.tensor(1.0),
        "s0.loss_bbox": torch.tensor(2.0),
        "s0.acc": torch.tensor(100.0),
        "loss_extra": torch.tensor(0.5),
        "s1.losses_aux": torch.tensor(0.25),
    }
    assert total_loss(losses).item() == pytest.approx(1.0 + 2.0 + 0.5 + 0.25)


def test_loss_falls_on_a_fixed_batch(synthetic_root):
    cfg = load_config(
        FASTER,
        [
            *tiny_overrides(synthetic_root),
            "train.lr=0.08",  # 0.02 for the batch of 2
            "data.flip_prob=0",
            "model.backbone.norm=frozen_bn",  # batch statistics of 2 images are too noisy
        ],
    )
    torch.manual_seed(0)
    batch = next(iter(build_dataloader(cfg, "train", shuffle=False)))
    model = build_detector(cfg).train()
    ctx = cpu_step_context(model, cfg, "none")
    losses = [train_step(ctx, [batch], i)["loss"] for i in range(12)]
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses


def test_schedule_units_and_linear_scaling(synthetic_root):
    cfg = load_config(
        FASTER,
        [
            *tiny_overrides(synthetic_root),
            "train.epochs=5",
            "train.max_iters=null",
            "train.lr_steps=[2,4]",
            "train.lr_step_unit=epoch",
            "train.accumulate=2",
            "train.lr=0.04",
            "train.reference_batch_size=8",
        ],
    )
    schedule = build_schedule(cfg, dataset_size=17)  # 17 // (2 images x 2 accumulated) = 4
    assert (schedule.iters_per_epoch, schedule.total_iters, schedule.steps) == (4, 20, [8, 16])
    assert scaled_lr(cfg) == pytest.approx(0.04 * 4 / 8)
    assert schedule.lr_factor(7) == 1.0 and schedule.lr_factor(8) == pytest.approx(0.1)
    assert schedule.lr_factor(16) == pytest.approx(0.01)


def test_logged_learning_rates_follow_warmup_and_steps(synthetic_root, tmp_path):
    overrides = [
        *tiny_overrides(synthetic_root),
        "train.max_iters=6",
        "train.lr=0.08",
        "train.warmup_ratio=0.25",
        "train.lr_steps=[4]",
        "train.lr_step_unit=iter",
        "train.gamma=0.5",
        "train.checkpoint_unit=iter",
        "train.checkpoint_interval=100",
    ]
    train(load_config(FASTER, overrides), tmp_path, device="cpu")
    logged = [entry["lr"] for entry in read_jsonl(tmp_path / "metrics.jsonl")]
    base = 0.08 * 2 / 8  # batch 2 of the reference 8
    expected = [base * 0.25, base * 0.5, base * 0.75, base, base * 0.5, base * 0.5]
    assert logged == pytest.approx(expected)


def test_resume_reproduces_the_uninterrupted_run(synthetic_root, tmp_path):
    """9 iterations straight vs 4, stop, resume to 9 (across the epoch end at 8)."""
    overrides = [
        *tiny_overrides(synthetic_root),
        "model.transform.min_size=[96]",  # smaller images: a faster test
        "model.transform.max_size=96",
        "train.checkpoint_unit=iter",
        "train.checkpoint_interval=2",
        "train.keep_checkpoints=2",
    ]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(load_config(DECOUPLED, [*overrides, "train.max_iters=9"]), straight, device="cpu")
    train(load_config(DECOUPLED, [*overrides, "train.max_iters=4"]), split, device="cpu")
    assert load_checkpoint(split / "latest.pth")["iter"] == 4
    cfg = load_config(DECOUPLED, [*overrides, "train.max_iters=9"])
    summary = train(cfg, split, resume=split / "latest.pth", device="cpu")
    assert summary["iter"] == 9

    runs = [read_jsonl(run / "metrics.jsonl") for run in (straight, split)]
    assert [e["iter"] for e in runs[1]] == list(range(1, 10))
    for key in ("loss", "rpn.loss_cls", "s0.loss_cls", "s0.loss_bbox", "lr"):
        assert [e[key] for e in runs[0]] == [e[key] for e in runs[1]], key
    first, second = (load_checkpoint(run / "latest.pth")["model"] for run in (straight, split))
    assert all(torch.equal(first[k], second[k]) for k in first)

    names = sorted(p.name for p in straight.glob("*.pth"))
    assert names == ["iter_6.pth", "iter_8.pth", "latest.pth"]
    assert load_checkpoint(straight / "latest.pth")["iter"] == 9
    assert load_config(straight / "config.yaml") == cfg


@pytest.mark.parametrize(("name", "kind"), [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_optimizer_choice_and_its_scaled_lr(name, kind):
    cfg = load_config(
        None,
        [f"train.optimizer={name}", "train.lr=0.004", "data.batch_size=4",
         "train.reference_batch_size=8", "train.weight_decay=0.05"],
    )  # fmt: skip
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model[0].weight.requires_grad_(False)
    optimizer = build_optimizer(model, cfg)
    assert type(optimizer) is kind
    group = optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(0.002)  # 0.004 * 4 / 8
    assert group["weight_decay"] == 0.05
    assert len(group["params"]) == 3  # the frozen weight is left out


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_optimizer_makes_the_per_tensor_update(name):
    """The optimizer is PyTorch's fused implementation, and five of its steps (momentum, weight
    decay, AdamW's moments) land where the per-tensor implementation's land, up to rounding."""
    cfg = load_config(None, [f"train.optimizer={name}", "train.lr=0.01", "train.weight_decay=0.05"])
    torch.manual_seed(0)
    fused_model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 2))
    plain_model, initial = copy.deepcopy(fused_model), copy.deepcopy(fused_model)
    fused = build_optimizer(fused_model, cfg)
    assert fused.defaults["fused"] is True
    settings = {"lr": scaled_lr(cfg), "weight_decay": 0.05, "foreach": False}
    if name == "sgd":
        plain = torch.optim.SGD(plain_model.parameters(), momentum=cfg.train.momentum, **settings)
    else:
        plain = torch.optim.AdamW(plain_model.parameters(), **settings)
    x = torch.randn(16, 6)
    for _ in range(5):
        for model, optimizer in ((fused_model, fused), (plain_model, plain)):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
    for a, b in zip(fused_model.parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(fused_model[0].weight, initial[0].weight)  # the steps moved it


def test_amp_notice_names_the_setting_that_will_not_help(monkeypatch):
    """fp16 off CUDA and bf16 on a CPU without native bf16 get a notice; useful settings none."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert "train.amp=fp16" in amp_notice("fp16", cpu)
    assert amp_notice("fp16", cuda) is None and amp_notice("none", cpu) is None
    monkeypatch.setattr(amp_module, "cpu_has_native_bf16", lambda: False)
    assert "train.amp=bf16" in amp_notice("bf16", cpu)
    assert amp_notice("bf16", cuda) is None
    monkeypatch.setattr(amp_module, "cpu_has_native_bf16", lambda: True)
    assert amp_notice("bf16", cpu) is None


def test_amp_auto_uses_bf16_only_where_the_device_computes_it_natively(monkeypatch):
    """train.amp=auto: bf16 on a CPU with AVX512-BF16/AMX or a bf16 GPU, fp32 elsewhere."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(amp_module, "cpu_has_native_bf16", lambda: False)
    assert resolve_amp("auto", cpu) == "none"
    assert resolve_amp("bf16", cpu) == "bf16" and resolve_amp("fp16", cpu) == "fp16"  # as asked
    monkeypatch.setattr(amp_module, "cpu_has_native_bf16", lambda: True)
    assert resolve_amp("auto", cpu) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_amp("auto", cuda) == "none"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_amp("auto", cuda) == "bf16"


class RaisingBackbone(torch.nn.Module):
    """A stand-in backbone: one convolution, or an error when asked to fail."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fail = False

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.fail:
            raise RuntimeError("backbone failed")
        return {"0": self.conv(x)}


def test_inference_autocast_casts_the_backbone_only_and_cleans_up():
    """bf16 inside the backbone, its features out in fp32, nothing cast outside it; after the
    block (also one the backbone raised in) no hook is left and autocast is off again."""
    model = torch.nn.Module()
    model.backbone = RaisingBackbone()
    head = torch.nn.Linear(4, 2)
    inner: list[torch.dtype] = []
    model.backbone.conv.register_forward_hook(lambda m, a, out: inner.append(out.dtype))
    x = torch.rand(1, 3, 8, 8)
    with amp_module.inference_autocast(model, "bf16", torch.device("cpu")):
        features = model.backbone(x)["0"]
        after = head(features.mean(dim=(2, 3)))
    assert inner == [torch.bfloat16]
    assert features.dtype == torch.float32 and after.dtype == torch.float32
    model.backbone.fail = True
    with (
        pytest.raises(RuntimeError, match="backbone failed"),
        amp_module.inference_autocast(model, "bf16", torch.device("cpu")),
    ):
        model.backbone(x)
    assert not torch.is_autocast_enabled("cpu")
    assert not model.backbone._forward_hooks and not model.backbone._forward_pre_hooks
    model.backbone.fail = False
    with amp_module.inference_autocast(model, "none", torch.device("cpu")):
        assert model.backbone(x)["0"].dtype == torch.float32
    assert inner == [torch.bfloat16, torch.float32]


def test_bf16_autocast_step_on_cpu(synthetic_root):
    """train.amp=bf16 runs the forward under CPU autocast and still gives finite fp32 losses."""
    cfg = load_config(DECOUPLED, [*tiny_overrides(synthetic_root), "train.amp=bf16"])
    torch.manual_seed(0)
    batch = next(iter(build_dataloader(cfg, "train", shuffle=False)))
    model = build_detector(cfg).train()
    seen = []
    model.backbone.register_forward_hook(lambda module, args, out: seen.append(out["0"].dtype))
    ctx = cpu_step_context(model, cfg, "bf16")
    logged = train_step(ctx, [batch], 0)
    assert seen == [torch.bfloat16]
    assert all(math.isfinite(v) for v in logged.values()), logged
    assert all(p.dtype == torch.float32 for p in model.parameters())


@contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes beyond ``limit`` bytes of a file fail (EFBIG, SIGXFSZ ignored) as on a full disk:
    the first write past the limit is cut short, the next one fails."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, handler)


def test_metrics_append_on_a_full_disk_adds_no_torn_line(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"type": "train", "iter": 1, "loss": 1.5})
    before = log.path.read_bytes()
    with file_size_limit(len(before) + 10), pytest.raises(DrcnnError, match="could not append"):
        log.write({"type": "train", "iter": 2, "loss": 1.25})
    assert log.path.read_bytes() == before
    log.write({"type": "train", "iter": 2, "loss": 1.25})
    assert [entry["iter"] for entry in read_jsonl(log.path)] == [1, 2]
