"""The training run: build the data, model and optimizer, then the step loop, validation and
the end of the run. ``Trainer.loop`` is the loop whole; each step is ``Trainer.train_step``.

A Ctrl-C or SIGTERM (``StopSignal``) finishes the current step, saves and stops; the loss is
read back from the device only every ``--log-interval`` steps, where a NaN or infinite loss
stops the run (``result.diverged``) and no checkpoint with non-finite weights is written.
"""

from __future__ import annotations

import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from .. import cli
from .. import data as data_lib
from .._backend import backend_for
from ..optim import Lamb
from .batches import draw_resets, load_splits
from .checkpointing import (
    CHECKPOINT_FORMAT,
    _checkpoint_step,
    _init_weights,
    load_weights,
    restore_rng,
    rng_states,
    save_checkpoint,
)
from .distributed import Dist, _any_rank, _detach_state, _gather_state, _shard_state
from .model import (
    LN2,
    _autocast,
    _grad_scaler,
    _LossModule,
    evaluate,
    model_from_config,
    resolve_dtype,
)
from .settings import UsageError, learning_rate


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


def fit(
    config: dict,
    loaded: list,
    ddp: Dist,
    device: torch.device,
    resume_path: Optional[str],
    step_callback: Optional[Callable[[int, float], None]],
) -> TrainResult:
    """Train with the resolved ``config`` (``loaded``: the ``--resume`` checkpoint in a list,
    or empty)."""
    trainer = Trainer(config, ddp, device, resume_path, step_callback)
    trainer.build(loaded)
    trainer.announce()
    return trainer.train()


