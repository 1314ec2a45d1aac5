"""The device check of every kernel of ours: a small forward and backward against PyTorch.

Each check runs the kernel under test and a high-precision reference (float64 on the CPU; on a
GPU float64 for the Triton ops and cuDNN in float32 with TF32 off for the LSTM), plus the same
PyTorch computation in the kernel's dtype, and compares outputs and every gradient with
:func:`sha_rnn_kernels._device_check.compare`. Kernel outputs start as NaN, so an element the
kernel never writes fails. A check uses a private random generator (the user's stream never
moves) and turns gradients on and autocast off whatever the caller's mode.

What each check covers (``tiny``: the sizes used on the CPU through Triton's interpreter):

- ``lstm``/``cuda`` and ``lstm``/``triton``: out, h_n, c_n and the gradients of x, both weights,
  both biases, h0 and c0, for T=64 steps (tiny: 4) at the class's hidden size H, for the two
  batches of its 16-row bucket (the full bucket and a partly filled last tile).
- ``attention``/``triton``: eval (no dropout; separate k and v with both gates: out, dq, dk,
  dv, both gates' gradients) and training with both dropouts in the segment form the model runs
  (``k = v = cat([memory, segment])``, the memory detached: out, dq, d segment, both gates'
  gradients), the dropout masks read back from the kernel and checked for plausible rates.
- ``boom``/``triton``: the split (cuBLAS + Triton) and the fused (one Triton GEMM) forward and
  backward, with dropout (mask from the kernel's own mask generator, rate checked): out, dx,
  dW, db.
- ``decode``/``triton``: the split-key decode attention with both gates (forward only; it is
  used for generation) against float64.

``run(spec)`` runs the check a spec names (what :mod:`sha_rnn_kernels._contained` sends to its
child process); :func:`override` replaces the kernel under test (for tests of the containment).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, Optional, Tuple

import torch

from . import reference
from ._device_check import Verdict, batch_bucket, check_batches, compare, dtype_name

Results = Dict[str, torch.Tensor]

# (op, backend) -> the kernel under test, for tests that plant a faulty one (see override()).
_OVERRIDES: Dict[Tuple[str, str], Callable] = {}


def override(op: str, backend: str, kernel: Optional[Callable]) -> None:
    """Check ``kernel`` instead of the real one for ``(op, backend)`` (None restores it). The
    signature is that of the real entry point (see :func:`kernel_for`)."""
    if kernel is None:
        _OVERRIDES.pop((op, backend), None)
    else:
        _OVERRIDES[(op, backend)] = kernel


def kernel_for(op: str, backend: str) -> Callable:
    """The entry point a check calls: ``ops.lstm.lstm`` / ``_cuda.lstm`` (x, w_ih, w_hh, b_ih,
    b_hh, h0, c0), ``ops.attention.attention``, ``ops.boom.boom``,
    ``ops.decode.decode_attention``."""
    if (op, backend) in _OVERRIDES:
        return _OVERRIDES[(op, backend)]
    if op == "lstm" and backend == "cuda":
        from . import _cuda

        return _cuda.lstm
    if op == "lstm":
        from .ops import lstm as module

        return module.lstm
    if op == "attention":
        from .ops import attention as module

        return module.attention
    if op == "boom":
        from .ops import boom as module

        return module.boom
    if op == "decode":
        from .ops import decode as module

        return module.decode_attention
    raise ValueError(f"no kernel of ours for op {op!r} on backend {backend!r}")


@contextlib.contextmanager
def _check_mode(device: torch.device):
    """Gradients on (even under no_grad or inference_mode), autocast off, NaN-filled kernel
    outputs, and the reference's cuDNN in true float32 (no TF32)."""
    from .testing import poison_outputs

    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autocast(device_type=device.type, enabled=False))
        stack.enter_context(poison_outputs())
        if device.type == "cuda":
            stack.enter_context(torch.backends.cudnn.flags(enabled=True, allow_tf32=False))
        yield


