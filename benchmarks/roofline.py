"""Speed of light of SHA-RNN training: FLOPs, minimal HBM bytes and the time they imply.

Usage (from the repository root)::

    python benchmarks/roofline.py                 # H100 SXM, the paper's shapes
    python benchmarks/roofline.py --gpu h200      # or a100
    python benchmarks/roofline.py --rates spec    # datasheet peaks instead of reachable rates
    python benchmarks/roofline.py --markdown      # the table benchmarks/report.py puts in README

For each op at the paper's shapes (T=1024, B=16, E=1024, F=4096, memory M=3976 so K=5000 keys,
V=205, 4 blocks, attention in one) and for the whole training step and the enwik8 epoch
(step x 5494), it prints the FLOPs and minimal HBM bytes counted from the model's definition, the
three lower bounds they imply on the chosen GPU and their maximum, and, where
``benchmarks/results/*.json`` hold a ``sha_rnn_kernels`` bf16 row measured on that GPU, the
measured time and the fraction of it that the bound is ("% of speed of light"). Nothing here
imports torch or needs a GPU.

What is counted (``2 m n k`` FLOPs per matmul; bf16 activations of 2 bytes, fp32 weights,
gradients and optimizer state of 4 bytes; N = T B tokens):

- **lstm** (one layer, H = E): forward ``x W_ih^T`` and ``h W_hh^T`` over all steps:
  ``2 N 4H (E + H)``. Backward: ``dx``, ``dW_ih``, ``dh_{t-1}``, ``dW_hh``: twice that.
  Bytes: forward reads x and the weights, writes h and the cell states c (fp32, for the
  backward); backward reads dh, x, h, c and the weights, writes dx and the weight gradients.
- **attention** (one head of width E, causal with memory): query i sees ``M + i + 1`` keys, so
  ``P = B (T M + T (T + 1) / 2)`` (query, key) pairs. Forward ``QK^T`` and ``PV``: ``4 E P``.
  Backward: ``dP = dO V^T`` and ``dQ = dS K`` over all pairs, ``dK`` and ``dV`` only over the
  segment's keys (the memory is detached): ``4 E P + 4 E P_segment``. The key and value gates'
  gradients need no further matmul: ``d g_k = sum(q * dQ) / g_k`` and ``d g_v = sum(dO * O) /
  g_v`` per channel. Bytes: q, the keys (= values, one tensor) and O, plus the probabilities
  saved in bf16 for the backward (cheaper than recomputing ``QK^T`` at this shape).
- **boom**: ``2 N E F`` forward, twice that backward (dx and dW); the F-wide pre-activation is
  saved in bf16 (cheaper than recomputing the matmul); the activation is never written.
- **glue**: LayerNorms, dropouts and residual adds, fused as far as elementwise ops fuse:
  estimated 8 forward and 10 backward passes over an ``N x E`` bf16 tensor per block, 6 and 6
  more in the attention block. **q projection** ``Linear(E, E)`` and its LayerNorm in the
  attention block. **embed/decoder/loss**: the tied ``N x E x V`` decoder and the fp32 logits.
- **optimizer**: gradient-norm clip (one read of the gradients) and LAMB in two passes (read
  g, m, v, w, write m, v; then read m, v, w, write w): 44 bytes per parameter.

Bounds: compute = FLOPs / matmul rate; memory = bytes / HBM rate; latency (the LSTM only) = the
serial recurrence: T steps one after another, each needing all of ``h_{t-1}``, so each costs at
least one grid-wide barrier (estimated ~1 us on an H100: an arrival counter in L2 and a spin, two
L2 round trips across 132 SMs) plus that step's ``2 B 4H H`` FLOPs at the full chip's rate; the
backward repeats the chain in reverse. An op's bound is the largest of the three. The layer and
the step are bounded by the sum of their parts' bounds (the library runs op after op; a
wavefront schedule that overlaps layers could in principle go below it: the overlap bound, the
largest of total compute, total bytes and the LSTM chains, is printed below the table).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Peak rates. "spec": NVIDIA's datasheets (dense bf16 tensor-core FLOP/s without sparsity, HBM
# bandwidth): H100 SXM5 80GB 989.4 TFLOP/s, 3.35 TB/s; H200 SXM 141GB 989.4 TFLOP/s, 4.8 TB/s;
# A100 SXM4 80GB 312 TFLOP/s, 2.039 TB/s. "achievable": estimates of what large kernels reach:
# ~800 TFLOP/s for large bf16 GEMMs on H100/H200 (clock-limited under load), ~90% of the HBM
# datasheet rate for streaming copies, ~90% of the A100's matmul peak.
GPUS = {
    "h100": {
        "name": "H100 SXM5 80GB", "match": "H100", "sms": 132,
        "spec": {"flops": 989.4e12, "bytes": 3.35e12},
        "achievable": {"flops": 800e12, "bytes": 3.0e12},
        "barrier_s": 1.0e-6,
    },
    "h200": {
        "name": "H200 SXM 141GB", "match": "H200", "sms": 132,
        "spec": {"flops": 989.4e12, "bytes": 4.8e12},
        "achievable": {"flops": 800e12, "bytes": 4.3e12},
        "barrier_s": 1.0e-6,
    },
    "a100": {
        "name": "A100 SXM4 80GB", "match": "A100", "sms": 108,
        "spec": {"flops": 312e12, "bytes": 2.039e12},
        "achievable": {"flops": 280e12, "bytes": 1.8e12},
        "barrier_s": 1.0e-6,
    },
}  # fmt: skip

PAPER = {"V": 205, "E": 1024, "F": 4096, "L": 4, "T": 1024, "B": 16, "M": 3976}
ENWIK8_TRAIN_TOKENS = 90_000_000
ACT, WEIGHT = 2, 4  # bytes per activation (bf16) and per weight / gradient / optimizer value
GLUE_PASSES = {"block": (8, 10), "attention": (6, 6)}  # (forward, backward), estimated


@dataclass
class Cost:
    """FLOPs and minimal HBM bytes of one op and pass; ``chain_steps`` serial steps of
    ``chain_flops`` FLOPs each (the LSTM's recurrence), ``parts`` for composites."""

    op: str
    pass_: str
    flops: float
    bytes: float
    chain_steps: int = 0
    chain_flops: float = 0.0
    parts: list = field(default_factory=list)
    note: str = ""


def lstm_cost(T: int, B: int, E: int, H: int, pass_: str) -> Cost:
    N = T * B
    weights = 4 * H * (E + H) + 8 * H
    fwd_flops = 2 * N * 4 * H * (E + H)
    fwd_bytes = N * E * ACT + weights * WEIGHT + N * H * ACT + N * H * WEIGHT
    step_flops = 2 * B * 4 * H * H
    if pass_ == "fwd":
        return Cost("lstm", "fwd", fwd_flops, fwd_bytes, T, step_flops, note="1 layer")
    bwd_bytes = N * H * ACT * 2 + N * E * ACT + N * H * WEIGHT + weights * WEIGHT * 2
    bwd_bytes += N * E * ACT  # dx
    return Cost("lstm", "fwd+bwd", 3 * fwd_flops, fwd_bytes + bwd_bytes, 2 * T, step_flops,
                note="1 layer")  # fmt: skip


def attention_pairs(T: int, B: int, M: int) -> tuple[int, int]:
    """(query, key) pairs a causal-with-memory head evaluates: all, and those of the segment."""
    segment = B * T * (T + 1) // 2
    return B * T * M + segment, segment


def attention_cost(T: int, B: int, E: int, M: int, pass_: str) -> Cost:
    N, K = T * B, T + M
    pairs, segment = attention_pairs(T, B, M)
    fwd_flops = 4 * E * pairs
    # q, the keys (also the values: one tensor, gated per channel), O and the row statistics;
    # the probabilities saved for the backward.
    fwd_bytes = N * E * ACT + K * B * E * ACT + N * E * ACT + N * WEIGHT + pairs * ACT
    if pass_ == "fwd":
        return Cost("attention", "fwd", fwd_flops, fwd_bytes, note=f"K={K}")
    bwd_flops = 4 * E * pairs + 4 * E * segment
    # Read dO, O, q, the keys and the saved probabilities; write dq and d(segment keys/values).
    bwd_bytes = 3 * N * E * ACT + K * B * E * ACT + pairs * ACT + 2 * N * E * ACT
    return Cost("attention", "fwd+bwd", fwd_flops + bwd_flops, fwd_bytes + bwd_bytes,
                note=f"K={K}")  # fmt: skip


def boom_cost(N: int, E: int, F: int, pass_: str) -> Cost:
    fwd_flops = 2 * N * E * F
    # Read x and W, write y and the pre-activation (saved for the backward).
    fwd_bytes = N * E * ACT + (E * F + F) * WEIGHT + N * E * ACT + N * F * ACT
    if pass_ == "fwd":
        return Cost("boom", "fwd", fwd_flops, fwd_bytes, note=f"{N} rows")
    # Read dy, x, W and the pre-activation; write dx, dW.
    bwd_bytes = 2 * N * E * ACT + (E * F + F) * WEIGHT * 2 + N * F * ACT + N * E * ACT
    return Cost("boom", "fwd+bwd", 3 * fwd_flops, fwd_bytes + bwd_bytes, note=f"{N} rows")


def glue_cost(N: int, E: int, attention: bool) -> Cost:
    passes = sum(GLUE_PASSES["block"]) + (sum(GLUE_PASSES["attention"]) if attention else 0)
    op = "glue, attention block" if attention else "glue, other block"
    # ~8 FLOPs per element and pass (LayerNorm): negligible next to the matmuls.
    return Cost(op, "fwd+bwd", 8.0 * N * E * passes, passes * N * E * ACT,
                note=f"{passes} passes (estimated)")  # fmt: skip


def qproj_cost(N: int, E: int) -> Cost:
    fwd_flops = 2 * N * E * E
    # Forward: read x and W, write q. Backward: read dq, x and W, write dx and dW.
    total_bytes = 5 * N * E * ACT + 3 * E * E * WEIGHT
    return Cost("q projection", "fwd+bwd", 3 * fwd_flops, total_bytes, note="Linear(E, E)")


def head_cost(N: int, E: int, V: int) -> Cost:
    """Embedding gather, the tied decoder, fp32 logits, the loss and their backward."""
    flops = 3 * 2 * N * E * V
    embed = N * E * (WEIGHT + ACT) + N * E * ACT  # gather, write; the backward reads dh
    decoder = N * E * ACT + V * E * WEIGHT + N * V * WEIGHT  # h, W -> fp32 logits
    loss = 2 * N * V * WEIGHT  # read the logits, write their gradient
    decoder_bwd = N * V * WEIGHT + N * E * ACT + V * E * WEIGHT + N * E * ACT + V * E * WEIGHT
    total = embed + decoder + loss + decoder_bwd
    return Cost("embed/decoder/loss", "fwd+bwd", flops, total, note=f"V={V}")


def n_params(shape: dict) -> int:
    """Parameters of SHARNN(V, E, F, L) with one attention block (the tied decoder once)."""
    V, E, F, L = shape["V"], shape["E"], shape["F"], shape["L"]
    block = (4 * E * (E + E) + 8 * E) + (E * F + F) + 6 * 2 * E
    attention = 3 * E + 3 * E + E + (E * E + E) + 2 * E + (E * 2 * E + 2 * E)
    return V * E + V + L * block + (attention if L >= 2 else 0)


def optimizer_cost(params: int) -> Cost:
    return Cost("optimizer", "step", 12.0 * params, params * (WEIGHT + 10 * WEIGHT),
                note=f"{params / 1e6:.1f}M params, clip + LAMB")  # fmt: skip


def layer_cost(shape: dict) -> Cost:
    T, B, E, F, M = shape["T"], shape["B"], shape["E"], shape["F"], shape["M"]
    N = T * B
    parts = [
        lstm_cost(T, B, E, E, "fwd+bwd"), qproj_cost(N, E),
        attention_cost(T, B, E, M, "fwd+bwd"), boom_cost(N, E, F, "fwd+bwd"),
        glue_cost(N, E, attention=True),
    ]  # fmt: skip
    return _composite("layer", "fwd+bwd", parts, "with attention")


def step_cost(shape: dict) -> Cost:
    T, B, E, F, L = shape["T"], shape["B"], shape["E"], shape["F"], shape["L"]
    N = T * B
    parts = [head_cost(N, E, shape["V"])]
    for block in range(L):
        parts += [lstm_cost(T, B, E, E, "fwd+bwd"), boom_cost(N, E, F, "fwd+bwd")]
        parts.append(glue_cost(N, E, attention=block == L - 2))
        if block == L - 2:
            parts += [qproj_cost(N, E), attention_cost(T, B, E, shape["M"], "fwd+bwd")]
    parts.append(optimizer_cost(n_params(shape)))
    return _composite("step", "fwd+bwd+opt", parts, f"{L} blocks")


def _composite(op: str, pass_: str, parts: list, note: str) -> Cost:
    return Cost(op, pass_, sum(p.flops for p in parts), sum(p.bytes for p in parts),
                sum(p.chain_steps for p in parts), parts[0].chain_flops if parts else 0.0,
                parts, note)  # fmt: skip


def steps_per_epoch(shape: dict) -> int:
    return math.ceil(ENWIK8_TRAIN_TOKENS / (shape["T"] * shape["B"]))


# ----------------------------------------------------------------------------------------------
# Bounds


def bounds(cost: Cost, gpu: dict, rates: str = "achievable") -> dict:
    """Seconds: compute, memory, latency and the bound (their max; for composites the sum of
    the parts' bounds)."""
    rate = gpu[rates]
    compute = cost.flops / rate["flops"]
    memory = cost.bytes / rate["bytes"]
    chain_flops = cost.chain_flops
    if cost.parts:
        latency = sum(bounds(p, gpu, rates)["latency"] for p in cost.parts)
        bound = sum(bounds(p, gpu, rates)["bound"] for p in cost.parts)
    else:
        latency = cost.chain_steps * (gpu["barrier_s"] + chain_flops / rate["flops"])
        bound = max(compute, memory, latency)
    return {"compute": compute, "memory": memory, "latency": latency, "bound": bound,
            "overlap": max(compute, memory, latency)}  # fmt: skip


def rows(gpu_key: str, shape: Optional[dict] = None, rates: str = "achievable") -> list:
    """One dict per line of the report: op, pass, GFLOP, MB and the bounds in ms."""
    shape = dict(shape or PAPER)
    gpu = GPUS[gpu_key]
    T, B, E, F, M = shape["T"], shape["B"], shape["E"], shape["F"], shape["M"]
    N = T * B
    costs = [
        lstm_cost(T, B, E, E, "fwd"), lstm_cost(T, B, E, E, "fwd+bwd"),
        attention_cost(T, B, E, M, "fwd"), attention_cost(T, B, E, M, "fwd+bwd"),
        boom_cost(N, E, F, "fwd"), boom_cost(N, E, F, "fwd+bwd"),
        qproj_cost(N, E), glue_cost(N, E, attention=False), glue_cost(N, E, attention=True),
        head_cost(N, E, shape["V"]), optimizer_cost(n_params(shape)),
        layer_cost(shape), step_cost(shape),
    ]  # fmt: skip
    out = []
    for cost in costs:
        b = bounds(cost, gpu, rates)
        out.append({
            "op": cost.op, "pass": cost.pass_, "note": cost.note, "gflop": cost.flops / 1e9,
            "mb": cost.bytes / 1e6, **{f"{k}_ms": v * 1e3 for k, v in b.items()},
        })  # fmt: skip
    step = out[-1]
    steps = steps_per_epoch(shape)
    out.append({
        "op": "epoch", "pass": f"step x {steps}", "note": "enwik8, 90M tokens",
        "gflop": step["gflop"] * steps, "mb": step["mb"] * steps,
        **{k: step[k] * steps for k in step if k.endswith("_ms")},
    })  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------
# Design estimates

# This library's own kernels on an H100 at the paper's shapes, bf16, training configuration,
# forward+backward, as estimated (never measured) in each kernel's docstring from FLOP and byte
# counts, compiled registers and latency budgets: (op, low ms, high ms, where it is derived).
ESTIMATES = {
    "h100": [
        ("lstm", 2.5, 4.2, "CUDA kernel, one layer: the per-step budget in docs/design/lstm.md"),
        ("attention", 1.33, 1.52, "docs/design/attention.md, segment form"),
        ("boom", 0.68, 0.71, "docs/design/boom.md, cuBLAS GEMM + fused sum pass"),
    ],
}
# cuDNN's bf16 LSTM (step by step), one layer: what "auto" falls back to when the CUDA kernel
# cannot run or fails its first-use check (cited estimate, see sha_rnn_kernels.functional).
CUDNN_BF16_LSTM_MS = {"h100": 19.0}
# The ops without an estimate of their own (q projection, glue, embedding/decoder/loss,
# optimizer) are taken at 1x to 2x their bound.
REST_FACTOR = (1.0, 2.0)


def estimate_rows(gpu_key: str, shape: Optional[dict] = None) -> list:
    """The step and epoch built from the kernels' estimates (empty for a GPU without them):
    one dict per line with op, low/high ms and the source."""
    if gpu_key not in ESTIMATES:
        return []
    shape = dict(shape or PAPER)
    bound = {r["op"]: r["bound_ms"] for r in rows(gpu_key, shape)}
    layers = shape["L"]
    kernels = {op: (lo, hi, where) for op, lo, hi, where in ESTIMATES[gpu_key]}
    rest = (bound["q projection"] + (layers - 1) * bound["glue, other block"]
            + bound["glue, attention block"] + bound["embed/decoder/loss"] + bound["optimizer"])
    out = [{"op": op, "low_ms": lo, "high_ms": hi, "source": where}
           for op, (lo, hi, where) in kernels.items()]  # fmt: skip
    out.append({"op": "rest of the step", "low_ms": rest * REST_FACTOR[0],
                "high_ms": rest * REST_FACTOR[1],
                "source": f"{REST_FACTOR[0]:g}x to {REST_FACTOR[1]:g}x its bound (no estimate)"})
    steps = steps_per_epoch(shape)
    for label, lstm_ms in (("", None), (", cuDNN bf16 LSTM", CUDNN_BF16_LSTM_MS.get(gpu_key))):
        if label and lstm_ms is None:
            continue
        lstm_lo = kernels["lstm"][0] if lstm_ms is None else lstm_ms
        lstm_hi = kernels["lstm"][1] if lstm_ms is None else lstm_ms
        low = layers * (lstm_lo + kernels["boom"][0]) + kernels["attention"][0]
        high = layers * (lstm_hi + kernels["boom"][1]) + kernels["attention"][1]
        low, high = low + rest * REST_FACTOR[0], high + rest * REST_FACTOR[1]
        out.append({"op": f"step{label}", "low_ms": low, "high_ms": high,
                    "source": f"{layers} x (lstm + boom) + attention + rest"})
        out.append({"op": f"epoch{label}", "low_ms": low * steps, "high_ms": high * steps,
                    "source": f"step x {steps}"})
    return out


def estimate_lines(gpu_key: str, shape: Optional[dict] = None) -> list:
    """A Markdown table of :func:`estimate_rows` (nothing for a GPU without estimates)."""
    found = estimate_rows(gpu_key, shape)
    if not found:
        return []
    lines = ["| op (fwd+bwd, train, bf16) | estimate | from |", "| --- | --- | --- |"]
    for r in found:
        seconds = r["op"].startswith("epoch")
        scale, unit = (1e-3, "s") if seconds else (1.0, "ms")
        lo, hi = r["low_ms"] * scale, r["high_ms"] * scale
        value = f"{lo:.3g} {unit}" if abs(hi - lo) < 1e-9 else f"{lo:.3g}-{hi:.3g} {unit}"
        lines.append(f"| {r['op']} | {value} (estimate) | {r['source']} |")
    return lines


# ----------------------------------------------------------------------------------------------
# Measurements


# Report line -> (op in the result files, pass there).
MEASURED_AS = {
    ("lstm", "fwd"): ("lstm", "fwd"), ("lstm", "fwd+bwd"): ("lstm", "fwd+bwd"),
    ("attention", "fwd"): ("attention", "fwd"), ("attention", "fwd+bwd"): ("attention", "fwd+bwd"),
    ("boom", "fwd"): ("boom", "fwd"), ("boom", "fwd+bwd"): ("boom", "fwd+bwd"),
    ("layer", "fwd+bwd"): ("layer", "fwd+bwd"), ("step", "fwd+bwd+opt"): ("epoch", "fwd+bwd"),
}  # fmt: skip


def load_results(results_dir: str) -> list:
    found = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not a results file ({exc})") from None
        if isinstance(data, list):
            found += [r for r in data if isinstance(r, dict)]
    return found


def measured_ms(results: list, gpu_key: str, op: str, pass_: str) -> Optional[dict]:
    """The fastest ``sha_rnn_kernels`` bf16 row of that op and pass at the paper's shape on that
    GPU (the training configuration where rows carry one); None when there is none."""
    if op == "epoch":
        step = measured_ms(results, gpu_key, "step", "fwd+bwd+opt")
        if step is None:
            return None
        return {**step, "ms": step["ms"] * steps_per_epoch(PAPER)}
    if (op, pass_) not in MEASURED_AS:
        return None
    result_op, result_pass = MEASURED_AS[(op, pass_)]
    match = GPUS[gpu_key]["match"]
    candidates = [
        r for r in results
        if r.get("op") == result_op and r.get("pass") == result_pass
        and r.get("impl") == "sha_rnn_kernels" and r.get("dtype") == "bf16"
        and r.get("paper_shape") and match in str(r.get("device", ""))
        and r.get("config", "train") == "train" and r.get("ms_median")
    ]  # fmt: skip
    if not candidates:
        return None
    best = min(candidates, key=lambda r: r["ms_median"])
    return {"ms": float(best["ms_median"]), "device": best.get("device"),
            "commit": best.get("commit")}  # fmt: skip


def report(gpu_key: str, results: list, rates: str = "achievable") -> list:
    """The report rows with ``measured_ms`` and ``fraction`` (bound / measured) where known."""
    out = []
    for row in rows(gpu_key, rates=rates):
        found = measured_ms(results, gpu_key, row["op"], row["pass"])
        row = dict(row, measured_ms=None, fraction=None)
        if found is not None:
            row["measured_ms"] = found["ms"]
            row["fraction"] = row["bound_ms"] / found["ms"]
        out.append(row)
    return out


# ----------------------------------------------------------------------------------------------
# Output


def _num(value: Optional[float], unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value / 1e3:.1f} s"
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}" if value >= 0.001 or value == 0 else f"{value:.1e}"


