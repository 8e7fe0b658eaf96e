"""Mixed precision in one place: what an ``amp`` mode (``none``, ``bf16``, ``fp16``, ``auto``)
means on a device, for training (``train.amp``) and inference (``--amp`` of ``test``, ``infer``
and ``benchmark``) alike.

``bf16`` autocasts on CUDA and on the CPU; ``fp16`` on CUDA only (training needs the GradScaler,
which only CUDA has; on a CPU the mode computes in fp32); ``auto`` is ``bf16`` where the device
computes bf16 natively and ``none`` elsewhere, where emulated bf16 is slower than fp32.
"""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager, nullcontext

import torch

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


def inference_amp(amp: str, device: torch.device) -> str:
    """The mode ``--amp`` (of ``test``, ``infer``, ``benchmark``) runs with on ``device``:
    checked, ``auto`` resolved, ``fp16`` off CUDA ``none`` (as it computes there), and a
    warning when the mode asked for will not help (:func:`amp_notice`)."""
    mode = resolve_amp(check_amp(amp, "--amp"), device)
    notice = amp_notice(mode, device, "--amp")
    if notice:
        warnings.warn(notice, stacklevel=3)
    return "none" if mode == "fp16" and device.type != "cuda" else mode


def fp32_outputs(output: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detection dict with its floating tensors (boxes, scores) in fp32, as the COCO
    conversion, the drawings and the JSON expect whatever precision the forward ran in."""
    return {k: v.float() if v.is_floating_point() else v for k, v in output.items()}
