"""Sample bytes from a trained SHA-RNN: ``python -m sha_rnn_kernels.generate``.

The prompt is read in segments (the training bptt from the command line) through the model's
ordinary forward. Each new byte is then one ``T = 1`` step that carries the LSTM states and the
attention memory and never re-runs the context.

The decode step keeps each attention block's memory in a preallocated ring buffer of
``max_positions`` keys: a single query sees every key it holds, and the softmax does not depend
on the keys' order, so overwriting the oldest key in place is exact (no ``cat``, no copy of the
memory). The key gate folds into the query and the value gate onto the output,
``softmax((q * gk) . K / sqrt(E)) K * gv``, so one step makes a single fused attention call over
the memory per block (PyTorch's scaled-dot-product attention on the CPU; on CUDA the split-key
Triton kernel of :mod:`sha_rnn_kernels.ops.decode`, which reads the memory once) and no other
work on it. Everything else in the step is a matrix-vector product with the weights. The result
equals the module's own forward at ``T = 1`` (see ``tests/test_generate.py``).

Example::

    python -m sha_rnn_kernels.generate --prompt "def main(" --length 200 --seed 1

    >>> model, config = load_model("checkpoints/sha-rnn-default.pt")
    >>> g = torch.Generator().manual_seed(1)
    >>> for token in model.generate(list(b"def main("), 50, generator=g, segment_len=64):
    ...     print(chr(token), end="")
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Optional, Sequence

import torch

from . import cli
from .evaluate import DEFAULT_CHECKPOINT, DTYPES, _Parser, load_model, pick_device
from .sampling import (  # noqa: F401 - the sampling API, importable from here as before
    Decoder,
    _attend,
    _check_args,
    _lstm_step,
    _sample,
    check_top_p,
    generate,
    next_token_probs,
)

__all__ = ["Decoder", "generate", "next_token_probs", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="sha-rnn-generate",
        description="Sample bytes from a trained SHA-RNN, streaming them to stdout.",
        formatter_class=cli.HelpFormatter,
    )
    p.add_argument(
        "--checkpoint", default=DEFAULT_CHECKPOINT,
        help="a checkpoint of train, or a folder of config.json + model.safetensors",
    )  # fmt: skip
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=None, help="the text to continue")
    prompt.add_argument("--prompt-file", default=None, help="read the prompt's bytes from a file")
    p.add_argument("--length", type=int, default=200, help="bytes to sample")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same text")
    p.add_argument("--temperature", type=float, default=1.0, help="divides the logits (> 0)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest bytes")
    p.add_argument(
        "--top-p",
        type=float,
        default=None,
        help="nucleus sampling, 0 < P <= 1: after --temperature and --top-k, sample among the "
        "smallest set of bytes whose probability reaches P (default: off; smerity/sha-rnn's "
        "generate.py samples with 0.98 at temperature 1.0)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if any)")
    p.add_argument(
        "--dtype", choices=tuple(DTYPES), default="fp32", help="the model's weights and state"
    )
    p.add_argument(
        "--segment-len",
        type=int,
        default=None,
        help="prompt segment length (default: the training bptt)",
    )
    p.add_argument("--threads", type=int, default=None, help=cli.threads_help())
    return p


def _read_prompt(args) -> bytes:
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, "rb") as f:
                return f.read()
        except OSError as exc:
            raise ValueError(f"--prompt-file {args.prompt_file}: {exc.strerror}") from None
    if args.prompt is None:
        raise ValueError("give the text to continue with --prompt TEXT or --prompt-file FILE")
    # Arguments that are not valid UTF-8 reach Python as surrogate escapes: recover the bytes.
    return os.fsencode(args.prompt) if os.name != "nt" else args.prompt.encode("utf-8")


def _run(args, out) -> None:
    prompt = _read_prompt(args)
    if not prompt:
        raise ValueError("the prompt is empty: give at least one byte")
    if args.length < 1:
        raise ValueError(f"--length must be >= 1; got {args.length}")
    # Named by their flags here (generate() names its Python arguments).
    for problem in (
        cli.range_error("--temperature", args.temperature, 0.0, math.inf, True, True),
        cli.range_error("--top-k", args.top_k, 1, 256),
        cli.range_error("--segment-len", args.segment_len, 1),
    ):
        if problem is not None:
            raise ValueError(problem)
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1; got {args.threads}")
    device = pick_device(args.device)
    top_p = check_top_p(args.top_p, "--top-p")
    cli.set_threads(args.threads, device)
    model, config = load_model(args.checkpoint, device, DTYPES[args.dtype], label="--checkpoint")
    model.check_token_ids = False  # ids are checked once, up front, by generate()
    if model.ntoken > 256:
        raise ValueError(f"--checkpoint {args.checkpoint}: {model.ntoken} tokens are not bytes")
    segment_len = args.segment_len if args.segment_len is not None else config["bptt"]
    generator = torch.Generator().manual_seed(args.seed)
    tokens = generate(
        model, prompt, args.length, temperature=args.temperature, top_k=args.top_k,
        generator=generator, segment_len=min(segment_len, model.max_positions), top_p=top_p,
    )  # fmt: skip
    for token in tokens:
        out.write(bytes((token,)))
        out.flush()
    if out.isatty():
        out.write(b"\n")
        out.flush()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Stream the sampled bytes to stdout; 0 on success, 2 (one line on stderr) on bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    out = sys.stdout.buffer
    try:
        with cli.keep_threads():
            _run(args, out)
    except (ValueError, TypeError, OSError) as exc:
        if isinstance(exc, BrokenPipeError):  # e.g. `| head`: the reader has gone
            _silence_stdout()
            return 0
        message = " ".join(str(exc).split("\n"))
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that Python's exit flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
