"""One SHALayer with attention: T, B, E, F, memory M (M + T keys), dropout 0.1 in training.

Impls (one module, the same weights for all):
- ``sha_rnn_kernels``: ``backend="auto"`` everywhere.
- ``eager``: ``backend="reference"`` everywhere (the LSTM is the step-loop reference).
- ``original``: what the original code ran: the reference attention and Boom with the LSTM on
  ``torch.lstm`` (cuDNN), i.e. ``backend="reference"`` with the LSTM set to ``"torch"``.
- ``compile``: ``torch.compile`` of ``original`` (compiling the step loop would unroll T steps).

Parameters stay float32; bf16/fp16 run under autocast, as training does. ``fwd`` is an
inference forward (``eval()``, ``no_grad``); ``fwd+bwd`` runs in training mode and takes the
gradients of the input and of every parameter. The memory and LSTM state are random, the memory
at its steady length (``max_positions - T``).
"""

from __future__ import annotations

from typing import Iterator

import torch

from .harness import Bench, Case, Options, Rotation, autocast, expand_cases, randn

OP = "layer"
IMPLS = ("sha_rnn_kernels", "eager", "original", "compile")
BASELINES = ("original", "compile", "eager")
SIZE_LABEL = "tokens per call (T B)"

PAPER = {"T": 1024, "B": 16, "E": 1024, "F": 4096, "M": 3976}
SMALL = {"T": 16, "B": 2, "E": 64, "F": 256, "M": 48}
DROPOUT = 0.1


def size(shape: dict) -> float:
    return float(shape["T"] * shape["B"])


def cases(opts: Options) -> Iterator[Case]:
    shape = dict(SMALL if opts.small else PAPER)
    return expand_cases(OP, IMPLS, opts, iter([(shape, True)]), _builder)


def use_torch_lstm(model: torch.nn.Module) -> torch.nn.Module:
    """Run every LSTM of ``model`` on ``torch.lstm`` (cuDNN on CUDA), the rest unchanged."""
    from sha_rnn_kernels import LSTM

    for module in model.modules():
        if isinstance(module, LSTM):
            module.backend = "torch"
    return model


def backend_for(impl: str) -> str:
    """The ``backend=`` a model impl is built with (``original``/``compile`` then move their
    LSTMs to ``"torch"`` with :func:`use_torch_lstm`)."""
    return "auto" if impl == "sha_rnn_kernels" else "reference"


def _builder(impl: str, dtype: str, pass_: str, shape: dict, opts: Options):
    def build() -> Bench:
        from sha_rnn_kernels import SHALayer

        if impl not in IMPLS:
            raise ValueError(f"unknown layer impl {impl!r}")
        device, T, B, E, M = opts.device, shape["T"], shape["B"], shape["E"], shape["M"]
        torch.manual_seed(0)  # the same weights for every impl
        layer = SHALayer(
            E, shape["F"], use_attn=True, dropout=DROPOUT, max_positions=M + T,
            backend=backend_for(impl),
        ).to(device)  # fmt: skip
        if impl in ("original", "compile"):
            use_torch_lstm(layer)
        training = pass_ == "fwd+bwd"
        layer.train(training)
        run = torch.compile(layer) if impl == "compile" else layer

        def make():
            h = randn(T, B, E, dtype=torch.float32, device=device, requires_grad=training)
            mem = randn(M, B, E, dtype=torch.float32, device=device)
            state = tuple(randn(1, B, E, dtype=torch.float32, device=device, scale=0.5)
                          for _ in range(2))  # fmt: skip
            return {"h": h, "mem": mem, "hidden": state}

        rotation = Rotation([make()])
        params = [p for p in layer.parameters() if p.requires_grad]

        def forward(p):
            with autocast(device, dtype):
                return run(p["h"], p["mem"], p["hidden"])[0]

        with torch.no_grad():  # raises BackendUnavailableError when a backend cannot run
            probe = forward(rotation.first)
        grad_out = torch.randn_like(probe, dtype=torch.float32)
        del probe

        if training:

            def fn():
                p = rotation.next()
                out = forward(p)
                # lnout, qkvs and r_gate exist for state-dict compatibility and get no gradient
                return torch.autograd.grad(
                    out, [p["h"], *params], grad_out.to(out.dtype), allow_unused=True
                )

        else:

            def fn():
                with torch.no_grad():
                    return forward(rotation.next())

        notes = {
            "sha_rnn_kernels": 'SHALayer(backend="auto")',
            "eager": 'SHALayer(backend="reference"), step-loop LSTM',
            "original": 'SHALayer(backend="reference"), LSTM on torch.lstm (cuDNN)',
            "compile": 'torch.compile of "original"',
        }
        recipe = "fp32" if dtype == "fp32" else f"{dtype} autocast, fp32 weights"
        return Bench(fn=fn, extra={"note": f"{notes[impl]}; {recipe}"})

    return build
