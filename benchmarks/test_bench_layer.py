"""Micro-benchmarks of the layer op at the --small sizes (see benchmarks/conftest.py)."""

import pytest

from benchmarks import harness, layer

PASSES = harness.PASSES


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("impl", layer.IMPLS)
def test_layer(bench_case, impl, pass_):
    bench_case(layer, impl, pass_)
