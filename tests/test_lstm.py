"""Tests of the Triton LSTM (sha_rnn_kernels/ops/lstm.py).

Parity of out, h_n, c_n and of the gradients of x, both weights, both biases, h0 and c0 against
torch.nn.LSTM run in float64 with the same weights (and, once, against a plain float64 loop),
with a loss that uses out, h_n and c_n together. Low precision follows the tolerance rule of
sha_rnn_kernels.testing.assert_parity with torch.nn.LSTM in that dtype as the low-precision
baseline. The GPU tests (paper shape, CUDA graph vs plain launches) need TRITON_INTERPRET=0 and a
CUDA device. The CUDA-graph cache (shape keys, static workspace buffers, jittered lengths) is
also tested on the CPU, with a stand-in graph that replays the recorded launches.
"""

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import pytest
import torch

from sha_rnn_kernels.testing import assert_parity

OUTPUT_NAMES = ("out", "h_n", "c_n")
GRAD_NAMES = ("dx", "dW_ih", "dW_hh", "db_ih", "db_hh", "dh0", "dc0")


def _ops():
    # Imported inside the tests: conftest sets TRITON_INTERPRET before this runs.
    from sha_rnn_kernels.ops import lstm as lstm_ops

    return lstm_ops


@dataclass
class Case:
    """One LSTM problem in float64: weights as torch.nn.LSTM initialises them, random inputs
    and state, and the weights of a loss that uses out, h_n and c_n."""

    x: torch.Tensor
    weight_ih: torch.Tensor
    weight_hh: torch.Tensor
    bias_ih: Optional[torch.Tensor]
    bias_hh: Optional[torch.Tensor]
    h0: Optional[torch.Tensor]
    c0: Optional[torch.Tensor]
    loss_weights: Dict[str, torch.Tensor]


def make_case(T, B, input_size, hidden, bias=True, h0=True, c0=True, uses=OUTPUT_NAMES) -> Case:
    module = torch.nn.LSTM(input_size, hidden, bias=bias).double()
    state = torch.randn(2, B, hidden, dtype=torch.float64) * 0.5
    shapes = {"out": (T, B, hidden), "h_n": (B, hidden), "c_n": (B, hidden)}
    return Case(
        x=torch.randn(T, B, input_size, dtype=torch.float64),
        weight_ih=module.weight_ih_l0.detach().clone(),
        weight_hh=module.weight_hh_l0.detach().clone(),
        bias_ih=module.bias_ih_l0.detach().clone() if bias else None,
        bias_hh=module.bias_hh_l0.detach().clone() if bias else None,
        h0=state[0] if h0 else None,
        c0=state[1] if c0 else None,
        loss_weights={n: torch.randn(*shapes[n], dtype=torch.float64) for n in uses},
    )


def _leaves(case: Case, dtype: torch.dtype, device: torch.device) -> Dict[str, torch.Tensor]:
    names = ("x", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "h0", "c0")
    leaves = {}
    for name in names:
        value = getattr(case, name)
        if value is not None:
            leaves[name] = value.to(device=device, dtype=dtype).detach().clone().requires_grad_()
    return leaves


def _loss_and_grads(case, leaves, outputs) -> Dict[str, torch.Tensor]:
    loss = sum(
        (outputs[name].double() * weight.to(outputs[name].device)).sum()
        for name, weight in case.loss_weights.items()
    )
    loss.backward()
    grad_of = {
        "dx": "x", "dW_ih": "weight_ih", "dW_hh": "weight_hh", "db_ih": "bias_ih",
        "db_hh": "bias_hh", "dh0": "h0", "dc0": "c0",
    }
    results = {name: outputs[name].detach() for name in OUTPUT_NAMES}
    for grad_name, leaf_name in grad_of.items():
        if leaf_name in leaves:
            results[grad_name] = leaves[leaf_name].grad
    return results


