"""Bits per byte of a trained SHA-RNN: ``python -m sha_rnn_kernels.evaluate --checkpoint PATH``.

The paper's protocol: the split is read as one stream (test batch size 1), in segments of the
training bptt, with the LSTM states and the attention memory carried across the whole split and
no dropout. The loop is the trainer's own :func:`sha_rnn_kernels.train.evaluate`, so at the same
batch size and bptt the number equals the trainer's ``valid bpc`` / ``test bpc`` exactly.

With ``--data`` omitted the split comes from the corpus the checkpoint was trained on (its
``--data`` and ``--max-bytes``; the Python standard library's source for the default preset).

Example::

    python -m sha_rnn_kernels.evaluate --checkpoint checkpoints/sha-rnn-default.pt --split test

    >>> from sha_rnn_kernels.evaluate import evaluate_checkpoint
    >>> evaluate_checkpoint("checkpoints/sha-rnn-default.pt", split="test")   # bits per byte
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Callable, Optional, Sequence

import torch

from . import cli, train
from . import data as data_lib

__all__ = ["CheckpointError", "load_model", "evaluate_checkpoint", "main"]

DEFAULT_CHECKPOINT = "checkpoints/sha-rnn-default.pt"
DTYPES = {
    "fp32": torch.float32,
    "fp64": torch.float64,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


class CheckpointError(ValueError):
    """The file is missing or is not a checkpoint written by ``sha_rnn_kernels.train``."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def read_checkpoint(path: str) -> dict:
    """The payload of a training checkpoint, or a :class:`CheckpointError` saying why not.

    The checkpoint is unpickled in full (it holds RNG states): load only files you trust.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"--checkpoint must be a file path; got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"--checkpoint {path}: no such file")
    if not os.path.isfile(path):
        raise CheckpointError(f"--checkpoint {path}: not a file")
    kind = "not a checkpoint of sha_rnn_kernels.train"
    try:
        payload = train.load_checkpoint(path)
    except Exception as exc:  # torch.load raises many types for foreign files
        raise CheckpointError(f"--checkpoint {path}: {kind} ({_first_line(exc)})") from None
    missing = [k for k in ("config", "model") if k not in payload]
    if missing:
        raise CheckpointError(f"--checkpoint {path}: {kind} (no {', '.join(missing)})")
    return payload


def pick_device(requested: Optional[str]) -> torch.device:
    """``requested`` as a device (None: CUDA when present, else the CPU); raises ValueError."""
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"--device must name a device (cpu, cuda, cuda:1); got {requested!r}"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {requested}: CUDA is not available on this machine")
    return device


def load_model(
    path: str,
    device: Optional[torch.device] = None,
    dtype: Optional[torch.dtype] = None,
    backend: Optional[str] = None,
) -> tuple[torch.nn.Module, dict]:
    """``(model, config)`` from a checkpoint of the training command, in eval mode.

    Args:
        path: the checkpoint (``--save`` of ``python -m sha_rnn_kernels.train``).
        device: where the model goes (default: the CPU).
        dtype: cast the weights to this dtype (default: keep float32).
        backend: kernel backend (default: the one the run was trained with).

    Raises:
        CheckpointError: the file is missing or is not such a checkpoint.
    """
    payload = read_checkpoint(path)
    config, state = payload["config"], payload["model"]
    try:
        ntoken = state["encoder.weight"].shape[0]
        model = train.model_from_config(config, ntoken, backend)
        model.load_state_dict(state)
    except (KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise CheckpointError(
            f"--checkpoint {path}: its weights do not fit its settings ({_first_line(exc)})"
        ) from None
    model.eval()
    model.to(device=device or torch.device("cpu"), dtype=dtype)
    return model, config


def evaluate_checkpoint(
    checkpoint: str,
    split: str = "test",
    data: Optional[str] = None,
    max_bytes: Optional[int] = None,
    batch_size: Optional[int] = None,
    bptt: Optional[int] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> float:
    """Bits per byte of ``split`` (``"valid"`` or ``"test"``) under the paper's protocol.

    Args:
        checkpoint: a checkpoint of the training command.
        split: which 5% of the corpus.
        data: the corpus file (None: the one the checkpoint was trained on).
        max_bytes: read at most this many bytes of it (None: the checkpoint's setting when
            ``data`` is None, else all).
        batch_size: streams read side by side (None: 1 for test, as the paper; the trainer's
            ``eval_batch_size`` for valid, so the number matches its ``valid bpc``).
        bptt: segment length (None: the training bptt).
        device: where to run (None: CUDA when present, else the CPU).
        dtype: autocast dtype ``fp32``, ``bf16`` or ``fp16`` (None: the run's on CUDA, fp32
            elsewhere).
        progress: ``progress(done, total)`` is called before each segment.
    """
    if split not in ("valid", "test"):
        raise ValueError(f"--split must be 'valid' or 'test'; got {split!r}")
    dev = pick_device(device)
    model, config = load_model(checkpoint, dev)
    model.check_token_ids = False  # byte ids are below the 256-token vocabulary
    if dtype is None:
        dtype = config.get("dtype", "fp32") if dev.type == "cuda" else "fp32"
    if dtype == "auto":  # the trainer's "auto": bf16 autocast on CUDA, fp32 elsewhere
        dtype = "bf16" if dev.type == "cuda" else "fp32"
    if dtype not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"--dtype must be fp32, bf16 or fp16; got {dtype!r}")
    if batch_size is None:
        batch_size = 1 if split == "test" else config["eval_batch_size"]
    if bptt is None:
        bptt = config["bptt"]
    for name, value in (("--batch-size", batch_size), ("--bptt", bptt)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    if bptt > model.max_positions:
        raise ValueError(
            f"--bptt {bptt} exceeds the model's max_positions {model.max_positions}: a segment "
            f"must fit in the attention window"
        )
    if data is None:
        data = config.get("data")
        if max_bytes is None:
            max_bytes = config.get("max_bytes")
    corpus = data_lib.load_corpus(data, max_bytes)
    stream = getattr(corpus, split)
    if stream.numel() // batch_size < 2:
        raise ValueError(
            f"the {split} split of {corpus.name} holds {stream.numel()} bytes: too few for "
            f"--batch-size {batch_size} (each stream needs 2 or more)"
        )
    source = data_lib.batchify(stream, batch_size)
    total = math.ceil((source.shape[0] - 1) / bptt)
    done = [0]

    def tick() -> bool:
        if progress is not None:
            progress(done[0], total)
        done[0] += 1
        return False

    bpc = train.evaluate(model, source, bptt, dev, dtype, train.Dist(), stop=tick)
    if progress is not None:
        progress(total, total)
    return bpc


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _progress_printer(label: str) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """A tqdm bar on a terminal; otherwise a plain line at every 10%."""
    if sys.stderr.isatty():
        bar: list[Any] = []

        def update(done: int, total: int) -> None:
            if not bar:
                bar.append(cli.progress_bar(total, desc=label, unit="seg"))
            bar[0].update(done - bar[0].n)

        return update, lambda: bar and bar[0].close()

    shown = [-1]

    def plain(done: int, total: int) -> None:
        tenth = done * 10 // max(total, 1)
        if tenth != shown[0]:
            shown[0] = tenth
            print(f"{label}: {done}/{total} segments ({tenth * 10}%)", file=sys.stderr, flush=True)

    return plain, lambda: None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="sha-rnn-evaluate",
        description="Bits per byte of a trained SHA-RNN on a split, with the paper's protocol "
        "(state and memory carried across the whole split).",
        formatter_class=cli.HelpFormatter,
    )
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="a checkpoint of train")
    p.add_argument(
        "--data", default=None, help="corpus file (default: the one the checkpoint trained on)"
    )
    p.add_argument("--max-bytes", type=int, default=None, help="read at most this many bytes")
    p.add_argument("--split", choices=("valid", "test"), default="test", help="the split to score")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="streams side by side (default: 1 for test, the run's eval batch for valid)",
    )
    p.add_argument("--bptt", type=int, default=None, help="segment length (default: training's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if any)")
    p.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "fp16"),
        default=None,
        help="autocast dtype (default: the run's on CUDA, fp32 on the CPU)",
    )
    p.add_argument("--threads", type=int, default=None, help=cli.threads_help())
    p.add_argument("--quiet", action="store_true", help="no progress, only the result")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print ``<split> bpc X.XXXX``; 0 on success, 2 (one line on stderr) on bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1; got {args.threads}")
    update, close = (None, lambda: None)
    if not args.quiet:
        update, close = _progress_printer(f"{args.split}")
    try:
        with cli.keep_threads():
            cli.set_threads(args.threads, torch.device(cli.device_type(args.device)))
            bpc = evaluate_checkpoint(
                args.checkpoint, split=args.split, data=args.data, max_bytes=args.max_bytes,
                batch_size=args.batch_size, bptt=args.bptt, device=args.device,
                dtype=args.dtype, progress=update,
            )  # fmt: skip
    except (ValueError, OSError) as exc:
        close()
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        close()
        return 130
    close()
    print(f"{args.split} bpc {bpc:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
