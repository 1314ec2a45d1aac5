"""Compile every Triton kernel of sha_rnn_kernels ahead of time for real GPU targets, no GPU needed.

The interpreter tests (``TRITON_INTERPRET=1``) check what the kernels compute, never whether they
compile for a GPU: a tile that needs more shared memory than an SM has, a dot shape the tensor
cores reject or an accumulator that spills to local memory all pass on CPU. This tool runs the
real compiler pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas) for sm_90 (H100) and sm_80 (A100)
on a CPU-only machine and reports, per (kernel, config, dtype, arch): registers per thread,
spilled bytes, shared memory, num_warps, and whether the launch would fit.

What gets compiled is what the launchers would launch. Each op's launcher (``boom_forward``,
``attention_backward``, ``lstm_forward``, ...) is called on ``meta`` tensors of the paper's shapes
with the kernels swapped for recorders, so the constexpr switches, block-size heuristics, grids'
meta-parameters and Triton's own argument specialisation (``tt.divisibility`` of pointers and
integers, integers equal to 1 turned into constants) are exactly those of a real launch. An
autotuned kernel is expanded into the configs its autotuner would consider for those arguments
(after ``early_config_prune``, run for each target architecture). Nothing touches CUDA:
``TRITON_INTERPRET`` is forced to 0 before the ops are imported, and targets are named
explicitly.

Paper shapes: Boom 16384 rows x 1024 -> 4096; attention T=1024, K=5000, B=16, E=1024; LSTM
T=1024, H=1024, input 1024, B=16 and B=1.

Usage::

    python tools/compile_triton.py                 # everything, sm_90 and sm_80, three dtypes
    python tools/compile_triton.py --quick         # bf16, one config and variant per kernel
    python tools/compile_triton.py --kernels attention --arch 90 --dtypes bf16 --verbose

Two Triton releases: the machines measured on run torch 2.11 with triton 3.6, whose register
allocation differs from the current release's (three Boom tiles spilled under 3.6 only), so check
both with ``--max-spill 0``; a CPU wheel of torch is enough, no GPU::

    python3 -m venv /tmp/triton36 && /tmp/triton36/bin/pip install torch triton==3.6.0
    /tmp/triton36/bin/python tools/compile_triton.py --max-spill 0   # then the same under 3.9

Exit status: 0 when everything compiled and fits; 1 on a compile error or a launch that does not
fit (shared memory over the per-block limit, registers x threads over the register file), or
spills over ``--max-spill`` when that is given; 2 on bad arguments or a missing ptxas.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterator, Optional

# Before anything imports triton or the ops: @triton.jit reads it when a kernel is defined.
os.environ["TRITON_INTERPRET"] = "0"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Largest dynamic shared memory per block (the opt-in limit Triton checks at load time) and the
# register file per SM, by compute capability.
ARCHS = {
    90: {"name": "H100", "smem": 227 * 1024, "regfile": 65536},
    80: {"name": "A100", "smem": 163 * 1024, "regfile": 65536},
}
DTYPES = ("bf16", "fp16", "fp32")
OPS = ("boom", "attention", "lstm", "decode")
# A seed not divisible by 16, like most drawn seeds (a multiple of 16 would specialise it).
SEED = 1234567
QUICK_DTYPE = "bf16"


# ------------------------------------------------------------------------------------------------
# The launches: every op's launchers called on meta tensors of the paper's shapes
# ------------------------------------------------------------------------------------------------
def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _scenarios(op: str, dtype_name: str) -> Iterator[tuple[str, Callable[[], None]]]:
    """(name, call) pairs: each call runs one op's launchers the way the model uses them."""
    import torch

    dtype = _torch_dtype(dtype_name)

    def meta(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt, device="meta")

    if op == "boom":
        from sha_rnn_kernels.ops import boom

        paper = (16384, 1024, 4096)  # rows, E, F
        # Training saves the pre-activation; inference (eval: no dropout) does not. "E=2" is
        # the narrowest layer the API takes with dropout (16-wide tiles). Both forward designs:
        # the default (cuBLAS GEMM + _boom_sum_kernel) and fused=True (_boom_fwd_kernel).
        for fused in (False, True):
            for name, (rows, width, features), p, save_pre in (
                ("train", paper, 0.1, True),
                ("train p=0", paper, 0.0, True),
                ("eval", paper, 0.0, False),
                ("train E=2", (paper[0], 2, 8), 0.1, True),
            ):
                x, weight, bias = meta(rows, width), meta(features, width), meta(features)
                grad_y, pre = meta(rows, width), meta(rows, features)

                def call(p=p, save_pre=save_pre, x=x, weight=weight, bias=bias, grad_y=grad_y,
                         pre=pre, fused=fused):
                    boom.boom_forward(x, weight, bias, p, SEED, save_pre, fused)
                    if save_pre:
                        boom.boom_backward(grad_y, pre, p, SEED)

                yield name + (" fused" if fused else ""), call
    elif op == "attention":
        from sha_rnn_kernels.ops import attention

        seq_len, key_len, batch, width = 1024, 5000, 16, 1024
        q, k, v = (
            meta(seq_len, batch, width),
            meta(key_len, batch, width),
            meta(key_len, batch, width),
        )
        gate = meta(width)
        grad_out = meta(seq_len, batch, width)
        # The model always passes both gates; the functional API allows none. "chunked" lowers
        # the score budget so backward recomputes the scores (the RECOMPUTE row pass);
        # "detached" is SHALayer's call: the memory's keys take no gradient (the value-dropout
        # pass starts past them).
        memory_len = key_len - seq_len
        for name, gates, p, budget, detached in (
            ("train", True, 0.1, None, 0),
            ("train detached", True, 0.1, None, memory_len),
            ("eval", True, 0.0, None, 0),
            ("no gates", False, 0.0, None, 0),
            ("train chunked", True, 0.1, 1 << 27, 0),
            ("train chunked detached", True, 0.1, 1 << 27, memory_len),
        ):

            def call(gates=gates, p=p, budget=budget, detached=detached):
                key_gate = gate if gates else None
                previous = attention.SCORE_BUDGET_BYTES
                attention.SCORE_BUDGET_BYTES = budget or previous
                try:
                    saved = attention.attention_forward(q, k, v, key_gate, key_gate, p, p, SEED)
                    attention.attention_backward(
                        grad_out, q, k, v, key_gate, key_gate, *saved, p, p, SEED, detached
                    )
                finally:
                    attention.SCORE_BUDGET_BYTES = previous

            yield name, call
    elif op == "lstm":
        from sha_rnn_kernels.ops import lstm

        steps, hidden, inputs = 1024, 1024, 1024
        for batch in (16, 1):
            x = meta(steps, batch, inputs)
            w_ih, w_hh, b = meta(4 * hidden, inputs), meta(4 * hidden, hidden), meta(4 * hidden)
            state = meta(batch, hidden)
            seq, gates = meta(steps, batch, hidden), meta(steps, batch, 4 * hidden)
            # The first segment starts from zeros (no h0/c0), later ones from the carried state.
            for name, h0 in ((f"B={batch} state", state), (f"B={batch} zero state", None)):

                def call(x=x, w_ih=w_ih, w_hh=w_hh, b=b, h0=h0, state=state, seq=seq, gates=gates):
                    lstm.lstm_forward(x, w_ih, w_hh, b, b, h0, h0)
                    lstm.lstm_backward(seq, state, state, x, w_ih, w_hh, h0, h0, seq, gates, seq)

                yield name, call
    elif op == "decode":
        from sha_rnn_kernels.ops import decode

        # Generation: one query per stream over the whole memory (max_positions keys).
        key_len, width = 5000, 1024
        gate = meta(width)
        for batch in (1, 16):
            q, keys = meta(batch, width), meta(batch, key_len, width)

            def call(q=q, keys=keys):
                decode.decode_attention(q, keys, gate, gate)

            yield f"B={batch}", call
    else:  # pragma: no cover - argparse restricts the choices
        raise ValueError(f"unknown op {op!r}")


