"""Single-head attention over a memory cache: cuBLAS products, fused Triton row passes.

One head whose dimension is the model width E (1024 in the paper), queries ``q [T, B, E]``
against keys and values ``[K, B, E]`` (memory followed by the segment, K >= T). Query i sees key
j iff ``j <= i + K - T``: every memory key and the segment up to itself. Since K >= T, key 0 is
visible to every query, so no row is ever fully masked.

Design: materialise the scores, run every large product once on tensor cores.
At E = 1024 the flash design (never write the scores) must split the head dimension across
programs and recompute ``Q K^T`` once per split: the earlier kernels did ~9x the forward's and
~4x the backward's minimum FLOPs. A [B, T, K] score tensor in bf16 is 164 MB at the paper shape,
~0.05 ms of HBM traffic per write or read, far cheaper than one extra 168 GFLOP product (~0.2 ms).
So the big products go to cuBLAS (``torch.bmm`` / ``baddbmm_``, tensor cores in bf16/fp16, one
GEMM each, fp32 accumulation) straight on the time-major tensors (``[T, B, E]`` viewed as
``[B, T, E]`` with leading dimension B*E: no copies), and the small work runs in fused
memory-bound Triton kernels:

- forward: ``S = (q * gk) k^T`` (cuBLAS; ``q * gk`` is saved for the backward);
  ``_attention_fwd_kernel`` reads each row of S twice (fp32 max/sum, then the probabilities;
  the second read mostly from L2), applies 1/sqrt(E), the causal mask with the memory offset
  and attention dropout, and writes the row log-sum-exp and, in training, only the dropped
  ``P_d`` (S stays, saved: the backward recomputes P from it and the LSE) or, without attention
  dropout, ``P`` over S; ``O_u = P_d W`` (cuBLAS) where ``W = dropout(v)`` (or v);
  ``O = O_u * gv``.
- backward: ``dO_g = dO * gv``, ``delta = rowsum(dO * O)``, ``dgv = sum_rows(dO * O_u)``
  (``_attention_bwd_preprocess_kernel``); ``dP = dO_g W^T`` (cuBLAS); ``_attention_bwd_kernel``
  turns it in place into ``dS = P * (keep/(1-p) * dP - delta) / sqrt(E)``; then ``dW = P_d^T dO_g``,
  ``dQ_g = dS k``, ``dk = dS^T (q * gk)`` (cuBLAS); ``dv = dW * keep_v / (1-p_v)``
  (``_attention_value_dropout_kernel``); ``dq = dQ_g * gk``, ``dgk = sum_rows(dQ_g * q)``.

Detached keys (``detached_keys = n``). In an SHA-RNN the first ``M = K - T`` keys and values are
the memory of earlier segments, detached: their dk and dv are thrown away. The op then returns
exactly what it would for ``cat([k[:n].detach(), k[n:]])`` (same for v), and computes
``dW = P_d[:, :, n:]^T dO_g``, ``dk = dS[:, :, n:]^T (q * gk)`` and the value-dropout pass only for
keys ``j >= n``; rows ``j < n`` of dk and dv are zero-filled (one memset each: a custom op must
return a gradient of k's shape; the segment form below has no such rows). Nothing else depends
on them. With ``S_ij = sum_e q_ie gk_e k_je`` and ``O = gv * (P_d W)``:

- ``dq = gk * dQ_g`` with ``dQ_g = dS k`` over every key, detached or not;
- ``dgk_e = sum_ij dS_ij q_ie k_je = sum_i q_ie dQ_g,ie``: the key gate multiplies the detached
  keys too, and their share reaches it through the scores (dS covers every key), not through dk;
- ``dgv_e = sum_i dO_ie O_u,ie`` with ``O_u = P_d W`` over every value;
- ``dk_j = (dS^T (q * gk))_j`` and ``dv_j = keep_v * (P_d^T dO_g)_j / (1-p_v)`` for ``j >= n``,
  0 for ``j < n``.

So dq and both gate gradients are bit for bit those of ``detached_keys=0``. The forward reads every
key and value as before; the chunked path skips the dk/dv products of chunks that see only
detached keys and restricts the others to keys ``n..K_c-1``.

Segment form (``segment=``). An SHA-RNN layer's keys and values are one tensor
``kv = cat([memory, segment])`` with ``detached_keys = M``. Returning dk and dv for it costs two
[K, B, E] tensors whose memory rows are zero, and autograd then adds them (another [K, B, E]
pass) before handing ``dk[M:] + dv[M:]`` to the segment. Given ``segment`` (and k is v), the op
returns that sum itself, ``[K - n, B, E]``: the dV products write it (through the value-dropout
pass when there is one), and the dK products accumulate onto it in their epilogue
(``baddbmm_``, beta = 1; one rounding of the sum in bf16/fp16). ``SHALayer`` uses it.

Gates are folded, never materialised on the long [K, B, E] tensors: ``(q*gk).k = q.(gk*k)``
and ``P (gv * W) = gv * (P W)``. Dropout flags come eight to a Philox call
(``_dropout.keep_flags``: 16-bit uniforms, p rounded to a multiple of 2**-16): ``tl.rand``'s
call per element was most of the row passes' instructions. The value-dropout mask is drawn once
per element, by one elementwise kernel in forward (``W``) and once more in backward (``dv``);
the attention-dropout mask once per score in each row pass. Both depend on global indices only
(attention: row ``b*T + i``, column j, key ``seed``; values: row ``j*B + b``, column e, key
``seed + 2**32``), so they are reproducible from the seed and identical however the queries are
chunked. No atomics: every output element is written by one program or one GEMM, so dq, dk and
dv are deterministic.

Masked triangle. cuBLAS cannot skip the masked (future) corner of a product, so the queries run
in ``TRIANGLE_BLOCKS`` (4) blocks (a multiple of 128 rows each when >= 128: 256 at the paper
shape), block ``[t0, t1)`` against the ``t1 + M`` keys it can see. With one buffer, the blocks
write views of the saved [B, T, K] S/P, P_d and dS buffers (row stride K; the corners above the
blocks are never written, and no product reads them); backward computes dV and dK by blocks of
keys: the keys first seen by block ``[t0, t1)`` (the memory and the first block's keys for
t0 = 0; only those ``>= detached_keys``) against the queries ``t0..T-1`` that can see them, each
row of dk, dv written once by one GEMM, no accumulation. Every product skips 3/8 of the
segment's T x T triangle per batch (the chunked path below skips it chunk by chunk).

Bounded memory. When one [B, T, K] buffer would exceed ``SCORE_BUDGET_BYTES`` (512 MiB; tests
lower it), the queries are processed in chunks of ``Tc`` rows, each against the keys it can see
(``K_c = t1 + K - T``; Tc a multiple of 64 when >= 128), and forward saves only the row
log-sum-exp: backward recomputes each
chunk's S (one extra product, the design's "one recompute") and accumulates dk, dv over chunks
with ``baddbmm_`` in the compute dtype (one extra rounding per chunk in fp16/bf16).

Estimates (no GPU here; figures are **estimated** by counting, not measured). Paper shape T=1024,
K=5000 (M = 3976 memory), B=16, E=1024, bf16, training config (gates, both dropouts 0.1), as the
SHA-RNN runs it (``detached_keys = M`` and ``segment``) unless said otherwise; H100 SXM (about
800 TFLOP/s measured bf16 GEMM on large square shapes, ~3 TB/s HBM, 132 SMs issuing at most
4 warp-instructions per clock at ~1.755 GHz: 927 G warp-instructions/s).
- One full-rectangle product: ``2 B T K E`` = 167.8 GFLOP; one over the segment keys only
  (``2 B T T E``) = 34.4 GFLOP. Visible (query, key) pairs: ``B (T M + T (T+1)/2)`` = 73.54M,
  so ``G = 2 E pairs`` = 150.6 GFLOP. cuBLAS cannot skip masked entries inside a block: the
  4 query blocks of 256 see 4232, 4488, 4744 and 5000 keys, 92.3% of the full rectangle, so S,
  O, dP and dQ cost 154.9 GFLOP each (1.028 G); dV and dK over the 1024 non-detached keys, by
  blocks of 256 keys against 1024, 768, 512 and 256 queries, 21.5 GFLOP each.
- FLOPs run: forward 309.8 GFLOP (S, O); backward dP, dQ (309.8) and dV, dK (42.9; S is saved,
  so it is not recomputed) = 352.7 GFLOP; total 662.5 GFLOP = 0.56x the ``14 B T K E`` budget
  (1174 GFLOP). Without detached keys dV and dK cost 154.9 GFLOP each (total 929.3 GFLOP,
  0.79x); with neither the blocks nor the detached keys, 6 full products (1006.6 GFLOP,
  ``12 B T K E``): the detached memory saves 266.8 GFLOP (26.5%), the blocks a further
  77.3 GFLOP. The chunked path recomputes S, each chunk against the ``t1 + M`` keys it sees and
  dV, dK over its non-detached ones: at most ``14 B T K E`` (1.0x) without detached keys,
  ~0.77x with. Counting visible pairs only, the least any design could run (no recompute,
  dK/dV over the segment's visible pairs) is 636.8 GFLOP, 4% below this; a "minimum of 2G
  forward and 5G backward" counts a recompute of S that saving it avoids, and a "floor of
  ~1.1 ms" for 7G holds at the 989 TFLOP/s datasheet peak, not at the 800 TFLOP/s measured rate
  (1.32 ms).
- GEMM time: S, O, dP, dQ are large, well-shaped batched GEMMs (every dimension >= 256,
  16 batches, 256-1280 tiles of 128x128 per block: 2-10 waves of 132 SMs), but K is not a
  multiple of 128, the operands are strided (ld = B*E or K) and the waves do not divide evenly,
  so we assume 650-800 TFLOP/s; the eight 256-key dV/dK GEMMs (42.9 GFLOP, 256 tiles each) may
  run slower. 0.83-1.02 ms for all (1.26-1.55 ms for the six full products without blocks or
  detached keys).
- Memory-bound passes: the larger of HBM bytes / 3 TB/s and the instructions of their compiled
  sm_90 loops (read off the SASS, per element) / 927 G warp-instructions/s. Sizes: one [B, T, K]
  bf16 tensor = 163.8 MB (89.8% visible, 92.3% written by the blocks), [T, B, E] = 33.6 MB,
  [K, B, E] = 163.8 MB, [M, B, E] = 130.3 MB.
  Score rows are stored with a stride of K rounded up to 16 (5008), so the row passes move
  whole 16-byte vectors (``LDG.E.128``/``STG.E.128`` in the SASS).
  Forward: ``q*gk`` 67 MB (0.022 ms); value dropout W 328 MB, 25 instructions per element
  (65.5 M warp-instructions, 0.071 ms of issue): 0.109 ms; row pass reads the visible S once
  (the second read assumed to hit L2) and writes P_d, 298 MB (0.099 ms), and issues 15.75
  instructions per visible score (statistics) and 25.25 per written one (probabilities, flags,
  P_d): 97 M warp-instructions, 0.105 ms, so issue and memory about balance; ``O_u*gv`` 67 MB
  (0.022 ms): **0.26 ms**. Backward: preprocess 101 MB (0.034 ms); row pass reads S and dP and
  writes dS, 445 MB (0.148 ms; 31 instructions per score, 0.081 ms of issue); the value-dropout
  pass into the segment's gradient 67 MB (0.022 ms; the dK products' read of it hides under
  their compute); ``dq``/``dgk`` 101 MB (0.034 ms): **0.24 ms**. Without ``segment`` the zero
  fill of the detached rows of dk and dv adds 2 x 130 MB (0.087 ms), and autograd's ``dk + dv``
  for one kv tensor a further [K, B, E] pass (492 MB, 0.16 ms) outside the op.
- Estimated total, training config: forward 0.39-0.48 + 0.26 = 0.65-0.74 ms; forward+backward
  0.83-1.02 + 0.26 + 0.24 = **1.33-1.52 ms** (1.42-1.61 ms with ``detached_keys`` alone). The
  1.5 ms goal holds unless the GEMMs average below ~660 TFLOP/s, the low end of the assumed
  rate: met at the centre of the estimate, not across all of it. Against estimates of the
  other designs by the same kind of analysis: torch.compile of the reference ~2.4-2.7 ms (six
  full products, 1.26-1.55 ms, plus ~1 ms of fused softmax, dropout and gate passes over the
  fp32 scores and the [K, B, E] tensors): 1.6-2.0x; the eager reference ~5.3 ms: 3.5-4.0x;
  PyTorch SDPA with an explicit mask, which takes its memory-efficient CUTLASS backend here
  (flash and cuDNN refuse a mask or a head dimension of 1024), sm80 ``mma.sync`` kernels that
  recompute Q K^T in backward and compute the masked triangle, 7 full products (1174 GFLOP) at
  an assumed 100-230 TFLOP/s: ~5.7-11.5 ms, 3.7-8.6x. Neither the reference nor SDPA can skip
  the memory's dK: their key-gate gradient is ``sum(d(k*gk) * k)`` over every key, which needs
  the full product. Correction to this module's earlier estimate (1.49-1.68 ms for the previous
  revision): it counted the row passes and the value dropout by bytes only, but ``tl.rand``'s
  Philox call per element and scalar 2-byte loads made them issue-bound (81, 81 and 73 SASS
  instructions per element: ~0.28 ms more), so that revision was ~1.77-1.96 ms. Eval config
  (gates, no dropout): no W, no P_d, forward ~0.39-0.48 + 0.15 = 0.54-0.63 ms.
- cuBLAS plus row passes, or Triton GEMMs with fused prologues/epilogues: what fusion could
  save is the dP round trip of the backward row pass (write and read, ~0.10 ms) and the W pass
  (~0.11 ms, by reading v and mask bits in the O product's operand load). The forward row pass
  cannot go into the S product's epilogue (it needs each row's full statistics first; a
  flash-style rescaled O is a 128 x 1024 fp32 accumulator per tile, the spilling design this
  one replaced). Against that, a Triton GEMM on Hopper runs below cuBLAS (we assume 85-95% of
  it on these shapes: -0.04 to -0.14 ms over the four large products), and an operand that
  passes through registers on its way to ``wgmma`` slows the O product's main loop. Net
  -0.1 to +0.1 ms: not worth a second GEMM implementation without a measurement.
- Registers (tools/compile_triton.py, sm_90 and sm_80, fp32/fp16/bf16, every switch): 18-96
  per thread, no spills, at most 2 KB of shared memory; one config per kernel, no autotuning
  (these passes are memory-bound), so nothing is tuned inside CUDA-graph capture.
- Peak memory above the inputs, training config, forward+backward: forward allocates W, S,
  P_d (3 x 164 MB), q*gk, O_u, O (3 x 34 MB), ~0.59 GB, and keeps all of it; backward adds
  dP/dS (164 MB), dO_g, dQ_g, dq, the dV scratch and the segment's gradient (5 x 34 MB):
  ~0.93 GB at its peak (~1.2 GB without ``segment``: full-size dk and dv). The eager reference
  keeps k*gk, dropout(v*gv) and its mask, the fp32 softmax, the dropped bf16 weights and their
  mask (~0.98 GB), peaks at ~1.1 GB in forward (two fp32 score temporaries) and at ~1.7-2 GB in
  backward (its fp32 score gradients). Lowering ``SCORE_BUDGET_BYTES`` trades the recompute of
  S (+168 GFLOP, ~0.22 ms) for ~0.5 GB.
"""

