"""Backend names and arguments shared by every op (parsing, the environment variable).

Backends:
- ``"reference"``: the pure-PyTorch code of :mod:`sha_rnn_kernels.reference` (any device).
- ``"torch"``: PyTorch's own fused op where one exists (the LSTM: ``torch.lstm``, which is cuDNN
  on CUDA); for the other ops, which PyTorch has no single op for, the reference.
- ``"triton"``: the Triton kernels of :mod:`sha_rnn_kernels.ops` (CUDA tensors, or CPU tensors
  when ``TRITON_INTERPRET=1`` was set before the ops were first imported).
- ``"cuda"``: the CUDA C++ kernels of ``csrc/`` (the persistent LSTM), built on first use. For an
  op without a CUDA C++ kernel (Boom, attention) ``"cuda"`` means that op's Triton kernel, so
  ``backend="cuda"`` asks for "our fastest CUDA code" everywhere.
- ``"auto"``: on CUDA tensors, the first backend of the op's priority order that can take the
  inputs and whose kernel passed its first-use check; elsewhere the reference (PyTorch's own op
  for the LSTM). :mod:`sha_rnn_kernels.dispatch` decides; this module only parses the names.

A backend may be one name for every op or a per-op mapping: a dict such as
``{"lstm": "cuda", "attention": "triton", "boom": "triton"}`` or the same as a string,
``"lstm=cuda,attention=triton"``. Keys are :data:`OPS`; an op the mapping leaves out uses
``"auto"``. The environment variable ``SHA_RNN_KERNELS_BACKEND`` sets the default for
``backend=None`` and takes either form (``SHA_RNN_KERNELS_BACKEND=cuda`` or
``SHA_RNN_KERNELS_BACKEND=lstm=cuda,boom=triton``).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Mapping, Optional, Sequence, Union

import torch

BACKENDS = ("auto", "reference", "torch", "triton", "cuda")
OPS = ("lstm", "attention", "boom")
ENV_VAR = "SHA_RNN_KERNELS_BACKEND"

# A backend argument: a name, a per-op mapping, or a mapping written as "op=name,op=name".
BackendSpec = Union[None, str, Mapping[str, str]]

_warned: set = set()


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run these inputs (the message says why)."""


def _name(value, where: str) -> str:
    if not isinstance(value, str) or value.strip().lower() not in BACKENDS:
        raise ValueError(f"{where} must be one of {BACKENDS}; got {value!r}")
    return value.strip().lower()


def parse_backend(backend: BackendSpec, where: str = "backend") -> Union[str, dict]:
    """Validate a backend argument and return its canonical form.

    Args:
        backend: None (returned as None), a name from :data:`BACKENDS`, a mapping from op names
            (:data:`OPS`) to backend names, or such a mapping written ``"lstm=cuda,boom=triton"``.
        where: what to call the argument in error messages.

    Returns:
        A lower-case name, or a dict ``{op: name}`` holding only the ops that were given.

    Example:
        >>> parse_backend("lstm=cuda, attention=triton")
        {'lstm': 'cuda', 'attention': 'triton'}
    """
    if backend is None:
        return None
    if isinstance(backend, str):
        if "=" not in backend:
            return _name(backend, where)
        pairs = {}
        for item in backend.split(","):
            if not item.strip():
                continue
            op, sep, name = item.partition("=")
            if not sep:
                raise ValueError(
                    f"{where}: {item.strip()!r} is not of the form op=backend (in {backend!r}); "
                    f"write one name, or op=backend pairs separated by commas such as "
                    f"'lstm=cuda,attention=triton'"
                )
            op = op.strip().lower()
            if op in pairs:
                raise ValueError(f"{where}: op {op!r} is given twice in {backend!r}")
            pairs[op] = name
        backend = pairs
    if not isinstance(backend, Mapping):
        raise ValueError(
            f"{where} must be one of {BACKENDS}, a mapping from ops {OPS} to backends, or a "
            f"string such as 'lstm=cuda,attention=triton'; got {type(backend).__name__} "
            f"{backend!r}"
        )
    result = {}
    for op, name in backend.items():
        if not isinstance(op, str) or op.strip().lower() not in OPS:
            raise ValueError(f"{where}: unknown op {op!r}; the ops are {OPS}")
        result[op.strip().lower()] = _name(name, f"{where}[{op.strip().lower()!r}]")
    return result


def format_backend(backend: BackendSpec) -> str:
    """The canonical string form of a backend argument (``"auto"`` for None): a name, or
    ``"op=name,..."`` in the order of :data:`OPS` (what ``--backend`` and the environment take)."""
    spec = parse_backend(backend)
    if spec is None:
        return "auto"
    if isinstance(spec, str):
        return spec
    return ",".join(f"{op}={spec[op]}" for op in OPS if op in spec)


def default_backend() -> Union[str, dict]:
    """The backend used when an op is called with ``backend=None``: ``SHA_RNN_KERNELS_BACKEND``
    (a name or an ``op=name,...`` mapping), else ``"auto"``."""
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return "auto"
    try:
        return parse_backend(value, ENV_VAR)
    except ValueError as exc:
        raise ValueError(f"{exc} (from the environment variable {ENV_VAR})") from None


def backend_for(op: str, backend: BackendSpec) -> str:
    """The backend name ``op`` (one of :data:`OPS`) gets from a backend argument: the name
    itself, the mapping's entry, ``"auto"`` for an op the mapping leaves out, and the
    environment's choice for None."""
    spec = default_backend() if backend is None else parse_backend(backend)
    if isinstance(spec, str):
        return spec
    return spec.get(op, "auto")


def normalize_backend(backend: BackendSpec, allowed: Sequence[str], op: str = "") -> str:
    """Validate a ``backend=`` argument and return the name for ``op`` (a mapping's entry).

    ``allowed``: the backends the op has besides ``"auto"``; ``"cuda"`` is always accepted
    (an op without a CUDA C++ kernel runs its Triton kernel for it).
    """
    name = backend_for(op, backend) if op in OPS else _single(backend)
    if name != "auto" and name not in allowed and name != "cuda":
        raise ValueError(
            f"backend={name!r} does not exist for this op; it has {('auto',) + tuple(allowed)}"
        )
    return name


def _single(backend: BackendSpec) -> str:
    spec = default_backend() if backend is None else parse_backend(backend)
    if not isinstance(spec, str):
        raise ValueError(f"a single backend name is needed here; got the mapping {spec!r}")
    return spec


def is_compiling() -> bool:
    """True while torch.compile (Dynamo) traces the caller."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return bool(compiler.is_compiling())
    return False  # pragma: no cover - torch < 2.3


def capturing(device: torch.device) -> bool:
    """True while a CUDA graph is being captured on the current stream of ``device``."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


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
