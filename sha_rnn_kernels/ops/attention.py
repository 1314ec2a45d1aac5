"""Single-head attention over a memory cache: cuBLAS products, fused Triton row passes.

One head whose dimension is the model width E (1024 in the paper), queries ``q [T, B, E]``
against keys and values ``[K, B, E]`` (memory followed by the segment, K >= T). Query i sees key
j iff ``j <= i + K - T``: every memory key and the segment up to itself. Since K >= T, key 0 is
visible to every query, so no row is ever fully masked. With the optional gates ``gk, gv [E]``:
``out = gv * (dropout(softmax((q * gk) k^T / sqrt(E) + mask)) dropout(v))``.

Every large product runs once on cuBLAS (``torch.bmm`` / ``baddbmm_``, fp32 accumulation)
straight on the time-major tensors; the rest runs in fused, memory-bound Triton passes:

- forward (``_attention_fwd.py``): ``S = (q * gk) k^T``; ``_attention_fwd_kernel`` writes the
  row log-sum-exp and P over S or, with attention dropout, the dropped ``P_d`` (S kept);
  ``O_u = P_d W`` with ``W = dropout(v)``; ``O = O_u * gv``.
- backward (``_attention_bwd.py``): ``dO_g = dO * gv``, ``delta = rowsum(dO * O)``, ``dgv``;
  ``dP = dO_g W^T``; ``_attention_bwd_kernel`` turns it in place into
  ``dS = P * (keep/(1-p) * dP - delta) / sqrt(E)``; then ``dW = P_d^T dO_g``, ``dQ_g = dS k``,
  ``dk = dS^T (q * gk)``; ``dv = dW * keep_v / (1-p_v)``; ``dq = dQ_g * gk``, ``dgk``.
- shared (``_attention_common.py``): the query plan, the score buffers, the gate-row kernel
  (``_attention_bwd_preprocess_kernel``) and ``_attention_value_dropout_kernel``.

Grids: the row passes ``(cdiv(rows, BLOCK_M) * B,)``, a program owning BLOCK_M query rows of one
batch; the gate pass ``(cdiv(L*B, BLOCK_R),)`` over the rows of an ``[L, B, E]`` tensor; the value
dropout ``(cdiv(K'*B, BLOCK_R), cdiv(E, BLOCK_E))``. No atomics: every output element is written by
one program or one GEMM, so dq, dk and dv are deterministic. The queries run in
``TRIANGLE_BLOCKS`` (4) blocks, each against the keys it can see, so every product skips 3/8 of
the segment's T x T triangle.

Saved for the backward: with attention dropout the raw scores S and ``P_d``, without it P,
each ``[B, T, pad(K)]`` (K rounded up to 16); the base-2 row log-sum-exp ``[B, T]`` fp32;
``O_u`` (with a value gate), the dropped values W (with value dropout) and ``q * gk`` (with a
key gate). Dropout masks are never saved: they are drawn from the seed on global indices
(eight flags per Philox call), the same however the queries are chunked.

``detached_keys = n``: the first n keys and values (the memory of earlier segments) get no
gradient, exactly as for ``cat([k[:n].detach(), k[n:]])``: their rows of dk and dv are zero and
no product touches them. ``segment=``: with ``k is v = cat([memory, segment])``, the gradient of
keys and values ``n..`` reaches the segment as one tensor ``dk + dv`` (``SHALayer`` uses it).

Limits: the scores are materialised (164 MB in bf16 at the paper shape). When one [B, T, K]
buffer would exceed ``SCORE_BUDGET_BYTES`` (512 MiB), the queries run in chunks, the forward
saves only the log-sum-exp and the backward recomputes S (one extra product; dk and dv take one
extra rounding per chunk in fp16/bf16). Dropout probabilities are rounded to a multiple of
2**-16. Always causal with the memory fully visible; no other mask.

The design (why the scores are materialised, the derivations of the detached keys and the
segment form), the FLOP, byte and instruction budgets, the estimates with their method and
date, and the alternatives weighed: docs/design/attention.md.
"""

import sys
import types
from typing import Optional, Tuple

import torch

from .._backend import triton_reason

# The kernels and launchers live in the files below; this module is the op's one address, so it
# names them all: tools/compile_triton.py and _backend's interpreter-mode check find the kernels
# here, the tests the query plan.
from . import _attention_common
from ._attention_bwd import _attention_bwd_kernel, attention_backward  # noqa: F401
from ._attention_common import (
    TRIANGLE_BLOCKS,
    _attention_bwd_preprocess_kernel,  # noqa: F401
    _attention_value_dropout_kernel,  # noqa: F401
    _fits,
    _pad,
    _plan,  # noqa: F401
    _triangle_blocks,  # noqa: F401
)
from ._attention_fwd import _attention_fwd_kernel, attention_forward  # noqa: F401
from ._common import capability_reason, dtype_reason

