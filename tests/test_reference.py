"""The pure-PyTorch reference against torch.nn.LSTM and straightforward float64 formulas."""

import math

import pytest
import torch

from sha_rnn_kernels import reference
from sha_rnn_kernels.testing import assert_parity


def naive_attention(q, k, v, key_gate=None, value_gate=None):
    """Row by row, in float64, straight from the model's definition (README.md, "The model")."""
    T, B, E = q.shape
    K = k.shape[0]
    out = torch.empty(T, B, E, dtype=torch.float64)
    kk = k.double() * (1 if key_gate is None else key_gate.double())
    vv = v.double() * (1 if value_gate is None else value_gate.double())
    for b in range(B):
        for i in range(T):
            visible = i + (K - T) + 1  # keys 0 .. i + K - T
            s = torch.stack([q[i, b].double() @ kk[j, b] for j in range(visible)]) / math.sqrt(E)
            p = torch.exp(s - s.max())
            p = p / p.sum()
            out[i, b] = (p[:, None] * vv[:visible, b]).sum(0)
    return out


@pytest.mark.parametrize("T,M,B,E", [(1, 0, 1, 8), (5, 0, 2, 12), (4, 7, 3, 16)])
def test_attention_matches_row_by_row_formula(T, M, B, E):
    q, k, v = torch.randn(T, B, E), torch.randn(M + T, B, E), torch.randn(M + T, B, E)
    kg, vg = torch.rand(E), torch.rand(E)
    got = reference.single_head_attention(
        q.double(), k.double(), v.double(), key_gate=kg.double(), value_gate=vg.double()
    )
    assert_parity("attention", got, naive_attention(q, k, v, kg, vg), atol=1e-12)


@pytest.mark.parametrize("T,K", [(1, 1), (3, 3), (3, 10), (7, 20), (16, 16)])
def test_mask_every_row_sees_itself_and_the_memory(T, K):
    mask = reference.causal_memory_mask(T, K, torch.device("cpu"), torch.float32)
    visible = torch.isfinite(mask)
    for i in range(T):
        expected = torch.arange(K) <= i + K - T
        assert torch.equal(visible[i], expected), f"row {i}: {visible[i].tolist()}"
    assert visible.sum(1).min() >= 1  # no row is fully masked when K >= T


@pytest.mark.parametrize("E,F", [(8, 32), (10, 25), (6, 6)])
def test_boom_matches_chunk_formula(E, F):
    x, w, b = torch.randn(3, 2, E), torch.randn(F, E), torch.randn(F)
    u = x.double() @ w.double().t() + b.double()
    u = u * torch.sigmoid(1.702 * u)
    expected = sum(u[..., c * E : (c + 1) * E] for c in range(F // E))
    got = reference.boom(x.double(), w.double(), b.double())
    assert_parity("boom", got, expected, atol=1e-12)


@pytest.mark.parametrize("T,B,I,H", [(1, 1, 4, 5), (6, 3, 7, 5), (9, 2, 8, 8)])
@pytest.mark.parametrize("with_state", [False, True])
def test_lstm_matches_torch_lstm(T, B, I, H, with_state):
    ref = torch.nn.LSTM(I, H)
    x = torch.randn(T, B, I)
    state = (torch.randn(1, B, H), torch.randn(1, B, H)) if with_state else None
    out, (h, c) = ref(x, state)
    args = [ref.weight_ih_l0, ref.weight_hh_l0, ref.bias_ih_l0, ref.bias_hh_l0]
    h0, c0 = (state[0][0], state[1][0]) if with_state else (None, None)
    got, gh, gc = reference.lstm(x, *args, h0, c0)
    assert_parity("out", got, out.detach(), atol=2e-6)
    assert_parity("h_n", gh, h[0].detach(), atol=2e-6)
    assert_parity("c_n", gc, c[0].detach(), atol=2e-6)
    got, gh, gc = reference.lstm_torch(x, *args, h0, c0)
    assert_parity("torch out", got, out.detach(), atol=1e-6)


def test_gelu_is_the_sigmoid_approximation():
    x = torch.linspace(-5, 5, 101, dtype=torch.float64)
    assert torch.allclose(reference.gelu(x), x / (1 + torch.exp(-1.702 * x)))


def test_reference_ops_pass_gradcheck():
    d = torch.float64
    q = torch.randn(3, 2, 4, dtype=d, requires_grad=True)
    k = torch.randn(5, 2, 4, dtype=d, requires_grad=True)
    v = torch.randn(5, 2, 4, dtype=d, requires_grad=True)
    g = torch.rand(4, dtype=d, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *a: reference.single_head_attention(*a[:3], key_gate=a[3], value_gate=a[3]),
        (q, k, v, g),
    )
    x = torch.randn(3, 4, dtype=d, requires_grad=True)
    w = torch.randn(9, 4, dtype=d, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: reference.boom(x, w, None), (x, w))
