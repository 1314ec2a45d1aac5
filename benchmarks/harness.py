"""The machinery every op module shares: cases, timers, the environment header and result rows.

An op module (``benchmarks/lstm.py`` ...) turns :class:`Options` into :class:`Case` objects. A
case knows its labels (op, impl, dtype, pass, shape) and how to build its timed region; building
may raise :class:`Unavailable` (or the library's ``BackendUnavailableError``), and then the row is
simply absent. :func:`measure` times a built :class:`Bench` twice and returns the row's numbers.

Timing on CUDA is ``triton.testing.do_bench`` (median, 20th and 80th percentile of CUDA-event
times, the L2 cache flushed before every call). On the CPU a ``time.perf_counter`` loop stands in,
so the harness can be exercised without a GPU; CPU numbers are a smoke test, not a result.
Warm-up calls (compilation, autotuning, JIT builds) always run before anything is timed.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PASSES = ("fwd", "fwd+bwd")

# ceil(90e6 / (16 * 1024)): the steps of one enwik8 training epoch at the paper's batch and bptt.
ENWIK8_TRAIN_TOKENS = 90_000_000


class Unavailable(Exception):
    """This impl cannot run here (missing package, CPU-only machine...): its row is absent.

    ``loud`` marks a reason worth printing without ``--verbose`` (an installed package that
    failed on this shape, rather than one that is simply missing)."""

    def __init__(self, message: str, loud: bool = False) -> None:
        super().__init__(message)
        self.loud = loud


@dataclass
class Options:
    """What the command line asked for; op modules read it to enumerate their cases."""

    device: torch.device
    dtypes: tuple = ("bf16",)
    passes: tuple = PASSES
    impls: Optional[tuple] = None  # None: every impl of the op
    small: bool = False
    sweep: bool = False
    max_autotune: bool = False
    warmup_calls: int = 3
    rep_ms: float = 200.0
    min_reps: int = 10
    loss_steps: int = 3
    verbose: bool = False

    def wants(self, impl: str) -> bool:
        return self.impls is None or impl in self.impls

    def log(self, message: str) -> None:
        if self.verbose:
            print(f"  [verbose] {message}", flush=True)


@dataclass
class Bench:
    """A built case: ``fn`` is the timed region (one call = one iteration).

    ``variants`` replaces ``fn`` when the case has several ways to run (the SDPA backends): each
    is measured and the fastest becomes the row, its name stored under ``variant_field`` and every
    variant's median under ``variant_field + "s_ms"``. ``extra`` is merged into the row;
    ``after`` runs once after timing and returns more fields (a profile, a loss check...).
    """

    fn: Optional[Callable[[], Any]] = None
    variants: Optional[dict] = None
    variant_field: str = "variant"
    extra: dict = field(default_factory=dict)
    after: Optional[Callable[[], dict]] = None


@dataclass
class Case:
    op: str
    impl: str
    dtype: str
    pass_: str
    shape: dict
    paper_shape: bool  # the paper's shape (False for every --small case)
    case: str  # "paper" (the paper case, scaled down under --small) or "sweep"
    build: Callable[[], Bench]
    dtype_fixed: bool = False  # a baseline with its own recipe's dtype, run whatever --dtypes says

    @property
    def label(self) -> str:
        dims = ",".join(f"{k}={v}" for k, v in self.shape.items())
        return f"{self.op}/{self.impl}/{self.dtype}/{self.pass_} [{dims}]"


def sweep_shapes(opts: Options, paper: dict, small: dict, sweeps: dict) -> Iterator[tuple]:
    """``(shape, is the paper case)``: the paper (or --small) shape, then with --sweep every
    other point of ``sweeps``: ``{"K": ((paper values), (small values))}``; several entries sweep
    their product (a value may be a dict of dims that change together)."""
    base = small if opts.small else paper
    yield dict(base), True
    if not opts.sweep:
        return
    axes = [(key, values[1] if opts.small else values[0]) for key, values in sweeps.items()]
    points = [dict(base)]
    for key, values in axes:
        points = [
            dict(point, **(value if isinstance(value, dict) else {key: value}))
            for point in points
            for value in values
        ]  # fmt: skip
    for shape in points:
        if shape != base:
            yield shape, False


def expand_cases(
    op: str, impls: tuple, opts: Options, shapes: Iterator[tuple], builder: Callable
) -> Iterator[Case]:
    """One Case per (shape, dtype, pass, impl); ``builder(impl, dtype, pass_, shape, opts)``."""
    for shape, paper in shapes:
        for dtype in opts.dtypes:
            for pass_ in opts.passes:
                for impl in impls:
                    if impl == "compile-max-autotune" and not opts.max_autotune:
                        continue
                    yield Case(
                        op=op, impl=impl, dtype=dtype, pass_=pass_, shape=shape,
                        paper_shape=paper and not opts.small,
                        case="paper" if paper else "sweep",
                        build=builder(impl, dtype, pass_, shape, opts),
                    )  # fmt: skip


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------
def randn(
    *shape,
    dtype: torch.dtype,
    device: torch.device,
    scale: float = 1.0,
    requires_grad: bool = False,
) -> torch.Tensor:
    """Fresh normal noise (never zeros: a kernel may shortcut zeros or denormals)."""
    t = torch.randn(*shape, device=device, dtype=torch.float32).mul_(scale).to(dtype)
    return t.requires_grad_(requires_grad)


def uniform(
    *shape, bound: float, dtype: torch.dtype, device: torch.device, requires_grad: bool = False
) -> torch.Tensor:
    t = torch.empty(*shape, device=device, dtype=torch.float32).uniform_(-bound, bound).to(dtype)
    return t.requires_grad_(requires_grad)


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 50 * 2**20))


def rotation_count(bytes_per_set: int, device: torch.device, cap_bytes: int = 2 * 2**30) -> int:
    """How many input sets to cycle through so a memory-bound op never reads its inputs from
    a warm L2 (do_bench also flushes L2 before each call; rotation covers the CPU timer and
    caches do_bench does not flush). At least 1, at most 4, and never past ``cap_bytes``."""
    l2 = l2_bytes(device)
    if l2 == 0 or bytes_per_set <= 0:
        return 1
    count = max(1, min(4, math.ceil(2 * l2 / bytes_per_set)))
    while count > 1 and count * bytes_per_set > cap_bytes:
        count -= 1
    return count


class Rotation:
    """Cycles through pre-built input sets: ``rotation.next()`` returns the next one."""

    def __init__(self, sets: list) -> None:
        self.sets = list(sets)
        self._index = -1

    def next(self):
        self._index = (self._index + 1) % len(self.sets)
        return self.sets[self._index]

    @property
    def first(self):
        return self.sets[0]


def rotated(make: Callable[[], dict], device: torch.device) -> Rotation:
    """A :class:`Rotation` of ``make()`` sets, as many as :func:`rotation_count` asks for."""
    sets = [make()]
    if device.type == "cuda":
        count = rotation_count(set_bytes(sets[0]), device)
        sets += [make() for _ in range(count - 1)]
    return Rotation(sets)


def set_bytes(inputs: dict) -> int:
    """Bytes of the tensors (and modules' parameters) of one input set."""
    total = 0
    for value in inputs.values():
        if isinstance(value, torch.nn.Module):
            total += tensor_bytes(*value.parameters())
        elif isinstance(value, torch.Tensor):
            total += tensor_bytes(value)
    return total


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def autocast(device: torch.device, dtype: str):
    """Autocast to ``dtype`` for bf16/fp16, a no-op for fp32."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------
def _cuda_once_ms(fn: Callable[[], Any]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def _quantiles(samples: list) -> tuple:
    samples = sorted(samples)
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    cuts = statistics.quantiles(samples, n=10, method="inclusive")
    return statistics.median(samples), cuts[1], cuts[7]


def time_cuda(fn: Callable[[], Any], opts: Options) -> tuple:
    """(median, p20, p80) in ms from ``triton.testing.do_bench``, with enough repetitions for
    ``opts.min_reps`` samples even when one call is long (a training step)."""
    from triton.testing import do_bench

    estimate = min(_cuda_once_ms(fn) for _ in range(2))
    rep = max(opts.rep_ms, opts.min_reps * estimate)
    result = do_bench(fn, warmup=max(1.0, estimate), rep=rep, quantiles=[0.5, 0.2, 0.8])
    median, p20, p80 = (float(v) for v in result)
    return median, p20, p80


def time_cpu(fn: Callable[[], Any], opts: Options) -> tuple:
    """(median, p20, p80) in ms of ``time.perf_counter`` around single calls: at least
    ``min_reps`` calls (3 when one call alone is longer than the budget), up to ``rep_ms``."""
    samples = []
    budget = opts.rep_ms / 1e3
    started = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
        elapsed = time.perf_counter() - started
        enough = len(samples) >= opts.min_reps or (len(samples) >= 3 and elapsed > budget)
        if enough and elapsed >= budget or len(samples) >= 1000:
            break
    return _quantiles(samples)


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> Optional[float]:
    """Peak of ``torch.cuda.max_memory_allocated`` over one call (inputs and weights included),
    after a reset; None off CUDA (the CPU has no such counter)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def _spread_pct(a: float, b: float) -> float:
    """The gap between two runs' medians, in percent of the smaller."""
    return round(100.0 * abs(a - b) / max(min(a, b), 1e-9), 2)


def _time_fn(fn: Callable[[], Any], opts: Options) -> tuple:
    timer = time_cuda if opts.device.type == "cuda" else time_cpu
    return timer(fn, opts)


def warm_up(fn: Callable[[], Any], opts: Options) -> None:
    for _ in range(opts.warmup_calls):
        fn()
    sync(opts.device)


def measure(bench: Bench, opts: Options) -> dict:
    """Warm up, then time ``bench`` twice; returns the numeric fields of a row."""
    fields: dict = {}
    fn = bench.fn
    if bench.variants:
        medians = {}
        for name, variant in bench.variants.items():
            warm_up(variant, opts)
            medians[name] = round(_time_fn(variant, opts)[0], 4)
        best = min(medians, key=medians.get)
        fn = bench.variants[best]
        fields[bench.variant_field] = best
        fields[bench.variant_field + "s_ms"] = medians
    elif fn is None:
        raise ValueError("a Bench needs fn or variants")
    warm_up(fn, opts)
    first = _time_fn(fn, opts)
    second = _time_fn(fn, opts)
    fields.update(
        ms_median=round(first[0], 4),
        ms_p20=round(first[1], 4),
        ms_p80=round(first[2], 4),
        ms_median_run2=round(second[0], 4),
        spread_pct=_spread_pct(first[0], second[0]),
        peak_mem_mb=peak_memory_mb(fn, opts.device),
        timer="triton.testing.do_bench" if opts.device.type == "cuda" else "time.perf_counter",
    )
    return fields


def cuda_kernel_names(fn: Callable[[], Any], limit: int = 6) -> list:
    """The CUDA kernels one call of ``fn`` launches, by total time (torch.profiler); empty off
    CUDA. Used to record which cuDNN algorithm / SDPA backend actually ran."""
    from torch.profiler import ProfilerActivity, profile

    try:  # a diagnostic only: a profiler that cannot start must not cost the row its timing
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    except RuntimeError as exc:
        return [f"profiler failed: {exc}"]
    events = [e for e in prof.key_averages() if getattr(e, "device_type", None) is not None]
    cuda_events = [e for e in events if str(e.device_type).endswith("CUDA")]
    cuda_events.sort(key=lambda e: getattr(e, "device_time_total", 0), reverse=True)
    return [e.key for e in cuda_events[:limit]]


# ------------------------------------------------------------------------------------------
# environment
# ------------------------------------------------------------------------------------------
def git_commit() -> str:
    """Short hash of HEAD, with ``-dirty`` when tracked files differ from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
            text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "uncommitted"
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=REPO_ROOT).returncode != 0
    return head + ("-dirty" if dirty else "")


def environment(device: torch.device) -> dict:
    """What every row records about where it was measured."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "device": device_name(device),
        "torch": torch.__version__.split("+")[0],
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "commit": git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["sm"] = f"{props.major}.{props.minor}"
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


def header(env: dict) -> str:
    parts = [f"device: {env['device']}"]
    if "sm" in env:
        parts.append(f"sm_{env['sm'].replace('.', '')}")
    parts += [f"torch {env['torch']}", f"triton {env['triton']}", f"CUDA {env['cuda']}"]
    if env.get("cudnn"):
        parts.append(f"cuDNN {env['cudnn']}")
    parts.append(f"commit {env['commit']}")
    return " | ".join(parts)


def file_stem(device: torch.device, small: bool) -> str:
    """``benchmarks/results/<stem>.json``: the device's name in lower-case words; CPU runs and
    --small runs get their own stems so they never overwrite a GPU's real figures."""
    if device.type != "cuda":
        return "cpu-smoke"
    name = torch.cuda.get_device_name(device).lower()
    stem = "".join(c if c.isalnum() else "-" for c in name)
    stem = "-".join(part for part in stem.split("-") if part)
    return stem + ("-small" if small else "")


def row_key(row: dict) -> tuple:
    """Two rows with this key measure the same thing (a rerun replaces the older one)."""
    shape = tuple(sorted(row["shape"].items()))
    return (row["op"], row["impl"], row["dtype"], row["pass"], shape)


def iter_selected(cases: Iterator[Case], opts: Options) -> Iterator[Case]:
    for case in cases:
        dtype_ok = case.dtype_fixed or case.dtype in opts.dtypes
        if opts.wants(case.impl) and dtype_ok and case.pass_ in opts.passes:
            yield case
