"""The SHA-RNN ops as functions: validate, then hand over to the dispatcher.

Each function checks every argument (the message names the argument, what was expected and what
was received), casts to the autocast dtype when autocast is on, and calls
:mod:`sha_rnn_kernels.dispatch`, which picks the backend and runs it. ``backend=None`` means the
environment variable ``SHA_RNN_KERNELS_BACKEND``, or ``"auto"`` when it is unset. ``backend``
may also be a per-op mapping (``{"lstm": "cuda", "attention": "triton"}`` or
``"lstm=cuda,attention=triton"``): each function takes its own entry (``"lstm"``,
``"attention"``, ``"boom"``) and ``"auto"`` when its op is left out. ``"cuda"`` for Boom and
attention, which have no CUDA C++ kernel, runs their Triton kernels.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _backend, dispatch

__all__ = ["boom", "single_head_attention", "lstm"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------
def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _check_tensor(op: str, name: str, t, ndim: Optional[int] = None, min_ndim: int = 0) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} must be float16, bfloat16, float32 or float64; got {t.dtype}"
        )
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions; got shape {_shape(t)}")
    if t.dim() < min_ndim:
        raise ValueError(
            f"{op}: {name} must have at least {min_ndim} dimensions; got shape {_shape(t)}"
        )


def _check_same(op: str, named: Sequence[tuple[str, Optional[Tensor]]], check_dtype: bool) -> None:
    present = [(n, t) for n, t in named if t is not None]
    first_name, first = present[0]
    for name, t in present[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but {first_name} is on {first.device}; "
                f"all tensors must be on one device"
            )
        if check_dtype and t.dtype != first.dtype:
            raise TypeError(
                f"{op}: {name} has dtype {t.dtype} but {first_name} has {first.dtype}; "
                f"use one dtype (or autocast)"
            )


def check_probability(name: str, p, op: Optional[str] = None) -> float:
    """``p`` as a float in [0, 1), else a ValueError naming ``name`` (and ``op``)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) < 1.0:
        prefix = f"{op}: " if op else ""
        raise ValueError(f"{prefix}{name} must be a float in [0, 1); got {p!r}")
    return float(p)


def describe(t) -> str:
    """A tensor's shape as ``[a, b, c]``, or the type name of anything else (for messages)."""
    return _shape(t) if isinstance(t, Tensor) else type(t).__name__


def _check_seed(op: str, seed) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"{op}: seed must be a non-negative int or None; got {seed!r}")


def _autocast(tensors: Sequence[Optional[Tensor]]) -> tuple[list, bool]:
    """Cast floating tensors to the active autocast dtype. Returns (tensors, autocast_was_on)."""
    device_type = next(t for t in tensors if t is not None).device.type
    dtype = _backend.autocast_dtype(device_type)
    if dtype is None:
        return list(tensors), False
    return [None if t is None else t.to(dtype) for t in tensors], True


def preload(*names: str) -> None:
    """Import the Triton op files ``names`` (``"boom"``, ``"attention"``, ``"lstm"``) now.

    The ops are imported on first use, which ``torch.compile(fullgraph=True)`` cannot trace;
    the modules call this when they are built. Call it yourself before compiling a function
    that uses :mod:`sha_rnn_kernels.functional` directly. A missing Triton is not an error here
    (the backend then reports why it cannot run).
    """
    dispatch.preload(*names)


