"""The trainer's settings: the command line, the presets, how a run's configuration is layered
and checked, and the learning-rate schedule.

A run's configuration is a plain dict: the paper's recipe (``BASE_CONFIG``) < a preset
(``PRESETS``) < a resumed checkpoint's settings < the flags given on the command line. Every
flag defaults to None so that an unset flag can be told from a given one.
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

from .. import cli
from .. import data as data_lib
from .._backend import format_backend

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
        help="hyperparameter set: 'default' (small, under two minutes on a CPU), 'enwik8' "
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
    _add_data_and_model_args(p)
    _add_optimisation_args(p)
    _add_run_args(p)
    _add_preset_defaults(p)
    return p


def _add_data_and_model_args(p: argparse.ArgumentParser) -> None:
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


def _add_optimisation_args(p: argparse.ArgumentParser) -> None:
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


def _add_run_args(p: argparse.ArgumentParser) -> None:
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
        help="replace an existing --save file that this run does not --resume, and a model "
        "in the --save-pretrained folder (without it, such a run stops before training)",
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