def run_torch(case: Case, dtype: torch.dtype, device: torch.device) -> Dict[str, torch.Tensor]:
    """torch.nn.LSTM in ``dtype`` with the case's weights: outputs and gradients."""
    module = torch.nn.LSTM(case.x.shape[2], case.weight_hh.shape[1], bias=case.bias_ih is not None)
    module = module.to(device=device, dtype=dtype)
    leaves = _leaves(case, dtype, device)
    with torch.no_grad():
        module.weight_ih_l0.copy_(case.weight_ih)
        module.weight_hh_l0.copy_(case.weight_hh)
        if case.bias_ih is not None:
            module.bias_ih_l0.copy_(case.bias_ih)
            module.bias_hh_l0.copy_(case.bias_hh)
    # nn.LSTM takes h0 and c0 together; zeros stand in for a missing one (no gradient checked).
    hidden = case.weight_hh.shape[1]
    zeros = torch.zeros(case.x.shape[1], hidden, dtype=dtype, device=device)
    if "h0" in leaves or "c0" in leaves:
        state = (leaves.get("h0", zeros)[None], leaves.get("c0", zeros)[None])
        out, (h_n, c_n) = module(leaves["x"], state)
    else:
        out, (h_n, c_n) = module(leaves["x"])
    results = _loss_and_grads(case, leaves, {"out": out, "h_n": h_n[0], "c_n": c_n[0]})
    results.update(
        dW_ih=module.weight_ih_l0.grad,
        dW_hh=module.weight_hh_l0.grad,
        db_ih=module.bias_ih_l0.grad if case.bias_ih is not None else None,
        db_hh=module.bias_hh_l0.grad if case.bias_ih is not None else None,
    )
    return {name: value for name, value in results.items() if value is not None}