class _Recorder:
    """Stands in for a kernel in its module: ``kernel[grid](*args, **kwargs)`` is recorded."""

    def __init__(self, name: str, kernel, calls: list):
        self.name, self.kernel, self.calls = name, kernel, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((self.name, self.kernel, args, kwargs))

        return launch


def _kernels_of(module) -> dict:
    """The module's kernels: JITFunctions and autotuners defined at module level."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    return {
        name: obj
        for name, obj in vars(module).items()
        if isinstance(obj, (JITFunction, Autotuner)) and name.endswith("_kernel")
    }


def _op_modules(op: str) -> list:
    """``sha_rnn_kernels.ops.<op>`` and the files it is split into (``ops/_<op>_*.py``): a
    launcher finds its kernels in its own module, so the recorders go into each of them."""
    import importlib
    import pkgutil

    import sha_rnn_kernels.ops as ops

    names = (m.name for m in pkgutil.iter_modules(ops.__path__))
    parts = sorted(name for name in names if name.startswith(f"_{op}_"))
    return [importlib.import_module(f"sha_rnn_kernels.ops.{name}") for name in (op, *parts)]


def _record(op: str, dtype_name: str) -> list:
    """Every launch the op's scenarios make, as (scenario, kernel name, kernel, args, kwargs)."""
    modules = _op_modules(op)
    recorded = []
    for scenario, call in _scenarios(op, dtype_name):
        calls: list = []
        originals = [(module, _kernels_of(module)) for module in modules]
        try:
            for module, kernels in originals:
                for name, kernel in kernels.items():
                    setattr(module, name, _Recorder(name, kernel, calls))
            call()
        finally:
            for module, kernels in originals:
                for name, kernel in kernels.items():
                    setattr(module, name, kernel)
        recorded.extend((scenario, *c) for c in calls)
    return recorded


