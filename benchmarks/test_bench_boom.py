"""Micro-benchmarks of the boom op at the --small sizes (see benchmarks/conftest.py)."""

import pytest

from benchmarks import boom, harness

PASSES = harness.PASSES


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("impl", boom.IMPLS)
def test_boom(bench_case, impl, pass_):
    bench_case(boom, impl, pass_)