# --------------------------------------------------------------------------------------------
# Boom
# --------------------------------------------------------------------------------------------
def boom(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    dropout: float = 0.0,
    training: bool = False,
    backend: Optional[str] = None,
    seed: Optional[int] = None,
) -> Tensor:
    """The Boom feed-forward: ``sum_k chunk_k(dropout(gelu(x W^T + b)))``.

    GELU is ``x * sigmoid(1.702 x)``; the ``F``-wide activation is cut into ``F // E`` chunks of
    width ``E`` that are summed (trailing ``F % E`` columns are dropped).

    Args:
        x: ``[..., E]`` input.
        weight: ``[F, E]`` with ``F >= E``.
        bias: ``[F]`` or None.
        dropout: probability of dropping an element of the activation (when ``training``).
        training: apply dropout.
        backend: ``"auto"``, ``"reference"``, ``"torch"`` (= the reference), ``"triton"`` or
            ``"cuda"`` (= the Triton kernel), or a per-op mapping (its ``"boom"`` entry); None
            reads the environment.
        seed: dropout seed for the Triton kernel (default: drawn from torch's CPU generator).

    Returns:
        ``[..., E]``.

    Example:
        >>> x, w = torch.randn(5, 8), torch.randn(32, 8)
        >>> boom(x, w).shape
        torch.Size([5, 8])
    """
    op = "boom"
    _check_tensor(op, "x", x, min_ndim=1)
    _check_tensor(op, "weight", weight, ndim=2)
    if bias is not None:
        _check_tensor(op, "bias", bias, ndim=1)
    width = x.shape[-1]
    if weight.shape[1] != width:
        raise ValueError(
            f"{op}: weight must be [F, E] with E = x.shape[-1] = {width}; got {_shape(weight)}"
        )
    if weight.shape[0] < width:
        raise ValueError(
            f"{op}: weight's F = {weight.shape[0]} must be >= E = {width} (the output sums "
            f"F // E chunks of width E)"
        )
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(f"{op}: bias must be [F] = [{weight.shape[0]}]; got {_shape(bias)}")
    if width == 0:
        raise ValueError(f"{op}: x's last dimension E must be >= 1; got shape {_shape(x)}")
    p = check_probability("dropout", dropout, op)
    _check_seed(op, seed)
    (x, weight, bias), autocast_on = _autocast([x, weight, bias])
    _check_same(op, [("x", x), ("weight", weight), ("bias", bias)], check_dtype=not autocast_on)
    p = p if training else 0.0

    return dispatch.boom(backend, x, weight, bias, p, seed)


# --------------------------------------------------------------------------------------------
# Single-head attention
# --------------------------------------------------------------------------------------------
def _gate(op: str, name: str, gate: Optional[Tensor], width: int) -> Optional[Tensor]:
    if gate is None:
        return None
    _check_tensor(op, name, gate)
    if gate.numel() != width or (gate.dim() > 0 and gate.shape[-1] != width):
        raise ValueError(f"{op}: {name} must have E = {width} elements; got shape {_shape(gate)}")
    return gate.reshape(width)


def _gates_like(op: str, q: Tensor, key_gate, value_gate) -> tuple:
    """The gates on q's device (else an error) in q's dtype."""
    for name, gate in (("key_gate", key_gate), ("value_gate", value_gate)):
        if gate is not None and gate.device != q.device:
            raise ValueError(f"{op}: {name} is on {gate.device} but q is on {q.device}")
    # The gates are parameters kept in float32; the kernels take them in q's dtype.
    return tuple(None if g is None else g.to(q.dtype) for g in (key_gate, value_gate))


def _is_view_of(a: Tensor, b: Tensor) -> bool:
    """``a`` and ``b`` are the same elements of one storage (metadata only; False while
    torch.compile traces, where fake tensors have no storage to compare)."""
    if _backend.is_compiling():
        return False
    return (
        a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
        and a.device == b.device
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and a.storage_offset() == b.storage_offset()
    )


_SAME_SIZE_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _check_segment_is_tail(op: str, tail_view: bool, k: Tensor, n: int, segment: Tensor) -> None:
    """``segment`` must hold ``k[n:]``'s values: the kernel reads the keys from ``k`` but sends
    their gradient to ``segment``, so another tensor would get a gradient it did not cause (and
    the real segment none). The bits are compared, so a NaN equals itself (a copy made by
    ``torch.cat`` keeps every bit). Eagerly: one read of both and a ``ValueError``; under
    torch.compile or CUDA-graph capture, where a host sync is not allowed, an asynchronous
    device assert."""
    if tail_view:
        return
    int_dtype = _SAME_SIZE_INT[k.element_size()]
    tail, seg = k[n:].view(int_dtype), segment.view(int_dtype)
    message = (
        f"{op}: segment must hold the values of k[detached_keys:] = k[{n}:] (k = v = "
        f"cat([memory, segment])), but it differs from them: its gradient would be that of "
        f"another tensor. Pass the segment that k was built from (or no segment)"
    )
    if _backend.is_compiling() or _backend.capturing(k.device):
        torch._assert_async(torch.eq(tail, seg).all(), message)
    elif not torch.equal(tail, seg):
        raise ValueError(message)


