"""Run single-threaded torchvision CPU kernels side by side on the intra-op threads.

Some torchvision CPU kernels (``roi_align`` forward and backward, ``nms``) use one core whatever
``torch.get_num_threads()`` says. They release the GIL, so independent calls (chunks of RoIs,
the images of a batch) can run in Python threads; :func:`thread_map` does that with one
process-wide pool.

The workers run their torch ops single-threaded. Each thread that enters an OpenMP parallel
region gets its own OpenMP team, and once a process holds more OpenMP threads than cores, the
OpenMP runtime stops letting idle team threads spin and puts them to sleep between regions. Every
later parallel op in the main thread then pays a wake-up. Measured on 2 cores: one elementwise
op run in two workers made the main thread's later inference 35% slower (synthetic R-18 model,
37 -> 50 ms per image), for the rest of the process. A worker's op is one of several running side
by side anyway, so it gains nothing from a team of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")
_POOL: ThreadPoolExecutor | None = None


def thread_map(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[fn(item) for item in items]`` in order, on up to ``torch.get_num_threads()`` threads.

    Grad mode and CPU autocast are thread-local in PyTorch; the workers run under the caller's,
    so an op behaves as it would in the calling thread (e.g. autocast casts ``nms`` inputs to
    fp32); intra-op parallelism is off in the workers (see the module's docstring). Only worth
    it for CPU kernels that release the GIL.
    """
    threads = torch.get_num_threads()
    workers = min(threads, len(items))
    if workers < 2:
        return [fn(item) for item in items]
    grad = torch.is_grad_enabled()
    autocast = torch.is_autocast_enabled("cpu")
    dtype = torch.get_autocast_dtype("cpu")

    def call(item: T) -> R:
        # set_num_threads sets this thread's OpenMP team size and the default that new threads
        # start with; the caller's own setting is untouched, and the default is put back.
        torch.set_num_threads(1)
        try:
            with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype, enabled=autocast):
                return fn(item)
        finally:
            torch.set_num_threads(threads)

    global _POOL
    if _POOL is None or _POOL._max_workers < workers:
        _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="drcnn-cpu")
    return list(_POOL.map(call, items))


_CPU_PATH: ContextVar[bool] = ContextVar("drcnn_cpu_path", default=True)


def cpu_path(device: torch.device) -> bool:
    """Whether drcnn takes its CPU-only code for tensors on ``device`` (threaded kernels,
    torchvision's per-class NMS loop): on the CPU, unless :func:`device_code_path` is on."""
    return device.type == "cpu" and _CPU_PATH.get()


@contextmanager
def device_code_path() -> Iterator[None]:
    """Run the code an accelerator runs, on the CPU too, inside the block (same results; for
    the synchronisation audit and the tests that compare the two paths)."""
    token = _CPU_PATH.set(False)
    try:
        yield
    finally:
        _CPU_PATH.reset(token)