def run_loop64(case: Case) -> Dict[str, torch.Tensor]:
    """The LSTM equations written out as a float64 loop (autograd for the gradients)."""
    leaves = _leaves(case, torch.float64, torch.device("cpu"))
    x, w_ih, w_hh = leaves["x"], leaves["weight_ih"], leaves["weight_hh"]
    B, hidden = x.shape[1], w_hh.shape[1]
    h = leaves.get("h0", torch.zeros(B, hidden, dtype=torch.float64))
    c = leaves.get("c0", torch.zeros(B, hidden, dtype=torch.float64))
    outs = []
    for x_t in x:
        pre = x_t @ w_ih.t() + h @ w_hh.t()
        if "bias_ih" in leaves:
            pre = pre + leaves["bias_ih"] + leaves["bias_hh"]
        i, f, g, o = pre.split(hidden, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return _loss_and_grads(case, leaves, {"out": torch.stack(outs), "h_n": h, "c_n": c})


def run_kernel(
    case: Case,
    dtype: torch.dtype,
    device: torch.device,
    layout: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> Dict[str, torch.Tensor]:
    """The Triton LSTM in ``dtype``. ``layout`` maps each [T, B, I] / [B, H] input to a
    non-contiguous tensor holding the same values (the leaves stay contiguous)."""
    leaves = _leaves(case, dtype, device)
    args = [leaves.get(n) for n in ("x", "weight_ih", "weight_hh", "bias_ih", "bias_hh",
                                    "h0", "c0")]
    if layout is not None:
        args = [a if a is None or i in (1, 2, 3, 4) else layout(a) for i, a in enumerate(args)]
    out, h_n, c_n = _ops().lstm(*args)
    for name, value in (("out", out), ("h_n", h_n), ("c_n", c_n)):
        assert value.dtype == dtype, f"{name} has dtype {value.dtype}, expected {dtype}"
    return _loss_and_grads(case, leaves, {"out": out, "h_n": h_n, "c_n": c_n})


def check_all(actual, expected64, lowp=None, dtype=None) -> None:
    assert set(actual) == set(expected64), f"{sorted(actual)} != {sorted(expected64)}"
    for name in OUTPUT_NAMES + GRAD_NAMES:
        if name in expected64:
            assert_parity(
                name,
                actual[name].cpu(),
                expected64[name].double().cpu(),
                lowp=None if lowp is None else lowp[name].cpu(),
                dtype=dtype,
            )


# ----------------------------------------------------------------------------------------------
# Parity on small odd shapes (the interpreter on CPU, or the GPU with TRITON_INTERPRET=0)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "T, B, input_size, hidden",
    [(1, 1, 16, 20), (6, 3, 24, 40), (11, 2, 40, 24), (6, 2, 20, 16), (2, 67, 16, 20)],
)
def test_lstm_fp32_matches_torch_lstm(device, T, B, input_size, hidden):
    case = make_case(T, B, input_size, hidden)
    check_all(run_kernel(case, torch.float32, device), run_torch(case, torch.float64, device))


def test_lstm_fp32_matches_float64_loop(device):
    case = make_case(6, 3, 20, 24)
    expected = run_loop64(case)
    # The loop is the LSTM of the spec: it agrees with torch.nn.LSTM first.
    check_all(run_torch(case, torch.float64, torch.device("cpu")), expected,
              dtype=torch.float64)
    check_all(run_kernel(case, torch.float32, device), expected)


@pytest.mark.parametrize(
    "h0, c0", [(False, False), (True, False), (False, True)], ids=["none", "h0-only", "c0-only"]
)
def test_lstm_initial_state_missing(device, h0, c0):
    case = make_case(6, 2, 20, 24, h0=h0, c0=c0)
    check_all(run_kernel(case, torch.float32, device), run_torch(case, torch.float64, device))


def test_lstm_without_bias(device):
    case = make_case(6, 3, 24, 20, bias=False)
    check_all(run_kernel(case, torch.float32, device), run_torch(case, torch.float64, device))


def test_lstm_non_contiguous_inputs(device):
    case = make_case(6, 3, 20, 24)

    def strided(t):
        # Same values, every dimension strided: a transposed, every-other-element view.
        wide = torch.empty(*reversed(t.shape), 2, dtype=t.dtype, device=t.device)
        view = wide.permute(*reversed(range(t.dim())), t.dim())[..., 0]
        view.copy_(t)
        assert not view.is_contiguous()
        return view

    check_all(
        run_kernel(case, torch.float32, device, layout=strided),
        run_torch(case, torch.float64, device),
    )


@pytest.mark.parametrize("uses", [("out",), ("h_n",), ("c_n",), ("h_n", "c_n")])
def test_lstm_loss_on_some_outputs(device, uses):
    case = make_case(5, 2, 16, 20, uses=uses)
    check_all(run_kernel(case, torch.float32, device), run_torch(case, torch.float64, device))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("T, B, input_size, hidden", [(6, 3, 20, 24), (11, 2, 40, 24)])
def test_lstm_low_precision(device, dtype, T, B, input_size, hidden):
    case = make_case(T, B, input_size, hidden)
    check_all(
        run_kernel(case, dtype, device),
        run_torch(case, torch.float64, device),
        lowp=run_torch(case, dtype, device),
        dtype=dtype,
    )


def test_lstm_torch_compile_fullgraph(device):
    lstm_ops = _ops()
    case = make_case(4, 2, 16, 24)
    leaves = _leaves(case, torch.float32, device)

    def step(x, w_ih, w_hh, b_ih, b_hh, h0, c0):
        out, h_n, c_n = lstm_ops.lstm(x, w_ih, w_hh, b_ih, b_hh, h0, c0)
        return out.sum() + (h_n * c_n).sum()

    args = [leaves[n] for n in ("x", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "h0", "c0")]
    eager_loss = step(*args)
    eager_grads = torch.autograd.grad(eager_loss, args)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    compiled_loss = compiled(*args)
    compiled_grads = torch.autograd.grad(compiled_loss, args)
    assert_parity("loss", compiled_loss.detach(), eager_loss.detach().double())
    for leaf_name, got, want in zip(("x", "W_ih", "W_hh", "b_ih", "b_hh", "h0", "c0"),
                                    compiled_grads, eager_grads):
        assert_parity(f"d{leaf_name}", got, want.double())


def test_lstm_custom_op_registration(device):
    _ops()  # registers the op
    case = make_case(3, 2, 16, 20)
    leaves = _leaves(case, torch.float32, device)
    args = tuple(leaves[n] for n in ("x", "weight_ih", "weight_hh", "bias_ih", "bias_hh",
                                     "h0", "c0"))
    torch.library.opcheck(
        torch.ops.sha_rnn_kernels.lstm_fwd.default,
        args,
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_unsupported_reason(device, monkeypatch):
    lstm_ops = _ops()
    x = torch.randn(3, 2, 20, device=device)
    w_ih, w_hh = torch.randn(96, 20, device=device), torch.randn(96, 24, device=device)
    assert lstm_ops.unsupported_reason(x, w_ih, w_hh) is None
    reason = lstm_ops.unsupported_reason(x.double(), w_ih.double(), w_hh.double())
    assert reason is not None and "float64" in reason
    reason = lstm_ops.unsupported_reason(x[:0], w_ih, w_hh)
    assert reason is not None and "T=0" in reason
    if device.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        reason = lstm_ops.unsupported_reason(x, w_ih, w_hh)
        assert reason is not None and "cpu" in reason


# ----------------------------------------------------------------------------------------------
# GPU only
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_lstm_paper_shape_gpu(cuda, dtype):
    """T=1024, B=16, 1024 -> 1024: against torch.nn.LSTM in float32 (cuDNN, TF32 off), with
    cuDNN in ``dtype`` as the low-precision baseline."""
    case = make_case(1024, 16, 1024, 1024)
    actual = run_kernel(case, dtype, cuda)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        expected = run_torch(case, torch.float32, cuda)
    lowp = run_torch(case, dtype, cuda)
    check_all(actual, expected, lowp=lowp, dtype=dtype)


@pytest.mark.gpu
def test_lstm_cuda_graph_matches_plain_launches(cuda):
    """The CUDA-graph replay gives bitwise the results of plain launches, also after the
    inputs change in place under the same addresses (a replayed graph reads them anew)."""
    lstm_ops = _ops()
    case = make_case(64, 16, 1024, 1024)
    leaves = _leaves(case, torch.bfloat16, cuda)
    names = ("x", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "h0", "c0")
    args = [leaves[n] for n in names]
    grad_out = torch.randn(64, 16, 1024, device=cuda, dtype=torch.bfloat16)

    def run():
        for leaf in args:
            leaf.grad = None
        out, h_n, c_n = lstm_ops.lstm(*args)
        torch.autograd.backward((out, h_n, c_n), (grad_out, h_n.detach(), c_n.detach()))
        results = [out.detach().clone(), h_n.detach().clone(), c_n.detach().clone()]
        results += [leaf.grad.clone() for leaf in args]
        torch.cuda.synchronize()
        return results

    labels = ("out", "h_n", "c_n") + tuple(f"d{n}" for n in names)
    previous = lstm_ops.set_cuda_graphs(False)
    try:
        plain = run()
        lstm_ops.clear_cuda_graphs()
        lstm_ops.set_cuda_graphs(True, capture_after=0)
        before = lstm_ops.cuda_graph_stats()
        graphed = [run() for _ in range(3)]
        after = lstm_ops.cuda_graph_stats()
        with torch.no_grad():  # new values under the same addresses
            args[0].mul_(-0.5)
            args[2].mul_(1.5)
        changed_graphed = run()
        lstm_ops.set_cuda_graphs(False)
        changed_plain = run()
    finally:
        lstm_ops.set_cuda_graphs(*previous)
        lstm_ops.clear_cuda_graphs()
    assert after["captures"] > before["captures"], (before, after)
    assert after["replays"] > before["replays"], (before, after)
    for results in graphed:
        for label, got, want in zip(labels, results, plain):
            assert torch.equal(got, want), f"{label}: graph replay differs from plain launches"
    for label, got, want in zip(labels, changed_graphed, changed_plain):
        assert torch.equal(got, want), f"{label}: graph replay after in-place change differs"
    assert not torch.equal(changed_plain[0], plain[0])


# ----------------------------------------------------------------------------------------------
# Launch configuration, 32-bit offsets and the CUDA-graph cache (CPU)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "B, expected", [(1, (16, 16, 64, 1)), (16, (16, 16, 64, 1)), (17, (32, 16, 64, 2)),
                    (64, (64, 16, 64, 4)), (200, (64, 16, 64, 4))],
)  # fmt: skip
def test_one_warp_per_16_batch_rows(B, expected):
    for dtype in (torch.bfloat16, torch.float16):
        assert _ops()._blocks(B, dtype) == expected
    assert _ops()._blocks(B, torch.float32) == expected[:3] + (4,)  # FMA dots: no MMA copies


