"""Train the SHA-RNN on bytes: ``python -m sha_rnn_kernels.train`` (or ``sha-rnn-train``).

With no arguments it trains a small SHA-RNN on the Python standard library's source (no
download) for about a minute on a 2-core CPU (one CPU thread; ``--threads``) and prints the
validation bpc as it falls.
``--preset enwik8 --data enwik8.zip`` is phase 1 of the paper's recipe as the original code ran it
(E=1024, F=4096, 4 blocks, LAMB with minimum trust 0.25, lr 2e-3 with 800 warm-up steps, batch
16, bptt 1024 with jitter, clip 0.25, weight decay 1.2e-6, seed 5512, 32 epochs); ``--preset
enwik8-phase2 --init-from PHASE1`` its second run (phase 1's weights, a new LAMB and warm-up, lr
1e-3, seed 125, 5 epochs). Every hyperparameter is also a flag; flags
given on the command line override the preset, and on ``--resume`` they override the
checkpoint's own settings.

Checkpoints (``--save``) are written atomically and hold everything a run needs to continue
exactly where it stopped: weights, optimizer, grad scaler, step, data position, every RNG, the
LSTM states and the attention memory. Ctrl-C or SIGTERM finishes the current step, saves, and
exits with status 130; a second Ctrl-C stops at once. ``--resume PATH`` continues the run: on
CPU the resumed losses equal those of an uninterrupted run bit for bit.

A ``--data`` file is read whole (``--max-bytes`` cuts it) and, with the default preset, trained
on for full epochs; the run prints what it read, the split sizes and its length. ``--save`` is
checked before training (its folder is created and a lock file ``PATH.lock`` with the process id
is held while the run may write it, so a second run on the same path stops at once). A run
refuses to replace an existing ``--save`` file that it does not ``--resume`` (exit status 2)
unless ``--overwrite`` is given. When stdout is not a terminal, one plain line is printed per
``--log-interval`` steps instead of a progress bar.

Exit status: 0 done; 2 a bad argument or file (one line on stderr, no traceback); 3 the loss
became NaN or infinite (training stops and the last checkpoint with finite weights is kept);
130 stopped by a signal, after saving.

Launched with ``torchrun --nproc_per_node N -m sha_rnn_kernels.train ...`` it trains with
DistributedDataParallel: each rank takes its slice of the batch columns, and only rank 0 prints
and writes checkpoints.

Example:
    >>> from sha_rnn_kernels.train import run
    >>> result = run(["--max-steps", "20", "--emsize", "64", "--quiet", "--save", ""])
    >>> result.valid_bpc[-1]            # (step, bpc)
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import cli
from . import data as data_lib
from ._backend import backend_for, format_backend
from .checkpoint import numpy_state_from_plain, numpy_state_to_plain
from .optim import Lamb

LN2 = math.log(2.0)
# 2: RNG states as plain data, so that the file loads with weights_only=True.
CHECKPOINT_FORMAT = 2

# The paper's recipe (Merity 2019, enwik8); presets change only what they list.
BASE_CONFIG: dict[str, Any] = {
    "data": None,
    "max_bytes": None,
    "emsize": 1024,
    "nhid": 4096,
    "nlayers": 4,
    "dropout": 0.1,
    "dropouth": 0.1,
    "dropouti": 0.1,
    "max_positions": 5000,
    "backend": None,
    "lr": 2e-3,
    "warmup": 800,
    "beta1": 0.9,
    "beta2": 0.999,
    "eps": 1e-6,
    "min_trust": 0.25,
    "wdecay": 1.2e-6,
    "clip": 0.25,
    "batch_size": 16,
    "eval_batch_size": 16,
    "bptt": 1024,
    "epochs": 32,
    # The original ran its second phase as a separate run (preset enwik8-phase2), not here.
    "final_epochs": 0,
    "final_lr": 1e-3,
    "max_steps": None,
    "eval_interval": 1000,
    "save_interval": 1000,
    "log_interval": 10,
    # smerity/sha-rnn's main.py, as it trains the SHARNN, only detaches the LSTM state and the
    # memory after a step: its resets (a numpy draw > 0.975 each) are commented out. An older
    # version ran them; --reset-prob 0.025 draws them the same way (draw_resets).
    "reset_prob": 0.0,
    "seed": 5512,  # the README's phase-1 command
    "test_batch_size": 8,  # main.py's test_batch_size (its valid batch is min(100, batch))
    "init_from": None,
    "save_pretrained": None,
    # auto: bf16 autocast on CUDA (the fast path), fp32 elsewhere.
    "dtype": "auto",
    "compile": False,
    "save": "checkpoints/sha-rnn-enwik8.pt",
}

PRESETS: dict[str, dict[str, Any]] = {
    # Phase 1 of the README's recipe: 32 epochs at lr 2e-3, seed 5512, warm-up 800.
    "enwik8": {},
    # Phase 2, as the README's second command ran it: a new run from phase 1's weights
    # (--init-from; the original saved no optimizer, so LAMB and the warm-up start afresh),
    # 5 epochs at lr 1e-3 with seed 125.
    "enwik8-phase2": {
        "lr": 1e-3,
        "seed": 125,
        "epochs": 5,
        "save": "checkpoints/sha-rnn-enwik8-phase2.pt",
    },
    # About a minute on a 2-core CPU: 0.9M parameters, 600 steps of 16 x 64 bytes at the
    # paper's learning rate (higher rates stall LAMB near the unigram entropy at this size).
    "default": {
        "max_bytes": 1_000_000,
        "emsize": 128,
        "nhid": 512,
        "max_positions": 320,
        "warmup": 50,
        "bptt": 64,
        "eval_batch_size": 16,
        "epochs": 1,
        "final_epochs": 0,
        "max_steps": 600,
        "eval_interval": 100,
        "save_interval": 0,
        "reset_prob": 0.0,
        "seed": 1111,
        "save": "checkpoints/sha-rnn-default.pt",
    },
}

# Preset settings that apply to the built-in corpus only: a --data file is read whole and
# trained on for full epochs unless --max-bytes / --max-steps say otherwise.
_BUILTIN_CORPUS_ONLY: dict[str, tuple[str, ...]] = {"default": ("max_bytes", "max_steps")}


class UsageError(ValueError):
    """A mistake in the command line or its files: the command prints the message as one line
    and exits with status 2 (no traceback)."""


EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130

# Settings that belong to the machine or to one invocation, not the run: never taken from a
# checkpoint (a resumed run writes its pretrained folder only when asked again).
_MACHINE_KEYS = ("device", "quiet", "threads", "overwrite", "save_pretrained")


def _backend_arg(value: str) -> str:
    """``--backend``: validated, in canonical form (a name, or ``op=name,...``)."""
    try:
        return format_backend(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """The command line. Every option defaults to None: unset options come from the preset or,
    on ``--resume``, from the checkpoint."""
    p = cli.OneLineParser(
        prog="sha-rnn-train",
        description="Train the SHA-RNN byte-level language model (Merity 2019).",
        epilog="Defaults are the 'default' preset's; where the 'enwik8' preset differs it is "
        "given too. Flags override the preset (and, with --resume, the checkpoint's settings). "
        "Exit status: 0 done, 2 bad arguments or files, 3 diverged (loss not finite), 130 "
        "stopped by a signal (after saving).",
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="hyperparameter set: 'default' (small, about a minute on a CPU), 'enwik8' "
        "(phase 1 of the paper's recipe; needs --data) or 'enwik8-phase2' (its second run: "
        "needs --data and --init-from PHASE1); defaults to 'enwik8' when --data names enwik8",
    )
    p.add_argument(
        "--init-from",
        default=None,
        help="start from this checkpoint's (or pretrained folder's) weights only: a new "
        "optimizer, warm-up and step count, as the original's second phase",
    )
    p.add_argument("--resume", default=None, help="continue from this checkpoint")
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default=None,
        help="enwik8 (raw or .zip) or any file; none: the Python stdlib's source",
    )
    g.add_argument("--max-bytes", type=int, default=None, help="read at most this many bytes")
    g = p.add_argument_group("model")
    g.add_argument("--emsize", type=int, default=None, help="model width E")
    g.add_argument("--nhid", type=int, default=None, help="Boom width F")
    g.add_argument("--nlayers", type=int, default=None, help="number of blocks")
    g.add_argument("--dropout", type=float, default=None, help="dropout after the last block")
    g.add_argument("--dropouth", type=float, default=None, help="dropout inside the blocks")
    g.add_argument("--dropouti", type=float, default=None, help="dropout on the embedding")
    g.add_argument(
        "--max-positions",
        type=int,
        default=None,
        help="attention keys at most (memory plus segment)",
    )
    g.add_argument(
        "--backend",
        type=_backend_arg,
        default=None,
        help="kernel backend passed to SHARNN: one of auto, reference, torch, triton, cuda for "
        "every op, or op=backend pairs for the ops lstm, attention, boom (e.g. "
        "'lstm=cuda,attention=triton'; ops left out use auto)",
    )
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate")
    g.add_argument("--warmup", type=int, default=None, help="linear warm-up steps")
    g.add_argument("--beta1", type=float, default=None)
    g.add_argument("--beta2", type=float, default=None)
    g.add_argument("--eps", type=float, default=None)
    g.add_argument("--min-trust", type=float, default=None, help="LAMB's minimum trust ratio")
    g.add_argument("--wdecay", type=float, default=None, help="weight decay")
    g.add_argument("--clip", type=float, default=None, help="gradient norm clip (0: off)")
    g.add_argument("--batch-size", type=int, default=None, help="global batch (all ranks)")
    g.add_argument("--eval-batch-size", type=int, default=None, help="validation batch")
    g.add_argument(
        "--test-batch-size",
        type=int,
        default=None,
        help="batch of the final test (the original protocol's 8)",
    )
    g.add_argument("--bptt", type=int, default=None, help="segment length (jittered)")
    g.add_argument("--epochs", type=int, default=None, help="epochs at --lr")
    g.add_argument(
        "--final-epochs",
        type=int,
        default=None,
        help="further epochs at --final-lr in the same run (the original ran its 5 epochs at "
        "1e-3 as a second run instead: --preset enwik8-phase2)",
    )
    g.add_argument("--final-lr", type=float, default=None)
    g.add_argument(
        "--reset-prob",
        type=float,
        default=None,
        help="probability of dropping the LSTM state and memory after a step",
    )
    g = p.add_argument_group("run")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    g.add_argument(
        "--eval-interval",
        type=int,
        default=None,
        help="validate every N steps (0: only at epoch ends and the end)",
    )
    g.add_argument(
        "--save-interval",
        type=int,
        default=None,
        help="checkpoint every N steps (0: only at epoch ends, the end and Ctrl-C)",
    )
    g.add_argument("--log-interval", type=int, default=None, help="progress update every N steps")
    g.add_argument("--save", default=None, help="checkpoint path ('' disables checkpoints)")
    g.add_argument(
        "--save-pretrained",
        default=None,
        help="at the end also write this folder: config.json + model.safetensors (shareable; "
        "loads with SHARNN.from_pretrained)",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="replace an existing --save file that this run does not --resume (without it, "
        "such a run stops before training)",
    )
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if any)")
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help=cli.threads_help(),
    )
    g.add_argument(
        "--dtype",
        choices=("auto", "fp32", "bf16", "fp16"),
        default=None,
        help="autocast dtype; auto: bf16 on CUDA, fp32 on CPU (fp16 adds a GradScaler)",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch.compile the training forward and backward (the library's kernels stay "
        "whole inside the graph); the first steps and every new segment length compile",
    )
    g.add_argument("--quiet", action="store_true", default=None, help="print nothing")
    _add_preset_defaults(p)
    return p


_DEFAULT_NOTES = {
    "max_bytes": "default preset: {default} of the built-in corpus, all of a --data file; "
    "enwik8: all",
    "max_steps": "default preset: {default} on the built-in corpus, full epochs on a --data "
    "file; enwik8: full epochs",
    "data": None,
    "init_from": None,
    "save_pretrained": None,
    "backend": "$SHA_RNN_KERNELS_BACKEND, else auto",
    "device": None,
    "threads": None,
    "quiet": None,
    "overwrite": None,
}


def _add_preset_defaults(parser: argparse.ArgumentParser) -> None:
    """Append each option's effective default to its help: the 'default' preset's value, and
    the 'enwik8' preset's where that differs. (The options themselves default to None so that
    an unset flag can be told from a given one.)"""
    default = dict(BASE_CONFIG, **PRESETS["default"])
    enwik8 = dict(BASE_CONFIG, **PRESETS["enwik8"])

    def show(value) -> str:
        return "all" if value is None else ("''" if value == "" else str(value))

    for action in parser._actions:
        key = action.dest
        if key in _DEFAULT_NOTES:
            note = _DEFAULT_NOTES[key]
            if note is not None:
                note = note.format(default=show(default.get(key)))
        elif key in default:
            note = f"default: {show(default[key])}"
            if enwik8[key] != default[key]:
                note += f"; enwik8: {show(enwik8[key])}"
        else:
            continue
        if note is not None:
            text = (action.help + " " if action.help else "") + f"({note})"
            action.help = text.replace("%", "%%")


def resolve_config(args: argparse.Namespace, checkpoint_config: Optional[dict] = None) -> dict:
    """Layer the settings: paper recipe < preset < checkpoint (on resume) < explicit flags."""
    given = {k: v for k, v in vars(args).items() if v is not None}
    preset = given.pop("preset", None)
    given.pop("resume", None)
    if preset is None:
        if checkpoint_config is not None:
            preset = checkpoint_config.get("preset", "default")
        else:
            data_path = given.get("data")
            named_enwik8 = data_path is not None and data_lib.is_enwik8(data_path, -1)
            preset = "enwik8" if named_enwik8 else "default"
    config = dict(BASE_CONFIG)
    config.update(PRESETS[preset])
    config["preset"] = preset
    if checkpoint_config is None and given.get("data") is not None:
        for key in _BUILTIN_CORPUS_ONLY.get(preset, ()):
            config[key] = BASE_CONFIG[key]
    if checkpoint_config is not None:
        config.update({k: v for k, v in checkpoint_config.items() if k not in _MACHINE_KEYS})
        for key in ("emsize", "nhid", "nlayers"):
            if key in given and key in checkpoint_config and given[key] != checkpoint_config[key]:
                flag = "--" + key.replace("_", "-")
                raise UsageError(
                    f"{flag} {given[key]} differs from the checkpoint's {checkpoint_config[key]}: "
                    f"a resumed run keeps its model's size; drop {flag} (or start a new run "
                    f"without --resume)"
                )
    config.update(given)
    if checkpoint_config is None:
        _check_preset_inputs(config)
    config.setdefault("device", None)
    config.setdefault("threads", None)
    config["quiet"] = bool(given.get("quiet", False))
    config["overwrite"] = bool(given.get("overwrite", False))
    _validate_config(config)
    return config


def _check_preset_inputs(config: dict) -> None:
    """The enwik8 presets train the paper's 54M-parameter model: they need the corpus (without
    --data they would train it on the built-in 1 MB sample), and phase 2 needs phase 1."""
    preset = config["preset"]
    if preset.startswith("enwik8") and config["data"] is None:
        raise UsageError(
            f"--preset {preset} trains the paper's 54M-parameter model and needs the corpus: "
            f"add --data enwik8.zip (or use --preset default for the small built-in run)"
        )
    if preset == "enwik8-phase2" and not config.get("init_from"):
        raise UsageError(
            "--preset enwik8-phase2 continues phase 1's weights: add --init-from PATH (the "
            "--save file of the --preset enwik8 run, or its pretrained folder)"
        )


def _validate_config(c: dict) -> None:
    positive = (
        "emsize",
        "nhid",
        "nlayers",
        "max_positions",
        "batch_size",
        "eval_batch_size",
        "test_batch_size",
        "bptt",
        "log_interval",
    )
    for key in positive:
        if c[key] < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be >= 1; got {c[key]}")
    for key in ("warmup", "epochs", "final_epochs", "eval_interval", "save_interval"):
        if c[key] < 0:
            raise UsageError(f"--{key.replace('_', '-')} must be >= 0; got {c[key]}")
    if c["threads"] is not None and c["threads"] < 1:
        raise UsageError(f"--threads must be >= 1; got {c['threads']}")
    if c["max_steps"] is not None and c["max_steps"] < 0:
        raise UsageError(f"--max-steps must be >= 0; got {c['max_steps']}")
    if c["epochs"] + c["final_epochs"] < 1:
        raise UsageError("--epochs plus --final-epochs must be at least 1")
    if not 0.0 <= c["reset_prob"] <= 1.0:
        raise UsageError(f"--reset-prob must lie in [0, 1]; got {c['reset_prob']}")
    problem = cli.ranges_error(c, cli.TRAIN_RANGES)
    if problem is not None:
        raise UsageError(problem)
    if c["bptt"] > c["max_positions"]:
        raise UsageError(
            f"--bptt {c['bptt']} exceeds --max-positions {c['max_positions']}: a segment must "
            f"fit in the attention window"
        )


def learning_rate(config: dict, step: int, epoch: int) -> float:
    """The rate for 1-based ``step`` in 0-based ``epoch``: linear warm-up to ``lr``, then
    ``lr`` until ``epochs`` epochs are done, then ``final_lr``."""
    if epoch >= config["epochs"]:
        return config["final_lr"]
    if config["warmup"] > 0:
        return config["lr"] * min(step, config["warmup"]) / config["warmup"]
    return config["lr"]


# ----------------------------------------------------------------------------------------------
# Distributed helpers


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
# Stopping on Ctrl-C / SIGTERM


class StopSignal:
    """The first SIGINT/SIGTERM asks the loop to save and stop after the current step; a second
    SIGINT raises KeyboardInterrupt at once. Handlers are restored on exit."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        name = signal.Signals(signum).name
        print(
            f"\n{name}: finishing this step, saving a checkpoint, then stopping "
            f"(Ctrl-C again to stop without saving)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> StopSignal:
        # Signal handlers can only be installed from the main thread.
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


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


# ----------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: str, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically: a temporary file in the same folder, fsync,
    then ``os.replace``, so a crash never leaves a half-written checkpoint behind."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str, label: str = "--resume") -> dict:
    """Read a checkpoint written by this module with ``weights_only=True`` (nothing in the file
    runs). Raises :class:`UsageError` naming ``label`` for a missing, empty or foreign file, a
    file that would need code to load, or an older checkpoint format (with the way to convert
    it)."""
    from .checkpoint import CONVERT_HINT, CheckpointError, load_tensors

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


# ----------------------------------------------------------------------------------------------
# Training


def _batchify(
    corpus: data_lib.Corpus, split: str, batch_size: int, flag: str, min_rows: int = 2
) -> torch.Tensor:
    """``data.batchify`` of one split, with an error naming the split and the flag to change."""
    tokens = getattr(corpus, split)
    if tokens.numel() // batch_size < min_rows:
        fits = tokens.numel() // min_rows
        raise UsageError(
            f"the {split} split of {corpus.name} holds {tokens.numel():,} bytes, too few for "
            f"{flag} {batch_size} columns of {min_rows}+ bytes: lower {flag}"
            + (f" to at most {fits}" if fits >= 1 else "")
            + " or give more data (--data, --max-bytes)"
        )
    return data_lib.batchify(tokens, batch_size)


class _LossModule(nn.Module):
    """``model.loss`` as ``forward``, so DistributedDataParallel sees (and syncs) it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x, targets, hidden, mems):
        return self.model.loss(x, targets, hidden, mems)


@dataclass
class TrainResult:
    """What :func:`run` did. ``train_losses[i]`` is the loss (nats) of step ``start_step + i + 1``
    on this process's batch columns."""

    config: dict
    start_step: int
    step: int
    epoch: int
    train_losses: list = field(default_factory=list)
    valid_bpc: list = field(default_factory=list)  # (step, bpc)
    test_bpc: Optional[float] = None
    interrupted: bool = False
    # The loss became NaN or infinite: training stopped there and wrote no further checkpoint.
    diverged: bool = False
    checkpoint: Optional[str] = None
    model: Optional[nn.Module] = None


def model_from_config(config: dict, ntoken: int, backend=None) -> nn.Module:
    """The ``SHARNN`` a run's settings describe (a training config or a checkpoint's), with
    ``ntoken`` tokens and ``backend`` (default: the config's)."""
    from . import SHARNN

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


def run(
    argv: Optional[Sequence[str]] = None,
    step_callback: Optional[Callable[[int, float], None]] = None,
) -> TrainResult:
    """Parse ``argv`` (None: ``sys.argv[1:]``) and train. ``step_callback(step, loss)`` is
    called after every step (the loss read back every ``log_interval`` steps, so a callback
    forces a device sync; leave it None for speed)."""
    args = build_parser().parse_args(argv)
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    config = resolve_config(args, None if checkpoint is None else checkpoint["config"])
    ddp, device = _setup_distributed(config["device"])
    threads = cli.set_threads(config["threads"], device)
    try:
        # Before any data is read or model built: a backend that cannot run here.
        problem = cli.backend_error(config["backend"], device)
        if problem is not None:
            raise UsageError(problem)
        # Handed over in a list so that _train can drop the only reference once it has copied
        # the weights and optimizer state in (they are large for the paper's model).
        loaded = [checkpoint] if checkpoint is not None else []
        del checkpoint
        with contextlib.ExitStack() as stack:
            lock, failed = SaveLock(config["save"] if ddp.is_main else None), None
            try:
                stack.enter_context(lock)
                if ddp.is_main:  # under the lock: no other run can write the file meanwhile
                    problem = cli.replacement_error(
                        config["save"], args.resume, config["overwrite"]
                    )
                    if problem is not None:
                        raise UsageError(problem)
            except UsageError as exc:
                failed = exc
            if _any_rank(failed is not None, ddp, device):  # every rank stops, not only rank 0
                raise failed or UsageError(f"--save {config['save']}: rank 0 cannot write it")
            if lock.took_over is not None and ddp.is_main and not config["quiet"]:
                print(f"note: took over the stale lock of pid {lock.took_over} on {config['save']}")
            return _train(config, loaded, ddp, device, args.resume, step_callback)
    finally:
        torch.set_num_threads(threads)
        if ddp.initialized_here:
            dist.destroy_process_group()


def _train(
    config: dict,
    loaded: list,
    ddp: Dist,
    device: torch.device,
    resume_path: Optional[str],
    step_callback: Optional[Callable[[int, float], None]],
) -> TrainResult:
    from tqdm.auto import tqdm


    verbose = ddp.is_main and not config["quiet"]
    dtype_name = resolve_dtype(config["dtype"], device)
    # A progress bar only on a terminal; in a log file, one plain line per log interval.
    interactive = sys.stdout.isatty() and sys.stderr.isatty()

    def say(message: str) -> None:
        if verbose:
            if interactive:
                tqdm.write(message)
            else:
                print(message, flush=True)

    for key in ("batch_size", "eval_batch_size"):
        if config[key] % ddp.world_size != 0:
            raise UsageError(
                f"--{key.replace('_', '-')} {config[key]} must be a multiple of the world size "
                f"{ddp.world_size}"
            )

    seed = config["seed"]
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # the same initial weights on every rank
    # Segment lengths and state resets come from their own generator, identical on all ranks so
    # they step through the data together.
    data_rng = np.random.RandomState(seed)

    try:
        corpus = data_lib.load_corpus(config["data"], config["max_bytes"])
    except (OSError, ValueError) as exc:
        message = str(exc) if str(exc).startswith("--") else f"--data {config['data']}: {exc}"
        raise UsageError(message) from None
    train_src = data_lib.shard_columns(
        _batchify(corpus, "train", config["batch_size"], "--batch-size", 3), ddp.rank,
        ddp.world_size,
    )  # fmt: skip
    valid_src = data_lib.shard_columns(
        _batchify(corpus, "valid", config["eval_batch_size"], "--eval-batch-size"), ddp.rank,
        ddp.world_size,
    )  # fmt: skip
    test_src, test_dist = _test_source(corpus, config["test_batch_size"], ddp)
    if device.type == "cuda":
        train_src, valid_src, test_src = (t.pin_memory() for t in (train_src, valid_src, test_src))

    model = model_from_config(config, corpus.vocab_size).to(device)
    # Byte ids are below the 256-token vocabulary by construction; skip the per-step range check
    # (a device sync) that SHARNN does for arbitrary callers.
    model.check_token_ids = False
    if ddp.rank > 0:
        torch.manual_seed(seed + ddp.rank)  # different dropout masks on each rank
    optimizer = Lamb(
        model.parameters(),
        lr=config["lr"],
        betas=(config["beta1"], config["beta2"]),
        eps=config["eps"],
        weight_decay=config["wdecay"],
        min_trust=config["min_trust"],
    )
    scaler = _grad_scaler(device, enabled=dtype_name == "fp16")

    step, epoch, position = 0, 0, 0
    hidden = mems = None
    history_valid: list = []
    if config.get("init_from") and not loaded:
        _init_weights(model, config["init_from"])
    if loaded:
        checkpoint = loaded.pop()
        try:
            model.load_state_dict(checkpoint["model"])
        except RuntimeError as exc:
            lines = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
            raise UsageError(
                f"--resume {resume_path}: the checkpoint's weights do not fit this model "
                f"({lines[0] if lines else str(exc).splitlines()[0]}); resume with the "
                f"checkpoint's own --emsize/--nhid/--nlayers"
            ) from None
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        step, epoch, position = checkpoint["step"], checkpoint["epoch"], checkpoint["position"]
        history_valid = list(checkpoint.get("valid_bpc", []))
        rng = checkpoint["rng"]
        data_rng.set_state(numpy_state_from_plain(rng["data"]))
        random.setstate(rng["python"])
        np.random.set_state(numpy_state_from_plain(rng["numpy"]))
        if checkpoint["world_size"] == ddp.world_size:
            _set_rng_state(rng["ranks"][ddp.rank], device)
        else:
            torch.manual_seed(seed + ddp.rank + 7919 * step)
        hidden, mems = _shard_state(checkpoint["hidden"], checkpoint["mems"], ddp, device)
        del checkpoint

    wrapped: nn.Module = _LossModule(model)
    if ddp.enabled:
        # Some parameters (lnout, qkvs, r_gate, the LayerNorms of the attention-free blocks) never
        # receive a gradient, as in the original model.
        wrapped = nn.parallel.DistributedDataParallel(
            wrapped,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )
    if config.get("compile"):
        if (
            device.type == "cuda"
            and dtype_name == "bf16"
            and backend_for("lstm", config["backend"]) == "auto"
        ):
            # No first-use check runs while Dynamo traces: run it now, so that the compiled
            # model can use the CUDA LSTM from its first step where the check passes.
            from .check import prepare_lstm

            verdict = prepare_lstm(
                device, torch.bfloat16, hidden=config["emsize"],
                batch=config["batch_size"] // ddp.world_size,
            )  # fmt: skip
            say(f"CUDA LSTM first-use check: {'passed' if verdict.passed else verdict.worst}")
        wrapped = torch.compile(wrapped)
    model.train()

    n_params = sum(p.numel() for p in model.parameters())
    say(corpus.describe())
    say(
        f"SHARNN E={config['emsize']} F={config['nhid']} blocks={config['nlayers']}: "
        f"{n_params / 1e6:.2f}M parameters | preset {config['preset']} | device {device} x"
        f"{ddp.world_size}{_threads_note(device)} | {dtype_name}"
        f"{' compiled' if config.get('compile') else ''} | "
        f"batch {config['batch_size']} x bptt "
        f"{config['bptt']} | lr {config['lr']} warm-up {config['warmup']}"
        + (f" | resumed from {resume_path} at step {step}" if resume_path else "")
    )

    rows = train_src.shape[0]
    total_epochs = config["epochs"] + config["final_epochs"]
    steps_per_epoch = data_lib.expected_steps(rows, config["bptt"])
    max_steps = config["max_steps"]
    # Epochs end where the jittered segments run out of data: their step count is known only
    # approximately, and is shown as such (~N); --max-steps below that is exact.
    exact = max_steps is not None and max_steps < total_epochs * steps_per_epoch
    total = max_steps if exact else total_epochs * steps_per_epoch
    of_total = f"{'' if exact else '~'}{total}"
    save_path = config["save"] or None
    no_save = "none (--save '')"
    say(
        f"length: {'' if exact else 'about '}{total} steps "
        + (
            f"(--max-steps {max_steps}; an epoch is about {steps_per_epoch} steps)"
            if exact
            else f"({total_epochs} epoch{'s' if total_epochs > 1 else ''} of about "
            f"{steps_per_epoch} steps)"
        )
        + f" | checkpoint: {save_path or no_save}"
    )
    continues_resumed = save_path is not None and resume_path is not None and (
        os.path.abspath(save_path) == os.path.abspath(resume_path)
    )
    if save_path is not None and os.path.exists(save_path) and not continues_resumed:
        say(f"note: {save_path} exists; this run replaces it (--overwrite)")
    result = TrainResult(config=config, start_step=step, step=step, epoch=epoch, model=model)
    result.valid_bpc = history_valid

    def checkpoint_now() -> None:
        """Collective on every rank; rank 0 writes."""
        full_hidden, full_mems = _gather_state(hidden, mems, ddp)
        ranks_rng = [None] * ddp.world_size
        if ddp.enabled:
            dist.all_gather_object(ranks_rng, _rng_state(device))
        else:
            ranks_rng = [_rng_state(device)]
        if not ddp.is_main or save_path is None:
            return
        replaced.append(os.path.exists(save_path) and not continues_resumed)
        save_checkpoint(save_path, {
            "format": CHECKPOINT_FORMAT,
            "config": config,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "step": step,
            "epoch": epoch,
            "position": position,
            "hidden": full_hidden,
            "mems": full_mems,
            "world_size": ddp.world_size,
            "rng": {
                "data": numpy_state_to_plain(data_rng.get_state()),
                "python": random.getstate(),
                "numpy": numpy_state_to_plain(np.random.get_state()),
                "ranks": ranks_rng,
            },
            "valid_bpc": result.valid_bpc,
        })  # fmt: skip
        result.checkpoint = save_path

    replaced: list = []  # per checkpoint written: whether it replaced an existing file
    pending: list = []
    checked = [len(result.train_losses)]  # losses up to here were finite

    def weights_finite() -> bool:
        return all(bool(torch.isfinite(p).all()) for p in model.parameters())

    def diverged(before_save: bool = False) -> bool:
        """Read the pending losses back; True when one is NaN or infinite (agreed across
        ranks). Under fp16 a non-finite loss whose step the GradScaler skipped is not one.
        ``before_save`` also checks the weights, so that no checkpoint holds a NaN."""
        flush_losses()
        values = result.train_losses[checked[0] :]
        checked[0] = len(result.train_losses)
        bad = not all(math.isfinite(v) for v in values)
        if bad and scaler.is_enabled():
            bad = not weights_finite()
        if before_save and not bad:
            bad = not weights_finite()
        return _any_rank(bad, ddp, device)

    def flush_losses() -> list:
        if not pending:
            return []
        values = torch.stack(pending).tolist()
        pending.clear()
        result.train_losses.extend(values)
        return values

    def validate(label: str) -> Optional[float]:
        bpc = evaluate(model, valid_src, config["bptt"], device, dtype_name, ddp, stop)
        if bpc is not None:
            result.valid_bpc.append((step, bpc))
            say(
                f"| {label} | step {step} | epoch {epoch + 1} | valid bpc {bpc:.4f} "
                + _protocol_note(config, "valid")
            )
        return bpc

    progress = cli.progress_bar(total, initial=step, enabled=verbose and interactive)
    tokens_since, time_since = 0, time.perf_counter()

    with StopSignal() as signals:

        def stop() -> bool:
            return _any_rank(signals.requested, ddp, device)

        last_eval_step = -1
        while True:
            # Across ranks the flag is agreed on every log_interval steps (an all-reduce);
            # alone, every step.
            if (not ddp.enabled or step % config["log_interval"] == 0) and stop():
                result.interrupted = True
                break
            if max_steps is not None and step >= max_steps:
                break
            if position >= rows - 2:  # end of an epoch, as the original's `i < len - 2`
                if validate(f"end of epoch {epoch + 1}") is None:
                    continue  # stopped during validation: the next check saves
                last_eval_step = step
                epoch, position = epoch + 1, 0
                hidden = mems = None
                if epoch >= total_epochs:
                    break
                if config["save_interval"] and save_path:
                    if diverged(before_save=True):
                        result.diverged = True
                        break
                    checkpoint_now()
                continue

            seq_len = data_lib.sample_seq_len(data_rng, config["bptt"])
            lr = learning_rate(config, step + 1, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = data_lib.get_batch(train_src, position, seq_len, device)
            with _autocast(device, dtype_name):
                loss, hidden, mems = wrapped(x, y, hidden, mems)
            scaler.scale(loss).backward()
            if config["clip"] > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), config["clip"])
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            hidden, mems = _detach_state(hidden, mems)
            reset_hidden, reset_mems = draw_resets(data_rng, config["reset_prob"])
            hidden = None if reset_hidden else hidden
            mems = None if reset_mems else mems
            position += x.shape[0]
            step += 1
            tokens_since += x.numel() * ddp.world_size
            pending.append(loss.detach().float())

            if step_callback is not None:
                step_callback(step, flush_losses()[-1])
            if step % config["log_interval"] == 0:
                values = flush_losses() or result.train_losses[-config["log_interval"] :]
                elapsed = time.perf_counter() - time_since
                mean = sum(values) / len(values)
                progress.set_postfix(
                    loss=f"{mean:.3f}", bpc=f"{mean / LN2:.3f}", lr=f"{lr:.2e}",
                    tok_s=f"{tokens_since / max(elapsed, 1e-9):,.0f}", refresh=False,
                )  # fmt: skip
                if not interactive:
                    say(
                        f"| step {step}/{of_total} | loss {mean:.4f} | bpc {mean / LN2:.4f} | "
                        f"lr {lr:.2e} | {tokens_since / max(elapsed, 1e-9):,.0f} tok/s"
                    )
                tokens_since, time_since = 0, time.perf_counter()
                if diverged():
                    result.diverged = True
                    break
            progress.update(1)

            if config["eval_interval"] and step % config["eval_interval"] == 0:
                if validate("eval") is not None:
                    last_eval_step = step
            if config["save_interval"] and step % config["save_interval"] == 0 and save_path:
                if diverged(before_save=True):
                    result.diverged = True
                    break
                checkpoint_now()

        flush_losses()
        progress.close()
        result.step, result.epoch = step, epoch
        if not result.diverged and diverged(before_save=bool(save_path)):
            result.diverged = True
        if result.diverged:
            finite = [i for i, v in enumerate(result.train_losses) if math.isfinite(v)]
            last_good = result.start_step + (finite[-1] + 1 if finite else 0)
            kept = (
                f"the last checkpoint {save_path} (step {_checkpoint_step(save_path)}) is kept"
                if save_path and os.path.exists(save_path)
                else "no checkpoint was written"
            )
            if ddp.is_main:
                print(
                    f"sha-rnn-train: training diverged: the loss is not finite by step {step} "
                    f"(last finite loss at step {last_good}); {kept}. Lower --lr, raise "
                    f"--warmup, or train in --dtype fp32 (or bf16 rather than fp16).",
                    file=sys.stderr,
                    flush=True,
                )
            progress.close()
            return result
        if not result.interrupted:
            if last_eval_step != step:
                validate("end")
            test_bpc = evaluate(
                model, test_src, config["bptt"], device, dtype_name, test_dist, stop
            )
            if test_bpc is not None:
                result.test_bpc = test_bpc
                say(
                    f"| end | step {step} | test bpc {test_bpc:.4f} "
                    + _protocol_note(config, "test")
                )
                if config.get("save_pretrained") and ddp.is_main:
                    from .pretrained import save_pretrained

                    save_pretrained(model, config["save_pretrained"], training=config)
                    say(f"pretrained folder: {config['save_pretrained']}")
        if save_path:
            checkpoint_now()
            say(
                f"checkpoint: {save_path} (step {step}"
                + ("; replaced the earlier file" if replaced and replaced[0] else "")
                + (
                    "; interrupted, continue with --resume " + save_path
                    if result.interrupted
                    else ""
                )
                + ")"
            )
    return result


