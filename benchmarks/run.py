"""Time sha_rnn_kernels against its baselines; README.md ("Benchmark method") says what is measured.

Usage (from the repository root)::

    python benchmarks/run.py                                  # every op at the paper's shape
    python benchmarks/run.py --ops lstm,boom --impls cudnn,eager --dtypes bf16 --passes fwd+bwd
    python benchmarks/run.py --ops lstm,attention,boom --sweep       # plus the size sweeps
    python benchmarks/run.py --small --device cpu                     # a CPU smoke test (~1 min)

Prints a header (device, torch, triton, CUDA, commit), one line per measured configuration and
a table with the speedups against the op's baselines, and writes
``benchmarks/results/<device>.json`` (rows merged with those already there; ``--fresh`` starts
over) again after every measured row, so a run stopped by a time limit keeps its rows; at the
end ``<device>.md`` and ``<device>_<op>.png``. CPU runs write ``cpu-smoke.*`` and ``--small``
GPU runs ``<device>-small.*``: neither is a product figure. Impls that cannot run here (no GPU,
a package missing) leave their rows out; ``-v`` says why. A configuration that fails for any
other reason is reported and makes the exit status 1, after the other configurations ran.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import traceback

if __package__ in (None, ""):  # run as a script: make `benchmarks` and the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks import harness, output  # noqa: E402
from benchmarks.harness import Options, Unavailable  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _csv(text: str) -> tuple:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_args(argv=None) -> argparse.Namespace:
    ops = output.op_modules()
    all_impls = sorted({impl for m in ops.values() for impl in m.IMPLS})
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ops", type=_csv, default=tuple(ops), help=f"comma list of {list(ops)}")
    p.add_argument("--impls", type=_csv, default=None, help=f"comma list of {all_impls}")
    p.add_argument("--dtypes", type=_csv, default=None,
                   help="comma list of fp32, bf16, fp16 (default: bf16,fp16 on CUDA, fp32 on "
                        "the CPU; the epoch's original baseline is always fp16)")  # fmt: skip
    p.add_argument("--passes", type=_csv, default=harness.PASSES, help="fwd, fwd+bwd")
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument("--paper-only", action="store_true", help="paper shapes only (default)")
    sizes.add_argument("--sweep", action="store_true", help="also the size sweeps (README.md)")
    p.add_argument("--small", action="store_true",
                   help="shapes scaled down so everything runs on a CPU")  # fmt: skip
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    p.add_argument("--max-autotune", action="store_true",
                   help="also torch.compile(mode='max-autotune')")  # fmt: skip
    p.add_argument("--rep-ms", type=float, default=None,
                   help="budget of one timing run (200 on CUDA, 50 on CPU)")  # fmt: skip
    p.add_argument("--min-reps", type=int, default=None, help="at least this many timed calls")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 on the CPU, so a shared machine's load "
                        "disturbs the smoke test less; unchanged on CUDA)")  # fmt: skip
    p.add_argument("--loss-steps", type=int, default=3,
                   help="training steps of the epoch loss check (0: skip it)")  # fmt: skip
    p.add_argument("--out", default=None, help="results file stem (default: from the device)")
    p.add_argument("--results-dir", default=RESULTS)
    p.add_argument("--fresh", action="store_true", help="do not merge with the existing JSON")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failure")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    unknown = [op for op in args.ops if op not in ops]
    if unknown:
        p.error(f"--ops: unknown {unknown}; choose from {list(ops)}")
    if args.impls is not None and not set(args.impls) <= set(all_impls):
        p.error(f"--impls: unknown {sorted(set(args.impls) - set(all_impls))}; "
                f"choose from {all_impls}")  # fmt: skip
    if args.dtypes is not None and not set(args.dtypes) <= set(harness.DTYPES):
        p.error(f"--dtypes: choose from {list(harness.DTYPES)}; got {list(args.dtypes)}")
    if not set(args.passes) <= set(harness.PASSES):
        p.error(f"--passes: choose from {list(harness.PASSES)}; got {list(args.passes)}")
    return args


def make_options(args: argparse.Namespace) -> Options:
    if args.device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is present")
    on_cuda = device.type == "cuda"
    dtypes = args.dtypes or (("bf16", "fp16") if on_cuda else ("fp32",))
    if args.threads is not None or not on_cuda:
        torch.set_num_threads(args.threads or 1)
    return Options(
        device=device, dtypes=tuple(dtypes), passes=tuple(args.passes), impls=args.impls,
        small=args.small, sweep=args.sweep, max_autotune=args.max_autotune,
        warmup_calls=args.warmup, rep_ms=args.rep_ms or (200.0 if on_cuda else 50.0),
        min_reps=args.min_reps or (10 if on_cuda else 5), loss_steps=args.loss_steps,
        verbose=args.verbose,
    )  # fmt: skip


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _unavailable_types() -> tuple:
    from sha_rnn_kernels import BackendUnavailableError

    return (Unavailable, BackendUnavailableError)


def run_case(case, opts: Options, env: dict) -> dict:
    """Build, time and describe one configuration."""
    if "compile" in case.impl:
        torch._dynamo.reset()  # fresh compile caches: no recompile limit, no dynamic shapes
    bench = case.build()
    fields = harness.measure(bench, opts)
    if bench.after is not None:
        fields.update(bench.after())
    row = {
        "op": case.op, "impl": case.impl, "dtype": case.dtype, "pass": case.pass_,
        "paper_shape": case.paper_shape, "shape": dict(case.shape), **fields,
        **env, "case": case.case, "small": opts.small,
    }  # fmt: skip
    row.update({k: v for k, v in bench.extra.items() if v is not None})
    if case.op == "lstm":
        row["step_us"] = round(row["ms_median"] * 1e3 / case.shape["T"], 3)
    if case.op == "epoch":
        from benchmarks import epoch

        epoch.add_epoch_fields(row)
    return row


def run(opts: Options, ops: tuple, fail_fast: bool = False, on_row=None) -> tuple:
    """Every selected configuration; returns (rows, failures, absent). ``on_row(rows)`` is
    called with every row measured so far the moment a new one is (so a run cut short by a
    time limit keeps what it measured)."""
    modules = output.op_modules()
    env = harness.environment(opts.device)
    print(harness.header(env), flush=True)
    unavailable = _unavailable_types()
    rows, failures, absent = [], [], []
    for op in ops:
        module = modules[op]
        op_rows = []
        for case in harness.iter_selected(module.cases(opts), opts):
            started = time.perf_counter()
            try:
                row = run_case(case, opts, env)
            except unavailable as exc:
                absent.append((case.label, str(exc)))
                if opts.verbose or getattr(exc, "loud", False):
                    print(f"  absent  {case.label}: {exc}", flush=True)
                continue
            except Exception as exc:
                if fail_fast:
                    raise
                failures.append((case.label, f"{type(exc).__name__}: {exc}"))
                print(f"  FAILED  {case.label}: {type(exc).__name__}: {exc}", flush=True)
                if opts.verbose:
                    traceback.print_exc()
                continue
            finally:
                _free(opts.device)
            op_rows.append(row)
            if on_row is not None:
                on_row(rows + op_rows)
            took = time.perf_counter() - started
            print(f"  {row['ms_median']:>10.3f} ms  (run 2 {row['ms_median_run2']:.3f})  "
                  f"{case.label}  [{took:.1f} s]", flush=True)  # fmt: skip
        if op == "epoch" and op_rows:
            from benchmarks import epoch

            try:
                checks = epoch.loss_check(op_rows, opts)
            except Exception as exc:
                if fail_fast:
                    raise
                failures.append(("epoch loss check", f"{type(exc).__name__}: {exc}"))
                print(f"  FAILED  epoch loss check: {type(exc).__name__}: {exc}", flush=True)
                checks = {}
            for row in op_rows:
                row.update(checks.get((row["impl"], row["dtype"]), {}))
            _free(opts.device)
        rows += op_rows
    return rows, failures, absent


def main(argv=None) -> int:
    args = parse_args(argv)
    opts = make_options(args)
    torch.manual_seed(0)
    stem = args.out or harness.file_stem(opts.device, opts.small)
    os.makedirs(args.results_dir, exist_ok=True)
    json_path = os.path.join(args.results_dir, f"{stem}.json")
    old_rows = [] if args.fresh else output.load(json_path)

    def save(measured: list) -> None:  # after every row: a killed run keeps its rows
        output.write_json(json_path, output.merge(old_rows, measured))

    rows, failures, absent = run(opts, args.ops, fail_fast=args.fail_fast, on_row=save)
    env_header = harness.header(harness.environment(opts.device))
    for line in output.table_lines(rows):
        print(line)
    if absent and not opts.verbose:
        print(f"\n{len(absent)} configurations absent (impl unavailable here); -v lists why")
    all_rows = output.merge(old_rows, rows)
    if rows or args.fresh:
        output.write_json(json_path, all_rows)
        output.write_markdown(os.path.join(args.results_dir, f"{stem}.md"), all_rows,
                              env_header, stem)  # fmt: skip
        written = [] if args.no_plot else output.plot(args.results_dir, stem, all_rows)
        print(f"\nwrote {json_path} ({len(all_rows)} rows), {stem}.md"
              + (f", {len(written)} plots" if written else ""))  # fmt: skip
    if failures:
        print(f"\n{len(failures)} configurations FAILED:")
        for label, message in failures:
            print(f"  {label}: {message}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
