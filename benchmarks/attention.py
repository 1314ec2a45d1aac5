"""Single-head attention: T queries over K keys (memory then segment), B, width E, one head of
width E, causal with the memory fully visible, key and value gates ``[E]``.

Two configurations, as the model runs them: ``fwd`` rows are inference (``"config": "eval"``:
gates on, no dropout, ``no_grad``); ``fwd+bwd`` rows are training (``"config": "train"``: gates
on, attention-weight dropout and value dropout both 0.1, gradients of q, k, v and both gates).
As in the model (``SHALayer``), the ``sha_rnn_kernels`` and ``triton`` training rows run the
segment form: keys and values are one tensor ``kv = cat([memory, segment])``, ``detached_keys =
K - T`` (the row's ``detached_keys``) and ``segment=``, so the memory's keys and values cost no
dK/dV product and the gradients are those of q, the segment and the gates. The baselines take
separate k and v and return dk and dv over every key, which is what they do in the model
(where autograd then also adds dk and dv for the one kv tensor: not timed here). Their
key-gate gradient needs ``d(k * gate)`` over every key, so they compute the full products
whether or not the memory is detached (an explicit detach would only add a copy).

Impls: ``sha_rnn_kernels`` (``functional.single_head_attention``, ``backend="auto"``),
``triton``, ``sdpa``, ``eager`` (the reference), ``compile`` (``torch.compile`` of the
reference; ``compile-max-autotune`` too with ``--max-autotune``).

``sdpa`` tries every backend of ``torch.nn.attention.sdpa_kernel`` plus the default dispatch on
the same q, k, v (as ``[B, 1, T, E]`` views) with the bottom-right causal mask
(``causal_lower_right``: query i sees keys up to i + K - T); the gates and the value dropout are
applied in PyTorch before it, the attention dropout by SDPA's ``dropout_p``. Backends that
reject the shape (FlashAttention stops at head dim 256) are listed in ``sdpa_rejected``; the row
is the fastest that ran (``sdpa_backend``), each one's median is in ``sdpa_backends_ms``, and
``sdpa_default_kernels`` names the kernels the default dispatch launched.
"""

from __future__ import annotations

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
    randn,
    rotated,
    sweep_shapes,
)

OP = "attention"
IMPLS = ("sha_rnn_kernels", "triton", "sdpa", "eager", "compile", "compile-max-autotune")
BASELINES = ("sdpa", "eager", "compile")
SIZE_LABEL = "GFLOP per call (4 B T K E, forward, mask ignored)"

PAPER = {"T": 1024, "K": 5000, "B": 16, "E": 1024}
SMALL = {"T": 32, "K": 128, "B": 2, "E": 64}
SWEEP_K = (1024, 5000, 8192)
# The configuration each pass measures, and the training dropout (both dropouts, as SHA-RNN).
CONFIGS = {"fwd": "eval", "fwd+bwd": "train"}
DROPOUT = 0.1
GRAD_INPUTS = ("q", "k", "v", "key_gate", "value_gate")
SMALL_SWEEP_K = (32, 128, 256)


def size(shape: dict) -> float:
    return 4 * shape["B"] * shape["T"] * shape["K"] * shape["E"] / 1e9


def shapes(opts: Options) -> Iterator[tuple]:
    return sweep_shapes(opts, PAPER, SMALL, {"K": (SWEEP_K, SMALL_SWEEP_K)})


def cases(opts: Options) -> Iterator[Case]:
    return expand_cases(OP, IMPLS, opts, shapes(opts), _builder)


def _make_inputs(
    shape: dict, dtype: torch.dtype, device: torch.device, grad: bool, segment: bool = False
) -> dict:
    """q, k, v and the gates; with ``segment`` (training rows of this library) ``kv`` =
    ``cat([memory, segment])`` and the ``segment`` leaf instead of k and v."""
    T, K, B, E = shape["T"], shape["K"], shape["B"], shape["E"]
    gate = lambda: torch.sigmoid(randn(E, dtype=torch.float32, device=device)).to(dtype)
    inputs = {
        "q": randn(T, B, E, dtype=dtype, device=device, requires_grad=grad),
        "key_gate": gate().requires_grad_(grad),
        "value_gate": gate().requires_grad_(grad),
    }
    if segment:
        inputs["segment"] = randn(T, B, E, dtype=dtype, device=device, requires_grad=grad)
        memory = randn(K - T, B, E, dtype=dtype, device=device)
        inputs["kv"] = torch.cat([memory, inputs["segment"].detach()])
    else:
        inputs["k"] = randn(K, B, E, dtype=dtype, device=device, requires_grad=grad)
        inputs["v"] = randn(K, B, E, dtype=dtype, device=device, requires_grad=grad)
    return inputs


def _timed(forward, pass_: str, rotation: Rotation, grad_inputs=GRAD_INPUTS):
    if pass_ == "fwd":

        def fwd():
            with torch.no_grad():
                return forward(rotation.next())

        return fwd
    grad_out = torch.randn_like(rotation.first["q"])

    def fwd_bwd():
        p = rotation.next()
        out = forward(p)
        return torch.autograd.grad(out, [p[name] for name in grad_inputs], grad_out)

    return fwd_bwd


