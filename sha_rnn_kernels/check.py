"""``python -m sha_rnn_kernels.check``: run every kernel's device check and print a table.

The one command to run on a new GPU machine before trusting the library on it. For each kernel
of ours (Boom, attention and decode attention on Triton; the LSTM on Triton and on the
persistent CUDA kernel) and each dtype, the check of :mod:`sha_rnn_kernels._checks` runs at the
paper's input classes (E=1024, F=4096; the LSTM at ``--hidden`` and ``--batch``), each in a
child process with a timeout (:mod:`sha_rnn_kernels._contained`), and one row is printed: op,
backend, dtype, shape, verdict, max error, tolerance. The verdicts go to the first-use cache
(:mod:`sha_rnn_kernels._device_check`), so ``backend="auto"`` (and torch.compile) uses the
kernels at once in later processes.

``--explain [OP]`` checks nothing: it prints, for OP's inputs (every op's, without OP) as the
other options describe them, every backend with the reason ``auto`` (or ``--backend``) would or
would not choose it.

Exit status: 0 when every check that ran passed, 1 when one failed (mismatch, exception, crash
or hang), 2 on bad arguments. Without a CUDA device it says so and checks nothing, unless
``TRITON_INTERPRET=1`` is set: then it runs the Triton checks through Triton's CPU interpreter
at tiny sizes.

Example::

    python -m sha_rnn_kernels.check                    # bf16, fp16, fp32; LSTM H=1024, B=16
    python -m sha_rnn_kernels.check --hidden 1536 --batch 32 --dtypes bf16
    python -m sha_rnn_kernels.check --explain lstm --dtypes bf16 --hidden 1024 --batch 16
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from typing import Callable, List, Optional, Sequence

import torch

from . import _backend, _contained, _device_check, dispatch
from ._device_check import Verdict, dtype_name

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OPS = ("lstm", "attention", "boom", "decode")


def _skipped(op: str, backend: str, dtype: torch.dtype, shape: str, reason: str) -> Verdict:
    return Verdict(op, backend, dtype_name(dtype), shape, True, worst="skipped", error=reason)


def _lstm_probe(device, dtype, hidden: int, batch: int):
    x = torch.empty(1, batch, 1, device=device, dtype=dtype)
    weight_hh = torch.empty(4 * hidden, hidden, device=device, dtype=dtype)
    return x, weight_hh[:, :1], weight_hh


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
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    probe = _lstm_probe(device, dtype, hidden, batch)
    shape = dispatch._input_class("lstm", probe)
    reason = dispatch._reason("lstm", "cuda", probe, auto=False)
    if reason is not None:
        return Verdict("lstm", "cuda", dtype_name(dtype), str(shape), False, worst="skipped",
                       error=reason)  # fmt: skip
    if not _device_check.checks_enabled():
        return Verdict("lstm", "cuda", dtype_name(dtype), str(shape), True,
                       worst=f"not checked ({_device_check.CHECK_ENV}=0)")  # fmt: skip
    return _contained.first_use_verdict("lstm", "cuda", device, dtype, shape)


def _row(device, op: str, backend: str, dtype: torch.dtype, shape: tuple) -> tuple:
    """A check of ``plan``: contained, and stored where ``auto`` looks for it."""

    def run() -> Verdict:
        job = _contained.spec(op, backend, device, dtype, shape)
        verdict = _contained.run_check(job)
        store = _device_check.FIRST_USE
        store.store(store.key(op, backend, device, dtype, shape), verdict)
        return verdict

    return (op, backend, dtype, run)


def plan(device: torch.device, dtypes: Sequence[torch.dtype], hidden: int, batch: int,
         tiny: bool) -> List[tuple]:  # fmt: skip
    """The checks to run: ``(op, backend, dtype, callable -> Verdict)``."""
    width, features = (16, 40) if tiny else (1024, 4096)
    if tiny:
        hidden = 24
    lstm_class = (("H", hidden), ("B", _device_check.batch_bucket(batch)))
    rows = []
    for dtype in dtypes:
        rows.append(_row(device, "boom", "triton", dtype, (("E", width), ("F", features))))
        rows.append(_row(device, "attention", "triton", dtype, (("E", width),)))
        rows.append(_row(device, "decode", "triton", dtype, (("E", width),)))
        rows.append(_row(device, "lstm", "triton", dtype, lstm_class))
        if device.type != "cuda":
            continue
        reason = dispatch._reason("lstm", "cuda", _lstm_probe(device, dtype, hidden, batch), False)
        if reason is not None:
            note = f"H={hidden} B={batch}"
            rows.append(("lstm", "cuda", dtype,
                         lambda d=dtype, r=reason, n=note: _skipped("lstm", "cuda", d, n, r)))
        else:
            rows.append(_row(device, "lstm", "cuda", dtype, lstm_class))
    return rows


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
            echo(f"checking {op} on {backend} in {dtype_name(dtype)} ...")
        try:
            verdict = run()
        except Exception as exc:  # noqa: BLE001 - a broken check is a failed check
            verdict = Verdict(op, backend, dtype_name(dtype), "", False,
                              error=f"{type(exc).__name__}: {exc}")  # fmt: skip
        verdicts.append(verdict)
    return verdicts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sha_rnn_kernels.check",
        description="Check every sha_rnn_kernels kernel against PyTorch on this machine's GPU "
                    "(each check in a child process with a timeout, "
                    f"${_contained.TIMEOUT_ENV} seconds, default {_contained.DEFAULT_TIMEOUT:g}); "
                    "or, with --explain OP, say which backend runs OP's inputs and why.",
        epilog="Exit status: 0 every check passed (or --explain), 1 a check failed, 2 bad "
               "arguments. Verdicts are cached in $SHA_RNN_KERNELS_CACHE_DIR (else "
               "$XDG_CACHE_HOME/sha_rnn_kernels, else ~/.cache/sha_rnn_kernels).",
    )
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None,
                   help="dtypes to check (default: bf16 fp16 fp32; fp32 only on the interpreter)")
    p.add_argument("--hidden", type=int, default=1024, help="the LSTM's hidden size H")
    p.add_argument("--batch", type=int, default=16, help="the batch B (LSTM and --explain)")
    p.add_argument("--device", default=None,
                   help="device (default: the current CUDA device; --explain: cpu without one)")
    p.add_argument("--quiet", action="store_true", help="print the table only")
    p.add_argument("--explain", choices=OPS + ("all",), nargs="?", const="all", default=None,
                   metavar="OP", help=f"check nothing; explain the backend choice for OP (one "
                                      f"of {', '.join(OPS)}; every op when left out)")
    p.add_argument("--width", type=int, default=1024, help="--explain: the model width E")
    p.add_argument("--features", type=int, default=4096, help="--explain: the Boom width F")
    p.add_argument("--steps", type=int, default=64,
                   help="--explain: the sequence length T (K = 2T keys for attention)")
    p.add_argument("--backend", default=None,
                   help="--explain: the backend argument (a name or op=name,...; default: "
                        "$SHA_RNN_KERNELS_BACKEND, else auto)")
    return p  # fmt: skip


def explain_inputs(op: str, device: torch.device, dtype: torch.dtype, args) -> tuple:
    """Empty tensors of the shapes ``--explain`` describes (what the constraints look at)."""
    batch, width, steps = args.batch, args.width, args.steps

    def empty(*shape):
        return torch.empty(*shape, device=device, dtype=dtype)

    if op == "lstm":
        return empty(steps, batch, width), empty(4 * args.hidden, width), empty(
            4 * args.hidden, args.hidden)  # fmt: skip
    if op == "boom":
        return empty(steps, batch, width), empty(args.features, width), empty(args.features)
    if op == "attention":
        kv = empty(2 * steps, batch, width)
        return empty(steps, batch, width), kv, kv
    return empty(batch, width), empty(batch, 2 * steps, width)


def _explain(args) -> int:
    default = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device or default)
        backend = _backend.parse_backend(args.backend, "--backend")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: no CUDA device is available")
    except (RuntimeError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 2
    for op in OPS if args.explain == "all" else (args.explain,):
        for name in args.dtypes or ["bf16", "fp16", "fp32"]:
            inputs = explain_inputs(op, device, DTYPES[name], args)
            print(dispatch.explain(op, *inputs, backend=backend))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    sizes = (args.hidden, args.batch, args.width, args.features, args.steps)
    if min(sizes) < 1:
        print(f"--hidden, --batch, --width, --features and --steps must be >= 1; got "
              f"{', '.join(map(str, sizes))}", file=sys.stderr)  # fmt: skip
        return 2
    if args.explain:
        return _explain(args)
    echo = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    tiny = False
    if torch.cuda.is_available():
        device = torch.device(args.device or "cuda")
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
        print("FAILED: a kernel disagrees with PyTorch on this device, crashed or hung (see "
              "above). backend='auto' will not use it for that dtype and input class.")
        return 1
    print("All checks passed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
