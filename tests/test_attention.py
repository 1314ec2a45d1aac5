"""Tests of sha_rnn_kernels/ops/attention.py: single-head attention over a memory cache
(cuBLAS products and fused Triton row passes).

Parity against float64 (forward, dQ, dK, dV, d key_gate, d value_gate) on odd shapes, in one
chunk and with the query chunking forced by a tiny score budget; the causal mask with its memory
offset; a NaN in a future key (kernel and reference); dropout masks recovered from the kernel and
checked between forward and backward, identical when chunked, reproducible from the seed;
strided and batch-first inputs, strided and expanded gates, autocast; ``detached_keys`` (the
memory's keys and values get an exactly zero gradient, everything else as on
``cat([k[:n].detach(), k[n:]])``, chunked or not, with dropout; SHALayer passes its memory
length); the query blocks that skip the masked triangle; and GPU-only checks at the paper's
shape (parity, peak memory against the eager reference, device guard).
"""

import math

import pytest
import torch

from sha_rnn_kernels.testing import assert_parity


@pytest.fixture(scope="module")
def ops():
    # Imported here, not at collection: triton.jit reads TRITON_INTERPRET when kernels are defined.
    from sha_rnn_kernels.ops import attention

    return attention


def _time_major(length: int, batch: int, width: int, dtype, device) -> torch.Tensor:
    """A non-contiguous [length, batch, width] tensor (batch-major storage, padded rows)."""
    storage = torch.randn(batch, length, width + 3, device=device).to(dtype)
    return storage[..., :width].transpose(0, 1)


def _gated_inputs(seq_len, key_len, batch, width, device, dtype=torch.float32, strided=True):
    """(q, k, v, key_gate, value_gate): non-contiguous time-major tensors and sigmoid gates, or
    (``strided=False``) contiguous ones and uniform gates."""
    if strided:
        def make(length):
            return _time_major(length, batch, width, dtype, device)

        def gate():
            return torch.sigmoid(torch.randn(width, device=device)).to(dtype)
    else:
        def make(length):
            return torch.randn(length, batch, width, device=device).to(dtype)

        def gate():
            return torch.rand(width, device=device).to(dtype)
    return make(seq_len), make(key_len), make(key_len), gate(), gate()


def _visible(seq_len: int, key_len: int, device=None) -> torch.Tensor:
    """[T, K] bool: query i sees key j iff j <= i + K - T."""
    rows = torch.arange(seq_len, device=device)[:, None]
    cols = torch.arange(key_len, device=device)[None, :]
    return cols <= rows + (key_len - seq_len)


def reference(q, k, v, key_gate=None, value_gate=None, attn_keep=None, value_keep=None,
              dropout_p=0.0, value_dropout_p=0.0, detached_keys=0):
    """The issue's formula in the inputs' dtype; attn_keep [B, T, K], value_keep [K, B, E];
    the first detached_keys keys and values are detached."""
    seq_len, _, width = q.shape
    key_len = k.shape[0]
    k = torch.cat([k[:detached_keys].detach(), k[detached_keys:]])
    v = torch.cat([v[:detached_keys].detach(), v[detached_keys:]])
    k_eff = k * key_gate if key_gate is not None else k
    v_eff = v * value_gate if value_gate is not None else v
    if value_keep is not None:
        v_eff = v_eff * value_keep.to(v_eff.dtype) / (1.0 - value_dropout_p)
    scores = torch.einsum("tbe,kbe->btk", q, k_eff) / math.sqrt(width)
    scores = scores.masked_fill(~_visible(seq_len, key_len, q.device), float("-inf"))
    probs = scores.softmax(-1)
    if attn_keep is not None:
        probs = probs * attn_keep.to(probs.dtype) / (1.0 - dropout_p)
    return torch.einsum("btk,kbe->tbe", probs, v_eff)


def _kernel_and_grads(ops, inputs, grad_out, **kwargs):
    q, k, v, key_gate, value_gate = inputs
    leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
    out = ops.attention(*leaves[:3], key_gate=leaves[3], value_gate=leaves[4], **kwargs)
    wrt = [t for t in leaves if t is not None]
    return out.detach(), torch.autograd.grad(out, wrt, grad_out)


def _reference_and_grads(inputs, grad_out, dtype, **kwargs):
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in inputs]
    out = reference(*leaves, **kwargs)
    wrt = [t for t in leaves if t is not None]
    return out.detach(), torch.autograd.grad(out, wrt, grad_out.to(dtype))


def _grad_names(key_gate, value_gate):
    return ["dq", "dk", "dv"] + (["d key_gate"] if key_gate is not None else []) + (
        ["d value_gate"] if value_gate is not None else []
    )


PARITY_CASES = [
    # (T, memory, E, B, gates, dtype)
    (7, 0, 32, 1, False, torch.float32),
    (7, 5, 48, 2, True, torch.float32),
    (7, 13, 80, 3, True, torch.float32),
    (7, 13, 48, 2, False, torch.float32),
    (1, 0, 40, 2, True, torch.float32),
    (1, 6, 24, 1, True, torch.float32),
    (7, 5, 80, 2, True, torch.bfloat16),
    (7, 0, 32, 2, False, torch.bfloat16),
    (7, 13, 48, 3, True, torch.float16),
]


def _check_parity(ops, device, seq_len, memory_len, width, batch, gates, dtype):
    key_len = seq_len + memory_len
    q = _time_major(seq_len, batch, width, dtype, device)
    k = _time_major(key_len, batch, width, dtype, device)
    v = _time_major(key_len, batch, width, dtype, device)
    key_gate = torch.sigmoid(torch.randn(width, device=device)).to(dtype) if gates else None
    value_gate = torch.sigmoid(torch.randn(width, device=device)).to(dtype) if gates else None
    assert not k.is_contiguous() and (q.numel() == width or not q.is_contiguous())
    inputs = (q, k, v, key_gate, value_gate)
    grad_out = torch.randn(seq_len, batch, width, device=device).to(dtype)
    kwargs = dict(dropout_p=0.0, value_dropout_p=0.0, seed=0)

    out, grads = _kernel_and_grads(ops, inputs, grad_out, **kwargs)
    out64, grads64 = _reference_and_grads(inputs, grad_out, torch.float64)
    lowp_out, lowp_grads = (None, [None] * len(grads))
    if dtype != torch.float32:
        lowp_out, lowp_grads = _reference_and_grads(inputs, grad_out, dtype)

    assert_parity("out", out, out64, lowp=lowp_out, dtype=dtype)
    for name, got, want, lowp in zip(_grad_names(key_gate, value_gate), grads, grads64, lowp_grads):
        assert_parity(name, got, want, lowp=lowp, dtype=dtype)


