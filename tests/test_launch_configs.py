"""GPU: every autotune config of the fused Boom kernel, forced one at a time, against float64.

Autotuning launches every config that survives ``_prune`` but checks none of their outputs:
only the winner's output is ever used, so a config that computes wrongly (a mask off by one
at a tile edge, a wrong reduction step) would hide until it wins on some GPU. Here the
autotuner is given one config at a time (a single config is launched without pruning or
timing), at a shape that crosses every tile edge (300 rows, E = 160: no dimension a multiple
of 128 or 64), in the training configuration (h saved for the backward) and in eval, in the
dtypes that config serves. ``benchmarks/gpu_visit.sh`` runs this file in its tests phase.

Under the interpreter the kernel has a single config and these tests skip (``cuda`` fixture).
"""

import pytest
import torch

from sha_rnn_kernels.ops import boom
from sha_rnn_kernels.testing import assert_parity

KERNEL = boom._boom_fwd_kernel
ROWS, WIDTH, CHUNKS = 300, 160, 4


def _label(config) -> str:
    k = config.kwargs
    return (f"M{k['BLOCK_M']}xN{k['BLOCK_N']}xK{k['BLOCK_K']}"
            f"-w{config.num_warps}s{config.num_stages}")  # fmt: skip


def _formula(x, weight, bias):
    pre = x @ weight.t() + bias
    act = pre * torch.sigmoid(1.702 * pre)
    return act.unflatten(-1, (CHUNKS, x.shape[-1])).sum(-2)


def _run(fn, x, weight, bias, grad_y, train):
    leaves = [t.detach().requires_grad_(train) for t in (x, weight, bias)]
    y = fn(*leaves)
    if not train:
        return (y.detach(),)
    y.backward(grad_y.to(y.dtype))
    return (y.detach(), *(t.grad for t in leaves))


def _cases() -> list:
    """Every config in bf16, training (h saved) and eval; in fp32 (IEEE dots) the configs
    ``_prune`` keeps for fp32 (at most 64 x 64 with a 32-deep step, or 16 wide), training."""
    cases = []
    for config in KERNEL.configs:
        k = config.kwargs
        for train in (True, False):
            cases.append(pytest.param(config, torch.bfloat16, train,
                                      id=f"{_label(config)}-bf16-{'train' if train else 'eval'}"))
        if k["BLOCK_N"] == 16 or (k["BLOCK_M"] * k["BLOCK_N"] <= 64 * 64 and k["BLOCK_K"] <= 32):
            cases.append(pytest.param(config, torch.float32, True,
                                      id=f"{_label(config)}-fp32-train"))  # fmt: skip
    return cases


@pytest.mark.gpu
@pytest.mark.parametrize("config, dtype, train", _cases())
def test_every_fused_boom_config(config, dtype, train, cuda, monkeypatch):
    monkeypatch.setattr(KERNEL, "configs", [config])
    monkeypatch.setattr(KERNEL, "cache", {})  # no tuned choice of an earlier test is reused
    x = torch.randn(ROWS, WIDTH, device=cuda).to(dtype)
    weight = (torch.randn(CHUNKS * WIDTH, WIDTH, device=cuda) / WIDTH**0.5).to(dtype)
    bias = (0.5 * torch.randn(CHUNKS * WIDTH, device=cuda)).to(dtype)
    grad_y = torch.randn(ROWS, WIDTH, device=cuda).to(dtype)

    def fused(x_, w_, b_):
        return boom.boom(x_, w_, b_, dropout_p=0.0, seed=0, fused=True)

    got = _run(fused, x, weight, bias, grad_y, train)
    expected = _run(_formula, x.double(), weight.double(), bias.double(), grad_y.double(), train)
    lowp = _run(_formula, x, weight, bias, grad_y, train)
    for name, actual, want, low in zip(("y", "dX", "dW", "db"), got, expected, lowp):
        assert actual.dtype == dtype, f"{name} [{_label(config)}]: dtype {actual.dtype}"
        assert_parity(f"{name} [{_label(config)}]", actual, want, lowp=low, dtype=dtype)


# Tiles that spilled registers in training (h saved) in tools/compile_triton.py --max-spill 0
# under triton 3.6 or 3.9, paper shape: (compute capability, dropout) -> (M, N, K) tiles.
SPILLED_IN_TRAINING = {
    ((9, 0), True): {(128, 128, 64), (64, 64, 64)},  # 64x64x64: 32 B under 3.6
    ((9, 0), False): {(128, 128, 64)},
    ((8, 0), True): {(128, 128, 64), (64, 64, 64), (64, 64, 32)},  # 20 B (3.9), 4 B (3.6)
    ((8, 0), False): {(128, 128, 64), (64, 64, 32)},  # 64x64x32: 4 B under 3.6
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("capability, dropout", list(SPILLED_IN_TRAINING), ids=str)
def test_prune_drops_the_tiles_that_spilled(capability, dropout, dtype, monkeypatch):
    """Checked on the GPU list (the interpreter's single config is never pruned), for meta
    tensors of the target architecture, as tools/compile_triton.py prunes."""
    from sha_rnn_kernels.ops import _common

    monkeypatch.setattr(_common, "META_CAPABILITY", capability)
    monkeypatch.setattr(_common, "interpreter_enabled", lambda: False)
    full = boom._fwd_configs()
    assert len(full) > 1
    args = {"X": torch.empty(16384, 1024, dtype=dtype, device="meta"), "E": 1024,
            "ROWS_BUCKET": 16384}  # fmt: skip
    kept = boom._prune(full, args, SAVE_PRE=True, HAS_DROPOUT=dropout)
    tiles = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in kept}
    assert tiles, "the prune kept nothing"
    assert not tiles & SPILLED_IN_TRAINING[(capability, dropout)], tiles
