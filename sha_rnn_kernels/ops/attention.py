"""Single-head attention over a memory cache: fused Triton forward and backward.

One head whose dimension is the model width E (1024 in the paper, far past FlashAttention's 256),
queries ``q [T, B, E]`` against keys and values ``[K, B, E]`` (memory followed by the segment,
K >= T). Query i sees key j iff ``j <= i + K - T``: every memory key and the segment up to itself.
Since K >= T, key 0 is visible to every query, so no row is ever fully masked.

Gates are folded instead of materialised: ``q.(gk*k) = (gk*q).k`` and ``P(gv*v) = gv*(Pv)``, so the
long key/value memory is read as it is. Value dropout (elementwise on ``v*gv``) is drawn on the fly
while a value tile is loaded; attention-weight dropout is drawn per score. Both use Philox on the
logical element index, from two different keys (``seed`` and ``seed + 2**32``), and are regenerated
in backward; no mask, score or probability matrix ever reaches memory.

Head-dimension split (the design decision; by reasoning, unmeasured: no GPU this session).
Paper shape T=1024, K=5000 (3976 memory), B=16, E=1024, bf16, H100. Visible (query, key) pairs:
B * sum_i (i + 3977) = 73.5M, so one pass "pairs x E" costs G = 2 * 73.5M * 1024 = 150.6 GFLOP.
The minimum is 2G forward (QK^T, PV) and 5G backward (S, dP, dV, dK, dQ).
- One program holding a query block's whole output row needs a BLOCK_M x E fp32 accumulator:
  64 x 1024 x 4 B = 256 KiB, the whole register file of an SM and more than its 228 KiB shared
  memory. Keeping it in global memory instead costs a read-modify-write of 8 bytes x E per query
  row and key block: 16384 rows x 70 key blocks (BLOCK_N=64) x 8 KiB = 9.4 GB of extra traffic
  (about 2.8 ms at 3.35 TB/s; still about 1 ms if L2 caught all of it).
- Chosen: the output's d-range is split across programs (BLOCK_D columns each); every program
  recomputes the full QK^T tile (accumulated over E in BLOCK_K chunks) for its query block. Cost
  (E/BLOCK_D + 1)G: BLOCK_D=256 gives 5G = 753 GFLOP (about 1.1-1.5 ms at 500-700 TFLOP/s),
  BLOCK_D=128 gives 9G. The redundant work is tensor-core FLOPs, with no extra HBM traffic: the
  d-chunk index is the fastest program axis, so the E/BLOCK_D programs that share a query block run
  side by side and their identical Q and K tiles come from L2. HBM reads are then about Q 32 MB +
  K 164 MB + V 164 MB + O 32 MB.
- Backward, same split: a program owns (key block, d-chunk), recomputes S^T and dP^T over all of E,
  accumulates dK and dV for its columns in registers and adds its dQ columns into an fp32 buffer
  with atomics. Cost (2 E/BLOCK_D + 3)G: 11G = 1.66 TFLOP at BLOCK_D=256. A separate dQ kernel
  (deterministic) would recompute S and dP once more: (4 E/BLOCK_D + 3)G = 19G; the atomics cost
  B*T*E*K_visible/BLOCK_N = 588M fp32 adds (2.4 GB to L2) at BLOCK_N=128, judged cheaper.
  dQ is therefore not bitwise deterministic on a GPU.
The autotune list holds BLOCK_D in {64, 128, 256}; configs with chunks wider than E are pruned, and
so are the configs that spill registers for the inputs' dtype and dropout (``_prune_fwd``,
``_prune_bwd``; compiled offline with tools/compile_triton.py). At the paper shape that leaves the
forward's BLOCK_D=256 to inference without dropout and the backward at BLOCK_D <= 128.
"""

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._backend import interpreter_enabled, triton_reason
from ._common import autotune_configs, capability_reason, dtype_reason, empty

# Largest element offset the kernels address with 32-bit arithmetic.
_MAX_INT32 = 2**31 - 1
# Value dropout draws from the Philox key (seed_lo, 1); attention-weight dropout from (seed_lo, 0).
_VALUE_STREAM = 2**32


def _prune_wide_chunks(configs, named_args, **kwargs):
    """Drop configs whose head-dimension chunks are wider than E needs (keep the narrowest)."""
    head_dim = named_args["head_dim"]
    width = max(16, triton.next_power_of_2(head_dim))
    kept = [c for c in configs if c.kwargs["BLOCK_D"] <= width and c.kwargs["BLOCK_K"] <= width]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_D"])]


