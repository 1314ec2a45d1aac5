"""Micro-benchmarks of the lstm op at the --small sizes (see benchmarks/conftest.py)."""

import pytest

from benchmarks import harness, lstm

PASSES = harness.PASSES


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("impl", lstm.IMPLS)
def test_lstm(bench_case, impl, pass_):
    bench_case(lstm, impl, pass_)
