"""Mixed precision in one place: what an ``amp`` mode (``none``, ``bf16``, ``fp16``, ``auto``)
means on a device, for training (``train.amp``) and inference (``--amp`` of ``test``, ``infer``
and ``benchmark``) alike.

``bf16`` autocasts on CUDA and on the CPU; ``fp16`` on CUDA only (training needs the GradScaler,
which only CUDA has; on a CPU the mode computes in fp32); ``auto`` is ``bf16`` where the device
computes bf16 natively and ``none`` elsewhere, where emulated bf16 is slower than fp32.

Training autocasts the whole forward pass. Inference autocasts only the backbone (trunk and FPN,
most of the arithmetic) and hands its features on in fp32 (:func:`inference_autocast`): with
the RPN and RoI heads in bf16 too, rounding reorders near-tied proposal and class scores, and
the AP of the main job's checkpoints moved by up to 0.5 points either way against fp32.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from drcnn.config import AMP_MODES
from drcnn.errors import DrcnnError


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (x86 AVX512-BF16 or AMX), as oneDNN needs."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def check_amp(amp: str, setting: str) -> str:
    """``amp`` if it names a mode, else the one-line error ``<setting>: expected one of ...``."""
    if amp not in AMP_MODES:
        raise DrcnnError(f"{setting}: expected one of {', '.join(AMP_MODES)}, got {amp!r}")
    return amp


def resolve_amp(amp: str, device: torch.device) -> str:
    """The mode as a run uses it: ``auto`` becomes ``bf16`` where ``device`` computes bf16
    natively (a CUDA GPU that supports it, a CPU with AVX512-BF16 or AMX) and ``none`` elsewhere,
    where emulated bf16 is slower than fp32; any other mode is kept as asked."""
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "none"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "none"


def amp_notice(amp: str, device: torch.device, setting: str = "train.amp") -> str | None:
    """Why the (resolved) mode ``amp``, given as ``setting``, will not speed a run up on
    ``device``, or None when it should."""
    if amp == "fp16" and device.type != "cuda":
        return (
            f"{setting}=fp16 needs CUDA (GradScaler): this run computes in fp32; bf16 works on CPU"
        )
    if amp == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        return (
            f"{setting}=bf16 on a CPU without native bf16 (AVX512-BF16 or AMX) is emulated and "
            f"can be slower than fp32: set {setting}=none if it is slow"
        )
    return None


def autocast(amp: str, device: torch.device) -> AbstractContextManager:
    """Autocast for the resolved mode ``amp`` on ``device``: bf16 on CUDA or CPU, fp16 on CUDA;
    a no-op otherwise."""
    if amp == "bf16" and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if amp == "fp16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


@contextmanager
def inference_autocast(model: nn.Module, amp: str, device: torch.device) -> Iterator[None]:
    """While open, ``model.backbone`` runs under :func:`autocast` for the resolved mode ``amp``
    and returns its features in fp32, so the RPN, the RoI heads and post-processing compute in
    fp32; a no-op for ``none``. The backbone is autocast by forward hooks, removed on exit.

    Why not the whole model: on the main job's checkpoints and 100 val images (a 2-core Intel
    Xeon with AMX, native bf16), bf16 everywhere moved AP by +0.18 (Faster R-CNN) and +0.21
    (Decoupled R-CNN) points, with 95% bootstrap intervals over the images of about +-0.6; with
    the heads in fp32 the changes were +0.11 and +0.05, intervals about +-0.2 (README, "bf16
    inference")."""
    cast = autocast(amp, device)
    if isinstance(cast, nullcontext):
        yield
        return

    def enter(module: nn.Module, args: Any) -> None:
        cast.__enter__()

    def leave(module: nn.Module, args: Any, features: Any) -> Any:
        cast.__exit__(None, None, None)
        if features is None:  # the backbone raised; the hook only closes the autocast
            return None
        return {name: f.float() for name, f in features.items()}

    handles = [
        model.backbone.register_forward_pre_hook(enter),
        model.backbone.register_forward_hook(leave, always_call=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def inference_amp(amp: str, device: torch.device) -> str:
    """The mode ``--amp`` (of ``test``, ``infer``, ``benchmark``) runs with on ``device``:
    checked, ``auto`` resolved, ``fp16`` off CUDA ``none`` (as it computes there), and a
    warning when the mode asked for will not help (:func:`amp_notice`)."""
    mode = resolve_amp(check_amp(amp, "--amp"), device)
    notice = amp_notice(mode, device, "--amp")
    if notice:
        warnings.warn(notice, stacklevel=3)
    return "none" if mode == "fp16" and device.type != "cuda" else mode