HEADER = ["op", "pass", "GFLOP (count)", "min HBM MB (count)", "compute ms (bound)",
          "memory ms (bound)", "latency ms (bound, estimate)", "bound ms", "measured ms",
          "bound / measured", "note"]  # fmt: skip


def table_lines(report_rows: list, markdown: bool) -> list:
    cells = []
    for r in report_rows:
        unit = "s" if r["op"] == "epoch" else ""
        latency = r["latency_ms"] if r["latency_ms"] > 0 else None
        cells.append([
            r["op"], r["pass"], _num(r["gflop"]), _num(r["mb"]), _num(r["compute_ms"], unit),
            _num(r["memory_ms"], unit), _num(latency, unit), _num(r["bound_ms"], unit),
            _num(r["measured_ms"], unit),
            "-" if r["fraction"] is None else f"{100 * r['fraction']:.0f}%", r["note"],
        ])  # fmt: skip
    if markdown:
        lines = ["| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
        return lines + ["| " + " | ".join(c) + " |" for c in cells]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(HEADER)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*HEADER)] + [fmt.format(*c) for c in cells]


def describe(gpu_key: str, rates: str, report_rows: list) -> list:
    gpu = GPUS[gpu_key]
    rate = gpu[rates]
    step = next(r for r in report_rows if r["op"] == "step")
    epoch = next(r for r in report_rows if r["op"] == "epoch")
    return [
        f"{gpu['name']}, {rates} rates: {rate['flops'] / 1e12:.0f} TFLOP/s bf16 matmul, "
        f"{rate['bytes'] / 1e12:.2f} TB/s HBM; LSTM step floor = {gpu['barrier_s'] * 1e6:.1f} us "
        f"barrier (estimate) + the step's FLOPs. Paper shapes: T=1024 B=16 E=1024 F=4096 "
        f"K=5000 V=205, 4 blocks.",
        f"Layer and step bounds add their parts (op after op). Overlap bound of the step (all "
        f"work perfectly overlapped, only the LSTM chains serial): "
        f"{step['overlap_ms']:.2f} ms, epoch {epoch['overlap_ms'] / 1e3:.1f} s.",
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Speed-of-light report of SHA-RNN training.")
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    p.add_argument("--rates", choices=("achievable", "spec"), default="achievable",
                   help="reachable rates (estimates) or the datasheet peaks")  # fmt: skip
    p.add_argument("--results-dir", default=RESULTS,
                   help="folder of run.py's <device>.json files to join")  # fmt: skip
    p.add_argument("--markdown", action="store_true", help="a Markdown table")
    p.add_argument("--json", action="store_true", help="the rows as JSON")
    args = p.parse_args(argv)
    report_rows = report(args.gpu, load_results(args.results_dir), args.rates)
    if args.json:
        json.dump(report_rows, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    lines = table_lines(report_rows, args.markdown)
    lines += [""] + describe(args.gpu, args.rates, report_rows)
    if args.markdown and args.rates == "achievable":
        estimates = estimate_lines(args.gpu)
        lines += ["", "Design estimates (not measured):", ""] + estimates if estimates else []
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
