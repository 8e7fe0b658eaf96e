"""drcnn.models.shape_cache: the least recently used entry goes first; inference mode is a key."""

from __future__ import annotations

import torch

from drcnn.models.shape_cache import ShapeCache


def test_keeps_the_most_recently_used_entries():
    cache: ShapeCache[int] = ShapeCache(entries=2)
    made = []

    def make(value: int):
        return lambda: made.append(value) or value

    assert cache.get("a", make(1)) == 1 and cache.get("b", make(2)) == 2
    assert cache.get("a", make(10)) == 1  # a hit: not made again, and now the most recent
    assert cache.get("c", make(3)) == 3  # drops "b", the least recently used
    assert len(cache) == 2 and made == [1, 2, 3]
    assert cache.get("b", make(20)) == 20 and cache.get("a", make(30)) == 30
    assert made == [1, 2, 3, 20, 30]


def test_inference_mode_values_are_kept_apart():
    """A tensor made under inference_mode may not be saved by autograd later: training gets its
    own."""
    cache: ShapeCache[torch.Tensor] = ShapeCache()
    with torch.inference_mode():
        inside = cache.get("k", lambda: torch.ones(3))
    outside = cache.get("k", lambda: torch.ones(3))
    assert inside.is_inference() and not outside.is_inference()
    weight = torch.ones(3, requires_grad=True)
    (weight * outside).sum().backward()  # the inference tensor here would raise
    assert torch.equal(weight.grad, outside)