@pytest.mark.parametrize("seq_len,memory_len,width,batch,gates,dtype", PARITY_CASES)
def test_parity(ops, device, seq_len, memory_len, width, batch, gates, dtype):
    _check_parity(ops, device, seq_len, memory_len, width, batch, gates, dtype)


def _force_chunks(ops, monkeypatch, batch, seq_len, key_len, dtype, rows=2):
    """Lower the score budget so that chunks hold ``rows`` queries; returns the plan."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    # Score rows are stored with a stride of key_len rounded up to 16 (ops._pad).
    monkeypatch.setattr(ops, "SCORE_BUDGET_BYTES", batch * rows * ops._pad(key_len) * itemsize)
    plan = ops._plan(batch, seq_len, key_len, dtype)
    assert len(plan) == math.ceil(seq_len / rows), plan
    return plan


CHUNKED_CASES = [
    # (T, memory, E, B, gates, dtype): the chunked path recomputes S and accumulates dk, dv.
    (7, 5, 40, 2, True, torch.float32),
    (5, 0, 24, 3, False, torch.float32),
    (7, 13, 48, 2, True, torch.bfloat16),
]


@pytest.mark.parametrize("seq_len,memory_len,width,batch,gates,dtype", CHUNKED_CASES)
def test_parity_chunked(ops, device, monkeypatch, seq_len, memory_len, width, batch, gates, dtype):
    _force_chunks(ops, monkeypatch, batch, seq_len, seq_len + memory_len, dtype)
    _check_parity(ops, device, seq_len, memory_len, width, batch, gates, dtype)


def test_chunked_path_equals_one_chunk(ops, device, monkeypatch):
    """With both dropouts and gates, chunking the queries changes neither the masks (Philox on
    global indices) nor, beyond fp32 rounding, any result; and it really saves no scores."""
    seq_len, memory_len, batch, width = 9, 6, 2, 40
    key_len = seq_len + memory_len
    inputs = _gated_inputs(seq_len, key_len, batch, width, device)
    grad_out = torch.randn(seq_len, batch, width, device=device)
    kwargs = dict(dropout_p=0.3, value_dropout_p=0.2, seed=99)
    out, grads = _kernel_and_grads(ops, inputs, grad_out, **kwargs)
    saved = ops._attention_fwd_op(*inputs, 0.3, 0.2, 99, 0)
    assert saved[2].shape == (batch, seq_len, ops._pad(key_len))  # one chunk: S or P is saved

    _force_chunks(ops, monkeypatch, batch, seq_len, key_len, torch.float32, rows=4)
    saved = ops._attention_fwd_op(*inputs, 0.3, 0.2, 99, 0)
    assert saved[2].numel() == 0 and saved[3].numel() == 0  # chunked: only the LSE is saved
    out_c, grads_c = _kernel_and_grads(ops, inputs, grad_out, **kwargs)
    assert_parity("out", out_c, out.double(), atol=1e-6)
    for name, a, b in zip(_grad_names(*inputs[3:]), grads_c, grads):
        assert_parity(name, a, b.double(), atol=1e-6)
    keep = _recover_attention_keep(ops, seq_len, key_len, batch, 0.3, 99, device)
    monkeypatch.undo()
    assert torch.equal(keep, _recover_attention_keep(ops, seq_len, key_len, batch, 0.3, 99, device))


@pytest.mark.parametrize("chunked", [False, True])
def test_nan_in_future_key_stays_out_of_earlier_rows(ops, device, monkeypatch, chunked):
    """Query i never sees key memory + i + 1 on: a NaN there must not reach rows <= i, in the
    op (forward and its row pass) and in reference.single_head_attention alike."""
    from sha_rnn_kernels import reference as ref

    seq_len, memory_len, batch, width = 6, 4, 2, 16
    key_len = seq_len + memory_len
    if chunked:
        _force_chunks(ops, monkeypatch, batch, seq_len, key_len, torch.float32)
    q = torch.randn(seq_len, batch, width, device=device)
    k = torch.randn(key_len, batch, width, device=device)
    v = torch.randn(key_len, batch, width, device=device)
    gate = torch.rand(width, device=device)
    poisoned_key = memory_len + 3  # seen by queries 3, 4, 5 only
    k_nan = k.clone()
    k_nan[poisoned_key, 1] = float("nan")
    kwargs = dict(key_gate=gate, value_gate=gate, dropout_p=0.0, value_dropout_p=0.0, seed=0)
    clean = ops.attention(q, k, v, **kwargs)
    dirty = ops.attention(q, k_nan, v, **kwargs)
    ref_clean = ref.single_head_attention(q, k, v, key_gate=gate, value_gate=gate)
    ref_dirty = ref.single_head_attention(q, k_nan, v, key_gate=gate, value_gate=gate)
    for name, a, b in (("kernel", dirty, clean), ("reference", ref_dirty, ref_clean)):
        assert torch.equal(a[:3], b[:3]), f"{name}: rows before the NaN key changed"
        assert torch.equal(a[:, 0], b[:, 0]), f"{name}: another batch changed"
        assert torch.isnan(a[3:, 1]).all(), f"{name}: rows that see the NaN key must be NaN"


def test_batch_first_strided_and_expanded_gates(device):
    """Through functional: batch-first inputs, a strided key gate and an expanded value gate
    (the op makes both contiguous); gate gradients reach their storage."""
    import sha_rnn_kernels.functional as SF

    seq_len, memory_len, batch, width = 5, 6, 3, 24
    key_len = seq_len + memory_len
    q = torch.randn(batch, seq_len, width, device=device)
    k = torch.randn(batch, key_len, width, device=device)
    v = torch.randn(batch, key_len, width, device=device)
    key_storage = torch.rand(2 * width, device=device)
    value_scalar = torch.rand(1, device=device)
    grad_out = torch.randn(batch, seq_len, width, device=device)

    def run(backend, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v, key_storage, value_scalar)]
        out = SF.single_head_attention(
            *leaves[:3], batch_first=True, backend=backend, key_gate=leaves[3][::2],
            value_gate=leaves[4].expand(width),
        )
        return out, torch.autograd.grad(out, leaves, grad_out.to(dtype))

    out, grads = run("triton", torch.float32)
    out64, grads64 = run("reference", torch.float64)
    assert out.shape == (batch, seq_len, width)
    assert_parity("out", out, out64)
    names = ["dq", "dk", "dv", "d key storage", "d value scalar"]
    for name, got, want in zip(names, grads, grads64):
        assert_parity(name, got, want)


def test_autocast_does_not_reach_the_products(ops, device):
    """An active autocast must not turn the op's fp32 products into bf16 ones."""
    q, k, v = (torch.randn(n, 2, 16, device=device) for n in (4, 9, 9))
    kwargs = dict(key_gate=None, value_gate=None, dropout_p=0.0, value_dropout_p=0.0, seed=0)
    plain = ops.attention(q, k, v, **kwargs)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        under = ops.attention(q, k, v, **kwargs)
    assert under.dtype == torch.float32 and torch.equal(under, plain)


