"""Count the calls that would make the host wait for a CUDA device, on any device.

Each of these stops the CPU from queuing work ahead of the GPU: a result whose size or value
the host needs (``nonzero`` and one-argument ``where``, boolean-mask indexing, ``unique``,
``repeat_interleave`` without ``output_size``, ``masked_select``, ``bincount``, ``.item()``,
``bool()`` / ``int()`` of a tensor, ``torch.equal``), each ``torchvision::nms`` (its CUDA
kernel copies its mask to the host), a tensor built from Python data on the device (a blocking
copy from the host), and copies to the host (``.tolist()``, ``.cpu()``, ``.numpy()``).
:class:`SyncAudit` counts them with a ``TorchDispatchMode`` (aten ops) and a
``TorchFunctionMode`` (Python-level calls whose device argument the aten op no longer shows),
by op and by the source line that made the call, so the count can be tested on a machine
without a GPU. It is what ``torch.cuda.set_sync_debug_mode`` reports on CUDA, with two
differences: on a CPU run every ``.item()`` counts (also of a host tensor, which would not
wait on CUDA) and a tensor built on the host and moved with ``non_blocking=True`` does not.

drcnn takes CPU-only code on the CPU (threaded RoIAlign and NMS, torchvision's per-class NMS
loop); the audit runs the device code path instead (:func:`drcnn.models.threads.device_code_path`),
so what it counts is what a CUDA run executes.

It also counts the aten ops that launch a kernel on CUDA (``launches``: every op but views,
which only make new tensor metadata, and bare allocations): a training step of the small
synthetic models is bound by the host's kernel launches, not by the GPU, so their number is the
figure a CPU test can hold down for a GPU run.
"""

from __future__ import annotations

import os
import sys
import weakref
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from types import TracebackType
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from drcnn.models.threads import device_code_path

_ATEN = torch.ops.aten

# aten ops that always synchronise on CUDA -> the name they are counted under
ALWAYS_SYNC = {
    _ATEN.nonzero.default: "nonzero",  # also one-argument torch.where, argwhere
    _ATEN.nonzero_numpy.default: "nonzero",
    _ATEN._local_scalar_dense.default: "item",  # .item(), bool(t), int(t), float(t)
    _ATEN.masked_select.default: "masked_select",
    _ATEN._unique.default: "unique",
    _ATEN._unique2.default: "unique",
    _ATEN.unique_dim.default: "unique",
    _ATEN.unique_consecutive.default: "unique",
    _ATEN.unique_dim_consecutive.default: "unique",
    _ATEN.bincount.default: "bincount",
    _ATEN.equal.default: "equal",
}
INDEX_OPS = {
    _ATEN.index.Tensor: "bool-mask index",
    _ATEN.index_put.default: "bool-mask index_put",
    _ATEN.index_put_.default: "bool-mask index_put",
    _ATEN._index_put_impl_.default: "bool-mask index_put",
}
REPEAT_INTERLEAVE = {_ATEN.repeat_interleave.Tensor, _ATEN.repeat_interleave.self_Tensor}
# Python calls that build a tensor from Python data (lists, numbers)
FROM_PYTHON = {torch.tensor, torch.as_tensor, torch.asarray, Tensor.new_tensor}
# Python calls that copy to the host
TO_HOST = {Tensor.tolist: "tolist", Tensor.cpu: "cpu", Tensor.numpy: "numpy"}
MOVES = {Tensor.to, Tensor.cuda}

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_SKIP_FILES = (_TORCH_DIR, __file__)
_SITE = os.path.dirname(os.path.dirname(torch.__file__)) + os.sep
_DRCNN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_PROJECT = os.path.dirname(os.path.dirname(_DRCNN_DIR)) + os.sep


def _short(path: str) -> str:
    """``path`` from its package on (``torchvision/...``, ``drcnn/...``) where it can tell."""
    for root in (_SITE, _PROJECT):
        if path.startswith(root):
            return path[len(root) :]
    return path