def draw_resets(rng: np.random.RandomState, reset_prob: float) -> tuple[bool, bool]:
    """Whether to drop the LSTM state and the memory after a step: two draws, as the original
    (one each, after the jitter's two, from the same generator), each true when the draw
    exceeds ``1 - reset_prob`` (its ``random() > 0.975``). No draw when ``reset_prob`` is 0."""
    if reset_prob <= 0:
        return False, False
    return rng.random_sample() > 1.0 - reset_prob, rng.random_sample() > 1.0 - reset_prob


def _protocol_note(config: dict, split: str) -> str:
    """What a printed bpc was measured with, named as ``evaluate``'s protocols: ``original``
    when the batch is the original code's for that split (valid min(100, batch), test 8)."""
    if split == "valid":
        batch, original = config["eval_batch_size"], min(100, config["batch_size"])
    else:
        batch, original = config["test_batch_size"], 8
    name = "original" if batch == original else "custom"
    return (
        f"(protocol {name}: batch {batch}, bptt {config['bptt']}, memory "
        f"{config['max_positions']})"
    )


def _test_source(corpus, batch: int, ddp: Dist) -> tuple:
    """The test split in ``batch`` columns and the Dist to evaluate it with: sharded across
    ranks when ``batch`` divides among them, else every rank reads all columns (the same
    number on each, no all-reduce), so the original's batch of 8 works on any world size."""
    source = _batchify(corpus, "test", batch, "--test-batch-size")
    if batch % ddp.world_size == 0:
        return data_lib.shard_columns(source, ddp.rank, ddp.world_size), ddp
    return source, Dist()


