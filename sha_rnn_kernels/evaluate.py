"""Bits per byte of a trained SHA-RNN: ``python -m sha_rnn_kernels.evaluate --checkpoint PATH``.

Two named protocols, both reading the split in segments of the training bptt with the LSTM
states and the attention memory (up to ``max_positions``) carried across the whole split and no
dropout: ``original`` (the default), as smerity/sha-rnn's ``main.py`` evaluated, valid at batch
``min(100, training batch)`` and test at batch 8; ``stream``, the split as one stream (batch 1).
Every printed bpc names its protocol, split, batch, bptt and memory. The loop is the trainer's
own :func:`sha_rnn_kernels.train.evaluate`, so at the same batch size and bptt the number equals
the trainer's ``valid bpc`` / ``test bpc`` exactly.

``--checkpoint`` takes a training checkpoint or a pretrained folder (``config.json`` +
``model.safetensors``); neither runs code when loaded.

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
import sys
from typing import Any, Callable, Optional, Sequence

import torch

from . import cli, train
from . import data as data_lib
from .checkpoint import CheckpointError
from .modules import SHARNN
from .pretrained import from_pretrained, is_pretrained

__all__ = ["CheckpointError", "load_model", "evaluate_checkpoint", "main"]

DEFAULT_CHECKPOINT = "checkpoints/sha-rnn-default.pt"
DTYPES = {
    "fp32": torch.float32,
    "fp64": torch.float64,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def read_checkpoint(path: str, label: str = "path") -> dict:
    """The payload of a training checkpoint, or a :class:`CheckpointError` saying why not.

    Read with ``weights_only=True``: a file that would need code to load is refused and nothing
    in it runs. ``label`` starts every message (``--checkpoint`` for the command line).
    """
    try:
        payload = train.load_checkpoint(path, label)
    except train.UsageError as exc:
        raise CheckpointError(str(exc)) from None
    missing = [k for k in ("config", "model") if k not in payload]
    if missing:
        raise CheckpointError(
            f"{label} {path}: not a checkpoint of sha_rnn_kernels.train (no {', '.join(missing)})"
        )
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
    label: str = "path",
) -> tuple[torch.nn.Module, dict]:
    """``(model, config)`` from a training checkpoint or a pretrained folder, in eval mode.

    Args:
        path: a checkpoint (``--save`` of ``python -m sha_rnn_kernels.train``) or a folder of
            ``config.json`` + ``model.safetensors`` (``SHARNN.save_pretrained``,
            ``python -m sha_rnn_kernels.export``).
        device: where the model goes (default: the CPU).
        dtype: cast the weights to this dtype (default: keep float32).
        backend: kernel backend (default: the one the run was trained with).
        label: how error messages name ``path`` (the commands pass their flag).

    ``config`` is the training run's settings (for a folder: its ``"training"`` entry, else the
    model's own sizes with the defaults below). Nothing in the file runs code when loaded.

    Raises:
        CheckpointError: the path is missing, empty, would need code to load, or is not such a
            checkpoint or folder.
    """
    if is_pretrained(path):
        model, saved = from_pretrained(SHARNN, path, device, dtype, backend, label)
        config = dict(_FOLDER_DEFAULTS, bptt=min(1024, model.max_positions))
        config.update(saved.get("training", {}))
        return model, config
    payload = read_checkpoint(path, label)
    config, state = payload["config"], payload["model"]
    try:
        ntoken = state["encoder.weight"].shape[0]
        model = train.model_from_config(config, ntoken, backend)
        model.load_state_dict(state)
    except (KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise CheckpointError(
            f"{label} {path}: its weights do not fit its settings ({_first_line(exc)})"
        ) from None
    model.eval()
    model.to(device=device or torch.device("cpu"), dtype=dtype)
    return model, config


# A folder without a "training" entry (saved from Python): evaluated and sampled with these.
_FOLDER_DEFAULTS: dict = {"data": None, "max_bytes": None, "eval_batch_size": 16, "dtype": "auto"}


# Evaluation protocols. "original": as smerity/sha-rnn's main.py evaluated (valid at batch
# min(100, training batch) = 16, test at its test_batch_size = 8, segments of the training
# bptt, state and memory carried across the split, memory up to max_positions). "stream":
# the whole split as one stream (batch 1).
PROTOCOLS = ("original", "stream")
ORIGINAL_TEST_BATCH = 8


def protocol_settings(protocol: str, split: str, config: dict) -> tuple[int, int]:
    """``(batch_size, bptt)`` of ``protocol`` on ``split`` for a run's ``config``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)}; got {protocol!r}")
    if protocol == "stream":
        return 1, config["bptt"]
    if split == "test":
        return ORIGINAL_TEST_BATCH, config["bptt"]
    return min(100, config.get("batch_size", config.get("eval_batch_size", 16))), config["bptt"]


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
    protocol: str = "original",
    label: str = "checkpoint",
    details: Optional[dict] = None,
) -> float:
    """Bits per byte of ``split`` (``"valid"`` or ``"test"``) under an evaluation protocol.

    Args:
        checkpoint: a checkpoint of the training command, or a pretrained folder.
        split: which 5% of the corpus.
        data: the corpus file (None: the one the checkpoint was trained on).
        max_bytes: read at most this many bytes of it (None: the checkpoint's setting when
            ``data`` is None, else all).
        batch_size: streams read side by side (None: the protocol's).
        bptt: segment length (None: the protocol's, the training bptt).
        device: where to run (None: CUDA when present, else the CPU).
        dtype: autocast dtype ``fp32``, ``bf16`` or ``fp16`` (None: the run's on CUDA, fp32
            elsewhere).
        progress: ``progress(done, total)`` is called before each segment.
        protocol: ``"original"`` (valid batch 16, test batch 8, as the original code) or
            ``"stream"`` (batch 1); both carry the state and memory across the split.
        label: how errors name ``checkpoint`` (the command passes ``--checkpoint``).
        details: if a dict, filled with the protocol, split, batch, bptt and memory used.
    """
    if split not in ("valid", "test"):
        raise ValueError(f"--split must be 'valid' or 'test'; got {split!r}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)}; got {protocol!r}")
    dev = pick_device(device)
    model, config = load_model(checkpoint, dev, label=label)
    model.check_token_ids = False  # byte ids are below the 256-token vocabulary
    if dtype is None:
        dtype = config.get("dtype", "fp32") if dev.type == "cuda" else "fp32"
    if dtype == "auto":  # the trainer's "auto": bf16 autocast on CUDA, fp32 elsewhere
        dtype = "bf16" if dev.type == "cuda" else "fp32"
    if dtype not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"--dtype must be fp32, bf16 or fp16; got {dtype!r}")
    own_batch, own_bptt = protocol_settings(protocol, split, config)
    batch_size = own_batch if batch_size is None else batch_size
    bptt = own_bptt if bptt is None else bptt
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
    if details is not None:
        details.update(protocol=protocol, split=split, batch=batch_size, bptt=bptt,
                       memory=model.max_positions)  # fmt: skip
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