@dataclasses.dataclass
class Task:
    """One compilation: a kernel specialisation for one target."""

    op: str
    kernel: str  # attribute name in sha_rnn_kernels.ops.<op>
    scenario: str
    dtype: str
    arch: int
    config: str  # block sizes, warps and stages
    switches: str  # the kernel's constexpr switches that are on
    launches: int  # how many recorded launches use this specialisation
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    config_index: int  # position in the autotune list after pruning (0 for plain kernels)


def _config_label(constexprs: dict, names: list, options) -> str:
    blocks = []
    for (index,), value in sorted(constexprs.items()):
        name = names[index]
        if name.startswith(("BLOCK_", "GROUP_")):
            blocks.append(f"{name.split('_', 1)[1][0]}{value}")
    return f"{'x'.join(blocks)} w{options.num_warps} s{options.num_stages}"


def _switch_label(constexprs: dict, params) -> str:
    on = []
    for (index,), value in sorted(constexprs.items()):
        param = params[index]
        if not param.is_constexpr or param.name.startswith(("BLOCK_", "GROUP_")):
            continue
        short = param.name.lower().removeprefix("has_")
        if value is True:
            on.append(short)
        elif value is not False and value is not None:
            on.append(f"{short}={value}")
    return ",".join(on) or "-"


