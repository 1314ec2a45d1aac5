"""Helpers shared by the Triton op files: output allocation, dtype checks, autotune configs."""

from __future__ import annotations

import torch

from .._backend import interpreter_enabled

_POISON_OUTPUTS = False

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def set_poison_outputs(enabled: bool) -> bool:
    """Fill every buffer from :func:`empty` with NaN (tests). Returns the previous setting."""
    global _POISON_OUTPUTS
    previous = _POISON_OUTPUTS
    _POISON_OUTPUTS = bool(enabled)
    return previous


def empty(*shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs; NaN-filled while output poisoning is on, so an
    element a kernel never writes shows up in tests."""
    out = torch.empty(*shape, dtype=dtype, device=device)
    if _POISON_OUTPUTS and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def dtype_reason(*tensors: torch.Tensor) -> str | None:
    """Why the kernels cannot take these dtypes, or None."""
    for t in tensors:
        if t is not None and t.dtype not in KERNEL_DTYPES:
            return f"the kernels take float32, float16 and bfloat16; got {t.dtype}"
    return None


def _cuda_capability(index: int) -> tuple:
    return torch.cuda.get_device_capability(index)


if hasattr(torch, "compiler") and hasattr(torch.compiler, "assume_constant_result"):
    # A device property: torch.compile may fold it instead of tracing into torch.cuda.
    _cuda_capability = torch.compiler.assume_constant_result(_cuda_capability)


def capability_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why a GPU cannot run the kernels' tensor-core dots in ``dtype``, or None.

    Triton's bfloat16 dots need compute capability 8.0 (Ampere) or newer.
    """
    if device.type != "cuda" or dtype != torch.bfloat16 or interpreter_enabled():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = _cuda_capability(index)
    if (major, minor) < (8, 0):
        return f"bfloat16 tensor-core dots need compute capability >= 8.0; {device} has {major}.{minor}"
    return None


def autotune_configs(configs, interpreter_config):
    """The autotune list: ``configs`` on a GPU, the single ``interpreter_config`` under the
    interpreter (autotuning there only multiplies the run time)."""
    return [interpreter_config] if interpreter_enabled() else list(configs)
