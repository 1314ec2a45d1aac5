"""The Boom feed-forward on the GPU: ``y = sum_k chunk_k(dropout(gelu(x W^T + b)))``.

``x [..., E]``, ``W [F, E]``, ``b [F]``; GELU is ``h * sigmoid(1.702 h)``; the ``F``-wide
activation is cut into ``C = F // E`` chunks of width ``E`` that are summed, and the trailing
``F % E`` columns are dropped (their pre-activation is never computed). Write ``F' = C * E`` for
the columns that count and ``M`` for the number of rows of ``x``.

Forward, two designs (``boom(..., fused=)``):

* split (default): one cuBLAS GEMM (``torch.addmm``) writes the pre-activation
  ``h = x W[:F']^T + b`` in the input dtype, then ``_boom_sum_kernel`` reads it once and writes
  ``y`` (GELU, dropout and the chunk sum in fp32 registers). In training ``h`` is exactly what
  the backward needs, so the GEMM's output is saved, not written twice.
* fused (``fused=True``): ``_boom_fwd_kernel``, one Triton GEMM whose programs own a tile of the
  E-wide ``y`` and loop over the ``C`` chunks, each chunk's GELU and dropout applied to the fp32
  accumulator before it is added to a second fp32 tile; the F-wide activation is written only
  when autograd needs ``h``. Its dropout flags come from ``_boom_mask_kernel`` (see there).

Backward (``dY`` is ``[M, E]``; ``mask`` the forward's dropout mask, regenerated from the seed)::

    dU = broadcast(dY) * mask / (1 - p) * gelu'(h)      [M, F'], zero on the dropped F % E columns
    dX = dU W[:F']       dW[:F'] = dU^T X       dW[F':] = 0       db = sum_rows dU

``_boom_bwd_kernel`` makes ``dU`` (input dtype) and per-tile column sums for ``db`` in one
memory-bound pass; the two GEMMs are ``torch.mm`` (cuBLAS).

Dropout: element ``(row, chunk c, column n)`` is kept when its 16-bit uniform is
``>= round(p * 65536)`` (so p is rounded to a multiple of 2**-16, at most 7.6e-6 away), and kept
values are scaled by ``1 / (1 - p)``. One Philox-4x32-10 call (``tl.randint4x``) with counter
``(row * C + c) * cdiv(E, 8) + n // 8`` serves eight neighbouring columns (two 16-bit halves of
each of its four words): a quarter of the integer work of one 32-bit uniform per element. The
mask depends only on ``(seed, row, c, n)``, never on the tiling, so every kernel computes the
same one; it is never saved. The seed is a host integer baked into each launch: a CUDA graph
that captures a training step replays the same mask on every replay (draw the seed outside the
graph and re-capture, or leave the Boom out of the graph; seed and offset are not read from a
device tensor).

Autotuning (the fused kernel only; cuBLAS and the memory-bound kernels have fixed tiles): the key
holds E, C, the dropout and save-``h`` switches and the row count rounded up to a power of two
(``_common.rows_bucket``), so a config tuned for eval is never reused in training. A first launch
of a key inside CUDA-graph capture cannot time configs: it launches the first config that
``_prune`` keeps (the 128x128 tile on Hopper) without tuning (``_common.launch_autotuned``). Warm
up outside the capture to use the tuned config.

Precision: bf16/fp16 operands, fp32 accumulation, fp32 GELU/dropout/sum, one rounding of ``y``;
the split design rounds h to the input dtype before the GELU, as PyTorch does, the fused one
applies it to the fp32 accumulator. fp32 inputs: IEEE fp32 products in the fused kernel; cuBLAS
follows ``torch.backends.cuda.matmul.allow_tf32``. Under ``TRITON_INTERPRET=1`` (triton 3.9)
``tl.dot`` on bfloat16 tiles multiplies their raw 16-bit patterns, so there (and only there) the
fused kernel widens bf16 tiles to fp32 before the dot (the same products, fp32 accumulation).

Why split is the default, the FLOP, byte and issue budgets, the estimates with their method and
date, the compiled registers and the alternatives weighed: docs/design/boom.md.
"""

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl

from .._backend import interpreter_enabled, triton_reason
from . import _common
from ._dropout import drop_below as _drop_below
from ._dropout import dropout_bits, unpack_keep
from ._dropout import keep_scale as _keep_scale

