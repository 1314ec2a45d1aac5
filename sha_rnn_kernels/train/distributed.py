"""Where this process sits in a data-parallel job, and the state that crosses ranks.

Launched by ``torchrun``, each rank trains on its slice of the batch columns
(DistributedDataParallel); alone, ``Dist()`` is a one-process job and every helper here is a
no-op. The LSTM states and attention memories carried between segments have the batch in dim 1:
checkpoints hold them whole (gathered from every rank) and a resumed run shards them again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .settings import UsageError


@dataclass
class Dist:
    """Where this process sits in a (possibly one-process) data-parallel job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _pick_device(requested: Optional[str], local_rank: int, world_size: int) -> torch.device:
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        message = f"--device {requested!r} is not a device (cpu, cuda, cuda:1 ...)"
        raise UsageError(message) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {requested}: CUDA is not available on this machine")
        if world_size > 1:
            device = torch.device("cuda", local_rank)
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def _setup_distributed(requested_device: Optional[str]) -> tuple[Dist, torch.device]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist(), _pick_device(requested_device, 0, 1)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = _pick_device(requested_device, local_rank, world_size)
    initialized_here = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        initialized_here = True
    return Dist(rank, world_size, local_rank, initialized_here), device


def _any_rank(flag: bool, ddp: Dist, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any (so all ranks stop at the same step)."""
    if not ddp.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


# ----------------------------------------------------------------------------------------------
# State carried across segments


def _detach_state(hidden: Optional[list], mems: Optional[list]) -> tuple:
    if hidden is not None:
        hidden = [tuple(t.detach() for t in state) for state in hidden]
    if mems is not None:
        mems = [None if m is None else m.detach() for m in mems]
    return hidden, mems


def _map_state(hidden: Optional[list], mems: Optional[list], fn: Callable) -> tuple:
    """Apply ``fn`` to every tensor of the LSTM states and memories (batch is dim 1 in all)."""
    if hidden is not None:
        hidden = [tuple(fn(t) for t in state) for state in hidden]
    if mems is not None:
        mems = [None if m is None else fn(m) for m in mems]
    return hidden, mems


def _gather_state(hidden, mems, ddp: Dist) -> tuple:
    """The full-batch (all ranks' columns) LSTM states and memories, on the CPU."""
    hidden, mems = _map_state(hidden, mems, lambda t: t.detach().cpu())
    if not ddp.enabled:
        return hidden, mems
    parts: list = [None] * ddp.world_size
    dist.all_gather_object(parts, (hidden, mems))
    # Every rank resets its state on the same steps, so None-ness agrees across ranks.
    if parts[0][0] is not None:
        hidden = [
            tuple(torch.cat([p[0][i][j] for p in parts], dim=1) for j in range(len(state)))
            for i, state in enumerate(parts[0][0])
        ]
    if parts[0][1] is not None:
        mems = [
            None if m is None else torch.cat([p[1][i] for p in parts], dim=1)
            for i, m in enumerate(parts[0][1])
        ]
    return hidden, mems


def _shard_state(hidden, mems, ddp: Dist, device: torch.device) -> tuple:
    def take(t: torch.Tensor) -> torch.Tensor:
        per_rank = t.shape[1] // ddp.world_size
        return t[:, ddp.rank * per_rank : (ddp.rank + 1) * per_rank].to(device)

    return _map_state(hidden, mems, take)
