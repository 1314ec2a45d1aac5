"""LAMB against a hand-written float64 version of its formula."""

import math

import pytest
import torch

from sha_rnn_kernels.optim import Lamb


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
