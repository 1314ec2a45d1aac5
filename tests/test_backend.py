"""Backend arguments: one name or a per-op mapping, "cuda" everywhere, the environment variable,
the modules and the trainer's --backend (sha_rnn_kernels/_backend.py, dispatch.py)."""

import pytest
import torch

import sha_rnn_kernels.functional as SF
from sha_rnn_kernels import LSTM, SHARNN, BackendUnavailableError, Boom, SHALayer, _backend
from sha_rnn_kernels import SingleHeadAttention as Attention


@pytest.mark.parametrize(
    "value, expected",
    [
        ("cuda", "cuda"),
        (" Triton ", "triton"),
        ("lstm=cuda,attention=triton", {"lstm": "cuda", "attention": "triton"}),
        ("LSTM = cuda , boom=TRITON,", {"lstm": "cuda", "boom": "triton"}),
        ({"lstm": "cuda", "attention": "triton", "boom": "triton"},
         {"lstm": "cuda", "attention": "triton", "boom": "triton"}),
        ({}, {}),
        (None, None),
    ],
)  # fmt: skip
def test_parse_backend_accepts_names_and_mappings(value, expected):
    assert _backend.parse_backend(value) == expected


@pytest.mark.parametrize(
    "value, message",
    [
        ("fastest", "backend must be one of .*got 'fastest'"),
        ({"lstm": "cudnn"}, "backend\\['lstm'\\] must be one of .*got 'cudnn'"),
        ({"rnn": "cuda"}, "unknown op 'rnn'; the ops are \\('lstm', 'attention', 'boom'\\)"),
        ("lstm=cuda,lstm=torch", "op 'lstm' is given twice"),
        ("lstm=cuda,triton", "'triton' is not of the form op=backend"),
        (3, "got int 3"),
        ({"lstm": None}, "backend\\['lstm'\\] must be one of .*got None"),
    ],
)
def test_parse_backend_rejects_bad_values_naming_them(value, message):
    with pytest.raises(ValueError, match=message):
        _backend.parse_backend(value)


def test_backend_for_each_op_and_format():
    spec = {"lstm": "cuda"}
    assert _backend.backend_for("lstm", spec) == "cuda"
    assert _backend.backend_for("boom", spec) == "auto"  # left out: auto
    assert _backend.backend_for("attention", "triton") == "triton"
    assert _backend.format_backend({"boom": "triton", "lstm": "cuda"}) == "lstm=cuda,boom=triton"
    assert _backend.format_backend(None) == "auto"
    assert _backend.format_backend("CUDA") == "cuda"


def test_environment_variable_may_hold_a_mapping(monkeypatch):
    monkeypatch.setenv("SHA_RNN_KERNELS_BACKEND", "lstm=reference,boom=reference")
    assert _backend.default_backend() == {"lstm": "reference", "boom": "reference"}
    assert _backend.backend_for("lstm", None) == "reference"
    assert _backend.backend_for("attention", None) == "auto"
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    w_ih, w_hh = torch.randn(20, 4, dtype=torch.float64), torch.randn(20, 5, dtype=torch.float64)
    out, _ = SF.lstm(x, w_ih, w_hh)  # reference, from the environment
    torch.testing.assert_close(out, SF.lstm(x, w_ih, w_hh, backend="reference")[0])
    monkeypatch.setenv("SHA_RNN_KERNELS_BACKEND", "lstm=fast")
    with pytest.raises(ValueError, match="from the environment variable SHA_RNN_KERNELS_BACKEND"):
        SF.lstm(x, w_ih, w_hh)


def test_functional_takes_its_own_entry_of_a_mapping():
    x, w = torch.randn(3, 8), torch.randn(16, 8)
    # The LSTM's entry cannot run on CPU tensors, but boom only reads its own.
    out = SF.boom(x, w, backend={"lstm": "cuda", "boom": "reference"})
    torch.testing.assert_close(out, SF.boom(x, w, backend="reference"))
    with pytest.raises(BackendUnavailableError, match="lstm: backend='cuda' cannot run"):
        SF.lstm(torch.randn(3, 2, 4), torch.randn(20, 4), torch.randn(20, 5),
                backend={"lstm": "cuda", "boom": "reference"})  # fmt: skip


