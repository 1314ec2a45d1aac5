"""Backend selection shared by every op.

Backends:
- ``"reference"``: the pure-PyTorch code of :mod:`sha_rnn_kernels.reference` (any device).
- ``"torch"``: PyTorch's own fused op where one exists (the LSTM: ``torch.lstm``, which is cuDNN
  on CUDA); for the other ops, which PyTorch has no single op for, the reference.
- ``"triton"``: the Triton kernels of :mod:`sha_rnn_kernels.ops` (CUDA tensors, or CPU tensors
  when ``TRITON_INTERPRET=1`` was set before the ops were first imported).
- ``"cuda"``: the CUDA C++ kernels of ``csrc/`` (the persistent LSTM), built on first use.
- ``"auto"``: on CUDA tensors, the fastest backend that can take the inputs; elsewhere the
  reference (PyTorch's own op for the LSTM). When a CUDA input cannot use any kernel, ``auto``
  falls back to the reference and warns once per op and reason.

The environment variable ``SHA_RNN_KERNELS_BACKEND`` sets the default for ``backend=None``.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Callable, Optional, Sequence

import torch

BACKENDS = ("auto", "reference", "torch", "triton", "cuda")
ENV_VAR = "SHA_RNN_KERNELS_BACKEND"

_warned: set = set()


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run these inputs (the message says why)."""


def default_backend() -> str:
    """The backend used when an op is called with ``backend=None``."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}; got {value!r}")
    return value


def normalize_backend(backend: Optional[str], allowed: Sequence[str]) -> str:
    """Validate a ``backend=`` argument against the backends an op has."""
    if backend is None:
        backend = default_backend()
    if not isinstance(backend, str) or backend.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    backend = backend.lower()
    if backend != "auto" and backend not in allowed:
        raise ValueError(
            f"backend={backend!r} does not exist for this op; it has {('auto',) + tuple(allowed)}"
        )
    return backend


def interpreter_enabled() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TRITON_OP_MODULES = ("boom", "attention", "lstm")
_imported_interpreted: dict = {}


def _ops_imported_interpreted() -> Optional[bool]:
    """Whether the Triton op files already imported defined their kernels for the interpreter
    (``@triton.jit`` reads ``TRITON_INTERPRET`` once, when a kernel is defined); None when no
    op file has been imported yet."""
    for name in _TRITON_OP_MODULES:
        if name in _imported_interpreted:
            return _imported_interpreted[name]
        module = sys.modules.get(f"sha_rnn_kernels.ops.{name}")
        if module is None:
            continue
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        for value in vars(module).values():
            for _ in range(4):  # through @triton.autotune / @triton.heuristics wrappers
                if isinstance(value, (InterpretedFunction, JITFunction)):
                    break
                value = getattr(value, "fn", None)
            if isinstance(value, (InterpretedFunction, JITFunction)):
                _imported_interpreted[name] = isinstance(value, InterpretedFunction)
                return _imported_interpreted[name]
    return None


def triton_reason(device: torch.device) -> Optional[str]:
    """Why Triton kernels cannot run on ``device`` here, or None when they can."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # pragma: no cover - triton ships with torch on Linux
        return f"triton is not importable ({exc})"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreter_enabled():
        if _ops_imported_interpreted() is False:
            return (
                "TRITON_INTERPRET=1 was set after the Triton kernels were imported, and Triton "
                "reads it only when a kernel is defined: set it before importing sha_rnn_kernels "
                "or building a module, in a fresh process (e.g. TRITON_INTERPRET=1 python ...)"
            )
        return None
    return (
        f"Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
        f"import); got tensors on {device}"
    )


def warn_once(key: str, message: str) -> None:
    """Emit ``message`` as a RuntimeWarning the first time ``key`` is seen in this process."""
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def resolve(
    op: str,
    backend: Optional[str],
    device: torch.device,
    reasons: dict[str, Callable[[], Optional[str]]],
    auto_order: Sequence[str],
    cpu_default: str = "reference",
) -> str:
    """Pick the backend that runs ``op``.

    Args:
        op: the op's name, for messages.
        backend: what the caller asked for (None: :func:`default_backend`).
        device: the device of the inputs.
        reasons: for each non-reference backend, a callable returning why it cannot take these
            inputs (None when it can). Called lazily, only for the backends considered.
        auto_order: the backends ``auto`` tries on CUDA tensors, fastest first.
        cpu_default: what ``auto`` uses on non-CUDA tensors.
    """
    allowed = ("reference", "torch") + tuple(reasons)
    backend = normalize_backend(backend, allowed)
    if backend == "torch" and "torch" not in reasons:
        # For ops without a fused PyTorch op of their own, PyTorch's ops are the reference.
        return "reference"
    if backend == "reference":
        return backend
    if backend != "auto":
        reason = reasons[backend]()
        if reason is not None:
            raise BackendUnavailableError(f"{op}: backend={backend!r} cannot run: {reason}")
        return backend
    if device.type != "cuda":
        return cpu_default
    why = []
    for name in auto_order:
        reason = reasons[name]()
        if reason is None:
            return name
        why.append(f"{name}: {reason}")
    warn_once(
        f"{op}:{';'.join(why)}",
        f"sha_rnn_kernels.{op}: no fused kernel can take these inputs, using the PyTorch "
        f"reference ({'; '.join(why)})",
    )
    return "reference"


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype active for ``device_type``, or None when autocast is off."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no device argument
        enabled = torch.is_autocast_enabled() if device_type == "cuda" else False
    if not enabled:
        return None
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device_type)
    return torch.get_autocast_gpu_dtype()  # pragma: no cover


def draw_seed() -> int:
    """A dropout seed from PyTorch's default CPU generator (so ``torch.manual_seed`` fixes it)."""
    return int(torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64).item())