def _per_thread(config, elements):
    return elements / (32 * config.num_warps)


# Register budgets, from tools/compile_triton.py (ptxas, sm_90 and sm_80, the paper's shape):
# fp32 tiles (IEEE dots) and dropout (int64 Philox offsets over the P and V tiles) cost many
# registers, and the configs past these budgets spill 0.7-77 KB per thread. Those kept spill at
# most ~250 B on sm_90 and ~330 B on sm_80, except BLOCK_D=256 without gates (676 B on sm_80).
def _prune_fwd(configs, named_args, **kwargs):
    """Wide chunks, then configs that spill: fp32 keeps <= 32 accumulator elements per thread;
    with dropout, low precision keeps <= 64 accumulator and <= 32 value elements per thread."""
    configs = _prune_wide_chunks(configs, named_args)
    fp32 = named_args["Q"].dtype == torch.float32
    dropout = kwargs.get("ATTN_DROPOUT", False) or kwargs.get("VALUE_DROPOUT", False)

    def fits(c):
        m, n, d = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_D"]
        if fp32:
            return _per_thread(c, m * d) <= 32
        return not dropout or (_per_thread(c, m * d) <= 64 and _per_thread(c, n * d) <= 32)

    return [c for c in configs if fits(c)] or [min(configs, key=lambda c: _per_thread(c, c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_D"]))]


def _prune_bwd(configs, named_args, **kwargs):
    """Wide chunks, then configs that spill: the dK, dV and dQ accumulators may hold at most
    40 (fp32) or 96 (fp16/bf16) elements per thread."""
    configs = _prune_wide_chunks(configs, named_args)
    budget = 40 if named_args["Q"].dtype == torch.float32 else 96

    def accumulators(c):
        m, n, d = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_D"]
        return _per_thread(c, (2 * n + m) * d)

    return [c for c in configs if accumulators(c) <= budget] or [min(configs, key=accumulators)]


_FWD_CONFIGS = autotune_configs(
    [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_D": 256}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_D": 256}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_D": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "BLOCK_D": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_D": 64}, num_warps=4, num_stages=2),
    ],
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "BLOCK_D": 32}, num_warps=4, num_stages=1),
)

