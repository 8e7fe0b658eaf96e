"""A watchdog that turns a stuck training run into an error instead of an endless wait.

A run can stop making progress without failing: a data-loader worker that never starts, a rank
waiting in a collective for a peer that is gone, a file system that stopped answering. The
training loop tells the :class:`Watchdog` what it is waiting for and reports progress (a
finished step, an evaluation batch); a thread ends the process once no progress came for
``train.stall_timeout`` seconds, with one line naming the rank, the iteration and the wait.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable


def exit_with_error(message: str) -> None:
    """Write ``error: message`` to file descriptor 2 and end the process with status 2.

    Why not an exception in the main thread: a stuck main thread usually waits inside C code (a
    queue read in the DataLoader, a gloo/NCCL collective, a file write), where
    ``_thread.interrupt_main`` or a signal handler would only run once that call returns, that
    is never. ``os._exit`` ends the process from this thread whatever the main thread does. It
    runs no cleanup: the work-dir lock is a flock and dies with the process, loader workers and
    the fork server exit when their parent is gone, a half-written checkpoint is only a temp
    file (removed by the next run in that work dir), and torchrun stops the other ranks when
    one exits non-zero. The line goes straight to the descriptor, not through ``sys.stderr``,
    so a lock the main thread holds on that stream's buffer cannot block it.
    """
    os.write(2, f"error: {message}\n".encode())
    os._exit(2)


class Watchdog:
    """Ends the run when :meth:`progress` was not called for ``timeout_s`` seconds.

    ``timeout_s <= 0`` turns it off (nothing starts). ``expire`` receives the one-line message;
    the default :func:`exit_with_error` ends the process (tests pass a recorder).
    """

    def __init__(
        self,
        timeout_s: float,
        rank: int,
        expire: Callable[[str], None] = exit_with_error,
    ) -> None:
        self.timeout_s, self.rank, self.expire = timeout_s, rank, expire
        self.what, self.iteration = "the start of training", 0
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Watchdog:
        """Start watching (a daemon thread) unless the watchdog is off; returns ``self``."""
        if self.timeout_s > 0 and self._thread is None:
            self._last = time.monotonic()
            self._thread = threading.Thread(target=self._watch, name="drcnn-watchdog", daemon=True)
            self._thread.start()
        return self

    def waiting(self, what: str, iteration: int) -> None:
        """Record what the loop waits for now (e.g. "the next batch from the loader") and the
        iteration counter; not progress by itself."""
        self.what, self.iteration = what, iteration

    def progress(self) -> None:
        """Something finished (a training step, an evaluation batch): restart the clock."""
        self._last = time.monotonic()

    def stop(self) -> None:
        """Stop watching (end of training, or an error that is already on its way out)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _watch(self) -> None:
        poll = min(max(self.timeout_s / 20, 0.01), 5.0)
        while not self._stop.wait(poll):
            if time.monotonic() - self._last > self.timeout_s:
                self.expire(
                    f"training stalled: rank {self.rank} made no progress for "
                    f"{self.timeout_s:g} s at iteration {self.iteration}, waiting for "
                    f"{self.what} (train.stall_timeout; 0 turns this check off)"
                )
                return
