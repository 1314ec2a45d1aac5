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
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Tuple

import torch


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al., 2019) with the SHA-RNN's minimum trust ratio.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (the paper: 2e-3 with a linear warm-up, applied by the caller).
        betas: decay rates of the first and second moment.
        eps: added to ``sqrt(v)``.
        weight_decay: multiple of the weight added to the Adam step before the trust ratio.
        min_trust: lower bound of the trust ratio (the paper: 0.25).

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
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        """One update of every parameter that has a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1

                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)

                adam_step = exp_avg / exp_avg_sq.sqrt().add_(group["eps"])
                if group["weight_decay"] != 0.0:
                    adam_step.add_(p, alpha=group["weight_decay"])

                # Norms in float32 at least: a bf16/fp16 parameter's squared sum overflows easily.
                norm_dtype = torch.promote_types(p.dtype, torch.float32)
                weight_norm = torch.linalg.vector_norm(p, dtype=norm_dtype).clamp(0.0, 10.0)
                step_norm = torch.linalg.vector_norm(adam_step, dtype=norm_dtype)
                usable = (weight_norm > 0) & (step_norm > 0)
                trust = torch.where(
                    usable, weight_norm / torch.where(usable, step_norm, 1.0), 1.0
                ).clamp(min=group["min_trust"])
                p.add_(adam_step * (trust * -group["lr"]).to(p.dtype))
        return loss
