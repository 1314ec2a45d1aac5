"""Reading files without running their code: training checkpoints and state dicts.

A ``torch.save`` file is a pickle, and unpickling may call any function the file names. Every
file this package loads goes through :func:`load_tensors`, which reads it with
``torch.load(weights_only=True)``: tensors, numbers, strings, lists, tuples and dicts only. A
file that names any other global (a hostile ``__reduce__``, a pickled ``nn.Module``, numpy
arrays) is refused before anything in it runs, with a one-line :class:`CheckpointError` that
names the file and what to do.

Training checkpoints therefore hold only such data: the numpy RNG states are stored as plain
dicts (:func:`numpy_state_to_plain`). Checkpoints written by an older version of this package
pickled the numpy states as arrays; convert one you trust with::

    python -m sha_rnn_kernels.checkpoint --trust OLD.pt NEW.pt

which is the only place that calls ``torch.load(weights_only=False)``, and only with
``--trust``.

Every error names what the user passed: the command-line flag (``--resume``, ``--checkpoint``)
when the path came from one, the argument name when it came from a Python call.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional, Sequence

import numpy as np
import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "check_file",
    "load_tensors",
    "numpy_state_to_plain",
    "numpy_state_from_plain",
    "save_checkpoint",
    "upgrade",
    "main",
]

CONVERT_HINT = "python -m sha_rnn_kernels.checkpoint --trust OLD.pt NEW.pt"


class CheckpointError(ValueError):
    """A file that cannot be loaded safely or is not what was asked for (one-line message)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


def check_file(path: Any, label: str) -> str:
    """``path`` as a str when it names an existing, non-empty regular file; else raises
    :class:`CheckpointError` starting with ``label`` (the flag or argument name)."""
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"{label} must be a file path; got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{label} {path}: no such file")
    if os.path.isdir(path):
        raise CheckpointError(f"{label} {path}: is a folder, not a checkpoint file")
    if not os.path.isfile(path):
        raise CheckpointError(f"{label} {path}: not a regular file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{label} {path}: the file is empty")
    return path


def _unsafe_globals(path: str) -> list:
    """The globals a ``torch.save`` zip file would import (none for tensors and plain data).
    Read from the pickle's opcodes without executing them; [] when the file is not a zip."""
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if finder is None:  # pragma: no cover - torch < 2.6
        return []
    try:
        return list(finder(path))
    except Exception:  # noqa: BLE001 - not a torch zip file: torch.load reports it below
        return []