def _randn(generator: torch.Generator, *shape, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale


def _grads(loss: torch.Tensor, leaves: Dict[str, torch.Tensor]) -> Results:
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    return {f"d{n}": g for n, g in zip(names, grads) if g is not None}


def _leaves(base: Dict[str, torch.Tensor], device, dtype) -> Dict[str, torch.Tensor]:
    return {n: t.to(device=device, dtype=dtype).requires_grad_() for n, t in base.items()}


def _failed(op, backend, dtype, shape, exc: BaseException) -> Verdict:
    return Verdict(op, backend, dtype_name(dtype), shape, False,
                   error=f"exception: {type(exc).__name__}: {exc}")  # fmt: skip


def _check(op: str, backend: str, dtype: torch.dtype, shape: str, device: torch.device,
           kernel_run: Callable[[], Results], reference_run: Callable[[torch.dtype], Results],
           reference_dtype: torch.dtype) -> Verdict:  # fmt: skip
    """Run the kernel (an exception is a failed check), then the reference in
    ``reference_dtype`` and in the kernel's dtype, and compare."""
    with _check_mode(device):
        try:
            actual = kernel_run()
        except Exception as exc:  # noqa: BLE001 - any failure of the kernel is a failed check
            return _failed(op, backend, dtype, shape, exc)
        expected = reference_run(reference_dtype)
        lowp = reference_run(dtype)
    return compare(op, backend, dtype, shape, actual, expected, lowp)


def _worst(verdicts) -> Verdict:
    """One verdict for several sub-checks: the first failure, else the one nearest its
    tolerance; ``shape`` lists every sub-check."""
    first = verdicts[0]
    failed = [v for v in verdicts if not v.passed]
    pick = failed[0] if failed else max(verdicts, key=lambda v: v.max_error / v.tolerance)
    return Verdict(first.op, first.backend, first.dtype, "; ".join(v.shape for v in verdicts),
                   pick.passed, pick.max_error, pick.tolerance, pick.worst, pick.error)  # fmt: skip


def _rate_reason(kept: int, total: int, dropout_p: float, what: str) -> Optional[str]:
    """None when ``kept`` of ``total`` is a plausible keep count at ``dropout_p`` (6 sigma)."""
    keep = 1.0 - dropout_p
    sigma = math.sqrt(total * keep * dropout_p)
    if abs(kept - total * keep) <= 6.0 * sigma + 1.0:
        return None
    return f"{what} kept {kept} of {total} elements at dropout {dropout_p} (expected ~{keep:.0%})"


# ----------------------------------------------------------------------------------------------
# LSTM
# ----------------------------------------------------------------------------------------------


def check_lstm(kernel: Callable, device: torch.device, dtype: torch.dtype, hidden: int,
               batch: int, steps: int = 64, input_size: int = 64, backend: str = "cuda",
               seed: int = 0) -> Verdict:  # fmt: skip
    """``kernel`` against ``torch.lstm``: out, h_n, c_n and the gradients of x, both weights,
    both biases, h0 and c0, for a loss that uses out, h_n and c_n. 64 steps by default: enough
    hand-offs between steps for an ordering bug to show, and still ~1 ms at H=1024 on a GPU
    (estimated: 64 x 6.5 us for the kernel, cuDNN about as much). Weights follow
    ``torch.nn.LSTM``'s init; inputs are random (a private generator)."""
    shape = f"T={steps} B={batch} I={input_size} H={hidden}"
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(hidden)
    base = {
        "x": _randn(gen, steps, batch, input_size),
        "weight_ih": torch.rand(4 * hidden, input_size, generator=gen, dtype=torch.float64),
        "weight_hh": torch.rand(4 * hidden, hidden, generator=gen, dtype=torch.float64),
        "bias_ih": torch.rand(4 * hidden, generator=gen, dtype=torch.float64),
        "bias_hh": torch.rand(4 * hidden, generator=gen, dtype=torch.float64),
        "h0": _randn(gen, batch, hidden, scale=0.5),
        "c0": _randn(gen, batch, hidden, scale=0.5),
    }
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        base[name] = (base[name] * 2.0 - 1.0) * bound
    loss_weights = {
        "out": _randn(gen, steps, batch, hidden),
        "h_n": _randn(gen, batch, hidden),
        "c_n": _randn(gen, batch, hidden),
    }

    def run(fn: Callable, run_dtype: torch.dtype) -> Results:
        leaves = _leaves(base, device, run_dtype)
        out, h_n, c_n = fn(*leaves.values())
        results = {"out": out, "h_n": h_n, "c_n": c_n}
        loss = sum((results[n].double() * w.to(device)).sum() for n, w in loss_weights.items())
        return {**{n: r.detach() for n, r in results.items()}, **_grads(loss, leaves)}

    def torch_lstm(*args):
        return reference.lstm_torch(*args, training=True)

    # float64 where it is cheap (CPU); on a GPU cuDNN in float32 (TF32 off), whose error is
    # orders of magnitude under any low-precision tolerance.
    reference_dtype = torch.float64 if device.type == "cpu" else torch.float32
    return _check("lstm", backend, dtype, shape, device, lambda: run(kernel, dtype),
                  lambda d: run(torch_lstm, d), reference_dtype)  # fmt: skip


def lstm_batches(device: torch.device, dtype: torch.dtype, hidden: int, batch: int,
                 backend: str) -> Tuple[int, ...]:  # fmt: skip
    """The batches the check of a (hidden, batch bucket) class runs: the bucket's largest batch
    and one with a partly filled last tile; for the CUDA kernel only those it can take (the
    class's own batch instead of one it cannot)."""
    batches = check_batches(batch)
    if backend != "cuda" or device.type != "cuda":
        return batches
    from . import _cuda

    fitting = []
    for check_batch in batches:
        probe = torch.empty(1, check_batch, 1, device=device, dtype=dtype)
        weight_hh = torch.empty(4 * hidden, hidden, device=device, dtype=dtype)
        ok = _cuda.lstm_unsupported_reason(probe, weight_hh[:, :1], weight_hh) is None
        fitting.append(check_batch if ok else batch)
    return tuple(dict.fromkeys(fitting))


# ----------------------------------------------------------------------------------------------
# Boom
# ----------------------------------------------------------------------------------------------


def _boom_formula(x, weight, bias, keep_scale):
    """``sum_c chunk_c(keep_scale * gelu(x W^T + b))``, in the inputs' dtype."""
    width = x.shape[-1]
    chunks = weight.shape[0] // width
    pre = x @ weight.t() + bias
    act = (pre * torch.sigmoid(1.702 * pre))[..., : chunks * width].unflatten(-1, (chunks, width))
    # As torch's dropout does: scale in (at least) fp32, round once to the input dtype.
    act = (act * keep_scale.to(torch.promote_types(act.dtype, torch.float32))).to(act.dtype)
    return act.sum(-2)


def check_boom(device: torch.device, dtype: torch.dtype, rows: int, width: int,
               hidden_dim: int, backend: str = "triton", seed: int = 0,
               dropout_p: float = 0.1) -> Verdict:  # fmt: skip
    """The Triton Boom, split and fused, forward and backward with dropout, against the formula
    in float64 with the kernel's own mask: out, dx, dW, db."""
    from .ops import boom as boom_ops

    kernel = kernel_for("boom", backend)
    chunks = hidden_dim // width
    gen = torch.Generator().manual_seed(seed)
    base = {
        "x": _randn(gen, rows, width),
        "weight": _randn(gen, hidden_dim, width, scale=1.0 / math.sqrt(width)),
        "bias": _randn(gen, hidden_dim, scale=0.1),
    }
    grad_out = _randn(gen, rows, width)
    drop_seed = 1234 + seed
    verdicts = []
    with _check_mode(device):
        try:
            packed = boom_ops.dropout_mask(rows, width, chunks, dropout_p, drop_seed, device)
            lanes = torch.arange(8, device=device, dtype=torch.int32)
            bits = (packed.to(torch.int32)[..., None] >> lanes) & 1
            keep = bits.view(rows, chunks, -1)[..., :width].bool().cpu()
        except Exception as exc:  # noqa: BLE001 - a failing mask kernel fails the check
            return _failed("boom", backend, dtype, f"N={rows} E={width} F={hidden_dim}", exc)
    rate = _rate_reason(int(keep.sum()), keep.numel(), dropout_p, "the Boom dropout mask")
    keep_scale = keep.double() / (1.0 - dropout_p)

    def reference_run(run_dtype):
        leaves = _leaves(base, device, run_dtype)
        out = _boom_formula(*leaves.values(), keep_scale.to(device))
        return {"out": out.detach(), **_grads((out.double() * grad_out.to(device)).sum(), leaves)}

    for fused in (False, True):
        shape = f"{'fused' if fused else 'split'} N={rows} E={width} F={hidden_dim} p={dropout_p}"

        def kernel_run(fused=fused):
            leaves = _leaves(base, device, dtype)
            out = kernel(*leaves.values(), dropout_p=dropout_p, seed=drop_seed, fused=fused)
            grads = _grads((out.double() * grad_out.to(device)).sum(), leaves)
            return {"out": out.detach(), **grads}

        verdicts.append(_check("boom", backend, dtype, shape, device, kernel_run,
                               reference_run, torch.float64))  # fmt: skip
    verdict = _worst(verdicts)
    if rate is not None and verdict.passed:
        verdict.passed, verdict.error = False, rate
    return verdict


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------


def _attention_formula(q, k, v, key_gate, value_gate, attn_scale=None, value_scale=None,
                       detached_keys=0):  # fmt: skip
    """The model's attention in the inputs' dtype; ``attn_scale [B, T, K]`` and
    ``value_scale [K, B, E]``: keep / (1 - p) of each dropout, or None."""
    query_len, _, width = q.shape
    key_len = k.shape[0]
    k = torch.cat([k[:detached_keys].detach(), k[detached_keys:]]) * key_gate
    v = torch.cat([v[:detached_keys].detach(), v[detached_keys:]]) * value_gate
    if value_scale is not None:
        v = v * value_scale.to(v.dtype)
    scores = torch.einsum("tbe,kbe->btk", q, k).float() / math.sqrt(width)
    scores = scores.to(torch.promote_types(q.dtype, torch.float32))
    visible = reference.causal_memory_mask(query_len, key_len, q.device, scores.dtype) == 0
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1).to(q.dtype)
    if attn_scale is not None:
        probs = probs * attn_scale.to(probs.dtype)
    return torch.einsum("btk,kbe->tbe", probs, v)