def _init_weights(model: nn.Module, path: str) -> None:
    """Copy the weights of a checkpoint or pretrained folder into ``model`` (--init-from);
    nothing in the file runs code."""
    from .checkpoint import CheckpointError
    from .evaluate import load_model

    try:
        source, _ = load_model(path, label="--init-from")
    except CheckpointError as exc:
        raise UsageError(str(exc)) from None
    try:
        model.load_state_dict(source.state_dict(), strict=True)
    except RuntimeError as exc:
        raise UsageError(
            f"--init-from {path}: its weights do not fit this model "
            f"({str(exc).splitlines()[-1].strip()}); give the same --emsize/--nhid/--nlayers"
        ) from None


def _threads_note(device: torch.device) -> str:
    if device.type != "cpu":
        return ""
    n = torch.get_num_threads()
    return f", {n} CPU thread{'s' if n > 1 else ''} (--threads)"


def _checkpoint_step(path: str):
    try:
        return load_checkpoint(path)["step"]
    except UsageError:
        return "?"


def _grad_scaler(device: torch.device, enabled: bool):
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)  # pragma: no cover - torch < 2.3


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point: 0 when training finished, 2 for a bad argument or file (one line on
    stderr, no traceback), 3 when the loss diverged, 130 when stopped by a signal (after
    saving)."""
    from ._backend import BackendUnavailableError

    try:
        result = run(argv)
    except (UsageError, BackendUnavailableError) as exc:
        print(f"sha-rnn-train: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if result.diverged:
        return EXIT_DIVERGED
    return EXIT_INTERRUPTED if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