def test_cuda_on_cpu_tensors_raises_naming_why(monkeypatch):
    # A module with backend="cuda" on CPU tensors: the LSTM needs CUDA tensors ...
    lstm = LSTM(4, 8, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="lstm: backend='cuda' cannot run: .*CUDA"):
        lstm(torch.randn(3, 2, 4))
    # ... and Boom and attention run their Triton kernels for "cuda", which need CUDA tensors
    # unless the interpreter is on (turned off only after the modules imported their kernels).
    boom = Boom(8, 16, backend="cuda")
    attn = Attention(8, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError,
                       match="boom: backend='cuda' \\(the Triton kernel: boom has no CUDA C\\+\\+ "
                             "kernel\\) cannot run: Triton kernels need CUDA tensors"):  # fmt: skip
        boom(torch.randn(3, 8))
    with pytest.raises(BackendUnavailableError, match="single_head_attention: backend='cuda'"):
        attn(torch.randn(3, 2, 8), torch.randn(5, 2, 8))


def test_no_module_rejects_cuda_or_a_mapping():
    mapping = {"lstm": "cuda", "attention": "triton", "boom": "triton"}
    for backend in ("cuda", mapping, "lstm=cuda,attention=triton"):
        model = SHARNN(16, ninp=8, nhid=16, nlayers=2, backend=backend)
        layer = SHALayer(8, 16, use_attn=True, backend=backend)
        for module in (Boom(8, backend=backend), Attention(8, backend=backend),
                       LSTM(8, 8, backend=backend), layer, model):  # fmt: skip
            assert module.backend == _backend.parse_backend(backend)
    assert "backend={'lstm': 'cuda'}" in repr(LSTM(4, 4, backend="lstm=cuda"))
    with pytest.raises(ValueError, match="unknown op 'ffn'"):
        SHARNN(16, ninp=8, nhid=16, nlayers=2, backend={"ffn": "triton"})
    with pytest.raises(ValueError, match="backend\\['boom'\\] must be one of"):
        Boom(8, backend="boom=fast")


def test_cuda_routes_boom_and_attention_to_triton(device, monkeypatch):
    """Under the interpreter (or on a GPU), "cuda" for Boom and attention runs their Triton
    kernels: the Triton entry points are called and the results match the reference."""
    from sha_rnn_kernels.ops import attention as attention_ops
    from sha_rnn_kernels.ops import boom as boom_ops

    calls = []

    def spy(name, fn):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(boom_ops, "boom", spy("boom", boom_ops.boom))
    monkeypatch.setattr(attention_ops, "attention", spy("attention", attention_ops.attention))
    torch.manual_seed(1)
    layer = SHALayer(16, 40, use_attn=True, backend="reference").eval().to(device)
    mapping = {"lstm": "torch", "boom": "cuda", "attention": "cuda"}
    mapped = SHALayer(16, 40, use_attn=True, backend=mapping).eval().to(device)
    mapped.load_state_dict(layer.state_dict())
    x, mem = torch.randn(3, 2, 16, device=device), torch.randn(4, 2, 16, device=device)
    expected, _, _ = layer(x, mem)
    got, _, _ = mapped(x, mem)
    assert calls == ["attention", "boom"]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_select_cuda_means_triton_only_without_a_cuda_kernel(monkeypatch):
    from sha_rnn_kernels import dispatch

    x, w = torch.randn(3, 8), torch.randn(16, 8)
    monkeypatch.setitem(dispatch.CONSTRAINTS, ("boom", "triton"), ())
    assert dispatch.select("boom", "cuda", x, w, None) == "triton"
    assert dispatch.select("boom", "torch", x, w, None) == "reference"
    lstm_in = (torch.randn(3, 2, 4), torch.randn(20, 4), torch.randn(20, 5))
    monkeypatch.setitem(dispatch.CONSTRAINTS, ("lstm", "cuda"), ())
    assert dispatch.select("lstm", "cuda", *lstm_in) == "cuda"
    assert dispatch.select("lstm", "auto", *lstm_in) == "torch"  # CPU tensors: torch.lstm


def test_trainer_backend_flag():
    from sha_rnn_kernels.train import build_parser

    parser = build_parser()
    assert parser.parse_args(["--backend", "cuda"]).backend == "cuda"
    parsed = parser.parse_args(["--backend", "attention=triton, lstm=cuda"]).backend
    assert parsed == "lstm=cuda,attention=triton"
    assert SHARNN(16, ninp=8, nhid=16, nlayers=2, backend=parsed).backend == {
        "lstm": "cuda", "attention": "triton"}  # fmt: skip
    with pytest.raises(SystemExit):
        parser.parse_args(["--backend", "lstm=cudnn"])