def test_reachable_keys_never_zero():
    """With K >= T, query i sees keys 0..i+K-T: at least one key per row (no fully masked row)."""
    for seq_len in range(1, 41):
        for key_len in range(seq_len, seq_len + 41):
            counts = _visible(seq_len, key_len).sum(1)
            expected = torch.arange(seq_len) + (key_len - seq_len) + 1
            assert torch.equal(counts, expected), (seq_len, key_len)
            assert int(counts.min()) >= 1, (seq_len, key_len)


def _attention_weights(ops, q, k, **kwargs):
    """Read the kernel's (dropped) attention weights [B, T, K]: values are one-hot keys."""
    key_len, batch, _ = k.shape
    width = q.shape[2]
    v = torch.zeros(key_len, batch, width, dtype=q.dtype, device=q.device)
    v[torch.arange(key_len), :, torch.arange(key_len)] = 1.0
    out = ops.attention(q, k, v, key_gate=None, value_gate=None, value_dropout_p=0.0, **kwargs)
    return out[:, :, :key_len].permute(1, 0, 2)


@pytest.mark.parametrize("seq_len,key_len", [(1, 1), (7, 7), (5, 9), (3, 20), (16, 17)])
def test_weights_follow_causal_mask(ops, device, seq_len, key_len):
    width = max(16, 8 * math.ceil(key_len / 8))
    q = torch.randn(seq_len, 2, width, device=device)
    k = torch.randn(key_len, 2, width, device=device)
    weights = _attention_weights(ops, q, k, dropout_p=0.0, seed=0)
    assert torch.isfinite(weights).all()
    visible = _visible(seq_len, key_len, device).expand_as(weights)
    assert torch.equal(weights != 0, visible), "non-zero weights must be exactly the visible keys"
    assert_parity("row sums", weights.sum(-1), torch.ones(2, seq_len, dtype=torch.float64))
    probs64 = reference(q.double(), k.double(), torch.eye(key_len, width, dtype=torch.float64,
                        device=device)[:, None, :].expand(key_len, 2, width))
    assert_parity("weights", weights, probs64[:, :, :key_len].permute(1, 0, 2))


def test_first_row_sees_only_its_own_key(ops, device):
    """memory 0: query 0 sees key 0 alone, so its output is exactly the gated value 0."""
    seq_len, batch, width = 7, 3, 40
    q = torch.randn(seq_len, batch, width, device=device)
    k = torch.randn(seq_len, batch, width, device=device)
    v = torch.randn(seq_len, batch, width, device=device)
    value_gate = torch.rand(width, device=device)
    out = ops.attention(q, k, v, key_gate=torch.rand(width, device=device), value_gate=value_gate,
                        dropout_p=0.0, value_dropout_p=0.0, seed=0)
    assert torch.isfinite(out).all()
    assert_parity("out[0]", out[0], (v[0] * value_gate).double())


def _recover_attention_keep(ops, seq_len, key_len, batch, dropout_p, seed, device):
    """The attention-weight keep mask [B, T, K] of ``seed``, read from the forward pass."""
    width = max(16, 8 * math.ceil(key_len / 8))
    q = torch.randn(seq_len, batch, width, device=device)
    k = torch.randn(key_len, batch, width, device=device)
    weights = _attention_weights(ops, q, k, dropout_p=dropout_p, seed=seed)
    keep = weights != 0
    eye = torch.eye(key_len, width, dtype=torch.float64, device=device)
    probs64 = reference(q.double(), k.double(), eye[:, None, :].expand(key_len, batch, width))
    expected = probs64[:, :, :key_len].permute(1, 0, 2) * keep / (1.0 - dropout_p)
    assert_parity("dropped weights", weights, expected)
    return keep


def _recover_value_keep(ops, seq_len, key_len, batch, width, value_dropout_p, seed, device):
    """The value keep mask [K, B, E] of ``seed``, read from dV of the backward pass (dO = 1)."""
    q = torch.randn(seq_len, batch, width, device=device)
    k = torch.randn(key_len, batch, width, device=device)
    v = torch.randn(key_len, batch, width, device=device, requires_grad=True)
    out = ops.attention(q, k, v, key_gate=None, value_gate=None, dropout_p=0.0,
                        value_dropout_p=value_dropout_p, seed=seed)
    (dv,) = torch.autograd.grad(out.sum(), v)
    keep = dv != 0
    # Every key is visible to the last query, so its probability column sum is positive.
    probs = reference(q.double(), k.double(),
                      torch.eye(key_len, dtype=torch.float64, device=device)[:, None, :]
                      .expand(key_len, batch, key_len))
    column_sums = probs.sum(0).transpose(0, 1)[:, :, None]  # [K, B, 1]
    assert_parity("dv", dv, column_sums * keep / (1.0 - value_dropout_p))
    return keep


