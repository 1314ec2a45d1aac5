"""LSTM: one layer, input I -> hidden H, T steps, initial state given.

Impls: ``sha_rnn_kernels`` (``functional.lstm`` with ``backend="auto"``), ``triton`` and
``cuda`` (one backend each), ``cudnn`` (``torch.nn.LSTM``), ``flashrnn`` (the flashrnn
package's ``cuda_fused`` backend, one head of width H, where it imports and runs), ``eager``
(the package's step-loop reference). Every impl includes the input projection ``x W_ih^T``.

``fwd`` is an inference forward under ``torch.no_grad()``; ``fwd+bwd`` is a forward with
autograd followed by the gradients of the output with respect to x, h0, c0 and every weight.
Rows also carry ``step_us`` (time per time step), and cudnn rows the algorithm torch's
heuristic makes cuDNN use (``cudnn_algo_expected``) and the kernels a profile saw.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from .harness import (
    DTYPES,
    Bench,
    Case,
    Options,
    Rotation,
    Unavailable,
    cuda_kernel_names,
    expand_cases,
    rotated,
    sweep_shapes,
    uniform,
)

OP = "lstm"
IMPLS = ("sha_rnn_kernels", "triton", "cuda", "cudnn", "flashrnn", "eager")
BASELINES = ("cudnn", "eager")
SIZE_LABEL = "GFLOP per call (2 T B 4H (I + H), forward)"

PAPER = {"T": 1024, "B": 16, "I": 1024, "H": 1024}
SMALL = {"T": 16, "B": 4, "I": 64, "H": 64}
SWEEP_B = (1, 16, 64)
SWEEP_H = (256, 1024, 2048)
SMALL_SWEEP_B = (1, 4)
SMALL_SWEEP_H = (32, 64, 128)


def size(shape: dict) -> float:
    T, B, I, H = shape["T"], shape["B"], shape["I"], shape["H"]
    return 2 * T * B * 4 * H * (I + H) / 1e9


def shapes(opts: Options) -> Iterator[tuple]:
    """(shape, is the paper case): batch x hidden (input size = hidden)."""
    sizes = tuple({"I": h, "H": h} for h in SWEEP_H)
    small_sizes = tuple({"I": h, "H": h} for h in SMALL_SWEEP_H)
    return sweep_shapes(
        opts, PAPER, SMALL, {"B": (SWEEP_B, SMALL_SWEEP_B), "H": (sizes, small_sizes)}
    )


def cases(opts: Options) -> Iterator[Case]:
    return expand_cases(OP, IMPLS, opts, shapes(opts), _builder)


def expected_cudnn_algo(dtype: str, shape: dict, device: torch.device) -> str:
    """The cuDNN RNN algorithm torch asks for, following the persistence heuristic in torch's
    ``aten/src/ATen/native/cudnn/RNN.cpp``: the persistent (PERSIST_STATIC) kernel only for half
    inputs, one layer, H <= 1024 with H and I multiples of 128, and on sm_80+ (not sm_86, with
    at least 98 SMs) a batch that is a multiple of 8 and at most 128; sm_70 has its own batch and
    length rule. Everything else (bf16 and fp32 always) is STANDARD. This is an expectation;
    ``cudnn_kernels`` records what a profile saw."""
    if device.type != "cuda":
        return "none (torch.nn.LSTM runs ATen's CPU kernel, not cuDNN)"
    if dtype != "fp16":
        return "STANDARD"
    T, B, I, H = shape["T"], shape["B"], shape["I"], shape["H"]
    if not (H <= 1024 and H % 128 == 0 and I % 128 == 0):
        return "STANDARD"
    props = torch.cuda.get_device_properties(device)
    if props.major == 7 and props.minor != 5:
        batch_ok = (B % 16 == 0 and B not in (80, 112)) or B == 8
        length_ok = (T >= 40 and B <= 128) or (T >= 20 and B <= 96) or (T >= 10 and B <= 32)
        persistent = batch_ok and length_ok
    elif props.major >= 8 and props.minor != 6 and props.multi_processor_count >= 98:
        persistent = B % 8 == 0 and B <= 128
    else:
        persistent = False
    return "PERSIST_STATIC" if persistent else "STANDARD"


def _make_inputs(shape: dict, dtype: torch.dtype, device: torch.device, grad: bool) -> dict:
    T, B, I, H = shape["T"], shape["B"], shape["I"], shape["H"]
    bound = 1.0 / math.sqrt(H)  # torch.nn.LSTM's own init range keeps the gates unsaturated
    return {
        "x": uniform(T, B, I, bound=1.0, dtype=dtype, device=device, requires_grad=grad),
        "weight_ih": uniform(4 * H, I, bound=bound, dtype=dtype, device=device, requires_grad=grad),
        "weight_hh": uniform(4 * H, H, bound=bound, dtype=dtype, device=device, requires_grad=grad),
        "bias_ih": uniform(4 * H, bound=bound, dtype=dtype, device=device, requires_grad=grad),
        "bias_hh": uniform(4 * H, bound=bound, dtype=dtype, device=device, requires_grad=grad),
        "h0": uniform(B, H, bound=0.5, dtype=dtype, device=device, requires_grad=grad),
        "c0": uniform(B, H, bound=0.5, dtype=dtype, device=device, requires_grad=grad),
    }


def _timed(forward, leaves_of, pass_: str, rotation: Rotation):
    """The timed region: ``forward(inputs) -> output`` alone (fwd) or with the gradients of the
    output with respect to ``leaves_of(inputs)`` (fwd+bwd, ``torch.autograd.grad`` so nothing
    accumulates across calls). ``grad_out`` is drawn once, outside the region."""
    if pass_ == "fwd":

        def fwd():
            with torch.no_grad():
                return forward(rotation.next())

        return fwd
    with torch.enable_grad():
        probe = forward(rotation.first)
    grad_out = torch.randn_like(probe)
    del probe

    def fwd_bwd():
        inputs = rotation.next()
        out = forward(inputs)
        return torch.autograd.grad(out, leaves_of(inputs), grad_out)

    return fwd_bwd


def _builder(impl: str, dtype: str, pass_: str, shape: dict, opts: Options):
    def build() -> Bench:
        device, torch_dtype, grad = opts.device, DTYPES[dtype], pass_ == "fwd+bwd"
        make = lambda: _make_inputs(shape, torch_dtype, device, grad)
        extra = {"note": None}
        if impl in ("sha_rnn_kernels", "triton", "cuda", "eager"):
            import sha_rnn_kernels.functional as SF

            backend = {"sha_rnn_kernels": "auto", "eager": "reference"}.get(impl, impl)
            rotation = rotated(make, device)

            def forward(p):
                state = (p["h0"], p["c0"])
                out, _ = SF.lstm(
                    p["x"], p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"], state,
                    backend=backend,
                )  # fmt: skip
                return out

            # An explicit backend that cannot run raises BackendUnavailableError here.
            with torch.no_grad():
                forward(rotation.first)
            leaves = lambda p: list(p.values())
            extra["note"] = f'functional.lstm(backend="{backend}")'
        elif impl == "cudnn":
            rotation = rotated(lambda: _cudnn_inputs(make(), shape, torch_dtype, device), device)
            forward = lambda p: p["module"](p["x"], (p["h0"], p["c0"]))[0]
            leaves = lambda p: [p["x"], p["h0"], p["c0"], *p["module"].parameters()]
            extra["cudnn_algo_expected"] = expected_cudnn_algo(dtype, shape, device)
            extra["note"] = "torch.nn.LSTM; cudnn_algo_expected follows torch's heuristic"
        elif impl == "flashrnn":
            forward, leaves, rotation, note = _flashrnn(make, dtype, shape, device, grad)
            extra["note"] = note
        else:
            raise ValueError(f"unknown lstm impl {impl!r}")

        fn = _timed(forward, leaves, pass_, rotation)
        bench = Bench(fn=fn, extra=extra)
        if impl == "cudnn" and device.type == "cuda":

            def profile() -> dict:
                with torch.no_grad():
                    names = cuda_kernel_names(lambda: forward(rotation.first))
                return {"cudnn_kernels": names}

            bench.after = profile
        return bench

    return build


def _cudnn_inputs(p: dict, shape: dict, dtype: torch.dtype, device: torch.device) -> dict:
    grad = p["x"].requires_grad
    module = torch.nn.LSTM(shape["I"], shape["H"]).to(device=device, dtype=dtype)
    with torch.no_grad():
        module.weight_ih_l0.copy_(p["weight_ih"])
        module.weight_hh_l0.copy_(p["weight_hh"])
        module.bias_ih_l0.copy_(p["bias_ih"])
        module.bias_hh_l0.copy_(p["bias_hh"])
    module.requires_grad_(grad)
    module.flatten_parameters()
    h0 = p["h0"].detach().unsqueeze(0).requires_grad_(grad)
    c0 = p["c0"].detach().unsqueeze(0).requires_grad_(grad)
    return {"module": module, "x": p["x"], "h0": h0, "c0": c0}


def _flashrnn(make, dtype: str, shape: dict, device: torch.device, grad: bool):
    """flashrnn's fused LSTM with one head of width H. Its gates come pre-projected
    (``Wx [B, T, 4, 1, H]``), so the projection ``x W_ih^T + b_ih`` is part of the timed region
    like in every other impl. Its gate order differs from torch's; with random weights that
    changes nothing about the cost."""
    if device.type != "cuda":
        raise Unavailable("flashrnn's cuda_fused backend needs a CUDA device")
    try:
        from flashrnn import flashrnn
    except ImportError as exc:
        raise Unavailable(f"flashrnn is not installed ({exc})") from exc
    names = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    T, B, H = shape["T"], shape["B"], shape["H"]

    def prepare():
        p = make()
        recurrent = p["weight_hh"].detach().reshape(4, 1, H, H).contiguous().requires_grad_(grad)
        bias = p["bias_hh"].detach().reshape(4, 1, H).contiguous().requires_grad_(grad)
        # flashrnn's state layout is [states, 1, B, heads, H]: (h0, c0) stacked.
        states = torch.stack([p["h0"].detach(), p["c0"].detach()])[:, None, :, None, :]
        return dict(p, R=recurrent, b=bias, states=states.contiguous().requires_grad_(grad))

    rotation = rotated(prepare, device)

    def forward(p):
        gates_x = torch.nn.functional.linear(p["x"], p["weight_ih"], p["bias_ih"])
        wx = gates_x.reshape(T, B, 4, 1, H).transpose(0, 1)
        out, _ = flashrnn(
            wx, p["R"], p["b"], states=p["states"], function="lstm", backend="cuda_fused",
            dtype=names[dtype],
        )  # fmt: skip
        return out

    try:  # the first call builds and autotunes flashrnn's kernels for this shape
        with torch.enable_grad() if grad else torch.no_grad():
            forward(rotation.first)
    except Exception as exc:  # an external package: any failure leaves the row absent, loudly
        raise Unavailable(f"flashrnn cuda_fused did not run this shape: {exc}", loud=True) from exc
    leaves = lambda p: [p["x"], p["weight_ih"], p["bias_ih"], p["R"], p["b"], p["states"]]
    return forward, leaves, rotation, "flashrnn cuda_fused, one head of width H"