__all__ = ["boom", "unsupported_reason", "boom_forward", "boom_backward", "dropout_mask"]


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _dropout_keep(seed, rows64, chunk, chunks, col0, groups, drop_below, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keep flags ``[BLOCK_M, BLOCK_N]`` of rows ``rows64`` and columns ``col0 + [0, BLOCK_N)``
    of ``chunk`` (``col0 % 8 == 0``), from Philox (``_dropout.dropout_bits``)."""
    group = col0 // 8 + tl.arange(0, BLOCK_N // 8)
    counters = (rows64[:, None] * chunks + chunk) * groups + group[None, :]
    return unpack_keep(dropout_bits(seed, counters, drop_below), BLOCK_M, BLOCK_N)


@triton.jit
def _boom_mask_kernel(
    MASK, ROWS, GROUPS, seed, drop_below,
    BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """The dropout mask for the fused forward, packed eight flags to a byte: ``MASK[r, g]``
    (``[M * C, cdiv(E, 8)]`` uint8, row ``r = row * C + chunk``) holds the keep flags of columns
    ``8g .. 8g + 7`` of that row's chunk (``_dropout.dropout_bits``: the same flags as everywhere).

    Grid: ``(cdiv(M * C, BLOCK_R), cdiv(cdiv(E, 8), BLOCK_G))``; each program owns a
    ``[BLOCK_R, BLOCK_G]`` block of bytes. ``_boom_fwd_kernel`` reads them in its epilogue: in
    the GEMM's accumulator layout Triton would recompute each Philox call in the four threads
    that share its eight columns, so the mask is made here once, in a layout without that
    replication. It is transient (the backward regenerates its flags).
    """
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    offsets = r.to(tl.int64)[:, None] * GROUPS + g[None, :]
    bits = dropout_bits(seed, offsets, drop_below)
    ok = (r[:, None] < ROWS) & (g[None, :] < GROUPS)
    tl.store(MASK + offsets, bits.to(tl.uint8), mask=ok)


@triton.jit
def _load_keep(MASK, row0, M, chunk, chunks, col0, groups, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keep flags ``[BLOCK_M, BLOCK_N]`` of rows ``row0 + [0, BLOCK_M)`` and columns
    ``col0 + [0, BLOCK_N)`` of ``chunk`` (``col0 % 8 == 0``), unpacked from
    ``_boom_mask_kernel``'s bytes (rows past ``M`` read as dropped)."""
    tile_rows = tl.arange(0, BLOCK_M)
    group = col0 // 8 + tl.arange(0, BLOCK_N // 8)
    ok = (row0 + tile_rows < M)[:, None] & (group < groups)[None, :]
    # A 64-bit base for the tile and 32-bit offsets within it (fewer live registers).
    base = MASK + row0.to(tl.int64) * chunks * groups + chunk * groups
    bits = tl.load(base + (tile_rows * chunks * groups)[:, None] + group[None, :], mask=ok, other=0)
    return unpack_keep(bits, BLOCK_M, BLOCK_N)


def _fwd_configs():
    # Two fp32 [BLOCK_M, BLOCK_N] tiles (the chunk's GEMM accumulator and the running chunk sum)
    # live in registers for the whole program, so 128x128 (2 x 64 fp32 per thread at 8 warps)
    # is the largest tile: 128x256 would need the whole register file for the two tiles.
    configs = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
        # fp32 training (h saved): the 64x64 tile spills there.
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
        # Narrow layers (E <= 32): a 16-wide output tile and a short reduction step.
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 8}, num_warps=4, num_stages=3),
    ]
    # Small tiles under the interpreter so that the odd test shapes cross tile edges in every
    # dimension (rows, output columns and the reduction).
    interpreted = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2})
    return _common.autotune_configs(configs, interpreted)