def test_dropout_masks_shared_by_forward_and_backward(ops, device):
    """Masks read from the forward (attention) and the backward (values) reproduce, through the
    float64 formula, both the output and every gradient of a run with both dropouts and gates."""
    seq_len, memory_len, batch, width = 7, 5, 2, 24
    key_len = seq_len + memory_len
    dropout_p, value_dropout_p, seed = 0.3, 0.25, 1234
    attn_keep = _recover_attention_keep(ops, seq_len, key_len, batch, dropout_p, seed, device)
    value_keep = _recover_value_keep(
        ops, seq_len, key_len, batch, width, value_dropout_p, seed, device
    )
    visible = _visible(seq_len, key_len, device).expand_as(attn_keep)
    assert 0 < int((attn_keep & visible).sum()) < int(visible.sum())
    assert 0 < int(value_keep.sum()) < value_keep.numel()

    inputs = _gated_inputs(seq_len, key_len, batch, width, device)
    grad_out = torch.randn(seq_len, batch, width, device=device)
    out, grads = _kernel_and_grads(ops, inputs, grad_out, dropout_p=dropout_p,
                                   value_dropout_p=value_dropout_p, seed=seed)
    out64, grads64 = _reference_and_grads(
        inputs, grad_out, torch.float64, attn_keep=attn_keep, value_keep=value_keep,
        dropout_p=dropout_p, value_dropout_p=value_dropout_p,
    )
    assert_parity("out", out, out64)
    for name, got, want in zip(_grad_names(*inputs[3:]), grads, grads64):
        assert_parity(name, got, want)


def test_one_buffer_path_skips_the_masked_block_triangle(ops, device):
    """The saved [B, T, pad(K)] scores and probabilities are written block by block, each block
    of queries only up to the last key it can see (rounded up to 16 columns, the row passes'
    vectors): the masked corners above the blocks stay unwritten (NaN in tests), so no product
    reads them; the paper shape gets 4 blocks of 256 queries, rows padded from 5000 to 5008."""
    assert ops._triangle_blocks(1024, 5000) == [
        (0, 256, 4232), (256, 512, 4488), (512, 768, 4744), (768, 1024, 5000)
    ]
    assert ops._pad(5000) == 5008 and ops._pad(4232) == 4240 and ops._pad(16) == 16
    seq_len, memory_len, batch, width = 64, 3, 2, 16
    key_len = seq_len + memory_len
    blocks = ops._triangle_blocks(seq_len, key_len)
    assert blocks == [(0, 16, 19), (16, 32, 35), (32, 48, 51), (48, 64, 67)]
    q = torch.randn(seq_len, batch, width, device=device)
    k = torch.randn(key_len, batch, width, device=device)
    for dropout_p in (0.1, 0.0):  # (raw S, P_d) saved, or P written over S
        saved = ops._attention_fwd_op(q, k, k, None, None, dropout_p, 0.0, 3, 0)
        assert saved[2].shape == (batch, seq_len, 80)
        for probs in saved[2:4] if dropout_p else saved[2:3]:
            for t0, t1, cols in blocks:
                assert torch.isfinite(probs[:, t0:t1, :cols]).all()
                assert torch.isnan(probs[:, t0:t1, ops._pad(cols):]).all()


# detached_keys n: none, part of the memory, the memory (K - T), memory and part of the segment
# (a chunk of 3 queries then sees only detached keys), every key. T = 7, memory 6, K = 13.
DETACHED_KEYS = [0, 4, 6, 9, 13]


# (chunked, dropout, dtype) of the detached-keys and segment parity tests.
MEMORY_GRADIENT_CASES = [
    (False, False, torch.float32),
    (True, False, torch.float32),
    (False, True, torch.float32),
    (True, True, torch.float32),
    (False, False, torch.bfloat16),
    (False, True, torch.bfloat16),
]


def _memory_dropout(ops, device, seq_len, key_len, batch, width, dropout):
    """(p, p_v, seed, reference masks kwargs) of the memory-gradient tests: both dropouts with
    their masks read back from the kernel, or none."""
    if not dropout:
        return 0.0, 0.0, 0, {}
    p, pv, seed = 0.3, 0.25, 77
    masks = dict(
        attn_keep=_recover_attention_keep(ops, seq_len, key_len, batch, p, seed, device),
        value_keep=_recover_value_keep(ops, seq_len, key_len, batch, width, pv, seed, device),
        dropout_p=p, value_dropout_p=pv,
    )
    return p, pv, seed, masks


@pytest.mark.parametrize("chunked,dropout,dtype", MEMORY_GRADIENT_CASES)
def test_detached_keys_parity(ops, device, monkeypatch, chunked, dropout, dtype):
    """``detached_keys=n`` equals the float64 formula on ``cat([k[:n].detach(), k[n:]])`` (and
    the same for v): the output, dq, the gate gradients (the key gate multiplies the detached
    keys too and still gets their share through the scores, the value gate through the output)
    and dk, dv, whose first n rows are exactly zero (NaN-poisoned buffers: they are written).
    In one chunk and chunked, with both dropouts (masks read back from the kernel) and without."""
    seq_len, memory_len, batch, width = 7, 6, 2, 40
    key_len = seq_len + memory_len
    p, pv, seed, masks = _memory_dropout(ops, device, seq_len, key_len, batch, width, dropout)
    if chunked:
        plan = _force_chunks(ops, monkeypatch, batch, seq_len, key_len, dtype, rows=3)
        assert [cols for _, _, cols in plan] == [9, 12, 13]
    inputs = _gated_inputs(seq_len, key_len, batch, width, device, dtype)
    grad_out = torch.randn(seq_len, batch, width, device=device).to(dtype)
    for n in DETACHED_KEYS:
        out, grads = _kernel_and_grads(ops, inputs, grad_out, dropout_p=p, value_dropout_p=pv,
                                       seed=seed, detached_keys=n)
        out64, grads64 = _reference_and_grads(inputs, grad_out, torch.float64, detached_keys=n,
                                              **masks)
        lowp_out, lowp_grads = None, [None] * len(grads)
        if dtype != torch.float32:
            lowp_out, lowp_grads = _reference_and_grads(inputs, grad_out, dtype, detached_keys=n,
                                                       **masks)
        assert_parity(f"out (n={n})", out, out64, lowp=lowp_out, dtype=dtype)
        names = _grad_names(*inputs[3:])
        for name, got, want, lowp in zip(names, grads, grads64, lowp_grads):
            assert_parity(f"{name} (n={n})", got, want, lowp=lowp, dtype=dtype)
        for name, grad in (("dk", grads[1]), ("dv", grads[2])):
            assert torch.equal(grad[:n], torch.zeros_like(grad[:n])), f"{name}[:{n}] not zero"
            if n < key_len:
                assert grad[n:].abs().amax(dim=(1, 2)).min() > 0, f"{name}[{n}:] has a zero row"


