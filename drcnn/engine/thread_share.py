"""CPU threads shared among the steps that ``drcnn run --jobs N`` runs at once.

Each running step gets ``cpu_count // running`` threads (at least 1): two 2-thread trainings on
2 cores would fight over the cores, and OpenMP teams slow down many-fold when oversubscribed.
A step's process starts with its share in ``OMP_NUM_THREADS``. A training also follows the share
while it runs: the runner (:class:`ThreadShare`) rewrites a one-number file whenever the number
of running steps changes, and the training loop reads it once per iteration
(:func:`follow_thread_share`, the file named by ``DRCNN_THREAD_SHARE``), so a training that
outlives the steps beside it takes the cores they leave. In ``make demo`` on a 2-core CPU,
Decoupled R-CNN's training runs alone for its last 120 or so of 480 iterations, after Faster
R-CNN's training, test and study share: about 1.05 s per iteration on two threads against 1.8 s
on one (README, "make demo", runs 11 and 12).

The thread count changes the order of floating-point sums inside the kernels, so such a
training's rounding depends on when the other steps ended; its recipe does not.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

import torch

from drcnn.io import atomic_write_text

SHARE_ENV = "DRCNN_THREAD_SHARE"
SHARED_ENV = ("OMP_NUM_THREADS", SHARE_ENV)


def threads_per_step(running: int) -> int:
    """Threads for each of ``running`` steps on this machine's cores (at least 1)."""
    return max(1, (os.cpu_count() or 1) // max(1, running))


class ThreadShare:
    """The runner's side, a context manager: while open, this process's environment (which the
    step processes it starts inherit) holds ``OMP_NUM_THREADS`` for ``jobs`` steps at once and
    ``DRCNN_THREAD_SHARE``, the path of the share file in a temporary folder; :meth:`running`
    rewrites the file. On exit the environment is restored and the folder removed."""

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self.folder: Path | None = None
        self.saved: dict[str, str | None] = {}

    @property
    def path(self) -> Path:
        if self.folder is None:
            raise RuntimeError("ThreadShare: used outside its with block")
        return self.folder / "threads"

    def __enter__(self) -> ThreadShare:
        self.folder = Path(tempfile.mkdtemp(prefix="drcnn-threads-"))
        self.saved = {name: os.environ.get(name) for name in SHARED_ENV}
        self.running(self.jobs)
        os.environ["OMP_NUM_THREADS"] = str(threads_per_step(self.jobs))
        os.environ[SHARE_ENV] = str(self.path)
        return self

    def running(self, count: int) -> None:
        """``count`` steps run now: each may use ``threads_per_step(count)`` threads."""
        atomic_write_text(self.path, str(threads_per_step(count)))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for name, value in self.saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def follow_thread_share() -> None:
    """In a step's process: set torch's intra-op thread count to the share the runner last
    wrote, if it changed. Nothing happens outside ``drcnn run --jobs N`` (no share file named)
    or when the file cannot be read (the runner is rewriting or has removed it)."""
    path = os.environ.get(SHARE_ENV)
    if not path:
        return
    try:
        threads = int(Path(path).read_text())
    except (OSError, ValueError):
        return
    if threads >= 1 and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
