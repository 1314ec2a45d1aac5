"""The whole SHARNN: one training step (forward, backward, gradient clip 0.25, LAMB step) at
steady state, and the epoch time it implies.

Shape: V=205, E=1024, F=4096, 4 blocks (attention in block 2), bptt T=1024, B=16, the attention
memory at its steady M = 5000 - T = 3976 positions, the LSTM states carried in (random).

Impls (the same initial weights for all, dropouts 0.1 as in the paper):
- ``original``: the paper's recipe: reference attention and Boom, LSTM on ``torch.lstm``
  (cuDNN), fp16 autocast with a GradScaler, LAMB one tensor at a time as the original code
  does. Always fp16, whatever ``--dtypes`` says.
- ``compile``: ``torch.compile`` of ``original``'s ``model.loss``, in each selected dtype (the
  optimizer as ``original``'s).
- ``sha_rnn_kernels``: what ``sha-rnn-train`` runs: ``SHARNN(backend="auto")``, the
  multi-tensor :class:`~sha_rnn_kernels.optim.Lamb`, the trainer's hyperparameters, token-id
  checks off; in each selected dtype. The trainer's default on CUDA is bf16 autocast, which
  ``run.py``'s default ``--dtypes`` includes.
fp16 runs use a GradScaler, bf16 does not; weights are float32 under autocast. Rows carry
``epoch_s = step_ms * steps_per_epoch / 1000`` with ``steps_per_epoch = ceil(90e6 / (B T))``
(5494 at the paper's shape) and ``tokens_per_s``.

:func:`loss_check` trains each measured impl for a few steps from the same weights and data,
with dropout off so the runs are comparable, and compares the losses with float32 ``original``
(TF32 off) within the dtype's tolerance.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from .harness import ENWIK8_TRAIN_TOKENS, Bench, Case, Options, Rotation, autocast, randn
from .layer import backend_for, use_torch_lstm

OP = "epoch"
IMPLS = ("original", "compile", "sha_rnn_kernels")
BASELINES = ("original", "compile")
SIZE_LABEL = "tokens per step (T B)"
RATIOS_ACROSS_DTYPES = True  # original is fp16 only; every dtype is compared with it

PAPER = {"V": 205, "E": 1024, "F": 4096, "L": 4, "T": 1024, "B": 16, "M": 3976}
SMALL = {"V": 205, "E": 64, "F": 256, "L": 4, "T": 32, "B": 2, "M": 96}
DROPOUT = 0.1
CLIP = 0.25


def size(shape: dict) -> float:
    return float(shape["T"] * shape["B"])


def steps_per_epoch(shape: dict) -> int:
    return math.ceil(ENWIK8_TRAIN_TOKENS / (shape["T"] * shape["B"]))


def impl_dtypes(impl: str, dtypes) -> list:
    """``original`` is the baseline every dtype is compared with: always its own fp16."""
    return ["fp16"] if impl == "original" else list(dtypes)


def cases(opts: Options) -> Iterator[Case]:
    shape = dict(SMALL if opts.small else PAPER)
    for impl in IMPLS:
        for dtype in impl_dtypes(impl, opts.dtypes):
            yield Case(
                op=OP, impl=impl, dtype=dtype, pass_="fwd+bwd", shape=shape,
                paper_shape=not opts.small, case="paper",
                build=_builder(impl, dtype, shape, opts), dtype_fixed=impl == "original",
            )  # fmt: skip


def _model(impl: str, shape: dict, device: torch.device, dropout: float):
    from sha_rnn_kernels import SHARNN

    torch.manual_seed(0)  # the same initial weights for every impl
    model = SHARNN(
        shape["V"], shape["E"], shape["F"], shape["L"], dropout=dropout, dropouth=dropout,
        dropouti=dropout, max_positions=shape["M"] + shape["T"], backend=backend_for(impl),
    ).to(device)  # fmt: skip
    model.check_token_ids = False  # as the trainer: no per-step device sync on the token range
    if impl in ("original", "compile"):
        use_torch_lstm(model)
    return model


def _steady_state(model, shape: dict, device: torch.device):
    """Random LSTM states and attention memory of the steady length, in the layout the model
    itself returns (learned from one forward)."""
    T, B, E, M = shape["T"], shape["B"], shape["E"], shape["M"]
    tokens = torch.randint(0, shape["V"], (T, B), device=device)
    with torch.no_grad():
        _, hidden, mems = model(tokens)
    hidden = [tuple(randn(*t.shape, dtype=t.dtype, device=device, scale=0.5) for t in state)
              for state in hidden]  # fmt: skip
    mems = [None if m is None else randn(M, B, E, dtype=m.dtype, device=device) for m in mems]
    return hidden, mems


def _optimizer(impl: str, params: list):
    """LAMB with the trainer's settings; the baselines take one tensor at a time, as the
    original code's LAMB does (~22 kernel launches per tensor instead of ~60 per step)."""
    from sha_rnn_kernels.optim import Lamb, _lamb_step_reference
    from sha_rnn_kernels.train import BASE_CONFIG as C

    class PerTensorLamb(Lamb):
        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                ps = [p for p in group["params"] if p.grad is not None]
                for p in ps:
                    if not self.state[p]:
                        self.state[p].update(exp_avg=torch.zeros_like(p),
                                             exp_avg_sq=torch.zeros_like(p), step=0)  # fmt: skip
                    self.state[p]["step"] += 1
                _lamb_step_reference(
                    ps, [p.grad for p in ps], [self.state[p]["exp_avg"] for p in ps],
                    [self.state[p]["exp_avg_sq"] for p in ps], group,
                )  # fmt: skip

    cls = Lamb if impl == "sha_rnn_kernels" else PerTensorLamb
    return cls(
        params, lr=C["lr"], betas=(C["beta1"], C["beta2"]), eps=C["eps"],
        weight_decay=C["wdecay"], min_trust=C["min_trust"],
    )  # fmt: skip


