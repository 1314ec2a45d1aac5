"""The command: parse the arguments, resume or start, hold the ``--save`` lock, train, and turn
the outcome into an exit status (``main``)."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from .. import cli, pretrained
from .checkpointing import SaveLock, load_checkpoint
from .distributed import _any_rank, _setup_distributed
from .loop import TrainResult, fit
from .settings import (
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    UsageError,
    build_parser,
    resolve_config,
)


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
        # Handed over in a list so that fit can drop the only reference once it has copied
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
                    ) or pretrained.replacement_error(
                        config["save_pretrained"], config["overwrite"]
                    )
                    if problem is not None:
                        raise UsageError(problem)
            except UsageError as exc:
                failed = exc
            if _any_rank(failed is not None, ddp, device):  # every rank stops, not only rank 0
                raise failed or UsageError(f"--save {config['save']}: rank 0 cannot write it")
            if lock.took_over is not None and ddp.is_main and not config["quiet"]:
                print(f"note: took over the stale lock of pid {lock.took_over} on {config['save']}")
            return fit(config, loaded, ddp, device, args.resume, step_callback)
    finally:
        torch.set_num_threads(threads)
        if ddp.initialized_here:
            dist.destroy_process_group()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point: 0 when training finished, 2 for a bad argument or file (one line on
    stderr, no traceback), 3 when the loss diverged, 130 when stopped by a signal (after
    saving)."""
    from .._backend import BackendUnavailableError

    try:
        result = run(argv)
    except (UsageError, BackendUnavailableError) as exc:
        print(f"sha-rnn-train: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if result.diverged:
        return EXIT_DIVERGED
    return EXIT_INTERRUPTED if result.interrupted else 0
