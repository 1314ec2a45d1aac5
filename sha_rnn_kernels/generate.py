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
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

from . import cli, dispatch, reference
from .evaluate import DEFAULT_CHECKPOINT, DTYPES, _Parser, load_model, pick_device

__all__ = ["Decoder", "generate", "next_token_probs", "main"]

PromptIds = Union[Sequence[int], bytes, Tensor]


def _attend(attn, q: Tensor, keys: Tensor, key_gate: Tensor, value_gate: Tensor) -> Tensor:
    """One query per stream over all ``keys``: ``softmax((q gk) . K / sqrt(E)) K * gv``.

    ``q [B, 1, E]``, ``keys [B, K, E]`` (a view of the ring buffer; order does not matter) to
    ``[B, 1, E]``. One fused pass reads the memory: the split-key Triton kernel of
    :mod:`sha_rnn_kernels.ops.decode` where the block's attention backend picks Triton
    (``"auto"`` on CUDA once its check passed, or ``"triton"``), else PyTorch's fused
    scaled-dot-product attention (:func:`sha_rnn_kernels.dispatch.decode` decides).
    """
    return dispatch.decode(attn.backend, q[:, 0], keys, key_gate, value_gate).unsqueeze(1)


def _lstm_step(rnn, x: Tensor, state: tuple) -> tuple[Tensor, tuple]:
    """One LSTM step ``x [1, B, E]`` from ``state (h, c)``, each ``[1, B, E]``.

    On the CPU this is the reference's two matrix-vector products and gate arithmetic: PyTorch's
    fused CPU LSTM (oneDNN) prepares its weights on every call, which at ``T = 1`` takes 10-15x
    as long as the step itself (E = 1024: ~20 ms against ~1.3 ms, one thread). Elsewhere the
    block's own LSTM backend runs it.
    """
    if x.device.type != "cpu":
        return rnn(x, state)
    out, h, c = reference.lstm(
        x, rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0, state[0][0],
        state[1][0],
    )  # fmt: skip
    return out, (h.unsqueeze(0), c.unsqueeze(0))