def test_offsets_past_int32_are_guarded():
    lstm_ops = _ops()
    # A [T, B, H] gradient whose hidden dimension is strided past 2^31 elements (a view into
    # a larger buffer) is made contiguous; steps and batch rows are 64-bit in the kernels.
    odd = torch.empty_strided((4, 2, 3), (1, 4, 2**30), device="meta")
    fixed = lstm_ops._int32_safe(odd, (2,))
    assert fixed.is_contiguous() and fixed.shape == odd.shape
    normal = torch.empty(4, 2, 3, device="meta")
    assert lstm_ops._int32_safe(normal, (2,)) is normal
    batch_strided = torch.empty_strided((4, 2, 3), (3, 2**31, 1), device="meta")
    assert lstm_ops._int32_safe(batch_strided, (2,)) is batch_strided  # batch is int64
    assert lstm_ops.size_reason(23170) is None
    reason = lstm_ops.size_reason(23171)
    assert reason is not None and "2^31" in reason and "H=23171" in reason
    x = torch.empty(2, 1, 8, device="meta")
    w_hh = torch.empty(4 * 23171, 23171, device="meta")
    with pytest.raises(ValueError, match="H=23171 is too large"):
        lstm_ops.lstm_forward(x, torch.empty(4 * 23171, 8, device="meta"), w_hh, None, None,
                              None, None)  # fmt: skip


