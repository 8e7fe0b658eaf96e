"""Run in a subprocess by tests/test_hostile_training.py: the training loader's iterator is
re-created many times while other threads run, one of them holding a lock the samples need.

Importable by name (``python -c "import loader_stress; loader_stress.main(...)"``): loader
workers that do not fork the parent find :class:`PidDataset` by its module name.

Why a held lock: a forked worker is a copy of the parent taken while its other threads run, so a
lock one of them holds at that moment stays held in the worker forever. The hang of issue 10 was
CPython's own thread-state lock (held for the instant a thread starts or ends, hence once in 7
runs); :data:`LOCK`, held by a thread for the whole run, makes the same hazard certain: a worker
forked from this process blocks on its first sample. A worker started from a fork server (or
spawned) has its own fresh copy of the lock and does not.
"""

from __future__ import annotations

import io
import json
import os
import sys
import threading
import time

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from drcnn.config import load_config
from drcnn.engine.data_order import TrainingLoader
from drcnn.models.threads import thread_map

LOCK = threading.Lock()


class PidDataset(Dataset):
    """Sample ``i`` is ``[pid of the process that loaded it, i]``, loaded under :data:`LOCK`."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, index: int) -> torch.Tensor:
        with LOCK:
            return torch.tensor([os.getpid(), index])


def busy_threads(stop: threading.Event) -> list[threading.Thread]:
    """What runs beside a training loop: a thread pool at work (thread_map), threads that
    start and end all the time, and a thread holding :data:`LOCK` throughout."""

    def pool_work() -> None:
        while not stop.is_set():
            thread_map(lambda x: (x @ x).sum().item(), [torch.rand(32, 32) for _ in range(4)])

    def churn() -> None:
        while not stop.is_set():
            thread = threading.Thread(target=time.sleep, args=(0.001,))
            thread.start()
            thread.join()

    def hold_lock() -> None:
        with LOCK:
            stop.wait()

    threads = [threading.Thread(target=f, daemon=True) for f in (pool_work, churn, hold_lock)]
    for thread in threads:
        thread.start()
    return threads


def main(rounds: int, workers: int = 2) -> None:
    """Re-create the iterator ``rounds`` times (new epochs and mid-epoch restarts, taking a few
    batches each time, as epochs, evaluations and resumes do); print the worker pids seen."""
    torch.set_num_threads(2)  # thread_map uses torch's thread count
    cfg = load_config(None, [f"data.workers={workers}", "data.batch_size=2"])
    base = DataLoader(PidDataset(), num_workers=workers)  # gives its dataset and worker count
    loader = TrainingLoader(base, cfg, torch.device("cpu"))
    stop = threading.Event()
    threads = busy_threads(stop)
    bar = tqdm(total=rounds, file=io.StringIO(), mininterval=0)  # starts tqdm's monitor thread
    pids: set[int] = set()
    for round_ in range(rounds):
        batches = loader.epoch(round_ % 3, round_ % 4)
        for _ in range(3):
            pids.update(next(batches)[:, 0].tolist())
        bar.update(1)
    bar.close()
    stop.set()
    for thread in threads:
        thread.join()
    context = loader.loader.multiprocessing_context
    result = {"pids": sorted(pids), "start_method": context.get_start_method(), "me": os.getpid()}
    print(json.dumps(result))
    sys.stdout.flush()