import contextlib
import math
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .._backend import interpreter_enabled, triton_reason
from ._common import capability_reason, dtype_reason, empty
from ._dropout import drop_below, keep_flags, keep_scale

# Largest [B, T_chunk, K_chunk] score buffer, in bytes. Larger problems are processed in chunks
# of queries. Tests lower it to force the chunked path.
SCORE_BUDGET_BYTES = 1 << 29
# Query blocks of the one-buffer path: block c sees keys up to its last row + M only, so the
# products skip (TRIANGLE_BLOCKS - 1) / (2 TRIANGLE_BLOCKS) of the segment's T x T triangle.
TRIANGLE_BLOCKS = 4
# Value dropout draws from the Philox key (seed_lo, 1); attention-weight dropout from (seed_lo, 0).
_VALUE_STREAM = 2**32


@triton.jit
def _row_block(pid, rows, row0, memory_len, key_cols, stride_b, stride_row, BLOCK_M: tl.constexpr):
    """The rows a row-pass program owns: its batch ``b``, its block index within the batch, the
    row offsets ``offs_m`` in the chunk and which of them exist, their query indices in the
    segment, how many keys each sees (0 for rows past the chunk) and the int64 offsets of their
    first score."""
    blocks = tl.cdiv(rows, BLOCK_M)
    b = pid // blocks
    block = pid % blocks
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < rows
    query = row0 + offs_m
    n_visible = tl.where(m_valid, tl.minimum(query + memory_len + 1, key_cols), 0)
    row_offs = b.to(tl.int64) * stride_b + offs_m.to(tl.int64) * stride_row
    return b, block, offs_m, m_valid, query, n_visible, row_offs


