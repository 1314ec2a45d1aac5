"""The fused Triton Boom (sha_rnn_kernels/ops/boom.py) against a float64 formula.

Under ``TRITON_INTERPRET=1`` (the default, see conftest.py) the kernels run on CPU tensors;
with ``TRITON_INTERPRET=0`` on a GPU machine the same parity tests run on CUDA tensors, and the
``cuda`` tests (paper shape, torch.compile with Inductor) run too.
"""

import pytest
import torch
import triton

from sha_rnn_kernels.ops import _common
from sha_rnn_kernels.ops import boom as boom_ops
from sha_rnn_kernels.testing import assert_parity

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# --------------------------------------------------------------------------------------------
# the formula the kernels must compute, in any dtype (float64 for the expected values)
# --------------------------------------------------------------------------------------------
def boom_formula(x, weight, bias, keep_scale=None):
    """``sum_c chunk_c(keep_scale * gelu(x W^T + b))`` with ``gelu(h) = h sigmoid(1.702 h)``.

    ``keep_scale``: None (no dropout) or ``[*x.shape[:-1], C, E]``, 0 for a dropped element and
    ``1 / (1 - p)`` for a kept one.
    """
    width = x.shape[-1]
    chunks = weight.shape[0] // width
    pre = x @ weight.t()
    if bias is not None:
        pre = pre + bias
    act = pre * torch.sigmoid(1.702 * pre)
    act = act[..., : chunks * width].unflatten(-1, (chunks, width))
    if keep_scale is not None:
        # As torch's dropout does: scale in (at least) fp32, round once to the input dtype.
        act = (act * keep_scale.to(torch.promote_types(act.dtype, torch.float32))).to(act.dtype)
    return act.sum(-2)


def forward_backward(fn, x, weight, bias, grad_y):
    """``fn``'s output and the gradients of ``<fn(x, weight, bias), grad_y>``."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    y = fn(*leaves)
    y.backward(grad_y.to(y.dtype))
    grads = [t.grad if t is not None else None for t in leaves]
    return (y.detach(), *grads)


def kernel(dropout_p=0.0, seed=0, fused=False):
    return lambda x, w, b: boom_ops.boom(x, w, b, dropout_p=dropout_p, seed=seed, fused=fused)


# The two forward designs: a cuBLAS GEMM + the Triton sum kernel, and the one fused Triton GEMM.
DESIGNS = pytest.mark.parametrize("fused", [False, True], ids=["split", "fused"])


def make_inputs(lead, width, features, dtype, device, bias=True, layout="contiguous"):
    """x ``[*lead, E]`` (unit scale, as after a LayerNorm), weight ``[F, E]`` scaled so that the
    pre-activations are O(1), so the GELU is exercised away from its linear part."""
    if layout == "contiguous":
        x = torch.randn(*lead, width, device=device).to(dtype)
    elif layout == "transposed":  # leading dims swapped: rows are not evenly strided
        x = torch.randn(*reversed(lead), width, device=device).to(dtype).transpose(0, 1)
    elif layout == "strided":  # every other element of the last dim
        x = torch.randn(*lead, 2 * width, device=device).to(dtype)[..., ::2]
    else:
        raise ValueError(layout)
    assert x.is_contiguous() == (layout == "contiguous")
    weight = (torch.randn(features, width, device=device) / width**0.5).to(dtype)
    b = (0.5 * torch.randn(features, device=device)).to(dtype) if bias else None
    return x, weight, b


def check_parity(got, x, weight, bias, grad_y, keep_scale=None, dtype=None):
    """Compare ``got = (y, dx, dw, db)`` with the float64 formula, and the tolerance with the
    same formula run by PyTorch in the inputs' dtype."""
    dtype = dtype or x.dtype
    to64 = [t.double() if t is not None else None for t in (x, weight, bias)]
    expected = forward_backward(
        lambda *a: boom_formula(*a, keep_scale=keep_scale), *to64, grad_y.double()
    )
    lowp = forward_backward(
        lambda *a: boom_formula(*a, keep_scale=keep_scale), x, weight, bias, grad_y
    )
    for name, actual, want, low in zip(("y", "dX", "dW", "db"), got, expected, lowp):
        if want is None:
            assert actual is None, name
            continue
        assert actual.dtype == dtype, f"{name}: dtype {actual.dtype}, expected {dtype}"
        assert actual.shape == want.shape, name
        assert_parity(name, actual, want, lowp=low, dtype=dtype)