def _check_attention_shapes(
    op: str, q: Tensor, k: Tensor, v: Tensor, segment: Optional[Tensor], detached_keys,
    batch_first: bool,
) -> int:
    """Shapes of time-major q, k, v and segment (messages in the caller's layout); returns E."""
    layout = "[B, {}, E]" if batch_first else "[{}, B, E]"
    query_len, batch, width = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have one shape; got {_shape(k)} and {_shape(v)}")
    key_len = k.shape[0]
    if k.shape[1] != batch or k.shape[2] != width:
        raise ValueError(
            f"{op}: k must be {layout.format('K')} with B = {batch}, E = {width} (from q); "
            f"got {_shape(k.transpose(0, 1) if batch_first else k)}"
        )
    if query_len < 1 or batch < 1 or width < 1:
        raise ValueError(f"{op}: q must have T, B, E >= 1; got {_shape(q)}")
    if key_len < query_len:
        raise ValueError(
            f"{op}: k must hold at least as many keys as there are queries (K >= T, the segment's "
            f"own keys come last); got K = {key_len}, T = {query_len}"
        )
    if (
        isinstance(detached_keys, bool)
        or not isinstance(detached_keys, int)
        or not 0 <= detached_keys <= key_len
    ):
        raise ValueError(
            f"{op}: detached_keys must be an int in [0, K = {key_len}]; got {detached_keys!r}"
        )
    if segment is not None and tuple(segment.shape) != (key_len - detached_keys, batch, width):
        raise ValueError(
            f"{op}: segment must be {layout.format('K - detached_keys')} = "
            f"{layout.format(key_len - detached_keys)} with B = {batch}, E = {width}; got "
            f"{_shape(segment.transpose(0, 1) if batch_first else segment)}"
        )
    return width


