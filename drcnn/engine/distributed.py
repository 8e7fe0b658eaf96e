"""Distributed helpers in one place: torchrun initialisation, rank queries, object collectives.

``torchrun`` (``python -m torch.distributed.run``) sets ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE``; :func:`setup` reads them, picks the backend (NCCL on CUDA, gloo on CPU) and the
device of this process. Without those variables everything runs as a single process and every
collective below is a no-op, so the engine code reads the same in both cases.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from drcnn.errors import DrcnnError

T = TypeVar("T")


def is_distributed() -> bool:
    """True inside an initialised process group with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0: the only process that logs, shows progress and writes files."""
    return get_rank() == 0


AUTO_DEVICE = "auto"
DEVICE_CHOICES = "cpu, cuda, cuda:N or auto"


def device_name(device: str | None) -> str:
    """The device a run uses, as a name: ``auto`` (or None) is ``cuda`` when CUDA is available,
    else ``cpu``; any other name is returned as given. The one place ``auto`` is resolved (the
    experiment runner resolves a spec's ``device`` with it too)."""
    if device is None or device == AUTO_DEVICE:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def device_kind(name: str) -> str | None:
    """``cpu`` or ``cuda`` for the name of such a device (``cuda:1`` too), else None."""
    try:
        kind = torch.device(name).type
    except (RuntimeError, TypeError):  # not a device name at all
        return None
    return kind if kind in ("cpu", "cuda") else None


def resolve_device(device: str | None) -> torch.device:
    """The device of this process: ``cuda:<LOCAL_RANK>`` under torchrun on CUDA.

    ``None`` or ``auto`` picks CUDA when available, else the CPU. Asking for CUDA on a machine
    without it, for a GPU index it lacks (``cuda:N``, or more torchrun processes per node than
    GPUs), or for another kind of device, is a user error (a one-line :class:`DrcnnError`),
    not a crash deep inside torch.
    """
    name = device_name(device)
    kind = device_kind(name)
    if kind is None:
        raise DrcnnError(f"--device {name}: expected {DEVICE_CHOICES}")
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DrcnnError(
            f"--device {name}: CUDA is not available on this machine (use --device cpu)"
        )
    index = torch.device(name).index
    source = f"--device {name}"
    if index is None:
        index = int(os.environ.get("LOCAL_RANK", 0))
        source = f"--device {name} with LOCAL_RANK={index} (torchrun's --nproc-per-node)"
    count = torch.cuda.device_count()
    if index >= count:
        raise DrcnnError(
            f"{source}: this process sees {count} CUDA device(s), cuda:0 to cuda:{count - 1} "
            "(CUDA_VISIBLE_DEVICES decides which)"
        )
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def setup(device: str | None = None, timeout_s: float | None = None) -> torch.device:
    """Join the torchrun process group (if launched by torchrun) and return this rank's device.

    ``timeout_s`` (``train.dist_timeout``) bounds how long a collective operation waits for the
    other ranks before it fails (torch's default when None), so a rank that stops answering
    ends the run instead of holding the others forever. Idempotent: a second call (e.g.
    ``train`` then ``test`` in one script) reuses the group and its timeout.
    """
    resolved = resolve_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            device_id=resolved if backend == "nccl" else None,
            timeout=None if timeout_s is None else timedelta(seconds=timeout_s),
        )
    return resolved


def cleanup() -> None:
    """Leave the process group (end of a command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def on_main_process(fn: Callable[..., T], *args: Any) -> T | None:
    """``fn(*args)`` on rank 0 (None elsewhere); a ``DrcnnError`` it raises is raised on every
    rank, so all processes stop together instead of the others waiting in the next collective.
    """
    result, error = None, None
    if is_main_process():
        try:
            result = fn(*args)
        except DrcnnError as exc:
            error = str(exc)
    error = broadcast_object(error)
    if error is not None:
        raise DrcnnError(error)
    return result


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ranks (a detached copy; for logging and the finite check)."""
    values = values.detach().clone()
    if is_distributed():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= get_world_size()
    return values