def test_detached_keys_change_only_dk_dv(ops, device):
    """Detaching keys leaves the output, dq and both gate gradients bit for bit as they were
    (they never depend on dk, dv), and dk, dv past the detached rows equal up to the rounding of
    differently shaped products."""
    seq_len, memory_len, batch, width = 5, 8, 3, 24
    key_len = seq_len + memory_len
    inputs = _gated_inputs(seq_len, key_len, batch, width, device, strided=False)
    grad_out = torch.randn(seq_len, batch, width, device=device)
    kwargs = dict(dropout_p=0.2, value_dropout_p=0.3, seed=5)
    out, grads = _kernel_and_grads(ops, inputs, grad_out, **kwargs)
    out_d, grads_d = _kernel_and_grads(ops, inputs, grad_out, detached_keys=memory_len, **kwargs)
    assert torch.equal(out, out_d)
    for name, a, b in zip(_grad_names(*inputs[3:]), grads, grads_d):
        if name in ("dk", "dv"):
            assert_parity(name, b[memory_len:], a[memory_len:].double(), atol=1e-6)
        else:
            assert torch.equal(a, b), name


@pytest.mark.parametrize("chunked,dropout,dtype", MEMORY_GRADIENT_CASES)
def test_segment_gradient_parity(ops, device, monkeypatch, chunked, dropout, dtype):
    """``segment=`` (k = v = cat([memory, segment]), ``detached_keys = n``): the output, dq,
    the gate gradients and the segment's gradient (dk + dv of keys n.., one tensor) equal the
    float64 formula on ``cat([kv[:n].detach(), segment])``; kv itself gets no gradient. n is
    the memory length (the SHA-RNN), 0 (no memory) or past it (part of the segment detached too).
    In one chunk (dk accumulated onto dv by the GEMM) and chunked, with both dropouts (masks
    read back from the kernel) and without."""
    seq_len, memory_len, batch, width = 7, 6, 2, 40
    key_len = seq_len + memory_len
    p, pv, seed, masks = _memory_dropout(ops, device, seq_len, key_len, batch, width, dropout)
    if chunked:
        _force_chunks(ops, monkeypatch, batch, seq_len, key_len, dtype, rows=3)
    q, kv, _, key_gate, value_gate = _gated_inputs(seq_len, key_len, batch, width, device, dtype)
    grad_out = torch.randn(seq_len, batch, width, device=device).to(dtype)
    for n in (memory_len, 0, 9):
        leaves = [t.detach().requires_grad_() for t in (q, kv[n:], key_gate, value_gate)]
        q_l, segment, kg, vg = leaves
        full = torch.cat([kv[:n], segment]).detach().requires_grad_()  # the op must not use it
        out = ops.attention(q_l, full, full, key_gate=kg, value_gate=vg, dropout_p=p,
                            value_dropout_p=pv, seed=seed, detached_keys=n, segment=segment)
        grads = torch.autograd.grad(out, leaves + [full], grad_out, allow_unused=True)
        assert grads[-1] is None, "kv got a gradient"

        out64, grads64 = _segment_reference(leaves, kv[:n], grad_out, torch.float64, n, masks)
        # The 2x rule of the other low-precision tests: the same formula run in the kernel's
        # dtype gives PyTorch's own error, and the kernel may be off by at most twice that.
        lowp_out, lowp_grads = None, [None] * len(grads64)
        if dtype != torch.float32:
            lowp_out, lowp_grads = _segment_reference(leaves, kv[:n], grad_out, dtype, n, masks)
        assert_parity(f"out (n={n})", out, out64, lowp=lowp_out, dtype=dtype)
        names = ["dq", "d segment", "d key_gate", "d value_gate"]
        for name, got, want, lowp in zip(names, grads, grads64, lowp_grads):
            assert got.shape == want.shape, name
            assert_parity(f"{name} (n={n})", got, want, lowp=lowp, dtype=dtype)


def _segment_reference(leaves, memory, grad_out, dtype, n, masks):
    """The formula on ``cat([memory, segment])`` in ``dtype``: the output and the gradients of
    the leaves (q, segment, key gate, value gate)."""
    ref_leaves = [t.detach().to(dtype).requires_grad_() for t in leaves]
    kv_ref = torch.cat([memory.to(dtype), ref_leaves[1]])
    out = reference(ref_leaves[0], kv_ref, kv_ref, ref_leaves[2], ref_leaves[3],
                    detached_keys=n, **masks)
    return out.detach(), torch.autograd.grad(out, ref_leaves, grad_out.to(dtype))


def test_segment_errors(ops, device):
    """``segment`` needs k and v to be one tensor and the shape of ``k[n:]``: errors name it, in
    the op and in the functional (both backends)."""
    import sha_rnn_kernels.functional as SF

    q, kv = torch.randn(5, 2, 8, device=device), torch.randn(13, 2, 8, device=device)
    other = kv.clone()
    kwargs = dict(key_gate=None, value_gate=None, dropout_p=0.0, value_dropout_p=0.0, seed=0)
    with pytest.raises(ValueError, match="segment needs k and v to be one tensor"):
        ops.attention(q, kv, other, detached_keys=8, segment=kv[8:], **kwargs)
    with pytest.raises(ValueError, match=r"segment must be \[K - detached_keys, B, E\]"):
        ops.attention(q, kv, kv, detached_keys=8, segment=kv[7:], **kwargs)
    with pytest.raises(ValueError, match="segment must match k's dtype"):
        ops.attention(q, kv, kv, detached_keys=8, segment=kv[8:].double(), **kwargs)
    for backend in ("reference", "triton"):
        with pytest.raises(ValueError, match="segment needs k and v to be one tensor"):
            SF.single_head_attention(q, kv, other, detached_keys=8, segment=kv[8:],
                                     backend=backend)
        with pytest.raises(ValueError, match=r"segment must be \[K - detached_keys, B, E\]"):
            SF.single_head_attention(q, kv, kv, detached_keys=8, segment=kv[6:], backend=backend)
        with pytest.raises(ValueError, match=r"segment must be \[B, K - detached_keys, E\]"):
            kv_bf = kv.transpose(0, 1)
            SF.single_head_attention(q.transpose(0, 1), kv_bf, kv_bf, detached_keys=8,
                                     segment=kv_bf[:, 6:], batch_first=True, backend=backend)