def caller_line() -> str:
    """``file:line`` of the innermost frame outside torch itself and this module (torchvision
    counts: the line there that makes the call), followed by the innermost drcnn line that led
    to it when that is another frame."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_SKIP_FILES):
        frame = frame.f_back
    if frame is None:
        return "?"
    where = f"{_short(frame.f_code.co_filename)}:{frame.f_lineno}"
    own = frame
    while own is not None and not own.f_code.co_filename.startswith(_DRCNN_DIR):
        own = own.f_back
    if own is not None and own is not frame:
        where += f" (from {_short(own.f_code.co_filename)}:{own.f_lineno})"
    return where


def _has_bool_index(indices: Any) -> bool:
    """Whether an ``index`` / ``index_put`` index list holds a mask (its size is data)."""
    return any(
        isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()
    )


def dispatch_sync_name(func: Any, args: tuple, kwargs: dict) -> str | None:
    """The name an aten op is counted under when it synchronises, else None."""
    if func in ALWAYS_SYNC:
        return ALWAYS_SYNC[func]
    if func in INDEX_OPS:
        return INDEX_OPS[func] if _has_bool_index(args[1]) else None
    if func in REPEAT_INTERLEAVE:
        return None if kwargs.get("output_size") is not None else "repeat_interleave"
    if func.namespace == "torchvision" and func.__name__.startswith("nms"):
        return "nms"
    return None


# allocations without a kernel (an op returning an alias without writing it is a view)
NO_KERNEL = {
    _ATEN.empty.memory_format,
    _ATEN.empty_strided.default,
    _ATEN.empty_like.default,
    _ATEN.new_empty.default,
    _ATEN.new_empty_strided.default,
}


def launches_kernel(func: Any) -> bool:
    """Whether an aten op runs a kernel on CUDA: not a view (an op whose outputs alias its
    input without writing it: ``view``, ``select``, ``expand``, ``detach``...), not a bare
    allocation, not ``.item()`` (a copy to the host, counted as a synchronisation)."""
    if func in NO_KERNEL or func is _ATEN._local_scalar_dense.default:
        return False
    returns = func._schema.returns
    return not any(r.alias_info is not None and not r.alias_info.is_write for r in returns)


class _DispatchCounter(TorchDispatchMode):
    """aten ops that synchronise (:func:`dispatch_sync_name`), and kernel launches."""

    def __init__(self, record: Callable[[str], None]) -> None:
        super().__init__()
        self.record = record
        self.launches = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = dispatch_sync_name(func, args, kwargs)
        if name is not None:
            self.record(name)
        if launches_kernel(func):
            self.launches += 1
        return func(*args, **kwargs)


class _FunctionCounter(TorchFunctionMode):
    """Python data put on a device (built there, or built on the host and moved blocking);
    copies to the host."""

    def __init__(self, record: Callable[[str], None]) -> None:
        super().__init__()
        self.record = record
        self.host_built: dict[int, weakref.ref[Tensor]] = {}  # by id: no tensor __eq__

    def _host_built(self, tensor: Any) -> bool:
        ref = self.host_built.get(id(tensor))
        return ref is not None and ref() is tensor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in FROM_PYTHON:
            data = args[1] if func is Tensor.new_tensor else (args[0] if args else None)
            if not isinstance(data, Tensor):
                if func is Tensor.new_tensor or kwargs.get("device") is not None:
                    self.record("tensor from Python data on the device")
                elif isinstance(out, Tensor):
                    self.host_built[id(out)] = weakref.ref(out)
        elif func in TO_HOST:
            self.record(TO_HOST[func])
        elif func in MOVES and args and self._host_built(args[0]):
            moves = (
                func is Tensor.cuda
                or kwargs.get("device") is not None
                or any(isinstance(a, (torch.device, str, Tensor)) for a in args[1:])
            )
            if moves and not kwargs.get("non_blocking", False):
                self.record("blocking copy of Python data to the device")
        return out


class SyncAudit:
    """Context manager counting synchronising calls: ``counts`` (by op), ``lines`` (by source
    line), ``total``; :meth:`report` is a readable table. ``launches``: the aten ops of the
    block that launch a kernel on CUDA (:func:`launches_kernel`).

    ``device_path=True`` (default) runs drcnn's device code path on the CPU for the block.
    """

    def __init__(self, device_path: bool = True) -> None:
        self.device_path = device_path
        self.events: list[tuple[str, str]] = []
        self._stack: ExitStack | None = None
        self._dispatch: _DispatchCounter | None = None

    def _record(self, name: str) -> None:
        self.events.append((name, caller_line()))

    def __enter__(self) -> SyncAudit:
        self._stack = ExitStack()
        if self.device_path:
            self._stack.enter_context(device_code_path())
        self._stack.enter_context(_FunctionCounter(self._record))
        self._dispatch = self._stack.enter_context(_DispatchCounter(self._record))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._stack is not None
        self._stack.close()

    @property
    def total(self) -> int:
        return len(self.events)

    @property
    def launches(self) -> int:
        """Kernel-launching aten ops counted so far."""
        return self._dispatch.launches if self._dispatch is not None else 0

    @property
    def counts(self) -> Counter[str]:
        """Synchronising calls by op name."""
        return Counter(name for name, _ in self.events)

    @property
    def lines(self) -> Counter[str]:
        """Synchronising calls by ``op @ file:line``."""
        return Counter(f"{name} @ {line}" for name, line in self.events)

    def report(self) -> str:
        """``total`` and one line per (op, source line), most frequent first."""
        rows = [f"{self.total} synchronising calls"]
        rows += [f"{n:5d}  {key}" for key, n in self.lines.most_common()]
        return "\n".join(rows)
