"""Shared fixtures.

Tests run the Triton kernels through the interpreter on CPU tensors unless the environment says
``TRITON_INTERPRET=0`` (on a GPU machine), in which case the same parity tests run on CUDA
tensors. Nothing here touches CUDA while tests are collected.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from sha_rnn_kernels.testing import poison_outputs  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"


@pytest.fixture(autouse=True)
def _poison_kernel_outputs():
    """Every kernel output buffer is NaN before the kernel writes it."""
    with poison_outputs():
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def device() -> torch.device:
    """Where the Triton kernels run: CPU under the interpreter, else the GPU."""
    if INTERPRET:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET=0 but no CUDA device is present")
    return torch.device("cuda")


@pytest.fixture
def cuda() -> torch.device:
    """For GPU-only tests (paper shapes, CUDA C++ kernels): skip with a reason without a GPU."""
    if INTERPRET:
        pytest.skip("GPU test: run with TRITON_INTERPRET=0 on a machine with CUDA")
    if not torch.cuda.is_available():
        pytest.skip("GPU test: no CUDA device is present")
    return torch.device("cuda")