@triton.jit
def _tile(start_n, m_valid, n_visible, row_offs, cols_pad, BLOCK_N: tl.constexpr):
    """The column tile ``start_n + [0, BLOCK_N)`` of a program's rows: the offsets of its
    scores, which of them lie in the buffer's rows (up to ``cols_pad``, a multiple of 16, so
    loads and stores move whole vectors) and which keys each row sees."""
    cols = start_n + tl.arange(0, BLOCK_N)
    in_row = m_valid[:, None] & (cols < cols_pad)[None, :]
    visible = cols[None, :] < n_visible[:, None]
    return row_offs[:, None] + cols[None, :], in_row, visible


@triton.jit
def _scaled_scores(S, offs, in_row, visible, qk_scale):
    """A tile of raw scores times ``qk_scale`` in fp32, -inf where the key is not visible
    (whatever S holds there: a NaN in a future key goes no further). The forward's softmax and
    the backward's recomputation of P both start here, so they agree bit for bit."""
    s = tl.load(S + offs, mask=in_row, other=0.0)
    return tl.where(visible, s.to(tl.float32) * qk_scale, float("-inf"))


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


@triton.jit
def _attention_bwd_preprocess_kernel(
    A, X, GATE, OUT, ROWSUM, PARTIAL,
    n_rows, width,
    stride_a_row, stride_a_col, stride_x_row, stride_x_col,
    HAS_GATE: tl.constexpr, WRITE_OUT: tl.constexpr, HAS_ROWSUM: tl.constexpr,
    HAS_PARTIAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Gate rows of ``[rows, E]`` matrices (rows = (t, b) of a time-major tensor):

    ``OUT = A * g`` (contiguous), ``ROWSUM[r] = sum_e A*g*X`` (fp32), and
    ``PARTIAL[pid, e] = sum_{r in the program's rows} A*X`` (fp32, summed over programs by the
    launcher: deterministic, no atomics). Backward uses it as
    ``(dO, O_u, gv) -> (dO_g, delta, dgv)`` and ``(dQ_g, q, gk) -> (dq, -, dgk)``; forward as
    ``(q, -, gk) -> q*gk`` and ``(O_u, -, gv) -> O``. Row r of A is at
    ``(r // B) * stride_t + (r % B) * stride_b``: the launcher passes ``stride_a_row`` for the
    rows of a [T*B, E] view, which exists for the time-major tensors it uses.
    Grid ``(cdiv(rows, BLOCK_R),)``; a program owns BLOCK_R rows and walks E. Nothing is saved.
    """
    pid = tl.program_id(0)
    offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    r_valid = offs_r < n_rows
    a_rows = offs_r.to(tl.int64) * stride_a_row
    x_rows = offs_r.to(tl.int64) * stride_x_row
    o_rows = offs_r.to(tl.int64) * width
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start_e in range(0, width, BLOCK_E):
        offs_e = start_e + tl.arange(0, BLOCK_E)
        e_valid = offs_e < width
        mask = r_valid[:, None] & e_valid[None, :]
        a = tl.load(A + a_rows[:, None] + offs_e[None, :] * stride_a_col, mask=mask, other=0.0)
        a = a.to(tl.float32)
        if HAS_GATE:
            g = tl.load(GATE + offs_e, mask=e_valid, other=0.0).to(tl.float32)
            ag = a * g[None, :]
        else:
            ag = a
        if WRITE_OUT:
            out_ptrs = OUT + o_rows[:, None] + offs_e[None, :]
            tl.store(out_ptrs, ag.to(OUT.dtype.element_ty), mask=mask)
        if HAS_ROWSUM or HAS_PARTIAL:
            x = tl.load(X + x_rows[:, None] + offs_e[None, :] * stride_x_col, mask=mask, other=0.0)
            x = x.to(tl.float32)
            if HAS_ROWSUM:
                total += tl.sum(ag * x, 1)
            if HAS_PARTIAL:
                tl.store(PARTIAL + pid * width + offs_e, tl.sum(a * x, 0), mask=e_valid)
    if HAS_ROWSUM:
        tl.store(ROWSUM + offs_r, total, mask=r_valid)


@triton.jit
def _attention_value_dropout_kernel(
    X, OUT, n_rows, width, stride_x_row, stride_x_col, first_row, drop_below, keep_scale,
    value_seed, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """``OUT[r, e] = X[r, e] * keep((first_row + r)*E + e) / (1 - p_v)`` over the rows
    r = (j, b) of a ``[K', B, E]`` tensor that starts at row ``first_row`` of the full
    ``[K, B, E]`` one: the dropped values W in forward (first_row 0), ``dv`` from ``dW`` in
    backward (in place, X = OUT; only the keys past the detached ones). The mask is drawn once per
    element, from the Philox key ``seed + 2**32`` (``_dropout.keep_flags`` on row
    ``first_row + r``, ``cdiv(E, 8)`` counters per row).
    Grid ``(cdiv(rows, BLOCK_R), cdiv(E, BLOCK_E))``. Nothing is saved (backward redraws the mask).
    """
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    mask = (offs_r < n_rows)[:, None] & (offs_e < width)[None, :]
    rows64 = offs_r.to(tl.int64)
    x_ptrs = X + rows64[:, None] * stride_x_row + offs_e[None, :] * stride_x_col
    x = tl.load(x_ptrs, mask=mask, other=0.0)
    elems = rows64[:, None] * width + offs_e[None, :]
    keep = keep_flags(value_seed, rows64 + first_row, tl.cdiv(width, 8), tl.program_id(1) * BLOCK_E,
                      drop_below, BLOCK_R, BLOCK_E)
    out = tl.where(keep, x.to(tl.float32) * keep_scale, 0.0)
    tl.store(OUT + elems, out.to(OUT.dtype.element_ty), mask=mask)


# Launch parameters. These passes are memory-bound: one config each, no autotuning (nothing to
# gain at this arithmetic intensity, and nothing to fail inside CUDA-graph capture). Each thread
# holds 8-16 elements of a tile; tools/compile_triton.py (sm_90 and sm_80, every dtype and
# switch) reports 32-96 registers and no spills, so 5+ programs of 4 warps fit per SM.
def _row_blocks() -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the row passes over the scores."""
    return (8, 32, 4) if interpreter_enabled() else (2, 512, 4)


def _rows_blocks(width: int, block_r: int) -> Tuple[int, int, int]:
    """(BLOCK_R, BLOCK_E, num_warps) of the elementwise [rows, E] kernels."""
    if interpreter_enabled():
        return 16, max(16, min(128, triton.next_power_of_2(width))), 4
    return block_r, max(16, min(256, triton.next_power_of_2(width))), 4


def _device_guard(device: torch.device):
    """Launch on ``device`` whatever the current CUDA device is."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _no_autocast(device: torch.device):
    # The products must run in the inputs' dtype: autocast would change the GEMMs' output dtype.
    if device.type not in ("cuda", "cpu"):
        return contextlib.nullcontext()  # meta tensors (tools/compile_triton.py)
    return torch.autocast(device_type=device.type, enabled=False)


def _batch_major(x: torch.Tensor) -> torch.Tensor:
    """``[L, B, E]`` -> ``[B, L, E]`` view (leading dimension B*E for a time-major tensor)."""
    return x.transpose(0, 1)


def _row_stride(x: torch.Tensor) -> Optional[int]:
    """Stride of row r = (t, b) when ``x [L, B, E]`` is addressable as ``[L*B, E]``, else None."""
    length, batch, _ = x.shape
    if batch == 1 or x.stride(0) == batch * x.stride(1):
        return x.stride(1) if batch > 1 else x.stride(0) if length > 1 else 1
    if length == 1:
        return x.stride(1)
    return None


def _as_rows(x: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
    """(tensor, row stride, column stride) for the row kernels; copies only when the [L, B, E]
    tensor cannot be addressed as [L*B, E] rows (e.g. a batch-first view)."""
    stride = _row_stride(x)
    if stride is None:
        x = x.contiguous()
        stride = x.stride(1) if x.shape[1] > 1 else x.shape[2]
    return x, stride, x.stride(2)


def _gate_rows(
    a: torch.Tensor,
    gate: Optional[torch.Tensor],
    x: Optional[torch.Tensor] = None,
    write_out: bool = True,
    rowsum: bool = False,
    partial: bool = False,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Launch ``_attention_bwd_preprocess_kernel`` over the rows of ``a [L, B, E]``.
    Returns (``a * gate`` contiguous [L, B, E] or None, rowsum [L, B] fp32 or None,
    ``sum_rows(a * x)`` [E] fp32 or None)."""
    length, batch, width = a.shape
    n_rows = length * batch
    block_r, block_e, warps = _rows_blocks(width, 8)
    programs = triton.cdiv(n_rows, block_r)
    a_rows, a_stride_row, a_stride_col = _as_rows(a)
    if x is not None:
        x_rows, x_stride_row, x_stride_col = _as_rows(x)
    else:
        x_rows, x_stride_row, x_stride_col = a_rows, 0, 0
    out = empty(length, batch, width, dtype=a.dtype, device=a.device) if write_out else None
    sums = empty(length, batch, dtype=torch.float32, device=a.device) if rowsum else None
    parts = empty(programs, width, dtype=torch.float32, device=a.device) if partial else None
    _attention_bwd_preprocess_kernel[(programs,)](
        a_rows, x_rows, gate if gate is not None else a_rows,
        out if out is not None else a_rows, sums if sums is not None else a_rows,
        parts if parts is not None else a_rows,
        n_rows, width, a_stride_row, a_stride_col, x_stride_row, x_stride_col,
        HAS_GATE=gate is not None, WRITE_OUT=write_out, HAS_ROWSUM=rowsum, HAS_PARTIAL=partial,
        BLOCK_R=block_r, BLOCK_E=block_e, num_warps=warps,
    )
    return out, sums, parts.sum(0) if parts is not None else None


def _drop_values(
    x: torch.Tensor, p: float, seed: int, out: Optional[torch.Tensor] = None, first_key: int = 0
) -> torch.Tensor:
    """``dropout(x)`` with the value stream of ``seed`` into ``out`` (contiguous [K', B, E]);
    ``x`` holds keys ``first_key..first_key+K'-1`` of the full value tensor (the mask is the
    full tensor's)."""
    key_len, batch, width = x.shape
    x_rows, stride_row, stride_col = _as_rows(x)
    if out is None:
        out = empty(key_len, batch, width, dtype=x.dtype, device=x.device)
    block_r, block_e, warps = _rows_blocks(width, 4)
    grid = (triton.cdiv(key_len * batch, block_r), triton.cdiv(width, block_e))
    _attention_value_dropout_kernel[grid](
        x_rows, out, key_len * batch, width, stride_row, stride_col, first_key * batch,
        drop_below(p), keep_scale(p), seed + _VALUE_STREAM, BLOCK_R=block_r, BLOCK_E=block_e, num_warps=warps,
    )
    return out


def _blocks(seq_len: int, key_len: int, rows: int) -> List[Tuple[int, int, int]]:
    """``(t0, t1, key_cols)`` for queries t0..t1-1 in blocks of ``rows``, each against the keys
    0..key_cols-1 = t1 + M - 1 it can see."""
    memory_len = key_len - seq_len
    return [
        (t0, min(t0 + rows, seq_len), min(t0 + rows, seq_len) + memory_len)
        for t0 in range(0, seq_len, rows)
    ]


def _triangle_blocks(seq_len: int, key_len: int) -> List[Tuple[int, int, int]]:
    """The query blocks of the one-buffer path: ``TRIANGLE_BLOCKS`` blocks (of a multiple of 128
    rows when they hold >= 128), so every product skips the masked block triangle of the
    segment. A function of (T, K) alone: forward and backward agree on which parts of the saved
    [B, T, K] buffers are written."""
    rows = -(-seq_len // TRIANGLE_BLOCKS)
    if rows >= 128:
        rows = -(-rows // 128) * 128
    return _blocks(seq_len, key_len, rows)


def _plan(batch: int, seq_len: int, key_len: int, dtype: torch.dtype) -> List[Tuple[int, int, int]]:
    """Query chunks ``(t0, t1, key_cols)``: rows t0..t1-1 against keys 0..key_cols-1 (all the
    keys they can see): the triangle blocks of one [B, T, K] buffer when it fits
    ``SCORE_BUDGET_BYTES``, else chunks of their own buffers."""
    if _fits(batch, seq_len, key_len, dtype):
        return _triangle_blocks(seq_len, key_len)
    per_row = batch * _pad(key_len) * _itemsize(dtype)
    rows = max(1, SCORE_BUDGET_BYTES // per_row)
    if rows >= 128:
        rows -= rows % 64  # whole GEMM tiles
    return _blocks(seq_len, key_len, rows)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def _fits(batch, seq_len, key_len, dtype) -> bool:
    return batch * seq_len * _pad(key_len) * _itemsize(dtype) <= SCORE_BUDGET_BYTES


def _launch_rows(kernel, rows: int, batch: int, *args, **kwargs) -> None:
    block_m, block_n, warps = _row_blocks()
    grid = (triton.cdiv(rows, block_m) * batch,)
    kernel[grid](*args, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, **kwargs)


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


def _pad(cols: int) -> int:
    """Row stride of the score buffers: ``cols`` rounded up to a multiple of 16 elements, so
    that every row starts 32-byte aligned and the row passes load and store whole vectors of
    8 (their masks change only at multiples of 16 columns)."""
    return -(-cols // 16) * 16


def _buffer_size(batch: int, seq_len: int, key_len: int, plan, single: bool) -> int:
    """Elements of one score buffer: the saved ``[B, T, pad(K)]`` one (the blocks' masked
    corners past ``pad(cols)`` stay unwritten) or the largest chunk's ``[B, rows, pad(cols)]``."""
    if single:
        return batch * seq_len * _pad(key_len)
    return max(batch * (t1 - t0) * _pad(cols) for t0, t1, cols in plan)


def _scores_view(
    buffer: torch.Tensor, batch: int, seq_len: int, key_len: int, single: bool, t0: int, t1: int,
    cols: int,
) -> torch.Tensor:
    """The ``[B, t1-t0, cols]`` scores of a block: a view into the saved [B, T, pad(K)] buffer
    in the one-buffer path, else into the head of a chunk-sized buffer with row stride
    ``pad(cols)``. The row pass may read and write up to column ``pad(cols)`` of each row."""
    if single:
        return buffer.view(batch, seq_len, _pad(key_len))[:, t0:t1, :cols]
    rows = t1 - t0
    return buffer[: batch * rows * _pad(cols)].view(batch, rows, _pad(cols))[:, :, :cols]


def _accumulate(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """``out = a @ b`` (first chunk) or ``out += a @ b``, batched, in place."""
    if first:
        torch.bmm(a, b, out=out)
    else:
        out.baddbmm_(a, b)


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
        live_len = key_len - detached
        vdrop = value_dropout_p > 0.0 and live_len > 0
        # dk_live, dv_live: the gradients of keys and values detached..K-1 (row r: key
        # detached + r). dv_live holds dW = P_d^T dO_g until the value-dropout pass.
        if combine:
            # One gradient for the segment, dk + dv: no rows for the detached keys at all. The
            # dk products write it; with saved scores dv goes first (into it, or into a scratch
            # the value-dropout pass reads) and the dk products accumulate onto it in their
            # epilogue (beta = 1); chunked, dk and dv accumulate apart and are added at the end.
            d_segment = dk_live = empty(live_len, batch, width, dtype=dtype, device=device)
            dv_live = d_segment if saved and not vdrop else empty(
                live_len, batch, width, dtype=dtype, device=device
            )
        else:
            dk = empty(key_len, batch, width, dtype=k.dtype, device=device)
            dv = empty(key_len, batch, width, dtype=v.dtype, device=device)
            # Rows of detached keys: an exact zero gradient, one memset each, no product.
            dk[:detached].zero_()
            dv[:detached].zero_()
            dk_live, dv_live = dk[detached:], dv[detached:]
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
            # Keys j0..j1-1 first seen by block (t0, t1) are seen by queries t0.. only: one
            # product each for dv and dk over that rectangle, written once (the masked entries
            # inside it were written as 0 by the row passes).
            grad_full = grad_scores.view(batch, seq_len, _pad(key_len))
            p_full = dropped if attn_dropout else probs
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
            if vdrop:
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
