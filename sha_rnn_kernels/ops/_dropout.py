"""Dropout flags shared by the Triton kernels: eight keep flags per Philox call.

``tl.rand`` spends one Philox-4x32-10 call (~60 integer instructions in the compiled SASS) on
every element and keeps 32 of its 128 bits. Where a pass does little else per element that
call is most of its instruction stream: the attention's row pass compiled to ~81 instructions
per score with it against ~13 without, so at the paper shape it was issue-bound (~0.25 ms of
instruction issue on an H100 against ~0.15 ms of HBM traffic, an estimate from the SASS and the
byte count). Here one call serves eight consecutive elements of a row: each of its four 32-bit
words gives two 16-bit uniforms, and an element is kept when its uniform is
``>= drop_below = round(p * 65536)``, so the drop probability is ``p`` rounded to a multiple of
``2**-16`` (the inverted-dropout scale stays ``1 / (1 - p)``).

The flags of element ``(row, col)`` come from the Philox counter ``row * cdiv(width, 8) +
col // 8`` (a kernel may fold further indices into ``row``) and lane ``col % 8``: they depend on
the seed and the element's indices only, never on a kernel's tiles, so every kernel and every
chunking of the work sees the same mask.
"""

import triton
import triton.language as tl


@triton.jit
def _keep_pair(word, drop_below):
    """Two keep flags from one 32-bit Philox word: bit 0 from its low half, bit 1 from its high."""
    word = word.to(tl.uint32, bitcast=True)
    low = ((word & 0xFFFF) >= drop_below).to(tl.int32)
    high = ((word >> 16) >= drop_below).to(tl.int32)
    return low | (high << 1)


@triton.jit
def dropout_bits(seed, counters, drop_below):
    """The keep flags of the eight elements of each Philox counter, as the low byte of an int32
    (bit ``l``: lane ``l``, i.e. column ``8 * group + l``). One ``tl.randint4x`` call per counter;
    word ``w`` gives lanes ``2w`` (low half) and ``2w + 1`` (high half)."""
    w0, w1, w2, w3 = tl.randint4x(seed, counters)
    return (_keep_pair(w0, drop_below) | (_keep_pair(w1, drop_below) << 2)
            | (_keep_pair(w2, drop_below) << 4) | (_keep_pair(w3, drop_below) << 6))


@triton.jit
def unpack_keep(bits, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``[BLOCK_M, BLOCK_N // 8]`` flag bytes to booleans ``[BLOCK_M, BLOCK_N]``."""
    # A trailing lane axis of 8, then the row-major reshape: lane l of group q is column 8q + l.
    lane = tl.arange(0, 8)
    keep = ((bits.to(tl.int32)[:, :, None] >> lane[None, None, :]) & 1) != 0
    return tl.reshape(keep, (BLOCK_M, BLOCK_N))


@triton.jit
def keep_flags(seed, rows64, groups, col0, drop_below, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keep flags ``[BLOCK_M, BLOCK_N]`` of rows ``rows64`` (int64 row indices, each row
    ``groups = cdiv(width, 8)`` counters long) and columns ``col0 + [0, BLOCK_N)``
    (``col0 % 8 == 0``, ``BLOCK_N % 8 == 0``)."""
    group = col0 // 8 + tl.arange(0, BLOCK_N // 8)
    counters = rows64[:, None] * groups + group[None, :]
    return unpack_keep(dropout_bits(seed, counters, drop_below), BLOCK_M, BLOCK_N)


def drop_below(dropout_p: float) -> int:
    """The kernels' integer threshold: a 16-bit uniform below it drops its element, so the drop
    probability is ``dropout_p`` rounded to a multiple of 2**-16 (0 keeps everything, 65536
    drops everything)."""
    return round(dropout_p * 65536)


def keep_scale(dropout_p: float) -> float:
    """``1 / (1 - p)``, the inverted-dropout scale; 0 when everything is dropped (p = 1)."""
    return 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0
