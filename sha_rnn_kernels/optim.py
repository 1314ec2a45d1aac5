"""LAMB with a minimum trust ratio, the optimizer of the SHA-RNN paper.

The update for one parameter tensor ``w`` with gradient ``g`` (no bias correction, as in the
LAMB paper's v3 and the SHA-RNN training code):

```
m = beta1 * m + (1 - beta1) * g
v = beta2 * v + (1 - beta2) * g * g
step  = m / (sqrt(v) + eps) + weight_decay * w        # decay joins the step before the trust ratio
trust = clamp(|w|, 0, 10) / |step|                    # 1 when either norm is zero
trust = max(trust, min_trust)
w = w - lr * trust * step
```
Norms are the Frobenius norm of the whole tensor. The trust ratio stays a tensor on the
parameter's device, so a step never waits on the GPU.

How a step runs: all parameters of one (device, dtype) are updated together with PyTorch's
multi-tensor ``torch._foreach_*`` ops (one kernel launch covers up to ~110 tensors and 320 chunks
of 65536 elements). The Adam steps are written into one flat buffer, ordered by tensor size, so
that the per-tensor trust ratio scales every tensor of one size with a single broadcast multiply.
Launches per step for one group, estimated from the operators dispatched (counted on CPU) and
CUDA's multi-tensor chunking: 10 elementwise foreach ops (two per moment, sqrt, +eps, copy, divide,
+decay, the final add) x ~3 launches each (822 chunks of the paper model / 320 per launch), 2
foreach norms x ~4 (with their cleanup kernel), ~12 small kernels on the ``[n_tensors]`` norm
vectors and one broadcast multiply per distinct tensor size (9 in the paper model): about 60
launches per step, against ~22 operators per tensor (~1,900 for the paper model's 85 tensors) in a
per-tensor loop. Memory traffic: ~29 fp32 passes over the parameters (~6.2 GB for 53.8M, ~2 ms
at 3 TB/s on an H100), estimated, against 10 for a two-pass fused kernel (``benchmarks/
roofline.py``): launches, not bytes, were the cost of the per-tensor loop.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Tuple

import torch
from torch import Tensor


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al., 2019) with the SHA-RNN's minimum trust ratio.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (the paper: 2e-3 with a linear warm-up, applied by the caller).
        betas: decay rates of the first and second moment.
        eps: added to ``sqrt(v)``.
        weight_decay: multiple of the weight added to the Adam step before the trust ratio.
        min_trust: lower bound of the trust ratio (the paper: 0.25).

    Works with ``torch.amp.GradScaler`` (``scaler.step(opt)`` skips the step when the scaled
    gradients overflowed; ``scaler.unscale_(opt)`` before clipping).

    Example:
        >>> model = torch.nn.Linear(4, 3)
        >>> opt = Lamb(model.parameters(), lr=2e-3, weight_decay=1.2e-6, min_trust=0.25)
        >>> model(torch.randn(2, 4)).sum().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 2e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        min_trust: float = 0.25,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0; got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must each lie in [0, 1); got {betas}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0; got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0; got {weight_decay}")
        if not min_trust >= 0.0:
            raise ValueError(f"min_trust must be >= 0; got {min_trust}")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, min_trust=min_trust
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
        """One update of every parameter that has a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_device_dtype: dict[tuple, list] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                by_device_dtype.setdefault((p.device, p.dtype), []).append(p)
            for params in by_device_dtype.values():
                _lamb_step_foreach(
                    params,
                    [p.grad for p in params],
                    [self.state[p]["exp_avg"] for p in params],
                    [self.state[p]["exp_avg_sq"] for p in params],
                    group,
                )
        return loss


def _norms(tensors: list[Tensor]) -> Tensor:
    """``[n]`` Frobenius norms, in float32 at least (a bf16/fp16 squared sum overflows easily)."""
    norm_dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    if norm_dtype == tensors[0].dtype:
        norms = torch._foreach_norm(tensors)
    else:
        try:
            norms = torch._foreach_norm(tensors, 2, dtype=norm_dtype)
        except TypeError:  # pragma: no cover - torch without the dtype argument
            norms = [torch.linalg.vector_norm(t, dtype=norm_dtype) for t in tensors]
    return torch.stack(norms)


def _lamb_step_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    group: dict,
) -> None:
    """One LAMB update of tensors that share a device and dtype (see the module docstring)."""
    beta1, beta2 = group["betas"]
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)

    # The Adam steps live in one flat buffer, tensors of equal size next to each other, so that
    # the trust ratios can be applied by one broadcast multiply per size.
    order = sorted(range(len(params)), key=lambda i: params[i].numel())
    params = [params[i] for i in order]
    exp_avgs = [exp_avgs[i] for i in order]
    exp_avg_sqs = [exp_avg_sqs[i] for i in order]
    total = sum(p.numel() for p in params)
    flat = torch.empty(total, dtype=params[0].dtype, device=params[0].device)
    steps, runs, offset = [], [], 0  # runs: [first tensor, count, numel, offset] per size
    for i, p in enumerate(params):
        n = p.numel()
        steps.append(flat[offset : offset + n].view(p.shape))
        if runs and runs[-1][2] == n:
            runs[-1][1] += 1
        else:
            runs.append([i, 1, n, offset])
        offset += n

    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, group["eps"])
    torch._foreach_copy_(steps, exp_avgs)
    torch._foreach_div_(steps, denom)
    del denom
    if group["weight_decay"] != 0.0:
        torch._foreach_add_(steps, params, alpha=group["weight_decay"])

    weight_norm = _norms(params).clamp(0.0, 10.0)
    step_norm = _norms(steps)
    usable = (weight_norm > 0) & (step_norm > 0)
    trust = torch.where(usable, weight_norm / torch.where(usable, step_norm, 1.0), 1.0)
    scale = (trust.clamp(min=group["min_trust"]) * -group["lr"]).to(flat.dtype)
    for first, count, numel, start in runs:
        flat[start : start + count * numel].view(count, numel).mul_(
            scale[first : first + count].unsqueeze(1)
        )
    torch._foreach_add_(params, steps)


@torch.no_grad()
def _lamb_step_reference(
    params: list[Tensor],
    grads: list[Optional[Tensor]],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    group: dict,
) -> None:
    """The same update one tensor at a time (~22 launches per tensor): the specification that
    :class:`Lamb` is tested against. Tensors whose gradient is None are skipped."""
    beta1, beta2 = group["betas"]
    for p, grad, exp_avg, exp_avg_sq in zip(params, grads, exp_avgs, exp_avg_sqs):
        if grad is None:
            continue
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)

        adam_step = exp_avg / exp_avg_sq.sqrt().add_(group["eps"])
        if group["weight_decay"] != 0.0:
            adam_step.add_(p, alpha=group["weight_decay"])

        norm_dtype = torch.promote_types(p.dtype, torch.float32)
        weight_norm = torch.linalg.vector_norm(p, dtype=norm_dtype).clamp(0.0, 10.0)
        step_norm = torch.linalg.vector_norm(adam_step, dtype=norm_dtype)
        usable = (weight_norm > 0) & (step_norm > 0)
        trust = torch.where(
            usable, weight_norm / torch.where(usable, step_norm, 1.0), 1.0
        ).clamp(min=group["min_trust"])
        p.add_(adam_step * (trust * -group["lr"]).to(p.dtype))