class TrainStep:
    """One optimizer step of ``model`` in ``dtype`` (GradScaler for fp16), like the trainer's
    ``Trainer.train_step`` (sha_rnn_kernels/train/loop.py)."""

    def __init__(self, impl: str, model, dtype: str, device: torch.device) -> None:
        self.model, self.dtype, self.device = model, dtype, device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = _optimizer(impl, self.params)
        self.scaler = torch.amp.GradScaler(device.type) if dtype == "fp16" else None
        self.loss_fn = torch.compile(model.loss) if impl == "compile" else model.loss

    def __call__(self, x, y, hidden, mems):
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.dtype):
            loss, _, _ = self.loss_fn(x, y, hidden, mems)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, CLIP)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, CLIP)
            self.optimizer.step()
        return loss.detach()


def _recipe(impl: str, dtype: str) -> str:
    lstm = "LSTM on cuDNN (torch.lstm)" if impl != "sha_rnn_kernels" else 'backend="auto"'
    amp = {"fp16": "fp16 autocast + GradScaler", "bf16": "bf16 autocast", "fp32": "fp32"}[dtype]
    compiled = "torch.compile, " if impl == "compile" else ""
    lamb = "multi-tensor LAMB" if impl == "sha_rnn_kernels" else "per-tensor LAMB"
    return f"{compiled}{lstm}, {amp}, {lamb}, clip {CLIP}"


def _builder(impl: str, dtype: str, shape: dict, opts: Options):
    def build() -> Bench:
        device, T, B = opts.device, shape["T"], shape["B"]
        model = _model(impl, shape, device, DROPOUT).train()
        hidden, mems = _steady_state(model, shape, device)
        step = TrainStep(impl, model, dtype, device)

        def batch():
            data = torch.randint(0, shape["V"], (T + 1, B), device=device)
            return data[:-1], data[1:]

        rotation = Rotation([batch() for _ in range(4)])
        last = {}

        def fn():
            last["loss"] = step(*rotation.next(), hidden, mems)

        def after() -> dict:
            loss = float(last["loss"])
            fields = {"loss_after_timing": round(loss, 4)}
            if step.scaler is not None:
                fields["grad_scale_after_timing"] = float(step.scaler.get_scale())
            if not math.isfinite(loss):
                print(f"  WARNING: {impl}/{dtype} loss is {loss} after timing", flush=True)
            return fields

        return Bench(fn=fn, extra={"note": _recipe(impl, dtype)}, after=after)

    return build


def add_epoch_fields(row: dict) -> None:
    """epoch_s, tokens_per_s and steps_per_epoch from the measured step time."""
    shape, step_ms = row["shape"], row["ms_median"]
    steps = steps_per_epoch(shape)
    row["steps_per_epoch"] = steps
    row["epoch_s"] = round(step_ms * steps / 1e3, 1)
    row["tokens_per_s"] = round(shape["T"] * shape["B"] / (step_ms / 1e3), 1)


def loss_check(rows: list, opts: Options) -> dict:
    """Train each (impl, dtype) of ``rows`` for ``opts.loss_steps`` steps with dropout off from
    the same weights and batches; compare with float32 ``original`` (TF32 off). Returns
    ``{(impl, dtype): fields}`` and prints a table."""
    from sha_rnn_kernels.testing import ATOL

    from .harness import DTYPES

    if not rows or opts.loss_steps <= 0:
        return {}
    device, shape = opts.device, rows[0]["shape"]
    torch.manual_seed(1)
    batches = []
    for _ in range(opts.loss_steps):
        data = torch.randint(0, shape["V"], (shape["T"] + 1, shape["B"]), device=device)
        batches.append((data[:-1], data[1:]))

    def run(impl: str, dtype: str) -> list:
        if impl == "compile":
            torch._dynamo.reset()
        model = _model(impl, shape, device, dropout=0.0).train()
        torch.manual_seed(2)
        hidden, mems = _steady_state(model, shape, device)
        step = TrainStep(impl, model, dtype, device)
        losses = [float(step(x, y, hidden, mems)) for x, y in batches]
        del model, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return losses

    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        reference = run("original", "fp32")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32

    results = {}
    print(f"\nloss check: {opts.loss_steps} training steps, dropout off, same weights and data; "
          f"reference = original in fp32 (TF32 off)")  # fmt: skip
    print("  " + "  ".join(f"{loss:.5f}" for loss in reference) + "  reference")
    for row in rows:
        key = (row["impl"], row["dtype"])
        if key in results:
            continue
        losses = run(*key)
        worst = max(abs(a - b) for a, b in zip(losses, reference))
        tolerance = ATOL[DTYPES[row["dtype"]]] * max(1.0, max(abs(r) for r in reference))
        agree = bool(worst <= tolerance)
        results[key] = {
            "loss_check": {
                "steps": opts.loss_steps, "losses": [round(v, 5) for v in losses],
                "reference_losses": [round(v, 5) for v in reference],
                "reference": "original fp32, TF32 off", "max_abs_diff": round(worst, 6),
                "tolerance": round(tolerance, 6), "agree": agree,
            }
        }  # fmt: skip
        verdict = "agree" if agree else "DISAGREE"
        shown = "  ".join(f"{loss:.5f}" for loss in losses)
        print(f"  {shown}  {key[0]}/{key[1]}: max |diff| {worst:.2e} <= {tolerance:.2e}? {verdict}")
    return results
