"""LSTM (``torch.nn.LSTM`` semantics, one layer): a fused Triton step kernel for the recurrence.

Gate order i, f, g, o; ``i, f, o = sigmoid``, ``g = tanh``; bias ``b_ih + b_hh``:
```
pre_t = x_t W_ih^T + h_{t-1} W_hh^T + b_ih + b_hh      # [B, 4H], four blocks of H columns
c_t   = f_t * c_{t-1} + i_t * g_t
h_t   = o_t * tanh(c_t)                                # out[t] = h_t
```

Forward (:func:`lstm_forward`)
    1. ``xw = x W_ih^T`` for all T steps at once: one large GEMM outside the loop (cuBLAS).
    2. T launches of :func:`_lstm_fwd_kernel`; launch ``t`` fuses the recurrent GEMM
       ``h_{t-1} W_hh^T`` with ``xw[t]``, the fp32 bias ``b_ih + b_hh``, the nonlinearities and
       the cell update, and writes ``out[t]`` plus what the backward needs.
    On CUDA the T launches are recorded once in a CUDA graph and replayed (see
    :func:`_run_steps`); the graph replays exactly the launches the plain path makes, so the
    results are bitwise the same with or without it.

Backward (:func:`lstm_backward`)
    1. T launches of :func:`_lstm_bwd_kernel`, from ``t = T-1`` down to 0; launch ``t`` fuses
       the recurrent GEMM ``dh_t = dout[t] + dpre_{t+1} W_hh`` with the gate derivatives and
       the cell-gradient update, and writes ``dpre_t`` (also replayed from a CUDA graph).
    2. After the loop, large GEMMs: ``dx = dpre W_ih``, ``dW_ih = dpre^T x``,
       ``dW_hh = dpre^T [h0; out[:-1]]``, ``db_ih = db_hh = sum_{t,b} dpre``,
       ``dh0 = dpre_0 W_hh``; ``dc0`` comes out of the last launch.

Saved for backward (all in the input dtype)
    - ``gates`` [T, B, 4H]: the activated gates i, f, g, o (the nonlinearities' derivatives are
      functions of their outputs, so no pre-activation is kept);
    - ``cells`` [T, B, H]: c_t (``tanh(c_t)`` is recomputed);
    - ``out`` [T, B, H] (the op's output itself: ``h_{t-1}`` for ``dW_hh``), and references to
      the inputs ``x``, ``W_ih``, ``W_hh``, ``h0``, ``c0``.
    At the paper's shape (T=1024, B=16, H=1024, bf16) that is 128 MiB of gates plus 32 MiB of
    cells on top of the 32 MiB output; ``xw`` (128 MiB) lives only during the forward, and the
    backward's ``dpre`` (128 MiB) only during the backward. Recomputed: ``tanh(c_t)``.

Precision: GEMM accumulation, gate math and the running cell state ``c`` (forward) and its
gradient ``dc`` (backward) are float32 in [B, H] scratch buffers carried across launches; the
stored tensors are in the input dtype. float32 dots use ``input_precision="ieee"`` (no TF32).
"""

import contextlib
import os
from collections import OrderedDict
from typing import Callable, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .._backend import interpreter_enabled, triton_reason
from ._common import capability_reason, dtype_reason, empty

# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    # tanh through sigmoid: the same formula on every backend and under the interpreter.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    # UPCAST: Triton's interpreter computes bf16 x bf16 dots wrongly (triton 3.9), so there the
    # tiles go through float32, which is exact for bf16 products, as on tensor cores.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit(do_not_specialize=["t"])