def _variants(kernel, args: tuple, kwargs: dict, arch: int) -> list[dict]:
    """The launch keywords of one recorded launch on ``arch``: an autotuner's configs after its
    ``early_config_prune``, run as on that architecture (for meta tensors the ops read the
    target's compute capability from ``_common.META_CAPABILITY``), or the launch's own."""
    from triton.runtime.autotuner import Autotuner

    from sha_rnn_kernels.ops import _common

    if not isinstance(kernel, Autotuner):
        return [dict(kwargs)]
    configs = kernel.configs
    if kernel.early_config_prune:
        previous = _common.META_CAPABILITY
        _common.META_CAPABILITY = (arch // 10, arch % 10)
        try:
            configs = kernel.early_config_prune(
                configs, dict(zip(kernel.arg_names, args)), **kwargs
            )
        finally:
            _common.META_CAPABILITY = previous
    return [{**kwargs, **config.all_kwargs()} for config in configs]


def _expand(op: str, dtype_name: str, archs: list[int]) -> list[Task]:
    """The distinct compilations behind the recorded launches, for every target."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import create_function_from_signature

    tasks: dict = {}
    binders: dict = {}
    for scenario, name, kernel, args, kwargs in _record(op, dtype_name):
        fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
        for arch in archs:
            for index, launch_kwargs in enumerate(_variants(kernel, args, kwargs, arch)):
                launch_kwargs["debug"] = False
                # Triton 3.9's own launch path (JITFunction.run): the binder turns the arguments
                # into a specialisation, _pack_args into ASTSource's signature/constexprs/attrs.
                key = (name, arch)
                if key not in binders:
                    backend = make_backend(GPUTarget("cuda", arch, 32))
                    binders[key] = (
                        backend,
                        create_function_from_signature(fn.signature, fn.params, backend),
                    )
                backend, binder = binders[key]
                bound, specialization, options = binder(*args, **launch_kwargs)
                options, signature, constexprs, attrs = fn._pack_args(
                    backend, launch_kwargs, bound, specialization, options
                )
                option_kwargs = {
                    k: launch_kwargs[k]
                    for k in ("num_warps", "num_stages", "num_ctas", "maxnreg")
                    if launch_kwargs.get(k) is not None
                }
                dedup = (name, arch, repr(specialization), repr(sorted(option_kwargs.items())))
                if dedup in tasks:
                    tasks[dedup].launches += 1
                    continue
                tasks[dedup] = Task(
                    op=op,
                    kernel=name,
                    scenario=scenario,
                    dtype=dtype_name,
                    arch=arch,
                    config=_config_label(constexprs, fn.arg_names, options),
                    switches=_switch_label(constexprs, fn.params),
                    launches=1,
                    signature=signature,
                    constexprs=constexprs,
                    attrs=attrs,
                    options=option_kwargs,
                    config_index=index,
                )
    return list(tasks.values())


def _quick(tasks: list[Task]) -> list[Task]:
    """One config and one variant per kernel and arch: the first autotune config (the list's
    largest tiles), in the first scenario (training), at the specialisation launched most often
    (the LSTM's steady-state step rather than its first or last)."""
    chosen: dict = {}
    for task in tasks:
        if task.config_index != 0:
            continue
        key = (task.kernel, task.arch)
        best = chosen.get(key)
        if best is None or (task.scenario == best.scenario and task.launches > best.launches):
            chosen[key] = task
    return list(chosen.values())


# ------------------------------------------------------------------------------------------------
# Compilation (in worker processes)
# ------------------------------------------------------------------------------------------------
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)


def _worker_init(cache_dir: str) -> None:
    os.environ["TRITON_INTERPRET"] = "0"
    from triton import knobs

    knobs.cache.dir = cache_dir
    # Every task compiles afresh so that ptxas runs and its log (registers, spills) is printed.
    knobs.compilation.always_compile = True
    knobs.nvidia.dump_ptxas_log = True
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")


def _compile(task: Task) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(f"sha_rnn_kernels.ops.{task.op}"), task.kernel)
    fn = kernel.fn if hasattr(kernel, "configs") else kernel
    source = ASTSource(fn, signature=task.signature, constexprs=task.constexprs, attrs=task.attrs)
    log = io.StringIO()
    start = time.perf_counter()
    result = {"seconds": 0.0, "error": None}
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                source, target=GPUTarget("cuda", task.arch, 32), options=task.options
            )
    except Exception as exc:  # every failure is reported, none is swallowed: the run exits 1
        message = str(exc).strip().splitlines()
        result["error"] = f"{type(exc).__name__}: {' | '.join(message[:6])}"[:600]
        result["seconds"] = time.perf_counter() - start
        return result
    result["seconds"] = time.perf_counter() - start
    text = log.getvalue()
    regs, spills = _PTXAS_REGS.findall(text), _PTXAS_SPILLS.findall(text)
    if not regs or not spills:
        result["error"] = f"no ptxas resource line in its log: {text[-300:]!r}"
        return result
    meta = compiled.metadata
    result.update(
        regs=int(regs[-1]),
        stack=int(spills[-1][0]),
        spill_stores=int(spills[-1][1]),
        spill_loads=int(spills[-1][2]),
        smem=int(meta.shared),
        num_warps=int(meta.num_warps),
        num_stages=int(meta.num_stages),
    )
    return result


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def _judge(task: Task, result: dict, max_spill: Optional[int]) -> list[str]:
    """The problems of one compilation (empty when it compiled and fits)."""
    if result["error"]:
        return [f"compile error: {result['error']}"]
    limits = ARCHS[task.arch]
    problems = []
    if result["smem"] > limits["smem"]:
        problems.append(
            f"shared memory {result['smem']} B > {limits['smem']} B "
            f"({limits['name']} per-block limit)"
        )
    threads = 32 * result["num_warps"]
    if result["regs"] * threads > limits["regfile"]:
        problems.append(f"{result['regs']} registers x {threads} threads > {limits['regfile']}")
    if max_spill is not None and result["spill_stores"] > max_spill:
        problems.append(f"spills {result['spill_stores']} B > --max-spill {max_spill} B")
    return problems


