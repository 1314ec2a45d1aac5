"""The attention's backward: the softmax-backward row pass (:func:`_attention_bwd_kernel`) and
the launcher that runs it between the cuBLAS products (:func:`attention_backward`). See
:mod:`.attention`.
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
    _gate_rows,
    _launch_rows,
    _no_autocast,
    _pad,
    _plan,
    _row_block,
    _scaled_scores,
    _scores_view,
    _tile,
    _triangle_blocks,
)
from ._common import empty
from ._dropout import drop_below, keep_flags, keep_scale


@triton.jit
def _attention_bwd_kernel(
    P, DP, PD, LSE, DELTA,
    rows, key_cols, cols_pad, stride_b, stride_row, seq_len, key_len, batch, row0, memory_len,
    qk_scale, score_scale, drop_below, keep_scale, seed,
    RECOMPUTE: tl.constexpr, ATTN_DROPOUT: tl.constexpr, WRITE_PD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Softmax-backward row pass of one chunk of queries: ``dS`` in place of ``dP``.

    ``DP [B, rows, key_cols]`` (strides ``stride_b, stride_row, 1``, shared by P and PD) holds
    ``dP_d = dO_g W^T`` and is overwritten with
    ``dS = P * (keep/(1-p) * dP_d - delta) / sqrt(E)``, the gradient of the raw score
    ``(q*gk) . k`` (0 on masked keys and on columns ``key_cols..cols_pad-1``, whatever dP holds
    there), where
    ``delta[i, b] = rowsum(dO * O)`` (``DELTA [T, B]``, fp32): the identity
    ``rowsum(P * dP) = rowsum(P_d * dP_d) = rowsum(dO * O)`` holds with both dropouts and gates.
    ``P`` holds the saved probabilities, or with RECOMPUTE the raw scores of this chunk, turned
    into P with ``LSE`` exactly as the forward did. With WRITE_PD the (dropped) probabilities
    the dV product needs are written to ``PD`` (may be P itself: read before written).
    Grid ``(cdiv(rows, BLOCK_M) * B,)``; a program owns BLOCK_M rows of one batch and walks all
    of their ``key_cols`` keys once. Nothing is saved.
    """
    pid = tl.program_id(0)
    b, block, offs_m, m_valid, query, n_visible, row_offs = _row_block(
        pid, rows, row0, memory_len, key_cols, stride_b, stride_row, BLOCK_M
    )
    delta = tl.load(DELTA + query * batch + b, mask=m_valid, other=0.0)
    if RECOMPUTE:
        lse = tl.load(LSE + b * seq_len + query, mask=m_valid, other=0.0)
    philox_rows = (b * seq_len + query).to(tl.int64)
    key_groups = tl.cdiv(key_len, 8)
    for start_n in range(0, key_cols, BLOCK_N):
        offs, in_row, visible = _tile(start_n, m_valid, n_visible, row_offs, cols_pad, BLOCK_N)
        if RECOMPUTE:
            s = _scaled_scores(P, offs, in_row, visible, qk_scale)
            p_lowp = tl.exp2(s - lse[:, None]).to(PD.dtype.element_ty)
        else:
            p_lowp = tl.where(visible, tl.load(P + offs, mask=in_row, other=0.0), 0.0)
            p_lowp = p_lowp.to(PD.dtype.element_ty)
        p = p_lowp.to(tl.float32)
        dp = tl.load(DP + offs, mask=in_row, other=0.0).to(tl.float32)
        if ATTN_DROPOUT:
            keep = keep_flags(seed, philox_rows, key_groups, start_n, drop_below, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * keep_scale, 0.0)
            p_drop = tl.where(keep, p * keep_scale, 0.0).to(PD.dtype.element_ty)
        else:
            p_drop = p_lowp
        ds = tl.where(visible, p * (dp - delta[:, None]) * score_scale, 0.0)
        tl.store(DP + offs, ds.to(DP.dtype.element_ty), mask=in_row)
        if WRITE_PD:
            tl.store(PD + offs, p_drop, mask=in_row)