# --------------------------------------------------------------------------------------------
# parity without dropout
# --------------------------------------------------------------------------------------------
CASES = [
    # (leading shape, E, F, layout)
    ((13,), 40, 130, "contiguous"),  # 3 chunks + 10 dropped columns, 13 rows
    ((1,), 40, 130, "contiguous"),  # a single row
    ((3, 5), 24, 96, "contiguous"),  # 3-D input, exactly 4 chunks
    ((3, 5), 24, 130, "transposed"),  # 5 chunks (two Philox groups), non-contiguous rows
    ((20,), 40, 130, "strided"),  # last-dim stride 2, two row tiles
]


@DESIGNS
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("lead,width,features,layout", CASES)
def test_parity(lead, width, features, layout, dtype, fused, device):
    x, weight, bias = make_inputs(lead, width, features, dtype, device, layout=layout)
    grad_y = torch.randn(*lead, width, device=device).to(dtype)
    got = forward_backward(kernel(fused=fused), x, weight, bias, grad_y)
    assert got[0].shape == (*lead, width)
    check_parity(got, x, weight, bias, grad_y)


@DESIGNS
def test_parity_without_bias(fused, device):
    x, weight, _ = make_inputs((13,), 40, 130, torch.float32, device, bias=False)
    grad_y = torch.randn(13, 40, device=device)
    got = forward_backward(kernel(fused=fused), x, weight, None, grad_y)
    check_parity(got, x, weight, None, grad_y)


def test_only_some_gradients(device):
    """A frozen weight and bias: the backward returns only dX, and it still matches."""
    x, weight, bias = make_inputs((13,), 40, 130, torch.float32, device)
    x = x.detach().requires_grad_()
    boom_ops.boom(x, weight, bias, dropout_p=0.0, seed=0).sum().backward()
    x64 = x.detach().double().requires_grad_()
    boom_formula(x64, weight.double(), bias.double()).sum().backward()
    assert weight.grad is None and bias.grad is None
    assert_parity("dX", x.grad, x64.grad)


@DESIGNS
def test_no_rows(fused, device):
    x = torch.randn(0, 3, 24, device=device, requires_grad=True)
    weight = torch.randn(96, 24, device=device, requires_grad=True)
    bias = torch.randn(96, device=device, requires_grad=True)
    y = boom_ops.boom(x, weight, bias, dropout_p=0.1, seed=1, fused=fused)
    assert y.shape == (0, 3, 24)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    assert torch.equal(bias.grad, torch.zeros_like(bias))


@DESIGNS
def test_inference_saves_nothing(fused, device):
    """Without autograd the forward op returns no pre-activation."""
    x, weight, bias = make_inputs((13,), 40, 130, torch.float32, device)
    y, pre = torch.ops.sha_rnn_kernels.boom_fwd(x, weight, bias, 0.0, 0, False, fused)
    assert pre.numel() == 0
    assert_parity("y", y, boom_formula(x.double(), weight.double(), bias.double()))


# --------------------------------------------------------------------------------------------
# dropout
# --------------------------------------------------------------------------------------------
def recover_keep_scale(run, x, weight, bias, dropout_p, seed):
    """The forward's per-element factor ``mask / (1 - p)`` as ``[*lead, C, E]``.

    The mask depends only on the seed and the element's (row, chunk, column), so running the
    forward once per chunk with every other chunk's weight rows and bias zeroed (their GELU is
    then 0) shows chunk c's mask as the zeros of the output. The pre-activations are random, so
    a kept element is never exactly 0.
    """
    width = x.shape[-1]
    chunks = weight.shape[0] // width
    keep = []
    for c in range(chunks):
        only = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
        only[c * width : (c + 1) * width] = 1
        b = bias * only[:, 0] if bias is not None else None
        y = run(x, weight * only, b)
        keep.append(y != 0)
    keep = torch.stack(keep, dim=-2)
    return keep.double() / (1.0 - dropout_p)


