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
    On CUDA the T launches are recorded once per sequence length in a CUDA graph and replayed
    (see :func:`_run_steps`): the graph is keyed on shapes, and its launches read and write the
    static buffers of a workspace that each call copies its inputs into and its outputs out
    of, so new tensors every step and jittered lengths still replay. The graph replays exactly
    the launches the plain path makes, so the results are bitwise the same with or without it.

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

Launch: grid ``(cdiv(H, 16), cdiv(B, BLOCK_B))`` with, in fp16/bf16, one warp per 16 batch rows
(a [16, 16] accumulator is two m16n8 MMA tiles of one warp; see :func:`_blocks`). No autotuning
(the launches are captured into CUDA graphs, where autotuning's timing runs cannot happen), so
nothing is tuned inside a capture; warm up once before capturing a graph of your own around the
LSTM, so that Triton compiles the kernels outside it. Offsets that scale with the step or the batch row are 64-bit (B*T*H passes
2^31 on long sequences); W_hh is addressed with 32-bit offsets, which limits H to 23170.

Precision: GEMM accumulation, gate math and the running cell state ``c`` (forward) and its
gradient ``dc`` (backward) are float32 in [B, H] scratch buffers carried across launches; the
stored tensors are in the input dtype. float32 dots use ``input_precision="ieee"`` (no TF32).

The two step kernels are in ``_lstm_kernels.py``; this module holds their launchers, the
CUDA-graph replay and the op. The design, block sizes, graph replay estimate and the
alternatives weighed: docs/design/lstm.md.
"""

import contextlib
import os
import threading
from collections import OrderedDict
from typing import Callable, Optional, Sequence, Tuple

import torch
import triton

from .._backend import interpreter_enabled, triton_reason
from ._common import capability_reason, dtype_reason, empty
from ._lstm_kernels import _lstm_bwd_kernel, _lstm_fwd_kernel

# ----------------------------------------------------------------------------------------------
# CUDA-graph replay of the T step launches
# ----------------------------------------------------------------------------------------------

# On CUDA the T step launches of a direction are captured once in a CUDA graph and replayed.
# A graph is keyed on shapes, not addresses: the launches always read and write the static
# buffers of a workspace (one per device, stream, dtype, batch and hidden size, sized for a
# capacity of steps that grows when a longer sequence comes), so the trainer's jittered
# sequence lengths reuse one workspace and one graph per length. Each call copies its inputs in
# (the input projection is written there directly by its GEMM) and clones its outputs out; at
# T=1024, B=16, H=1024 in bf16 that is ~770 MiB of copies per layer and training step (~0.26 ms
# at 3 TB/s, estimated), against ~2048 launches saved (several ms of launch overhead).
# The graph replays exactly the launches of the plain path (the same kernels, block sizes and
# buffers), so the results are bitwise the same with or without it. Nothing is captured before
# the same kernel variants have run once outside a capture (Triton compiles on first launch, and
# the kernels have no autotuning, so no timing run happens inside a capture); a length is
# captured once it has been seen `capture_after` times (default 1: at its second call).
# Calls made while the caller itself captures a CUDA graph launch plainly into that graph
# (warm up once before capturing, so that the kernels are compiled outside the capture).
_GRAPH_SETTINGS = {
    "enabled": os.environ.get("SHA_RNN_KERNELS_LSTM_CUDA_GRAPHS", "1") != "0",
    "capture_after": 1,
}
_MAX_GRAPHS = 128  # both directions, every length of every workspace
_MAX_WORKSPACES = 4
_MAX_SEEN = 1024
_CAPACITY_STEP = 64  # workspace capacities are multiples of this many steps
_GRAPHS: "OrderedDict[tuple, torch.cuda.CUDAGraph]" = OrderedDict()
_SEEN: "OrderedDict[tuple, int]" = OrderedDict()
_COMPILED: "OrderedDict[tuple, None]" = OrderedDict()
_WORKSPACES: "OrderedDict[tuple, _Workspace]" = OrderedDict()
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
    """Drop every captured graph, every workspace and the record of launches seen."""
    _GRAPHS.clear()
    _SEEN.clear()
    _COMPILED.clear()
    _WORKSPACES.clear()


def cuda_graph_stats() -> dict:
    """Counts of step loops run plainly, captured and replayed since import (a copy)."""
    return dict(_GRAPH_STATS)


def _remember(cache: OrderedDict, key: tuple, value, limit: int) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > limit:
        cache.popitem(last=False)


def workspace_capacity(steps: int, current: int = 0) -> int:
    """Steps a workspace holds after a call with ``steps`` steps: ``current`` when it fits,
    else ``steps`` (and at least 1.25x ``current``, so a slowly growing length does not
    reallocate every time) rounded up to a multiple of 64."""
    if steps <= current:
        return current
    wanted = max(steps, (current * 5 + 3) // 4)
    return -(-wanted // _CAPACITY_STEP) * _CAPACITY_STEP


class _Workspace:
    """The static buffers the graphed launches read and write, for one (device, stream, dtype,
    B, H) family. Sequence buffers hold ``capacity`` steps; a call uses their first T steps
    (a view at the same address). ``generation`` changes when they are reallocated, which
    retires every graph captured on the old buffers."""

    def __init__(self, device: torch.device, dtype: torch.dtype, batch: int, hidden: int) -> None:
        self.device, self.dtype, self.batch, self.hidden = device, dtype, batch, hidden
        self.capacity = 0
        self.generation = 0
        self.lock = threading.Lock()
        small = dict(dtype=dtype, device=device)
        self.w_hh = empty(4 * hidden, hidden, **small)
        self.bias = empty(4 * hidden, dtype=torch.float32, device=device)
        self.state = empty(batch, hidden, dtype=torch.float32, device=device)  # c, then dc
        self.h0, self.c0 = empty(batch, hidden, **small), empty(batch, hidden, **small)
        self.h_n, self.c_n = empty(batch, hidden, **small), empty(batch, hidden, **small)
        self.dc0 = empty(batch, hidden, **small)

    def reserve(self, steps: int) -> None:
        capacity = workspace_capacity(steps, self.capacity)
        if capacity == self.capacity:
            return
        B, H, small = self.batch, self.hidden, dict(dtype=self.dtype, device=self.device)
        self.pre = empty(capacity, B, 4 * H, **small)  # x W_ih^T forward, dpre backward
        self.gates = empty(capacity, B, 4 * H, **small)
        self.seq = empty(capacity, B, H, **small)  # out forward, grad_out backward
        self.cells = empty(capacity, B, H, **small)
        self.capacity = capacity
        self.generation += 1


def _workspace(device: torch.device, dtype: torch.dtype, batch: int, hidden: int, steps: int):
    """The workspace of this family on the current stream, holding at least ``steps``; returns
    it with its key (the family and its buffers' generation)."""
    family = (device.index, _stream_id(device), dtype, batch, hidden)
    ws = _WORKSPACES.get(family)
    if ws is None:
        ws = _Workspace(device, dtype, batch, hidden)
        _remember(_WORKSPACES, family, ws, _MAX_WORKSPACES)
        for key in [k for k in _GRAPHS if k[1][0] not in _WORKSPACES]:
            del _GRAPHS[key]  # graphs of evicted workspaces
    else:
        _WORKSPACES.move_to_end(family)
    generation = ws.generation
    ws.reserve(steps)
    if ws.generation != generation:
        for key in [k for k in _GRAPHS if k[1][0] == family]:
            del _GRAPHS[key]  # captured on the buffers just replaced
    return ws, (family, ws.generation)


def _graphs_apply(device: torch.device) -> bool:
    """Whether the step launches go through the graph cache (and so a workspace)."""
    return (
        device.type == "cuda"
        and _GRAPH_SETTINGS["enabled"]
        and not torch.cuda.is_current_stream_capturing()
    )


def _capture(launch_all: Callable[[], None], device: torch.device) -> "torch.cuda.CUDAGraph":
    """``launch_all`` captured into a new CUDA graph (on a side stream, as PyTorch requires)."""
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
    return graph


def _stream_id(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _run_steps(
    launch_all: Callable[[], None], device: torch.device, graph_key: tuple, variant: tuple
) -> None:
    """Run ``launch_all`` (the T step launches on a workspace's static buffers) plainly or
    through the CUDA graph cached for ``graph_key``.

    ``graph_key`` names everything the launches depend on besides the buffers' contents:
    direction, workspace family and generation, T, switches, block sizes. ``variant`` names the
    kernel variants they launch (their constexprs and specialisations, not T); a graph is
    captured only once these have run outside a capture.
    """
    graph = _GRAPHS.get(graph_key)
    if graph is None:
        seen = _SEEN.get(graph_key, 0)
        if variant not in _COMPILED or seen < _GRAPH_SETTINGS["capture_after"]:
            _remember(_SEEN, graph_key, seen + 1, _MAX_SEEN)
            _GRAPH_STATS["plain"] += 1
            launch_all()
            _remember(_COMPILED, variant, None, _MAX_SEEN)
            return
        _SEEN.pop(graph_key, None)
        graph = _capture(launch_all, device)
        _remember(_GRAPHS, graph_key, graph, _MAX_GRAPHS)
        _GRAPH_STATS["captures"] += 1
    else:
        _GRAPHS.move_to_end(graph_key)
    graph.replay()
    _GRAPH_STATS["replays"] += 1


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

_INT32_LIMIT = 2**31


def _blocks(B: int, dtype: torch.dtype) -> Tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_H, BLOCK_K, num_warps). tl.dot needs every block dimension >= 16; a
    narrow BLOCK_H spreads the [B, 4H] x [4H, H] recurrence over more programs, which matters
    because one step at B=16, H=1024 is only a few MFLOP.

    fp16/bf16 (tensor cores): one warp per 16 batch rows. A [16, 16] accumulator is two m16n8
    MMA tiles, which one warp owns; more warps would only compute copies of it. float32
    (``input_precision="ieee"``: FMA dots, whose blocked layout splits the tile over every
    thread, so no warp repeats another's work): 4 warps, which also keeps the four [64, 16]
    W_hh operand tiles out of local memory (one warp spills them on sm_80).

    No autotuning: the steps are launched inside CUDA-graph captures, where autotuning's timing
    runs cannot happen."""
    block_b = max(16, min(64, triton.next_power_of_2(B)))
    num_warps = 4 if dtype == torch.float32 else block_b // 16
    return block_b, 16, 64, num_warps


def size_reason(hidden: int) -> Optional[str]:
    """Why the kernels cannot index a W_hh of this hidden size, or None: they address W_hh
    with 32-bit offsets (everything indexed by step or batch row uses 64-bit offsets)."""
    if 4 * hidden * hidden >= _INT32_LIMIT:
        return (
            f"hidden size H={hidden} is too large: W_hh has 4H*H = {4 * hidden * hidden} "
            f">= 2^31 elements, past the kernels' 32-bit offsets (H <= 23170)"
        )
    return None


def _check_size(hidden: int) -> None:
    reason = size_reason(hidden)
    if reason is not None:
        raise ValueError(f"sha_rnn_kernels.ops.lstm: {reason}")


def _extent(t: torch.Tensor, dims: Sequence[int]) -> int:
    """The largest element offset of ``t`` along ``dims`` (what a 32-bit index must hold)."""
    return sum((t.shape[d] - 1) * abs(t.stride(d)) for d in dims if t.shape[d] > 0)


def _int32_safe(t: Optional[torch.Tensor], dims: Sequence[int]) -> Optional[torch.Tensor]:
    """``t``, or a contiguous copy when its offsets along ``dims`` (the ones the kernels index
    in int32: hidden units and W_hh's rows and columns; steps and batch rows are int64) would
    pass 2^31 elements. Odd views only: a contiguous tensor never needs it."""
    if t is None or _extent(t, dims) < _INT32_LIMIT:
        return t
    return t.contiguous()


def _upcast_dot(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and interpreter_enabled()


def _device_guard(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _strides2(t: Optional[torch.Tensor]) -> Tuple[int, int]:
    return (t.stride(0), t.stride(1)) if t is not None else (0, 0)


def _fill_bias(bias: torch.Tensor, bias_ih, bias_hh) -> None:
    bias.zero_()
    for b in (bias_ih, bias_hh):
        if b is not None:
            bias += b.float()


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
    _check_size(H)
    dtype, device = x.dtype, x.device
    has_bias = bias_ih is not None or bias_hh is not None
    block_b, block_h, block_k, num_warps = _blocks(B, dtype)
    upcast_dot = _upcast_dot(dtype)
    grid = (triton.cdiv(H, block_h), triton.cdiv(B, block_b))
    switches = (has_bias, h0 is not None, c0 is not None, upcast_dot)
    with _device_guard(device):
        if not _graphs_apply(device):
            _GRAPH_STATS["plain"] += 1
            xw = torch.matmul(x, weight_ih.t())  # [T, B, 4H], contiguous
            bias = empty(4 * H, dtype=torch.float32, device=device)
            if has_bias:
                _fill_bias(bias, bias_ih, bias_hh)
            w_hh = _int32_safe(weight_hh, (0, 1))
            h0, c0 = _int32_safe(h0, (1,)), _int32_safe(c0, (1,))
            out = empty(T, B, H, dtype=dtype, device=device)
            gates = empty(T, B, 4 * H, dtype=dtype, device=device)
            cells = empty(T, B, H, dtype=dtype, device=device)
            c_state = empty(B, H, dtype=torch.float32, device=device)
            h_n = empty(B, H, dtype=dtype, device=device)
            c_n = empty(B, H, dtype=dtype, device=device)
            _forward_launches(xw, w_hh, bias, h0, c0, out, gates, cells, c_state, h_n, c_n,
                              has_bias, grid, (block_b, block_h, block_k, num_warps))()  # fmt: skip
            return out, h_n, c_n, gates, cells
        ws, family = _workspace(device, dtype, B, H, T)
        with ws.lock:
            # Copy in: every launch reads the workspace, whose addresses the graph holds.
            xw = ws.pre[:T]
            torch.matmul(x, weight_ih.t(), out=xw)
            ws.w_hh.copy_(weight_hh)
            if has_bias:
                _fill_bias(ws.bias, bias_ih, bias_hh)
            if h0 is not None:
                ws.h0.copy_(h0)
            if c0 is not None:
                ws.c0.copy_(c0)
            h0_arg = ws.h0 if h0 is not None else None
            c0_arg = ws.c0 if c0 is not None else None
            out, gates, cells = ws.seq[:T], ws.gates[:T], ws.cells[:T]
            launch_all = _forward_launches(
                xw, ws.w_hh, ws.bias, h0_arg, c0_arg, out, gates, cells, ws.state, ws.h_n,
                ws.c_n, has_bias, grid, (block_b, block_h, block_k, num_warps),
            )  # fmt: skip
            variant = ("fwd", family[0], switches, T == 1)
            _run_steps(launch_all, device, ("fwd", family, T, switches), variant)
            # Copy out: the caller (and autograd) keep these while the workspace is reused.
            return out.clone(), ws.h_n.clone(), ws.c_n.clone(), gates.clone(), cells.clone()


def _forward_launches(xw, w_hh, bias, h0, c0, out, gates, cells, c_state, h_n, c_n, has_bias,
                      grid, blocks) -> Callable[[], None]:  # fmt: skip
    """The T forward step launches on these buffers, as one callable."""
    T, B, _ = out.shape
    H = w_hh.shape[1]
    block_b, block_h, block_k, num_warps = blocks
    h0_arg = h0 if h0 is not None else out  # never read without HAS_H_PREV at the first step
    c0_arg = c0 if c0 is not None else c_state  # never read without HAS_C0
    tensors = (xw, w_hh, bias, h0_arg, c0_arg, out, gates, cells, c_state, h_n, c_n)
    strides = (*_strides2(w_hh), *_strides2(h0), *_strides2(c0))
    upcast_dot = _upcast_dot(out.dtype)

    def launch_all() -> None:
        for t in range(T):
            _lstm_fwd_kernel[grid](
                *tensors,
                t,
                B,
                H,
                *strides,
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

    return launch_all


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
    _check_size(H)
    dtype, device = x.dtype, x.device
    block_b, block_h, block_k, num_warps = _blocks(B, dtype)
    blocks = (block_b, block_h, block_k, num_warps)
    grid = (triton.cdiv(H, block_h), triton.cdiv(B, block_b))
    switches = (c0 is not None, _upcast_dot(dtype))
    with _device_guard(device):
        if not _graphs_apply(device):
            _GRAPH_STATS["plain"] += 1
            dpre = empty(T, B, 4 * H, dtype=dtype, device=device)
            dc_state = empty(B, H, dtype=torch.float32, device=device)
            dc0 = empty(B, H, dtype=dtype, device=device)
            _backward_launches(
                dpre, _int32_safe(weight_hh, (0, 1)), _int32_safe(grad_out, (2,)),
                _int32_safe(grad_h_n, (1,)), _int32_safe(grad_c_n, (1,)), gates, cells,
                _int32_safe(c0, (1,)), dc_state, dc0, grid, blocks,
            )()  # fmt: skip
            return _backward_gemms(dpre, x, weight_ih, weight_hh, h0, out, dc0)
        ws, family = _workspace(device, dtype, B, H, T)
        with ws.lock:
            dpre, seq_grad = ws.pre[:T], ws.seq[:T]
            seq_grad.copy_(grad_out)
            ws.gates[:T].copy_(gates)
            ws.cells[:T].copy_(cells)
            ws.w_hh.copy_(weight_hh)
            ws.h_n.copy_(grad_h_n)
            ws.c_n.copy_(grad_c_n)
            if c0 is not None:
                ws.c0.copy_(c0)
            launch_all = _backward_launches(
                dpre, ws.w_hh, seq_grad, ws.h_n, ws.c_n, ws.gates[:T], ws.cells[:T],
                ws.c0 if c0 is not None else None, ws.state, ws.dc0, grid, blocks,
            )  # fmt: skip
            variant = ("bwd", family[0], switches, T == 1)
            _run_steps(launch_all, device, ("bwd", family, T, switches), variant)
            # The GEMMs read dpre from the workspace; only dc0 leaves it as it is.
            return _backward_gemms(dpre, x, weight_ih, weight_hh, h0, out, ws.dc0.clone())


def _backward_launches(dpre, w_hh, grad_out, grad_h_n, grad_c_n, gates, cells, c0, dc_state,
                       dc0, grid, blocks) -> Callable[[], None]:  # fmt: skip
    """The T backward step launches on these buffers, as one callable."""
    T, B, _ = grad_out.shape
    H = w_hh.shape[1]
    block_b, block_h, block_k, num_warps = blocks
    c0_arg = c0 if c0 is not None else dc_state  # never read without HAS_C0
    tensors = (dpre, w_hh, grad_out, grad_h_n, grad_c_n, gates, cells, c0_arg, dc_state, dc0)
    strides = (
        *_strides2(w_hh),
        *grad_out.stride(),
        *_strides2(grad_h_n),
        *_strides2(grad_c_n),
        *_strides2(c0),
    )
    upcast_dot = _upcast_dot(dpre.dtype)

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

    return launch_all


def _backward_gemms(dpre, x, weight_ih, weight_hh, h0, out, dc0) -> Tuple[torch.Tensor, ...]:
    """Everything after the step loop: large GEMMs over all steps at once."""
    T, B, I = x.shape
    H = weight_hh.shape[1]
    dpre_rows = dpre.reshape(T * B, 4 * H)
    dx = torch.matmul(dpre, weight_ih)
    dweight_ih = dpre_rows.t().matmul(x.reshape(T * B, I))
    if h0 is not None:
        h_prev = torch.cat([h0.unsqueeze(0), out[:-1]]).view(T * B, H)
        dweight_hh = dpre_rows.t().matmul(h_prev)
    else:  # h_{-1} = 0: step 0 adds nothing
        dweight_hh = dpre_rows[B:].t().matmul(out[:-1].reshape((T - 1) * B, H))
    dbias = dpre_rows.sum(0, dtype=torch.float32).to(dx.dtype)
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
    reason = size_reason(weight_hh.shape[1])
    if reason is not None:
        return reason
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
