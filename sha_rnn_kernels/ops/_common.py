"""Helpers shared by the Triton op files: output allocation, dtype checks, autotune configs and
autotuned launches that survive CUDA-graph capture."""

from __future__ import annotations

from typing import Optional

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


# --------------------------------------------------------------------------------------------
# autotuning that survives CUDA-graph capture
# --------------------------------------------------------------------------------------------
_TUNED_KEYS: set = set()


def cuda_capability(device: torch.device) -> tuple:
    """``(major, minor)`` of a CUDA device (its index, or the current device)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return tuple(_cuda_capability(index))


# The compute capability that ``target_capability`` reports for ``meta`` tensors: None, except
# while tools/compile_triton.py prunes autotune configs for one target architecture.
META_CAPABILITY: Optional[tuple] = None


def target_capability(device: torch.device) -> Optional[tuple]:
    """The ``(major, minor)`` a launch on ``device`` compiles for: the CUDA device's, the
    ahead-of-time compiler's target for ``meta`` tensors, None otherwise (CPU, interpreter)."""
    if device.type == "cuda":
        return cuda_capability(device)
    if device.type == "meta":
        return META_CAPABILITY
    return None


def rows_bucket(rows: int) -> int:
    """The row count rounded up to a power of two (at least 16): an autotune key entry, so a
    config tuned for 16 rows is not reused for 16384 and the tuner runs once per bucket rather
    than once per distinct row count."""
    return max(16, 1 << max(0, int(rows) - 1).bit_length())


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _first_config(kernel, args: tuple, kwargs: dict):
    configs = list(kernel.configs)
    prune = getattr(kernel, "early_config_prune", None)
    if prune:
        configs = prune(configs, dict(zip(kernel.arg_names, args)), **kwargs)
    config = configs[0]
    if hasattr(config, "all_kwargs"):
        return config.all_kwargs()
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def launch_autotuned(kernel, grid, args: tuple, kwargs: dict, key: tuple, device: torch.device):
    """``kernel[grid](*args, **kwargs)`` for a ``triton.autotune`` kernel, safe inside CUDA-graph
    capture.

    The autotuner benchmarks its configs the first time it sees a key, which synchronises and
    allocates: inside ``torch.cuda.graph`` capture that fails. ``key`` names the launch the way
    the kernel's autotune key does (plus dtypes). Outside capture this launches through the
    autotuner and remembers the key; inside capture, for a key never launched before, it
    launches the first config that survives the kernel's ``early_config_prune`` (the list's
    preferred tile for these arguments) without timing anything, and that choice is what the
    graph replays. Warm up once outside capture to record the tuned config instead.
    """
    if key not in _TUNED_KEYS and _capturing(device):
        kernel.fn[grid](*args, **kwargs, **_first_config(kernel, args, kwargs))
        return
    kernel[grid](*args, **kwargs)
    _TUNED_KEYS.add(key)