def test_segment_batch_first_matches_reference_backend(device):
    """The functional's ``segment`` with ``batch_first``: Triton and the reference backend give
    the same output and the same gradients for q and the segment."""
    import sha_rnn_kernels.functional as SF

    seq_len, memory_len, batch, width = 5, 4, 3, 16
    memory = torch.randn(batch, memory_len, width, device=device)
    q0 = torch.randn(batch, seq_len, width, device=device)
    seg0 = torch.randn(batch, seq_len, width, device=device)
    results = []
    for backend in ("triton", "reference"):
        q, segment = q0.clone().requires_grad_(), seg0.clone().requires_grad_()
        kv = torch.cat([memory, segment], 1)
        out = SF.single_head_attention(q, kv, kv, batch_first=True, backend=backend,
                                       detached_keys=memory_len, segment=segment)
        results.append((out, *torch.autograd.grad(out.square().sum(), [q, segment])))
    for name, got, want in zip(["out", "dq", "d segment"], *results):
        assert got.shape == want.shape, name
        assert_parity(name, got, want.double(), atol=1e-5)


@pytest.mark.parametrize("bad", [-1, 14, 2.0, True, None])
def test_detached_keys_must_be_an_int_in_range(ops, device, bad):
    import sha_rnn_kernels.functional as SF

    q, kv = torch.randn(5, 2, 8, device=device), torch.randn(13, 2, 8, device=device)
    for backend in ("reference", "triton"):
        with pytest.raises(ValueError, match=r"detached_keys must be an int in \[0, K = 13\]"):
            SF.single_head_attention(q, kv, kv, backend=backend, detached_keys=bad)
    if isinstance(bad, int) and not isinstance(bad, bool):
        with pytest.raises(ValueError, match="detached_keys"):
            ops.attention(q, kv, kv, key_gate=None, value_gate=None, dropout_p=0.0,
                          value_dropout_p=0.0, seed=0, detached_keys=bad)


