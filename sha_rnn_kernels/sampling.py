"""Sampling bytes from an SHA-RNN: the prompt's prefill, then one ``T = 1`` step per byte.

The prompt is read in segments through the model's ordinary forward. Each new byte is then one
step that carries the LSTM states and the attention memory and never re-runs the context: each
attention block keeps its memory in a preallocated ring buffer of ``max_positions`` keys (a
single query's softmax does not depend on the keys' order, so overwriting the oldest key in
place is exact), with the key gate folded into the query and the value gate onto the output, so
a step makes one fused attention call over the memory per block (:func:`dispatch.decode`).
Logits go through temperature, then top-k, then top-p (nucleus) filtering before the draw.
``SHARNN.generate`` and the command ``python -m sha_rnn_kernels.generate`` both use
:func:`generate`; the result equals the module's own forward at ``T = 1``.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

from . import dispatch, reference

__all__ = ["Decoder", "generate", "next_token_probs", "check_top_p"]

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