__all__ = [
    "attention",
    "unsupported_reason",
    "attention_forward",
    "attention_backward",
    "SCORE_BUDGET_BYTES",  # noqa: F822 - a property of the module class (below)
    "TRIANGLE_BLOCKS",
]



class _OpModule(types.ModuleType):
    """This module's class: ``SCORE_BUDGET_BYTES`` (the largest [B, T_chunk, K_chunk] score
    buffer, in bytes; larger problems run in chunks of queries) is the setting kept in
    ``_attention_common``, which plans the chunks; reading or setting it here reaches that one
    copy, so the parts need not import this module back."""

    @property
    def SCORE_BUDGET_BYTES(self) -> int:  # noqa: N802 - a module constant's name
        return _attention_common.SCORE_BUDGET_BYTES

    @SCORE_BUDGET_BYTES.setter
    def SCORE_BUDGET_BYTES(self, value: int) -> None:  # noqa: N802
        _attention_common.SCORE_BUDGET_BYTES = int(value)


sys.modules[__name__].__class__ = _OpModule


@torch.library.custom_op("sha_rnn_kernels::attention_fwd", mutates_args=())
def _attention_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_gate: Optional[torch.Tensor],
    value_gate: Optional[torch.Tensor],
    dropout_p: float,
    value_dropout_p: float,
    seed: int,
    detached_keys: int,
    segment: Optional[torch.Tensor] = None,
) -> Tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    # detached_keys and segment are in the schema for the autograd context (segment: where the
    # gradient of keys and values detached_keys.. goes); the forward reads every key of k and v.
    return attention_forward(q, k, v, key_gate, value_gate, dropout_p, value_dropout_p, seed)


@_attention_fwd_op.register_fake
def _(q, k, v, key_gate, value_gate, dropout_p, value_dropout_p, seed, detached_keys,
      segment=None):
    seq_len, batch, width = q.shape
    key_len = k.shape[0]
    single = _fits(batch, seq_len, key_len, q.dtype)
    nothing = lambda: q.new_empty(0)  # noqa: E731
    return (
        q.new_empty(seq_len, batch, width),
        q.new_empty(seq_len, batch, width) if value_gate is not None else nothing(),
        q.new_empty(batch, seq_len, _pad(key_len)) if single else nothing(),
        q.new_empty(batch, seq_len, _pad(key_len)) if single and dropout_p > 0.0 else nothing(),
        q.new_empty(batch, seq_len, dtype=torch.float32),
        q.new_empty(key_len, batch, width) if value_dropout_p > 0.0 else nothing(),
        q.new_empty(seq_len, batch, width) if key_gate is not None else nothing(),
    )


@torch.library.custom_op("sha_rnn_kernels::attention_bwd", mutates_args=())
def _attention_bwd_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_gate: Optional[torch.Tensor],
    value_gate: Optional[torch.Tensor],
    out: torch.Tensor,
    out_ungated: torch.Tensor,
    probs: torch.Tensor,
    dropped: torch.Tensor,
    lse: torch.Tensor,
    values: torch.Tensor,
    q_gated: torch.Tensor,
    dropout_p: float,
    value_dropout_p: float,
    seed: int,
    detached_keys: int,
    combine: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(
        grad_out, q, k, v, key_gate, value_gate, out, out_ungated, probs, dropped, lse, values,
        q_gated, dropout_p, value_dropout_p, seed, detached_keys, combine,
    )


@_attention_bwd_op.register_fake
def _(grad_out, q, k, v, key_gate, value_gate, out, out_ungated, probs, dropped, lse, values,
      q_gated, dropout_p, value_dropout_p, seed, detached_keys, combine):
    def gate_grad(gate):
        return gate.new_empty(gate.shape) if gate is not None else q.new_empty(0)

    if combine:
        segment_shape = (k.shape[0] - detached_keys, *k.shape[1:])
        keys, values = q.new_empty(segment_shape), q.new_empty(0)
    else:
        keys, values = k.new_empty(k.shape), v.new_empty(v.shape)
    return q.new_empty(q.shape), keys, values, gate_grad(key_gate), gate_grad(value_gate)


def _setup_context(ctx, inputs, output):
    q, k, v, key_gate, value_gate, dropout_p, value_dropout_p, seed, detached_keys, segment = inputs
    ctx.save_for_backward(q, k, v, key_gate, value_gate, *output)
    ctx.combine = segment is not None
    ctx.dropout = (dropout_p, value_dropout_p, seed, detached_keys, ctx.combine)
    ctx.has_gates = (key_gate is not None, value_gate is not None)


