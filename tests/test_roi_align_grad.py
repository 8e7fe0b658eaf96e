"""RoIAlign's sparse-product input gradient (drcnn.models.roi_align_grad) against torchvision's
backward kernel (through autograd of ``torchvision.ops.roi_align``) and hand-worked cases."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import roi_align

from drcnn.models.roi_align_grad import roi_align_input_grad


def torchvision_grad(
    features: torch.Tensor,
    rois: torch.Tensor,
    size: tuple[int, int],
    scale: float,
    ratio: int,
    aligned: bool,
    weights: torch.Tensor,
) -> torch.Tensor:
    """d(sum(weights * roi_align(...))) / d features by torchvision's kernels."""
    x = features.clone().requires_grad_(True)
    out = roi_align(x, rois, size, scale, ratio, aligned)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    return grad


def awkward_rois(num_images: int, height: int, width: int, scale: float) -> torch.Tensor:
    """Boxes of every kind the kernel treats specially, in image pixels: ordinary ones of many
    sizes, boxes partly and wholly outside the map, zero-width and zero-height boxes, inverted
    ones, sub-pixel ones and one touching the last row and column; image 1 of 3 has none."""
    gen = torch.Generator().manual_seed(0)
    side_h, side_w = height / scale, width / scale
    n = 60
    xy = torch.rand(n, 2, generator=gen) * torch.tensor([side_w, side_h])
    wh = torch.rand(n, 2, generator=gen) ** 2 * torch.tensor([side_w, side_h]) + 0.5
    boxes = torch.cat([xy, xy + wh], dim=1)
    special = torch.tensor(
        [
            [-30.0, -30.0, 20.0, 25.0],  # partly outside, top left
            [side_w - 10, side_h - 10, side_w + 40, side_h + 30],  # partly outside, bottom right
            [side_w + 20, 5.0, side_w + 60, 30.0],  # wholly outside
            [10.0, 10.0, 10.0, 40.0],  # zero width
            [10.0, 10.0, 40.0, 10.0],  # zero height
            [40.0, 40.0, 20.0, 30.0],  # inverted
            [5.2, 7.1, 5.6, 7.3],  # sub-pixel
            [0.0, 0.0, side_w, side_h],  # the whole map, to the last row and column
        ]
    )
    boxes = torch.cat([boxes, special])
    images = torch.tensor([0, 2])[torch.randint(0, 2, (len(boxes),), generator=gen)]
    images, order = torch.sort(images)
    return torch.cat([images[:, None].float(), boxes[order]], dim=1)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("ratio", [0, 2])
@pytest.mark.parametrize("size", [(7, 7), (3, 5)])
def test_matches_torchvision_backward(aligned, ratio, size):
    scale = 1 / 4
    features = torch.randn(3, 6, 20, 28, generator=torch.Generator().manual_seed(1))
    rois = awkward_rois(3, 20, 28, scale)
    weights = torch.randn(len(rois), 6, *size, generator=torch.Generator().manual_seed(2))
    want = torchvision_grad(features, rois, size, scale, ratio, aligned, weights)
    have = roi_align_input_grad(weights, rois, scale, ratio, aligned, tuple(features.shape))
    assert have.shape == features.shape and have.dtype == torch.float32
    assert not have[1].any()  # no box on image 1
    assert want.abs().max() > 0.1  # the comparison is not between two zero maps
    torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)


def test_one_sample_spreads_its_gradient_bilinearly():
    """Hand-worked: one 1x1 bin sampled once (ratio 1) at the box centre (1.5, 2.25) of a 4x5
    map, unaligned: the gradient g goes to the four neighbours with weights (1 - ly)(1 - lx) =
    0.5 * 0.75, (1 - ly) lx = 0.5 * 0.25, ly (1 - lx) = 0.5 * 0.75 and ly lx = 0.5 * 0.25."""
    rois = torch.tensor([[0.0, 1.5, 1.0, 3.0, 2.0]])  # x 1.5..3.0, y 1.0..2.0
    grad_out = torch.full((1, 2, 1, 1), 8.0)
    grad = roi_align_input_grad(grad_out, rois, 1.0, 1, False, (1, 2, 4, 5))
    expected = torch.zeros(1, 2, 4, 5)
    expected[0, :, 1, 2], expected[0, :, 1, 3] = 8 * 0.5 * 0.75, 8 * 0.5 * 0.25
    expected[0, :, 2, 2], expected[0, :, 2, 3] = 8 * 0.5 * 0.75, 8 * 0.5 * 0.25
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-6)


def test_samples_at_and_past_the_border():
    """Hand-worked border rules on a 3x5 map: the box x 4..6, y 0.5..1.5 is one bin sampled
    2 x 2 (ratio 2), at y in {0.75, 1.25} and x in {4.5, 5.5}, so each sample carries 1/4 of the
    bin's gradient. x = 4.5 lies past the last column's centre: clamped to column 4 with all of
    its x weight; x = 5.5 lies beyond the map's width (x > 5): no weight at all."""
    rois = torch.tensor([[0.0, 4.0, 0.5, 6.0, 1.5]])
    grad_out = torch.ones(1, 1, 1, 1)
    grad = roi_align_input_grad(grad_out, rois, 1.0, 2, False, (1, 1, 3, 5))
    expected = torch.zeros(1, 1, 3, 5)
    for y in (0.75, 1.25):
        low = int(y)
        expected[0, 0, low, 4] += (1 - (y - low)) / 4
        expected[0, 0, low + 1, 4] += (y - low) / 4
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-6)
    want = torchvision_grad(torch.zeros(1, 1, 3, 5), rois, (1, 1), 1.0, 2, False, grad_out)
    torch.testing.assert_close(grad, want, rtol=0, atol=1e-6)


def test_no_rois_give_a_zero_gradient():
    grad = roi_align_input_grad(
        torch.zeros(0, 4, 7, 7), torch.zeros(0, 5), 0.25, 0, True, (2, 4, 8, 8)
    )
    assert grad.shape == (2, 4, 8, 8) and not grad.any()