def _attention_masks(kernel, device, query_len, key_len, batch, width, p, pv, seed):
    """The kernel's keep masks for ``seed``: of the attention weights ``[B, T, K]`` (from a
    forward with the identity as values, which needs K <= E) and of the values ``[K, B, E]``
    (the zeros of dV for dO = 1; every key is visible to the last query)."""
    gen = torch.Generator().manual_seed(seed + 7)
    q = _randn(gen, query_len, batch, width).float().to(device)
    k = _randn(gen, key_len, batch, width).float().to(device)
    eye = torch.eye(key_len, width, device=device)[:, None, :].expand(key_len, batch, width)
    args = dict(key_gate=None, value_gate=None, seed=seed)
    out = kernel(q, k, eye.contiguous(), dropout_p=p, value_dropout_p=0.0, **args)
    attn_keep = (out[:, :, :key_len] != 0).permute(1, 0, 2).cpu()
    v = _randn(gen, key_len, batch, width).float().to(device).requires_grad_()
    out = kernel(q, k, v, dropout_p=0.0, value_dropout_p=pv, **args)
    (dv,) = torch.autograd.grad(out.sum(), v)
    return attn_keep, (dv != 0).cpu()


def check_attention(device: torch.device, dtype: torch.dtype, query_len: int, key_len: int,
                    batch: int, width: int, backend: str = "triton", seed: int = 0,
                    dropout_p: float = 0.1, value_dropout_p: float = 0.1) -> Verdict:  # fmt: skip
    """The Triton attention, eval (no dropout) and training (both dropouts, segment form),
    forward and backward, against the formula in float64 (with the kernel's masks)."""
    kernel = kernel_for("attention", backend)
    key_len = min(key_len, width)  # the weight mask is read through identity values
    query_len = min(query_len, key_len)
    memory = key_len - query_len
    gen = torch.Generator().manual_seed(seed)
    base = {
        "q": _randn(gen, query_len, batch, width),
        "k": _randn(gen, key_len, batch, width),
        "v": _randn(gen, key_len, batch, width),
        "key_gate": torch.rand(width, generator=gen, dtype=torch.float64),
        "value_gate": torch.rand(width, generator=gen, dtype=torch.float64),
    }
    grad_out = _randn(gen, query_len, batch, width)
    sizes = f"T={query_len} K={key_len} B={batch} E={width}"

    def loss(out):
        return (out.double() * grad_out.to(device)).sum()

    def eval_run(fn):
        def run(run_dtype):
            leaves = _leaves(base, device, run_dtype)
            out = fn(leaves, run_dtype)
            return {"out": out.detach(), **_grads(loss(out), leaves)}

        return run

    def eval_kernel(leaves, _):
        return kernel(*(leaves[n] for n in ("q", "k", "v")), key_gate=leaves["key_gate"],
                      value_gate=leaves["value_gate"], dropout_p=0.0, value_dropout_p=0.0, seed=0)

    def eval_formula(leaves, _):
        return _attention_formula(*leaves.values())

    verdicts = [_check("attention", backend, dtype, f"eval {sizes}", device,
                       lambda: eval_run(eval_kernel)(dtype), eval_run(eval_formula),
                       torch.float64)]  # fmt: skip
    with _check_mode(device):
        try:
            masks = _attention_masks(kernel, device, query_len, key_len, batch, width,
                                     dropout_p, value_dropout_p, 99 + seed)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - a kernel that raises fails the check
            return _failed("attention", backend, dtype, f"train {sizes}", exc)
    visible = reference.causal_memory_mask(query_len, key_len, "cpu", torch.float32) == 0
    attn_keep, value_keep = masks
    rate = _rate_reason(int((attn_keep & visible).sum()), int(visible.sum()) * batch, dropout_p,
                        "the attention-weight dropout") or _rate_reason(
        int(value_keep.sum()), value_keep.numel(), value_dropout_p, "the value dropout")
    scales = {"attn_scale": attn_keep.double() / (1.0 - dropout_p),
              "value_scale": value_keep.double() / (1.0 - value_dropout_p)}  # fmt: skip
    train = {n: base[n] for n in ("q", "key_gate", "value_gate")}
    train["segment"] = base["k"][memory:]

    def train_run(run_kernel: bool, run_dtype):
        leaves = _leaves(train, device, run_dtype)
        kv = torch.cat([base["k"][:memory].to(device, run_dtype), leaves["segment"]])
        if run_kernel:
            kv = kv.detach()  # the op must not use it: the gradient goes to the segment
            out = kernel(leaves["q"], kv, kv, key_gate=leaves["key_gate"],
                         value_gate=leaves["value_gate"], dropout_p=dropout_p,
                         value_dropout_p=value_dropout_p, seed=99 + seed, detached_keys=memory,
                         segment=leaves["segment"])  # fmt: skip
        else:
            out = _attention_formula(leaves["q"], kv, kv, leaves["key_gate"],
                                     leaves["value_gate"], detached_keys=memory,
                                     **{n: s.to(device) for n, s in scales.items()})  # fmt: skip
        return {"out": out.detach(), **_grads(loss(out), leaves)}

    verdicts.append(_check("attention", backend, dtype,
                           f"train p={dropout_p},{value_dropout_p} {sizes}", device,
                           lambda: train_run(True, dtype), lambda d: train_run(False, d),
                           torch.float64))  # fmt: skip
    verdict = _worst(verdicts)
    if rate is not None and verdict.passed:
        verdict.passed, verdict.error = False, rate
    return verdict