def _accumulate(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """``out = a @ b`` (first chunk) or ``out += a @ b``, batched, in place."""
    if first:
        torch.bmm(a, b, out=out)
    else:
        out.baddbmm_(a, b)


def _key_gradients(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, detached: int, combine: bool,
    dv_in_segment: bool,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The key and value gradients' buffers ``(dk, dv, dk_live, dv_live)``. ``dk_live`` and
    ``dv_live`` are the gradients of keys and values detached..K-1 (row r: key detached + r);
    dv_live holds dW = P_d^T dO_g until the value-dropout pass. With ``combine`` (the segment
    form), ``dk`` is the segment's one gradient dk + dv and ``dv`` is None; ``dv_in_segment``
    (scores saved, no value dropout) lets the dv products write it directly."""
    key_len, batch, width = k.shape
    device, dtype = q.device, q.dtype
    live_len = key_len - detached
    if combine:
        # One gradient for the segment, dk + dv: no rows for the detached keys at all. The
        # dk products write it; with saved scores dv goes first (into it, or into a scratch
        # the value-dropout pass reads) and the dk products accumulate onto it in their
        # epilogue (beta = 1); chunked, dk and dv accumulate apart and are added at the end.
        d_segment = dk_live = empty(live_len, batch, width, dtype=dtype, device=device)
        dv_live = d_segment if dv_in_segment else empty(
            live_len, batch, width, dtype=dtype, device=device
        )
        return d_segment, None, dk_live, dv_live
    dk = empty(key_len, batch, width, dtype=k.dtype, device=device)
    dv = empty(key_len, batch, width, dtype=v.dtype, device=device)
    # Rows of detached keys: an exact zero gradient, one memset each, no product.
    dk[:detached].zero_()
    dv[:detached].zero_()
    return dk, dv, dk[detached:], dv[detached:]


def _key_block_products(
    grad_full: torch.Tensor,
    p_full: torch.Tensor,
    grad_gated: torch.Tensor,
    q_gated: torch.Tensor,
    plan,
    detached: int,
    dk_live: torch.Tensor,
    dv_live: torch.Tensor,
    d_segment: Optional[torch.Tensor],
    value_dropout_p: float,
    seed: int,
) -> None:
    """dv and dk of the one-buffer path, from the saved ``[B, T, pad(K)]`` dS (``grad_full``) and
    P_d or P (``p_full``), by blocks of keys; then the value-dropout pass on dv (when
    ``value_dropout_p`` > 0). With ``d_segment`` (the segment form) the dk products accumulate
    onto the dv already there."""
    # Keys j0..j1-1 first seen by block (t0, t1) are seen by queries t0.. only: one
    # product each for dv and dk over that rectangle, written once (the masked entries
    # inside it were written as 0 by the row passes).
    combine = d_segment is not None
    key_blocks, j0 = [], 0
    for t0, _, cols in plan:
        j0, j1 = max(j0, detached), cols
        if j1 > j0:
            key_blocks.append((t0, j0, j1))
        j0 = j1
    for t0, j0, j1 in key_blocks:
        p_block = p_full[:, t0:, j0:j1].transpose(1, 2)
        out_rows = _batch_major(dv_live)[:, j0 - detached : j1 - detached]
        torch.bmm(p_block, _batch_major(grad_gated)[:, t0:], out=out_rows)
    if value_dropout_p > 0.0:
        target = d_segment if combine else dv_live
        _drop_values(dv_live, value_dropout_p, seed, out=target, first_key=detached)
    for t0, j0, j1 in key_blocks:
        ds_block = grad_full[:, t0:, j0:j1].transpose(1, 2)
        queries = _batch_major(q_gated)[:, t0:]
        out_rows = _batch_major(dk_live)[:, j0 - detached : j1 - detached]
        if combine:
            out_rows.baddbmm_(ds_block, queries)  # d_segment = dv + dk
        else:
            torch.bmm(ds_block, queries, out=out_rows)


def attention_backward(
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
    detached_keys: int = 0,
    combine: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward. Returns ``dq, dk, dv`` (contiguous) and the gate gradients (``[E]``, or empty
    tensors for an absent gate). The first ``detached_keys`` rows of dk and dv are zero-filled
    and no product, nor the value-dropout pass, touches them (dq and the gate gradients still
    see every key: they come from dS and dO). With ``combine`` (the segment form: k is v), ``dk``
    is instead ``dk[n:] + dv[n:]`` ([K - n, B, E], no zero rows) and ``dv`` is empty.
    ``q_gated`` is the forward's saved ``q * gk`` (recomputed when empty)."""
    seq_len, batch, width = q.shape
    key_len = k.shape[0]
    detached = detached_keys
    memory_len = key_len - seq_len
    device, dtype = q.device, q.dtype
    attn_dropout = dropout_p > 0.0
    saved = probs.numel() > 0
    # Saved probabilities mean the one-buffer blocks, whatever the budget says now.
    plan = _triangle_blocks(seq_len, key_len) if saved else _plan(batch, seq_len, key_len, dtype)
    with _device_guard(device), _no_autocast(device):
        ou = out_ungated if value_gate is not None else out
        grad_gated, delta, dvg = _gate_rows(
            grad_out, value_gate, ou, write_out=value_gate is not None, rowsum=True,
            partial=value_gate is not None,
        )
        if grad_gated is None:
            grad_gated = grad_out
        w = values if value_dropout_p > 0.0 else v
        if key_gate is None:
            q_gated = q
        elif q_gated.numel() == 0:  # not saved (a direct call): recompute it
            q_gated = _gate_rows(q, key_gate)[0]
        dq_gated = empty(seq_len, batch, width, dtype=dtype, device=device)
        vdrop = value_dropout_p > 0.0 and key_len - detached > 0
        dk, dv, dk_live, dv_live = _key_gradients(q, k, v, detached, combine, saved and not vdrop)
        d_segment = dk if combine else None
        size = _buffer_size(batch, seq_len, key_len, plan, saved)
        grad_scores = empty(size, dtype=dtype, device=device)
        scratch = None if saved else empty(size, dtype=dtype, device=device)
        qk_scale = math.log2(math.e) / math.sqrt(width)
        # Chunked: the last chunk sees every key, so it writes dk and dv (past the detached keys)
        # whole; earlier ones add to the keys they see. One buffer: dk and dv come after the
        # loop, by blocks of keys.
        for index, (t0, t1, cols) in enumerate(reversed(plan)):
            rows = t1 - t0
            grad_gated_c = _batch_major(grad_gated)[:, t0:t1]
            ds = _scores_view(grad_scores, batch, seq_len, key_len, saved, t0, t1, cols)
            torch.bmm(grad_gated_c, _batch_major(w)[:, :cols].transpose(1, 2), out=ds)
            if saved:
                # With attention dropout the forward kept the raw scores S (and saved P_d).
                source = probs[:, t0:t1, :cols]
                p_drop = dropped[:, t0:t1, :cols] if attn_dropout else source
            else:
                source = _scores_view(scratch, batch, seq_len, key_len, False, t0, t1, cols)
                keys_t = _batch_major(k)[:, :cols].transpose(1, 2)
                torch.bmm(_batch_major(q_gated)[:, t0:t1], keys_t, out=source)
                p_drop = source
            _launch_rows(
                _attention_bwd_kernel, rows, batch,
                source, ds, p_drop, lse, delta,
                rows, cols, _pad(cols), ds.stride(0), ds.stride(1), seq_len, key_len, batch, t0,
                memory_len, qk_scale, 1.0 / math.sqrt(width), drop_below(dropout_p), keep_scale(dropout_p),
                seed,
                RECOMPUTE=not saved or attn_dropout, ATTN_DROPOUT=attn_dropout, WRITE_PD=not saved,
            )
            if not saved and cols > detached:
                first = index == 0
                live = slice(detached, cols)
                rows_live = slice(0, cols - detached)
                p_live = p_drop[:, :, live].transpose(1, 2)
                _accumulate(_batch_major(dv_live)[:, rows_live], p_live, grad_gated_c, first)
                queries = _batch_major(q_gated)[:, t0:t1]
                _accumulate(_batch_major(dk_live)[:, rows_live], ds[:, :, live].transpose(1, 2),
                            queries, first)
            torch.bmm(ds, _batch_major(k)[:, :cols], out=_batch_major(dq_gated)[:, t0:t1])
        if saved:
            _key_block_products(
                grad_scores.view(batch, seq_len, _pad(key_len)),
                dropped if attn_dropout else probs,
                grad_gated, q_gated, plan, detached, dk_live, dv_live, d_segment,
                value_dropout_p if vdrop else 0.0, seed,
            )
        elif vdrop:
            _drop_values(dv_live, value_dropout_p, seed, out=dv_live, first_key=detached)
        if combine and not saved:
            d_segment.add_(dv_live)
        if key_gate is not None:
            dq, _, dkg = _gate_rows(dq_gated, key_gate, q, partial=True)
        else:
            dq, dkg = dq_gated, None
    # Absent gates get distinct empty tensors: outputs of a custom op may not alias each other.
    dkg = dkg.to(key_gate.dtype) if key_gate is not None else q.new_empty(0)
    dvg = dvg.to(value_gate.dtype) if value_gate is not None else q.new_empty(0)
    if combine:
        return dq, d_segment, q.new_empty(0), dkg, dvg
    return dq, dk, dv, dkg, dvg

