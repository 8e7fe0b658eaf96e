"""thread_map: order, caller's thread-local torch state in the workers, no OpenMP teams of their
own, serial with one thread."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from torchvision.ops import batched_nms

from drcnn.models.threads import thread_map


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def state(item: int) -> tuple[int, bool, bool, str]:
    return (
        item,
        torch.is_grad_enabled(),
        torch.is_autocast_enabled("cpu"),
        threading.current_thread().name,
    )


def test_workers_run_under_the_callers_grad_mode_and_autocast(threads):
    threads(2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = thread_map(state, list(range(6)))
    assert [g[0] for g in got] == list(range(6))
    assert all(g[1:3] == (False, True) for g in got)
    assert any(g[3].startswith("drcnn-cpu") for g in got)
    # bf16 boxes: autocast makes nms compute in fp32, as it does in the calling thread
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30.0]]).bfloat16()
    scores = torch.tensor([0.9, 0.8, 0.7]).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        keeps = thread_map(lambda t: batched_nms(boxes, scores, torch.zeros(3), t), [0.5, 0.9])
    assert [k.tolist() for k in keeps] == [[0, 2], [0, 1, 2]]


def test_one_thread_runs_in_the_caller(threads):
    threads(1)
    got = thread_map(state, [1, 2])
    assert [g[3] for g in got] == [threading.current_thread().name] * 2


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_workers_start_no_openmp_threads_and_leave_the_thread_count_alone(threads):
    """An intra-op-parallel op in a worker must not give the worker an OpenMP team: extra teams
    put the main thread's idle OpenMP threads to sleep between ops (slower from then on)."""
    threads(2)
    big = torch.rand(1 << 20)
    big + 1  # the main thread's own OpenMP team exists from here on
    both = threading.Barrier(2, timeout=10)
    thread_map(lambda _: both.wait(), [0, 1])  # both pool threads exist from here on
    before = os_threads()
    sums = thread_map(lambda _: (big + 1).sum(), [0, 1])
    assert os_threads() == before
    assert torch.stack(sums).tolist() == pytest.approx([float((big + 1).sum())] * 2)
    assert torch.get_num_threads() == 2
    seen = []
    worker = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    worker.start()
    worker.join()
    assert seen == [2]  # new threads still start with the caller's setting