def load_tensors(path: Any, label: str, what: str = "a checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU, or a one-line
    :class:`CheckpointError` naming ``label`` and ``path``.

    Nothing in the file runs: a file that needs code to load is refused (the message lists the
    globals it would import and how to convert a trusted older checkpoint).
    """
    path = check_file(path, label)
    unsafe = _unsafe_globals(path)
    if unsafe:
        raise CheckpointError(_refusal(label, path, unsafe))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for foreign files
        import pickle

        if isinstance(exc, pickle.UnpicklingError) and "weights_only" in str(exc).lower():
            needs = _pickle_imports(path)
            if needs is not None:
                raise CheckpointError(_refusal(label, path, needs)) from None
        raise CheckpointError(
            f"{label} {path}: not {what} (cannot be read: {_first_line(exc)})"
        ) from None


def _pickle_imports(path: str) -> Optional[list]:
    """For a plain (not zip) pickle: the globals it imports, read with ``pickletools`` (which
    parses opcodes and executes nothing); None when it imports none or is not a pickle."""
    import pickletools
    import zipfile

    if zipfile.is_zipfile(path):
        return []  # torch's zip format: the weights-only unpickler refused a global in it
    names: list = []
    strings: list = []
    try:
        with open(path, "rb") as f:
            for opcode, arg, _ in pickletools.genops(f):
                if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
                    strings = (strings + [str(arg)])[-2:]
                elif opcode.name in ("GLOBAL", "INST"):
                    names.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL":
                    names.append(".".join(strings))
                elif opcode.name in ("REDUCE", "BUILD", "NEWOBJ", "NEWOBJ_EX", "OBJ"):
                    names = names or ["a callable"]
    except Exception:  # noqa: BLE001 - not a pickle at all
        return None
    return names or None


def _refusal(label: str, path: str, names: list) -> str:
    shown = ", ".join(sorted(names)[:4]) + (" ..." if len(names) > 4 else "")
    needs = f" ({shown})" if shown else ""
    return (
        f"{label} {path}: refused: loading it would run code{needs}; it was not loaded and "
        f"nothing in it ran. Only tensors and plain data are read. If it is a checkpoint of an "
        f"older sha_rnn_kernels that you trust, convert it with `{CONVERT_HINT}`"
    )


# ----------------------------------------------------------------------------------------------
# numpy RNG states as plain data


def numpy_state_to_plain(state: tuple) -> dict:
    """``RandomState.get_state()`` as a dict of a tensor, ints and a float (weights_only-safe)."""
    name, keys, pos, has_gauss, cached = state
    return {
        "name": str(name),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def numpy_state_from_plain(plain: dict) -> tuple:
    """The inverse of :func:`numpy_state_to_plain`, for ``RandomState.set_state``."""
    keys = plain["keys"].numpy().astype(np.uint32)
    return (plain["name"], keys, plain["pos"], plain["has_gauss"], plain["cached_gaussian"])


def _plain_rng(rng: dict) -> dict:
    out = dict(rng)
    for key in ("data", "numpy"):
        if isinstance(out.get(key), tuple):
            out[key] = numpy_state_to_plain(out[key])
    return out


# ----------------------------------------------------------------------------------------------
# Writing a training checkpoint

# What a training checkpoint of this version holds: tensors and plain data only (see the trainer).
CHECKPOINT_FORMAT = 2


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


# ----------------------------------------------------------------------------------------------
# Converting a trusted older checkpoint


def upgrade(old: str, new: str) -> None:
    """Rewrite a trusted checkpoint of an older sha_rnn_kernels in the safe format.

    This unpickles ``old`` in full (it may run code): call it only for files you made or trust.
    """
    old = check_file(old, "OLD")
    payload = torch.load(old, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or "model" not in payload or "config" not in payload:
        raise CheckpointError(f"OLD {old}: not a training checkpoint of sha_rnn_kernels")
    payload = dict(payload)
    if "rng" in payload:
        payload["rng"] = _plain_rng(payload["rng"])
    payload["format"] = CHECKPOINT_FORMAT
    save_checkpoint(new, payload)
    load_tensors(new, "NEW")  # proves the result loads safely


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``--trust OLD NEW``: convert; 0 done, 2 (one line on stderr) on a bad argument."""
    p = argparse.ArgumentParser(
        prog="python -m sha_rnn_kernels.checkpoint",
        description="Convert a training checkpoint of an older sha_rnn_kernels, which pickled "
        "numpy RNG states, to the current format that loads without running code. Reading OLD "
        "unpickles it in full: use only on files you trust.",
    )
    p.add_argument("old", metavar="OLD", help="the older checkpoint (trusted)")
    p.add_argument("new", metavar="NEW", help="where to write the converted checkpoint")
    p.add_argument(
        "--trust", action="store_true", help="required: you vouch that OLD runs no harmful code"
    )
    args = p.parse_args(argv)
    if not args.trust:
        print(f"{p.prog}: error: reading OLD may run code in it; add --trust if you vouch for "
              f"{args.old}", file=sys.stderr)  # fmt: skip
        return 2
    try:
        upgrade(args.old, args.new)
    except (CheckpointError, OSError) as exc:
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - whatever unpickling a foreign file raises
        print(f"{p.prog}: error: OLD {args.old}: cannot be read ({_first_line(exc)})",
              file=sys.stderr)  # fmt: skip
        return 2
    print(f"wrote {args.new}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
