"""Tests of the persistent CUDA LSTM (csrc/ and sha_rnn_kernels/_cuda.py).

CPU tests (run everywhere): the reason function answers for CPU tensors without building or
initialising CUDA; the sources are found; the architecture flags, the launch plan and its
shared-memory formulas (against the C++ header, compiled on the host when nvcc is present);
the build lock; the autograd and fake-tensor wiring of the custom ops on meta tensors.

GPU tests (``cuda`` fixture: TRITON_INTERPRET=0 and a CUDA device): parity of out, h_n, c_n and
of dx, dW_ih, dW_hh, db_ih, db_hh, dh0, dc0 with torch.nn.LSTM run in float64 on the same
(rounded) weights and inputs, in float16 and bfloat16, at odd sizes and at the paper shape,
under the tolerance rule of sha_rnn_kernels.testing.assert_parity (the low-precision baseline
is torch.nn.LSTM in that dtype, i.e. cuDNN). Without a GPU the same kernels run on the CPU in
tests/test_lstm_emulation.py. Memory checks of the kernels on a GPU::

    compute-sanitizer --tool memcheck  python -m sha_rnn_kernels._cuda
    compute-sanitizer --tool racecheck python -m sha_rnn_kernels._cuda
"""

import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Dict, Optional

import pytest
import torch

from sha_rnn_kernels import _cuda
from sha_rnn_kernels.testing import assert_parity

ROOT = Path(__file__).resolve().parent.parent
H100 = {"sm_count": 132, "smem_per_block": 232448}
A100 = {"sm_count": 108, "smem_per_block": 166912}
OUTPUTS = ("out", "h_n", "c_n")
GRADS = ("dx", "dW_ih", "dW_hh", "db_ih", "db_hh", "dh0", "dc0")


