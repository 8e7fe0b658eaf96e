"""Run single-threaded torchvision CPU kernels side by side on the intra-op threads.

Some torchvision CPU kernels (``roi_align`` forward and backward, ``nms``) use one core whatever
``torch.get_num_threads()`` says. They release the GIL, so independent calls (chunks of RoIs,
the images of a batch) can run in Python threads; :func:`thread_map` does that with one
process-wide pool.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")
_POOL: ThreadPoolExecutor | None = None


def thread_map(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[fn(item) for item in items]`` in order, on up to ``torch.get_num_threads()`` threads.

    Grad mode and CPU autocast are thread-local in PyTorch; the workers run under the caller's,
    so an op behaves as it would in the calling thread (e.g. autocast casts ``nms`` inputs to
    fp32). Only worth it for CPU kernels that release the GIL.
    """
    workers = min(torch.get_num_threads(), len(items))
    if workers < 2:
        return [fn(item) for item in items]
    grad = torch.is_grad_enabled()
    autocast = torch.is_autocast_enabled("cpu")
    dtype = torch.get_autocast_dtype("cpu")

    def call(item: T) -> R:
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype, enabled=autocast):
            return fn(item)

    global _POOL
    if _POOL is None or _POOL._max_workers < workers:
        _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="drcnn-cpu")
    return list(_POOL.map(call, items))