class Decoder:
    """The incremental state of a :class:`~sha_rnn_kernels.SHARNN`: LSTM states and ring buffers.

    ``prefill(ids [T, B], segment_len)`` reads a context through the model's forward (segments
    of ``segment_len``); ``step(ids [B])`` advances one position. Both return the next-token
    logits ``[B, ntoken]`` of the last position. Dropout is never applied; the weights (and the
    attention gates, computed once here) must not change while a Decoder is in use.

    Example:
        >>> dec = Decoder(model, batch=1)
        >>> logits = dec.prefill(torch.tensor([[104], [105]]), segment_len=64)
        >>> logits = dec.step(logits.argmax(-1))
    """

    def __init__(self, model, batch: int = 1) -> None:
        self.model = model
        self.batch = batch
        self.hidden: Optional[list] = None
        self.capacity = model.max_positions
        # Per attention block: ring [B, max_positions, E], keys held, next slot to write.
        self.rings: dict[int, Tensor] = {}
        self.count: dict[int, int] = {}
        self.slot: dict[int, int] = {}
        self.gates: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        weight = model.encoder.weight
        with torch.no_grad():
            for i, block in enumerate(model.blocks):
                if block.attn is None:
                    continue
                attn, e = block.attn, block.attn.embed_dim
                self.rings[i] = weight.new_empty(batch, self.capacity, e)
                self.count[i] = self.slot[i] = 0
                self.gates[i] = (
                    torch.sigmoid(attn.qs).reshape(e),
                    torch.sigmoid(attn.ks).reshape(e),
                    attn.value_gate().reshape(e),
                )

    def _check_ids(self, ids: Tensor, shape: str) -> None:
        if ids.shape[-1] != self.batch:
            raise ValueError(f"ids must be {shape} with B = {self.batch}; got {list(ids.shape)}")

    @torch.no_grad()
    def prefill(self, ids: Tensor, segment_len: int) -> Tensor:
        """Read ``ids [T, B]`` in segments through the model's forward; ``[B, ntoken]`` logits."""
        self._check_ids(ids, "[T, B]")
        model = self.model
        was_training = model.training
        model.eval()
        try:
            mems = self._mems_for_forward()
            with model._time_major():  # the ring buffers and ids here are time-major
                for start in range(0, ids.shape[0], segment_len):
                    segment = ids[start : start + segment_len]
                    h, self.hidden, mems = model(segment, self.hidden, mems)
        finally:
            model.train(was_training)
        for i, mem in enumerate(mems):
            if i in self.rings:
                self._load_ring(i, mem)
        return model.decoder(h[-1])

    def _mems_for_forward(self) -> Optional[list]:
        """The ring buffers as the forward's time-major memories, oldest first."""
        if self.hidden is None:
            return None
        mems: list = [None] * len(self.model.blocks)
        for i, ring in self.rings.items():
            n, slot = self.count[i], self.slot[i]
            ordered = ring[:, :n] if n < self.capacity else torch.roll(ring, -slot, dims=1)
            mems[i] = ordered.transpose(0, 1) if n > 0 else None
        return mems

    def _load_ring(self, i: int, mem: Tensor) -> None:
        n = mem.shape[0]
        self.rings[i][:, :n] = mem.transpose(0, 1)
        self.count[i], self.slot[i] = n, n % self.capacity

    @torch.no_grad()
    def step(self, ids: Tensor) -> Tensor:
        """Advance every stream by one token ``ids [B]``; ``[B, ntoken]`` logits."""
        self._check_ids(ids, "[B]")
        if self.hidden is None:
            return self.prefill(ids.reshape(1, -1), 1)
        model = self.model
        h = model.encoder(ids.reshape(1, -1).long())  # [1, B, E]
        new_hidden = []
        for i, block in enumerate(model.blocks):
            h = block.lnstart(h)
            h, state = _lstm_step(block.rnn, h, self.hidden[i])
            new_hidden.append(state)
            if block.attn is not None:
                mh = block.lnmem(h)
                h = block.lnmid(h)
                ring, slot = self.rings[i], self.slot[i]
                ring[:, slot] = mh[0]
                self.count[i] = min(self.count[i] + 1, self.capacity)
                self.slot[i] = (slot + 1) % self.capacity
                keys = ring if self.count[i] == self.capacity else ring[:, : self.count[i]]
                gq, gk, gv = self.gates[i]
                q = (gq * block.attn.qln(block.attn.q(h))).transpose(0, 1)  # [B, 1, E]
                h = _attend(block.attn, q, keys, gk, gv).transpose(0, 1) + h
            ff_in = block.lnxff(h)
            h = block.ff(ff_in) + block.lnff(h)
        self.hidden = new_hidden
        return model.decoder(h[0])