def _backward(ctx, grad_out, *unused):
    q, k, v, key_gate, value_gate, *saved = ctx.saved_tensors
    dq, dk, dv, dkg, dvg = _attention_bwd_op(
        grad_out, q, k, v, key_gate, value_gate, *saved, *ctx.dropout
    )
    has_key_gate, has_value_gate = ctx.has_gates
    gates = (dkg if has_key_gate else None, dvg if has_value_gate else None)
    if ctx.combine:  # dk holds the segment's gradient (dk + dv of keys detached_keys..)
        return (dq, None, None, *gates, None, None, None, None, dk)
    return (dq, dk, dv, *gates, None, None, None, None, None)


_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    """Why these kernels cannot take these (already validated) inputs, or None."""
    reason = dtype_reason(q, k, v) or triton_reason(q.device)
    if reason is not None:
        return reason
    if q.numel() == 0 or k.numel() == 0:
        return f"empty inputs (q {tuple(q.shape)}, k {tuple(k.shape)})"
    return capability_reason(q.device, q.dtype)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_gate: Optional[torch.Tensor],
    value_gate: Optional[torch.Tensor],
    dropout_p: float,
    value_dropout_p: float,
    seed: int,
    detached_keys: int = 0,
    segment: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Single-head causal attention over memory + segment (cuBLAS + Triton), differentiable.

    Args:
        q: queries ``[T, B, E]``; k, v: keys and values ``[K, B, E]`` with K >= T (memory first,
            then the segment); any strides, one dtype (fp32, fp16, bf16), one device.
        key_gate, value_gate: ``[E]`` gates in q's dtype (any strides), or None. The keys are
            ``k * key_gate``, the values ``dropout(v * value_gate, value_dropout_p)``.
        dropout_p: dropout on the attention weights; value_dropout_p: elementwise dropout on the
            gated values; seed: the Philox seed of both (drawn by the caller).
        detached_keys: ``0 <= n <= K``: the first n keys and values receive no gradient (the
            memory of earlier segments), as if the op ran on ``cat([k[:n].detach(), k[n:]])``
            (and the same for v). Their rows of dk and dv are exactly zero and cost no product;
            the gates' and q's gradients still include them.
        segment: optional ``[K - n, B, E]`` tensor holding the same values as ``k[n:]``, with
            ``k`` and ``v`` one tensor (``cat([memory, segment])``, as an SHA-RNN layer builds
            it). The keys' and values' gradients then go to ``segment`` as one tensor,
            ``dk[n:] + dv[n:]``, and k and v get none: no zero rows for the memory and no
            separate [K, B, E] dk and dv for autograd to add up. The values of ``k[n:]`` are
            what the op reads; keeping them equal to ``segment`` is the caller's part.

    Returns:
        ``[T, B, E]`` contiguous: ``dropout(softmax(q k_eff^T / sqrt(E) + causal mask)) @ v_eff``,
        where query i sees keys ``j <= i + K - T``.

    Example::

        out = attention(q, k, v, key_gate=None, value_gate=None, dropout_p=0.0,
                        value_dropout_p=0.0, seed=0)
    """
    # The kernels read the gates as contiguous [E] vectors (a strided or expanded gate is copied).
    key_gate = key_gate.contiguous() if key_gate is not None else None
    value_gate = value_gate.contiguous() if value_gate is not None else None
    if not 0 <= detached_keys <= k.shape[0]:
        raise ValueError(f"detached_keys must be in [0, K = {k.shape[0]}]; got {detached_keys}")
    if segment is not None:
        expected = (k.shape[0] - detached_keys, *k.shape[1:])
        if tuple(segment.shape) != expected:
            raise ValueError(
                f"segment must be [K - detached_keys, B, E] = {list(expected)}; "
                f"got {list(segment.shape)}"
            )
        if segment.dtype != k.dtype or segment.device != k.device:
            raise ValueError(
                f"segment must match k's dtype and device ({k.dtype}, {k.device}); "
                f"got {segment.dtype}, {segment.device}"
            )
        if v is not k:
            raise ValueError("segment needs k and v to be one tensor (pass the same tensor twice)")
        # The op reads k; the gradient goes to segment only.
        k = v = k.detach()
    outputs = _attention_fwd_op(
        q, k, v, key_gate, value_gate, float(dropout_p), float(value_dropout_p), int(seed),
        int(detached_keys), segment,
    )
    return outputs[0]
