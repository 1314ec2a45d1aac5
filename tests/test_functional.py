"""Argument validation and backend dispatch of sha_rnn_kernels.functional."""

import pytest
import torch

import sha_rnn_kernels.functional as SF
from sha_rnn_kernels import BackendUnavailableError, _backend, reference


def test_boom_validation_names_the_argument():
    x, w = torch.randn(3, 8), torch.randn(16, 8)
    with pytest.raises(ValueError, match="weight must be \\[F, E\\] with E = x.shape\\[-1\\] = 8"):
        SF.boom(x, torch.randn(16, 7))
    with pytest.raises(ValueError, match="F = 4 must be >= E = 8"):
        SF.boom(x, torch.randn(4, 8))
    with pytest.raises(ValueError, match="bias must be \\[F\\] = \\[16\\]"):
        SF.boom(x, w, torch.randn(15))
    with pytest.raises(TypeError, match="x must be float16, bfloat16, float32 or float64"):
        SF.boom(x.long(), w)
    with pytest.raises(TypeError, match="weight has dtype torch.float64 but x has torch.float32"):
        SF.boom(x, w.double())
    with pytest.raises(ValueError, match="dropout must be a float in \\[0, 1\\)"):
        SF.boom(x, w, dropout=1.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        SF.boom(x, w, backend="fastest")
    with pytest.raises(ValueError, match="backend\\['boom'\\] must be one of"):
        SF.boom(x, w, backend={"boom": "fastest"})
    # "torch" means PyTorch's own ops: the reference for an op without a fused torch version
    torch.testing.assert_close(SF.boom(x, w, backend="torch"), SF.boom(x, w, backend="reference"))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        SF.boom([1.0], w)
    with pytest.raises(ValueError, match="on meta but x is on cpu"):
        SF.boom(x, w.to("meta"))


def test_attention_validation_names_the_argument():
    q, kv = torch.randn(4, 2, 8), torch.randn(6, 2, 8)
    with pytest.raises(ValueError, match="K >= T"):
        SF.single_head_attention(q, kv[:3], kv[:3])
    with pytest.raises(ValueError, match="k and v must have one shape"):
        SF.single_head_attention(q, kv, kv[:5])
    with pytest.raises(ValueError, match="k must be \\[K, B, E\\] with B = 2, E = 8"):
        SF.single_head_attention(q, torch.randn(6, 3, 8), torch.randn(6, 3, 8))
    with pytest.raises(ValueError, match="k must be \\[B, K, E\\]"):
        SF.single_head_attention(q, torch.randn(3, 6, 8), torch.randn(3, 6, 8), batch_first=True)
    with pytest.raises(ValueError, match="q must have 3 dimensions"):
        SF.single_head_attention(q[0], kv, kv)
    with pytest.raises(ValueError, match="key_gate must have E = 8 elements"):
        SF.single_head_attention(q, kv, kv, key_gate=torch.rand(7))
    with pytest.raises(ValueError, match="value_dropout"):
        SF.single_head_attention(q, kv, kv, value_dropout=-0.1)
    with pytest.raises(TypeError, match="v has dtype torch.float16"):
        SF.single_head_attention(q, kv, kv.half())


def test_lstm_validation_names_the_argument():
    x, wi, wh = torch.randn(5, 2, 3), torch.randn(16, 3), torch.randn(16, 4)
    with pytest.raises(ValueError, match="weight_hh must be \\[4H, H\\]"):
        SF.lstm(x, wi, torch.randn(15, 4))
    with pytest.raises(ValueError, match="weight_ih must be \\[4H, I\\] = \\[16, 3\\]"):
        SF.lstm(x, torch.randn(16, 5), wh)
    with pytest.raises(ValueError, match="bias_hh must be \\[4H\\] = \\[16\\]"):
        SF.lstm(x, wi, wh, torch.randn(16), torch.randn(12))
    with pytest.raises(ValueError, match="h0\\) must be .* with B = 2, H = 4"):
        SF.lstm(x, wi, wh, state=(torch.randn(3, 4), torch.randn(2, 4)))
    with pytest.raises(TypeError, match="state must be a pair"):
        SF.lstm(x, wi, wh, state=torch.randn(2, 4))
    with pytest.raises(ValueError, match="T >= 1 and B >= 1"):
        SF.lstm(x[:0], wi, wh)
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        SF.lstm(x[0], wi, wh)


def test_explicit_backend_that_cannot_run_raises(device):
    x, wi, wh = torch.randn(5, 2, 3), torch.randn(16, 3), torch.randn(16, 4)
    with pytest.raises(BackendUnavailableError, match="backend='cuda' cannot run"):
        SF.lstm(x, wi, wh, backend="cuda")
    # float64 is never a kernel dtype
    x64, w64 = torch.randn(3, 8, dtype=torch.float64), torch.randn(16, 8, dtype=torch.float64)
    with pytest.raises(BackendUnavailableError, match="float64"):
        SF.boom(x64.to(device), w64.to(device), backend="triton")


def test_auto_falls_back_to_the_reference_and_warns_once(monkeypatch):
    from sha_rnn_kernels import dispatch

    _backend._warned.clear()
    monkeypatch.setattr(dispatch, "AUTO_DEVICES", ("cuda", "cpu"))  # CPU tensors as CUDA ones
    monkeypatch.setitem(dispatch.CONSTRAINTS, ("boom", "triton"),
                        (lambda *t: "E=13 is not a multiple of 8",))  # fmt: skip
    x, w = torch.randn(3, 13), torch.randn(26, 13)
    with pytest.warns(RuntimeWarning, match="uses the PyTorch reference .*E=13 is not a multiple"):
        assert dispatch.select("boom", "auto", x, w, None) == "reference"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.select("boom", "auto", x, w, None) == "reference"
        SF.boom(x, w)
    monkeypatch.setattr(dispatch, "AUTO_DEVICES", ("cuda",))
    monkeypatch.setitem(dispatch.CONSTRAINTS, ("boom", "triton"), ())
    assert dispatch.select("boom", "auto", x, w, None) == "reference"  # CPU: the reference


def test_environment_variable_sets_the_default(monkeypatch):
    monkeypatch.setenv("SHA_RNN_KERNELS_BACKEND", "reference")
    assert _backend.default_backend() == "reference"
    monkeypatch.setenv("SHA_RNN_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SHA_RNN_KERNELS_BACKEND must be one of"):
        SF.boom(torch.randn(2, 4), torch.randn(8, 4))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_lstm_backends_agree_and_return_torch_shapes(backend):
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    wi, wh = torch.randn(28, 5, dtype=torch.float64), torch.randn(28, 7, dtype=torch.float64)
    b1, b2 = torch.randn(28, dtype=torch.float64), torch.randn(28, dtype=torch.float64)
    h0, c0 = torch.randn(3, 7, dtype=torch.float64), torch.randn(1, 3, 7, dtype=torch.float64)
    out, (h, c) = SF.lstm(x, wi, wh, b1, b2, (h0, c0), backend=backend)
    ref, rh, rc = reference.lstm(x, wi, wh, b1, b2, h0, c0[0])
    assert out.shape == (6, 3, 7) and h.shape == c.shape == (1, 3, 7)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(h[0], rh)
    torch.testing.assert_close(c[0], rc)
    out_bf, _ = SF.lstm(x.transpose(0, 1), wi, wh, b1, b2, (h0, c0), batch_first=True,
                        backend=backend)  # fmt: skip
    torch.testing.assert_close(out_bf.transpose(0, 1), ref)
    # one bias only
    out1, _ = SF.lstm(x, wi, wh, b1, None, backend=backend)
    torch.testing.assert_close(out1, reference.lstm(x, wi, wh, b1, None)[0])


def test_autocast_runs_the_ops_in_the_autocast_dtype():
    x, w = torch.randn(3, 8), torch.randn(16, 8)
    q, kv = torch.randn(4, 2, 8), torch.randn(6, 2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert SF.boom(x, w).dtype == torch.bfloat16
        assert SF.single_head_attention(q, kv, kv, key_gate=torch.rand(8)).dtype == torch.bfloat16
        out, (h, c) = SF.lstm(torch.randn(5, 2, 3), torch.randn(16, 3), torch.randn(16, 4))
        assert out.dtype == h.dtype == torch.bfloat16


def test_attention_batch_first_equals_time_major():
    q, k, v = torch.randn(4, 2, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    a = SF.single_head_attention(q, k, v, backend="reference")
    b = SF.single_head_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                 batch_first=True, backend="reference")  # fmt: skip
    torch.testing.assert_close(b.transpose(0, 1), a)


def test_triton_backend_through_the_public_api_matches_the_reference(device):
    """functional -> ops dispatch, end to end (the kernels' parity tests are in test_<op>.py)."""
    torch.set_default_device(device)
    try:
        _dispatch_round_trip()
    finally:
        # None removes the default-device mode; "cpu" would leave it active for later tests.
        torch.set_default_device(None)


def _dispatch_round_trip():
    x, w, b = torch.randn(5, 16), torch.randn(40, 16), torch.randn(40)
    torch.testing.assert_close(
        SF.boom(x, w, b, backend="triton"), SF.boom(x, w, b, backend="reference"),
        atol=1e-5, rtol=1e-5,
    )  # fmt: skip
    q, k, v, g = torch.randn(3, 2, 16), torch.randn(7, 2, 16), torch.randn(7, 2, 16), torch.rand(16)
    for batch_first in (False, True):
        args = (q, k, v) if not batch_first else tuple(t.transpose(0, 1) for t in (q, k, v))
        got = SF.single_head_attention(*args, key_gate=g, value_gate=g, batch_first=batch_first,
                                       backend="triton")  # fmt: skip
        ref = SF.single_head_attention(*args, key_gate=g, value_gate=g, batch_first=batch_first,
                                       backend="reference")  # fmt: skip
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    xs, wi, wh = torch.randn(4, 2, 6), torch.randn(32, 6), torch.randn(32, 8)
    state = (torch.randn(1, 2, 8), torch.randn(1, 2, 8))
    got, (h, c) = SF.lstm(xs, wi, wh, None, None, state, backend="triton")
    ref, (rh, rc) = SF.lstm(xs, wi, wh, None, None, state, backend="reference")
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close((h, c), (rh, rc), atol=1e-5, rtol=1e-5)


def test_a_layer_on_the_triton_backend_matches_the_reference(device):
    from sha_rnn_kernels import SHALayer

    torch.manual_seed(3)
    ref = SHALayer(16, 40, use_attn=True, backend="reference").eval().to(device)
    tri = SHALayer(16, 40, use_attn=True, backend="triton").eval().to(device)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(3, 2, 16, device=device, requires_grad=True)
    mem = torch.randn(4, 2, 16, device=device)
    out_r, mem_r, _ = ref(x, mem)
    out_t, mem_t, _ = tri(x, mem)
    torch.testing.assert_close(out_t, out_r, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mem_t, mem_r)
    (g_r,) = torch.autograd.grad(out_r.square().sum(), x)
    (g_t,) = torch.autograd.grad(out_t.square().sum(), x)
    torch.testing.assert_close(g_t, g_r, atol=1e-4, rtol=1e-4)


def test_bf16_kernels_need_an_ampere_gpu(monkeypatch):
    from sha_rnn_kernels.ops import _common

    gpu = torch.device("cuda", 0)  # a device object only; the capability look-up is replaced
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_common, "_cuda_capability", lambda index: (7, 5))
    assert "compute capability >= 8.0; cuda:0 has 7.5" in _common.capability_reason(
        gpu, torch.bfloat16
    )
    assert _common.capability_reason(gpu, torch.float16) is None
    monkeypatch.setattr(_common, "_cuda_capability", lambda index: (9, 0))
    assert _common.capability_reason(gpu, torch.bfloat16) is None


_COMPILE_SCRIPT = """
import torch
from sha_rnn_kernels import SHALayer
torch.manual_seed(0)
# A per-op mapping, with "cuda" (= Triton) for the attention, traces like one name.
backend = {"lstm": "triton", "attention": "cuda", "boom": "triton"}
layer = SHALayer(16, 40, use_attn=True, backend=backend).eval()
x, mem = torch.randn(3, 2, 16, requires_grad=True), torch.randn(4, 2, 16)
compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
out, new_mem, _ = compiled(x, mem)
ref, _, _ = layer(x, mem)
out.sum().backward()
assert x.grad is not None and torch.isfinite(x.grad).all()
print("max_diff", (out - ref).abs().max().item())
"""


def test_compiling_a_fresh_layer_on_triton_keeps_one_graph():
    """In a new interpreter (no op file imported yet) a whole SHALayer compiles with
    fullgraph=True: the modules import their Triton files when built, not inside the graph."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert float(result.stdout.split("max_diff")[1]) < 1e-5