def _sdpa_variants(shape: dict, opts: Options, training: bool):
    """{name: forward} for the default dispatch and each SDPA backend, with the backends that
    rejected the shape and why."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    mask = causal_lower_right(shape["T"], shape["K"])
    sdpa = torch.nn.functional.scaled_dot_product_attention
    dropout = DROPOUT if training else 0.0

    def forward(p):
        # The gates and the value dropout in PyTorch, as a user of SDPA would write them.
        k = p["k"] * p["key_gate"]
        v = torch.nn.functional.dropout(p["v"] * p["value_gate"], dropout, training)
        # [T, B, E] -> [B, 1, T, E] views; the result goes back to [T, B, E] like the others.
        q, k, v = (t.permute(1, 0, 2).unsqueeze(1) for t in (p["q"], k, v))
        out = sdpa(q, k, v, attn_mask=mask, dropout_p=dropout)
        return out.squeeze(1).permute(1, 0, 2)

    def pinned(backend):
        def run(p):
            with sdpa_kernel([backend]):
                return forward(p)

        return run

    variants = {"default": forward}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        if hasattr(SDPBackend, name):
            variants[name.lower().replace("_attention", "")] = pinned(getattr(SDPBackend, name))
    return variants


def _builder(impl: str, dtype: str, pass_: str, shape: dict, opts: Options):
    def build() -> Bench:
        device, grad = opts.device, pass_ == "fwd+bwd"
        config = CONFIGS[pass_]
        training = config == "train"
        dropout = DROPOUT if training else 0.0
        segment = grad and impl in ("sha_rnn_kernels", "triton")
        make = lambda: _make_inputs(shape, DTYPES[dtype], device, grad, segment)
        rotation = rotated(make, device)
        extra: dict = {"note": None, "config": config}
        grad_inputs = ("q", "segment", "key_gate", "value_gate") if segment else GRAD_INPUTS
        if impl in ("sha_rnn_kernels", "triton", "eager"):
            import sha_rnn_kernels.functional as SF

            backend = {"sha_rnn_kernels": "auto", "eager": "reference"}.get(impl, impl)
            detached = shape["K"] - shape["T"] if segment else 0
            extra["detached_keys"] = detached
            extra["segment"] = segment

            def forward(p):
                k, v = (p["kv"], p["kv"]) if segment else (p["k"], p["v"])
                return SF.single_head_attention(
                    p["q"], k, v, backend=backend, key_gate=p["key_gate"],
                    value_gate=p["value_gate"], dropout=dropout, value_dropout=dropout,
                    training=training, detached_keys=detached,
                    segment=p["segment"] if segment else None,
                )  # fmt: skip

            with torch.no_grad():  # raises BackendUnavailableError when the backend cannot run
                forward(rotation.first)
            extra["note"] = f'functional.single_head_attention(backend="{backend}")'
        elif impl in ("compile", "compile-max-autotune"):
            from sha_rnn_kernels import reference

            mode = "max-autotune" if impl == "compile-max-autotune" else None
            compiled = torch.compile(reference.single_head_attention, mode=mode)
            forward = lambda p: compiled(
                p["q"], p["k"], p["v"], key_gate=p["key_gate"], value_gate=p["value_gate"],
                dropout_p=dropout, value_dropout_p=dropout, training=training,
            )  # fmt: skip
            extra["note"] = f"torch.compile(reference.single_head_attention, mode={mode!r})"
        elif impl == "sdpa":
            return _sdpa_bench(shape, pass_, rotation, opts, training)
        else:
            raise ValueError(f"unknown attention impl {impl!r}")
        return Bench(fn=_timed(forward, pass_, rotation, grad_inputs), extra=extra)

    return build


def _sdpa_bench(
    shape: dict, pass_: str, rotation: Rotation, opts: Options, training: bool
) -> Bench:
    variants, rejected = {}, {}
    for name, forward in _sdpa_variants(shape, opts, training).items():
        try:  # finding out which backends accept d = E is the point of this row
            with torch.enable_grad() if pass_ == "fwd+bwd" else torch.no_grad():
                out = forward(rotation.first)
                if pass_ == "fwd+bwd":
                    out.sum().backward()
        except RuntimeError as exc:
            rejected[name] = str(exc).strip().splitlines()[0][:200]
            opts.log(f"sdpa {name} rejected {shape}: {rejected[name]}")
            continue
        variants[name] = _timed(forward, pass_, rotation)
    for t in rotation.sets:
        for tensor in t.values():
            tensor.grad = None
    if not variants:
        raise Unavailable(f"no SDPA backend accepted this shape: {rejected}")
    extra = {
        "sdpa_rejected": rejected, "note": "fastest SDPA backend that ran",
        "config": CONFIGS[pass_],
    }  # fmt: skip
    bench = Bench(variants=variants, variant_field="sdpa_backend", extra=extra)
    if opts.device.type == "cuda" and "default" in variants:
        default = variants["default"]

        def profile() -> dict:
            names = cuda_kernel_names(default)
            return {"sdpa_default_kernels": names, "sdpa_default_backend": _classify(names)}

        bench.after = profile
    return bench


def _classify(kernel_names: list) -> str:
    """Which SDPA backend a list of kernel names points to (a best guess from the names)."""
    text = " ".join(kernel_names).lower()
    if "flash" in text:
        return "flash"
    if "cudnn" in text:
        return "cudnn"
    if "fmha" in text or "efficient" in text or ("cutlass" in text and "attention" in text):
        return "efficient"
    return "math (matmul + softmax kernels)"
