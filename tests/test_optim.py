"""LAMB against a hand-written float64 version of its formula and against the per-tensor
reference loop; GradScaler protocol; launches per step independent of the tensor count."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sha_rnn_kernels.optim import Lamb, _lamb_step_reference


def lamb_by_hand(weight, grads, lr, betas, eps, weight_decay, min_trust):
    """The update written out element by element in float64, one step per gradient."""
    beta1, beta2 = betas
    w = [float(x) for x in weight.flatten()]
    m = [0.0] * len(w)
    v = [0.0] * len(w)
    trusts = []
    for grad in grads:
        g = [float(x) for x in grad.flatten()]
        m = [beta1 * mi + (1 - beta1) * gi for mi, gi in zip(m, g)]
        v = [beta2 * vi + (1 - beta2) * gi * gi for vi, gi in zip(v, g)]
        step = [mi / (math.sqrt(vi) + eps) + weight_decay * wi for mi, vi, wi in zip(m, v, w)]
        weight_norm = min(math.sqrt(sum(x * x for x in w)), 10.0)
        step_norm = math.sqrt(sum(x * x for x in step))
        trust = weight_norm / step_norm if weight_norm > 0 and step_norm > 0 else 1.0
        trust = max(trust, min_trust)
        trusts.append(trust)
        w = [wi - lr * trust * si for wi, si in zip(w, step)]
    return torch.tensor(w, dtype=torch.float64).view_as(weight), trusts


def run_lamb(weight, grads, **kwargs):
    p = torch.nn.Parameter(weight.clone())
    opt = Lamb([p], **kwargs)
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
    return p.detach()


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
def test_matches_formula(steps, weight_decay):
    weight = torch.randn(7, 5, dtype=torch.float64)
    grads = [torch.randn(7, 5, dtype=torch.float64) for _ in range(steps)]
    kwargs = dict(lr=0.05, betas=(0.9, 0.999), eps=1e-6, weight_decay=weight_decay, min_trust=0.25)
    expected, trusts = lamb_by_hand(weight, grads, **kwargs)
    # The trust ratio is |w| / |step| here (above the floor), so this exercises the ratio itself.
    assert all(t > 0.25 for t in trusts), trusts
    actual = run_lamb(weight, grads, **kwargs)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_min_trust_clamps_small_ratio():
    # A tiny weight against a unit-size Adam step: |w| / |step| = 1e-3, far below 0.25.
    weight = torch.full((4, 4), 1e-4, dtype=torch.float64)
    grads = [torch.randn(4, 4, dtype=torch.float64)]
    kwargs = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, min_trust=0.25)
    expected, trusts = lamb_by_hand(weight, grads, **kwargs)
    assert trusts == [0.25]
    actual = run_lamb(weight, grads, **kwargs)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    # Without the floor the step would be 250x smaller: the clamp changes the result.
    unclamped = run_lamb(weight, grads, **{**kwargs, "min_trust": 0.0})
    assert (actual - weight).abs().max() > 100 * (unclamped - weight).abs().max()


def test_weight_norm_capped_at_ten():
    weight = torch.full((10, 10), 3.0, dtype=torch.float64)  # |w| = 30, capped to 10
    grads = [torch.randn(10, 10, dtype=torch.float64)]
    kwargs = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, min_trust=0.25)
    expected, trusts = lamb_by_hand(weight, grads, **kwargs)
    # The first step is (0.1 g) / sqrt(0.001 g^2) = 3.162 sign(g): |step| = 31.62 over 100 entries.
    assert trusts[0] == pytest.approx(10.0 / (10 * 0.1 / math.sqrt(0.001)), rel=1e-3)
    torch.testing.assert_close(run_lamb(weight, grads, **kwargs), expected, rtol=1e-12, atol=1e-12)


def test_zero_weight_uses_trust_one():
    weight = torch.zeros(3, 3, dtype=torch.float64)  # zero-initialised like qs, ks, vs
    grads = [torch.randn(3, 3, dtype=torch.float64)]
    kwargs = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, min_trust=0.25)
    expected, trusts = lamb_by_hand(weight, grads, **kwargs)
    assert trusts == [1.0]
    torch.testing.assert_close(run_lamb(weight, grads, **kwargs), expected, rtol=1e-12, atol=1e-12)


def test_skips_parameters_without_grad_and_saves_state():
    a = torch.nn.Parameter(torch.randn(3))
    b = torch.nn.Parameter(torch.randn(3))
    opt = Lamb([a, b], lr=0.1)
    before = b.detach().clone()
    a.grad = torch.randn(3)
    opt.step()
    assert torch.equal(b.detach(), before)
    assert opt.state[a]["step"] == 1 and b not in opt.state
    clone = Lamb([a, b], lr=0.1)
    clone.load_state_dict(opt.state_dict())
    torch.testing.assert_close(clone.state[a]["exp_avg"], opt.state[a]["exp_avg"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "lr"),
        (dict(betas=(1.0, 0.999)), "betas"),
        (dict(eps=-1e-6), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(min_trust=-0.5), "min_trust"),
    ],
)
def test_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Lamb([torch.nn.Parameter(torch.zeros(1))], **kwargs)


class _MixedShapes(torch.nn.Module):
    """Mixed shapes, repeated sizes, a zero-initialised tensor and one that gets no gradient."""

    def __init__(self, dtype):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        shapes = [(7, 5), (5,), (5, 7), (13,), (3, 3, 3), (5,), (1,), (35,)]
        self.ws = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes
        )
        self.zero = torch.nn.Parameter(torch.zeros(4, 2, dtype=dtype))
        self.unused = torch.nn.Parameter(torch.randn(6, dtype=dtype))


def _reference_run(params, grads_per_step, **kwargs):
    defaults = dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, min_trust=0.25)
    group = {**defaults, **kwargs}
    params = [p.detach().clone() for p in params]
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        _lamb_step_reference(params, grads, exp_avgs, exp_avg_sqs, group)
    return params, exp_avgs, exp_avg_sqs


def _assert_close(actual, expected, what, **tol):
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, msg=lambda m, i=i: f"{what}[{i}]: {m}", **tol)


# fp32: equal to rounding. bf16: the multi-tensor ops round ``alpha`` and intermediates
# differently from the per-tensor ops (on CPU one element of a moment may differ by one bf16 ulp),
# so two ulps of the values, with one ulp at magnitude 1 as the absolute floor.
@pytest.mark.parametrize(
    "dtype, tol",
    [(torch.float32, dict(rtol=2e-6, atol=1e-7)), (torch.bfloat16, dict(rtol=1.6e-2, atol=8e-3))],
)
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_equals_per_tensor_reference(dtype, tol, weight_decay):
    model = _MixedShapes(dtype)
    params = [*model.ws, model.zero, model.unused]
    initial = [p.detach().clone() for p in params]
    kwargs = dict(lr=0.01, weight_decay=weight_decay, min_trust=0.25)
    g = torch.Generator().manual_seed(1)
    grads_per_step = []
    for step in range(5):
        grads = [None if p is model.unused else torch.randn(p.shape, generator=g).to(dtype)
                 for p in params]  # fmt: skip
        if step == 2:
            grads[1] = None  # a tensor that misses one step keeps its moments unchanged
        grads_per_step.append(grads)
    expected, exp_avgs, exp_avg_sqs = _reference_run(params, grads_per_step, **kwargs)

    opt = Lamb(params, **kwargs)
    for grads in grads_per_step:
        for p, grad in zip(params, grads):
            p.grad = grad
        opt.step()
    _assert_close([p.detach() for p in params], expected, "weight", **tol)
    assert model.unused not in opt.state
    for i, p in enumerate(params[:-1]):
        state = opt.state[p]
        assert state["step"] == (4 if i == 1 else 5), (i, state["step"])
        _assert_close([state["exp_avg"]], [exp_avgs[i]], f"exp_avg {i}", **tol)
        _assert_close([state["exp_avg_sq"]], [exp_avg_sqs[i]], f"exp_avg_sq {i}", **tol)
    # Every weight with a gradient moved (the comparison above is not vacuous); the other not.
    assert torch.equal(params[-1].detach(), initial[-1])
    assert all(not torch.equal(p.detach(), w) for p, w in zip(params[:-1], initial))


def test_grad_scaler_skips_overflow_and_unscales():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    twin = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    twin.load_state_dict(model.state_dict())
    opt = Lamb(model.parameters(), lr=0.01)
    twin_opt = Lamb(twin.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randn(4, 6)

    # A finite step: the update equals an unscaled one.
    scaler.scale(model(x).square().sum()).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
    scaler.step(opt)
    scaler.update()
    twin(x).square().sum().backward()
    torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.25)
    twin_opt.step()
    _assert_close(list(model.parameters()), list(twin.parameters()), "after finite step",
                  rtol=1e-6, atol=1e-7)  # fmt: skip

    # An overflowing step is skipped whole: weights and moments unchanged, the scale halves.
    opt.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    moments = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
    scaler.scale(model(x).square().sum()).backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    scale = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == scale / 2
    _assert_close([p.detach() for p in model.parameters()], before, "after skipped step",
                  rtol=0, atol=0)  # fmt: skip
    _assert_close([opt.state[p]["exp_avg"] for p in model.parameters()], moments, "moments",
                  rtol=0, atol=0)  # fmt: skip
    assert all(opt.state[p]["step"] == 1 for p in model.parameters())


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view  # views (of the flat step buffer) launch nothing
        return func(*args, **(kwargs or {}))


def _ops_per_step(n_tensors: int) -> int:
    params = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(n_tensors)]
    params += [torch.nn.Parameter(torch.randn(5)) for _ in range(n_tensors)]
    opt = Lamb(params, weight_decay=0.1)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # creates the state
    with _CountOps() as counter:
        opt.step()
    return counter.count


def test_operator_calls_do_not_grow_with_tensor_count():
    # Multi-tensor ops: the operators dispatched per step (each a few kernel launches on a GPU)
    # depend on the number of distinct tensor sizes, not on the number of tensors. The
    # per-tensor loop dispatches ~16 per tensor.
    few, many = _ops_per_step(3), _ops_per_step(40)
    assert few == many, (few, many)
    assert many < 60, many
