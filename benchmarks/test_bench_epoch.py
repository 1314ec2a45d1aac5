"""Micro-benchmarks of the epoch op at the --small sizes (see benchmarks/conftest.py)."""

import pytest

from benchmarks import epoch

PASSES = ("fwd+bwd",)


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("impl", epoch.IMPLS)
def test_epoch(bench_case, impl, pass_):
    bench_case(epoch, impl, pass_)