class Trainer:
    """One training run, in the order it happens: ``build`` (data, model, optimizer, resume),
    ``announce``, then ``train`` (the step ``loop``, then ``finish``: final validation, test,
    pretrained folder, last checkpoint). Its attributes are the run's state that a checkpoint
    saves: ``step``, ``epoch``, ``position`` in the training columns, the carried ``hidden``
    LSTM states and attention ``mems``, and ``data_rng``."""

    def __init__(
        self,
        config: dict,
        ddp: Dist,
        device: torch.device,
        resume_path: Optional[str],
        step_callback: Optional[Callable[[int, float], None]],
    ) -> None:
        self.config, self.ddp, self.device = config, ddp, device
        self.resume_path, self.step_callback = resume_path, step_callback
        self.verbose = ddp.is_main and not config["quiet"]
        self.dtype_name = resolve_dtype(config["dtype"], device)
        # A progress bar only on a terminal; in a log file, one plain line per log interval.
        self.interactive = sys.stdout.isatty() and sys.stderr.isatty()
        self.save_path: Optional[str] = config["save"] or None
        self.continues_resumed = (
            self.save_path is not None
            and resume_path is not None
            and os.path.abspath(self.save_path) == os.path.abspath(resume_path)
        )
        self.step, self.epoch, self.position = 0, 0, 0
        self.hidden = self.mems = None
        self.last_eval_step = -1
        self.pending: list = []  # this log interval's losses, still on the device
        self.checked = 0  # train_losses[:checked] were finite
        self.replaced: list = []  # per checkpoint written: whether it replaced an existing file
        self.signals: Optional[StopSignal] = None

    def say(self, message: str) -> None:
        if not self.verbose:
            return
        if self.interactive:
            from tqdm.auto import tqdm

            tqdm.write(message)
        else:
            print(message, flush=True)

    # -- building ---------------------------------------------------------------------------

    def build(self, loaded: list) -> None:
        """Seed, read the data, build the model and its optimizer, then start from
        ``--init-from`` or continue the checkpoint in ``loaded`` (popped, so that its large
        tensors are freed once copied in)."""
        config, ddp = self.config, self.ddp
        for key in ("batch_size", "eval_batch_size"):
            if config[key] % ddp.world_size != 0:
                raise UsageError(
                    f"--{key.replace('_', '-')} {config[key]} must be a multiple of the world "
                    f"size {ddp.world_size}"
                )
        seed = config["seed"]
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # the same initial weights on every rank
        # Segment lengths and state resets come from their own generator, identical on all
        # ranks so they step through the data together.
        self.data_rng = np.random.RandomState(seed)
        self.splits = load_splits(config, ddp, self.device)

        self.model = model_from_config(config, self.splits.corpus.vocab_size).to(self.device)
        # Byte ids are below the 256-token vocabulary by construction; skip the per-step range
        # check (a device sync) that SHARNN does for arbitrary callers.
        self.model.check_token_ids = False
        if ddp.rank > 0:
            torch.manual_seed(seed + ddp.rank)  # different dropout masks on each rank
        self.optimizer = Lamb(
            self.model.parameters(),
            lr=config["lr"],
            betas=(config["beta1"], config["beta2"]),
            eps=config["eps"],
            weight_decay=config["wdecay"],
            min_trust=config["min_trust"],
        )
        self.scaler = _grad_scaler(self.device, enabled=self.dtype_name == "fp16")
        valid_history: list = []
        if config.get("init_from") and not loaded:
            _init_weights(self.model, config["init_from"])
        if loaded:
            valid_history = self.restore(loaded.pop())
        self.wrapped = self.wrap()
        self.model.train()
        self.result = TrainResult(
            config=config, start_step=self.step, step=self.step, epoch=self.epoch,
            model=self.model,
        )  # fmt: skip
        self.result.valid_bpc = valid_history
        self.plan()

    def restore(self, checkpoint: dict) -> list:
        """Continue where ``checkpoint`` stopped; returns its validation history."""
        load_weights(self.model, checkpoint["model"], self.resume_path)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.step, self.epoch = checkpoint["step"], checkpoint["epoch"]
        self.position = checkpoint["position"]
        restore_rng(checkpoint, self.data_rng, self.ddp, self.device, self.config["seed"])
        self.hidden, self.mems = _shard_state(
            checkpoint["hidden"], checkpoint["mems"], self.ddp, self.device
        )
        return list(checkpoint.get("valid_bpc", []))

    def wrap(self) -> nn.Module:
        """The loss as a module: under DistributedDataParallel on several ranks, compiled with
        ``--compile``."""
        config, device = self.config, self.device
        wrapped: nn.Module = _LossModule(self.model)
        if self.ddp.enabled:
            # Some parameters (lnout, qkvs, r_gate, the LayerNorms of the attention-free blocks)
            # never receive a gradient, as in the original model.
            wrapped = nn.parallel.DistributedDataParallel(
                wrapped,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        if not config.get("compile"):
            return wrapped
        if (
            device.type == "cuda"
            and self.dtype_name == "bf16"
            and backend_for("lstm", config["backend"]) == "auto"
        ):
            # No first-use check runs while Dynamo traces: run it now, so that the compiled
            # model can use the CUDA LSTM from its first step where the check passes.
            from ..check import prepare_lstm

            verdict = prepare_lstm(
                device, torch.bfloat16, hidden=config["emsize"],
                batch=config["batch_size"] // self.ddp.world_size,
            )  # fmt: skip
            self.say(f"CUDA LSTM first-use check: {'passed' if verdict.passed else verdict.worst}")
        return torch.compile(wrapped)

    def plan(self) -> None:
        """The run's length: ``total`` steps, shown as ``of_total``."""
        config = self.config
        self.rows = self.splits.train.shape[0]
        self.total_epochs = config["epochs"] + config["final_epochs"]
        self.steps_per_epoch = data_lib.expected_steps(self.rows, config["bptt"])
        max_steps = config["max_steps"]
        # Epochs end where the jittered segments run out of data: their step count is known only
        # approximately, and is shown as such (~N); --max-steps below that is exact.
        self.exact = max_steps is not None and max_steps < self.total_epochs * self.steps_per_epoch
        self.total = max_steps if self.exact else self.total_epochs * self.steps_per_epoch
        self.of_total = f"{'' if self.exact else '~'}{self.total}"

    def announce(self) -> None:
        """Print what is trained, on what, for how long, and where it is saved."""
        config, step = self.config, self.step
        n_params = sum(p.numel() for p in self.model.parameters())
        self.say(self.splits.corpus.describe())
        self.say(
            f"SHARNN E={config['emsize']} F={config['nhid']} blocks={config['nlayers']}: "
            f"{n_params / 1e6:.2f}M parameters | preset {config['preset']} | device "
            f"{self.device} x{self.ddp.world_size}{_threads_note(self.device)} | "
            f"{self.dtype_name}{' compiled' if config.get('compile') else ''} | "
            f"batch {config['batch_size']} x bptt "
            f"{config['bptt']} | lr {config['lr']} warm-up {config['warmup']}"
            + (f" | resumed from {self.resume_path} at step {step}" if self.resume_path else "")
        )
        epochs, per_epoch, max_steps = self.total_epochs, self.steps_per_epoch, config["max_steps"]
        no_save = "none (--save '')"
        self.say(
            f"length: {'' if self.exact else 'about '}{self.total} steps "
            + (
                f"(--max-steps {max_steps}; an epoch is about {per_epoch} steps)"
                if self.exact
                else f"({epochs} epoch{'s' if epochs > 1 else ''} of about {per_epoch} steps)"
            )
            + f" | checkpoint: {self.save_path or no_save}"
        )
        if self.save_path is not None and os.path.exists(self.save_path):
            if not self.continues_resumed:
                self.say(f"note: {self.save_path} exists; this run replaces it (--overwrite)")

    # -- the loop ---------------------------------------------------------------------------

    def train(self) -> TrainResult:
        """The step loop and the end of the run, under the progress bar and ``StopSignal``."""
        self.progress = cli.progress_bar(
            self.total, initial=self.step, enabled=self.verbose and self.interactive
        )
        self.tokens_since, self.time_since = 0, time.perf_counter()
        with StopSignal() as self.signals:
            self.loop()
            self.finish()
        return self.result

    def loop(self) -> None:
        """Train until the steps or the epochs run out, a signal asks to stop, or the loss
        diverges (then ``result.interrupted`` / ``result.diverged`` say so)."""
        config, result = self.config, self.result
        max_steps = config["max_steps"]
        while True:
            # Across ranks the flag is agreed on every log_interval steps (an all-reduce);
            # alone, every step.
            if (not self.ddp.enabled or self.step % config["log_interval"] == 0) and self.stop():
                result.interrupted = True
                return
            if max_steps is not None and self.step >= max_steps:
                return
            if self.position >= self.rows - 2:  # end of an epoch, as the original's `i < len - 2`
                if self.validate(f"end of epoch {self.epoch + 1}") is None:
                    continue  # stopped during validation: the next check saves
                self.last_eval_step = self.step
                self.epoch, self.position = self.epoch + 1, 0
                self.hidden = self.mems = None
                if self.epoch >= self.total_epochs:
                    return
                if config["save_interval"] and self.save_path and not self.save_if_finite():
                    return
                continue

            lr = self.train_step()
            if self.step_callback is not None:
                self.step_callback(self.step, self.flush_losses()[-1])
            if self.step % config["log_interval"] == 0:
                self.log(lr)
                if self.diverged():
                    result.diverged = True
                    return
            self.progress.update(1)

            if config["eval_interval"] and self.step % config["eval_interval"] == 0:
                if self.validate("eval") is not None:
                    self.last_eval_step = self.step
            if config["save_interval"] and self.step % config["save_interval"] == 0:
                if self.save_path and not self.save_if_finite():
                    return

    def train_step(self) -> float:
        """One optimizer step on the next jittered segment; returns its learning rate."""
        config = self.config
        seq_len = data_lib.sample_seq_len(self.data_rng, config["bptt"])
        lr = learning_rate(config, self.step + 1, self.epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = data_lib.get_batch(self.splits.train, self.position, seq_len, self.device)
        with _autocast(self.device, self.dtype_name):
            loss, hidden, mems = self.wrapped(x, y, self.hidden, self.mems)
        self.scaler.scale(loss).backward()
        if config["clip"] > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), config["clip"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        hidden, mems = _detach_state(hidden, mems)
        reset_hidden, reset_mems = draw_resets(self.data_rng, config["reset_prob"])
        self.hidden = None if reset_hidden else hidden
        self.mems = None if reset_mems else mems
        self.position += x.shape[0]
        self.step += 1
        self.tokens_since += x.numel() * self.ddp.world_size
        self.pending.append(loss.detach().float())
        return lr

    def log(self, lr: float) -> None:
        """The mean loss and the speed of the last log interval: on the bar, or as a line."""
        interval = self.config["log_interval"]
        values = self.flush_losses() or self.result.train_losses[-interval:]
        elapsed = time.perf_counter() - self.time_since
        mean = sum(values) / len(values)
        tok_s = self.tokens_since / max(elapsed, 1e-9)
        self.progress.set_postfix(
            loss=f"{mean:.3f}", bpc=f"{mean / LN2:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}",
            refresh=False,
        )  # fmt: skip
        if not self.interactive:
            self.say(
                f"| step {self.step}/{self.of_total} | loss {mean:.4f} | bpc {mean / LN2:.4f} | "
                f"lr {lr:.2e} | {tok_s:,.0f} tok/s"
            )
        self.tokens_since, self.time_since = 0, time.perf_counter()

    def stop(self) -> bool:
        """A signal asked to stop, on any rank."""
        return _any_rank(self.signals.requested, self.ddp, self.device)

    def validate(self, label: str) -> Optional[float]:
        config = self.config
        bpc = evaluate(
            self.model, self.splits.valid, config["bptt"], self.device, self.dtype_name, self.ddp,
            self.stop,
        )  # fmt: skip
        if bpc is not None:
            self.result.valid_bpc.append((self.step, bpc))
            self.say(
                f"| {label} | step {self.step} | epoch {self.epoch + 1} | valid bpc {bpc:.4f} "
                + _protocol_note(config, "valid")
            )
        return bpc

    # -- losses, divergence and checkpoints ---------------------------------------------------

    def flush_losses(self) -> list:
        """Read the pending losses back (a device sync) into ``result.train_losses``."""
        if not self.pending:
            return []
        values = torch.stack(self.pending).tolist()
        self.pending.clear()
        self.result.train_losses.extend(values)
        return values

    def weights_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.model.parameters())

    def diverged(self, before_save: bool = False) -> bool:
        """Read the pending losses back; True when one is NaN or infinite (agreed across
        ranks). Under fp16 a non-finite loss whose step the GradScaler skipped is not one.
        ``before_save`` also checks the weights, so that no checkpoint holds a NaN."""
        self.flush_losses()
        values = self.result.train_losses[self.checked :]
        self.checked = len(self.result.train_losses)
        bad = not all(math.isfinite(v) for v in values)
        if bad and self.scaler.is_enabled():
            bad = not self.weights_finite()
        if before_save and not bad:
            bad = not self.weights_finite()
        return _any_rank(bad, self.ddp, self.device)

    def save_if_finite(self) -> bool:
        """Save a checkpoint unless the run diverged (then mark it and return False)."""
        if self.diverged(before_save=True):
            self.result.diverged = True
            return False
        self.save()
        return True

    def save(self) -> None:
        """Write the checkpoint. Collective on every rank (the carried state and the RNGs are
        gathered); rank 0 writes."""
        full_hidden, full_mems = _gather_state(self.hidden, self.mems, self.ddp)
        rng = rng_states(self.data_rng, self.ddp, self.device)
        if not self.ddp.is_main or self.save_path is None:
            return
        self.replaced.append(os.path.exists(self.save_path) and not self.continues_resumed)
        save_checkpoint(self.save_path, {
            "format": CHECKPOINT_FORMAT,
            "config": self.config,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "hidden": full_hidden,
            "mems": full_mems,
            "world_size": self.ddp.world_size,
            "rng": rng,
            "valid_bpc": self.result.valid_bpc,
        })  # fmt: skip
        self.result.checkpoint = self.save_path

    # -- the end ----------------------------------------------------------------------------

    def finish(self) -> None:
        """After the loop: report a divergence, or validate and test a run that was not
        stopped (and write its pretrained folder); then the last checkpoint."""
        result, step = self.result, self.step
        self.flush_losses()
        self.progress.close()
        result.step, result.epoch = step, self.epoch
        if not result.diverged and self.diverged(before_save=bool(self.save_path)):
            result.diverged = True
        if result.diverged:
            self.report_divergence()
            return
        if not result.interrupted:
            if self.last_eval_step != step:
                self.validate("end")
            self.test()
        if self.save_path:
            self.save()
            self.say(
                f"checkpoint: {self.save_path} (step {step}"
                + ("; replaced the earlier file" if self.replaced and self.replaced[0] else "")
                + (
                    "; interrupted, continue with --resume " + self.save_path
                    if result.interrupted
                    else ""
                )
                + ")"
            )

    def test(self) -> None:
        """The test split's bpc, then (if asked) the pretrained folder."""
        config = self.config
        test_bpc = evaluate(
            self.model, self.splits.test, config["bptt"], self.device, self.dtype_name,
            self.splits.test_dist, self.stop,
        )  # fmt: skip
        if test_bpc is None:
            return
        self.result.test_bpc = test_bpc
        self.say(
            f"| end | step {self.step} | test bpc {test_bpc:.4f} " + _protocol_note(config, "test")
        )
        if config.get("save_pretrained") and self.ddp.is_main:
            from ..pretrained import save_pretrained

            save_pretrained(self.model, config["save_pretrained"], training=config)
            self.say(f"pretrained folder: {config['save_pretrained']}")

    def report_divergence(self) -> None:
        finite = [i for i, v in enumerate(self.result.train_losses) if math.isfinite(v)]
        last_good = self.result.start_step + (finite[-1] + 1 if finite else 0)
        save_path = self.save_path
        kept = (
            f"the last checkpoint {save_path} (step {_checkpoint_step(save_path)}) is kept"
            if save_path and os.path.exists(save_path)
            else "no checkpoint was written"
        )
        if self.ddp.is_main:
            print(
                f"sha-rnn-train: training diverged: the loss is not finite by step {self.step} "
                f"(last finite loss at step {last_good}); {kept}. Lower --lr, raise "
                f"--warmup, or train in --dtype fp32 (or bf16 rather than fp16).",
                file=sys.stderr,
                flush=True,
            )


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


def _threads_note(device: torch.device) -> str:
    if device.type != "cpu":
        return ""
    n = torch.get_num_threads()
    return f", {n} CPU thread{'s' if n > 1 else ''} (--threads)"
