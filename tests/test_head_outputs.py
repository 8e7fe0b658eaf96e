"""The RoI heads' results stay bit-identical across refactors (issue 12, item 5).

``tests/fixtures/head_outputs.pt`` holds the losses and detections of tiny heads on fixed
weights and inputs, recorded by ``tests/make_head_outputs.py`` from the code before the RoI
heads were built from their config part and the pooler was split from its threading; every
case is recomputed here with the current code and must be equal, bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from make_head_outputs import CASES, FIXTURE, record


@pytest.fixture(scope="module")
def recorded() -> dict[str, dict[str, torch.Tensor]]:
    return torch.load(FIXTURE, weights_only=True)


def test_fixture_has_every_case(recorded):
    assert set(recorded) == set(CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_head_outputs_are_bit_identical_to_the_recorded_ones(recorded, name):
    now = record(name)
    assert set(now) == set(recorded[name])
    for key, value in recorded[name].items():
        assert now[key].dtype == value.dtype, key
        assert torch.equal(now[key], value), key