def _lstm_fwd_kernel(
    xw_ptr,  # [T, B, 4H] contiguous: x W_ih^T
    w_hh_ptr,  # [4H, H], any strides
    bias_ptr,  # [4H] float32: b_ih + b_hh
    h0_ptr,  # [B, H], any strides
    c0_ptr,  # [B, H], any strides
    out_ptr,  # [T, B, H] contiguous: h_t (also read back as h_{t-1})
    gates_ptr,  # [T, B, 4H] contiguous: activated i, f, g, o (saved)
    cells_ptr,  # [T, B, H] contiguous: c_t (saved)
    c_state_ptr,  # [B, H] float32 contiguous: the running cell state
    h_n_ptr,  # [B, H] contiguous
    c_n_ptr,  # [B, H] contiguous
    t,
    B,
    H,
    stride_w_row,
    stride_w_col,
    stride_h0_b,
    stride_h0_h,
    stride_c0_b,
    stride_c0_h,
    HAS_BIAS: tl.constexpr,
    HAS_H_PREV: tl.constexpr,
    HAS_C0: tl.constexpr,
    FIRST_STEP: tl.constexpr,
    LAST_STEP: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One forward time step: recurrent GEMM + gates + cell update in one launch.

    Computes ``pre = xw[t] + h_{t-1} W_hh^T + bias``, ``i, f, o = sigmoid``, ``g = tanh``,
    ``c_t = f c_{t-1} + i g``, ``h_t = o tanh(c_t)``.

    Grid ``(cdiv(H, BLOCK_H), cdiv(B, BLOCK_B))``: each program owns a [BLOCK_B, BLOCK_H] tile of
    hidden units and the four gate columns of that tile (``k*H + h`` for k = i, f, g, o), so it
    runs four [BLOCK_B, H] x [H, BLOCK_H] dots over the whole of ``h_{t-1}`` and owns its tile of
    ``c`` exclusively: the float32 cell state is updated in place across launches.
    ``h_{t-1}`` is ``h0`` at the first step (skipped when there is no initial state) and
    ``out[t-1]`` after it.

    Saves for backward: the activated gates (``di = dc g``, ``df = dc c_{t-1}``, ``dg = dc i``,
    ``do = dh tanh(c_t)`` and the nonlinearity derivatives ``s(1-s)``, ``1-g^2`` need only them)
    and ``c_t`` (``dc += dh o (1 - tanh(c_t)^2)``; ``tanh(c_t)`` is recomputed).
    The last step also writes ``h_n`` and ``c_n`` (from the float32 state).
    """
    pid_h = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_b = offs_b < B
    mask_h = offs_h < H
    mask = mask_b[:, None] & mask_h[None, :]
    step = tl.cast(t, tl.int64)

    acc_i = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_f = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_o = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    if HAS_H_PREV:
        if FIRST_STEP:
            h_rows = h0_ptr + offs_b[:, None] * stride_h0_b
            stride_h_col = stride_h0_h
        else:
            h_rows = out_ptr + (step - 1) * B * H + offs_b[:, None] * H
            stride_h_col = 1
        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < H
            h_prev = tl.load(
                h_rows + offs_k[None, :] * stride_h_col,
                mask=mask_b[:, None] & mask_k[None, :],
                other=0.0,
            )
            # [BLOCK_K, BLOCK_H] tile of W_hh^T for gate i; the other gates are H rows further.
            w_ptrs = w_hh_ptr + offs_k[:, None] * stride_w_col + offs_h[None, :] * stride_w_row
            w_mask = mask_k[:, None] & mask_h[None, :]
            w_i = tl.load(w_ptrs, mask=w_mask, other=0.0)
            w_f = tl.load(w_ptrs + H * stride_w_row, mask=w_mask, other=0.0)
            w_g = tl.load(w_ptrs + 2 * H * stride_w_row, mask=w_mask, other=0.0)
            w_o = tl.load(w_ptrs + 3 * H * stride_w_row, mask=w_mask, other=0.0)
            acc_i = _dot(h_prev, w_i, acc_i, UPCAST_DOT)
            acc_f = _dot(h_prev, w_f, acc_f, UPCAST_DOT)
            acc_g = _dot(h_prev, w_g, acc_g, UPCAST_DOT)
            acc_o = _dot(h_prev, w_o, acc_o, UPCAST_DOT)

    gate_offs = offs_b[:, None] * (4 * H) + offs_h[None, :]
    xw_step = xw_ptr + step * B * 4 * H + gate_offs
    acc_i += tl.load(xw_step, mask=mask, other=0.0).to(tl.float32)
    acc_f += tl.load(xw_step + H, mask=mask, other=0.0).to(tl.float32)
    acc_g += tl.load(xw_step + 2 * H, mask=mask, other=0.0).to(tl.float32)
    acc_o += tl.load(xw_step + 3 * H, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc_i += tl.load(bias_ptr + offs_h, mask=mask_h, other=0.0)[None, :]
        acc_f += tl.load(bias_ptr + H + offs_h, mask=mask_h, other=0.0)[None, :]
        acc_g += tl.load(bias_ptr + 2 * H + offs_h, mask=mask_h, other=0.0)[None, :]
        acc_o += tl.load(bias_ptr + 3 * H + offs_h, mask=mask_h, other=0.0)[None, :]
    gate_i = tl.sigmoid(acc_i)
    gate_f = tl.sigmoid(acc_f)
    gate_g = _tanh(acc_g)
    gate_o = tl.sigmoid(acc_o)

    state_offs = offs_b[:, None] * H + offs_h[None, :]
    if FIRST_STEP:
        if HAS_C0:
            c_prev = tl.load(
                c0_ptr + offs_b[:, None] * stride_c0_b + offs_h[None, :] * stride_c0_h,
                mask=mask,
                other=0.0,
            ).to(tl.float32)
        else:
            c_prev = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    else:
        c_prev = tl.load(c_state_ptr + state_offs, mask=mask, other=0.0)
    cell = gate_f * c_prev + gate_i * gate_g
    hidden = gate_o * _tanh(cell)

    dtype = out_ptr.dtype.element_ty
    tl.store(c_state_ptr + state_offs, cell, mask=mask)
    tl.store(cells_ptr + step * B * H + state_offs, cell.to(dtype), mask=mask)
    tl.store(out_ptr + step * B * H + state_offs, hidden.to(dtype), mask=mask)
    gates_step = gates_ptr + step * B * 4 * H + gate_offs
    tl.store(gates_step, gate_i.to(dtype), mask=mask)
    tl.store(gates_step + H, gate_f.to(dtype), mask=mask)
    tl.store(gates_step + 2 * H, gate_g.to(dtype), mask=mask)
    tl.store(gates_step + 3 * H, gate_o.to(dtype), mask=mask)
    if LAST_STEP:
        tl.store(h_n_ptr + state_offs, hidden.to(dtype), mask=mask)
        tl.store(c_n_ptr + state_offs, cell.to(dtype), mask=mask)


@triton.jit(do_not_specialize=["t"])
def _lstm_bwd_kernel(
    dpre_ptr,  # [T, B, 4H] contiguous: pre-activation gradients (reads t+1, writes t)
    w_hh_ptr,  # [4H, H], any strides
    dout_ptr,  # [T, B, H], any strides
    dh_n_ptr,  # [B, H], any strides
    dc_n_ptr,  # [B, H], any strides
    gates_ptr,  # [T, B, 4H] contiguous (saved)
    cells_ptr,  # [T, B, H] contiguous (saved)
    c0_ptr,  # [B, H], any strides
    dc_state_ptr,  # [B, H] float32 contiguous: the running cell gradient
    dc0_ptr,  # [B, H] contiguous
    t,
    B,
    H,
    stride_w_row,
    stride_w_col,
    stride_dout_t,
    stride_dout_b,
    stride_dout_h,
    stride_dh_n_b,
    stride_dh_n_h,
    stride_dc_n_b,
    stride_dc_n_h,
    stride_c0_b,
    stride_c0_h,
    HAS_C0: tl.constexpr,
    FIRST_STEP: tl.constexpr,
    LAST_STEP: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One backward time step: recurrent GEMM + gate derivatives + cell-gradient update.

    Computes ``dh_t = dout[t] + dpre_{t+1} W_hh`` (``+ dh_n`` instead of the GEMM at the last
    step), then with the saved gates and cells:
    ``dc = dc_{t+1} f_{t+1} + dh o (1 - tanh(c_t)^2)`` (the ``f_{t+1}`` factor is already in the
    carried state), ``dpre_i = dc g i (1-i)``, ``dpre_f = dc c_{t-1} f (1-f)``,
    ``dpre_g = dc i (1-g^2)``, ``dpre_o = dh tanh(c_t) o (1-o)``, and carries ``dc f`` on.

    Grid ``(cdiv(H, BLOCK_H), cdiv(B, BLOCK_B))``: each program owns a [BLOCK_B, BLOCK_H] tile of
    hidden units; its GEMM reduces over all 4H columns of ``dpre_{t+1}`` (written by the
    previous launch) against the matching [4H, BLOCK_H] slice of ``W_hh``, and it writes the four
    gate columns of its tile of ``dpre_t``. The float32 ``dc`` tile is owned by one program and
    updated in place; the first step (t = 0) writes ``dc0`` instead. ``tanh(c_t)`` is recomputed
    from the saved ``c_t``; nothing else is saved.
    """
    pid_h = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_b = offs_b < B
    mask_h = offs_h < H
    mask = mask_b[:, None] & mask_h[None, :]
    step = tl.cast(t, tl.int64)

    dh = tl.load(
        dout_ptr
        + step * stride_dout_t
        + offs_b[:, None] * stride_dout_b
        + offs_h[None, :] * stride_dout_h,
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    if LAST_STEP:
        dh += tl.load(
            dh_n_ptr + offs_b[:, None] * stride_dh_n_b + offs_h[None, :] * stride_dh_n_h,
            mask=mask,
            other=0.0,
        ).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
        dpre_rows = dpre_ptr + (step + 1) * B * 4 * H + offs_b[:, None] * (4 * H)
        for k0 in range(0, 4 * H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < 4 * H
            dpre_next = tl.load(
                dpre_rows + offs_k[None, :], mask=mask_b[:, None] & mask_k[None, :], other=0.0
            )
            w = tl.load(
                w_hh_ptr + offs_k[:, None] * stride_w_row + offs_h[None, :] * stride_w_col,
                mask=mask_k[:, None] & mask_h[None, :],
                other=0.0,
            )
            acc = _dot(dpre_next, w, acc, UPCAST_DOT)
        dh += acc

    state_offs = offs_b[:, None] * H + offs_h[None, :]
    if LAST_STEP:
        dc = tl.load(
            dc_n_ptr + offs_b[:, None] * stride_dc_n_b + offs_h[None, :] * stride_dc_n_h,
            mask=mask,
            other=0.0,
        ).to(tl.float32)
    else:
        dc = tl.load(dc_state_ptr + state_offs, mask=mask, other=0.0)

    gate_offs = offs_b[:, None] * (4 * H) + offs_h[None, :]
    gates_step = gates_ptr + step * B * 4 * H + gate_offs
    gate_i = tl.load(gates_step, mask=mask, other=0.0).to(tl.float32)
    gate_f = tl.load(gates_step + H, mask=mask, other=0.0).to(tl.float32)
    gate_g = tl.load(gates_step + 2 * H, mask=mask, other=0.0).to(tl.float32)
    gate_o = tl.load(gates_step + 3 * H, mask=mask, other=0.0).to(tl.float32)
    cell = tl.load(cells_ptr + step * B * H + state_offs, mask=mask, other=0.0).to(tl.float32)
    if FIRST_STEP:
        if HAS_C0:
            c_prev = tl.load(
                c0_ptr + offs_b[:, None] * stride_c0_b + offs_h[None, :] * stride_c0_h,
                mask=mask,
                other=0.0,
            ).to(tl.float32)
        else:
            c_prev = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    else:
        c_prev = tl.load(
            cells_ptr + (step - 1) * B * H + state_offs, mask=mask, other=0.0
        ).to(tl.float32)

    tanh_c = _tanh(cell)
    dc += dh * gate_o * (1.0 - tanh_c * tanh_c)
    dpre_i = dc * gate_g * gate_i * (1.0 - gate_i)
    dpre_f = dc * c_prev * gate_f * (1.0 - gate_f)
    dpre_g = dc * gate_i * (1.0 - gate_g * gate_g)
    dpre_o = dh * tanh_c * gate_o * (1.0 - gate_o)
    dc_prev = dc * gate_f

    dtype = dpre_ptr.dtype.element_ty
    dpre_step = dpre_ptr + step * B * 4 * H + gate_offs
    tl.store(dpre_step, dpre_i.to(dtype), mask=mask)
    tl.store(dpre_step + H, dpre_f.to(dtype), mask=mask)
    tl.store(dpre_step + 2 * H, dpre_g.to(dtype), mask=mask)
    tl.store(dpre_step + 3 * H, dpre_o.to(dtype), mask=mask)
    if FIRST_STEP:
        tl.store(dc0_ptr + state_offs, dc_prev.to(dtype), mask=mask)
    else:
        tl.store(dc_state_ptr + state_offs, dc_prev, mask=mask)


# ----------------------------------------------------------------------------------------------
# CUDA-graph replay of the T step launches
# ----------------------------------------------------------------------------------------------

# A graph is keyed on everything the launches receive (tensor addresses, shapes, strides and
# dtypes, sizes, switches and block sizes), so a replay issues exactly the launches the plain path
# would issue: correctness never depends on the graph. Nothing is captured before the same
# launches without the addresses (the "signature": it fixes which kernel variants run) have run
# plainly once, so every kernel is compiled outside a capture; after that a key is captured once
# it has been seen `capture_after` times (default 1: the second call with the same buffers, the
# steady state of a training loop), so one-off calls never pay for a capture.
_GRAPH_SETTINGS = {
    "enabled": os.environ.get("SHA_RNN_KERNELS_LSTM_CUDA_GRAPHS", "1") != "0",
    "capture_after": 1,
}
_MAX_GRAPHS = 16
_MAX_SEEN = 256
_GRAPHS: "OrderedDict[tuple, torch.cuda.CUDAGraph]" = OrderedDict()
_SEEN: "OrderedDict[tuple, int]" = OrderedDict()
_COMPILED: "OrderedDict[tuple, None]" = OrderedDict()
_GRAPH_STATS = {"plain": 0, "captures": 0, "replays": 0}


def set_cuda_graphs(enabled: bool, capture_after: Optional[int] = None) -> Tuple[bool, int]:
    """Turn the CUDA-graph replay of the step launches on or off (on by default; the
    environment variable ``SHA_RNN_KERNELS_LSTM_CUDA_GRAPHS=0`` turns it off at import).

    Args:
        enabled: replay the T step launches from a captured CUDA graph on CUDA tensors.
        capture_after: how many plain runs of the same launches come before a capture (default
            unchanged, initially 1; 0 captures on first sight, once the kernels are compiled).

    Returns:
        The previous ``(enabled, capture_after)``.

    Example:
        >>> previous = set_cuda_graphs(False)   # plain launches, e.g. to compare
        >>> _ = set_cuda_graphs(*previous)
    """
    previous = (_GRAPH_SETTINGS["enabled"], _GRAPH_SETTINGS["capture_after"])
    _GRAPH_SETTINGS["enabled"] = bool(enabled)
    if capture_after is not None:
        if capture_after < 0:
            raise ValueError(f"capture_after must be >= 0; got {capture_after}")
        _GRAPH_SETTINGS["capture_after"] = int(capture_after)
    return previous


def clear_cuda_graphs() -> None:
    """Drop every captured graph and the record of launches seen."""
    _GRAPHS.clear()
    _SEEN.clear()
    _COMPILED.clear()


def cuda_graph_stats() -> dict:
    """Counts of step loops run plainly, captured and replayed since import (a copy)."""
    return dict(_GRAPH_STATS)


def _launch_key(values: Sequence) -> Tuple[tuple, tuple]:
    """(signature, addresses): everything the launches receive, split in two."""
    signature, addresses = [], []
    for value in values:
        if isinstance(value, torch.Tensor):
            # Triton specializes on 16-byte alignment: it picks the compiled variant too.
            aligned = value.data_ptr() % 16 == 0
            signature.append((tuple(value.shape), value.stride(), value.dtype, aligned))
            addresses.append(value.data_ptr())
        else:
            signature.append(value)
    return tuple(signature), tuple(addresses)


def _remember(cache: OrderedDict, key: tuple, value, limit: int) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > limit:
        cache.popitem(last=False)


def _run_steps(launch_all: Callable[[], None], device: torch.device, key_values: Sequence) -> None:
    """Run ``launch_all`` (the T step launches) plainly or through a cached CUDA graph.

    ``key_values`` must name every tensor and every scalar that ``launch_all`` passes to a
    kernel. The graph path is used only on CUDA, never under the interpreter (CPU tensors), and
    not while the caller is itself capturing a graph (then the launches simply join that graph).
    """
    if (
        device.type != "cuda"
        or not _GRAPH_SETTINGS["enabled"]
        or torch.cuda.is_current_stream_capturing()
    ):
        _GRAPH_STATS["plain"] += 1
        launch_all()
        return
    signature, addresses = _launch_key(key_values)
    signature = (device.index, signature)
    key = (signature, addresses)
    graph = _GRAPHS.get(key)
    if graph is None:
        seen = _SEEN.get(key, 0)
        if signature not in _COMPILED or seen < _GRAPH_SETTINGS["capture_after"]:
            _remember(_SEEN, key, seen + 1, _MAX_SEEN)
            _GRAPH_STATS["plain"] += 1
            launch_all()
            _remember(_COMPILED, signature, None, _MAX_SEEN)
            return
        _SEEN.pop(key, None)
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                launch_all()
            finally:
                graph.capture_end()
        current.wait_stream(side)
        _remember(_GRAPHS, key, graph, _MAX_GRAPHS)
        _GRAPH_STATS["captures"] += 1
    else:
        _GRAPHS.move_to_end(key)
    graph.replay()
    _GRAPH_STATS["replays"] += 1


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _blocks(B: int) -> Tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_H, BLOCK_K, num_warps). tl.dot needs every block dimension >= 16; a
    narrow BLOCK_H spreads the [B, 4H] x [4H, H] recurrence over more programs, which matters
    because one step at B=16, H=1024 is only a few MFLOP. No autotuning: the steps are
    launched inside CUDA-graph captures, where autotuning's timing runs cannot happen."""
    block_b = max(16, min(64, triton.next_power_of_2(B)))
    return block_b, 16, 64, 4


def _upcast_dot(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and interpreter_enabled()


def _device_guard(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _strides2(t: Optional[torch.Tensor]) -> Tuple[int, int]:
    return (t.stride(0), t.stride(1)) if t is not None else (0, 0)


def lstm_forward(
    x: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_ih: Optional[torch.Tensor],
    bias_hh: Optional[torch.Tensor],
    h0: Optional[torch.Tensor],
    c0: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward of the LSTM without autograd.

    Returns ``(out [T, B, H], h_n [B, H], c_n [B, H], gates [T, B, 4H], cells [T, B, H])``, all
    in the input dtype; the last two are what :func:`lstm_backward` needs.
    """
    T, B, _ = x.shape
    H = weight_hh.shape[1]
    dtype, device = x.dtype, x.device
    xw = torch.matmul(x, weight_ih.t())  # [T, B, 4H], contiguous
    has_bias = bias_ih is not None or bias_hh is not None
    bias = empty(4 * H, dtype=torch.float32, device=device)
    if has_bias:
        bias.zero_()
        for b in (bias_ih, bias_hh):
            if b is not None:
                bias += b.float()
    out = empty(T, B, H, dtype=dtype, device=device)
    gates = empty(T, B, 4 * H, dtype=dtype, device=device)
    cells = empty(T, B, H, dtype=dtype, device=device)
    c_state = empty(B, H, dtype=torch.float32, device=device)
    h_n = empty(B, H, dtype=dtype, device=device)
    c_n = empty(B, H, dtype=dtype, device=device)
    h0_arg = h0 if h0 is not None else out  # never read without HAS_H_PREV at the first step
    c0_arg = c0 if c0 is not None else c_state  # never read without HAS_C0
    block_b, block_h, block_k, num_warps = _blocks(B)
    upcast_dot = _upcast_dot(dtype)
    grid = (triton.cdiv(H, block_h), triton.cdiv(B, block_b))
    w_strides = (weight_hh.stride(0), weight_hh.stride(1))
    h0_strides, c0_strides = _strides2(h0), _strides2(c0)
    tensors = (xw, weight_hh, bias, h0_arg, c0_arg, out, gates, cells, c_state, h_n, c_n)

    def launch_all() -> None:
        for t in range(T):
            _lstm_fwd_kernel[grid](
                *tensors,
                t,
                B,
                H,
                *w_strides,
                *h0_strides,
                *c0_strides,
                HAS_BIAS=has_bias,
                HAS_H_PREV=t > 0 or h0 is not None,
                HAS_C0=c0 is not None,
                FIRST_STEP=t == 0,
                LAST_STEP=t == T - 1,
                UPCAST_DOT=upcast_dot,
                BLOCK_B=block_b,
                BLOCK_H=block_h,
                BLOCK_K=block_k,
                num_warps=num_warps,
            )

    switches = (has_bias, h0 is not None, c0 is not None, upcast_dot)
    key = ("fwd", *tensors, *w_strides, *h0_strides, *c0_strides, *switches, block_b, block_h,
           block_k, num_warps)
    with _device_guard(device):
        _run_steps(launch_all, device, key)
    return out, h_n, c_n, gates, cells


def lstm_backward(
    grad_out: torch.Tensor,
    grad_h_n: torch.Tensor,
    grad_c_n: torch.Tensor,
    x: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    h0: Optional[torch.Tensor],
    c0: Optional[torch.Tensor],
    out: torch.Tensor,
    gates: torch.Tensor,
    cells: torch.Tensor,
) -> Tuple[torch.Tensor, ...]:
    """Backward through time of the LSTM without autograd.

    Returns ``(dx [T, B, I], dW_ih [4H, I], dW_hh [4H, H], db [4H], dh0 [B, H], dc0 [B, H])``
    in the input dtype; ``db`` is the gradient of both ``b_ih`` and ``b_hh``.
    """
    T, B, I = x.shape
    H = weight_hh.shape[1]
    dtype, device = x.dtype, x.device
    dpre = empty(T, B, 4 * H, dtype=dtype, device=device)
    dc_state = empty(B, H, dtype=torch.float32, device=device)
    dc0 = empty(B, H, dtype=dtype, device=device)
    c0_arg = c0 if c0 is not None else dc_state  # never read without HAS_C0
    block_b, block_h, block_k, num_warps = _blocks(B)
    upcast_dot = _upcast_dot(dtype)
    grid = (triton.cdiv(H, block_h), triton.cdiv(B, block_b))
    tensors = (dpre, weight_hh, grad_out, grad_h_n, grad_c_n, gates, cells, c0_arg, dc_state, dc0)
    strides = (
        weight_hh.stride(0),
        weight_hh.stride(1),
        *grad_out.stride(),
        *_strides2(grad_h_n),
        *_strides2(grad_c_n),
        *_strides2(c0),
    )

    def launch_all() -> None:
        for t in reversed(range(T)):
            _lstm_bwd_kernel[grid](
                *tensors,
                t,
                B,
                H,
                *strides,
                HAS_C0=c0 is not None,
                FIRST_STEP=t == 0,
                LAST_STEP=t == T - 1,
                UPCAST_DOT=upcast_dot,
                BLOCK_B=block_b,
                BLOCK_H=block_h,
                BLOCK_K=block_k,
                num_warps=num_warps,
            )

    switches = (c0 is not None, upcast_dot)
    key = ("bwd", *tensors, *strides, *switches, block_b, block_h, block_k, num_warps)
    with _device_guard(device):
        _run_steps(launch_all, device, key)

    dpre_rows = dpre.view(T * B, 4 * H)
    dx = torch.matmul(dpre, weight_ih)
    dweight_ih = dpre_rows.t().matmul(x.reshape(T * B, I))
    if h0 is not None:
        h_prev = torch.cat([h0.unsqueeze(0), out[:-1]]).view(T * B, H)
        dweight_hh = dpre_rows.t().matmul(h_prev)
    else:  # h_{-1} = 0: step 0 adds nothing
        dweight_hh = dpre_rows[B:].t().matmul(out[:-1].reshape((T - 1) * B, H))
    dbias = dpre_rows.sum(0, dtype=torch.float32).to(dtype)
    dh0 = dpre[0].matmul(weight_hh)
    return dx, dweight_ih, dweight_hh, dbias, dh0, dc0


# ----------------------------------------------------------------------------------------------
# torch.library registration (custom ops, autograd, fake tensors)
# ----------------------------------------------------------------------------------------------

_FWD_SCHEMA = (
    "(Tensor x, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, Tensor? bias_hh, "
    "Tensor? h0, Tensor? c0) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_BWD_SCHEMA = (
    "(Tensor grad_out, Tensor grad_h_n, Tensor grad_c_n, Tensor x, Tensor weight_ih, "
    "Tensor weight_hh, Tensor? h0, Tensor? c0, Tensor out, Tensor gates, Tensor cells) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)

_lstm_fwd_op = torch.library.custom_op(
    "sha_rnn_kernels::lstm_fwd", lstm_forward, mutates_args=(), schema=_FWD_SCHEMA
)
_lstm_bwd_op = torch.library.custom_op(
    "sha_rnn_kernels::lstm_bwd", lstm_backward, mutates_args=(), schema=_BWD_SCHEMA
)


@_lstm_fwd_op.register_fake
def _lstm_fwd_fake(x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0):
    T, B, _ = x.shape
    H = weight_hh.shape[1]
    return (
        x.new_empty(T, B, H),
        x.new_empty(B, H),
        x.new_empty(B, H),
        x.new_empty(T, B, 4 * H),
        x.new_empty(T, B, H),
    )


@_lstm_bwd_op.register_fake
def _lstm_bwd_fake(grad_out, grad_h_n, grad_c_n, x, weight_ih, weight_hh, h0, c0, out, gates,
                   cells):
    T, B, I = x.shape
    H = weight_hh.shape[1]
    return (
        x.new_empty(T, B, I),
        weight_ih.new_empty(4 * H, I),
        weight_hh.new_empty(4 * H, H),
        weight_hh.new_empty(4 * H),
        x.new_empty(B, H),
        x.new_empty(B, H),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0 = inputs
    out, _, _, gates, cells = output
    ctx.save_for_backward(x, weight_ih, weight_hh, h0, c0, out, gates, cells)
    ctx.has_bias = (bias_ih is not None, bias_hh is not None)


def _backward(ctx, grad_out, grad_h_n, grad_c_n, _grad_gates, _grad_cells):
    x, weight_ih, weight_hh, h0, c0, out, gates, cells = ctx.saved_tensors
    T, B, _ = x.shape
    H = weight_hh.shape[1]
    # An output the loss does not use may arrive as None.
    if grad_out is None:
        grad_out = x.new_zeros(T, B, H)
    if grad_h_n is None:
        grad_h_n = x.new_zeros(B, H)
    if grad_c_n is None:
        grad_c_n = x.new_zeros(B, H)
    dx, dweight_ih, dweight_hh, dbias, dh0, dc0 = _lstm_bwd_op(
        grad_out, grad_h_n, grad_c_n, x, weight_ih, weight_hh, h0, c0, out, gates, cells
    )
    has_bias_ih, has_bias_hh = ctx.has_bias
    return (
        dx,
        dweight_ih,
        dweight_hh,
        dbias if has_bias_ih else None,
        # A separate tensor: the two .grad fields must not share storage.
        (dbias.clone() if has_bias_ih else dbias) if has_bias_hh else None,
        dh0 if h0 is not None else None,
        dc0 if c0 is not None else None,
    )


_lstm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Entry points called by sha_rnn_kernels.functional
# ----------------------------------------------------------------------------------------------


def unsupported_reason(
    x: torch.Tensor, weight_ih: torch.Tensor, weight_hh: torch.Tensor
) -> Optional[str]:
    """Why the Triton LSTM cannot take these (already validated) inputs, or None when it can."""
    reason = dtype_reason(x, weight_ih, weight_hh)
    if reason is not None:
        return reason
    reason = triton_reason(x.device)
    if reason is not None:
        return reason
    if x.shape[0] == 0:
        return "the sequence is empty (T=0)"
    if x.shape[1] == 0 or weight_hh.shape[1] == 0 or x.shape[2] == 0:
        return (
            f"empty sizes are not supported (B={x.shape[1]}, input size {x.shape[2]}, "
            f"hidden size {weight_hh.shape[1]})"
        )
    return capability_reason(x.device, x.dtype)


def lstm(
    x: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_ih: Optional[torch.Tensor],
    bias_hh: Optional[torch.Tensor],
    h0: Optional[torch.Tensor],
    c0: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One LSTM layer over a time-major sequence, differentiable in every tensor argument.

    Args:
        x: [T, B, I] input, any strides.
        weight_ih: [4H, I], rows in gate order i, f, g, o (``torch.nn.LSTM.weight_ih_l0``).
        weight_hh: [4H, H] (``weight_hh_l0``).
        bias_ih, bias_hh: [4H] or None.
        h0, c0: [B, H] initial state, or None for zeros.

    Returns:
        ``(out [T, B, H], h_n [B, H], c_n [B, H])`` in the input dtype.

    Example:
        >>> lstm_ = torch.nn.LSTM(20, 24).cuda()
        >>> x = torch.randn(7, 3, 20, device="cuda")
        >>> out, h_n, c_n = lstm(x, lstm_.weight_ih_l0, lstm_.weight_hh_l0,
        ...                      lstm_.bias_ih_l0, lstm_.bias_hh_l0, None, None)
    """
    out, h_n, c_n, _, _ = _lstm_fwd_op(x, weight_ih, weight_hh, bias_ih, bias_hh, h0, c0)
    return out, h_n, c_n
