"""drcnn's multi-scale RoIAlign (threaded or not, aligned or not) against torchvision's
MultiScaleRoIAlign and roi_align (the references)."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign as TorchvisionMultiScaleRoIAlign
from torchvision.ops import roi_align

from drcnn.models import roi_align as roi_align_module
from drcnn.models.roi_align import MultiScaleRoIAlign, chunk_bounds

NAMES = ["0", "1", "2", "3"]
SHAPES = [(256, 320), (256, 320), (256, 320)]


@pytest.fixture
def two_threads():
    """The threaded path needs at least two intra-op threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def small_chunks(two_threads, monkeypatch):
    """Chunk these small test inputs (the default threshold suits real feature maps)."""
    monkeypatch.setattr(roi_align_module, "MIN_WORK_PER_CHUNK", 64)


def graph_nodes(tensor: torch.Tensor) -> set[str]:
    """Names of the autograd nodes behind ``tensor``."""
    seen, stack = {}, [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and id(node) not in seen:
            seen[id(node)] = type(node).__name__
            stack.extend(n for n, _ in node.next_functions)
    return set(seen.values())


def features(grad: bool) -> dict[str, torch.Tensor]:
    """Four FPN levels (strides 4..32) of a batch of three 256x320 images."""
    gen = torch.Generator().manual_seed(0)
    return {
        name: torch.randn(3, 8, 64 >> i, 80 >> i, generator=gen).requires_grad_(grad)
        for i, name in enumerate(NAMES)
    }


def boxes(per_image: int = 120) -> list[torch.Tensor]:
    """Boxes of 2..300 px, so every FPN level gets some; a different count per image."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(len(SHAPES)):
        n = per_image + 17 * i
        xy = torch.rand(n, 2, generator=gen) * torch.tensor([300.0, 240.0])
        wh = torch.rand(n, 2, generator=gen) ** 2 * 300 + 2
        out.append(torch.cat([xy, xy + wh], dim=1))
    return out


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_forward_is_bit_identical_and_gradients_match(small_chunks, sampling_ratio, threads):
    torch.set_num_threads(threads)
    x, rois = features(grad=True), boxes()
    reference = TorchvisionMultiScaleRoIAlign(NAMES, 7, sampling_ratio)
    pooler = MultiScaleRoIAlign(NAMES, 7, sampling_ratio)
    expected, got = reference(x, rois, SHAPES), pooler(x, rois, SHAPES)
    assert "_CpuRoIAlignBackward" in graph_nodes(got)
    assert torch.equal(got, expected)
    weights = torch.randn_like(expected)
    inputs = list(x.values())
    want = torch.autograd.grad((expected * weights).sum(), inputs, allow_unused=True)
    have = torch.autograd.grad((got * weights).sum(), inputs, allow_unused=True)
    used = 0
    for w, h in zip(want, have, strict=True):
        if h is None:  # a level without boxes: torchvision's gradient there is zero
            assert w is None or not w.any()
            continue
        used += 1
        torch.testing.assert_close(h, w, rtol=1e-5, atol=1e-5)
    assert used >= 3


def mmdet_levels(rois: list[torch.Tensor]) -> torch.Tensor:
    """mmdetection's level rule, written out: floor(log2(sqrt(area) / 56)) clamped to 0..3."""
    box = torch.cat(rois)
    side = ((box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])).sqrt()
    return torch.floor(torch.log2(side / 56 + 1e-6)).clamp(0, 3).long()