def test_workspace_capacity_grows_in_steps():
    capacity = _ops().workspace_capacity
    assert capacity(1) == 64 and capacity(64) == 64 and capacity(65) == 128
    assert capacity(1000, 1024) == 1024  # jittered lengths below the capacity: no reallocation
    assert capacity(1030, 1024) == 1280  # at least 1.25x when it must grow


class _FakeGraph:
    """Stands in for a CUDA graph on the CPU: capture records the launches without running
    them; replay runs them again, on whatever the captured buffers hold then."""

    def __init__(self, launch_all):
        self.launch_all = launch_all

    def replay(self):
        self.launch_all()


def test_graph_cache_is_keyed_on_shapes_with_static_buffers(device, monkeypatch):
    """The graph path with a stand-in graph under the interpreter: every call brings new
    tensors (new addresses) and the lengths jitter, yet each length is captured once and
    replayed after, and every result equals the plain launches' bit for bit (a replay reads
    only what was copied into the workspace, so a missed copy or a stale graph shows)."""
    lstm_ops = _ops()
    if device.type == "cpu":
        monkeypatch.setattr(lstm_ops, "_graphs_apply", lambda dev: True)
        monkeypatch.setattr(lstm_ops, "_capture", lambda launch_all, dev: _FakeGraph(launch_all))
        monkeypatch.setattr(lstm_ops, "_stream_id", lambda dev: 0)
    monkeypatch.setattr(lstm_ops, "_CAPACITY_STEP", 4)  # small capacities: regrowth at T=9
    previous = lstm_ops.set_cuda_graphs(True, capture_after=1)
    lstm_ops.clear_cuda_graphs()
    names = ("x", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "h0", "c0")
    lengths = [5, 6, 5, 3, 6, 5, 9, 5, 5]  # 9 outgrows the first workspace (capacity 8)

    def run(seed, steps):
        torch.manual_seed(seed)
        case = make_case(steps, 3, 8, 16)
        leaves = _leaves(case, torch.float32, device)
        out, h_n, c_n = lstm_ops.lstm(*[leaves.get(n) for n in names])
        grad = torch.randn_like(out)
        grads = torch.autograd.grad((out, h_n, c_n), [leaves[n] for n in names],
                                    (grad, torch.ones_like(h_n), c_n.detach()))  # fmt: skip
        return [t.detach() for t in (out, h_n, c_n, *grads)]

    try:
        before = lstm_ops.cuda_graph_stats()
        graphed = [run(seed, steps) for seed, steps in enumerate(lengths)]
        stats = {k: v - before[k] for k, v in lstm_ops.cuda_graph_stats().items()}
        workspaces = list(lstm_ops._WORKSPACES.values())
        graph_keys = list(lstm_ops._GRAPHS)
        if device.type == "cpu":
            monkeypatch.setattr(lstm_ops, "_graphs_apply", lambda dev: False)
        else:
            lstm_ops.set_cuda_graphs(False)
        plain = [run(seed, steps) for seed, steps in enumerate(lengths)]
    finally:
        lstm_ops.set_cuda_graphs(*previous)
        lstm_ops.clear_cuda_graphs()
    for call, (got, want) in enumerate(zip(graphed, plain)):
        for index, (a, b) in enumerate(zip(got, want)):
            assert torch.equal(a, b), f"call {call} (T={lengths[call]}), result {index} differs"
    assert len(workspaces) == 1 and workspaces[0].capacity == 12
    assert workspaces[0].generation == 2
    # T=5: plain, capture+replay, replay; T=6: plain, capture+replay; T=3: plain; T=9: plain
    # (it regrows the workspace: graphs of the old buffers are dropped); T=5 again: plain,
    # capture+replay. Forward and backward alike.
    assert stats == {"plain": 10, "captures": 6, "replays": 8}, stats
    assert sorted(k[2] for k in graph_keys if k[0] == "fwd") == [5]
    assert {k[1][1] for k in graph_keys} == {2}


