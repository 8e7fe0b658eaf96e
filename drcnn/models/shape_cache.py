"""A small cache of tensors that depend only on shapes, kept across forward passes.

The RPN's anchors and the mask of the anchors an image trains on depend on nothing but the
feature maps' and the images' sizes, yet cost about a hundred small kernels to make (on a GPU,
where a training step is bound by the host's kernel launches, a few milliseconds per step).
Batches of one padded size, as in the synthetic configs and in benchmarks, make them once; COCO
batches come in a few dozen padded sizes, of which the most recent are kept.

A value made under ``torch.inference_mode`` is an inference tensor, which autograd may not
save, so the mode is part of every key: evaluation between training iterations never hands
training such a tensor.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import torch

T = TypeVar("T")

# About 4.3 MB of float32 anchors per entry at 800x1344 (268,550 anchors of five FPN levels).
DEFAULT_ENTRIES = 8


class ShapeCache(Generic[T]):
    """The ``entries`` most recently used values of ``make()``, by key (least recent dropped)."""

    def __init__(self, entries: int = DEFAULT_ENTRIES) -> None:
        self.entries = entries
        self._values: OrderedDict[Hashable, T] = OrderedDict()

    def get(self, key: Hashable, make: Callable[[], T]) -> T:
        """The value of ``key``, made by ``make()`` the first time (and after it was dropped)."""
        key = (key, torch.is_inference_mode_enabled())
        if key in self._values:
            self._values.move_to_end(key)
            return self._values[key]
        value = make()
        self._values[key] = value
        if len(self._values) > self.entries:
            self._values.popitem(last=False)
        return value

    def clear(self) -> None:
        """Drop every value (its module moved to another device or dtype)."""
        self._values.clear()

    def __len__(self) -> int:
        return len(self._values)