def describe_bpc(bpc: float, details: dict) -> str:
    """``test bpc 1.2345 (protocol original: batch 8, bptt 1024, memory 5000)``."""
    custom = "" if details.get("custom") is None else f", {details['custom']}"
    return (
        f"{details['split']} bpc {bpc:.4f} (protocol {details['protocol']}{custom}: batch "
        f"{details['batch']}, bptt {details['bptt']}, memory {details['memory']})"
    )


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
    p.add_argument(
        "--checkpoint", default=DEFAULT_CHECKPOINT,
        help="a checkpoint of train, or a folder of config.json + model.safetensors",
    )  # fmt: skip
    p.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="original",
        help="original: as smerity/sha-rnn evaluated (valid batch min(100, training batch), "
        "test batch 8, training bptt, memory max_positions, state carried across the split); "
        "stream: batch 1, the whole split as one stream",
    )
    p.add_argument(
        "--data", default=None, help="corpus file (default: the one the checkpoint trained on)"
    )
    p.add_argument("--max-bytes", type=int, default=None, help="read at most this many bytes")
    p.add_argument("--split", choices=("valid", "test"), default="test", help="the split to score")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="streams side by side (default: the protocol's)",
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
    """Print ``<split> bpc X.XXXX (protocol ...)``; 0 on success, 2 (one line on stderr) on
    bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1; got {args.threads}")
    update, close = (None, lambda: None)
    if not args.quiet:
        update, close = _progress_printer(f"{args.split}")
    details: dict = {}
    custom = [f"{flag} {value}" for flag, value in (("--batch-size", args.batch_size),
              ("--bptt", args.bptt)) if value is not None]  # fmt: skip
    try:
        with cli.keep_threads():
            cli.set_threads(args.threads, torch.device(cli.device_type(args.device)))
            bpc = evaluate_checkpoint(
                args.checkpoint, split=args.split, data=args.data, max_bytes=args.max_bytes,
                batch_size=args.batch_size, bptt=args.bptt, device=args.device,
                dtype=args.dtype, progress=update, protocol=args.protocol,
                label="--checkpoint", details=details,
            )  # fmt: skip
    except (ValueError, OSError) as exc:
        close()
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        close()
        return 130
    close()
    details["custom"] = " ".join(custom) or None
    print(describe_bpc(bpc, details), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
