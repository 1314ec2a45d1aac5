"""What the command-line tools (train, evaluate, generate) share: the CPU thread count, range
checks of numeric flags, usage errors as one line, the progress bar, and the refusal to replace
a checkpoint a run did not write.

The thread count: on a CPU these models are small (E = 128 in the default run), so each op's
work is a few microseconds and PyTorch's intra-op threads mostly wait for one another; when
another program also keeps the cores busy, every op waits for a descheduled thread, and a run
of under two minutes took twelve. The tools therefore default to one CPU thread on the CPU
(``--threads N`` changes it) and leave PyTorch's choice alone on a GPU, where the host threads
only launch kernels. The measurements behind the choice are in the README.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import sys
from typing import Any, Iterator, Optional

import torch

# The CPU thread count the tools use on the CPU unless --threads says otherwise.
DEFAULT_CPU_THREADS = 1


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (the message and a pointer to
    ``--help``) and exit status 2, instead of the whole usage text before the message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def threads_for(requested: Optional[int], device: torch.device) -> Optional[int]:
    """The intra-op thread count to set: ``requested`` when given, else
    :data:`DEFAULT_CPU_THREADS` on the CPU, else None (keep PyTorch's own choice)."""
    if requested is not None:
        return requested
    return DEFAULT_CPU_THREADS if device.type == "cpu" else None


def set_threads(requested: Optional[int], device: torch.device) -> int:
    """Apply :func:`threads_for`; returns the count before, so that a caller can restore it."""
    before = torch.get_num_threads()
    threads = threads_for(requested, device)
    if threads is not None:
        torch.set_num_threads(threads)
    return before


@contextlib.contextmanager
def keep_threads() -> Iterator[None]:
    """Restore PyTorch's thread count on leaving the block (a command called from Python
    leaves the caller's setting as it was)."""
    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


def range_error(flag: str, value: Any, low: float, high: float = math.inf,
                low_open: bool = False, high_open: bool = False) -> Optional[str]:  # fmt: skip
    """The one-line complaint when ``value`` lies outside the interval from ``low`` to
    ``high`` (closed unless ``*_open``), or is NaN; None when it is inside (or None: unset)."""
    if value is None:
        return None
    v = float(value)
    inside = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if inside:  # NaN fails both comparisons
        return None
    lo = ("(" if low_open else "[") + f"{low:g}"
    hi = "inf)" if high == math.inf else f"{high:g}" + (")" if high_open else "]")
    return f"{flag} must lie in {lo}, {hi}; got {value}"


# The trainer's numeric settings and their valid intervals: (low, high, low_open, high_open).
TRAIN_RANGES: dict[str, tuple] = {
    "dropout": (0.0, 1.0, False, True),
    "dropouth": (0.0, 1.0, False, True),
    "dropouti": (0.0, 1.0, False, True),
    "lr": (0.0, math.inf, True, True),
    "final_lr": (0.0, math.inf, True, True),
    "beta1": (0.0, 1.0, False, True),
    "beta2": (0.0, 1.0, False, True),
    "eps": (0.0, math.inf, True, True),
    "min_trust": (0.0, math.inf, False, True),
    "wdecay": (0.0, math.inf, False, True),
    "clip": (0.0, math.inf, False, True),
    "max_bytes": (1, math.inf, False, True),
    # numpy's RandomState takes seeds in [0, 2**32).
    "seed": (0, 2**32 - 1, False, False),
}


def ranges_error(config: dict, ranges: dict) -> Optional[str]:
    """The first setting of ``config`` outside its interval in ``ranges``, as a one-line
    complaint naming its flag; None when all are inside."""
    for key, (low, high, low_open, high_open) in ranges.items():
        flag = "--" + key.replace("_", "-")
        problem = range_error(flag, config.get(key), low, high, low_open, high_open)
        if problem is not None:
            return problem
    return None


def terminal_sized(stream) -> bool:
    """Whether the stream is a terminal that reports its size. A pseudo-terminal that nobody
    sized (``script``, ``docker run -t``, some CI runners) reports 0 x 0, from which tqdm
    computes -1 rows and hides its bar as if it were below the screen."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return size.columns > 0 and size.lines > 0


def progress_bar(total: int, initial: int = 0, enabled: bool = True, desc: str = "train",
                 unit: str = "step"):  # fmt: skip
    """A tqdm bar on stderr that shows in every terminal: it follows the terminal's size when
    the terminal reports one, else takes ``$COLUMNS`` x ``$LINES`` or 80 x 24."""
    from tqdm.auto import tqdm

    if terminal_sized(sys.stderr):
        size: dict = {"dynamic_ncols": True}
    else:
        fallback = shutil.get_terminal_size()  # $COLUMNS/$LINES, else 80 x 24
        size = {"ncols": fallback.columns, "nrows": fallback.lines}
    return tqdm(total=total, initial=initial, disable=not enabled, unit=unit, desc=desc,
                file=sys.stderr, mininterval=0.5, **size)  # fmt: skip


def replacement_error(save: Optional[str], resume: Optional[str], overwrite: bool,
                      flag: str = "--save") -> Optional[str]:  # fmt: skip
    """The one-line refusal when ``save`` names an existing file that this run neither
    resumes from nor was allowed to replace (``overwrite``); None otherwise. A run that
    resumes from ``save`` updates its own checkpoint."""
    if not save or not os.path.exists(save) or overwrite:
        return None
    if resume is not None and os.path.abspath(resume) == os.path.abspath(save):
        return None
    return (
        f"{flag} {save} exists and holds a model this run did not write; continue it with "
        f"--resume {save}, choose another {flag}, or add --overwrite to replace it"
    )


def backend_error(backend, device: torch.device, flag: str = "--backend") -> Optional[str]:
    """Why an explicitly named backend cannot run on ``device`` (checked before any data is
    read or model built), or None. Only what is known without tensors is checked: Triton
    needs CUDA (or the interpreter on the CPU), the CUDA kernels a CUDA device; the rest
    (dtype, shapes, the GPU's architecture) is checked where the op runs."""
    from ._backend import backend_for, triton_reason

    for op in ("lstm", "attention", "boom"):
        name = backend_for(op, backend)
        reason = None
        if name == "triton" or (name == "cuda" and op != "lstm"):
            reason = triton_reason(device)
        elif name == "cuda" and device.type != "cuda":
            reason = f"the CUDA kernels need a CUDA device; got {device}"
        if reason is not None:
            return (
                f"{flag}: backend={name!r} cannot run the {op} on {device}: {reason}; choose "
                f"another {flag} (auto runs anywhere)"
            )
    return None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default after its help, except where the help already says it
    (``default:``), the default is None (nothing to show: the help says what unset means) or
    the option is a switch."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default:" in text or action.default is None or action.nargs == 0:
            return text
        return super()._get_help_string(action)


def device_type(requested: Optional[str]) -> str:
    """The device type a ``--device`` value will give (None: CUDA when present, else the
    CPU), for choosing the thread count before the device itself is checked; a malformed
    value counts as the CPU here and is refused where the device is made."""
    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if str(requested).startswith("cuda") else "cpu"


def threads_help() -> str:
    return (
        f"CPU threads for PyTorch (default: {DEFAULT_CPU_THREADS} on the CPU, where more "
        f"threads slow these small models down when other programs use the cores; PyTorch's "
        f"choice on a GPU)"
    )
