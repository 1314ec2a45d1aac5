"""The trainer's checkpoints: writing them atomically, reading them safely, the lock that keeps
two runs off one ``--save`` path, every RNG a run draws from, and ``--init-from``.

A checkpoint (format ``CHECKPOINT_FORMAT``) holds everything a run needs to continue exactly
where it stopped: weights, optimizer, grad scaler, step, epoch, data position, every RNG as
plain data (so it loads with ``weights_only=True``), the LSTM states and attention memories of
the whole batch, and the validation history. ``sha_rnn_kernels/checkpoint.py`` does the safe
loading itself; this module knows what a training checkpoint holds.
"""

from __future__ import annotations

import contextlib
import os
import random
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import (  # noqa: F401 - CHECKPOINT_FORMAT and save_checkpoint re-exported
    CHECKPOINT_FORMAT,
    numpy_state_from_plain,
    numpy_state_to_plain,
    save_checkpoint,
)
from .distributed import Dist
from .settings import UsageError

# 2: RNG states as plain data, so that the file loads with weights_only=True.


def load_checkpoint(path: str, label: str = "--resume") -> dict:
    """Read a checkpoint written by this module with ``weights_only=True`` (nothing in the file
    runs). Raises :class:`UsageError` naming ``label`` for a missing, empty or foreign file, a
    file that would need code to load, or an older checkpoint format (with the way to convert
    it)."""
    from ..checkpoint import CONVERT_HINT, CheckpointError, load_tensors

    try:
        payload = load_tensors(path, label, "a sha_rnn_kernels training checkpoint")
    except CheckpointError as exc:
        raise UsageError(str(exc)) from None
    if not isinstance(payload, dict) or "format" not in payload:
        raise UsageError(
            f"{label} {path}: not a sha_rnn_kernels training checkpoint; give a file that "
            f"--save wrote"
        )
    if payload["format"] != CHECKPOINT_FORMAT:
        raise UsageError(
            f"{label} {path}: checkpoint format {payload['format']}, this version reads "
            f"{CHECKPOINT_FORMAT}; convert a file you trust with `{CONVERT_HINT}`"
        )
    return payload


class SaveLock:
    """Hold ``PATH.lock`` (holding this process's id) while a run may write checkpoint ``PATH``.

    Taking it also proves early that ``--save`` is writable: the folder is created and the lock
    file written there before any training. A second run on the same path fails with a
    :class:`UsageError` naming the first one's pid; a lock left by a process that no longer
    exists is taken over. ``path`` None or '' does nothing.
    """

    def __init__(self, path: Optional[str]) -> None:
        self.path = path or None
        self.lock_path = None if self.path is None else self.path + ".lock"
        self.took_over: Optional[int] = None
        self._held = False

    def __enter__(self) -> SaveLock:
        if self.path is None:
            return self
        path, lock = self.path, self.lock_path
        hint = "choose another --save, or --save '' to keep no checkpoint"
        if os.path.isdir(path):
            raise UsageError(f"--save {path}: is a folder; give a file path ({hint})")
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            for _ in range(2):
                try:
                    fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                    break
                except FileExistsError:
                    pid = self._holder()
                    if pid is not None and _process_alive(pid):
                        raise UsageError(
                            f"--save {path}: another run (pid {pid}) is writing this checkpoint "
                            f"(lock file {lock}); wait for it to finish, or {hint}"
                        ) from None
                    self.took_over = pid
                    os.remove(lock)
            else:  # pragma: no cover - lost a race twice
                raise UsageError(f"--save {path}: could not take the lock file {lock}")
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            self._held = True
            if os.path.exists(path) and not os.access(path, os.W_OK):
                raise PermissionError(f"{path} is read-only")
        except OSError as exc:
            self.__exit__()
            raise UsageError(
                f"--save {path}: cannot write there ({type(exc).__name__}: "
                f"{exc.strerror or exc}); {hint}"
            ) from None
        return self

    def _holder(self) -> Optional[int]:
        try:
            with open(self.lock_path) as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def __exit__(self, *exc) -> None:
        if self._held:
            self._held = False
            with contextlib.suppress(OSError):
                os.remove(self.lock_path)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _rng_state(device: torch.device) -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def rng_states(data_rng: np.random.RandomState, ddp: Dist, device: torch.device) -> dict:
    """Every generator the run draws from, as plain data; each rank's torch (and CUDA) state
    is gathered, so this is collective on every rank."""
    ranks: list = [None] * ddp.world_size
    if ddp.enabled:
        dist.all_gather_object(ranks, _rng_state(device))
    else:
        ranks = [_rng_state(device)]
    return {
        "data": numpy_state_to_plain(data_rng.get_state()),
        "python": random.getstate(),
        "numpy": numpy_state_to_plain(np.random.get_state()),
        "ranks": ranks,
    }


def restore_rng(
    checkpoint: dict, data_rng: np.random.RandomState, ddp: Dist, device: torch.device, seed: int
) -> None:
    """Put every generator back as ``checkpoint`` saved it. On another world size the ranks'
    torch states do not map one to one: each rank reseeds from the seed, its rank and the step
    (dropout masks differ from the uninterrupted run's, the data order does not)."""
    rng = checkpoint["rng"]
    data_rng.set_state(numpy_state_from_plain(rng["data"]))
    random.setstate(rng["python"])
    np.random.set_state(numpy_state_from_plain(rng["numpy"]))
    if checkpoint["world_size"] == ddp.world_size:
        _set_rng_state(rng["ranks"][ddp.rank], device)
    else:
        torch.manual_seed(seed + ddp.rank + 7919 * checkpoint["step"])


def load_weights(model: nn.Module, state: dict, resume_path: Optional[str]) -> None:
    """``model.load_state_dict(state)`` with a :class:`UsageError` naming ``--resume`` and the
    first mismatched size when the checkpoint's model has another shape."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        raise UsageError(
            f"--resume {resume_path}: the checkpoint's weights do not fit this model "
            f"({lines[0] if lines else str(exc).splitlines()[0]}); resume with the "
            f"checkpoint's own --emsize/--nhid/--nlayers"
        ) from None


def _init_weights(model: nn.Module, path: str) -> None:
    """Copy the weights of a checkpoint or pretrained folder into ``model`` (--init-from);
    nothing in the file runs code."""
    from ..checkpoint import CheckpointError
    from ..pretrained import from_pretrained, is_pretrained

    label = "--init-from"
    if is_pretrained(path):
        try:
            state = from_pretrained(type(model), path, label=label)[0].state_dict()
        except CheckpointError as exc:
            raise UsageError(str(exc)) from None
    else:
        payload = load_checkpoint(path, label)
        if "model" not in payload:
            raise UsageError(f"{label} {path}: not a training checkpoint of sha_rnn_kernels")
        state = payload["model"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UsageError(
            f"--init-from {path}: its weights do not fit this model "
            f"({str(exc).splitlines()[-1].strip()}); give the same --emsize/--nhid/--nlayers"
        ) from None


def _checkpoint_step(path: str):
    try:
        return load_checkpoint(path)["step"]
    except UsageError:
        return "?"
