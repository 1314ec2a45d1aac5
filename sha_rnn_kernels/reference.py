"""The pure-PyTorch SHA-RNN ops: what every kernel is checked against, and the
CPU fallback.

Everything here is plain PyTorch, time-major (``[T, B, E]``), differentiable, and written for
clarity, not speed. Arguments are not validated here; :mod:`sha_rnn_kernels.functional` does that.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

LAYER_NORM_EPS = 1e-12


def gelu(x: Tensor) -> Tensor:
    """The original's GELU approximation: ``x * sigmoid(1.702 x)``."""
    return x * torch.sigmoid(1.702 * x)


def split_and_sum(u: Tensor, width: int) -> Tensor:
    """Sum the ``u.shape[-1] // width`` chunks of width ``width``; trailing columns are dropped."""
    chunks = u.shape[-1] // width
    # reshape, not unflatten: torch.compile cannot trace Tensor.unflatten while a torch function
    # mode is active (torch.set_default_device installs one).
    return u[..., : chunks * width].reshape(*u.shape[:-1], chunks, width).sum(dim=-2)


def boom(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    dropout_p: float = 0.0,
    training: bool = False,
) -> Tensor:
    """``sum_k chunk_k(dropout(gelu(x W^T + b)))``: ``x [..., E]``, ``weight [F, E]`` to
    ``[..., E]``."""
    u = gelu(F.linear(x, weight, bias))
    u = F.dropout(u, dropout_p, training)
    return split_and_sum(u, x.shape[-1])


def causal_memory_mask(
    query_len: int, key_len: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Additive ``[T, K]`` mask: query i sees key j iff ``j <= i + K - T`` (the memory is fully
    visible)."""
    rows = torch.arange(query_len, device=device).unsqueeze(1)
    cols = torch.arange(key_len, device=device).unsqueeze(0)
    hidden = cols > rows + (key_len - query_len)
    mask = torch.zeros(query_len, key_len, device=device, dtype=dtype)
    return mask.masked_fill(hidden, float("-inf"))


def single_head_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    dropout_p: float = 0.0,
    training: bool = False,
    key_gate: Optional[Tensor] = None,
    value_gate: Optional[Tensor] = None,
    value_dropout_p: float = 0.0,
    detached_keys: int = 0,
    segment: Optional[Tensor] = None,
) -> Tensor:
    """One attention head of width E over ``K >= T`` keys, causal with the memory visible.

    ``q [T, B, E]``, ``k, v [K, B, E]`` -> ``[T, B, E]``::

        k' = k * key_gate;  v' = dropout(v * value_gate, value_dropout_p)
        out = dropout(softmax(q k'^T / sqrt(E) + mask), dropout_p) v'

    The first ``detached_keys`` keys and values receive no gradient (the memory of earlier
    segments): k and v are ``cat([k[:n].detach(), k[n:]])``; the gates still see every key.
    With ``segment`` (k and v one tensor), both are ``cat([k[:n].detach(), segment])``.
    """
    query_len, _, width = q.shape
    key_len = k.shape[0]
    if segment is not None:
        k = v = torch.cat([k[:detached_keys].detach(), segment])
    elif detached_keys > 0:
        k = torch.cat([k[:detached_keys].detach(), k[detached_keys:]])
        v = torch.cat([v[:detached_keys].detach(), v[detached_keys:]])
    if key_gate is not None:
        k = k * key_gate
    if value_gate is not None:
        v = v * value_gate
    v = F.dropout(v, value_dropout_p, training)
    qb, kb, vb = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    # The softmax runs in float32 for half inputs (as the original did) and in the input dtype
    # otherwise, so the float64 reference stays float64.
    soft_dtype = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(qb, kb.transpose(1, 2)).to(soft_dtype) / math.sqrt(width)
    # masked_fill, not an additive mask: a NaN or inf in a future key must not reach the rows
    # that cannot see it (NaN + -inf is NaN).
    hidden = causal_memory_mask(query_len, key_len, q.device, soft_dtype) != 0
    scores = scores.masked_fill(hidden, float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(q.dtype)
    weights = F.dropout(weights, dropout_p, training)
    return torch.matmul(weights, vb).transpose(0, 1)


def lstm(
    x: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor] = None,
    bias_hh: Optional[Tensor] = None,
    h0: Optional[Tensor] = None,
    c0: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer with ``torch.nn.LSTM``'s gates (i, f, g, o), one step at a time.

    ``x [T, B, I]``, ``weight_ih [4H, I]``, ``weight_hh [4H, H]``, ``h0, c0 [B, H]`` ->
    ``(out [T, B, H], h_n [B, H], c_n [B, H])``.
    """
    batch = x.shape[1]
    hidden_size = weight_hh.shape[1]
    gates_x = F.linear(x, weight_ih, bias_ih)
    if bias_hh is not None:
        gates_x = gates_x + bias_hh
    h = x.new_zeros(batch, hidden_size) if h0 is None else h0
    c = x.new_zeros(batch, hidden_size) if c0 is None else c0
    outputs = []
    for step in range(x.shape[0]):
        gates = gates_x[step] + h @ weight_hh.t()
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outputs.append(h)
    return torch.stack(outputs), h, c


def lstm_torch(
    x: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor] = None,
    bias_hh: Optional[Tensor] = None,
    h0: Optional[Tensor] = None,
    c0: Optional[Tensor] = None,
    training: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """The same LSTM through PyTorch's fused op (cuDNN on CUDA, ATen on the CPU)."""
    batch = x.shape[1]
    hidden_size = weight_hh.shape[1]
    h = x.new_zeros(1, batch, hidden_size) if h0 is None else h0.unsqueeze(0)
    c = x.new_zeros(1, batch, hidden_size) if c0 is None else c0.unsqueeze(0)
    has_bias = bias_ih is not None or bias_hh is not None
    params = [weight_ih, weight_hh]
    if has_bias:
        zeros = weight_ih.new_zeros(weight_ih.shape[0])
        params += [zeros if bias_ih is None else bias_ih, zeros if bias_hh is None else bias_hh]
    args = (x, (h, c), params, has_bias, 1, 0.0, training, False, False)
    if _is_compiling():
        # torch.compile cannot trace warnings.catch_warnings(); the call itself traces.
        out, h_n, c_n = torch.lstm(*args)
    else:
        with warnings.catch_warnings():
            # cuDNN copies separately stored weights into one buffer (a few MB, microseconds
            # next to the recurrence) and says so on every call; the copy is expected here.
            warnings.filterwarnings("ignore", message="RNN module weights are not part of single")
            out, h_n, c_n = torch.lstm(*args)
    return out, h_n[0], c_n[0]


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and getattr(compiler, "is_compiling", lambda: False)())
