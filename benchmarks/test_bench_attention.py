"""Micro-benchmarks of the attention op at the --small sizes (see benchmarks/conftest.py)."""

import pytest

from benchmarks import attention, harness

PASSES = harness.PASSES


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("impl", attention.IMPLS)
def test_attention(bench_case, impl, pass_):
    bench_case(attention, impl, pass_)