def _row(task: Task, result: dict) -> list[str]:
    if result["error"]:
        stats = ["-", "-", "-", "-", "ERROR"]
    else:
        fits = (
            result["smem"] <= ARCHS[task.arch]["smem"]
            and result["regs"] * 32 * result["num_warps"] <= ARCHS[task.arch]["regfile"]
        )
        stats = [
            str(result["regs"]),
            str(result["spill_stores"]),
            f"{result['smem'] / 1024:.1f}",
            str(result["num_warps"]),
            "yes" if fits else "NO",
        ]
    return [
        task.kernel,
        task.config,
        task.switches,
        task.dtype,
        f"sm_{task.arch}",
        *stats,
        f"{result['seconds']:.1f}",
    ]


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    numeric = {i for i, h in enumerate(header) if h in ("regs", "spill B", "smem KB", "warps", "s")}
    for r in [header, *rows]:
        print(
            "  ".join(
                c.rjust(w) if i in numeric else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths))
            ).rstrip()
        )


def _summary(tasks: list[Task], results: list[dict]) -> list[list[str]]:
    """One row per (kernel, config, arch): the worst regs/spills/smem over dtypes and switches."""
    groups: dict = {}
    for task, result in zip(tasks, results):
        groups.setdefault((task.kernel, task.config, task.arch), []).append((task, result))
    rows = []
    for (kernel, config, arch), members in groups.items():
        ok = [(t, r) for t, r in members if not r["error"]]
        errors = len(members) - len(ok)
        if ok:
            worst_spill = max(ok, key=lambda m: (m[1]["spill_stores"], m[1]["regs"]))
            regs = f"{min(r['regs'] for _, r in ok)}-{max(r['regs'] for _, r in ok)}"
            smem = max(r["smem"] for _, r in ok)
            fits = all(not _judge(t, r, None) for t, r in ok)
            spill = worst_spill[1]["spill_stores"]
            where = (
                f"{worst_spill[0].dtype} {worst_spill[0].switches} ({worst_spill[0].scenario})"
                if spill
                else ""
            )
            rows.append(
                [
                    kernel,
                    config,
                    f"sm_{arch}",
                    str(len(members)),
                    regs,
                    str(spill),
                    where,
                    f"{smem / 1024:.1f}",
                    str(ok[0][1]["num_warps"]),
                    ("yes" if fits else "NO") + (f", {errors} errors" if errors else ""),
                ]
            )
        else:
            rows.append(
                [
                    kernel,
                    config,
                    f"sm_{arch}",
                    str(len(members)),
                    "-",
                    "-",
                    "",
                    "-",
                    "-",
                    f"{errors} errors",
                ]
            )
    return rows