# --------------------------------------------------------------------------------------------
# CPU: reason function, sources, flags, plan, lock, custom-op wiring
# --------------------------------------------------------------------------------------------
def test_reason_on_cpu_tensors_says_why_without_building(monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("the reason function must not build the extension")

    from torch.utils import cpp_extension

    monkeypatch.setattr(_cuda, "load_extension", no_build)
    monkeypatch.setattr(cpp_extension, "load", no_build)
    x = torch.randn(3, 2, 8, dtype=torch.bfloat16)
    w_ih = torch.randn(32, 8, dtype=torch.bfloat16)
    w_hh = torch.randn(32, 8, dtype=torch.bfloat16)
    reason = _cuda.lstm_unsupported_reason(x, w_ih, w_hh)
    assert reason is not None and "CUDA tensors" in reason and "cpu" in reason
    assert not torch.cuda.is_initialized()


def test_import_builds_nothing_and_leaves_cuda_alone():
    code = (
        "import sys, torch\n"
        "import sha_rnn_kernels._cuda as c\n"
        "assert not torch.cuda.is_initialized()\n"
        "assert not c._extensions\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


@pytest.mark.parametrize(
    "dtype, batch, hidden, expected",
    [
        (torch.float32, 16, 1024, "float32"),
        (torch.float64, 4, 64, "float64"),
        (torch.bfloat16, 65, 1024, "batch 65"),
        (torch.float16, 4, 44, "H=44"),
        (torch.float16, 16, 1024, None),
        (torch.bfloat16, 64, 1024, None),
        (torch.bfloat16, 1, 40, None),
    ],
)
def test_shape_dtype_reason(dtype, batch, hidden, expected):
    reason = _cuda.shape_dtype_reason((dtype,), batch, hidden)
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and expected in reason, reason


def test_sources_exist_and_are_found():
    found = _cuda.source_dir()
    assert found is not None, f"no csrc/ with {_cuda.SOURCES} in {_cuda.source_candidates()}"
    for name in _cuda.SOURCES:
        assert (found / name).is_file()
    # The repository's csrc/ is one of the places looked in, and every .cu there is built.
    assert ROOT / "csrc" in _cuda.source_candidates()
    built = {"lstm_persistent.cu", "lstm_binding.cpp"}
    assert {p.name for p in (ROOT / "csrc").glob("*.cu")} <= built


def test_source_lookup_prefers_the_first_complete_directory(tmp_path):
    wheel_copy, partial = tmp_path / "wheel", tmp_path / "partial"
    wheel_copy.mkdir()
    partial.mkdir()
    for name in _cuda.SOURCES:
        shutil.copy(ROOT / "csrc" / name, wheel_copy / name)
    shutil.copy(ROOT / "csrc" / _cuda.SOURCES[0], partial / _cuda.SOURCES[0])
    assert _cuda.source_dir([partial, wheel_copy]) == wheel_copy
    assert _cuda.source_dir([partial]) is None
    # The installed wheel's copy (inside the package) is looked at first.
    assert _cuda.source_candidates()[0] == Path(_cuda.__file__).resolve().parent / "csrc"


@pytest.mark.parametrize(
    "capability, arch",
    [((8, 0), "sm_80"), ((9, 0), "sm_90a"), ((8, 6), "sm_86"), ((8, 9), "sm_89")],
)
def test_arch_flag(capability, arch):
    assert _cuda.arch_flag(capability) == arch
    compute = arch.replace("sm_", "compute_")
    assert _cuda.gencode_flags(capability) == ["-gencode", f"arch={compute},code={arch}"]


def test_arch_flag_rejects_pre_ampere():
    with pytest.raises(ValueError, match="7.5"):
        _cuda.arch_flag((7, 5))


def test_plan_paper_shape_h100_and_a100():
    plan = _cuda.plan_launch(1024, 16, **H100)
    assert (plan.units, plan.blocks) == (8, 128)
    # The numbers quoted in csrc/lstm_persistent.cu.
    assert (plan.fwd_smem, plan.bwd_smem) == (79872, 74240)
    plan = _cuda.plan_launch(1024, 16, **A100)
    assert (plan.units, plan.blocks) == (16, 64)
    assert max(plan.fwd_smem, plan.bwd_smem) <= A100["smem_per_block"]


@pytest.mark.parametrize(
    "hidden, batch, device, words",
    [
        (2048, 16, H100, ["H=2048", "KiB", "132 SMs"]),
        (8192, 16, {"sm_count": 132, "smem_per_block": 10**9}, ["H=8192", "132 SMs"]),
        (1024, 65, H100, ["batch 65", "64"]),
        (1004, 16, H100, ["H=1004", "multiple of 8"]),
    ],
)
def test_plan_rejects_what_does_not_fit(hidden, batch, device, words):
    reason = _cuda.plan_launch(hidden, batch, **device)
    assert isinstance(reason, str), reason
    for word in words:
        assert word in reason, reason


@pytest.mark.parametrize(
    "device, largest",
    [(H100, 1632), (A100, 1120), ({"sm_count": 128, "smem_per_block": 101376}, 1024)],
)
def test_largest_hidden_size_per_device(device, largest):
    """The limits the module docstring states: every multiple of 8 up to ``largest`` fits."""
    assert not isinstance(_cuda.plan_launch(largest, 64, **device), str)
    assert isinstance(_cuda.plan_launch(largest + 8, 1, **device), str)


@pytest.mark.parametrize("hidden", [8, 40, 72, 1024, 1536])
def test_plan_fits_its_own_limits(hidden):
    plan = _cuda.plan_launch(hidden, 3, **H100)
    assert plan.blocks * plan.units >= hidden > (plan.blocks - 1) * plan.units
    assert plan.blocks <= H100["sm_count"]
    assert max(plan.fwd_smem, plan.bwd_smem) <= H100["smem_per_block"]


def test_python_constants_match_the_cuda_header():
    header = (ROOT / "csrc" / "lstm_persistent.h").read_text()

    def constant(name):
        return int(re.search(rf"constexpr int {name} = (\d+);", header).group(1))

    assert constant("kLstmWarps") == _cuda.WARPS
    assert constant("kLstmPartialSlots") == _cuda.PARTIAL_SLOTS
    assert constant("kLstmMaxBatch") == _cuda.MAX_BATCH
    choices = re.search(r"kLstmUnitChoices\[\] = \{([^}]*)\}", header).group(1)
    assert tuple(int(v) for v in choices.split(",")) == _cuda.UNIT_CHOICES
    assert constant("kLstmStatusWords") == _cuda.STATUS_WORDS
    limit = re.search(r"kLstmWaitLimitCycles = 1LL << (\d+);", header).group(1)
    assert 1 << int(limit) == _cuda.WAIT_LIMIT_CYCLES


# --------------------------------------------------------------------------------------------
# CPU: the error word of the bounded step waits, the SM reserve
# --------------------------------------------------------------------------------------------
def _step_buffer(word: int) -> torch.Tensor:
    """The status buffer a launch returns: the error word as two int32 (kLstmStatusWords)."""
    low, high = word & 0xFFFFFFFF, word >> 32
    as_int32 = [v - (1 << 32) if v >= 1 << 31 else v for v in (low, high)]
    return torch.tensor(as_int32, dtype=torch.int32)


def test_check_status_passes_a_clean_launch():
    _cuda.check_status(_step_buffer(_cuda.NO_ERROR), "forward", 5)


@pytest.mark.parametrize(
    "pass_name, epoch, step, what",
    [("forward", 3, 2, "(h_2)"), ("backward", 2, 5, "(the gate gradient of step 5)")],
)
def test_check_status_raises_naming_pass_step_and_blocks(pass_name, epoch, step, what):
    word = (epoch << 32) | (6 << 16) | 1  # block 1 waited for block 6
    with pytest.raises(RuntimeError) as info:
        _cuda.check_status(_step_buffer(word), pass_name, 7)
    message = str(info.value)
    assert f"LSTM {pass_name}: block 1 gave up waiting for block 6" in message, message
    assert f"to publish step {step} of 7 {what}" in message, message


@pytest.mark.parametrize("raw, expected", [("", 0), ("0", 0), (" 8 ", 8)])
def test_reserve_sms_reads_the_environment(monkeypatch, raw, expected):
    monkeypatch.setenv(_cuda.RESERVE_SMS_ENV, raw)
    assert _cuda.reserve_sms() == expected


@pytest.mark.parametrize("raw", ["-1", "four", "2.5"])
def test_reserve_sms_rejects_bad_values(monkeypatch, raw):
    monkeypatch.setenv(_cuda.RESERVE_SMS_ENV, raw)
    with pytest.raises(ValueError, match=f"{_cuda.RESERVE_SMS_ENV}.*{re.escape(repr(raw))}"):
        _cuda.reserve_sms()


def test_plan_with_reserved_sms():
    # 8 SMs reserved on an H100: 124 left, so H = 1024 takes 16 units (64 blocks).
    plan = _cuda.plan_launch(1024, 16, reserve=8, **H100)
    assert plan.units == 16 and plan.blocks == 64
    # The largest H100 shape no longer fits with most SMs reserved; the reason says so.
    reason = _cuda.plan_launch(1632, 16, reserve=100, **H100)
    assert isinstance(reason, str) and "100 of 132 SMs reserved" in reason, reason
    assert "reserve must be in [0, 132)" in _cuda.plan_launch(1024, 16, reserve=132, **H100)


def test_smem_formulas_match_the_cuda_header(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the header cannot be compiled here")
    cases = [(h, u) for h in (8, 40, 72, 1000, 1024, 1536, 2048) for u in _cuda.UNIT_CHOICES]
    program = tmp_path / "smem.cpp"
    lines = [f"  print({h}, {u});" for h, u in cases]
    program.write_text(
        '#include <cstdio>\n#include "lstm_persistent.h"\n'
        "static void print(int h, int u) {\n"
        '  std::printf("%d %d %d %zu %zu\\n", h, u, sha_rnn::lstm_smem_row_stride(h),\n'
        "              sha_rnn::lstm_fwd_smem_bytes(h, u), sha_rnn::lstm_bwd_smem_bytes(h, u));\n"
        "}\nint main() {\n" + "\n".join(lines) + "\n}\n"
    )
    exe = tmp_path / "smem"
    subprocess.run(
        [nvcc, "-std=c++17", f"-I{ROOT / 'csrc'}", str(program), "-o", str(exe)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    rows = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    rows = rows.splitlines()
    assert len(rows) == len(cases)
    for (h, u), row in zip(cases, rows):
        expected = [h, u, _cuda.smem_row_stride(h), _cuda.fwd_smem_bytes(h, u)]
        expected.append(_cuda.bwd_smem_bytes(h, u))
        assert [int(v) for v in row.split()] == expected


@pytest.mark.parametrize("k", [8, 32, 40, 64, 96, 1024, 1056, 4096])
def test_smem_row_stride_is_32_mod_64(k):
    stride = _cuda.smem_row_stride(k)
    assert stride >= k and stride % 64 == 32 and stride - k < 64


def test_build_lock_is_exclusive(tmp_path):
    lock = tmp_path / "ext.lock"
    with _cuda.build_lock(lock):
        with pytest.raises(TimeoutError, match="another process is building"):
            with _cuda.build_lock(lock, timeout=0.3, poll=0.05):
                pass
        # Another process cannot take it either.
        probe = (
            "import fcntl, sys\n"
            f"f = open({str(lock)!r}, 'a+')\n"
            "try:\n"
            "    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "except BlockingIOError:\n"
            "    sys.exit(3)\n"
        )
        assert subprocess.run([sys.executable, "-c", probe], timeout=60).returncode == 3
    with _cuda.build_lock(lock, timeout=0.3):
        pass
    assert subprocess.run([sys.executable, "-c", probe], timeout=60).returncode == 0


def test_build_lock_serialises_builders(tmp_path):
    lock, inside, overlaps = tmp_path / "ext.lock", [], []

    def builder():
        with _cuda.build_lock(lock, timeout=60, poll=0.01):
            if inside:
                overlaps.append(True)
            inside.append(True)
            threading.Event().wait(0.05)
            inside.pop()

    threads = [threading.Thread(target=builder) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not overlaps


def test_build_root_and_extension_name(tmp_path, monkeypatch):
    monkeypatch.setenv(_cuda.BUILD_DIR_ENV, str(tmp_path / "builds"))
    assert _cuda.build_root() == tmp_path / "builds"
    sources = tmp_path / "src"
    sources.mkdir()
    for name in _cuda.SOURCES:
        shutil.copy(ROOT / "csrc" / name, sources / name)
    name80 = _cuda.extension_name("sm_80", sources)
    assert name80 == _cuda.extension_name("sm_80", sources)
    assert name80 != _cuda.extension_name("sm_90a", sources)
    with open(sources / "lstm_persistent.cu", "a") as f:
        f.write("\n// changed\n")
    assert name80 != _cuda.extension_name("sm_80", sources)


@pytest.mark.parametrize("bias", [True, False])
def test_custom_ops_autograd_wiring_on_meta(bias):
    """The fake kernels and the autograd formula give every gradient its input's shape."""
    T, B, I, H = 5, 3, 24, 40

    def meta(*shape):
        return torch.empty(*shape, device="meta", dtype=torch.bfloat16, requires_grad=True)

    x, w_ih, w_hh, h0, c0 = meta(T, B, I), meta(4 * H, I), meta(4 * H, H), meta(B, H), meta(B, H)
    b_ih, b_hh = (meta(4 * H), meta(4 * H)) if bias else (None, None)
    out, h_n, c_n = _cuda.lstm(x, w_ih, w_hh, b_ih, b_hh, h0, c0)
    assert (out.shape, h_n.shape, c_n.shape) == ((T, B, H), (B, H), (B, H))
    assert out.dtype == h_n.dtype == c_n.dtype == torch.bfloat16
    (out.sum() + h_n.sum() + c_n.sum()).backward()
    leaves = [x, w_ih, w_hh, h0, c0] + ([b_ih, b_hh] if bias else [])
    for leaf in leaves:
        assert leaf.grad is not None and leaf.grad.shape == leaf.shape


def test_custom_ops_are_registered():
    assert hasattr(torch.ops.sha_rnn_kernels, "lstm_cuda_fwd")
    assert hasattr(torch.ops.sha_rnn_kernels, "lstm_cuda_bwd")


# --------------------------------------------------------------------------------------------
# GPU: parity with torch.nn.LSTM
# --------------------------------------------------------------------------------------------
def _master(T, B, I, H, bias, device) -> Dict[str, Optional[torch.Tensor]]:
    """Weights as torch.nn.LSTM initialises them, inputs, state and loss weights (fp32)."""
    module = torch.nn.LSTM(I, H, bias=bias)
    return {
        "x": torch.randn(T, B, I),
        "w_ih": module.weight_ih_l0.detach().clone(),
        "w_hh": module.weight_hh_l0.detach().clone(),
        "b_ih": module.bias_ih_l0.detach().clone() if bias else None,
        "b_hh": module.bias_hh_l0.detach().clone() if bias else None,
        "h0": torch.randn(B, H) * 0.5,
        "c0": torch.randn(B, H) * 0.5,
        "g_out": torch.randn(T, B, H),
        "g_h": torch.randn(B, H),
        "g_c": torch.randn(B, H),
    }


def _run(master, kernel_dtype, run_dtype, device, use_kernel):
    """Outputs and gradients, inputs rounded to ``kernel_dtype`` and computed in ``run_dtype``
    (by the CUDA kernel when ``use_kernel``, else by torch.nn.LSTM)."""
    leaves = {}
    for name in ("x", "w_ih", "w_hh", "b_ih", "b_hh", "h0", "c0"):
        t = master[name]
        if t is not None:
            t = t.to(device).to(kernel_dtype).to(run_dtype).requires_grad_()
        leaves[name] = t
    x, w_ih, w_hh, b_ih, b_hh, h0, c0 = (
        leaves[n] for n in ("x", "w_ih", "w_hh", "b_ih", "b_hh", "h0", "c0")
    )
    if use_kernel:
        out, h_n, c_n = _cuda.lstm(x, w_ih, w_hh, b_ih, b_hh, h0, c0)
    else:
        flat = [w_ih, w_hh] + ([b_ih, b_hh] if b_ih is not None else [])
        out, h_n, c_n = torch.lstm(
            x, (h0[None], c0[None]), flat, b_ih is not None, 1, 0.0, True, False, False
        )
        h_n, c_n = h_n[0], c_n[0]
    weights = {n: master[g].to(device).to(kernel_dtype) for n, g in
               (("out", "g_out"), ("h_n", "g_h"), ("c_n", "g_c"))}  # fmt: skip
    loss = sum((o.double() * weights[n].double()).sum() for n, o in zip(OUTPUTS, (out, h_n, c_n)))
    loss.backward()
    result = {"out": out, "h_n": h_n, "c_n": c_n}
    for grad_name, leaf in zip(GRADS, ("x", "w_ih", "w_hh", "b_ih", "b_hh", "h0", "c0")):
        if leaves[leaf] is not None:
            result[grad_name] = leaves[leaf].grad
    return {k: v.detach() for k, v in result.items()}


def _check_parity(T, B, I, H, dtype, device, bias=True):
    master = _master(T, B, I, H, bias, device)
    reason = _cuda.lstm_unsupported_reason(
        master["x"].to(device, dtype), master["w_ih"].to(device, dtype),
        master["w_hh"].to(device, dtype),
    )  # fmt: skip
    assert reason is None, reason
    expected = _run(master, dtype, torch.float64, device, use_kernel=False)
    lowp = _run(master, dtype, dtype, device, use_kernel=False)
    actual = _run(master, dtype, dtype, device, use_kernel=True)
    assert set(actual) == set(expected)
    for name in expected:
        assert actual[name].dtype == dtype, name
        assert_parity(f"{name} ({dtype}, T={T} B={B} I={I} H={H})", actual[name],
                      expected[name], lowp=lowp[name], dtype=dtype)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T, B, I, H", [(7, 3, 24, 40), (1, 1, 40, 72), (7, 1, 72, 40),
                                        (9, 16, 13 * 8, 72), (3, 5, 40, 264),
                                        (4, 33, 24, 40), (3, 64, 16, 72)])  # fmt: skip
def test_parity_odd_sizes(cuda, dtype, T, B, I, H):
    _check_parity(T, B, I, H, dtype, cuda)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_parity_without_bias(cuda, dtype):
    _check_parity(6, 3, 24, 40, dtype, cuda, bias=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_parity_paper_shape(cuda, dtype):
    _check_parity(1024, 16, 1024, 1024, dtype, cuda)


@pytest.mark.gpu
def test_only_h_n_used_and_no_state(cuda):
    """Unused outputs give no gradient (None in the backward) and a missing state is zeros."""
    T, B, I, H = 5, 2, 16, 40
    x = torch.randn(T, B, I, device=cuda, dtype=torch.bfloat16, requires_grad=True)
    module = torch.nn.LSTM(I, H).to(cuda)
    w = [p.detach().to(torch.bfloat16).requires_grad_() for p in module.parameters()]
    _, h_n, _ = _cuda.lstm(x, *w, None, None)
    h_n.float().sum().backward()
    x64 = x.detach().double().requires_grad_()
    w64 = [p.detach().double().requires_grad_() for p in w]
    _, h64, _ = torch.lstm(
        x64, (x64.new_zeros(1, B, H), x64.new_zeros(1, B, H)), w64, True, 1, 0.0, True, False,
        False,
    )  # fmt: skip
    h64[0].sum().backward()
    assert_parity("h_n", h_n, h64[0], dtype=torch.bfloat16)
    assert_parity("dx", x.grad, x64.grad, dtype=torch.bfloat16)
    assert_parity("dW_hh", w[1].grad, w64[1].grad, dtype=torch.bfloat16)


@pytest.mark.gpu
def test_reason_on_cuda_tensors(cuda):
    def tensors(B, H, dtype, I=32):
        return (torch.empty(2, B, I, device=cuda, dtype=dtype),
                torch.empty(4 * H, I, device=cuda, dtype=dtype),
                torch.empty(4 * H, H, device=cuda, dtype=dtype))  # fmt: skip

    assert "float32" in _cuda.lstm_unsupported_reason(*tensors(16, 1024, torch.float32))
    assert "batch 65" in _cuda.lstm_unsupported_reason(*tensors(65, 1024, torch.bfloat16))
    if torch.cuda.get_device_capability(cuda) < (8, 0):
        assert "8.0" in _cuda.lstm_unsupported_reason(*tensors(16, 1024, torch.bfloat16))
        return
    assert "H=4096" in _cuda.lstm_unsupported_reason(*tensors(16, 4096, torch.bfloat16))
    assert _cuda.lstm_unsupported_reason(*tensors(16, 1024, torch.bfloat16)) is None


@pytest.mark.gpu
def test_torch_compile_fullgraph_matches_eager(cuda):
    T, B, I, H = 6, 4, 32, 48
    dtype = torch.float16
    module = torch.nn.LSTM(I, H).to(cuda)
    weights = [p.detach().to(dtype).requires_grad_() for p in module.parameters()]
    x = torch.randn(T, B, I, device=cuda, dtype=dtype, requires_grad=True)
    h0 = torch.randn(B, H, device=cuda, dtype=dtype)
    c0 = torch.randn(B, H, device=cuda, dtype=dtype)

    def step(x, w_ih, w_hh, b_ih, b_hh):
        out, h_n, c_n = _cuda.lstm(x, w_ih, w_hh, b_ih, b_hh, h0, c0)
        return out.float().sum() + h_n.float().square().sum() + c_n.float().sum()

    eager = step(x, *weights)
    eager_grads = torch.autograd.grad(eager, [x, *weights])
    compiled = torch.compile(step, fullgraph=True)(x, *weights)
    compiled_grads = torch.autograd.grad(compiled, [x, *weights])
    # The loss is an fp32 sum of ~1,200 terms whose order Inductor picks (a few ulp apart);
    # the kernels and GEMMs behind the gradients are the same calls, so those match exactly.
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for a, e in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.gpu
def test_threads_launching_different_sizes_concurrently(cuda):
    """The shared-memory opt-in is set once per kernel and device (to the maximum), so host
    threads launching sizes with different shared memory never undo each other's opt-in."""
    errors = []

    def worker(hidden):
        try:
            for _ in range(3):
                _check_parity(3, 4, 32, hidden, torch.bfloat16, cuda)
        except Exception as exc:  # reported below with the size that failed
            errors.append((hidden, repr(exc)))

    threads = [threading.Thread(target=worker, args=(h,)) for h in (40, 1024, 264, 520)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
