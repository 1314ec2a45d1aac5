"""csrc/ compiles: every .cu file through nvcc against torch's headers (object files only).

This is the CPU machine's guard against syntax and type errors in the CUDA sources and against
register spills: tools/check_csrc.sh compiles with ``ptxas -v`` for sm_80 and sm_90a and fails
when any kernel spills or keeps a stack frame. Running them needs a GPU
(tests/test_lstm_cuda.py).
"""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_cuda_source_compiles(tmp_path):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH: the CUDA sources cannot be compiled here")
    env = dict(os.environ, PYTHON=sys.executable, CSRC_OBJ_DIR=str(tmp_path))
    result = subprocess.run(
        ["bash", os.path.join(ROOT, "tools", "check_csrc.sh")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, f"nvcc failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    sources = [f for f in os.listdir(os.path.join(ROOT, "csrc")) if f.endswith(".cu")]
    assert sources, "csrc/ holds no .cu file"
    for name in sources:
        assert name in result.stdout, f"{name} was not compiled:\n{result.stdout}"
    # ptxas reported on every kernel for both targets, and none spilled (the script's check).
    for arch in ("sm_80", "sm_90a"):
        assert f"for '{arch}'" in result.stdout, f"no ptxas report for {arch}:\n{result.stdout}"
    frames = [line for line in result.stdout.splitlines() if "bytes stack frame" in line]
    assert frames and all(
        line.strip() == "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"
        for line in frames
    ), "\n".join(frames)