def _bundled_ptxas_missing() -> list[str]:
    from triton import knobs

    missing = []
    for tool in (knobs.nvidia.ptxas, knobs.nvidia.ptxas_blackwell):
        try:
            path = tool.path
        except Exception as exc:  # knobs raise when no binary is found
            missing.append(str(exc))
            continue
        if not path or not os.path.exists(path):
            missing.append(str(path))
    return missing


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_DTYPE} only, one config and one variant per kernel",
    )
    parser.add_argument(
        "--kernels",
        nargs="+",
        default=None,
        metavar="NAME",
        help="ops (boom, attention, lstm, decode) or substrings of kernel names",
    )
    parser.add_argument(
        "--arch",
        nargs="+",
        type=int,
        default=[90, 80],
        choices=sorted(ARCHS),
        help="compute capabilities (default: 90 80)",
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=None,
        choices=DTYPES,
        help=f"default: all ({QUICK_DTYPE} with --quick)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="compiler processes (default: one per core)",
    )
    parser.add_argument(
        "--max-spill",
        type=int,
        default=None,
        metavar="BYTES",
        help="also fail when a kernel spills more than this",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="one row per compilation instead of the summary"
    )
    parser.add_argument("--json", metavar="PATH", help="write every result to this file")
    parser.add_argument("--list", action="store_true", help="list the compilations and stop")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")

    started = time.perf_counter()
    missing = _bundled_ptxas_missing()
    if missing:
        print(f"compile_triton: ptxas not found ({'; '.join(missing)})", file=sys.stderr)
        return 2
    dtypes = args.dtypes or ([QUICK_DTYPE] if args.quick else list(DTYPES))
    selectors = [s.lower() for s in args.kernels] if args.kernels else None
    tasks = []
    for op in OPS:
        for dtype in dtypes:
            for task in _expand(op, dtype, args.arch):
                if selectors is None or any(s == op or s in task.kernel.lower() for s in selectors):
                    tasks.append(task)
    if args.quick:
        tasks = _quick(tasks)
    if not tasks:
        print("compile_triton: no kernel matches --kernels", file=sys.stderr)
        return 2
    if args.list:
        for t in tasks:
            print(f"{t.kernel}  {t.config}  {t.switches}  {t.dtype}  sm_{t.arch}  ({t.scenario})")
        return 0
    # Longest compilations first, so that the last worker does not finish alone.
    tasks.sort(key=lambda t: (t.op != "attention", t.kernel, t.config_index, t.dtype, t.arch))

    print(
        f"compile_triton: {len(tasks)} compilations on {args.jobs} processes "
        f"(archs {args.arch}, dtypes {dtypes})",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="compile_triton_") as cache_dir:
        if args.jobs > 1:
            import multiprocessing

            context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked LLVM
            with ProcessPoolExecutor(
                args.jobs, mp_context=context, initializer=_worker_init, initargs=(cache_dir,)
            ) as pool:
                results = list(pool.map(_compile, tasks))
        else:
            _worker_init(cache_dir)
            results = [_compile(t) for t in tasks]

    order = sorted(
        range(len(tasks)),
        key=lambda i: (
            OPS.index(tasks[i].op),
            tasks[i].kernel,
            tasks[i].config_index,
            tasks[i].arch,
            tasks[i].dtype,
            tasks[i].switches,
        ),
    )
    tasks, results = [tasks[i] for i in order], [results[i] for i in order]
    if args.verbose:
        _print_table(
            [_row(t, r) for t, r in zip(tasks, results)],
            [
                "kernel",
                "config",
                "switches",
                "dtype",
                "arch",
                "regs",
                "spill B",
                "smem KB",
                "warps",
                "fits",
                "s",
            ],
        )
    else:
        _print_table(
            _summary(tasks, results),
            [
                "kernel",
                "config",
                "arch",
                "n",
                "regs",
                "spill B",
                "worst spill at",
                "smem KB",
                "warps",
                "fits",
            ],
        )

    problems = []
    spills = []
    for task, result in zip(tasks, results):
        where = f"{task.kernel} [{task.config}] {task.switches} {task.dtype} sm_{task.arch}"
        problems.extend(f"{where}: {p}" for p in _judge(task, result, args.max_spill))
        if not result["error"] and result["spill_stores"] > 0 and args.max_spill is None:
            spills.append(f"{where}: spills {result['spill_stores']} B (stack {result['stack']} B)")
    if spills:
        print(f"\n{len(spills)} compilations spill (not an error without --max-spill):")
        print("\n".join(f"  {s}" for s in spills))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                [
                    {
                        **{
                            k: v
                            for k, v in dataclasses.asdict(t).items()
                            if k not in ("signature", "constexprs", "attrs")
                        },
                        **r,
                    }
                    for t, r in zip(tasks, results)
                ],
                f,
                indent=1,
            )
    elapsed = time.perf_counter() - started
    if problems:
        print(f"\n{len(problems)} problems:")
        print("\n".join(f"  {p}" for p in problems))
        print(f"compile_triton: FAILED ({len(tasks)} compilations, {elapsed:.0f} s)")
        return 1
    print(f"\ncompile_triton: OK ({len(tasks)} compilations, {elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
