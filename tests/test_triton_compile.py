"""Every Triton kernel compiles for sm_90 and sm_80 and fits on the GPU (no GPU needed).

The interpreter tests cannot see GPU-only failures (shared memory over the per-block limit, dot
shapes the tensor cores reject, lowering errors). This runs ``tools/compile_triton.py --quick``,
Triton's real compiler down to ptxas for one config and one variant per kernel at the paper's
shapes, in a subprocess with ``TRITON_INTERPRET=0`` (this process may already have imported the
ops in interpreter mode). The tool names its targets and never touches CUDA.
"""

import importlib.util
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "compile_triton.py")
# --quick takes about 45 s on 2 idle cores; the limit only stops a hung compiler.
BUDGET_S = 600


def _bundled_ptxas() -> list[str]:
    """Triton's bundled ptxas binaries (sm_80 and sm_90 use different ones), found without
    importing triton."""
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return []
    bin_dir = os.path.join(list(spec.submodule_search_locations)[0], "backends", "nvidia", "bin")
    return [os.path.join(bin_dir, name) for name in ("ptxas", "ptxas-blackwell")]


def test_every_kernel_compiles_for_gpu_targets():
    binaries = _bundled_ptxas()
    missing = [path for path in binaries if not os.access(path, os.X_OK)]
    if not binaries or missing:
        pytest.skip(f"triton's bundled ptxas is missing ({missing or 'no triton package'})")
    env = dict(os.environ, TRITON_INTERPRET="0")
    # The GPU is never needed; hide it so that nothing could initialise CUDA by accident.
    env["CUDA_VISIBLE_DEVICES"] = ""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, TOOL, "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=BUDGET_S,
    )
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, (
        f"compile_triton.py --quick exited {result.returncode} after {elapsed:.0f} s:\n"
        f"{result.stdout[-6000:]}\n{result.stderr[-4000:]}"
    )
    for kernel in (
        "_boom_fwd_kernel",
        "_boom_bwd_kernel",
        "_boom_sum_kernel",
        "_boom_mask_kernel",
        "_attention_fwd_kernel",
        "_attention_bwd_preprocess_kernel",
        "_attention_bwd_kernel",
        "_attention_value_dropout_kernel",
        "_lstm_fwd_kernel",
        "_lstm_bwd_kernel",
        "_decode_attention_kernel",
        "_decode_combine_kernel",
    ):
        assert kernel in result.stdout, f"{kernel} was not compiled:\n{result.stdout}"
    assert "sm_90" in result.stdout and "sm_80" in result.stdout, result.stdout


def test_autotune_prune_runs_for_each_target():
    """An autotuner's early_config_prune runs as on each target architecture: the Boom's fused
    training tile that spills on sm_80 under triton 3.6 (64x64x32, h saved) and the 128x128
    eval tile are listed for sm_90 only, as the runtime prune keeps them on Hopper and drops
    them on Ampere; 64x64x64 with dropout (spills on both) on neither."""
    env = dict(os.environ, TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [sys.executable, TOOL, "--kernels", "_boom_fwd", "--dtypes", "bf16", "--list"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=BUDGET_S,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if "_boom_fwd_kernel" in line]

    def listed(config, switches, arch):
        return any(r[1] == config and r[4] == switches and r[6] == arch for r in rows)

    train, train_p0 = "bias,dropout,save_pre,even_k", "bias,save_pre,even_k"
    assert not listed("M64xN64xK64xM8", train, "sm_90")
    assert not listed("M64xN64xK64xM8", train, "sm_80")
    assert listed("M64xN64xK32xM8", train_p0, "sm_90")
    assert not listed("M64xN64xK32xM8", train_p0, "sm_80")
    assert listed("M128xN128xK64xM8", "bias,even_k", "sm_90")
    assert not listed("M128xN128xK64xM8", "bias,even_k", "sm_80")
    assert listed("M128xN64xK64xM8", train, "sm_80")