def test_shalayer_detaches_its_memory_keys(device, monkeypatch):
    """SHALayer passes ``detached_keys = memory length`` to its attention, and its output and
    every gradient (input, LSTM, LayerNorms, q projection, the gates qs, ks, vs and vq) match
    the all-reference layer in float64 with the Triton attention in float32."""
    import copy

    import sha_rnn_kernels.functional as SF
    from sha_rnn_kernels import SHALayer

    seq_len, memory_len, batch, width = 5, 7, 2, 24
    layer = SHALayer(width, use_attn=True, backend="reference").to(device)
    with torch.no_grad():
        for gate in (layer.attn.qs, layer.attn.ks, layer.attn.vs):
            gate.normal_()
    layer64 = copy.deepcopy(layer).double()
    layer.attn.backend = "triton"
    h = torch.randn(seq_len, batch, width, device=device)
    mem = torch.randn(memory_len, batch, width, device=device)
    grad_h = torch.randn(seq_len, batch, width, device=device)

    seen = []
    attention = SF.single_head_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("detached_keys"))
        assert kwargs.get("segment") is not None  # the gradient goes to mh in one piece
        return attention(*args, **kwargs)

    monkeypatch.setattr(SF, "single_head_attention", spy)

    def run(module, dtype):
        x = h.to(dtype).requires_grad_()
        out, new_mem, _ = module(x, mem.to(dtype))
        params = [p for _, p in module.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(out, [x] + params, grad_h.to(dtype), allow_unused=True)
        names = ["dh"] + [n for n, p in module.named_parameters() if p.requires_grad]
        return out.detach(), new_mem, dict(zip(names, grads))

    out, new_mem, grads = run(layer, torch.float32)
    out64, new_mem64, grads64 = run(layer64, torch.float64)
    assert seen == [memory_len, memory_len]
    assert_parity("out", out, out64)
    assert_parity("new memory", new_mem.detach(), new_mem64.detach())
    for name in ("attn.qs", "attn.ks", "attn.vs", "attn.vq.l1.weight", "attn.q.weight"):
        assert grads[name] is not None and grads[name].abs().max() > 0, name
    for name, want in grads64.items():
        if want is None:
            assert grads[name] is None, name
        else:
            assert_parity(name, grads[name], want)


def _binomial_ok(kept: int, total: int, keep_prob: float) -> bool:
    sigma = math.sqrt(total * keep_prob * (1.0 - keep_prob))
    return abs(kept - total * keep_prob) <= 5.0 * sigma


def test_dropout_statistics(ops, device):
    seq_len, memory_len, batch, width = 16, 48, 4, 64
    key_len = seq_len + memory_len
    dropout_p, value_dropout_p = 0.3, 0.2
    keep_a = _recover_attention_keep(ops, seq_len, key_len, batch, dropout_p, 7, device)
    keep_b = _recover_attention_keep(ops, seq_len, key_len, batch, dropout_p, 8, device)
    visible = _visible(seq_len, key_len, device).expand_as(keep_a)
    total = int(visible.sum())
    for keep in (keep_a, keep_b):
        assert _binomial_ok(int((keep & visible).sum()), total, 1.0 - dropout_p)
    # Two seeds agree on a kept/dropped decision with probability p^2 + (1-p)^2 = 0.58.
    agree = int(((keep_a == keep_b) & visible).sum())
    assert _binomial_ok(agree, total, dropout_p**2 + (1 - dropout_p) ** 2)

    value_keep = _recover_value_keep(
        ops, seq_len, key_len, batch, width, value_dropout_p, 7, device
    )
    assert _binomial_ok(int(value_keep.sum()), value_keep.numel(), 1.0 - value_dropout_p)
    # Neighbouring elements along E and along B are independent draws, not copies.
    assert not torch.equal(value_keep[:, :, 1:], value_keep[:, :, :-1])
    assert not torch.equal(value_keep[:, 1:], value_keep[:, :-1])


def test_seed_reproducibility(ops, device):
    seq_len, memory_len, batch, width = 7, 13, 2, 48
    key_len = seq_len + memory_len
    inputs = _gated_inputs(seq_len, key_len, batch, width, device, strided=False)
    grad_out = torch.randn(seq_len, batch, width, device=device)
    runs = [
        _kernel_and_grads(ops, inputs, grad_out, dropout_p=0.2, value_dropout_p=0.1, seed=seed)
        for seed in (11, 11, 12)
    ]
    (out_a, grads_a), (out_b, grads_b), (out_c, _) = runs
    assert torch.equal(out_a, out_b)
    for name, a, b in zip(_grad_names(*inputs[3:]), grads_a, grads_b):
        assert torch.equal(a, b), name  # no atomics anywhere: dq is deterministic too
    assert not torch.equal(out_a, out_c)


def test_unsupported_reason(ops, device):
    q = torch.randn(3, 2, 16, device=device)
    k = torch.randn(5, 2, 16, device=device)
    assert ops.unsupported_reason(q, k, k) is None
    reason = ops.unsupported_reason(q.double(), k.double(), k.double())
    assert reason is not None and "float64" in reason
    reason = ops.unsupported_reason(q[:, :, :0], k[:, :, :0], k[:, :, :0])
    assert reason is not None and "empty" in reason


@pytest.mark.parametrize(
    "chunked,detached_keys,segment",
    [(False, 0, False), (False, 4, False), (True, 6, False), (False, 4, True), (True, 6, True)],
)
def test_custom_op_registration(ops, device, monkeypatch, chunked, detached_keys, segment):
    """Schema, fake (meta) kernel and autograd registration agree with the real kernel, in one
    chunk (P saved) and chunked (only the LSE saved), with and without detached keys, and with
    the gradient routed to a segment tensor."""
    if chunked:
        _force_chunks(ops, monkeypatch, 2, 5, 9, torch.float32)
    q = torch.randn(5, 2, 16, device=device, requires_grad=True)
    k = torch.randn(9, 2, 16, device=device, requires_grad=not segment)
    v = k if segment else torch.randn(9, 2, 16, device=device, requires_grad=True)
    seg = k[detached_keys:].clone().requires_grad_() if segment else None
    gate = torch.rand(16, device=device, requires_grad=True)
    torch.library.opcheck(
        torch.ops.sha_rnn_kernels.attention_fwd.default,
        (q, k, v, gate, None, 0.1, 0.1, 3, detached_keys, seg),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


def test_torch_compile_keeps_the_op_whole(ops, device):
    """fullgraph=True fails on a graph break; the compiled result matches eager bit for bit."""
    leaves = [torch.randn(n, 2, 16, device=device, requires_grad=True) for n in (5, 9, 9)]
    gate = torch.rand(16, device=device, requires_grad=True)

    def run(q, k, v, key_gate):
        return ops.attention(q, k, v, key_gate=key_gate, value_gate=None, dropout_p=0.1,
                             value_dropout_p=0.1, seed=3)

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    out = compiled(*leaves, gate)
    grads = torch.autograd.grad(out.sum(), leaves + [gate])
    out_eager = run(*leaves, gate)
    grads_eager = torch.autograd.grad(out_eager.sum(), leaves + [gate])
    assert torch.equal(out, out_eager)
    for name, a, b in zip(["dq", "dk", "dv", "d key_gate"], grads, grads_eager):
        assert_parity(name, a, b.double(), atol=1e-6)

    # The segment form (k and v one tensor, the gradient to the segment) compiles whole too.
    memory = torch.randn(4, 2, 16, device=device)

    def run_segment(q, segment, key_gate):
        kv = torch.cat([memory, segment])
        return ops.attention(q, kv, kv, key_gate=key_gate, value_gate=None, dropout_p=0.1,
                             value_dropout_p=0.1, seed=3, detached_keys=4, segment=segment)

    segment = leaves[1]
    compiled = torch.compile(run_segment, fullgraph=True, backend="aot_eager")
    out = compiled(leaves[0], segment, gate)
    grads = torch.autograd.grad(out.sum(), [leaves[0], segment, gate])
    out_eager = run_segment(leaves[0], segment, gate)
    grads_eager = torch.autograd.grad(out_eager.sum(), [leaves[0], segment, gate])
    assert torch.equal(out, out_eager)
    for name, a, b in zip(["dq", "d segment", "d key_gate"], grads, grads_eager):
        assert_parity(name, a, b.double(), atol=1e-6)


# ----------------------------------------------------------------------------- GPU only


def _chunked_reference(inputs, grad_out, dtype):
    """The formula batch by batch in ``dtype`` (a full-batch score tensor would not fit)."""
    outs, grads = [], []
    for b in range(inputs[0].shape[1]):
        chunk = [t[:, b : b + 1] for t in inputs[:3]] + list(inputs[3:])
        out, grad = _reference_and_grads(chunk, grad_out[:, b : b + 1], dtype)
        outs.append(out)
        grads.append(grad)
    gate_grads = [sum(g[i] for g in grads) for i in range(3, len(grads[0]))]
    return (
        torch.cat(outs, 1),
        [torch.cat([g[i] for g in grads], 1) for i in range(3)] + gate_grads,
    )


@pytest.mark.gpu
def test_paper_shape_parity_bf16(ops, cuda):
    seq_len, memory_len, batch, width = 1024, 3976, 16, 1024
    key_len = seq_len + memory_len
    dtype = torch.bfloat16
    inputs = (
        torch.randn(seq_len, batch, width, device=cuda, dtype=dtype),
        torch.randn(key_len, batch, width, device=cuda, dtype=dtype),
        torch.randn(key_len, batch, width, device=cuda, dtype=dtype),
        torch.sigmoid(torch.randn(width, device=cuda)).to(dtype),
        torch.sigmoid(torch.randn(width, device=cuda)).to(dtype),
    )
    grad_out = torch.randn(seq_len, batch, width, device=cuda, dtype=dtype)
    out, grads = _kernel_and_grads(ops, inputs, grad_out, dropout_p=0.0, value_dropout_p=0.0,
                                   seed=0)
    out32, grads32 = _chunked_reference(inputs, grad_out, torch.float32)
    lowp_out, lowp_grads = _chunked_reference(inputs, grad_out, dtype)
    assert_parity("out", out, out32, lowp=lowp_out)
    for name, got, want, lowp in zip(_grad_names(*inputs[3:]), grads, grads32, lowp_grads):
        assert_parity(name, got, want, lowp=lowp)


def _peak_extra_bytes(run) -> int:
    """Peak bytes allocated by ``run()`` above what was allocated before it (after a warm-up)."""
    run()  # compile, cuBLAS handles and workspaces outside the measurement
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = run()
    torch.cuda.synchronize()
    del result
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.gpu
def test_peak_memory_below_eager_reference(ops, cuda):
    """Training config, forward + backward: the op keeps P, P_d and the dropped values (about
    three score-sized buffers at its peak); the eager reference keeps fp32 scores and more."""
    from sha_rnn_kernels import reference as ref

    seq_len, memory_len, batch, width = 1024, 3976, 4, 256
    dtype = torch.bfloat16
    leaves = [
        torch.randn(n, batch, width, device=cuda, dtype=dtype, requires_grad=True)
        for n in (seq_len, seq_len + memory_len, seq_len + memory_len)
    ]
    gates = [torch.rand(width, device=cuda, dtype=dtype, requires_grad=True) for _ in range(2)]
    grad_out = torch.randn(seq_len, batch, width, device=cuda, dtype=dtype)

    def kernel():
        out = ops.attention(*leaves, key_gate=gates[0], value_gate=gates[1], dropout_p=0.1,
                            value_dropout_p=0.1, seed=0)
        return torch.autograd.grad(out, leaves + gates, grad_out)

    def eager():
        out = ref.single_head_attention(*leaves, key_gate=gates[0], value_gate=gates[1],
                                        dropout_p=0.1, value_dropout_p=0.1, training=True)
        return torch.autograd.grad(out, leaves + gates, grad_out)

    ours, theirs = _peak_extra_bytes(kernel), _peak_extra_bytes(eager)
    score_bytes = batch * seq_len * (seq_len + memory_len) * 2
    assert ours <= theirs, (ours, theirs)
    assert ours < 5 * score_bytes, (ours, score_bytes)


@pytest.mark.gpu
def test_launches_on_the_inputs_device(ops, cuda):
    """Tensors on cuda:1 while cuda:0 is current: every launch is guarded to the inputs' device."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    device = torch.device("cuda", 1)
    leaves = [torch.randn(n, 2, 40, device=device, requires_grad=True) for n in (7, 12, 12)]
    gate = torch.rand(40, device=device, requires_grad=True)
    with torch.cuda.device(0):
        out = ops.attention(*leaves, key_gate=gate, value_gate=gate, dropout_p=0.1,
                            value_dropout_p=0.1, seed=1)
        grads = torch.autograd.grad(out.sum(), leaves + [gate])
    with torch.cuda.device(1):
        out_ref = ops.attention(*leaves, key_gate=gate, value_gate=gate, dropout_p=0.1,
                                value_dropout_p=0.1, seed=1)
    assert torch.equal(out, out_ref)
    assert all(g.device == device and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_segment_that_is_not_the_tail_of_kv_raises(device, backend):
    """``segment`` must be ``kv[n:]``'s values: another tensor (which would get the keys'
    gradient while the real segment got none) raises, on both backends and batch first; the
    segment kv was built from, its view ``kv[n:]``, and a copy of its values pass, and the
    gradient reaches the segment."""
    import sha_rnn_kernels.functional as SF

    seq_len, memory_len, batch, width = 5, 8, 2, 8
    q = torch.randn(seq_len, batch, width, device=device)
    memory = torch.randn(memory_len, batch, width, device=device)
    segment = torch.randn(seq_len, batch, width, device=device, requires_grad=True)
    kv = torch.cat([memory, segment])
    wrong = torch.randn(seq_len, batch, width, device=device, requires_grad=True)
    for bad in (wrong, segment.detach() + 1e-3, kv[memory_len - 1 : -1]):
        with pytest.raises(ValueError, match=r"must hold the values of k\[detached_keys:\]"):
            SF.single_head_attention(q, kv, kv, detached_keys=memory_len, segment=bad,
                                     backend=backend)
    with pytest.raises(ValueError, match=r"k\[8:\]"):
        kv_bf = kv.transpose(0, 1)
        SF.single_head_attention(q.transpose(0, 1), kv_bf, kv_bf, detached_keys=memory_len,
                                 segment=wrong.transpose(0, 1), batch_first=True, backend=backend)
    assert wrong.grad is None
    out = SF.single_head_attention(q, kv, kv, detached_keys=memory_len, segment=segment,
                                   backend=backend)
    out.sum().backward()
    assert segment.grad is not None and torch.isfinite(segment.grad).all()
    leaf = kv.detach().requires_grad_()
    SF.single_head_attention(q, leaf, leaf, detached_keys=memory_len, segment=leaf[memory_len:],
                             backend=backend)  # the view itself
    nan_segment = segment.detach().clone()
    nan_segment[0, 0, 0] = float("nan")
    kv_nan = torch.cat([memory, nan_segment])
    SF.single_head_attention(q, kv_nan, kv_nan, detached_keys=memory_len,
                             segment=nan_segment.clone(), backend=backend)  # NaN equals itself


def test_segment_check_under_torch_compile(device):
    """Under ``torch.compile(fullgraph=True)`` the check is a device assert (no graph break):
    the right segment compiles and runs, another one stops the call."""
    import sha_rnn_kernels.functional as SF

    memory = torch.randn(4, 2, 8, device=device)
    q = torch.randn(3, 2, 8, device=device)

    def run(q, segment, given):
        kv = torch.cat([memory, segment])
        return SF.single_head_attention(q, kv, kv, detached_keys=4, segment=given,
                                        backend="reference")

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    segment = torch.randn(3, 2, 8, device=device, requires_grad=True)
    out = compiled(q, segment, segment)
    torch.testing.assert_close(out, run(q, segment, segment), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="segment must hold the values"):
        compiled(q, segment, torch.randn(3, 2, 8, device=device, requires_grad=True))
