"""The RoI heads' results stay the same across refactors (issue 12, item 5).

``tests/fixtures/head_outputs.pt`` holds the losses and detections of tiny heads on fixed
weights and inputs, recorded by ``tests/make_head_outputs.py`` from the code before the RoI
heads were built from their config part and the pooler was split from its threading; every
case is recomputed here with the current code. Integer outputs (labels) must be equal and
floating ones equal up to the rounding of the CPU's kernels (relative 1e-6): the fixture was
recorded on an AMD EPYC without AVX512, where the current code reproduces it bit for bit, and
an Intel Xeon with AVX512 and AMX computes the same values up to 2.3e-7 relative (the same
shapes, labels and kept detections). A refactor that changes what is computed (another sample,
box or detection) moves values by far more than that.
"""

from __future__ import annotations

import pytest
import torch
from make_head_outputs import CASES, FIXTURE, record

RTOL = 1e-6  # a few float32 ulps: other CPU kernels' summation order, not other results


@pytest.fixture(scope="module")
def recorded() -> dict[str, dict[str, torch.Tensor]]:
    return torch.load(FIXTURE, weights_only=True)


def test_fixture_has_every_case(recorded):
    assert set(recorded) == set(CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_head_outputs_equal_the_recorded_ones(recorded, name):
    now = record(name)
    assert set(now) == set(recorded[name])
    for key, value in recorded[name].items():
        assert now[key].dtype == value.dtype and now[key].shape == value.shape, key
        if value.is_floating_point():
            torch.testing.assert_close(now[key], value, rtol=RTOL, atol=0, msg=key)
        else:
            assert torch.equal(now[key], value), key
