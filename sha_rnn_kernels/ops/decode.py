"""Single-query attention over the memory, for generation: a split-key Triton kernel.

One new token per stream attends to every key held (``K`` up to ``max_positions``, 5000 in the
paper) of width ``E`` (1024): ``out = softmax((q * gk) . k_j / sqrt(E)) (sum_j ...) k_j * gv``,
keys and values being the same memory rows. The keys are split (flash-decoding):
``_decode_attention_kernel`` runs ``S`` programs per stream (grid ``(S, B)``), each reading a
contiguous range of keys once, using every loaded ``[BLOCK_N, E]`` tile for both the scores and
the weighted sum, and writing a partial ``(max, sum, E-wide accumulator)``;
``_decode_combine_kernel`` merges the ``S`` partials and applies the value gate. The memory is
read from HBM exactly once per step. Inference only: no backward, nothing saved.

Why the keys and not the head dimension are split, and the estimate (method, date):
docs/design/decode.md.
"""

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .._backend import interpreter_enabled
from ._common import empty

# Elements of the [BLOCK_N, E] key tile per thread: 64 fp32 registers at 8 warps.
_TILE_PER_THREAD = 64
_NUM_WARPS = 8
_MAX_SPLITS = 512


@triton.jit
def _decode_attention_kernel(
    Q, K, ACC, M, L,
    key_len, head_dim, keys_per_program, splits,
    stride_qb, stride_kb, stride_kt, stride_ke,
    qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """Partial softmax-weighted sums of one key range for one stream.

    Grid ``(S, B)``: program ``(s, b)`` owns keys ``[s * keys_per_program, ...)`` of stream ``b``
    (``keys_per_program`` is a multiple of BLOCK_N, every range holds at least one key). It loads
    the gated query ``q [E]`` once, then for each ``[BLOCK_N, E]`` key tile computes the scores
    ``k . q * log2(e) / sqrt(E)``, updates a running max ``m`` and sum ``l`` (base 2) and adds
    ``p k`` into an fp32 ``[E]`` accumulator, from the same loaded tile. Writes ``ACC[b, s, :]``
    (unnormalised, scaled to ``m``), ``M[b, s]``, ``L[b, s]``. Nothing is saved for backward.
    """
    split = tl.program_id(0)
    b = tl.program_id(1)
    offs_e = tl.arange(0, BLOCK_E)
    e_valid = offs_e < head_dim
    q = tl.load(Q + b * stride_qb + offs_e, mask=e_valid, other=0.0).to(tl.float32) * qk_scale
    start = split * keys_per_program
    end = tl.minimum(start + keys_per_program, key_len)
    m_i = tl.max(tl.full([BLOCK_N], float("-inf"), dtype=tl.float32), 0)
    l_i = tl.sum(tl.zeros([BLOCK_N], dtype=tl.float32), 0)
    acc = tl.zeros([BLOCK_E], dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < end
        k = tl.load(
            K + b * stride_kb + offs_n[:, None] * stride_kt + offs_e[None, :] * stride_ke,
            mask=n_valid[:, None] & e_valid[None, :], other=0.0,
        ).to(tl.float32)  # fmt: skip
        s = tl.where(n_valid, tl.sum(k * q[None, :], 1), float("-inf"))
        # The first tile of a range holds a valid key, so m_new is finite from then on.
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * k, 0)
        m_i = m_new
    row = b * splits + split
    tl.store(ACC + row * head_dim + offs_e, acc, mask=e_valid)
    tl.store(M + row, m_i)
    tl.store(L + row, l_i)


@triton.jit
def _decode_combine_kernel(
    ACC, M, L, VALUE_GATE, O,
    splits, head_dim, stride_ob,
    HAS_VALUE_GATE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Merge the S partials of one stream: ``out = gv * sum_s 2^(m_s - m) acc_s / sum_s
    2^(m_s - m) l_s`` with ``m = max_s m_s``.

    Grid ``(cdiv(E, BLOCK_D), B)``: program ``(d, b)`` writes columns ``[d BLOCK_D, ...)`` of
    ``O[b]`` in O's dtype. Nothing is saved for backward.
    """
    pid_d = tl.program_id(0)
    b = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    s_valid = offs_s < splits
    m = tl.load(M + b * splits + offs_s, mask=s_valid, other=float("-inf"))
    l = tl.load(L + b * splits + offs_s, mask=s_valid, other=0.0)
    weight = tl.where(s_valid, tl.exp2(m - tl.max(m, 0)), 0.0)
    denominator = tl.sum(weight * l, 0)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_valid = offs_d < head_dim
    acc = tl.load(
        ACC + (b * splits + offs_s)[:, None] * head_dim + offs_d[None, :],
        mask=s_valid[:, None] & d_valid[None, :], other=0.0,
    )  # fmt: skip
    out = tl.sum(weight[:, None] * acc, 0) / denominator
    if HAS_VALUE_GATE:
        out = out * tl.load(VALUE_GATE + offs_d, mask=d_valid, other=0.0).to(tl.float32)
    tl.store(O + b * stride_ob + offs_d, out.to(O.dtype.element_ty), mask=d_valid)


def _program_slots(device: torch.device) -> int:
    if device.type == "cuda" and not interpreter_enabled():
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    key_gate: Optional[torch.Tensor] = None,
    value_gate: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One query per stream over all of ``keys`` (also the values), no mask, no dropout.

    Args:
        q: ``[B, E]`` queries.
        keys: ``[B, K, E]``, any strides (a view of a ring buffer: order does not matter).
        key_gate, value_gate: optional ``[E]`` gates (keys ``k * gk``, values ``k * gv``),
            folded into the query and the output.

    Returns:
        ``[B, E]`` in q's dtype: ``softmax((q gk) . k / sqrt(E)) (k gv)`` per stream.

    Example::

        out = decode_attention(q, ring[:, :count], key_gate=gk, value_gate=gv)
    """
    batch, head_dim = q.shape
    key_len = keys.shape[1]
    if key_gate is not None:
        q = q * key_gate
    q = q.contiguous()
    block_e = triton.next_power_of_2(head_dim)
    block_n = max(1, min(64, _TILE_PER_THREAD * 32 * _NUM_WARPS // block_e))
    target = max(1, min(_MAX_SPLITS, _program_slots(q.device) // batch))
    splits = max(1, min(target, triton.cdiv(key_len, block_n)))
    keys_per_program = triton.cdiv(triton.cdiv(key_len, splits), block_n) * block_n
    splits = triton.cdiv(key_len, keys_per_program)
    acc = empty(batch, splits, head_dim, dtype=torch.float32, device=q.device)
    m = empty(batch, splits, dtype=torch.float32, device=q.device)
    l = empty(batch, splits, dtype=torch.float32, device=q.device)
    _decode_attention_kernel[(splits, batch)](
        q, keys, acc, m, l,
        key_len, head_dim, keys_per_program, splits,
        q.stride(0), keys.stride(0), keys.stride(1), keys.stride(2),
        math.log2(math.e) / math.sqrt(head_dim),
        BLOCK_N=block_n, BLOCK_E=block_e, num_warps=_NUM_WARPS,
    )  # fmt: skip
    out = empty(batch, head_dim, dtype=q.dtype, device=q.device)
    block_s = triton.next_power_of_2(splits)
    block_d = max(16, min(block_e, 8192 // block_s))
    _decode_combine_kernel[(triton.cdiv(head_dim, block_d), batch)](
        acc, m, l, value_gate if value_gate is not None else q, out,
        splits, head_dim, out.stride(0),
        HAS_VALUE_GATE=value_gate is not None, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    return out