@DESIGNS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_dropout_parity_with_recovered_mask(dtype, fused, device):
    """Forward and backward with dropout equal the float64 formula with the forward's own mask:
    the backward regenerates exactly the mask that the forward used."""
    lead, width, features, p, seed = (3, 5), 24, 130, 0.3, 1234
    x, weight, bias = make_inputs(lead, width, features, dtype, device, layout="transposed")
    grad_y = torch.randn(*lead, width, device=device).to(dtype)
    with torch.no_grad():
        keep_scale = recover_keep_scale(kernel(p, seed, fused), x, weight, bias, p, seed)
    assert keep_scale.shape == (*lead, 5, width)
    assert 0 < (keep_scale == 0).double().mean().item() < 0.6  # some, not all, dropped
    got = forward_backward(kernel(p, seed, fused), x, weight, bias, grad_y)
    check_parity(got, x, weight, bias, grad_y, keep_scale=keep_scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(
    "lead,width,features",
    [((9,), 1, 3), ((3, 3), 2, 7), ((1,), 40, 130)],
    ids=["E=1", "E=2", "one row"],
)
@DESIGNS
def test_dropout_parity_narrow_and_single_row(lead, width, features, dtype, fused, device):
    """E of 1 or 2 (16-wide tiles, one mask byte covering the whole row of a chunk) and a
    single row, with dropout: forward and backward equal the formula with the forward's mask."""
    p, seed = 0.4, 321
    x, weight, bias = make_inputs(lead, width, features, dtype, device)
    grad_y = torch.randn(*lead, width, device=device).to(dtype)
    with torch.no_grad():
        keep_scale = recover_keep_scale(kernel(p, seed, fused), x, weight, bias, p, seed)
    got = forward_backward(kernel(p, seed, fused), x, weight, bias, grad_y)
    check_parity(got, x, weight, bias, grad_y, keep_scale=keep_scale)


def unpack_mask(mask, rows, chunks, width):
    """``boom_ops.dropout_mask``'s packed bytes to booleans ``[rows, chunks, width]``."""
    lanes = torch.arange(8, device=mask.device, dtype=torch.int32)
    bits = (mask.to(torch.int32)[..., None] >> lanes) & 1
    return bits.view(rows, chunks, -1)[..., :width].bool()


def test_dropout_statistics(device):
    """Kept fraction ~ 1 - p for every chunk and every lane of a Philox call (column % 8: low
    and high halves of four words), and the masks of different chunks and lanes uncorrelated.
    Then, through the backward kernel with dY = 1 (``dU = mask / (1 - p) * gelu'(h)``), the
    backward regenerates the packed mask exactly and scales kept values by exactly 1/(1-p)."""
    rows, width, chunks, p, seed = 128, 64, 5, 0.25, 77
    mask = boom_ops.dropout_mask(rows, width, chunks, p, seed, device)
    assert mask.shape == (rows * chunks, width // 8) and mask.dtype == torch.uint8
    kept = unpack_mask(mask, rows, chunks, width)
    # One series per (chunk, lane): [chunks * 8, rows * width // 8].
    series = kept.view(rows, chunks, width // 8, 8).permute(1, 3, 0, 2).reshape(chunks * 8, -1)
    n = series.shape[1]
    fractions = series.double().mean(1)
    sigma = (p * (1 - p) / n) ** 0.5
    worst = (fractions - (1 - p)).abs().argmax().item()
    assert (fractions - (1 - p)).abs().max().item() < 5 * sigma, (
        f"chunk {worst // 8}, lane {worst % 8}: kept {fractions[worst].item():.4f}"
    )
    corr = torch.corrcoef(series.double())
    off_diagonal = corr - torch.eye(len(corr), dtype=corr.dtype, device=corr.device)
    assert off_diagonal.abs().max().item() < 5 / n**0.5, corr

    pre = torch.randn(rows, chunks * width, device=device)
    grad_y = torch.ones(rows, width, device=device)
    dropped, _ = boom_ops.boom_backward(grad_y, pre, p, seed)
    plain, _ = boom_ops.boom_backward(grad_y, pre, 0.0, seed)
    assert not torch.any(plain == 0)
    assert torch.equal(dropped.view(rows, chunks, width) != 0, kept)
    flat = kept.view(rows, -1)
    torch.testing.assert_close(dropped[flat], plain[flat] / (1 - p), rtol=2e-6, atol=0.0)


def test_dropout_probability_rounding(device):
    """p is rounded to a multiple of 2**-16: tiny p drops nothing, p = 1 drops everything."""
    assert boom_ops.dropout_mask(4, 16, 2, 2.0**-18, 0, device).numel() == 0
    everything = boom_ops.dropout_mask(4, 16, 2, 1.0, 0, device)
    assert torch.equal(everything, torch.zeros_like(everything))
    x, weight, bias = make_inputs((5,), 16, 32, torch.float32, device)
    y = boom_ops.boom(x, weight, bias, dropout_p=1.0, seed=0)
    assert torch.equal(y, torch.zeros_like(y))


def test_dropout_seed_reproducible(device):
    x, weight, bias = make_inputs((13,), 40, 130, torch.bfloat16, device)
    grad_y = torch.randn(13, 40, device=device).to(torch.bfloat16)
    first = forward_backward(kernel(0.5, 99), x, weight, bias, grad_y)
    again = forward_backward(kernel(0.5, 99), x, weight, bias, grad_y)
    other = forward_backward(kernel(0.5, 100), x, weight, bias, grad_y)
    for name, a, b in zip(("y", "dX", "dW", "db"), first, again):
        assert torch.equal(a, b), f"{name} differs between two runs with one seed"
    for name, a, b in zip(("y", "dX", "dW", "db"), first, other):
        assert not torch.equal(a, b), f"{name} is the same for seeds 99 and 100"
    assert (first[0] != other[0]).double().mean().item() > 0.5


def test_dropout_mask_independent_of_tiling(device):
    """Both designs and the fused kernel launched with other tile sizes (and no grouping) drop
    the same elements: the Philox counters name elements, not tiles."""
    lead, width, features, p, seed = (20,), 40, 130, 0.5, 5

    def retiled(x, weight, bias):
        x2d = x.reshape(-1, width)
        rows = x2d.shape[0]
        y = torch.empty_like(x2d)
        mask = boom_ops.dropout_mask(rows, width, features // width, p, seed, x.device)
        grid = (triton.cdiv(rows, 32) * triton.cdiv(width, 32),)
        boom_ops._boom_fwd_kernel.fn[grid](
            x2d, weight, bias, y, y, mask, rows, width, features // width, 32,
            x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1), y.stride(0), 0,
            1 / (1 - p),
            HAS_BIAS=True, HAS_DROPOUT=True, SAVE_PRE=False, DOT_IEEE=True, DOT_UPCAST=False,
            EVEN_K=False, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=1,
        )
        return y.view(x.shape)

    x, weight, bias = make_inputs(lead, width, features, torch.float32, device)
    with torch.no_grad():
        default = recover_keep_scale(kernel(p, seed), x, weight, bias, p, seed)
        fused = recover_keep_scale(kernel(p, seed, True), x, weight, bias, p, seed)
        other = recover_keep_scale(retiled, x, weight, bias, p, seed)
    assert torch.equal(default, fused)
    assert torch.equal(default, other)


# --------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------
class TinyBoom(torch.nn.Module):
    def __init__(self, width, features, dropout_p, seed):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(features, width) / width**0.5)
        self.bias = torch.nn.Parameter(0.5 * torch.randn(features))
        self.dropout_p, self.seed = dropout_p, seed

    def forward(self, x):
        y = boom_ops.boom(x, self.weight, self.bias, dropout_p=self.dropout_p, seed=self.seed)
        return torch.tanh(y) + x


def tiny_boom_formula(x, weight, bias, keep_scale):
    """TinyBoom's forward as a formula (``keep_scale`` as in ``boom_formula``)."""
    return torch.tanh(boom_formula(x, weight, bias, keep_scale=keep_scale)) + x


def tiny_boom_grads(fn, x, weight, bias):
    """``(y, dX, dW, db)`` of ``sum(fn(x, weight, bias) ** 2)``."""
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
    y = fn(*leaves)
    y.square().sum().backward()
    return (y.detach(), *(t.grad for t in leaves))


def check_compiled(module, x, **compile_kwargs):
    """Eager and ``torch.compile(fullgraph=True)`` each against the float64 formula with the
    kernel's own dropout mask, with the tolerance rule (never against each other: Inductor
    fuses the surrounding ops and rounds once where eager rounds per op)."""
    compiled = torch.compile(module, fullgraph=True, **compile_kwargs)
    weight, bias = module.weight.detach(), module.bias.detach()
    with torch.no_grad():
        keep_scale = recover_keep_scale(
            kernel(module.dropout_p, module.seed), x, weight, bias, module.dropout_p, module.seed
        )
    formula = lambda *a: tiny_boom_formula(*a, keep_scale=keep_scale)
    expected = tiny_boom_grads(formula, *(t.double() for t in (x, weight, bias)))
    lowp = tiny_boom_grads(formula, x, weight, bias)
    for label, fn in (("eager", module), ("compiled", compiled)):
        module.zero_grad()
        xi = x.detach().requires_grad_()
        y = fn(xi)
        y.square().sum().backward()
        got = (y.detach(), xi.grad, module.weight.grad.clone(), module.bias.grad.clone())
        for name, actual, want, low in zip(("y", "dX", "dW", "db"), got, expected, lowp):
            assert_parity(f"{label} {name}", actual, want, lowp=low, dtype=x.dtype)


def test_compile_fullgraph_traces_op(device):
    """torch.compile(fullgraph=True) keeps the op whole through dynamo and AOTAutograd (the
    aot_eager backend: no code generation, so this stays quick on CPU)."""
    module = TinyBoom(24, 96, 0.2, 7).to(device)
    check_compiled(module, torch.randn(3, 5, 24, device=device), backend="aot_eager")


@DESIGNS
def test_opcheck(fused, device):
    x, weight, bias = make_inputs((13,), 24, 96, torch.float32, device)
    x.requires_grad_()
    weight.requires_grad_()
    torch.library.opcheck(
        torch.ops.sha_rnn_kernels.boom_fwd.default, (x, weight, bias, 0.3, 11, True, fused),
        test_utils=(
            "test_schema",
            "test_faketensor",
            "test_autograd_registration",
            "test_aot_dispatch_dynamic",
        ),
    )


def test_graph_capture_launches_without_autotuning(device, monkeypatch):
    """Inside CUDA-graph capture (simulated), a key the autotuner has never seen launches the
    first pruned config directly and still computes the Boom; a key tuned before capture goes
    through the autotuner's cache."""
    autotuner = type(boom_ops._boom_fwd_kernel)
    tuner_runs = []
    real_run = autotuner.run

    def counting_run(self, *args, **kwargs):
        tuner_runs.append(1)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(autotuner, "run", counting_run)
    monkeypatch.setattr(_common, "_TUNED_KEYS", set())
    monkeypatch.setattr(_common, "_capturing", lambda device: True)
    x, weight, bias = make_inputs((13,), 40, 130, torch.float32, device)
    grad_y = torch.randn(13, 40, device=device)
    got = forward_backward(kernel(fused=True), x, weight, bias, grad_y)
    check_parity(got, x, weight, bias, grad_y)
    assert tuner_runs == []
    monkeypatch.setattr(_common, "_capturing", lambda device: False)
    boom_ops.boom(x, weight, bias, dropout_p=0.0, seed=0, fused=True)
    monkeypatch.setattr(_common, "_capturing", lambda device: True)
    boom_ops.boom(x, weight, bias, dropout_p=0.0, seed=0, fused=True)
    assert len(tuner_runs) == 2


def test_rows_bucket():
    buckets = [_common.rows_bucket(n) for n in (0, 1, 16, 17, 1000, 16384)]
    assert buckets == [16, 16, 16, 32, 1024, 16384]


def test_unsupported_reason(device, monkeypatch):
    x, weight, bias = make_inputs((13,), 40, 130, torch.float32, device)
    assert boom_ops.unsupported_reason(x, weight, bias) is None
    reason = boom_ops.unsupported_reason(x.double(), weight.double(), None)
    assert reason is not None and "float64" in reason
    if device.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        reason = boom_ops.unsupported_reason(x, weight, bias)
        assert reason is not None and "CUDA" in reason


# --------------------------------------------------------------------------------------------
# GPU only
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@DESIGNS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_paper_shape_parity(dtype, fused, cuda):
    """16384 rows (T=1024 x B=16), E=1024 -> F=4096, forward and backward."""
    x, weight, bias = make_inputs((1024, 16), 1024, 4096, dtype, cuda)
    grad_y = torch.randn(1024, 16, 1024, device=cuda).to(dtype)
    got = forward_backward(kernel(fused=fused), x, weight, bias, grad_y)
    check_parity(got, x, weight, bias, grad_y)


@pytest.mark.gpu
@DESIGNS
def test_paper_shape_dropout_parity(fused, cuda):
    """With dropout at the paper's shape (the GPU tiles differ between the forward and the
    backward kernel): the backward uses the forward's mask."""
    lead, width, features, p, seed = (256, 16), 1024, 4096, 0.1, 2024
    x, weight, bias = make_inputs(lead, width, features, torch.bfloat16, cuda)
    grad_y = torch.randn(*lead, width, device=cuda).to(torch.bfloat16)
    with torch.no_grad():
        keep_scale = recover_keep_scale(kernel(p, seed, fused), x, weight, bias, p, seed)
    got = forward_backward(kernel(p, seed, fused), x, weight, bias, grad_y)
    check_parity(got, x, weight, bias, grad_y, keep_scale=keep_scale)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_compile_fullgraph_inductor(dtype, cuda):
    """Inductor generates code around the op (tanh, residual, square-sum and their backward)."""
    module = TinyBoom(64, 256, 0.1, 3).to(device=cuda, dtype=dtype)
    check_compiled(module, torch.randn(7, 3, 64, device=cuda, dtype=dtype))


@pytest.mark.gpu
def test_cuda_graph_capture_before_autotuning(cuda, monkeypatch):
    """The fused kernel captured in a CUDA graph before its key was ever autotuned: the capture
    launches the first pruned config (compiled beforehand: compiling is not autotuning), and
    the replay matches a launch outside the graph."""
    monkeypatch.setattr(_common, "_TUNED_KEYS", set())
    x, weight, bias = make_inputs((37,), 64, 256, torch.bfloat16, cuda)
    run = kernel(0.1, 5, fused=True)
    with torch.no_grad():
        monkeypatch.setattr(_common, "_capturing", lambda device: True)
        run(x, weight, bias)  # compiles the first config, times nothing
        monkeypatch.undo()
        monkeypatch.setattr(_common, "_TUNED_KEYS", set())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = run(x, weight, bias)
        graph.replay()
        torch.cuda.synchronize()
        assert not _common._TUNED_KEYS  # the autotuner never ran
        expected = run(x, weight, bias)  # outside capture: autotuned, the same mask
    assert_parity("y", captured.float(), expected.double(), dtype=torch.bfloat16)


def test_prune_keeps_no_spilling_tile_in_training():
    """The fused kernel's autotune list without the configs that spill when h is saved
    (tools/compile_triton.py: 128x128 on both archs, fp32's 64x64x32), while eval keeps 128x128
    first on Hopper. Checked on the full list, not the interpreter's single config."""
    from sha_rnn_kernels.ops import boom as boom_ops

    full = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w)
        for m, n, k, w in ((128, 128, 64, 8), (128, 64, 64, 8), (64, 128, 64, 8),
                           (64, 64, 64, 4), (64, 64, 32, 4), (32, 64, 32, 4), (64, 16, 16, 4))
    ]  # fmt: skip

    def tiles(dtype, save_pre, dropout=True):
        args = {"X": torch.empty(1, dtype=dtype), "E": 1024, "ROWS_BUCKET": 16384}
        kept = boom_ops._prune(full, args, SAVE_PRE=save_pre, HAS_DROPOUT=dropout)
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in kept]

    assert tiles(torch.bfloat16, save_pre=False)[0] == (128, 128, 64)
    training = tiles(torch.bfloat16, save_pre=True)
    assert training and (128, 128, 64) not in training and (32, 64, 32) not in training
    assert tiles(torch.float32, save_pre=True) == [(32, 64, 32)]
    assert tiles(torch.float32, save_pre=False) == [(64, 64, 32)]