# ----------------------------------------------------------------------------------------------
# Decode attention
# ----------------------------------------------------------------------------------------------


def check_decode(device: torch.device, dtype: torch.dtype, batch: int, key_len: int,
                 width: int, backend: str = "triton", seed: int = 0) -> Verdict:  # fmt: skip
    """The split-key decode attention (one query per stream, both gates) against float64."""
    kernel = kernel_for("decode", backend)
    gen = torch.Generator().manual_seed(seed)
    base = {
        "q": _randn(gen, batch, width),
        "keys": _randn(gen, batch, key_len + 3, width)[:, 2 : 2 + key_len],  # a strided view
        "key_gate": torch.rand(width, generator=gen, dtype=torch.float64),
        "value_gate": _randn(gen, width),
    }

    def run(fn, run_dtype):
        args = [t.to(device=device, dtype=run_dtype) for t in base.values()]
        return {"out": fn(*args)}

    def formula(q, keys, key_gate, value_gate):
        scores = torch.einsum("be,bke->bk", q * key_gate, keys).float() / math.sqrt(width)
        probs = scores.to(torch.promote_types(q.dtype, torch.float32)).softmax(-1).to(q.dtype)
        return torch.einsum("bk,bke->be", probs, keys) * value_gate

    return _check("decode", backend, dtype, f"B={batch} K={key_len} E={width}", device,
                  lambda: run(kernel, dtype), lambda d: run(formula, d), torch.float64)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# A check named by a spec