def single_head_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    dropout: float = 0.0,
    training: bool = False,
    batch_first: bool = False,
    backend: Optional[str] = None,
    key_gate: Optional[Tensor] = None,
    value_gate: Optional[Tensor] = None,
    value_dropout: float = 0.0,
    seed: Optional[int] = None,
    detached_keys: int = 0,
    segment: Optional[Tensor] = None,
    _segment_is_tail: bool = False,
) -> Tensor:
    """One attention head of width ``E`` over ``K >= T`` keys (memory, then the segment).

    Query ``i`` (0-based within the segment) sees keys ``j <= i + K - T``: all of the memory and
    the segment up to itself. Scale ``1/sqrt(E)``. Every row sees at least one key, so no row of
    the softmax is empty.

    Args:
        q: ``[T, B, E]`` (``[B, T, E]`` with ``batch_first``).
        k, v: ``[K, B, E]`` (``[B, K, E]`` with ``batch_first``), ``K >= T``.
        dropout: dropout on the attention weights (when ``training``).
        training: apply the dropouts.
        batch_first: layout of q, k, v and of the result.
        backend: ``"auto"``, ``"reference"``, ``"torch"`` (= the reference), ``"triton"`` or
            ``"cuda"`` (= the Triton kernel), or a per-op mapping (its ``"attention"`` entry);
            None reads the environment.
        key_gate: optional ``[E]`` gate multiplying every key (the SHA-RNN's ``sigmoid(ks)``).
        value_gate: optional ``[E]`` gate multiplying every value.
        value_dropout: elementwise dropout on the gated values (when ``training``).
        seed: dropout seed for the Triton kernel (default: drawn from torch's CPU generator).
        detached_keys: ``0 <= n <= K``: the first n keys and values receive no gradient (the
            memory of earlier segments); the result is that of ``cat([k[:n].detach(), k[n:]])``
            (and the same for v), so the gates' gradients still include them. The Triton
            backward skips their share of the dK and dV products.
        segment: optional, for keys and values that are one tensor ``kv = cat([memory,
            segment])`` with ``detached_keys = len(memory)`` (an SHA-RNN layer's memory and the
            current segment): pass ``k = v = kv`` and ``segment``, and the gradient of keys and
            values ``n..`` goes to ``segment`` (as ``dk + dv``), none to ``kv``. The result is
            that of ``cat([kv[:n].detach(), segment])`` for both keys and values; the Triton
            backward then never writes zero rows for the memory nor a [K, B, E] dk and dv for
            autograd to add. ``[K - n, B, E]`` (``[B, K - n, E]`` with ``batch_first``).
            ``kv[n:]`` must hold ``segment``'s values, or a ``ValueError`` says so: free when
            ``segment`` is the view ``kv[n:]``, otherwise one comparison of their bits (a read
            of both and, on a GPU, one sync; under torch.compile or CUDA-graph capture an
            asynchronous device assert instead). ``SHALayer``, which builds ``kv`` from the
            segment itself, skips it.

    Returns:
        ``[T, B, E]`` (``[B, T, E]`` with ``batch_first``).

    Example:
        >>> q, kv = torch.randn(4, 2, 8), torch.randn(10, 2, 8)
        >>> single_head_attention(q, kv, kv).shape
        torch.Size([4, 2, 8])
    """
    op = "single_head_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(op, name, t, ndim=3)
    same_kv = v is k
    if segment is not None:
        _check_tensor(op, "segment", segment, ndim=3)
        if not same_kv:
            raise ValueError(
                f"{op}: segment needs k and v to be one tensor (cat([memory, segment]), passed "
                f"twice); got two tensors"
            )
    if batch_first:
        q, k = q.transpose(0, 1), k.transpose(0, 1)
        v = k if same_kv else v.transpose(0, 1)
        segment = None if segment is None else segment.transpose(0, 1)
    width = _check_attention_shapes(op, q, k, v, segment, detached_keys, batch_first)
    # Whether the caller passed segment as the view kv[n:] (checked on the tensors as given,
    # before autocast makes copies of both).
    check_tail = segment is not None and not _segment_is_tail
    tail_view = check_tail and _is_view_of(segment, k[detached_keys:])
    key_gate = _gate(op, "key_gate", key_gate, width)
    value_gate = _gate(op, "value_gate", value_gate, width)
    p = check_probability("dropout", dropout, op)
    pv = check_probability("value_dropout", value_dropout, op)
    _check_seed(op, seed)
    (q, k, v, segment), autocast_on = _autocast([q, k, None if same_kv else v, segment])
    if same_kv:
        v = k
    _check_same(
        op, [("q", q), ("k", k), ("v", v), ("segment", segment)], check_dtype=not autocast_on
    )
    if check_tail:
        _check_segment_is_tail(op, tail_view, k, detached_keys, segment)
    key_gate, value_gate = _gates_like(op, q, key_gate, value_gate)
    if not training:
        p = pv = 0.0

    out = dispatch.attention(
        backend, q, k, v, dropout_p=p, value_dropout_p=pv, key_gate=key_gate,
        value_gate=value_gate, seed=seed, detached_keys=detached_keys, segment=segment,
    )  # fmt: skip
    return out.transpose(0, 1) if batch_first else out


# --------------------------------------------------------------------------------------------
# LSTM
# --------------------------------------------------------------------------------------------
def _check_state(op: str, name: str, t, batch: int, hidden_size: int) -> Tensor:
    _check_tensor(op, name, t)
    given = _shape(t)  # the shape as passed, not the squeezed one
    if t.dim() == 3 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 2 or tuple(t.shape) != (batch, hidden_size):
        raise ValueError(
            f"{op}: {name} must be [1, B, H] = [1, {batch}, {hidden_size}] (or [B, H]) with "
            f"B = {batch}, H = {hidden_size} (B from x, H from weight_hh); got {given}"
        )
    return t


