"""Drop-in ``torch.nn`` modules of the SHA-RNN.

Parameter names follow the original code (Merity 2019), so its state dicts load with
``strict=True``. Every module takes ``backend=``: one of ``"auto"``, ``"reference"``,
``"torch"``, ``"triton"``, ``"cuda"`` for every op, or a per-op mapping such as
``{"lstm": "cuda", "attention": "triton", "boom": "triton"}`` (or the string
``"lstm=cuda,attention=triton"``; an op left out uses ``"auto"``); None reads
``SHA_RNN_KERNELS_BACKEND`` at each call. ``"cuda"`` runs the CUDA C++ LSTM, and the Triton
kernels of Boom and attention, which have no CUDA C++ kernel. The modules pass it to
:mod:`sha_rnn_kernels.functional`; :mod:`sha_rnn_kernels.dispatch` decides which backend runs.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import functional as SF
from ._backend import BackendSpec, autocast_dtype, backend_for, default_backend, parse_backend
from .reference import LAYER_NORM_EPS

__all__ = ["Boom", "LSTM", "SingleHeadAttention", "SHALayer", "SHARNN", "Overparam"]

HiddenState = tuple[Tensor, Tensor]


def _check_backend(backend: BackendSpec, *ops: str) -> BackendSpec:
    """Validate ``backend`` (a name or a per-op mapping) and return its canonical form (a
    lower-case name, a dict, or None for "read the environment at each call").

    The Triton files of those ``ops`` that may run Triton under it are imported now:
    torch.compile(fullgraph=True) cannot trace that import at the first call.
    """
    spec = parse_backend(backend)
    effective = default_backend() if spec is None else spec
    # "auto" and "cuda" run Triton for Boom and attention; the LSTM runs Triton only on request.
    triton_ops = [
        op
        for op in ops
        if backend_for(op, effective) == "triton"
        or (op != "lstm" and backend_for(op, effective) in ("auto", "cuda"))
    ]
    SF.preload(*triton_ops)
    return spec


def _check_positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return value


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(
        compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling()
    )


def _compute_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The autocast dtype when autocast is on for ``x``'s device and would cast ``x``; else None."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None
    return autocast_dtype(x.device.type)


def _layer_norm(ln: nn.LayerNorm, x: Tensor, dtype: Optional[torch.dtype]) -> Tensor:
    """``ln(x)``, returned in ``dtype`` when autocast is on (``dtype`` not None).

    CUDA autocast runs LayerNorm in float32 and returns float32, which would promote the
    residual stream and the attention memory to float32 and cost a cast at every consumer. Here
    the kernel reads and writes the compute dtype (its statistics are float32 inside it either
    way); the ``[E]`` weight and bias are cast, the activations are not copied.
    """
    if dtype is None:
        return ln(x)
    with torch.autocast(x.device.type, enabled=False):
        return F.layer_norm(
            x.to(dtype), ln.normalized_shape, ln.weight.to(dtype), ln.bias.to(dtype), ln.eps
        )


def _init_linear(linear: nn.Linear, width: int) -> None:
    """The SHA-RNN init: normal(0, 0.1 / sqrt(E)) weights, zero biases."""
    nn.init.normal_(linear.weight, mean=0.0, std=0.1 / math.sqrt(width))
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class Boom(nn.Module):
    """The Boom feed-forward: ``sum_k chunk_k(dropout(gelu(linear1(x))))``.

    An ``E -> F`` projection with GELU ``x * sigmoid(1.702 x)``, whose ``F``-wide result is cut
    into ``F // E`` chunks of width ``E`` and summed (no second matrix).

    Args:
        embed_dim: ``E``.
        hidden_dim: ``F >= E`` (default ``4 E``).
        dropout: dropout on the activation in training.
        backend: see the module docstring.

    Shape: ``[..., E] -> [..., E]``.

    Example:
        >>> Boom(16, 64)(torch.randn(3, 2, 16)).shape
        torch.Size([3, 2, 16])
    """

    def __init__(
        self,
        embed_dim: int,
        hidden_dim: Optional[int] = None,
        dropout: float = 0.0,
        backend: BackendSpec = None,
    ) -> None:
        super().__init__()
        embed_dim = _check_positive("embed_dim", embed_dim)
        if hidden_dim is None:
            hidden_dim = 4 * embed_dim
        hidden_dim = _check_positive("hidden_dim", hidden_dim)
        if hidden_dim < embed_dim:
            raise ValueError(f"hidden_dim must be >= embed_dim = {embed_dim}; got {hidden_dim}")
        self.embed_dim, self.hidden_dim = embed_dim, hidden_dim
        self.dropout = SF.check_probability("dropout", dropout)
        self.backend = _check_backend(backend, "boom")
        self.linear1 = nn.Linear(embed_dim, hidden_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_linear(self.linear1, self.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return SF.boom(
            x, self.linear1.weight, self.linear1.bias, dropout=self.dropout,
            training=self.training, backend=self.backend,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, hidden_dim={self.hidden_dim}, dropout={self.dropout}, "
            f"backend={self.backend!r}"
        )


class LSTM(nn.Module):
    """One LSTM layer, a drop-in for ``torch.nn.LSTM(input_size, hidden_size)``.

    Same parameter names (``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0``),
    init, call signature and return value: ``forward(input, hx=None) -> (out, (h_n, c_n))`` with
    ``h_n, c_n [1, B, H]``. Unbatched ``[T, I]`` input gives ``[T, H]`` and ``[1, H]`` states.

    Only ``input_size`` and ``hidden_size`` are positional; every other argument is keyword-only
    (so ``nn.LSTM``'s positional ``LSTM(8, 16, 2)`` raises instead of reading 2 as ``bias``).
    ``num_layers``, ``dropout``, ``bidirectional`` and ``proj_size`` are accepted at their
    one-layer values only: stack modules for more layers. ``device=`` and ``dtype=`` create the
    parameters there, as for ``nn.LSTM``. A ``PackedSequence`` input is rejected: pad it.

    Example:
        >>> lstm = LSTM(8, 16)
        >>> out, (h, c) = lstm(torch.randn(5, 3, 8))
        >>> out.shape, h.shape
        (torch.Size([5, 3, 16]), torch.Size([1, 3, 16]))
    """

    num_layers = 1
    bidirectional = False
    proj_size = 0

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *args,
        bias: bool = True,
        batch_first: bool = False,
        num_layers: int = 1,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        backend: BackendSpec = None,
    ) -> None:
        super().__init__()
        if args:
            raise TypeError(
                f"LSTM takes input_size and hidden_size positionally and everything else by "
                f"keyword; got extra positional arguments {args} (torch.nn.LSTM's third "
                f"positional argument is num_layers, and this module is one layer: stack "
                f"LSTM modules for more)"
            )
        for name, value, single in (
            ("num_layers", num_layers, 1),
            ("dropout", dropout, 0.0),
            ("bidirectional", bidirectional, False),
            ("proj_size", proj_size, 0),
        ):
            if value != single:
                raise ValueError(
                    f"LSTM is one unidirectional layer without projection: {name} must be "
                    f"{single!r}; got {value!r} (stack LSTM modules for more layers)"
                )
        self.input_size = _check_positive("input_size", input_size)
        self.hidden_size = _check_positive("hidden_size", hidden_size)
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = 0.0
        self.backend = _check_backend(backend, "lstm")
        gates = 4 * hidden_size
        factory = {"device": device, "dtype": dtype}
        self.weight_ih_l0 = nn.Parameter(torch.empty(gates, input_size, **factory))
        self.weight_hh_l0 = nn.Parameter(torch.empty(gates, hidden_size, **factory))
        if self.bias:
            self.bias_ih_l0 = nn.Parameter(torch.empty(gates, **factory))
            self.bias_hh_l0 = nn.Parameter(torch.empty(gates, **factory))
        else:
            self.register_parameter("bias_ih_l0", None)
            self.register_parameter("bias_hh_l0", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's LSTM init: every parameter uniform(-1/sqrt(H), 1/sqrt(H))."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def flatten_parameters(self) -> None:
        """No-op, for code written against ``torch.nn.LSTM``."""

    def forward(
        self, input: Tensor, hx: Optional[HiddenState] = None
    ) -> tuple[Tensor, HiddenState]:
        if isinstance(input, PackedSequence):
            raise TypeError(
                "LSTM does not take a PackedSequence; pass the padded [T, B, I] tensor "
                "(torch.nn.utils.rnn.pad_packed_sequence) and ignore the outputs past each length"
            )
        self._check_input(input)
        unbatched = input.dim() == 2
        if unbatched:
            input = input.unsqueeze(0 if self.batch_first else 1)
            if hx is not None:
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        out, (h_n, c_n) = SF.lstm(
            input, self.weight_ih_l0, self.weight_hh_l0, self.bias_ih_l0, self.bias_hh_l0,
            hx, batch_first=self.batch_first, backend=self.backend,
        )  # fmt: skip
        if unbatched:
            out = out.squeeze(0 if self.batch_first else 1)
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return out, (h_n, c_n)

    def _check_input(self, input: Tensor) -> None:
        """The input's own shape against this module's input_size (the weights are right by
        construction, so a mismatch is the input's)."""
        i = self.input_size
        if not isinstance(input, Tensor) or input.dim() not in (2, 3) or input.shape[-1] != i:
            layout = "[B, T, I]" if self.batch_first else "[T, B, I]"
            raise ValueError(
                f"input must be {layout} (or unbatched [T, I]) with I = input_size = {i}: its "
                f"last dimension must be {i}; got {SF.describe(input)}"
            )

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        return s + f", backend={self.backend!r}"


class Overparam(nn.Module):
    """The over-parameterised value gate: ``c, f = l1(x).split(E); sigmoid(f) * tanh(c)``."""

    def __init__(self, nhid: int) -> None:
        super().__init__()
        self.nhid = nhid
        self.l1 = nn.Linear(nhid, 2 * nhid)

    def forward(self, x: Tensor) -> Tensor:
        c, f = self.l1(x).split(self.nhid, dim=-1)
        return torch.sigmoid(f) * torch.tanh(c)


class SingleHeadAttention(nn.Module):
    """The SHA-RNN's single attention head.

    ``q = sigmoid(qs) * qln(q(query))``, keys gated by ``sigmoid(ks)``, values by the
    over-parameterised gate ``vq(sigmoid(vs))``; no key or value projection. In training, q and
    the values are dropped elementwise and so are the attention weights. Causal with the memory
    visible: query ``i`` sees keys ``j <= i + K - T``.

    Parameters: ``qs, ks, vs [1, 1, E]``, ``qkvs [1, 3, E]`` and ``r_gate [1, 1, E]`` (kept for
    checkpoint compatibility, unused), ``q`` (``Linear(E, E)``), ``qln`` (LayerNorm),
    ``vq.l1`` (``Linear(E, 2E)``). :meth:`vq_collapse` folds ``vq`` into ``vs`` after training.

    Shape: ``forward(query [T, B, E], key [K, B, E], value [K, B, E]) -> [T, B, E]``
    (batch first with ``batch_first=True``), ``K >= T``.

    Example:
        >>> attn = SingleHeadAttention(16)
        >>> h, mem = torch.randn(4, 2, 16), torch.randn(10, 2, 16)
        >>> attn(h, mem, mem).shape
        torch.Size([4, 2, 16])
    """

    def __init__(
        self,
        embed_dim: int,
        dropout: float = 0.0,
        batch_first: bool = False,
        backend: BackendSpec = None,
    ) -> None:
        super().__init__()
        self.embed_dim = _check_positive("embed_dim", embed_dim)
        self.dropout = SF.check_probability("dropout", dropout)
        self.batch_first = bool(batch_first)
        self.backend = _check_backend(backend, "attention")
        e = embed_dim
        self.qs = nn.Parameter(torch.zeros(1, 1, e))
        self.ks = nn.Parameter(torch.zeros(1, 1, e))
        self.vs = nn.Parameter(torch.zeros(1, 1, e))
        self.qkvs = nn.Parameter(torch.zeros(1, 3, e))
        self.r_gate = nn.Parameter(torch.ones(1, 1, e))
        self.q = nn.Linear(e, e)
        self.qln = nn.LayerNorm(e, eps=LAYER_NORM_EPS)
        self.vq: Optional[Overparam] = Overparam(e)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in (self.qs, self.ks, self.vs, self.qkvs):
            nn.init.zeros_(p)
        nn.init.ones_(self.r_gate)
        _init_linear(self.q, self.embed_dim)
        self.qln.reset_parameters()
        if self.vq is not None:
            _init_linear(self.vq.l1, self.embed_dim)

    @property
    def collapsed(self) -> bool:
        """True after :meth:`vq_collapse`: ``vs`` then holds the value gate itself."""
        return self.vq is None

    def value_gate(self) -> Tensor:
        """The ``[E]`` value gate: ``vq(sigmoid(vs))``, or ``vs`` once collapsed."""
        if self.vq is None:
            return self.vs.reshape(self.embed_dim)
        return self.vq(torch.sigmoid(self.vs)).reshape(self.embed_dim)

    @torch.no_grad()
    def vq_collapse(self) -> None:
        """Fold the over-parameterised value gate into ``vs`` (a static ``[E]`` vector).

        After training the gate does not depend on the input, so ``vq`` can go: ``vs`` becomes
        ``vq(sigmoid(vs))``, ``vq`` is removed from the module (and from its state dict), and the
        output is unchanged.
        """
        if self.vq is None:
            return
        self.vs.copy_(self.value_gate().reshape_as(self.vs))
        self.vq = None

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Optional[Tensor] = None,
        detached_keys: int = 0,
        segment: Optional[Tensor] = None,
        _segment_is_tail: bool = False,
    ) -> Tensor:
        """``detached_keys``: the first n keys and values get no gradient (earlier segments'
        memory); ``segment``: with ``key`` and ``value`` one tensor ``cat([memory, segment])``,
        their gradient goes to ``segment`` in one piece (see
        :func:`sha_rnn_kernels.functional.single_head_attention`, which checks that
        ``key[detached_keys:]`` holds the segment's values)."""
        if value is None:
            value = key
        e = self.embed_dim
        if query.dim() != 3 or query.shape[-1] != e:
            raise ValueError(f"query must be [T, B, E] with E = {e}; got {list(query.shape)}")
        dtype = _compute_dtype(query)
        query_gate = torch.sigmoid(self.qs).reshape(e)
        if dtype is not None:
            query_gate = query_gate.to(dtype)  # so that q stays in the compute dtype
            # Keys and values are usually one tensor (the memory): cast it once, not twice.
            same = value is key
            key = key.to(dtype)
            value = key if same else value.to(dtype)
            segment = None if segment is None else segment.to(dtype)
        q = query_gate * _layer_norm(self.qln, self.q(query), dtype)
        q = F.dropout(q, self.dropout, self.training)
        return SF.single_head_attention(
            q, key, value, dropout=self.dropout, training=self.training,
            batch_first=self.batch_first, backend=self.backend,
            key_gate=torch.sigmoid(self.ks).reshape(e), value_gate=self.value_gate(),
            value_dropout=self.dropout, detached_keys=detached_keys, segment=segment,
            _segment_is_tail=_segment_is_tail,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, dropout={self.dropout}, collapsed={self.collapsed}, "
            f"backend={self.backend!r}"
        )


class SHALayer(nn.Module):
    """One SHA-RNN block: LayerNorm, LSTM, optional single-head attention, Boom.

    ::

        h = lnstart(h); x, hidden = rnn(h, hidden); h = dropout(x)   # no residual here
        if attention:
            mh = lnmem(h); h = lnmid(h); big = cat([memory, mh])
            new_memory = big[-max_positions:]; h = dropout(attn(h, big, big)) + h
        h = dropout(ff(lnxff(h))) + lnff(h)

    Args:
        embed_dim: ``E``.
        hidden_dim: the Boom's width ``F`` (default ``4 E``).
        use_attn: give this block the attention head.
        dropout: every dropout inside the block.
        max_positions: keys the attention may see (memory plus segment).
        batch_first: ``[B, T, E]`` inputs, outputs and memory.
        backend: see the module docstring.

    ``forward(h [T, B, E], mem [M, B, E] or None, hidden (h0, c0) or None)`` returns
    ``(h, new_mem, new_hidden)``; ``new_mem`` is None without attention. The incoming memory is
    detached (it comes from an earlier segment). With attention, ``M + T`` may not exceed
    ``max_positions`` (``M = 0`` without memory).

    Example:
        >>> layer = SHALayer(16, use_attn=True)
        >>> h, mem, hidden = layer(torch.randn(4, 2, 16))
        >>> h, mem, hidden = layer(torch.randn(4, 2, 16), mem, hidden)
        >>> mem.shape
        torch.Size([8, 2, 16])
    """

    def __init__(
        self,
        embed_dim: int,
        hidden_dim: Optional[int] = None,
        use_attn: bool = False,
        dropout: float = 0.0,
        max_positions: int = 5000,
        batch_first: bool = False,
        backend: BackendSpec = None,
    ) -> None:
        super().__init__()
        e = self.embed_dim = _check_positive("embed_dim", embed_dim)
        self.max_positions = _check_positive("max_positions", max_positions)
        self.dropout = SF.check_probability("dropout", dropout)
        self.batch_first = bool(batch_first)
        self.backend = _check_backend(backend)
        self.attn = SingleHeadAttention(e, dropout, backend=backend) if use_attn else None
        self.ff = Boom(e, hidden_dim, dropout=dropout, backend=backend)
        self.lnstart = nn.LayerNorm(e, eps=LAYER_NORM_EPS)
        self.lnmid = nn.LayerNorm(e, eps=LAYER_NORM_EPS)
        self.lnmem = nn.LayerNorm(e, eps=LAYER_NORM_EPS)
        self.lnout = nn.LayerNorm(e, eps=LAYER_NORM_EPS)  # in the original too, and unused
        self.lnff = nn.LayerNorm(e, eps=LAYER_NORM_EPS)
        self.lnxff = nn.LayerNorm(e, eps=LAYER_NORM_EPS)
        self.rnn = LSTM(e, e, backend=backend)

    @property
    def use_attn(self) -> bool:
        return self.attn is not None

    def _check_inputs(self, h: Tensor, mem: Optional[Tensor]) -> None:
        e = self.embed_dim
        if not isinstance(h, Tensor) or h.dim() != 3 or h.shape[-1] != e:
            layout = "[B, T, E]" if self.batch_first else "[T, B, E]"
            raise ValueError(f"h must be {layout} with E = {e}; got {SF.describe(h)}")
        time_dim, batch_dim = (1, 0) if self.batch_first else (0, 1)
        if self.attn is not None and h.shape[time_dim] > self.max_positions:
            raise ValueError(
                f"h has T = {h.shape[time_dim]} positions > max_positions = "
                f"{self.max_positions}: the attention cannot see a segment longer than its "
                f"window; split the sequence or raise max_positions"
            )
        if mem is None:
            return
        if self.attn is None:
            raise ValueError("mem was given but this layer has no attention (use_attn=False)")
        if not isinstance(mem, Tensor) or mem.dim() != 3:
            raise ValueError(f"mem must be a 3-D tensor; got {SF.describe(mem)}")
        if mem.shape[batch_dim] != h.shape[batch_dim] or mem.shape[-1] != e:
            raise ValueError(
                f"mem must have batch {h.shape[batch_dim]} and width E = {e} like h; "
                f"got {list(mem.shape)}"
            )
        total = mem.shape[time_dim] + h.shape[time_dim]
        if total > self.max_positions:
            raise ValueError(
                f"mem is too long: {mem.shape[time_dim]} memory positions + "
                f"{h.shape[time_dim]} segment positions = {total} keys > max_positions = "
                f"{self.max_positions}; keep only the last {self.max_positions - h.shape[time_dim]}"
            )

    def forward(
        self,
        h: Tensor,
        mem: Optional[Tensor] = None,
        hidden: Optional[HiddenState] = None,
    ) -> tuple[Tensor, Optional[Tensor], HiddenState]:
        self._check_inputs(h, mem)
        if self.batch_first:
            h = h.transpose(0, 1)
            mem = None if mem is None else mem.transpose(0, 1)
        p, training = self.dropout, self.training
        # Under autocast the residual stream and the memory stay in the compute dtype: the
        # LayerNorms write it, so the memory (keys and values) is never cast by the attention,
        # and an incoming memory of another dtype is cast once here, not once for k and once
        # for v.
        dtype = _compute_dtype(h)
        h = _layer_norm(self.lnstart, h, dtype)
        x, new_hidden = self.rnn(h, hidden)
        h = F.dropout(x, p, training)
        new_mem = None
        if self.attn is not None:
            mh = _layer_norm(self.lnmem, h, dtype)
            h = _layer_norm(self.lnmid, h, dtype)
            memory_len = 0 if mem is None else mem.shape[0]
            if memory_len == 0:
                big = mh
            else:
                mem = mem.detach()
                big = torch.cat([mem if dtype is None else mem.to(dtype), mh], 0)
            new_mem = big[-self.max_positions :]
            # The memory is detached: its keys and values need no dK/dV products, and the
            # gradient of the segment's keys and values reaches mh in one piece. big ends in
            # mh by construction, so the functional's check of that (a read and a sync) is
            # skipped.
            attended = self.attn(
                h, big, big, detached_keys=memory_len, segment=mh, _segment_is_tail=True
            )
            h = F.dropout(attended, p, training) + h
        ff_in = _layer_norm(self.lnxff, h, dtype)
        h = _layer_norm(self.lnff, h, dtype)
        h = F.dropout(self.ff(ff_in), p, training) + h
        if self.batch_first:
            h = h.transpose(0, 1)
            new_mem = None if new_mem is None else new_mem.transpose(0, 1)
        return h, new_mem, new_hidden

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, use_attn={self.use_attn}, dropout={self.dropout}, "
            f"max_positions={self.max_positions}, batch_first={self.batch_first}"
        )


_ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


class SHARNN(nn.Module):
    """The SHA-RNN language model (Merity 2019), time-major.

    ``Embedding -> dropout(dropouti) -> nlayers SHALayers (attention in block nlayers - 2) ->
    dropout(dropout)``; ``decoder`` is a ``Linear(ninp, ntoken)`` tied to the embedding.

    Args:
        ntoken: vocabulary size.
        ninp: model width ``E``.
        nhid: the Boom's width ``F``.
        nlayers: number of blocks.
        dropout, dropouth, dropouti: final, in-block and embedding dropout.
        max_positions: the attention sees at most this many keys (memory plus segment).
        tie_weights: share the decoder's weight with the embedding.
        backend: see the module docstring.
        batch_first: token ids ``[B, T]``, ``h`` and logits ``[B, T, ...]`` and memories
            ``[B, M, E]``; the LSTM states stay ``[1, B, E]`` (as ``torch.nn.LSTM``'s do).

    ``forward(x [T, B] token ids, hidden=None, mems=None)`` returns ``(h [T, B, E], new_hidden,
    new_mems)``: ``new_hidden`` one ``(h_n, c_n)`` per block, ``new_mems`` one entry per block
    (``[M, B, E]`` for the attention block, None for the others). Pass both back in with the next
    segment; memories are cut to the last ``max_positions - T`` positions first. Use
    :meth:`logits` or :meth:`loss` for the decoder. Token ids are checked against the vocabulary
    on every call (one device sync); set ``model.check_token_ids = False`` to skip that.
    ``return_h=True`` returns the original code's five results ``(h, new_hidden, new_mems, None,
    None)``. Unlike the original, there is no ``rnn_type`` first argument.

    Example:
        >>> model = SHARNN(256, ninp=32, nhid=128, nlayers=2)
        >>> x = torch.randint(0, 256, (6, 3))
        >>> loss, hidden, mems = model.loss(x[:-1], x[1:])
        >>> loss, hidden, mems = model.loss(x[:-1], x[1:], hidden, mems)
    """

    def __init__(
        self,
        ntoken: int,
        ninp: int = 1024,
        nhid: int = 4096,
        nlayers: int = 4,
        dropout: float = 0.1,
        dropouth: float = 0.1,
        dropouti: float = 0.1,
        max_positions: int = 5000,
        tie_weights: bool = True,
        backend: BackendSpec = None,
        batch_first: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(ntoken, str):
            raise TypeError(
                f"SHARNN takes no rnn_type: the original's SHARNN({ntoken!r}, ntoken, ninp, nhid, "
                f"nlayers, ...) is SHARNN(ntoken, ninp, nhid, nlayers, ...) here (the LSTM is "
                f"the only RNN); the arguments after nlayers differ too: pass them by keyword"
            )
        self.ntoken = _check_positive("ntoken", ntoken)
        self.ninp = _check_positive("ninp", ninp)
        self.nhid = _check_positive("nhid", nhid)
        self.nlayers = _check_positive("nlayers", nlayers)
        self.dropout = SF.check_probability("dropout", dropout)
        self.dropouth = SF.check_probability("dropouth", dropouth)
        self.dropouti = SF.check_probability("dropouti", dropouti)
        self.max_positions = _check_positive("max_positions", max_positions)
        self.backend = _check_backend(backend)
        self.batch_first = bool(batch_first)
        # Check every call's token ids against the vocabulary. It reads the ids' range back to
        # the host (one device sync per call); a caller whose ids are valid by construction may
        # turn it off.
        self.check_token_ids = True
        self.encoder = nn.Embedding(ntoken, ninp)
        self.blocks = nn.ModuleList(
            SHALayer(
                ninp, nhid, use_attn=(i == nlayers - 2), dropout=dropouth,
                max_positions=max_positions, backend=backend,
            )  # fmt: skip
            for i in range(nlayers)
        )
        self.decoder = nn.Linear(ninp, ntoken)
        if tie_weights:
            self.decoder.weight = self.encoder.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The SHA-RNN init: Linear and Embedding weights normal(0, 0.1/sqrt(E)), biases zero,
        LayerNorm (1, 0), attention gates zero, the LSTM's own default."""
        std = 0.1 / math.sqrt(self.ninp)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, (nn.LayerNorm, LSTM)):
                module.reset_parameters()
            elif isinstance(module, SingleHeadAttention):
                for p in (module.qs, module.ks, module.vs, module.qkvs):
                    nn.init.zeros_(p)

    def _check_tokens(self, x: Tensor) -> None:
        layout = "[B, T]" if self.batch_first else "[T, B]"
        if not isinstance(x, Tensor) or x.dim() != 2:
            raise ValueError(f"x must be a {layout} tensor of token ids; got {SF.describe(x)}")
        if x.dtype not in _ID_DTYPES:
            raise TypeError(f"x must hold integer token ids; got dtype {x.dtype}")
        if x.shape[0] < 1 or x.shape[1] < 1:
            raise ValueError(f"x must have T >= 1 and B >= 1; got {list(x.shape)}")
        steps = x.shape[1 if self.batch_first else 0]
        if steps > self.max_positions:
            raise ValueError(f"x has T = {steps} positions > max_positions = {self.max_positions}")
        self._check_id_range("x", x)

    def _check_id_range(self, name: str, ids: Tensor) -> None:
        if not self.check_token_ids or _is_compiling():
            return  # the range check syncs with the device and would split the graph
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.ntoken:
            bad = low if low < 0 else high
            raise ValueError(
                f"{name} holds token id {bad} outside the vocabulary [0, {self.ntoken})"
            )

    @contextlib.contextmanager
    def _time_major(self):
        """Within the block, ``forward`` takes and returns the time-major layout whatever
        ``batch_first`` says (for code that drives the model step by step, as generation)."""
        batch_first, self.batch_first = self.batch_first, False
        try:
            yield self
        finally:
            self.batch_first = batch_first

    def forward(
        self,
        x: Tensor,
        hidden: Optional[list] = None,
        mems: Optional[list] = None,
        return_h: bool = False,
    ) -> tuple:
        self._check_tokens(x)
        if self.batch_first:  # the blocks run time-major: views, no copies
            x = x.t()
        steps = x.shape[0]
        if hidden is not None and len(hidden) != self.nlayers:
            raise ValueError(f"hidden must hold {self.nlayers} states; got {len(hidden)}")
        if mems is not None and len(mems) == 0:
            mems = None
        if mems is not None:
            self._check_mems(mems)
            if self.batch_first:
                mems = [m.transpose(0, 1) if isinstance(m, Tensor) else m for m in mems]
            mems = [self._cut_memory(m, self.max_positions - steps) for m in mems]
        h = F.dropout(self.encoder(x.long()), self.dropouti, self.training)
        new_hidden, new_mems = [], []
        for i, block in enumerate(self.blocks):
            mem = mems[i] if mems is not None else None
            h, m, nh = block(h, mem, None if hidden is None else hidden[i])
            new_hidden.append(nh)
            new_mems.append(m)
        h = F.dropout(h, self.dropout, self.training)
        if self.batch_first:
            h = h.transpose(0, 1)
            new_mems = [None if m is None else m.transpose(0, 1) for m in new_mems]
        if return_h:  # the original's 5-result form; its last two were always None
            return h, new_hidden, new_mems, None, None
        return h, new_hidden, new_mems

    def _check_mems(self, mems) -> None:
        """Each entry None, ``[]`` (the original's marker for no memory) or a ``[M, B, E]``
        tensor, and a tensor only for the block with attention."""
        if not isinstance(mems, (list, tuple)):
            raise TypeError(
                f"mems must be a list of {self.nlayers} entries (None or [M, B, E] tensors); "
                f"got {type(mems).__name__}"
            )
        if len(mems) != self.nlayers:
            raise ValueError(f"mems must hold {self.nlayers} entries; got {len(mems)}")
        for i, (m, block) in enumerate(zip(mems, self.blocks)):
            if m is None or (isinstance(m, list) and len(m) == 0):
                continue
            if not isinstance(m, Tensor):
                raise TypeError(
                    f"mems[{i}] must be None or a [M, B, E] tensor; got {type(m).__name__}"
                )
            if not block.use_attn and m.numel() > 0:
                attn = [j for j, b in enumerate(self.blocks) if b.use_attn]
                raise ValueError(
                    f"mems[{i}] is a {SF.describe(m)} tensor but block {i} has no attention "
                    f"(only block(s) {attn} do): pass None there"
                )
            if m.dim() != 3:
                raise ValueError(f"mems[{i}] must be a [M, B, E] tensor; got {SF.describe(m)}")

    @staticmethod
    def _cut_memory(mem, keep: int) -> Optional[Tensor]:
        """The last ``keep`` positions of a block's memory; None when there are none (the
        original marked blocks without memory with ``[]``)."""
        if mem is None or isinstance(mem, list):
            return None
        mem = mem[max(0, mem.shape[0] - keep) :]
        return mem if mem.shape[0] > 0 else None

    def logits(
        self, x: Tensor, hidden: Optional[list] = None, mems: Optional[list] = None
    ) -> tuple[Tensor, list, list]:
        """``(decoder(h) [T, B, ntoken], new_hidden, new_mems)``."""
        h, new_hidden, new_mems = self(x, hidden, mems)
        return self.decoder(h), new_hidden, new_mems

    def loss(
        self,
        x: Tensor,
        targets: Tensor,
        hidden: Optional[list] = None,
        mems: Optional[list] = None,
    ) -> tuple[Tensor, list, list]:
        """Mean cross-entropy (nats) of ``targets`` (x's shape): ``(loss, new_hidden,
        new_mems)``."""
        if not isinstance(targets, Tensor) or targets.shape != x.shape:
            raise ValueError(
                f"targets must have x's shape {SF.describe(x)}; got {SF.describe(targets)}"
            )
        if targets.dtype not in _ID_DTYPES:
            raise TypeError(f"targets must hold integer token ids; got dtype {targets.dtype}")
        self._check_id_range("targets", targets)
        logits, new_hidden, new_mems = self.logits(x, hidden, mems)
        loss = F.cross_entropy(logits.float().reshape(-1, self.ntoken), targets.reshape(-1).long())
        return loss, new_hidden, new_mems

    def generate(
        self,
        prompt_ids,
        length: int,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        segment_len: Optional[int] = None,
        top_p: Optional[float] = None,
    ):
        """Sample ``length`` token ids after ``prompt_ids``: an iterator yielding each id (an
        int) as soon as it is drawn. Each new id is one ``T = 1`` step that carries the LSTM
        states and the attention memory. See :func:`sha_rnn_kernels.sampling.generate`.

        Example:
            >>> g = torch.Generator().manual_seed(0)
            >>> ids = list(model.generate(list(b"Hello"), 20, top_k=5, generator=g))
        """
        from .sampling import generate

        return generate(
            self, prompt_ids, length, temperature=temperature, top_k=top_k,
            generator=generator, segment_len=segment_len, top_p=top_p,
        )  # fmt: skip

    def save_pretrained(self, directory: str) -> None:
        """Write ``directory/config.json`` (every constructor argument) and
        ``directory/model.safetensors``; see :mod:`sha_rnn_kernels.pretrained`."""
        from .pretrained import save_pretrained

        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(
        cls, directory: str, device=None, dtype: Optional[torch.dtype] = None, backend=None
    ) -> SHARNN:
        """The model :meth:`save_pretrained` wrote to ``directory``, in eval mode (no network,
        no code from the folder runs). Raises ``CheckpointError`` saying what is wrong."""
        from .pretrained import from_pretrained

        return from_pretrained(cls, directory, device=device, dtype=dtype, backend=backend)[0]

    def extra_repr(self) -> str:
        return (
            f"ntoken={self.ntoken}, ninp={self.ninp}, nhid={self.nhid}, nlayers={self.nlayers}, "
            f"max_positions={self.max_positions}"
            + (", batch_first=True" if self.batch_first else "")
        )