@pytest.mark.parametrize("threads", [1, 2])
def test_aligned_matches_per_level_roi_align(small_chunks, threads):
    """aligned=True against torchvision's roi_align run per level, levels by mmdet's rule."""
    torch.set_num_threads(threads)
    x, rois = features(grad=True), boxes()
    got = MultiScaleRoIAlign(NAMES, 7, 0, aligned=True)(x, rois, SHAPES)
    assert "_CpuRoIAlignBackward" in graph_nodes(got)
    indexed = torch.cat([torch.cat([b.new_full((len(b), 1), i), b], 1) for i, b in enumerate(rois)])
    levels = mmdet_levels(rois)
    expected = torch.zeros_like(got)
    for level, name in enumerate(NAMES):
        rows = levels == level
        expected[rows] = roi_align(x[name], indexed[rows], 7, 1 / 4 / 2**level, 0, True)
    used = sorted(set(levels.tolist()))
    assert len(used) >= 3
    assert torch.equal(got, expected)
    weights = torch.randn_like(got)
    inputs = [x[NAMES[level]] for level in used]
    want = torch.autograd.grad((expected * weights).sum(), inputs)
    have = torch.autograd.grad((got * weights).sum(), inputs)
    for w, h in zip(want, have, strict=True):
        torch.testing.assert_close(h, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("aligned", [False, True])
def test_aligned_shifts_samples_by_half_a_pixel(small_chunks, threads, aligned):
    """Hand-worked: on a feature map whose value is its column index, a 7x7 bin's average is
    the bin centre's column, x1 + (j + 0.5) * w / 7, half a pixel less when aligned."""
    torch.set_num_threads(threads)
    columns = torch.arange(80.0).expand(3, 8, 64, 80)
    x = {"0": columns, "1": columns[..., ::2, ::2].contiguous()}  # two levels: threaded path
    rois = [torch.tensor([[40.0, 40.0, 96.0, 68.0]]).repeat(40, 1)] * 3  # 56x28 px: level 0
    got = MultiScaleRoIAlign(["0", "1"], 7, 2, aligned=aligned)(x, rois, SHAPES)
    x1, width = 40 / 4, 56 / 4
    centres = x1 + (torch.arange(7.0) + 0.5) * width / 7 - (0.5 if aligned else 0.0)
    torch.testing.assert_close(got, centres.expand_as(got), rtol=0, atol=1e-5)


def test_autocast_bf16_matches_torchvision(small_chunks):
    x, rois = features(grad=False), boxes()
    bf16 = {k: v.bfloat16() for k, v in x.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = TorchvisionMultiScaleRoIAlign(NAMES, 7, 0)(bf16, rois, SHAPES)
        got = MultiScaleRoIAlign(NAMES, 7, 0)(bf16, rois, SHAPES)
    assert got.dtype == expected.dtype == torch.bfloat16
    assert torch.equal(got, expected)


def thread_spy(monkeypatch) -> list[int]:
    """Record the chunk count of every hand-over to threads."""
    calls: list[int] = []
    real = roi_align_module.thread_map

    def spy(fn, items):
        calls.append(len(items))
        return real(fn, items)

    monkeypatch.setattr(roi_align_module, "thread_map", spy)
    return calls


@pytest.mark.parametrize("grad", [False, True])
def test_little_work_is_not_cut_into_chunks(two_threads, monkeypatch, grad):
    """Below the work threshold no level is cut into chunks (no threads); without a gradient
    it is the plain roi_align, with one drcnn's function (for its sparse backward)."""
    calls = thread_spy(monkeypatch)
    x = features(grad)
    got = MultiScaleRoIAlign(NAMES, 7, 0)(x, [boxes()[0][:5]], SHAPES[:1])
    assert calls == []
    assert ("_CpuRoIAlignBackward" in graph_nodes(got)) == grad
    expected = TorchvisionMultiScaleRoIAlign(NAMES, 7, 0)(x, [boxes()[0][:5]], SHAPES[:1])
    assert torch.equal(got, expected)


@pytest.mark.parametrize("aligned", [False, True])
def test_cpu_kernels_are_optional(small_chunks, monkeypatch, aligned):
    """cpu_kernels=False: the same values from torchvision's kernels, on the CPU path too."""
    calls = thread_spy(monkeypatch)
    x, rois = features(grad=True), boxes()
    threaded = MultiScaleRoIAlign(NAMES, 7, 0, aligned=aligned)(x, rois, SHAPES)
    assert calls and max(calls) == 2
    calls.clear()
    plain = MultiScaleRoIAlign(NAMES, 7, 0, aligned=aligned, cpu_kernels=False)(x, rois, SHAPES)
    assert calls == []
    assert "_CpuRoIAlignBackward" not in graph_nodes(plain)
    assert torch.equal(plain, threaded)


def test_chunk_bounds_follow_image_boundaries():
    images = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2], dtype=torch.float32)
    rois = torch.cat([images[:, None], torch.zeros(10, 4)], dim=1)
    assert chunk_bounds(rois, 2) == [(0, 5, 0, 2), (5, 10, 2, 3)]
    assert chunk_bounds(rois, 3) == [(0, 3, 0, 1), (3, 7, 1, 3), (7, 10, 2, 3)]
    assert chunk_bounds(rois[:1], 2) == [(0, 1, 0, 1)]  # no empty chunks
