"""The attention's forward: the softmax row pass (:func:`_attention_fwd_kernel`) and the launcher
that runs it between the cuBLAS products (:func:`attention_forward`). See :mod:`.attention`.
"""

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._attention_common import (
    _batch_major,
    _buffer_size,
    _device_guard,
    _drop_values,
    _fits,
    _gate_rows,
    _launch_rows,
    _no_autocast,
    _pad,
    _plan,
    _row_block,
    _scaled_scores,
    _scores_view,
    _tile,
)
from ._common import empty
from ._dropout import drop_below, keep_flags, keep_scale


@triton.jit
def _attention_fwd_kernel(
    S, P, PD, LSE,
    rows, key_cols, cols_pad, stride_b, stride_row, seq_len, key_len, batch, row0, memory_len,
    qk_scale, drop_below, keep_scale, seed,
    ATTN_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Softmax row pass over the raw scores of one chunk of queries.

    ``S [B, rows, key_cols]`` (strides ``stride_b, stride_row, 1``, shared by P and PD) holds
    ``(q*gk) . k`` for queries ``row0 + r`` and keys ``0..key_cols-1``. With
    ``P = softmax_j(S * log2(e)/sqrt(E) + mask)`` (base 2, fp32 statistics), it writes the base-2
    row log-sum-exp to ``LSE [B, T]`` and either (ATTN_DROPOUT) the dropped
    ``P_d = keep * P / (1-p)`` to ``PD``, leaving S as it is (backward recomputes P from S and
    LSE: one store per score instead of two), or P to ``P`` (may be S itself: each program reads
    its rows before it overwrites them). Keep flags: ``_dropout.keep_flags`` on row
    ``b*T + query``, ``cdiv(K, 8)`` counters per row. Rows are read and written in whole vectors
    up to ``cols_pad`` (``key_cols`` rounded up to 16, within the row stride): masked (future)
    scores are replaced by -inf before any arithmetic, so a NaN in a future key cannot reach a
    row; their P (P_d) is written as 0.
    Grid ``(cdiv(rows, BLOCK_M) * B,)``; a program owns BLOCK_M rows of one batch and walks their
    keys twice: running per-lane max and sum over the visible keys, then the probabilities over
    all ``key_cols``. P_d is computed from the rounded P, so the backward's recomputation
    (``P`` from S and LSE, or the saved P) gives the same P_d bit for bit.
    Saved for backward: LSE, and P or (with ATTN_DROPOUT) S and P_d in the one-buffer path
    (chunked: backward recomputes S).
    """
    pid = tl.program_id(0)
    b, block, offs_m, m_valid, query, n_visible, row_offs = _row_block(
        pid, rows, row0, memory_len, key_cols, stride_b, stride_row, BLOCK_M
    )
    # The block's last row sees the most keys; nothing past it is read.
    last = tl.minimum((block + 1) * BLOCK_M, rows)
    end_n = tl.minimum(key_cols, row0 + last + memory_len)

    run_max = tl.full([BLOCK_M, BLOCK_N], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start_n in range(0, end_n, BLOCK_N):
        offs, in_row, visible = _tile(start_n, m_valid, n_visible, row_offs, cols_pad, BLOCK_N)
        s = _scaled_scores(S, offs, in_row, visible, qk_scale)
        new_max = tl.maximum(run_max, s)
        # Lanes that have seen only masked scores keep max -inf; rebase them on 0 (exp2 -> 0).
        base = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp2(run_max - base) + tl.exp2(s - base)
        run_max = new_max
    row_max = tl.max(run_max, 1)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    row_sum = tl.sum(run_sum * tl.exp2(run_max - row_max[:, None]), 1)
    row_sum = tl.where(m_valid, row_sum, 1.0)  # rows past the chunk: finite, never stored
    lse = row_max + tl.log2(row_sum)
    tl.store(LSE + b * seq_len + query, lse, mask=m_valid)

    philox_rows = (b * seq_len + query).to(tl.int64)
    key_groups = tl.cdiv(key_len, 8)
    for start_n in range(0, key_cols, BLOCK_N):
        offs, in_row, visible = _tile(start_n, m_valid, n_visible, row_offs, cols_pad, BLOCK_N)
        s = _scaled_scores(S, offs, in_row, visible, qk_scale)
        p = tl.exp2(s - lse[:, None]).to(P.dtype.element_ty)
        if ATTN_DROPOUT:
            keep = keep_flags(seed, philox_rows, key_groups, start_n, drop_below, BLOCK_M, BLOCK_N)
            p_drop = tl.where(keep, p.to(tl.float32) * keep_scale, 0.0)
            tl.store(PD + offs, p_drop.to(PD.dtype.element_ty), mask=in_row)
        else:
            tl.store(P + offs, p, mask=in_row)



def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_gate: Optional[torch.Tensor],
    value_gate: Optional[torch.Tensor],
    dropout_p: float,
    value_dropout_p: float,
    seed: int,
) -> Tuple[torch.Tensor, ...]:
    """Forward. Returns ``out [T, B, E]`` and what backward needs: ``out_ungated`` (``P_d W``,
    [T, B, E], empty without a value gate), ``probs`` and ``dropped`` ([B, T, K]; empty when
    chunked, dropped also without attention dropout; with attention dropout ``probs`` holds the
    raw scores S, from which the backward recomputes P), ``lse [B, T]`` fp32 (base 2),
    ``values`` (the dropped values W [K, B, E], empty without value dropout) and ``q * gk``
    ([T, B, E], empty without a key gate). All contiguous. The forward reads every key and
    value: ``detached_keys`` and ``segment`` only change the backward."""
    seq_len, batch, width = q.shape
    key_len = k.shape[0]
    memory_len = key_len - seq_len
    device, dtype = q.device, q.dtype
    plan = _plan(batch, seq_len, key_len, dtype)
    attn_dropout = dropout_p > 0.0
    single = _fits(batch, seq_len, key_len, dtype)
    with _device_guard(device), _no_autocast(device):
        q_gated = _gate_rows(q, key_gate)[0] if key_gate is not None else q
        values = _drop_values(v, value_dropout_p, seed) if value_dropout_p > 0.0 else None
        w = values if values is not None else v
        out_ungated = empty(seq_len, batch, width, dtype=dtype, device=device)
        lse = empty(batch, seq_len, dtype=torch.float32, device=device)
        size = _buffer_size(batch, seq_len, key_len, plan, single)
        scores = empty(size, dtype=dtype, device=device)
        dropped = empty(size, dtype=dtype, device=device) if attn_dropout else None
        for t0, t1, cols in plan:
            rows = t1 - t0
            s = _scores_view(scores, batch, seq_len, key_len, single, t0, t1, cols)
            keys_t = _batch_major(k)[:, :cols].transpose(1, 2)
            torch.bmm(_batch_major(q_gated)[:, t0:t1], keys_t, out=s)
            p_drop = s
            if attn_dropout:
                p_drop = _scores_view(dropped, batch, seq_len, key_len, single, t0, t1, cols)
            _launch_rows(
                _attention_fwd_kernel, rows, batch,
                s, s, p_drop, lse,
                rows, cols, _pad(cols), s.stride(0), s.stride(1), seq_len, key_len, batch, t0,
                memory_len, math.log2(math.e) / math.sqrt(width), drop_below(dropout_p),
                keep_scale(dropout_p),
                seed,
                ATTN_DROPOUT=attn_dropout,
            )
            torch.bmm(p_drop, _batch_major(w)[:, :cols], out=_batch_major(out_ungated)[:, t0:t1])
        if value_gate is not None:
            out = _gate_rows(out_ungated, value_gate)[0]
        else:
            out, out_ungated = out_ungated, q.new_empty(0)
    nothing = q.new_empty(0)
    return (
        out,
        out_ungated,
        scores.view(batch, seq_len, _pad(key_len)) if single else nothing.clone(),
        dropped.view(batch, seq_len, _pad(key_len)) if single and attn_dropout else nothing.clone(),
        lse,
        values if values is not None else nothing.clone(),
        q_gated if key_gate is not None else nothing.clone(),
    )