def test_returned_tensors_do_not_alias_the_workspace(device, monkeypatch):
    lstm_ops = _ops()
    if device.type == "cpu":
        monkeypatch.setattr(lstm_ops, "_graphs_apply", lambda dev: True)
        monkeypatch.setattr(lstm_ops, "_capture", lambda launch_all, dev: _FakeGraph(launch_all))
        monkeypatch.setattr(lstm_ops, "_stream_id", lambda dev: 0)
    lstm_ops.clear_cuda_graphs()
    try:
        case = make_case(4, 2, 8, 16)
        args = [getattr(case, n) for n in ("x", "weight_ih", "weight_hh", "bias_ih", "bias_hh",
                                           "h0", "c0")]  # fmt: skip
        args = [a.to(device=device, dtype=torch.float32) for a in args]
        results = lstm_ops.lstm_forward(*args)
        (ws,) = lstm_ops._WORKSPACES.values()
        buffers = [ws.pre, ws.gates, ws.seq, ws.cells, ws.h_n, ws.c_n, ws.state]
        for result in results:
            for buffer in buffers:
                start, end = buffer.data_ptr(), buffer.data_ptr() + buffer.nbytes
                assert not start <= result.data_ptr() < end
    finally:
        lstm_ops.clear_cuda_graphs()
