"""Print the README's "Performance" section from ``benchmarks/results/*.json``.

Usage (from the repository root)::

    python benchmarks/report.py                 # GPU result files only
    python benchmarks/report.py --include-smoke # also cpu-smoke / *-small files (marked so)

The speedup tables print measured rows of the result files only: the speedups compare rows of
one file (one device, one run of the harness), ``fwd+bwd`` at the paper's shapes, as README.md
("Benchmark method") says the project is judged. A baseline that was not measured leaves its
column empty. The speed-of-light table that follows (``benchmarks/roofline.py``) labels every
column: counts (FLOPs, bytes), bounds (computed from the counts and the GPU's rates; the LSTM's
latency bound rests on an estimated barrier cost) and measured times joined from the result
files of that GPU.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import output, roofline  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def is_smoke(stem: str, rows: list) -> bool:
    return stem.startswith("cpu") or stem.endswith("-small") or any(r.get("small") for r in rows)


def _ms(value) -> str:
    return "-" if value is None else (f"{value:.2f}" if value < 100 else f"{value:.0f}")


def _speedup(rows: list, row: dict, baseline: str, dtype_free: bool = False):
    for other in rows:
        if (other["impl"] == baseline and other["op"] == row["op"] and other["pass"] == row["pass"]
                and other["shape"] == row["shape"]
                and (dtype_free or other["dtype"] == row["dtype"])):  # fmt: skip
            return other["ms_median"] / row["ms_median"], other
    return None, None


def judged_table(rows: list) -> list:
    """sha_rnn_kernels against each baseline, fwd+bwd, the paper's shapes (op by op)."""
    modules = output.op_modules()
    lines = [
        "| op | dtype | sha_rnn_kernels ms | baseline | baseline ms | speedup |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    count = 0
    for row in output.sort_rows(rows):
        if row["impl"] != "sha_rnn_kernels" or row["pass"] != "fwd+bwd":
            continue
        if not (row.get("paper_shape") or row.get("case") == "paper"):
            continue
        module = modules[row["op"]]
        across = getattr(module, "RATIOS_ACROSS_DTYPES", False)
        for baseline in module.BASELINES:
            speedup, other = _speedup(rows, row, baseline, across)
            if other is None:
                continue
            label = baseline if other["dtype"] == row["dtype"] else f"{baseline} ({other['dtype']})"
            lines.append(
                f"| {row['op']} | {row['dtype']} | {_ms(row['ms_median'])} | {label} | "
                f"{_ms(other['ms_median'])} | {speedup:.2f}x |"
            )
            count += 1
    return lines if count else ["No sha_rnn_kernels fwd+bwd row at the paper's shapes yet."]


def epoch_table(rows: list) -> list:
    epoch_rows = [r for r in output.sort_rows(rows) if r["op"] == "epoch"]
    if not epoch_rows:
        return []
    lines = [
        "",
        "Whole-model training step (forward, backward, clip, LAMB) and the enwik8 epoch it "
        "implies (90M tokens):",
        "",
        "| impl | dtype | step ms | epoch s | tokens/s | peak MB | losses vs fp32 | recipe |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in epoch_rows:
        check = r.get("loss_check")
        verdict = "-" if check is None else (
            f"{'agree' if check['agree'] else 'DISAGREE'} (max diff {check['max_abs_diff']:.1e}, "
            f"tol {check['tolerance']:.1e}, {check['steps']} steps)"
        )  # fmt: skip
        peak = "-" if r.get("peak_mem_mb") is None else f"{r['peak_mem_mb']:.0f}"
        lines.append(
            f"| {r['impl']} | {r['dtype']} | {_ms(r['ms_median'])} | {r['epoch_s']:.0f} | "
            f"{r['tokens_per_s']:.0f} | {peak} | {verdict} | {r.get('note', '')} |"
        )
    return lines


def notes(rows: list) -> list:
    out = []
    for r in output.sort_rows(rows):
        if not (r.get("paper_shape") or r.get("case") == "paper"):
            continue
        if r["impl"] == "cudnn" and r["pass"] == "fwd+bwd":
            seen = ", ".join(r.get("cudnn_kernels", [])[:2]) or "not profiled"
            out.append(f"- cuDNN LSTM {r['dtype']}: {r.get('cudnn_algo_expected')} expected by "
                       f"torch's heuristic; kernels seen: {seen}")  # fmt: skip
        if r["impl"] == "sdpa" and r["pass"] == "fwd+bwd":
            rejected = ", ".join(sorted(r.get("sdpa_rejected", {}))) or "none"
            out.append(f"- SDPA {r['dtype']}: fastest backend {r.get('sdpa_backend')}, default "
                       f"dispatch {r.get('sdpa_default_backend', 'not profiled')}; rejected E="
                       f"{r['shape']['E']}: {rejected}")  # fmt: skip
    return out


def roofline_section(paths: list, include_smoke: bool) -> list:
    """The speed-of-light table for every known GPU that has results (H100 when none has)."""
    results = []
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        rows = output.load(path)
        if rows and (include_smoke or not is_smoke(stem, rows)):
            results += rows
    devices = {str(r.get("device", "")) for r in results}
    gpus = [key for key, gpu in roofline.GPUS.items()
            if any(gpu["match"] in device for device in devices)] or ["h100"]  # fmt: skip
    lines = [
        "### Speed of light",
        "",
        "What the hardware allows at the paper's shapes (`python benchmarks/roofline.py --gpu "
        "h100|h200|a100`, where the counts are derived): FLOPs and minimal HBM bytes are "
        "counts from the model's definition; the compute, memory and latency columns are the "
        "lower bounds they imply at the GPU's reachable rates (estimated; `--rates spec` uses "
        "the datasheet peaks), the bound is their maximum (the layer and the step add their "
        "parts); measured is this library's bf16 time from the result files of that GPU, and "
        "bound / measured is the fraction of the speed of light it reaches. No column is a "
        "measurement unless it says measured.",
        "",
    ]
    for key in gpus:
        report_rows = roofline.report(key, results)
        lines += [f"#### {roofline.GPUS[key]['name']}", ""]
        lines += roofline.table_lines(report_rows, markdown=True)
        lines += ["", *roofline.describe(key, "achievable", report_rows), ""]
        estimates = roofline.estimate_lines(key)
        if estimates:
            lines += [
                f"Design estimates on the {roofline.GPUS[key]['name']} (not measurements: each "
                "kernel's figure is derived in docs/design/<op>.md from FLOP and byte counts, "
                "compiled registers and latency budgets). The second step and epoch are what "
                "\"auto\" gives when the CUDA LSTM cannot run and cuDNN's bf16 LSTM takes its "
                "place.",
                "",
                *estimates,
                "",
            ]
    return lines


def section(paths: list, include_smoke: bool) -> str:
    lines = ["## Performance", ""]
    shown = 0
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        rows = output.load(path)
        if not rows:
            continue
        smoke = is_smoke(stem, rows)
        if smoke and not include_smoke:
            continue
        shown += 1
        first = rows[0]
        marker = " (smoke test, not a product figure)" if smoke else ""
        lines.append(f"### {first['device']}{marker}")
        lines.append("")
        lines.append(
            f"torch {first.get('torch')}, triton {first.get('triton')}, CUDA {first.get('cuda')}, "
            f"commit {first.get('commit')}. Medians of `{first.get('timer')}` after warm-up; "
            f"each configuration ran twice (full table: [{stem}.md](benchmarks/results/{stem}.md))."
        )
        lines.append("")
        lines.append("Speedup = baseline time / sha_rnn_kernels time, fwd+bwd, paper shapes:")
        lines.append("")
        lines += judged_table(rows)
        lines += epoch_table(rows)
        extra = notes(rows)
        if extra:
            lines += ["", *extra]
        plots = sorted(glob.glob(os.path.join(os.path.dirname(path), f"{stem}_*.png")))
        if plots:
            links = [f"[{os.path.basename(p)[len(stem) + 1:-4]}](benchmarks/results/"
                     f"{os.path.basename(p)})" for p in plots]  # fmt: skip
            lines += ["", "Time against size, one line per impl: " + ", ".join(links)]
        lines.append("")
    if not shown:
        lines.append("No GPU measurement has been recorded yet (`python benchmarks/run.py` on a "
                     "CUDA machine writes benchmarks/results/<device>.json).")  # fmt: skip
        lines.append("")
    lines += roofline_section(paths, include_smoke)
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Print the README's Performance section.")
    p.add_argument("--results-dir", default=RESULTS)
    p.add_argument("--include-smoke", action="store_true",
                   help="also the CPU smoke and --small files (marked as such)")  # fmt: skip
    args = p.parse_args(argv)
    paths = sorted(glob.glob(os.path.join(args.results_dir, "*.json")))
    sys.stdout.write(section(paths, args.include_smoke))
    return 0


if __name__ == "__main__":
    sys.exit(main())
