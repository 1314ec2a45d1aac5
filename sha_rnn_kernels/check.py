"""``python -m sha_rnn_kernels.check``: run every kernel's device check and print a table.

The one command to run on a new GPU machine before trusting the library on it. For each op and
backend (Boom and attention on Triton; the LSTM on Triton and on the persistent CUDA kernel) and
each dtype, a small forward and backward is compared with PyTorch under the tolerance rule of
:mod:`sha_rnn_kernels.testing` (at most twice PyTorch's own error in that dtype, plus a small
absolute slack), and one row is printed: op, backend, dtype, shape, verdict, max error,
tolerance. The CUDA LSTM's verdicts are also written to the first-use cache (see
:mod:`sha_rnn_kernels._device_check`), so ``backend="auto"`` (and torch.compile) can use the
kernel at once in later processes.

Exit status: 0 when every check that ran passed, 1 when one failed or raised, 2 on bad
arguments. Without a CUDA device it says so and checks nothing, unless ``TRITON_INTERPRET=1``
is set: then it runs the Triton checks through Triton's CPU interpreter at tiny sizes.

Example::

    python -m sha_rnn_kernels.check                    # bf16, fp16, fp32; LSTM H=1024, B=16
    python -m sha_rnn_kernels.check --hidden 1536 --batch 32 --dtypes bf16
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from typing import Callable, List, Optional, Sequence

import torch

from . import _backend, _device_check
from ._device_check import Verdict

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _lstm_cuda_check(device, dtype, hidden, batch, steps) -> Verdict:
    """The CUDA LSTM's check through the first-use machinery: rerun here and stored for
    ``auto``, for every batch the first-use check would run for this bucket."""
    from . import _cuda, functional

    shape = f"T={steps} B={batch} H={hidden}"
    if dtype not in _cuda.DTYPES:
        return Verdict("lstm", "cuda", _device_check._dtype_name(dtype), shape, True,
                       worst="skipped", error="")  # fmt: skip
    probe = torch.empty(1, batch, 1, device=device, dtype=dtype)
    weight_hh = torch.empty(4 * hidden, hidden, device=device, dtype=dtype)
    reason = _cuda.lstm_unsupported_reason(probe, weight_hh[:, :1], weight_hh)
    if reason is not None:
        return Verdict("lstm", "cuda", _device_check._dtype_name(dtype), shape, True,
                       worst="skipped", error=reason)  # fmt: skip
    first_use = _device_check.FIRST_USE
    shape_key = functional._lstm_class(probe, weight_hh)
    verdict = None
    for check_batch in dict.fromkeys(_device_check.check_batches(batch)):
        verdict = _device_check.check_lstm(
            functional._cuda_lstm_kernel, device, dtype, hidden, check_batch, steps=steps
        )
        if not verdict.passed:
            break
    first_use.store(first_use.key("lstm", "cuda", device, dtype, shape_key), verdict)
    return verdict


def prepare_lstm(device, dtype: torch.dtype, hidden: int, batch: int) -> Verdict:
    """Run, now, the first-use check ``backend="auto"`` would run for a CUDA LSTM of this
    dtype, hidden size and batch (or find its verdict in the cache), and return the verdict.

    Call it before ``torch.compile``: no check runs while Dynamo traces, so a compiled model
    uses the CUDA kernel from its first call only when a verdict is already known. A verdict
    with ``worst == "skipped"`` says why the kernel cannot take these inputs at all.

    Example:
        >>> prepare_lstm("cuda", torch.bfloat16, hidden=1024, batch=16).passed  # doctest: +SKIP
        True
    """
    from . import functional

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    probe = torch.empty(1, batch, 1, device=device, dtype=dtype)
    weight_hh = torch.empty(4 * hidden, hidden, device=device, dtype=dtype)
    weight_ih = weight_hh[:, :1]
    shape = functional._lstm_class(probe, weight_hh)
    reason = functional._cuda_reason(probe, weight_ih, weight_hh)
    if reason is not None:
        return Verdict("lstm", "cuda", _device_check._dtype_name(dtype), str(shape), False,
                       worst="skipped", error=reason)  # fmt: skip
    verdict = functional._first_use_lstm(device, dtype, shape, batch, weight_ih, weight_hh)
    assert verdict is not None, "prepare_lstm cannot run while a CUDA graph is being captured"
    return verdict


def plan(device: torch.device, dtypes: Sequence[torch.dtype], hidden: int, batch: int,
         tiny: bool) -> List[tuple]:  # fmt: skip
    """The checks to run: ``(op, backend, dtype, description, callable -> Verdict)``."""
    if tiny:  # the Triton interpreter on CPU: seconds, not hours
        boom_shape, attn_shape, lstm_shape = (7, 16, 40), (3, 7, 2, 16), (24, 3, 4)
    else:
        boom_shape, attn_shape = (512, 1024, 4096), (128, 640, 2, 1024)
        lstm_shape = (hidden, batch, 64)
    rows = []
    for dtype in dtypes:
        rows.append(("boom", "triton", dtype, lambda d=dtype: _device_check.check_boom(
            device, d, *boom_shape)))  # fmt: skip
        rows.append(("attention", "triton", dtype, lambda d=dtype: _device_check.check_attention(
            device, d, *attn_shape)))  # fmt: skip
        rows.append(("lstm", "triton", dtype, lambda d=dtype: _device_check.check_lstm(
            _triton_lstm, device, d, lstm_shape[0], lstm_shape[1], steps=lstm_shape[2],
            backend="triton")))  # fmt: skip
        if device.type == "cuda":
            rows.append(("lstm", "cuda", dtype, lambda d=dtype: _lstm_cuda_check(
                device, d, *lstm_shape)))  # fmt: skip
    return rows


def _triton_lstm(*args):
    from .ops import lstm as lstm_ops

    return lstm_ops.lstm(*args)


def _format_row(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()


def table(verdicts: Sequence[Verdict]) -> str:
    """The verdicts as a plain-text table."""
    header = ("op", "backend", "dtype", "shape", "verdict", "max error", "tolerance")
    lines = [header]
    for v in verdicts:
        if v.worst == "skipped":
            state = "skip"
        elif v.error:
            state = "ERROR"
        else:
            state = "pass" if v.passed else "FAIL"
        err = "" if math.isnan(v.max_error) else f"{v.max_error:.3g} ({v.worst})"
        tol = "" if math.isnan(v.tolerance) else f"{v.tolerance:.3g}"
        lines.append((v.op, v.backend, v.dtype, v.shape, state, err, tol))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [_format_row(line, widths) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    for v in verdicts:
        if v.error:
            label = "skipped" if v.worst == "skipped" else "error"
            out.append(f"{v.op}/{v.backend}/{v.dtype} {label}: {v.error}")
    return "\n".join(out)


def failed(verdicts: Sequence[Verdict]) -> bool:
    """True when a check that ran failed or raised."""
    return any(not v.passed and v.worst != "skipped" for v in verdicts)


def run_checks(
    rows: Sequence[tuple], echo: Optional[Callable[[str], None]] = None
) -> List[Verdict]:
    """Run every check of ``rows`` (see :func:`plan`); an exception is a failed row."""
    verdicts = []
    for op, backend, dtype, run in rows:
        if echo is not None:
            echo(f"checking {op} on {backend} in {_device_check._dtype_name(dtype)} ...")
        try:
            verdict = run()
        except Exception as exc:  # noqa: BLE001 - a broken check is a failed check
            verdict = Verdict(op, backend, _device_check._dtype_name(dtype), "", False,
                              error=f"{type(exc).__name__}: {exc}")  # fmt: skip
        verdicts.append(verdict)
    return verdicts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sha_rnn_kernels.check",
        description="Check every sha_rnn_kernels kernel against PyTorch on this machine's GPU.",
    )
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None,
                   help="dtypes to check (default: bf16 fp16 fp32; fp32 only on the interpreter)")
    p.add_argument("--hidden", type=int, default=1024, help="the LSTM's hidden size H")
    p.add_argument("--batch", type=int, default=16, help="the LSTM's batch B")
    p.add_argument("--device", default="cuda", help="CUDA device (default: the current one)")
    p.add_argument("--quiet", action="store_true", help="print the table only")
    return p  # fmt: skip


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.hidden < 1 or args.batch < 1:
        print(f"--hidden and --batch must be >= 1; got {args.hidden}, {args.batch}",
              file=sys.stderr)  # fmt: skip
        return 2
    echo = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    tiny = False
    if torch.cuda.is_available():
        device = torch.device(args.device)
        if device.type != "cuda":
            print(f"--device must be a CUDA device; got {args.device}", file=sys.stderr)
            return 2
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif _backend.interpreter_enabled():
        device, tiny = torch.device("cpu"), True
        print("No CUDA device: running the Triton checks through the interpreter on the CPU at "
              "tiny sizes (TRITON_INTERPRET=1); the CUDA LSTM is not checked.")  # fmt: skip
    else:
        print("No CUDA device is available (torch.cuda.is_available() is False): nothing to "
              "check. Set TRITON_INTERPRET=1 to run the Triton checks through the interpreter "
              "on the CPU.")  # fmt: skip
        return 0
    names = args.dtypes or (["fp32"] if tiny else ["bf16", "fp16", "fp32"])
    identity = _device_check.device_identity(device)
    print(", ".join(f"{k} {v}" for k, v in identity.items() if v))
    print(f"first-use cache: {_device_check.cache_dir() / 'device-checks'}")
    rows = plan(device, [DTYPES[n] for n in names], args.hidden, args.batch, tiny)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        verdicts = run_checks(rows, echo)
    print(table(verdicts))
    if failed(verdicts):
        print("FAILED: a kernel disagrees with PyTorch on this device (see above). "
              "backend='auto' will not use a CUDA LSTM that failed here.")  # fmt: skip
        return 1
    print("All checks passed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