def next_token_probs(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
) -> Tensor:
    """``softmax(logits / temperature)`` over the ``top_k`` largest logits, then the nucleus.

    ``logits [..., V]`` to probabilities of the same shape, in float32 (float64 for float64
    logits). The order is the usual one: temperature, then top-k, then top-p: of the tokens
    top-k kept, top-p keeps the smallest set, most likely first, whose probability mass
    reaches ``top_p`` (among equal probabilities the lower id comes first), and renormalises.
    Tokens left out get exactly zero. ``top_p`` None or 1 keeps every token.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        values, indices = logits.topk(top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, indices, values)
    probs = torch.softmax(logits, dim=-1)
    if top_p is None or top_p >= 1.0:
        return probs
    ordered, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    # Mass of the tokens ranked before each one (an exclusive running sum in float64, so that
    # a set whose mass equals top_p exactly is not cut one token late by rounding).
    mass = ordered.double().cumsum(-1)
    before = torch.cat([torch.zeros_like(mass[..., :1]), mass[..., :-1]], dim=-1)
    keep_sorted = before < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)


def check_top_p(top_p, name: str = "top_p") -> Optional[float]:
    """``top_p`` as a float in (0, 1], or None; ValueError naming ``name`` otherwise."""
    if top_p is None:
        return None
    if (
        isinstance(top_p, bool)
        or not isinstance(top_p, (int, float))
        or not math.isfinite(top_p)
        or not 0.0 < top_p <= 1.0
    ):
        raise ValueError(f"{name} must be a number in (0, 1] (None: off); got {top_p!r}")
    return float(top_p)


def _check_args(
    model, prompt_ids, length, temperature, top_k, generator, segment_len, top_p=None
) -> Tensor:
    ntoken = model.ntoken
    if isinstance(prompt_ids, Tensor):
        if prompt_ids.dim() != 1 or prompt_ids.dtype.is_floating_point or prompt_ids.is_complex():
            raise ValueError(
                f"prompt_ids must be a 1-D tensor of integer token ids; got a "
                f"{prompt_ids.dtype} tensor of shape {list(prompt_ids.shape)}"
            )
        ids = prompt_ids.detach().to("cpu", torch.int64)
    else:
        try:
            values = list(prompt_ids)
        except TypeError:
            raise TypeError(
                f"prompt_ids must be a sequence of token ids, bytes or a 1-D tensor; got "
                f"{type(prompt_ids).__name__}"
            ) from None
        for position, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"prompt_ids[{position}] must be an int token id; got {value!r}")
        ids = torch.tensor(values, dtype=torch.int64)
    if ids.numel() == 0:
        raise ValueError("prompt_ids is empty: give at least one token id")
    bad = ((ids < 0) | (ids >= ntoken)).nonzero()
    if bad.numel():
        position = int(bad[0, 0])
        raise ValueError(
            f"prompt_ids[{position}] = {int(ids[position])} is outside the vocabulary [0, {ntoken})"
        )
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be an int >= 1; got {length!r}")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise ValueError(f"temperature must be a finite number > 0; got {temperature!r}")
    if top_k is not None and (
        isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= ntoken
    ):
        raise ValueError(f"top_k must be None or an int in [1, {ntoken}]; got {top_k!r}")
    check_top_p(top_p)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got {type(generator)}")
    if segment_len is not None and (
        isinstance(segment_len, bool)
        or not isinstance(segment_len, int)
        or not 1 <= segment_len <= model.max_positions
    ):
        raise ValueError(
            f"segment_len must be None or an int in [1, max_positions = {model.max_positions}]; "
            f"got {segment_len!r}"
        )
    return ids


def generate(
    model,
    prompt_ids: PromptIds,
    length: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    segment_len: Optional[int] = None,
    top_p: Optional[float] = None,
) -> Iterator[int]:
    """Sample ``length`` token ids after ``prompt_ids``, yielding each as soon as it is drawn.

    Args:
        model: a :class:`~sha_rnn_kernels.SHARNN` (its dtype and device are used as they are).
        prompt_ids: one or more token ids in ``[0, ntoken)`` (a list, ``bytes`` or a 1-D tensor).
        length: how many ids to sample (>= 1).
        temperature: divides the logits (> 0); small values approach greedy decoding.
        top_k: sample among the ``top_k`` most likely ids only (None: all; 1: greedy).
        top_p: nucleus sampling, after temperature and top-k: the smallest set of ids whose
            probability reaches ``top_p``, in (0, 1] (None: off).
        generator: a ``torch.Generator`` for the draws (None: PyTorch's global RNG). The draws
            happen on the generator's device; a CPU generator gives the same text on any device
            up to the model's arithmetic.
        segment_len: the prompt is read in segments of this length (None: the paper's 1024, at
            most half of ``max_positions``); pass the training bptt.

    Arguments are checked when this is called; the returned iterator runs the model lazily.
    Gradients are off inside it, and the model's train/eval mode is left as it was.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> text = bytes(generate(model, b"Hello", 20, top_k=5, generator=g))
    """
    ids = _check_args(
        model, prompt_ids, length, temperature, top_k, generator, segment_len, top_p
    )
    if segment_len is None:
        segment_len = max(1, min(1024, model.max_positions // 2))
    return _sample(
        model, ids, length, float(temperature), top_k, generator, segment_len, check_top_p(top_p)
    )


def _sample(
    model, ids, length, temperature, top_k, generator, segment_len, top_p=None
) -> Iterator[int]:
    device = model.encoder.weight.device
    decoder = Decoder(model, batch=1)
    logits = decoder.prefill(ids.to(device).reshape(-1, 1), segment_len)
    draw_device = generator.device if generator is not None else torch.device("cpu")
    for n in range(length):
        probs = next_token_probs(logits[0], temperature, top_k, top_p).to(draw_device)
        token = torch.multinomial(probs, 1, generator=generator)
        value = int(token)
        yield value
        if n + 1 < length:
            logits = decoder.step(token.to(device))


# ----------------------------------------------------------------------------------------------
# Command line


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
