"""Boom: N = T*B rows, E -> F, GELU (x * sigmoid(1.702 x)), dropout, sum of the F // E chunks.

Two configurations, both measured: ``"config": "train"`` (dropout 0.1 on the F-wide activation,
as the paper trains) and ``"eval"`` (no dropout). The dropout probability is also part of the
row's shape (``p``), so train and eval rows are never compared with each other.

Impls: ``sha_rnn_kernels`` (``functional.boom``, ``backend="auto"``), ``triton``,
``triton-fused`` (the one-kernel forward, ``ops.boom.boom(..., fused=True)``), ``eager`` (the
reference), ``compile`` (``torch.compile`` of the reference; ``compile-max-autotune`` too with
``--max-autotune``). ``fwd+bwd`` takes the gradients of x, the weight and the bias.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from .harness import DTYPES, Bench, Case, Options, expand_cases, randn, rotated, sweep_shapes

OP = "boom"
IMPLS = ("sha_rnn_kernels", "triton", "triton-fused", "eager", "compile", "compile-max-autotune")
BASELINES = ("eager", "compile")
SIZE_LABEL = "GFLOP per call (2 N E F, forward)"

PAPER = {"T": 1024, "B": 16, "E": 1024, "F": 4096}
SMALL = {"T": 32, "B": 4, "E": 64, "F": 256}
# The paper's dropout on the Boom's activation, and the two configurations measured.
TRAIN_DROPOUT = 0.1
CONFIGS = {"train": TRAIN_DROPOUT, "eval": 0.0}
# Rows N = T * B: the batch stays 16 and T grows.
SWEEP_T = (64, 256, 1024, 4096)
SMALL_SWEEP_T = (8, 32, 128)


def size(shape: dict) -> float:
    return 2 * shape["T"] * shape["B"] * shape["E"] * shape["F"] / 1e9


def shapes(opts: Options) -> Iterator[tuple]:
    """Every size in both configurations: the shape carries the dropout probability ``p``."""
    for shape, paper in sweep_shapes(opts, PAPER, SMALL, {"T": (SWEEP_T, SMALL_SWEEP_T)}):
        for p in CONFIGS.values():
            yield {**shape, "p": p}, paper


def config_of(shape: dict) -> str:
    return "train" if shape.get("p", 0.0) > 0 else "eval"


def cases(opts: Options) -> Iterator[Case]:
    return expand_cases(OP, IMPLS, opts, shapes(opts), _builder)


def _make_inputs(shape: dict, dtype: torch.dtype, device: torch.device, grad: bool) -> dict:
    T, B, E, F = shape["T"], shape["B"], shape["E"], shape["F"]
    return {
        "x": randn(T, B, E, dtype=dtype, device=device, requires_grad=grad),
        "weight": randn(
            F, E, dtype=dtype, device=device, scale=1 / math.sqrt(E), requires_grad=grad
        ),
        "bias": randn(F, dtype=dtype, device=device, scale=0.1, requires_grad=grad),
    }


def _builder(impl: str, dtype: str, pass_: str, shape: dict, opts: Options):
    def build() -> Bench:
        device, grad = opts.device, pass_ == "fwd+bwd"
        make = lambda: _make_inputs(shape, DTYPES[dtype], device, grad)
        rotation = rotated(make, device)
        p = shape.get("p", 0.0)
        training = p > 0
        if impl in ("sha_rnn_kernels", "triton", "eager"):
            import sha_rnn_kernels.functional as SF

            backend = {"sha_rnn_kernels": "auto", "eager": "reference"}.get(impl, impl)
            forward = lambda q: SF.boom(
                q["x"], q["weight"], q["bias"], dropout=p, training=training, backend=backend
            )
            with torch.no_grad():  # raises BackendUnavailableError when the backend cannot run
                forward(rotation.first)
            note = f'functional.boom(dropout={p}, training={training}, backend="{backend}")'
        elif impl == "triton-fused":
            import sha_rnn_kernels.functional as SF
            from sha_rnn_kernels.ops import boom as boom_ops

            with torch.no_grad():  # the same availability check as backend="triton"
                first = rotation.first
                SF.boom(first["x"], first["weight"], first["bias"], backend="triton")
            seeds = iter(range(1, 2**62))  # a fresh mask per call, as training draws one
            forward = lambda q: boom_ops.boom(
                q["x"], q["weight"], q["bias"], dropout_p=p, seed=next(seeds), fused=True
            )
            note = f"ops.boom.boom(dropout_p={p}, fused=True)"
        elif impl in ("compile", "compile-max-autotune"):
            from sha_rnn_kernels import reference

            mode = "max-autotune" if impl == "compile-max-autotune" else None
            compiled = torch.compile(reference.boom, mode=mode)
            forward = lambda q: compiled(q["x"], q["weight"], q["bias"], p, training)
            note = f"torch.compile(reference.boom, mode={mode!r}), dropout {p}"
        else:
            raise ValueError(f"unknown boom impl {impl!r}")

        if pass_ == "fwd":

            def fn():
                with torch.no_grad():
                    return forward(rotation.next())

        else:
            grad_out = torch.randn_like(rotation.first["x"])

            def fn():
                q = rotation.next()
                out = forward(q)
                return torch.autograd.grad(out, [q["x"], q["weight"], q["bias"]], grad_out)

        return Bench(fn=fn, extra={"note": note, "config": config_of(shape)})

    return build
