"""The LSTM's two Triton step kernels, forward and backward: one launch per time step, each fusing
the recurrent GEMM with the gates. Their launchers, the CUDA-graph replay and the op:
:mod:`.lstm`; the design: docs/design/lstm.md.
"""

import triton
import triton.language as tl


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
    # Row offsets in int64: with a batch-strided tensor (e.g. a batch-first grad_out),
    # b * stride_b reaches B*T*H, which passes 2^31 on long sequences.
    offs_b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
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
    # Row offsets in int64: with a batch-strided tensor (e.g. a batch-first grad_out),
    # b * stride_b reaches B*T*H, which passes 2^31 on long sequences.
    offs_b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
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