def _prune(configs, named_args, **kwargs):
    """The configs worth timing for these arguments (register counts and spills from
    tools/compile_triton.py, sm_90 and sm_80, paper shape): fp32 (IEEE dots) keeps only
    64x64x32; sm_8x drops 128x128; E <= 32 keeps only the 16-wide tile (wider ones are mostly
    masked work, and spill); otherwise tiles taller than the row bucket go when a shorter one
    remains; in training (h saved) the tiles that spill under triton 3.6 or 3.9 go too. The
    first config kept is the one a CUDA-graph capture launches untuned."""
    if len(configs) == 1:  # the interpreter's single config
        return configs
    x = named_args["X"]
    fp32 = x.dtype == torch.float32
    # Training (the tile also writes h, and usually draws dropout) adds live registers: the
    # configs that spill there go (tools/compile_triton.py --max-spill 0: 128x128 spills 8-72 B
    # on sm_90 and 168-200 B on sm_80; 64x64x64 with dropout 20 B on sm_80 under triton 3.9
    # and 32 B on sm_90 under 3.6; 64x64x32 4 B on sm_80 under 3.6; fp32's 64x64x32 4-60 B).
    training = bool(kwargs.get("SAVE_PRE", False))
    dropout = bool(kwargs.get("HAS_DROPOUT", False))
    width, rows = named_args["E"], named_args["ROWS_BUCKET"]
    # Without wgmma (sm_80) the 128x128 tile spills 170-200 B; Hopper keeps it.
    capability = _common.target_capability(x.device)
    ampere = capability is not None and capability[0] < 9

    def fits(c):
        block_m, block_n, block_k = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if width <= 32:
            return block_n == 16
        if block_n == 16:
            return False
        if fp32:
            if training:
                return (block_m, block_n, block_k) == (32, 64, 32)
            return block_m * block_n == 64 * 64 and block_k <= 32
        if block_m == 32:
            return False
        if (ampere or training) and block_m * block_n > 128 * 64:
            return False
        if training and dropout and (block_m, block_n, block_k) == (64, 64, 64):
            return False
        if ampere and training and (block_m, block_n, block_k) == (64, 64, 32):
            return False
        return block_m <= max(64, rows)

    return [c for c in configs if fits(c)] or [configs[-1]]


