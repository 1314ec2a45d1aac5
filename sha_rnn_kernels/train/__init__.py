"""Train the SHA-RNN on bytes: ``python -m sha_rnn_kernels.train`` (or ``sha-rnn-train``).

With no arguments it trains a small SHA-RNN on the Python standard library's source (no
download) in under two minutes on a 2-core CPU (one CPU thread; ``--threads``) and prints the
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

The trainer's parts, each read top to bottom: ``settings`` (the command line, presets, the
configuration and the learning-rate schedule), ``batches`` (the corpus and its splits),
``distributed`` (ranks and the state that crosses them), ``model`` (the model, its precision,
validation), ``checkpointing`` (save, resume, RNG, the save lock), ``loop`` (the run: build, the
step loop, the end) and ``command`` (``run`` and ``main``).

Example:
    >>> from sha_rnn_kernels.train import run
    >>> result = run(["--max-steps", "20", "--emsize", "64", "--quiet", "--save", ""])
    >>> result.valid_bpc[-1]            # (step, bpc)
"""

# What code and tests use as ``train.X`` (``_test_source`` by tests/test_recipe.py).
from .batches import _test_source as _test_source
from .batches import draw_resets
from .checkpointing import CHECKPOINT_FORMAT, SaveLock, load_checkpoint, save_checkpoint
from .command import main, run
from .distributed import Dist
from .loop import StopSignal, Trainer, TrainResult, fit
from .model import evaluate, model_from_config, resolve_dtype
from .settings import (
    BASE_CONFIG,
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    PRESETS,
    UsageError,
    build_parser,
    learning_rate,
    resolve_config,
)

__all__ = [
    "BASE_CONFIG",
    "CHECKPOINT_FORMAT",
    "EXIT_DIVERGED",
    "EXIT_INTERRUPTED",
    "EXIT_USAGE",
    "PRESETS",
    "Dist",
    "SaveLock",
    "StopSignal",
    "TrainResult",
    "Trainer",
    "UsageError",
    "build_parser",
    "draw_resets",
    "evaluate",
    "fit",
    "learning_rate",
    "load_checkpoint",
    "main",
    "model_from_config",
    "resolve_config",
    "resolve_dtype",
    "run",
    "save_checkpoint",
]
