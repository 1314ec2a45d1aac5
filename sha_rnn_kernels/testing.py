"""Parity checks used by the test-suite (and usable by anyone checking a kernel).

The tolerance rule: a kernel run in a low precision may be off the float64 reference by at most
twice the error of the same PyTorch computation run in that precision, plus a small absolute
slack (``ATOL``). In float32 the rule reduces to a plain tolerance.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

ATOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _worst(actual: torch.Tensor, expected: torch.Tensor) -> tuple:
    diff = (actual.double() - expected.double()).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    flat = int(diff.reshape(-1).argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    return diff.reshape(-1)[flat].item(), index


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference; NaN or a mismatch of NaN counts as infinite."""
    if actual.numel() == 0:
        return 0.0
    return _worst(actual, expected)[0]


def assert_parity(
    name: str,
    actual: torch.Tensor,
    expected: torch.Tensor,
    lowp: Optional[torch.Tensor] = None,
    dtype: Optional[torch.dtype] = None,
    atol: Optional[float] = None,
    rtol: float = 0.0,
) -> None:
    """Check ``actual`` (a kernel's result) against ``expected`` (the float64 reference).

    Args:
        name: what is compared, e.g. ``"dW"``; it starts the failure message.
        actual: the kernel's result, any dtype.
        expected: the reference in float64 (or float32 upcast).
        lowp: the same PyTorch computation run in the kernel's dtype; when given, the allowed
            error is ``2 * max_error(lowp, expected) + atol``.
        dtype: the kernel's dtype (default ``actual.dtype``), which picks the default atol.
        atol: absolute slack (default from :data:`ATOL`).
        rtol: extra slack relative to ``expected.abs().max()``.
    """
    dtype = dtype or actual.dtype
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    atol = ATOL.get(dtype, 1e-4) if atol is None else atol
    allowed = atol + rtol * (expected.double().abs().max().item() if expected.numel() else 0.0)
    base = 0.0
    if lowp is not None:
        base = max_error(lowp, expected)
        allowed += 2.0 * base
    if actual.numel() == 0:
        return
    err, index = _worst(actual, expected)
    if not err <= allowed:
        raise AssertionError(
            f"{name}: max |error| {err:.3g} > allowed {allowed:.3g} (low-precision torch "
            f"error {base:.3g}, atol {atol:g}) at index {index}: got "
            f"{actual[index].item()!r}, expected {expected[index].item()!r}"
        )


@contextlib.contextmanager
def poison_outputs(enabled: bool = True) -> Iterator[None]:
    """Within the block, every kernel output buffer starts out as NaN."""
    from .ops._common import set_poison_outputs

    previous = set_poison_outputs(enabled)
    try:
        yield
    finally:
        set_poison_outputs(previous)


# A tiny training run for tests of what comes after training (generation, evaluation): 2
# blocks (attention in block 0), a 48-key window, 16-byte segments, one CPU thread, no output.
SAMPLE_TEXT = b"the quick brown fox jumps over the lazy dog; pack my box with five dozen jugs.\n"
TINY_TRAIN_ARGS = [
    "--emsize", "32", "--nhid", "64", "--nlayers", "2", "--bptt", "16",
    "--max-positions", "48", "--batch-size", "4", "--eval-batch-size", "4",
    "--warmup", "5", "--lr", "1e-2", "--threads", "1", "--quiet", "--eval-interval", "0",
]  # fmt: skip


def checkpoint_path_for(case: str, good: str, folder) -> str:
    """A ``--checkpoint`` argument for the command-line tests of what reads a checkpoint:
    ``"missing"`` (no such file), ``"plain_dict"`` (a torch file that is not a training
    checkpoint), ``"text_file"`` (not a torch file), anything else the ``good`` checkpoint.
    ``folder`` is a pathlib.Path the bad files are written to."""
    if case == "missing":
        return str(folder / "nope.pt")
    if case == "plain_dict":
        path = folder / "weights.pt"
        torch.save({"weight": torch.zeros(2)}, path)
        return str(path)
    if case == "text_file":
        path = folder / "notes.txt"
        path.write_text("not a checkpoint\n")
        return str(path)
    return good