@triton.autotune(configs=_fwd_configs(), key=["E", "C", "ROWS_BUCKET", "HAS_DROPOUT", "SAVE_PRE"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _boom_fwd_kernel(
    X, W, B, Y, PRE, MASK,
    M, E, C, ROWS_BUCKET,
    stride_xm, stride_xk, stride_wf, stride_wk, stride_ym, stride_pm,
    keep_scale,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, SAVE_PRE: tl.constexpr,
    DOT_IEEE: tl.constexpr, DOT_UPCAST: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Boom forward: ``Y = sum_c dropout(gelu(X W[cE:(c+1)E]^T + b[cE:(c+1)E]))``.

    Grid: ``cdiv(M, BLOCK_M) * cdiv(E, BLOCK_N)`` programs on one axis, in grouped order: runs
    of ``GROUP_M`` row tiles sweep the column tiles together so that the ``W`` rows they share
    stay in L2 (``ROWS_BUCKET`` is only an autotune key).

    Each program owns output tile ``Y[m0:m0+BLOCK_M, n0:n0+BLOCK_N]``. For every chunk ``c`` it
    accumulates ``X[m-tile, :] @ W[c*E + n-tile, :]^T`` over ``E`` in fp32 (the columns
    ``n, n+E, n+2E, ...`` of the F-wide activation), adds the bias, applies
    ``h * sigmoid(1.702 h)`` and dropout (flags from ``_boom_mask_kernel``'s bytes, read with
    ``_load_keep``), and adds the result into an fp32 sum that is stored once, after the last chunk. Rows and columns
    past the edges load clamped (in-bounds) addresses instead of masks, so the K loop carries no
    predicates; their results are never stored. ``EVEN_K`` (``E % BLOCK_K == 0``) drops the
    reduction mask as well.

    Saved for backward (``SAVE_PRE``): the pre-activation ``PRE = X W[:F']^T + b`` in the input
    dtype, so that ``gelu'`` needs no GEMM in the backward (recomputing h there would be a
    fourth 137-GFLOP GEMM at the paper's shape to save a 134 MB write and read, ~90 us).
    Nothing else is saved: the backward regenerates the dropout mask from the seed. Backward formulas (see ``_boom_bwd_kernel``):
    ``dX = dU W[:F']``, ``dW[:F'] = dU^T X``, ``db = sum_rows dU``.
    """
    pid = tl.program_id(0)
    row_tiles = tl.cdiv(M, BLOCK_M)
    col_tiles = tl.cdiv(E, BLOCK_N)
    # Grouped order: consecutive programs walk down a band of GROUP_M row tiles before moving
    # to the next column tile.
    band_size = GROUP_M * col_tiles
    band = pid // band_size
    first_row_tile = band * GROUP_M
    band_rows = tl.minimum(row_tiles - first_row_tile, GROUP_M)
    in_band = pid - band * band_size
    pid_m = first_row_tile + in_band % band_rows
    pid_n = in_band // band_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < E
    # Clamped addresses for the loads: an edge tile re-reads the last row / column.
    x_tile = X + tl.minimum(rows, M - 1).to(tl.int64)[:, None] * stride_xm + ks[None, :] * stride_xk
    w_tile = W + tl.minimum(cols, E - 1)[None, :] * stride_wf + ks[:, None] * stride_wk
    out_ok = row_ok[:, None] & col_ok[None, :]
    mask_groups = tl.cdiv(E, 8)

    y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c in range(C):
        x_ptrs = x_tile
        w_ptrs = w_tile + c * E * stride_wf
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, E, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptrs)
                w = tl.load(w_ptrs)
            else:
                k_ok = k0 + ks < E
                x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
            if DOT_UPCAST:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            if DOT_IEEE:
                acc = tl.dot(x, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w, acc)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
        if HAS_BIAS:
            acc += tl.load(B + c * E + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if SAVE_PRE:
            pre_tile = PRE + (pid_m * BLOCK_M).to(tl.int64) * stride_pm + tl.arange(0, BLOCK_M)[:, None] * stride_pm
            tl.store(pre_tile + (c * E + cols)[None, :], acc.to(PRE.dtype.element_ty), mask=out_ok)
        act = acc * tl.sigmoid(1.702 * acc)
        if HAS_DROPOUT:
            keep = _load_keep(MASK, pid_m * BLOCK_M, M, c, C, pid_n * BLOCK_N, mask_groups, BLOCK_M, BLOCK_N)
            act = tl.where(keep, act * keep_scale, 0.0)
        y += act
    # A 64-bit tile base and 32-bit offsets within the tile: fewer registers live to the end.
    tile_rows = tl.arange(0, BLOCK_M)
    y_tile = Y + (pid_m * BLOCK_M).to(tl.int64) * stride_ym + tile_rows[:, None] * stride_ym + cols[None, :]
    tl.store(y_tile, y.to(Y.dtype.element_ty), mask=(pid_m * BLOCK_M + tile_rows < M)[:, None] & col_ok[None, :])


@triton.jit
def _boom_sum_kernel(
    PRE, Y,
    M, E, C,
    stride_pm, stride_ym,
    seed, drop_below, keep_scale,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Boom forward, second half of the split design: ``Y = sum_c dropout(gelu(PRE[:, cE:(c+1)E]))``
    from the pre-activation ``PRE = X W[:F']^T + b`` that a cuBLAS GEMM wrote (input dtype).

    Grid: ``(cdiv(M, BLOCK_M), cdiv(E, BLOCK_N))``. Each program owns ``Y[m-tile, n-tile]``: for
    every chunk it reads the ``PRE`` tile, applies ``h * sigmoid(1.702 h)`` and dropout (flags
    from Philox, ``_dropout_keep``) in fp32 and adds the result into an fp32 sum, stored once.
    Memory-bound: it reads ``PRE`` once and writes ``Y``, and the sigmoid and Philox work fits
    under that memory time. Nothing is saved here (the caller keeps ``PRE`` for the backward,
    which regenerates the mask from ``seed``).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows64 = rows.to(tl.int64)
    tile_ok = (rows < M)[:, None] & (cols < E)[None, :]
    mask_groups = tl.cdiv(E, 8)
    y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c in range(C):
        h = tl.load(PRE + rows64[:, None] * stride_pm + (c * E + cols)[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        act = h * tl.sigmoid(1.702 * h)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rows64, c, C, pid_n * BLOCK_N, mask_groups, drop_below, BLOCK_M, BLOCK_N)
            act = tl.where(keep, act * keep_scale, 0.0)
        y += act
    tl.store(Y + rows64[:, None] * stride_ym + cols[None, :], y.to(Y.dtype.element_ty), mask=tile_ok)


@triton.jit
def _boom_bwd_kernel(
    DY, PRE, DU, DB_PARTIAL,
    M, E, C,
    stride_dym, stride_dyn, stride_pm, stride_um,
    seed, drop_below, keep_scale,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Boom backward, the part between ``dY`` and the GEMMs:
    ``dU[:, cE + n] = dY[:, n] * mask * keep_scale * gelu'(PRE[:, cE + n])`` and column sums.

    ``gelu'(h) = s + 1.702 h s (1 - s)`` with ``s = sigmoid(1.702 h)``.

    Grid: ``(cdiv(M, BLOCK_M), cdiv(E, BLOCK_N))``. Each program owns rows ``m0:m0+BLOCK_M`` and
    columns ``n0:n0+BLOCK_N`` of every chunk: it loads its ``dY`` tile once, then for each chunk
    ``c`` reads ``PRE`` (saved by the forward), regenerates the dropout mask from ``seed`` with
    the forward's Philox counters (``_dropout_keep``), writes the ``dU`` tile in the input dtype
    and the tile's fp32 column sums to ``DB_PARTIAL[pid_m, cE + n]`` (summed over row tiles by
    the launcher: ``db = sum_rows dU``).

    Recomputed: ``gelu'`` and the mask. The caller then forms ``dX = dU W[:F']`` and
    ``dW[:F'] = dU^T X`` with two GEMMs (see the module docstring for why ``dU`` is written).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < E
    rows64 = rows.to(tl.int64)
    tile_ok = row_ok[:, None] & col_ok[None, :]
    mask_groups = tl.cdiv(E, 8)

    # Rows past M read dY = 0, so their dU is 0 and the column sums need no extra mask.
    dy = tl.load(DY + rows64[:, None] * stride_dym + cols[None, :] * stride_dyn, mask=tile_ok, other=0.0).to(tl.float32)
    for c in range(C):
        hidden_cols = (c * E + cols)[None, :]
        h = tl.load(PRE + rows64[:, None] * stride_pm + hidden_cols, mask=tile_ok, other=0.0).to(tl.float32)
        s = tl.sigmoid(1.702 * h)
        du = dy * (s + 1.702 * h * s * (1.0 - s))
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rows64, c, C, pid_n * BLOCK_N, mask_groups, drop_below, BLOCK_M, BLOCK_N)
            du = tl.where(keep, du * keep_scale, 0.0)
        tl.store(DU + rows64[:, None] * stride_um + hidden_cols, du.to(DU.dtype.element_ty), mask=tile_ok)
        tl.store(DB_PARTIAL + pid_m * C * E + c * E + cols, tl.sum(du, axis=0), mask=col_ok)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def _on_device(device: torch.device):
    """Triton launches on the current CUDA device, which need not be the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _elementwise_blocks(width: int) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps)`` of the memory-bound kernels (sum and backward).

    ``BLOCK_N >= 16``: the mask comes in bytes of eight columns and a tile needs at least two of
    them, so E = 1 or 2 still gets a 16-wide (masked) tile."""
    if interpreter_enabled():
        return 16, max(16, min(32, triton.next_power_of_2(width))), 1
    # 8 K elements per program and chunk: rows of 256 B of bf16.
    block_n = max(16, min(128, triton.next_power_of_2(width)))
    if block_n == 16:
        # E <= 16: 64 x 16 on 4 warps. 128 x 16 on 8 warps spilled 4 B in the backward with
        # dropout on sm_90 under triton 3.6 (tools/compile_triton.py --max-spill 0).
        return 64, 16, 4
    return min(128, 8192 // block_n), block_n, 8


def dropout_mask(rows: int, width: int, chunks: int, dropout_p: float, seed: int,
                 device: torch.device) -> torch.Tensor:
    """Launch ``_boom_mask_kernel``: the packed keep flags ``[rows * chunks, cdiv(width, 8)]``
    uint8 (empty when ``dropout_p`` rounds to 0). Bit ``l`` of byte ``[row * chunks + c, g]``
    keeps column ``8g + l`` of chunk ``c``."""
    groups = triton.cdiv(width, 8)
    count = rows * chunks if _drop_below(dropout_p) > 0 else 0
    mask = torch.empty(count, groups, dtype=torch.uint8, device=device)
    if count == 0:
        return mask
    block_r, block_g, warps = (16, 16, 1) if interpreter_enabled() else (64, 32, 4)
    grid = (triton.cdiv(count, block_r), triton.cdiv(groups, block_g))
    with _on_device(device):
        _boom_mask_kernel[grid](
            mask, count, groups, seed, _drop_below(dropout_p),
            BLOCK_R=block_r, BLOCK_G=block_g, num_warps=warps,
        )
    return mask


def boom_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    dropout_p: float,
    seed: int,
    save_pre: bool,
    fused: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Boom forward. Returns ``(y [..., E], pre)``: ``pre`` is the pre-activation
    ``[M, F']`` when ``save_pre``, else empty.

    ``fused=False`` (the default, see the module docstring): ``pre`` from one cuBLAS GEMM
    (``torch.addmm``), then ``_boom_sum_kernel``. ``fused=True``: ``_boom_fwd_kernel`` alone,
    which never writes the F-wide activation unless ``save_pre``.
    """
    width = x.shape[-1]
    chunks = weight.shape[0] // width
    hidden = chunks * width
    x2d = x.reshape(-1, width)
    rows = x2d.shape[0]
    y = _common.empty(rows, width, dtype=x.dtype, device=x.device)
    has_dropout = _drop_below(dropout_p) > 0
    if not fused:
        w = weight[:hidden]
        pre = torch.addmm(bias[:hidden], x2d, w.t()) if bias is not None else torch.mm(x2d, w.t())
        if rows > 0:
            block_m, block_n, warps = _elementwise_blocks(width)
            with _on_device(x.device):
                _boom_sum_kernel[(triton.cdiv(rows, block_m), triton.cdiv(width, block_n))](
                    pre, y,
                    rows, width, chunks,
                    pre.stride(0), y.stride(0),
                    seed, _drop_below(dropout_p), _keep_scale(dropout_p),
                    HAS_DROPOUT=has_dropout,
                    BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
                )
        # Without autograd the pre-activation is a temporary: drop it here, not in the caller.
        return y.view(x.shape), pre if save_pre else pre.new_empty(0, 0)

    pre = _common.empty(rows if save_pre else 0, hidden if save_pre else 0,
                        dtype=x.dtype, device=x.device)
    if rows == 0:
        return y.view(x.shape), pre
    mask = dropout_mask(rows, width, chunks, dropout_p, seed, x.device)
    upcast = interpreter_enabled() and x.dtype == torch.bfloat16
    bias = bias.contiguous() if bias is not None else None

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(width, meta["BLOCK_N"]),)

    bucket = _common.rows_bucket(rows)
    args = (
        x2d, weight, bias if bias is not None else weight, y, pre if save_pre else y,
        mask if has_dropout else y,
        rows, width, chunks, bucket,
        x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1), y.stride(0),
        pre.stride(0) if save_pre else 0,
        _keep_scale(dropout_p),
    )
    # Every config's BLOCK_K divides 64 (the narrow one is used only for E <= 32, and the
    # interpreter's is 16): E % 64 == 0 means no partial reduction step.
    even_k = width % (16 if interpreter_enabled() else 64) == 0
    kwargs = dict(
        HAS_BIAS=bias is not None, HAS_DROPOUT=has_dropout, SAVE_PRE=save_pre,
        DOT_IEEE=x.dtype == torch.float32 or upcast, DOT_UPCAST=upcast, EVEN_K=even_k,
    )
    key = ("boom_fwd", x.dtype, width, chunks, bucket, has_dropout, save_pre, bias is not None)
    with _on_device(x.device):
        _common.launch_autotuned(_boom_fwd_kernel, grid, args, kwargs, key, x.device)
    return y.view(x.shape), pre


def boom_backward(
    grad_y: torch.Tensor, pre: torch.Tensor, dropout_p: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch ``_boom_bwd_kernel``. Returns ``(dU [M, F'] in pre's dtype, db [F'] in fp32)``."""
    width = grad_y.shape[-1]
    rows, hidden = pre.shape
    chunks = hidden // width
    dy = grad_y.reshape(rows, width)
    du = _common.empty(rows, hidden, dtype=pre.dtype, device=pre.device)
    if rows == 0:
        return du, torch.zeros(hidden, dtype=torch.float32, device=pre.device)
    block_m, block_n, warps = _elementwise_blocks(width)
    row_tiles = triton.cdiv(rows, block_m)
    partial = _common.empty(row_tiles, hidden, dtype=torch.float32, device=pre.device)
    with _on_device(pre.device):
        _boom_bwd_kernel[(row_tiles, triton.cdiv(width, block_n))](
            dy, pre, du, partial,
            rows, width, chunks,
            dy.stride(0), dy.stride(1), pre.stride(0), du.stride(0),
            seed, _drop_below(dropout_p), _keep_scale(dropout_p),
            HAS_DROPOUT=_drop_below(dropout_p) > 0,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        )
    return du, partial.sum(0)


# --------------------------------------------------------------------------------------------
# torch.library registration (autograd, fake tensors): torch.compile keeps these ops whole
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("sha_rnn_kernels::boom_fwd", mutates_args=())
def _boom_fwd_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    dropout_p: float,
    seed: int,
    save_pre: bool,
    fused: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return boom_forward(x, weight, bias, dropout_p, seed, save_pre, fused)


@_boom_fwd_op.register_fake
def _(x, weight, bias, dropout_p, seed, save_pre, fused):
    width = x.shape[-1]
    rows = x.numel() // width
    chunks = weight.shape[0] // width
    pre_shape = (rows, chunks * width) if save_pre else (0, 0)
    return x.new_empty(x.shape), x.new_empty(pre_shape)


@torch.library.custom_op("sha_rnn_kernels::boom_bwd", mutates_args=())
def _boom_bwd_op(
    grad_y: torch.Tensor, pre: torch.Tensor, dropout_p: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return boom_backward(grad_y, pre, dropout_p, seed)


@_boom_bwd_op.register_fake
def _(grad_y, pre, dropout_p, seed):
    return pre.new_empty(pre.shape), pre.new_empty((pre.shape[1],), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, bias, dropout_p, seed, save_pre, fused = inputs
    _, pre = output
    ctx.save_for_backward(x, weight, pre)
    ctx.has_bias = bias is not None
    ctx.saved_pre = save_pre
    ctx.dropout_p = dropout_p
    ctx.seed = seed


def _backward(ctx, grad_y, grad_pre):
    if not ctx.saved_pre:
        raise RuntimeError(
            "sha_rnn_kernels::boom_fwd was called with save_pre=False, so it cannot be "
            "differentiated; call sha_rnn_kernels.ops.boom.boom instead"
        )
    x, weight, pre = ctx.saved_tensors
    width = x.shape[-1]
    features = weight.shape[0]
    hidden = pre.shape[1]
    du, db = _boom_bwd_op(grad_y, pre, ctx.dropout_p, ctx.seed)
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.mm(du, weight[:hidden]).view(x.shape)
    if ctx.needs_input_grad[1]:
        grad_w = torch.mm(du.t(), x.reshape(-1, width))
        if hidden < features:  # the dropped trailing columns get no gradient
            grad_w = torch.nn.functional.pad(grad_w, (0, 0, 0, features - hidden))
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = db.to(weight.dtype)
        if hidden < features:
            grad_b = torch.nn.functional.pad(grad_b, (0, features - hidden))
    return grad_x, grad_w, grad_b, None, None, None, None


_boom_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# entry points called by sha_rnn_kernels.functional
# --------------------------------------------------------------------------------------------
def unsupported_reason(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> Optional[str]:
    """Why the Triton Boom cannot take these (already validated) inputs, or None when it can."""
    reason = triton_reason(x.device) or _common.dtype_reason(x, weight, bias)
    if reason is not None:
        return reason
    if weight.numel() >= 2**31:
        return f"weight has {weight.numel()} elements; the kernel indexes it with 32-bit offsets"
    return _common.capability_reason(x.device, x.dtype)


def boom(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    *,
    dropout_p: float,
    seed: int,
    fused: bool = False,
) -> torch.Tensor:
    """The Boom: ``sum_k chunk_k(dropout(gelu(x W^T + b)))``, differentiable.

    Args:
        x: ``[..., E]``, any strides, float32/float16/bfloat16.
        weight: ``[F, E]`` with ``F >= E``, same dtype and device.
        bias: ``[F]`` or None.
        dropout_p: drop probability (0 disables dropout).
        seed: Philox seed of the dropout mask; the same seed gives the same mask (a host
            integer baked into the launch: see the module docstring on CUDA graphs).
        fused: ``False`` (default): a cuBLAS GEMM writes the pre-activation and one Triton
            kernel applies GELU, dropout and the chunk sum. ``True``: one Triton GEMM with all
            of that in its epilogue (see the module docstring for why it is not the default).

    Returns:
        ``[..., E]`` in ``x.dtype``.

    Example:
        >>> x, w = torch.randn(7, 40, device="cuda"), torch.randn(130, 40, device="cuda")
        >>> boom(x, w, None, dropout_p=0.1, seed=3).shape
        torch.Size([7, 40])
    """
    # Store the pre-activation only when autograd will ask for it (inference writes only y).
    save_pre = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    y, _ = _boom_fwd_op(x, weight, bias, float(dropout_p), int(seed), save_pre, bool(fused))
    return y