# ----------------------------------------------------------------------------------------------

CHECKED = (("lstm", "cuda"), ("lstm", "triton"), ("attention", "triton"), ("boom", "triton"),
           ("decode", "triton"))  # fmt: skip


def run(spec: Dict[str, object]) -> Verdict:
    """The check of ``spec``: ``op``, ``backend``, ``device``, ``dtype`` (a name such as
    ``"bfloat16"``), ``shape`` (the input class, e.g. ``{"H": 1024, "B": 16}``) and ``tiny``
    (sizes for Triton's CPU interpreter)."""
    op, backend = str(spec["op"]), str(spec["backend"])
    if (op, backend) not in CHECKED:
        raise ValueError(f"no check for op {op!r} on backend {backend!r}; checked: {CHECKED}")
    device, dtype = torch.device(str(spec["device"])), getattr(torch, str(spec["dtype"]))
    shape, tiny = dict(spec["shape"]), bool(spec.get("tiny"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if op == "lstm":
        hidden = int(shape["H"])
        batches = (3,) if tiny else lstm_batches(device, dtype, hidden, int(shape["B"]), backend)
        steps, inputs = (4, 8) if tiny else (64, 64)
        verdicts = []
        for batch in batches:
            verdicts.append(check_lstm(kernel_for("lstm", backend), device, dtype, hidden,
                                       batch, steps=steps, input_size=inputs, backend=backend))
            if not verdicts[-1].passed:
                break
        return _worst(verdicts)
    width = int(shape["E"])
    if op == "boom":
        return check_boom(device, dtype, 7 if tiny else 256, width, int(shape["F"]), backend)
    if op == "attention":
        sizes = (3, 7, 2) if tiny else (64, 192, 2)
        return check_attention(device, dtype, *sizes, width, backend)
    return check_decode(device, dtype, 2, 9 if tiny else 1000, width, backend)


def input_class(op: str, *tensors: torch.Tensor) -> Tuple[Tuple[str, int], ...]:
    """What a verdict covers besides device and dtype: the LSTM's hidden size and 16-row batch
    bucket (x, w_ih, w_hh); attention's and decode's width E (q, ...); Boom's E and F (x,
    weight, ...)."""
    if op == "lstm":
        x, _, weight_hh = tensors[:3]
        return (("H", int(weight_hh.shape[1])), ("B", batch_bucket(int(x.shape[1]))))
    if op == "boom":
        return (("E", int(tensors[0].shape[-1])), ("F", int(tensors[1].shape[0])))
    return (("E", int(tensors[0].shape[-1])),)
