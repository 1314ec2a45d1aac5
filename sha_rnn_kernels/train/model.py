"""The model a run trains, the precision it trains in, and validation.

``model_from_config`` builds the ``SHARNN`` a run's settings describe (also for ``evaluate``,
``generate`` and ``export`` reading a checkpoint); ``evaluate`` measures bits per byte over a
whole split with the state and memory carried along, as the original did.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from .. import data as data_lib
from .distributed import Dist

LN2 = math.log(2.0)


class _LossModule(nn.Module):
    """``model.loss`` as ``forward``, so DistributedDataParallel sees (and syncs) it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x, targets, hidden, mems):
        return self.model.loss(x, targets, hidden, mems)


def model_from_config(config: dict, ntoken: int, backend=None) -> nn.Module:
    """The ``SHARNN`` a run's settings describe (a training config or a checkpoint's), with
    ``ntoken`` tokens and ``backend`` (default: the config's)."""
    from ..modules import SHARNN

    return SHARNN(
        ntoken,
        ninp=config["emsize"],
        nhid=config["nhid"],
        nlayers=config["nlayers"],
        dropout=config["dropout"],
        dropouth=config["dropouth"],
        dropouti=config["dropouti"],
        max_positions=config["max_positions"],
        backend=backend if backend is not None else config.get("backend"),
    )


def resolve_dtype(dtype_name: str, device: torch.device) -> str:
    """``auto`` is bf16 autocast on CUDA and fp32 elsewhere; other names pass through."""
    if dtype_name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return dtype_name


def _autocast(device: torch.device, dtype_name: str):
    if dtype_name == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    source: torch.Tensor,
    bptt: int,
    device: torch.device,
    dtype_name: str,
    ddp: Dist,
    stop: Optional[Callable[[], bool]] = None,
) -> Optional[float]:
    """Bits per byte of the whole ``source [rows, B]`` (this rank's columns; summed over ranks),
    reading it in ``bptt`` segments with the state and memory carried along. Returns None when
    ``stop()`` says so part way. The RNG is left exactly as it was."""
    was_training = model.training
    model.eval()
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_tokens = 0
    hidden = mems = None
    forked = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=forked):
            for start in range(0, source.shape[0] - 1, bptt):
                if stop is not None and stop():
                    return None
                x, y = data_lib.get_batch(source, start, bptt, device)
                with _autocast(device, dtype_name):
                    loss, hidden, mems = model.loss(x, y, hidden, mems)
                total_nats += loss.double() * y.numel()
                total_tokens += y.numel()
    finally:
        model.train(was_training)
    totals = torch.stack([total_nats, torch.tensor(float(total_tokens), device=device).double()])
    if ddp.enabled:
        dist.all_reduce(totals)
    return float(totals[0] / totals[1]) / LN2


def _grad_scaler(device: torch.device, enabled: bool):
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)  # pragma: no cover - torch < 2.3