def lstm(
    x: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor] = None,
    bias_hh: Optional[Tensor] = None,
    state: Optional[tuple[Tensor, Tensor]] = None,
    *,
    batch_first: bool = False,
    backend: Optional[str] = None,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One LSTM layer with ``torch.nn.LSTM``'s semantics (gates i, f, g, o).

    Args:
        x: ``[T, B, I]`` (``[B, T, I]`` with ``batch_first``).
        weight_ih: ``[4H, I]``; weight_hh: ``[4H, H]``; bias_ih, bias_hh: ``[4H]`` or None.
        state: ``(h0, c0)``, each ``[B, H]`` or ``[1, B, H]``; None starts from zeros.
        batch_first: layout of ``x`` and of the output.
        backend: ``"auto"``, ``"reference"`` (a step loop), ``"torch"`` (``torch.lstm``: cuDNN
            on CUDA), ``"triton"`` or ``"cuda"`` (the persistent CUDA C++ kernel), or a per-op
            mapping (its ``"lstm"`` entry); None reads the environment. On CUDA tensors
            ``"auto"`` runs bfloat16 on the persistent CUDA kernel where it fits and has passed
            its first-use check on the device, everything else on cuDNN (the reasons are in
            :mod:`sha_rnn_kernels.dispatch`); elsewhere it runs ``torch.lstm``. An explicit
            ``"cuda"`` runs no first-use check.

    Returns:
        ``(out, (h_n, c_n))``: ``out [T, B, H]`` (``[B, T, H]`` with ``batch_first``),
        ``h_n, c_n [1, B, H]`` as ``torch.nn.LSTM`` returns them.

    Example:
        >>> H, I = 6, 4
        >>> out, (h, c) = lstm(torch.randn(5, 2, I), torch.randn(4 * H, I), torch.randn(4 * H, H))
        >>> out.shape, h.shape
        (torch.Size([5, 2, 6]), torch.Size([1, 2, 6]))
    """
    op = "lstm"
    _check_tensor(op, "x", x, ndim=3)
    _check_tensor(op, "weight_ih", weight_ih, ndim=2)
    _check_tensor(op, "weight_hh", weight_hh, ndim=2)
    if batch_first:
        x = x.transpose(0, 1)
    steps, batch, input_size = x.shape
    if steps < 1 or batch < 1:
        raise ValueError(f"{op}: x must have T >= 1 and B >= 1; got {_shape(x)}")
    gates, hidden_size = weight_hh.shape[0], weight_hh.shape[1]
    if gates != 4 * hidden_size or hidden_size < 1:
        raise ValueError(f"{op}: weight_hh must be [4H, H]; got {_shape(weight_hh)}")
    if weight_ih.shape[0] != gates:
        raise ValueError(
            f"{op}: weight_ih must be [4H, I] with 4H = {gates} (from weight_hh); got "
            f"{_shape(weight_ih)}"
        )
    if weight_ih.shape[1] != input_size:
        raise ValueError(
            f"{op}: x's last dimension (the input size) is {input_size} but weight_ih is "
            f"{_shape(weight_ih)}: x must be [T, B, {weight_ih.shape[1]}] for this weight_ih, "
            f"or weight_ih must be [4H, I] = [{gates}, {input_size}] for this x"
        )
    for name, b in (("bias_ih", bias_ih), ("bias_hh", bias_hh)):
        if b is not None:
            _check_tensor(op, name, b, ndim=1)
            if b.shape[0] != gates:
                raise ValueError(f"{op}: {name} must be [4H] = [{gates}]; got {_shape(b)}")
    h0 = c0 = None
    if state is not None:
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise TypeError(f"{op}: state must be a pair (h0, c0); got {type(state).__name__}")
        h0 = _check_state(op, "state[0] (h0)", state[0], batch, hidden_size)
        c0 = _check_state(op, "state[1] (c0)", state[1], batch, hidden_size)
    tensors, autocast_on = _autocast([x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0])
    x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0 = tensors
    _check_same(
        op,
        [("x", x), ("weight_ih", weight_ih), ("weight_hh", weight_hh), ("bias_ih", bias_ih),
         ("bias_hh", bias_hh), ("h0", h0), ("c0", c0)],
        check_dtype=not autocast_on,
    )  # fmt: skip

    out, h_n, c_n = dispatch.lstm(backend, x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0)
    if batch_first:
        out = out.transpose(0, 1)
    return out, (h_n.unsqueeze(0), c_n.unsqueeze(0))
