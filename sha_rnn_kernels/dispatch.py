"""The one place that decides which backend runs an op, and runs it.

Modelled on PyTorch's scaled-dot-product-attention selection:

- every backend of an op has a list of **constraints**, functions of the inputs that return why
  the backend cannot take them (or None); an explicitly requested backend whose constraint
  fails raises :class:`~sha_rnn_kernels.BackendUnavailableError` with that reason;
- ``backend="auto"`` walks one **priority order** per op and dtype and takes the first backend
  whose constraints all pass. On CUDA tensors: the LSTM in bf16 ``cuda``, ``torch`` (cuDNN),
  ``triton``, ``reference``; in fp16 and fp32 ``torch``, ``triton``, ``reference``; attention,
  Boom and decode ``triton``, ``reference``. On other devices ``auto`` runs PyTorch
  (``torch.lstm`` for the LSTM, the reference for the rest);
- under ``auto`` a kernel of ours has one more constraint, its **first-use verdict** for the
  (device, dtype, input class): the kernel is used only once its check passed, the check
  running in a child process (see :mod:`sha_rnn_kernels._contained`) the first time the class
  is met, the verdict cached on disk. A failure warns once and ``auto`` moves on;
- :func:`backends` restricts ``auto`` to some backends (like ``torch.nn.attention.sdpa_kernel``),
  and :func:`explain` says, for an op and its inputs, what each backend would do and why.

Why bf16 and fp16 LSTMs differ: PyTorch runs fp16 LSTMs on cuDNN's persistent algorithm at the
paper's shape (cited ~6.2 ms per layer forward + backward on an H100) but bf16 ones step by step
(~19 ms); our kernel is estimated at 2.5-4.2 ms, ~3.1 ms at mid rates (``_cuda.ESTIMATE``:
from byte and FLOP counts and unmeasured L2 rates). fp16 stays on cuDNN's known good path until
a measurement confirms that estimate. Hidden sizes up to 128 stay on cuDNN in every dtype (its
persistent "small H" algorithm). All figures are estimates (docs/design/lstm.md).

Under ``torch.compile`` tracing and CUDA-graph capture no check runs: a verdict already known
(this process or the disk cache) is used, otherwise the kernel is passed over.
``SHA_RNN_KERNELS_FIRST_USE_CHECK=0`` trusts every kernel that can take the inputs.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _backend, _checks, _device_check, reference
from ._backend import BACKENDS, BackendSpec, BackendUnavailableError, warn_once

__all__ = ["backends", "explain", "explain_rows", "select", "preload", "auto_order"]

# Device types on which ``auto`` considers kernels of ours (tests add "cpu", for the interpreter).
AUTO_DEVICES = ("cuda",)

# cuDNN runs LSTMs with hidden sizes up to 128 on its persistent "small H" algorithm in every
# dtype but float64, forward and backward (cuDNN >= 8.2.1; PyTorch's cuDNN RNN algorithm choice).
CUDNN_SMALL_H = 128


class _Op(NamedTuple):
    label: str  # the op's name in messages
    key: str  # its entry in a per-op backend mapping
    backends: Tuple[str, ...]  # the backends that exist for it, besides "auto"
    elsewhere: Tuple[str, ...]  # what "auto" runs on devices outside AUTO_DEVICES
    aliases: Dict[str, str]  # a requested name -> the backend that runs it


_ALIASES = {"cuda": "triton", "torch": "reference"}
_OPS = {
    "lstm": _Op("lstm", "lstm", ("cuda", "torch", "triton", "reference"), ("torch", "reference"),
                {}),
    "attention": _Op("single_head_attention", "attention", ("triton", "reference"),
                     ("reference",), _ALIASES),
    "boom": _Op("boom", "boom", ("triton", "reference"), ("reference",), _ALIASES),
    "decode": _Op("decode attention", "attention", ("triton", "reference"), ("reference",),
                  _ALIASES),
}  # fmt: skip
CHECKED = _checks.CHECKED  # the kernels of ours: (op, backend)


def auto_order(op: str, dtype: torch.dtype) -> Tuple[str, ...]:
    """The backends ``auto`` tries for ``op`` on CUDA tensors of ``dtype``, first choice first."""
    if op == "lstm":
        return ("cuda", "torch", "triton", "reference") if dtype == torch.bfloat16 else (
            "torch", "triton", "reference")  # fmt: skip
    return ("triton", "reference")


class _Quiet(str):
    """A reason ``auto`` passes a backend over for without a warning (a deliberate choice)."""


class _Unchecked(_Quiet):
    """No verdict yet (only :func:`explain` sees this: ``auto`` runs the check instead)."""


# ----------------------------------------------------------------------------------------------
# Constraints: each returns why a backend cannot take the inputs, or None
# ----------------------------------------------------------------------------------------------


def _triton_module(name: str):
    """Import ``sha_rnn_kernels.ops.<name>`` lazily (triton.jit fixes the interpreter mode when
    a kernel is defined). Returns (module, None) or (None, reason)."""
    full_name = f"sha_rnn_kernels.ops.{name}"
    # A plain dict look-up first: torch.compile traces it, while it refuses importlib.
    module = sys.modules.get(full_name)
    if module is not None:
        return module, None
    try:
        return importlib.import_module(full_name), None
    except ImportError as exc:
        return None, f"the Triton {name} kernels cannot be imported ({exc})"


def preload(*names: str) -> None:
    """Import the Triton op files ``names`` (``"boom"``, ``"attention"``, ``"lstm"``) now
    (``torch.compile(fullgraph=True)`` cannot trace the import at the first call). A missing
    Triton is not an error here: the backend then reports why it cannot run."""
    for name in names:
        _triton_module(name)


def _triton(op: str, *tensors: Tensor) -> Optional[str]:
    reason = _backend.triton_reason(tensors[0].device)
    if reason is not None:
        return reason
    module, reason = _triton_module("decode" if op == "decode" else op)
    if module is None:
        return reason
    if op == "decode":
        from .ops._common import dtype_reason

        return dtype_reason(*tensors)
    return module.unsupported_reason(*tensors)


def _cuda_lstm(x: Tensor, weight_ih: Tensor, weight_hh: Tensor) -> Optional[str]:
    if x.device.type != "cuda":
        return f"the CUDA kernels need CUDA tensors; got tensors on {x.device}"
    try:
        from . import _cuda
    except ImportError as exc:
        return f"the CUDA extension loader cannot be imported ({exc})"
    return _cuda.lstm_unsupported_reason(x, weight_ih, weight_hh)


def _small_hidden(x: Tensor, weight_ih: Tensor, weight_hh: Tensor) -> Optional[str]:
    hidden = int(weight_hh.shape[1])
    if hidden <= CUDNN_SMALL_H:
        return _Quiet(f"H = {hidden} <= {CUDNN_SMALL_H}: cuDNN's persistent small-H algorithm")
    return None


# (op, backend) -> constraints of every request; AUTO_CONSTRAINTS: of "auto" only (before the
# first-use verdict, which every kernel of ours has under "auto").
CONSTRAINTS: Dict[Tuple[str, str], Tuple[Callable[..., Optional[str]], ...]] = {
    ("lstm", "cuda"): (_cuda_lstm,),
    ("lstm", "triton"): (lambda *t: _triton("lstm", *t),),
    ("attention", "triton"): (lambda *t: _triton("attention", *t),),
    ("boom", "triton"): (lambda *t: _triton("boom", *t),),
    ("decode", "triton"): (lambda *t: _triton("decode", *t),),
}
AUTO_CONSTRAINTS: Dict[Tuple[str, str], Tuple[Callable[..., Optional[str]], ...]] = {
    ("lstm", "cuda"): (_small_hidden,),
}


def _input_class(op: str, tensors: Sequence[Tensor]) -> Tuple[Tuple[str, int], ...]:
    return _checks.input_class(op, *tensors)


def _known_verdict(op: str, backend: str, device_type: str, index: int, dtype_name: str,
                   shape: tuple) -> int:  # fmt: skip
    """1 passed, 0 failed, -1 unknown: the verdict known for this class (this process or the
    disk cache), running no check. What ``auto`` uses under torch.compile."""
    device = torch.device(device_type, index) if index >= 0 else torch.device(device_type)
    store = _device_check.FIRST_USE
    verdict = store.lookup(store.key(op, backend, device, getattr(torch, dtype_name), shape))
    return -1 if verdict is None else int(verdict.passed)


if hasattr(torch, "compiler") and hasattr(torch.compiler, "assume_constant_result"):
    # Traced as a constant: Dynamo runs it once while tracing (it reads a file) and guards on it.
    _known_verdict = torch.compiler.assume_constant_result(_known_verdict)


def _first_use(op: str, backend: str, tensors: Sequence[Tensor], run: bool) -> Optional[str]:
    """None when the kernel has passed its check for this class (checking it now if ``run``
    and no verdict is known), else why not."""
    device, dtype = tensors[0].device, tensors[0].dtype
    shape = _input_class(op, tensors)
    if not _device_check.checks_enabled():
        return None
    if _device_check.is_compiling() or _device_check.capturing(device):
        index = device.index if device.index is not None else -1
        if _known_verdict(op, backend, device.type, index, str(dtype)[6:], shape) == 1:
            return None
        return _Quiet("no passing first-use verdict is known, and no check runs under "
                      "torch.compile or CUDA-graph capture")  # fmt: skip
    if run:
        from . import _contained

        verdict = _contained.first_use_verdict(op, backend, device, dtype, shape)
    else:
        store = _device_check.FIRST_USE
        verdict = store.lookup(store.key(op, backend, device, dtype, shape))
        if verdict is None:
            return _Unchecked("not checked yet on this device: auto checks it (in a child "
                              "process) at first use")  # fmt: skip
    if verdict.passed:
        return None
    return (f"failed its first-use check on {device} ({verdict.dtype}, "
            f"{' '.join(f'{k}={v}' for k, v in shape)}: {verdict.describe()}); "
            f"`python -m sha_rnn_kernels.check` checks every kernel again and prints why")


def _reason(op: str, backend: str, tensors: Sequence[Tensor], auto: bool,
            run: bool = True) -> Optional[str]:  # fmt: skip
    for constraint in CONSTRAINTS.get((op, backend), ()):
        reason = constraint(*tensors)
        if reason is not None:
            return reason
    if not auto:
        return None
    for constraint in AUTO_CONSTRAINTS.get((op, backend), ()):
        reason = constraint(*tensors)
        if reason is not None:
            return reason
    if (op, backend) in CHECKED:
        return _first_use(op, backend, tensors, run)
    return None


# ----------------------------------------------------------------------------------------------
# Restricting auto
# ----------------------------------------------------------------------------------------------

_allowed: List[Tuple[str, ...]] = []


@contextlib.contextmanager
def backends(*names: str) -> Iterator[None]:
    """Within the block, ``backend="auto"`` only picks among ``names`` (``"cuda"``,
    ``"triton"``, ``"torch"``, ``"reference"``), in its usual order; when none of them can run
    the inputs it raises :class:`~sha_rnn_kernels.BackendUnavailableError`. Explicit backends
    are not affected. Blocks nest (the innermost applies). Not thread-local.

    Example:
        >>> with backends("torch", "reference"):  # auto: no kernel of ours in this block
        ...     pass
    """
    if not names:
        raise ValueError(f"backends() needs at least one of {BACKENDS[1:]}; got none")
    for name in names:
        if not isinstance(name, str) or name not in BACKENDS[1:]:
            raise ValueError(f"backends(): each name must be one of {BACKENDS[1:]}; got {name!r}")
    _allowed.append(tuple(names))
    try:
        yield
    finally:
        _allowed.pop()


def allowed() -> Optional[Tuple[str, ...]]:
    """The backends ``auto`` may pick here (None: all)."""
    return _allowed[-1] if _allowed else None


# ----------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------

_DESCRIBE = {"cuda": "the persistent CUDA kernel", "triton": "the Triton kernel",
             "reference": "the PyTorch reference"}  # fmt: skip


def _describe(op: str, backend: str, device: torch.device) -> str:
    if backend == "torch":
        return "cuDNN (torch.lstm)" if device.type == "cuda" else "torch.lstm"
    return _DESCRIBE[backend]


def _requested(op: str, backend: BackendSpec) -> str:
    return _backend.backend_for(_OPS[op].key, backend)


def _order(op: str, tensors: Sequence[Tensor]) -> Tuple[str, ...]:
    device = tensors[0].device
    if device.type in AUTO_DEVICES:
        return auto_order(op, tensors[0].dtype)
    return _OPS[op].elsewhere


def select(op: str, backend: BackendSpec, *tensors: Tensor) -> str:
    """The backend that runs ``op`` (``"lstm"``, ``"attention"``, ``"boom"``, ``"decode"``) on
    ``tensors`` (x, w_ih, w_hh; q, k, v; x, weight, bias; q, keys) for ``backend`` (a name, a
    per-op mapping or None for the environment). Raises BackendUnavailableError for an explicit
    backend that cannot run them, or when :func:`backends` left ``auto`` nothing that can."""
    info = _OPS[op]
    requested = _requested(op, backend)
    name = info.aliases.get(requested, requested)
    if name != "auto":
        reason = _reason(op, name, tensors, auto=False)
        if reason is not None:
            label = f"{info.label}: backend={requested!r}"
            if requested == "cuda" and name == "triton":
                label += f" (the Triton kernel: {info.label} has no CUDA C++ kernel)"
            raise BackendUnavailableError(f"{label} cannot run: {reason}")
        return name
    restriction = allowed()
    device = tensors[0].device
    if restriction is None and device.type not in AUTO_DEVICES:
        return info.elsewhere[0]
    # The choice is kept per device, dtypes and shapes (all but the first dimension), except
    # where no check can run (a compile trace, a CUDA-graph capture): decided again next time.
    decided = not (_device_check.is_compiling() or _device_check.capturing(device))
    choices = _device_check.FIRST_USE.choices
    if decided:
        choice_key = (op, str(device), restriction, *((t.dtype, tuple(t.shape[1:]))
                                                       for t in tensors if t is not None))
        if choice_key in choices:
            return choices[choice_key]
    chosen, passed_over = _walk(op, tensors, restriction, run=True)
    loud = [f"{b}: {r}" for b, r in passed_over if not isinstance(r, _Quiet)]
    if chosen is None:
        raise BackendUnavailableError(
            f"{info.label}: backend='auto' restricted to {restriction} by "
            f"sha_rnn_kernels.backends() has no backend that can run these inputs ("
            f"{'; '.join(f'{b}: {r}' for b, r in passed_over)})"
        )
    if loud and decided:  # no warning from inside a torch.compile trace
        warn_once(f"{op}:auto:{chosen}:{';'.join(loud)}",
                  f"sha_rnn_kernels.{info.label}: backend='auto' uses "
                  f"{_describe(op, chosen, device)} for these inputs ({'; '.join(loud)})")
    if decided:
        choices[choice_key] = chosen
    return chosen


def _walk(op: str, tensors: Sequence[Tensor], restriction, run: bool):
    """(the first backend of the order that can run, [(backend, reason) passed over])."""
    passed_over = []
    for candidate in _order(op, tensors):
        if restriction is not None and candidate not in restriction:
            passed_over.append((candidate, _Quiet(f"not in backends{restriction}")))
            continue
        reason = _reason(op, candidate, tensors, auto=True, run=run)
        if reason is None or isinstance(reason, _Unchecked):
            return candidate, passed_over
        passed_over.append((candidate, reason))
    return None, passed_over


# ----------------------------------------------------------------------------------------------
# Explain
# ----------------------------------------------------------------------------------------------


def explain_rows(op: str, *tensors: Tensor, backend: BackendSpec = None) -> List[Tuple[str, str]]:
    """For each backend of ``op``, ``(backend, what it would do and why)`` for these inputs and
    ``backend`` (as :func:`select` takes them). Runs no check."""
    if op not in _OPS:
        raise ValueError(f"explain: op must be one of {tuple(_OPS)}; got {op!r}")
    info = _OPS[op]
    requested = _requested(op, backend)
    name = info.aliases.get(requested, requested)
    rows = []
    if name != "auto":
        for candidate in info.backends:
            if candidate != name:
                rows.append((candidate, f"not requested (backend={requested!r})"))
                continue
            reason = _reason(op, candidate, tensors, auto=False)
            rows.insert(0, (candidate, "CHOSEN: requested" if reason is None
                            else f"requested, cannot run (raises): {reason}"))  # fmt: skip
        return rows
    restriction = allowed()
    device = tensors[0].device
    order = _order(op, tensors)
    if device.type not in AUTO_DEVICES:
        note = f"auto runs kernels of ours on {'/'.join(AUTO_DEVICES)} tensors only"
    else:
        note = "not in auto's order for this dtype (explicit request only)"
    chosen, passed_over = _walk(op, tensors, restriction, run=False)
    for candidate, reason in passed_over:
        rows.append((candidate, f"passed over: {reason}"))
    if chosen is not None:
        verdict = _reason(op, chosen, tensors, auto=True, run=False)
        rows.append((chosen, "CHOSEN" + (f" once its check passes ({verdict})" if verdict else "")))
    for candidate in order[len(rows):]:
        rows.append((candidate, "lower priority than the chosen backend"))
    for candidate in info.backends:
        if candidate not in order:
            reason = _reason(op, candidate, tensors, auto=False)
            rows.append((candidate, f"{note}; " + ("can run these inputs" if reason is None
                                                   else f"cannot run them: {reason}")))
    if chosen is None:
        rows.append(("-", f"no backend allowed by backends{restriction} can run these: raises"))
    return rows


def explain(op: str, *tensors: Tensor, backend: BackendSpec = None) -> str:
    """:func:`explain_rows` as text, headed by the op, the inputs and the request.

    Example:
        >>> x, w = torch.randn(5, 8), torch.randn(32, 8)
        >>> print(explain("boom", x, w, None))  # doctest: +ELLIPSIS
        boom on cpu, float32, [5, 8] [32, 8] None, backend='auto':
          reference  CHOSEN
          ...
    """
    shapes = " ".join("None" if t is None else "[" + ", ".join(map(str, t.shape)) + "]"
                      for t in tensors)  # fmt: skip
    head = (f"{_OPS[op].label} on {tensors[0].device}, {str(tensors[0].dtype)[6:]}, {shapes}, "
            f"backend={_backend.format_backend(backend)!r}"
            + (f", restricted to {allowed()}" if allowed() else "") + ":")  # fmt: skip
    rows = explain_rows(op, *tensors, backend=backend)
    width = max(len(b) for b, _ in rows)
    return "\n".join([head] + [f"  {b.ljust(width)}  {text}" for b, text in rows])


# ----------------------------------------------------------------------------------------------
# Running the ops
# ----------------------------------------------------------------------------------------------


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def boom(backend: BackendSpec, x: Tensor, weight: Tensor, bias: Optional[Tensor],
         dropout_p: float, seed: Optional[int]) -> Tensor:  # fmt: skip
    """The Boom on the backend :func:`select` picks (inputs validated by the caller)."""
    name = select("boom", backend, x, weight, bias)
    with _no_autocast(x.device):
        if name == "reference":
            return reference.boom(x, weight, bias, dropout_p, training=dropout_p > 0)
        module, _ = _triton_module("boom")
        if dropout_p > 0 and seed is None:
            seed = _backend.draw_seed()
        return module.boom(x, weight, bias, dropout_p=dropout_p, seed=seed or 0)


def attention(backend: BackendSpec, q: Tensor, k: Tensor, v: Tensor, *, dropout_p: float,
              value_dropout_p: float, key_gate, value_gate, seed: Optional[int],
              detached_keys: int, segment: Optional[Tensor]) -> Tensor:  # fmt: skip
    """Single-head attention on the backend :func:`select` picks."""
    name = select("attention", backend, q, k, v)
    with _no_autocast(q.device):
        if name == "reference":
            return reference.single_head_attention(
                q, k, v, dropout_p=dropout_p, training=dropout_p > 0 or value_dropout_p > 0,
                key_gate=key_gate, value_gate=value_gate, value_dropout_p=value_dropout_p,
                detached_keys=detached_keys, segment=segment,
            )  # fmt: skip
        module, _ = _triton_module("attention")
        if (dropout_p > 0 or value_dropout_p > 0) and seed is None:
            seed = _backend.draw_seed()
        return module.attention(
            q, k, v, key_gate=key_gate, value_gate=value_gate, dropout_p=dropout_p,
            value_dropout_p=value_dropout_p, seed=seed or 0, detached_keys=detached_keys,
            segment=segment,
        )  # fmt: skip


def lstm(backend: BackendSpec, x: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih,
         bias_hh, h0, c0) -> Tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """One LSTM layer on the backend :func:`select` picks: ``(out, h_n [B, H], c_n [B, H])``."""
    name = select("lstm", backend, x, weight_ih, weight_hh)
    args = (x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0)
    with _no_autocast(x.device):
        if name == "reference":
            return reference.lstm(*args)
        if name == "torch":
            return reference.lstm_torch(*args, training=torch.is_grad_enabled())
        if name == "triton":
            module, _ = _triton_module("lstm")
            return module.lstm(*args)
        from . import _cuda

        return _cuda.lstm(*args)


def decode(backend: BackendSpec, q: Tensor, keys: Tensor, key_gate: Tensor,
           value_gate: Tensor) -> Tensor:  # fmt: skip
    """One query per stream over all ``keys`` (generation): ``q [B, E]``, ``keys [B, K, E]`` ->
    ``[B, E]``. Triton's split-key kernel, or PyTorch's fused scaled-dot-product attention."""
    name = select("decode", backend, q, keys)
    if name == "triton":
        module, _ = _triton_module("decode")
        return module.decode_attention(q, keys, key_gate, value_gate)
    out = torch.nn.functional.scaled_dot_product_attention(
        (q * key_gate)[:, None, None], keys.unsqueeze(1), keys.unsqueeze(1)
    )
    return out[:, 0, 0] * value_gate