_BWD_CONFIGS = autotune_configs(
    [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "BLOCK_D": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_D": 256}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_D": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "BLOCK_D": 64}, num_warps=4, num_stages=2),
        # The only one of these that does not spill in fp32.
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "BLOCK_D": 64}, num_warps=8, num_stages=2),
    ],
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "BLOCK_D": 32}, num_warps=4, num_stages=1),
)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """``acc + a @ b``. PRECISION "upcast" multiplies fp32 copies of the (already rounded)
    operands: Triton's interpreter multiplies the raw bits of bfloat16 operands in tl.dot."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


# The dropout switches are in the key: the pruning (hence the best config) depends on them.
@triton.autotune(configs=_FWD_CONFIGS, key=["head_dim", "ATTN_DROPOUT", "VALUE_DROPOUT"], prune_configs_by={"early_config_prune": _prune_fwd})
@triton.jit
def _attention_fwd_kernel(
    Q, K, V, KEY_GATE, VALUE_GATE, O, LSE,
    seq_len, key_len, batch, head_dim,
    stride_qt, stride_qb, stride_qe,
    stride_kt, stride_kb, stride_ke,
    stride_vt, stride_vb, stride_ve,
    qk_scale, out_scale, dropout_p, value_dropout_p, seed, value_seed,
    HAS_KEY_GATE: tl.constexpr, HAS_VALUE_GATE: tl.constexpr,
    ATTN_DROPOUT: tl.constexpr, VALUE_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Online-softmax attention forward for one (d-chunk, query block, batch) program.

    Computes ``O[i, b, d] = gv[d] / (1-p_v) / (1-p) * sum_j keep_ij P_ij keep_v[j,b,d] v[j,b,d]``
    with ``P = softmax_j((q_i * gk) . k_j / sqrt(E))`` over the visible keys ``j <= i + K - T``.
    Grid ``(cdiv(E, BLOCK_D), cdiv(T, BLOCK_M), B)``; the d-chunk is the fastest axis so programs
    sharing a query block run together and share Q/K tiles through L2. A program owns the output
    columns ``[d0, d0 + BLOCK_D)`` of BLOCK_M query rows: it walks the key blocks up to the last
    one its rows can see (fully masked blocks are skipped), builds each BLOCK_M x BLOCK_N score
    tile over all of E in BLOCK_K chunks, and accumulates P V for its columns with running max and
    sum (base 2). Saves for backward: the row log-sum-exp ``LSE[b, i]`` (log2 units, written by the
    d-chunk-0 programs); backward recomputes the scores, both dropout masks and P from it.
    O is written contiguous ``[T, B, E]``.
    """
    pid_d = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = tl.program_id(2)
    memory_len = key_len - seq_len
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_valid = offs_m < seq_len
    d_valid = offs_d < head_dim

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Key blocks past the last one the bottom row of this block can see hold only masked scores.
    end_n = tl.minimum(key_len, (pid_m + 1) * BLOCK_M + memory_len)
    for start_n in range(0, end_n, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < key_len
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start_k in range(0, head_dim, BLOCK_K):
            offs_e = start_k + tl.arange(0, BLOCK_K)
            e_valid = offs_e < head_dim
            q = tl.load(
                Q + b * stride_qb + offs_m[:, None] * stride_qt + offs_e[None, :] * stride_qe,
                mask=m_valid[:, None] & e_valid[None, :], other=0.0,
            )
            if HAS_KEY_GATE:
                gate = tl.load(KEY_GATE + offs_e, mask=e_valid, other=0.0).to(tl.float32)
                q = (q.to(tl.float32) * gate[None, :]).to(Q.dtype.element_ty)
            kt = tl.load(
                K + b * stride_kb + offs_n[None, :] * stride_kt + offs_e[:, None] * stride_ke,
                mask=n_valid[None, :] & e_valid[:, None], other=0.0,
            )
            s = _dot(q, kt, s, DOT_PRECISION)
        visible = (offs_n[None, :] <= offs_m[:, None] + memory_len) & n_valid[None, :]
        s = tl.where(visible, s * qk_scale, float("-inf"))
        # Key 0 is visible to every row (K >= T), so m_new is finite from the first block on.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if ATTN_DROPOUT:
            rows = (b * seq_len + offs_m).to(tl.int64)
            keep = tl.rand(seed, rows[:, None] * key_len + offs_n[None, :]) >= dropout_p
            p = tl.where(keep, p, 0.0)
        v = tl.load(
            V + b * stride_vb + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_ve,
            mask=n_valid[:, None] & d_valid[None, :], other=0.0,
        )
        if VALUE_DROPOUT:
            elems = (offs_n.to(tl.int64) * batch + b)[:, None] * head_dim + offs_d[None, :]
            v = tl.where(tl.rand(value_seed, elems) >= value_dropout_p, v, 0.0)
        acc = _dot(p.to(V.dtype.element_ty), v, acc * alpha[:, None], DOT_PRECISION)
        m_i = m_new

    out = acc * (out_scale / l_i)[:, None]
    if HAS_VALUE_GATE:
        out = out * tl.load(VALUE_GATE + offs_d, mask=d_valid, other=0.0).to(tl.float32)[None, :]
    o_ptrs = O + (offs_m[:, None] * batch + b) * head_dim + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
    if pid_d == 0:
        tl.store(LSE + b * seq_len + offs_m, m_i + tl.log2(l_i), mask=m_valid)


@triton.jit
def _attention_bwd_preprocess_kernel(
    O, DO, DELTA,
    seq_len, batch, head_dim,
    stride_dot, stride_dob, stride_doe,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """``DELTA[b, i] = sum_e dO[i, b, e] * O[i, b, e]`` (fp32) for the softmax backward.

    Grid ``(cdiv(T, BLOCK_M), B)``; a program owns BLOCK_M rows and loops over E. The identity
    ``rowsum(dP * P) = rowsum(dO * O)`` holds with both dropouts and the gates, because
    ``O = P_dropped @ V_eff`` exactly. Nothing is saved.
    """
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < seq_len
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_e in range(0, head_dim, BLOCK_E):
        offs_e = start_e + tl.arange(0, BLOCK_E)
        mask = m_valid[:, None] & (offs_e < head_dim)[None, :]
        o = tl.load(O + (offs_m[:, None] * batch + b) * head_dim + offs_e[None, :], mask=mask, other=0.0)
        do = tl.load(
            DO + b * stride_dob + offs_m[:, None] * stride_dot + offs_e[None, :] * stride_doe,
            mask=mask, other=0.0,
        )
        total += tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b * seq_len + offs_m, total, mask=m_valid)


@triton.autotune(
    configs=_BWD_CONFIGS, key=["head_dim"], reset_to_zero=["DQ", "DKEY_GATE", "DVALUE_GATE"],
    prune_configs_by={"early_config_prune": _prune_bwd},
)
@triton.jit
def _attention_bwd_kernel(
    Q, K, V, KEY_GATE, VALUE_GATE, DO, LSE, DELTA,
    DQ, DK, DV, DKEY_GATE, DVALUE_GATE,
    seq_len, key_len, batch, head_dim, stride_gate_b,
    stride_qt, stride_qb, stride_qe,
    stride_kt, stride_kb, stride_ke,
    stride_vt, stride_vb, stride_ve,
    stride_dot, stride_dob, stride_doe,
    sm_scale, qk_scale, attn_scale, value_scale, dropout_p, value_dropout_p, seed, value_seed,
    HAS_KEY_GATE: tl.constexpr, HAS_VALUE_GATE: tl.constexpr,
    ATTN_DROPOUT: tl.constexpr, VALUE_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Attention backward for one (d-chunk, key block, batch) program: dK, dV, dQ, gate grads.

    With ``c = 1/sqrt(E)``, ``V_eff = v * gv * keep_v / (1-p_v)``, ``P_d = P * keep / (1-p)``:
    dV_eff = P_d^T dO; dP = (dO V_eff^T) * keep / (1-p); dS = P * (dP - DELTA);
    dK_eff = c dS^T q (gradient of k * gk), dK = gk * dK_eff, d gk = sum_{b,j} k * dK_eff;
    dQ = c gk * (dS k); dV = gv * keep_v / (1-p_v) * dV_eff, d gv = sum_{b,j} dV_eff * v_dropped.
    Grid ``(cdiv(E, BLOCK_D), cdiv(K, BLOCK_N), B)``. A program owns BLOCK_N keys and the columns
    ``[d0, d0 + BLOCK_D)``: it walks the query blocks that can see its keys, recomputes the score
    tile S^T and dP^T over all of E (P from the saved LSE, both dropout masks from Philox), keeps
    dK and dV for its columns in registers and adds ``dS k`` for its columns into the fp32 DQ
    buffer with atomics. It writes its partial gate gradients (summed over its keys) to
    ``DKEY_GATE / DVALUE_GATE [B, >= cdiv(K, BLOCK_N), E]``; the launcher sums them. Nothing is saved.
    """
    pid_d = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2)
    memory_len = key_len - seq_len
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n_valid = offs_n < key_len
    d_valid = offs_d < head_dim
    nd_mask = n_valid[:, None] & d_valid[None, :]
    v_elems = (offs_n.to(tl.int64) * batch + b)[:, None] * head_dim + offs_d[None, :]
    if HAS_KEY_GATE:
        key_gate_d = tl.load(KEY_GATE + offs_d, mask=d_valid, other=0.0).to(tl.float32)
    k_d = tl.load(
        K + b * stride_kb + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_ke,
        mask=nd_mask, other=0.0,
    )

    dk_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # The first query that sees key n0 is n0 - memory_len; earlier query blocks see none of ours.
    start_m0 = (tl.maximum(pid_n * BLOCK_N - memory_len, 0) // BLOCK_M) * BLOCK_M
    for start_m in range(start_m0, seq_len, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_valid = offs_m < seq_len
        st = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        dpt = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for start_k in range(0, head_dim, BLOCK_K):
            offs_e = start_k + tl.arange(0, BLOCK_K)
            e_valid = offs_e < head_dim
            ne_mask = n_valid[:, None] & e_valid[None, :]
            em_mask = e_valid[:, None] & m_valid[None, :]
            k = tl.load(K + b * stride_kb + offs_n[:, None] * stride_kt + offs_e[None, :] * stride_ke, mask=ne_mask, other=0.0)
            qt = tl.load(Q + b * stride_qb + offs_m[None, :] * stride_qt + offs_e[:, None] * stride_qe, mask=em_mask, other=0.0)
            if HAS_KEY_GATE:
                gate = tl.load(KEY_GATE + offs_e, mask=e_valid, other=0.0).to(tl.float32)
                qt = (qt.to(tl.float32) * gate[:, None]).to(Q.dtype.element_ty)
            st = _dot(k, qt, st, DOT_PRECISION)
            v = tl.load(V + b * stride_vb + offs_n[:, None] * stride_vt + offs_e[None, :] * stride_ve, mask=ne_mask, other=0.0)
            if VALUE_DROPOUT:
                elems = (offs_n.to(tl.int64) * batch + b)[:, None] * head_dim + offs_e[None, :]
                v = tl.where(tl.rand(value_seed, elems) >= value_dropout_p, v, 0.0)
            dot_t = tl.load(DO + b * stride_dob + offs_m[None, :] * stride_dot + offs_e[:, None] * stride_doe, mask=em_mask, other=0.0)
            if HAS_VALUE_GATE:
                gate = tl.load(VALUE_GATE + offs_e, mask=e_valid, other=0.0).to(tl.float32)
                dot_t = (dot_t.to(tl.float32) * gate[:, None]).to(DO.dtype.element_ty)
            dpt = _dot(v.to(DO.dtype.element_ty), dot_t, dpt, DOT_PRECISION)

        lse = tl.load(LSE + b * seq_len + offs_m, mask=m_valid, other=0.0)
        delta = tl.load(DELTA + b * seq_len + offs_m, mask=m_valid, other=0.0)
        visible = (offs_n[:, None] <= offs_m[None, :] + memory_len) & n_valid[:, None] & m_valid[None, :]
        pt = tl.where(visible, tl.exp2(st * qk_scale - lse[None, :]), 0.0)
        dpt = dpt * value_scale
        if ATTN_DROPOUT:
            rows = (b * seq_len + offs_m).to(tl.int64)
            keep = tl.rand(seed, rows[None, :] * key_len + offs_n[:, None]) >= dropout_p
            pdt = tl.where(keep, pt * attn_scale, 0.0)
            dpt = tl.where(keep, dpt * attn_scale, 0.0)
        else:
            pdt = pt
        dst = pt * (dpt - delta[None, :])

        md_mask = m_valid[:, None] & d_valid[None, :]
        do_d = tl.load(DO + b * stride_dob + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_doe, mask=md_mask, other=0.0)
        dv_acc = _dot(pdt.to(DO.dtype.element_ty), do_d, dv_acc, DOT_PRECISION)
        q_d = tl.load(Q + b * stride_qb + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qe, mask=md_mask, other=0.0)
        dst_lowp = dst.to(Q.dtype.element_ty)
        dk_acc = _dot(dst_lowp, q_d, dk_acc, DOT_PRECISION)
        dq = _dot(tl.trans(dst_lowp), k_d, tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), DOT_PRECISION)
        dq = dq * sm_scale
        if HAS_KEY_GATE:
            dq = dq * key_gate_d[None, :]
        tl.atomic_add(DQ + (offs_m[:, None] * batch + b) * head_dim + offs_d[None, :], dq, mask=md_mask)

    partial = b * stride_gate_b + pid_n * head_dim + offs_d
    dk_eff = dk_acc * sm_scale
    if HAS_KEY_GATE:
        tl.store(DKEY_GATE + partial, tl.sum(dk_eff * k_d.to(tl.float32), 0), mask=d_valid)
        dk_eff = dk_eff * key_gate_d[None, :]
    out_offs = (offs_n[:, None] * batch + b) * head_dim + offs_d[None, :]
    tl.store(DK + out_offs, dk_eff.to(DK.dtype.element_ty), mask=nd_mask)

    value_factor = tl.full([BLOCK_N, BLOCK_D], value_scale, dtype=tl.float32)
    if VALUE_DROPOUT:
        value_factor = tl.where(tl.rand(value_seed, v_elems) >= value_dropout_p, value_factor, 0.0)
    dv = dv_acc * value_factor
    if HAS_VALUE_GATE:
        v_d = tl.load(V + b * stride_vb + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_ve, mask=nd_mask, other=0.0)
        tl.store(DVALUE_GATE + partial, tl.sum(dv * v_d.to(tl.float32), 0), mask=d_valid)
        dv = dv * tl.load(VALUE_GATE + offs_d, mask=d_valid, other=0.0).to(tl.float32)[None, :]
    tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=nd_mask)


def _keep_scale(p: float) -> float:
    """``1 / (1 - p)``, the inverted-dropout scale; 0 when everything is dropped."""
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not be rounded to tf32: the parity tests compare against fp32 torch.
    if dtype == torch.float32:
        return "ieee"
    return "upcast" if dtype == torch.bfloat16 and interpreter_enabled() else "tf32"


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_gate: Optional[torch.Tensor],
    value_gate: Optional[torch.Tensor],
    dropout_p: float,
    value_dropout_p: float,
    seed: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Returns ``out [T, B, E]`` (contiguous) and ``lse [B, T]`` fp32
    (base-2 log-sum-exp of the scaled scores)."""
    seq_len, batch, head_dim = q.shape
    key_len = k.shape[0]
    out = empty(seq_len, batch, head_dim, dtype=q.dtype, device=q.device)
    lse = empty(batch, seq_len, dtype=torch.float32, device=q.device)
    grid = lambda META: (
        triton.cdiv(head_dim, META["BLOCK_D"]), triton.cdiv(seq_len, META["BLOCK_M"]), batch
    )
    _attention_fwd_kernel[grid](
        q, k, v,
        key_gate if key_gate is not None else q, value_gate if value_gate is not None else q,
        out, lse,
        seq_len, key_len, batch, head_dim,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        math.log2(math.e) / math.sqrt(head_dim),
        _keep_scale(dropout_p) * _keep_scale(value_dropout_p),
        dropout_p, value_dropout_p, seed, seed + _VALUE_STREAM,
        HAS_KEY_GATE=key_gate is not None, HAS_VALUE_GATE=value_gate is not None,
        ATTN_DROPOUT=dropout_p > 0.0, VALUE_DROPOUT=value_dropout_p > 0.0,
        DOT_PRECISION=_dot_precision(q.dtype),
    )
    return out, lse


def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_gate: Optional[torch.Tensor],
    value_gate: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    dropout_p: float,
    value_dropout_p: float,
    seed: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels. Returns ``dq, dk, dv`` (contiguous) and the gate gradients
    (``[E]``, or empty tensors for an absent gate)."""
    seq_len, batch, head_dim = q.shape
    key_len = k.shape[0]
    device = q.device
    delta = empty(batch, seq_len, dtype=torch.float32, device=device)
    _attention_bwd_preprocess_kernel[(triton.cdiv(seq_len, 16), batch)](
        out, grad_out, delta, seq_len, batch, head_dim,
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        BLOCK_M=16, BLOCK_E=min(256, max(16, triton.next_power_of_2(head_dim))),
    )
    # dQ is accumulated by atomics over the key blocks, so it starts at zero, in fp32.
    dq_acc = empty(seq_len, batch, head_dim, dtype=torch.float32, device=device).zero_()
    dk = empty(key_len, batch, head_dim, dtype=k.dtype, device=device)
    dv = empty(key_len, batch, head_dim, dtype=v.dtype, device=device)
    # Gate partials, [B, cdiv(K, BLOCK_N), E] for the chosen BLOCK_N: sized for the smallest
    # BLOCK_N of the configs and zeroed, so the rows a larger BLOCK_N leaves out add nothing.
    max_key_blocks = triton.cdiv(key_len, min(c.kwargs["BLOCK_N"] for c in _BWD_CONFIGS))
    dkg_part = (
        empty(batch, max_key_blocks, head_dim, dtype=torch.float32, device=device).zero_()
        if key_gate is not None else dq_acc
    )
    dvg_part = (
        empty(batch, max_key_blocks, head_dim, dtype=torch.float32, device=device).zero_()
        if value_gate is not None else dq_acc
    )
    grid = lambda META: (
        triton.cdiv(head_dim, META["BLOCK_D"]), triton.cdiv(key_len, META["BLOCK_N"]), batch
    )
    _attention_bwd_kernel[grid](
        q, k, v,
        key_gate if key_gate is not None else q, value_gate if value_gate is not None else q,
        grad_out, lse, delta,
        dq_acc, dk, dv, dkg_part, dvg_part,
        seq_len, key_len, batch, head_dim, max_key_blocks * head_dim,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        1.0 / math.sqrt(head_dim), math.log2(math.e) / math.sqrt(head_dim),
        _keep_scale(dropout_p), _keep_scale(value_dropout_p),
        dropout_p, value_dropout_p, seed, seed + _VALUE_STREAM,
        HAS_KEY_GATE=key_gate is not None, HAS_VALUE_GATE=value_gate is not None,
        ATTN_DROPOUT=dropout_p > 0.0, VALUE_DROPOUT=value_dropout_p > 0.0,
        DOT_PRECISION=_dot_precision(q.dtype),
    )
    # Absent gates get distinct empty tensors: outputs of a custom op may not alias each other.
    dkg = dkg_part.sum((0, 1)).to(key_gate.dtype) if key_gate is not None else q.new_empty(0)
    dvg = dvg_part.sum((0, 1)).to(value_gate.dtype) if value_gate is not None else q.new_empty(0)
    return dq_acc.to(q.dtype), dk, dv, dkg, dvg


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
) -> Tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, key_gate, value_gate, dropout_p, value_dropout_p, seed)


@_attention_fwd_op.register_fake
def _(q, k, v, key_gate, value_gate, dropout_p, value_dropout_p, seed):
    seq_len, batch, head_dim = q.shape
    return q.new_empty(seq_len, batch, head_dim), q.new_empty(batch, seq_len, dtype=torch.float32)


@torch.library.custom_op("sha_rnn_kernels::attention_bwd", mutates_args=())
def _attention_bwd_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_gate: Optional[torch.Tensor],
    value_gate: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    dropout_p: float,
    value_dropout_p: float,
    seed: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(
        grad_out, q, k, v, key_gate, value_gate, out, lse, dropout_p, value_dropout_p, seed
    )


@_attention_bwd_op.register_fake
def _(grad_out, q, k, v, key_gate, value_gate, out, lse, dropout_p, value_dropout_p, seed):
    def gate_grad(gate):
        return gate.new_empty(gate.shape) if gate is not None else q.new_empty(0)

    return (
        q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
        gate_grad(key_gate), gate_grad(value_gate),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, key_gate, value_gate, dropout_p, value_dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, key_gate, value_gate, out, lse)
    ctx.dropout = (dropout_p, value_dropout_p, seed)
    ctx.has_gates = (key_gate is not None, value_gate is not None)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, key_gate, value_gate, out, lse = ctx.saved_tensors
    dq, dk, dv, dkg, dvg = _attention_bwd_op(
        grad_out, q, k, v, key_gate, value_gate, out, lse, *ctx.dropout
    )
    has_key_gate, has_value_gate = ctx.has_gates
    return (
        dq, dk, dv, dkg if has_key_gate else None, dvg if has_value_gate else None,
        None, None, None,
    )


_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    """Why the Triton kernels cannot take these (already validated) inputs, or None."""
    reason = dtype_reason(q, k, v) or triton_reason(q.device)
    if reason is not None:
        return reason
    if q.numel() == 0 or k.numel() == 0:
        return f"empty inputs (q {tuple(q.shape)}, k {tuple(k.shape)})"
    for name, t in (("q", q), ("k", k), ("v", v)):
        # Element offsets are computed in 32-bit arithmetic inside the kernels.
        extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) + 1
        if max(extent, t.numel()) > _MAX_INT32:
            return f"{name} spans {extent} elements; the kernels address at most 2**31 - 1"
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
) -> torch.Tensor:
    """Single-head causal attention over memory + segment, fused (Triton), differentiable.

    Args:
        q: queries ``[T, B, E]``; k, v: keys and values ``[K, B, E]`` with K >= T (memory first,
            then the segment); any strides, one dtype (fp32, fp16, bf16), one device.
        key_gate, value_gate: ``[E]`` gates in q's dtype, or None. The keys are ``k * key_gate``,
            the values ``dropout(v * value_gate, value_dropout_p)``.
        dropout_p: dropout on the attention weights; value_dropout_p: elementwise dropout on the
            gated values; seed: the Philox seed of both (drawn by the caller).

    Returns:
        ``[T, B, E]``: ``dropout(softmax(q k_eff^T / sqrt(E) + causal mask)) @ v_eff``, where
        query i sees keys ``j <= i + K - T``.

    Example::

        out = attention(q, k, v, key_gate=None, value_gate=None, dropout_p=0.0,
                        value_dropout_p=0.0, seed=0)
    """
    out, _ = _attention_fwd_op(
        q, k, v, key_gate, value_gate, float(dropout_p), float(value_dropout_p), int(seed)
    )
    return out
