"""What the attention's forward and backward share: the query plan, the score buffers' layout,
the row-pass helpers and the two elementwise row kernels (gates, value dropout) with their
launchers. The op, its grids and what it saves: :mod:`.attention`; the design:
docs/design/attention.md.
"""

import contextlib
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .._backend import interpreter_enabled
from ._common import empty
from ._dropout import drop_below, keep_flags, keep_scale

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
# switch) reports 18-96 registers and no spills, so 5+ programs of 4 warps fit per SM.
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


# Largest [B, T_chunk, K_chunk] score buffer, in bytes: larger problems run in chunks of queries.
# The one copy of the setting; ``ops.attention.SCORE_BUDGET_BYTES`` reads and writes it (tests
# and tools/compile_triton.py lower it there to force the chunked path).
SCORE_BUDGET_BYTES = 1 << 29


def _score_budget() -> int:
    """:data:`SCORE_BUDGET_BYTES`, read at each call so that a changed setting takes effect."""
    return SCORE_BUDGET_BYTES


def _plan(batch: int, seq_len: int, key_len: int, dtype: torch.dtype) -> List[Tuple[int, int, int]]:
    """Query chunks ``(t0, t1, key_cols)``: rows t0..t1-1 against keys 0..key_cols-1 (all the
    keys they can see): the triangle blocks of one [B, T, K] buffer when it fits
    ``attention.SCORE_BUDGET_BYTES``, else chunks of their own buffers."""
    if _fits(batch, seq_len, key_len, dtype):
        return _triangle_blocks(seq_len, key_len)
    per_row = batch * _pad(key_len) * _itemsize(dtype)
    rows = max(1, _score_budget() // per_row)
    if rows >= 128:
        rows -= rows % 64  # whole GEMM tiles
    return _blocks(seq_len, key_len, rows)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def _fits(batch, seq_len, key_len, dtype) -> bool:
    return batch * seq_len * _pad(key_len) * _itemsize(dtype) <= _score_budget()


def _launch_rows(kernel, rows: int, batch: int, *args, **kwargs) -> None:
    block_m, block_n, warps = _row_blocks()
    grid = (triton.cdiv(rows, block_m) * batch,)
    kernel[grid](*args, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, **kwargs)



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

