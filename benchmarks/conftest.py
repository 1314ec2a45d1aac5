"""Fixtures of the pytest-benchmark micro-benchmarks (``pytest benchmarks --benchmark-only``).

They time the same cases as ``benchmarks/run.py`` at its ``--small`` sizes: on a CPU only the
impls that run there (the references, cuDNN's stand-in, SDPA, torch.compile), on a GPU all of
them in bf16. An impl that cannot run here is skipped with the reason. Not part of CI's
``pytest tests``; nothing touches CUDA while the tests are collected.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import harness


@pytest.fixture
def bench_options() -> harness.Options:
    on_cuda = torch.cuda.is_available()
    if not on_cuda:
        torch.set_num_threads(1)  # as run.py: a shared CPU's load disturbs one thread the least
    return harness.Options(
        device=torch.device("cuda" if on_cuda else "cpu"),
        dtypes=("bf16",) if on_cuda else ("fp32",),
        small=True,
        loss_steps=0,
    )


@pytest.fixture
def bench_case(benchmark, bench_options):
    """``bench_case(module, impl, pass_)``: build that case, warm it up, time it."""
    from sha_rnn_kernels import BackendUnavailableError

    def run(module, impl: str, pass_: str = "fwd+bwd") -> None:
        opts = bench_options
        if impl.startswith("compile"):
            torch._dynamo.reset()
        matches = [
            c for c in module.cases(opts)
            if c.impl == impl and c.pass_ == pass_ and c.case == "paper"
            and (c.dtype in opts.dtypes or c.dtype_fixed)
        ]  # fmt: skip
        if not matches:
            pytest.skip(f"{module.OP} has no {impl}/{pass_} case in {opts.dtypes}")
        try:
            bench = matches[0].build()
        except (harness.Unavailable, BackendUnavailableError) as exc:
            pytest.skip(f"{impl} cannot run here: {exc}")
        fn = bench.fn if bench.fn is not None else next(iter(bench.variants.values()))
        harness.warm_up(fn, opts)

        def timed():
            fn()
            harness.sync(opts.device)

        benchmark.extra_info.update(op=module.OP, impl=impl, dtype=matches[0].dtype, pass_=pass_)
        benchmark(timed)

    return run
