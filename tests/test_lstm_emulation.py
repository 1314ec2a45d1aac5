"""The persistent CUDA LSTM of csrc/ run on the CPU: g++ compiles the real lstm_persistent.cu
through the emulation shim csrc/emu/cuda_emu.h (one std::thread per CUDA thread, std::barrier
for __syncthreads, C++ relaxed atomics for the step hand-off words, mma.sync emulated from
the PTX fragment table, an emulated runtime enforcing the launch preconditions), and
csrc/emu/lstm_emu_driver.cpp calls the real host launchers. No CUDA toolkit or GPU: only g++
with C++20 <barrier> (and libtsan for the ThreadSanitizer tests).

Parity: out, h_n, c_n and dx, dW_ih, dW_hh, db, dh0, dc0 (the GEMMs around the recurrence are
sha_rnn_kernels._cuda's own) against torch.lstm in float64 on the same rounded inputs, under
the tolerance rule of sha_rnn_kernels.testing.assert_parity (low-precision baseline:
torch.lstm in that dtype). The launch plan comes from _cuda.plan_launch for an emulated device
whose SM count forces 8, 16, 24 or 32 hidden units per block.

Also: the sm_90 cluster backward (clusters of 8, 4 and 2, chosen by the launcher from the
emulated GPCs and the SM reserve; distributed shared memory and split cluster barriers
emulated), the sm_80 path at the same shape, and the bounded step waits (a block whose
published words are lost ends the launch with an error word naming the step and the blocks
instead of hanging).

Run: python -m pytest tests/test_lstm_emulation.py -m cpu_emulation
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from sha_rnn_kernels import _cuda
from sha_rnn_kernels.testing import assert_parity

pytestmark = pytest.mark.cpu_emulation

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
EMU = CSRC / "emu"
DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16}
SMEM_OPTIN, SMEM_PER_SM = 232448, 233472  # the emulated device's defaults (an H100)


def _compile(out: Path, extra_flags=()) -> subprocess.CompletedProcess:
    cmd = [
        "g++", "-std=c++20", "-pthread", f"-I{EMU / 'include'}", f"-I{CSRC}", *extra_flags,
        "-x", "c++", str(CSRC / "lstm_persistent.cu"), "-x", "none",
        str(EMU / "lstm_emu_driver.cpp"), "-o", str(out),
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _probe(tmp: Path, flags) -> bool:
    src = tmp / "probe.cpp"
    src.write_text("#include <barrier>\nint main() { std::barrier<> b(1); b.arrive_and_wait(); }\n")
    result = subprocess.run(
        ["g++", "-std=c++20", "-pthread", *flags, str(src), "-o", str(tmp / "probe")],
        capture_output=True, timeout=300,
    )  # fmt: skip
    return result.returncode == 0


@pytest.fixture(scope="session")
def emu_dir(tmp_path_factory) -> Path:
    if shutil.which("g++") is None:
        pytest.skip("g++ is not on PATH: the CUDA emulation is compiled with it")
    tmp = tmp_path_factory.mktemp("cuda_emu")
    if not _probe(tmp, ()):
        pytest.skip("g++ lacks C++20 <barrier> (std::barrier): needs g++ >= 11")
    return tmp


@pytest.fixture(scope="session")
def driver(emu_dir) -> Path:
    exe = emu_dir / "lstm_emu_driver"
    result = _compile(exe, ["-O1"])
    assert result.returncode == 0, f"g++ failed to compile the emulation:\n{result.stderr[-6000:]}"
    return exe


def _write(path: Path, t: torch.Tensor) -> None:
    path.write_bytes(t.detach().contiguous().view(torch.uint8).numpy().tobytes())


def _read(path: Path, dtype: torch.dtype, shape) -> torch.Tensor:
    data = bytearray(path.read_bytes())
    return torch.frombuffer(data, dtype=dtype).reshape(shape).clone()


def _inputs(T, B, I, H, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scale = H**-0.5

    def uniform(*shape):
        return (torch.rand(*shape, generator=gen) * 2 - 1) * scale

    return {
        "x": torch.randn(T, B, I, generator=gen),
        "w_ih": uniform(4 * H, I),
        "w_hh": uniform(4 * H, H),
        "b_ih": uniform(4 * H),
        "b_hh": uniform(4 * H),
        "h0": torch.randn(B, H, generator=gen) * 0.5,
        "c0": torch.randn(B, H, generator=gen) * 0.5,
        "g_out": torch.randn(T, B, H, generator=gen),
        "g_h": torch.randn(B, H, generator=gen),
        "g_c": torch.randn(B, H, generator=gen),
    }


def run_emulated(
    driver, tmp, dtype_name, master, sm_count, mode="train", env=None, override=None
):
    """The kernels' results through the emulation; returns (dict, CompletedProcess).
    ``override``: inputs given already in the dtype (bit patterns a conversion would not keep)."""
    dtype = DTYPES[dtype_name]
    m = {k: v.to(dtype) for k, v in master.items()}
    m.update(override or {})
    T, B, _ = m["x"].shape
    H = m["w_hh"].shape[1]
    plan = _cuda.plan_launch(H, B, sm_count=sm_count, smem_per_block=SMEM_OPTIN)
    assert not isinstance(plan, str), plan
    xproj = _cuda.input_projection(m["x"], m["w_ih"], _cuda.combine_bias(m["b_ih"], m["b_hh"]))
    files = {"xproj": xproj, "w_hh": m["w_hh"], "h0": m["h0"], "c0": m["c0"],
             "d_out": m["g_out"], "d_hn": m["g_h"], "d_cn": m["g_c"]}  # fmt: skip
    for name, t in files.items():
        _write(tmp / f"{name}.bin", t)
    run_env = dict(os.environ, CUDA_EMU_SM_COUNT=str(sm_count), CUDA_EMU_WATCHDOG_S="60")
    run_env.update(env or {})
    args = [str(driver), str(tmp), dtype_name, str(T), str(B), str(H), str(plan.units), mode]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=run_env)
    if proc.returncode != 0:
        return None, proc
    result = {"out": _read(tmp / "out.bin", dtype, (T, B, H))}
    result["h_n"] = result["out"][T - 1]
    result["c_n"] = _read(tmp / "c_n.bin", dtype, (B, H))
    if mode == "train":
        d_gates = _read(tmp / "d_gates.bin", dtype, (T, B, 4 * H))
        grads = _cuda.gemm_gradients(m["x"], m["w_ih"], m["h0"], result["out"], d_gates)
        for name, g in zip(("dx", "dW_ih", "dW_hh", "db"), grads):
            result[name] = g
        result["dh0"] = _read(tmp / "d_h0.bin", dtype, (B, H))
        result["dc0"] = _read(tmp / "d_c0.bin", dtype, (B, H))
    return result, proc


def run_torch(master, dtype, run_dtype):
    """torch.lstm on inputs rounded to ``dtype``, computed in ``run_dtype``."""
    leaves = {
        k: master[k].to(dtype).to(run_dtype).requires_grad_()
        for k in ("x", "w_ih", "w_hh", "b_ih", "b_hh", "h0", "c0")
    }
    out, h_n, c_n = torch.lstm(
        leaves["x"], (leaves["h0"][None], leaves["c0"][None]),
        [leaves[k] for k in ("w_ih", "w_hh", "b_ih", "b_hh")], True, 1, 0.0, True, False, False,
    )  # fmt: skip
    h_n, c_n = h_n[0], c_n[0]
    loss = sum(
        (o.double() * master[g].to(dtype).double()).sum()
        for o, g in ((out, "g_out"), (h_n, "g_h"), (c_n, "g_c"))
    )
    loss.backward()
    result = {"out": out, "h_n": h_n, "c_n": c_n}
    for name, leaf in (("dx", "x"), ("dW_ih", "w_ih"), ("dW_hh", "w_hh"), ("db", "b_ih"),
                       ("dh0", "h0"), ("dc0", "c0")):  # fmt: skip
        result[name] = leaves[leaf].grad
    return {k: v.detach() for k, v in result.items()}


# (T, B, I, H, emulated SM count): H = 40, 56, 24 are not multiples of 16; the SM count makes
# plan_launch pick 8 (H=40: 5 blocks), 24 (H=24, one block), 32 (H=56: 2 blocks, the second
# half empty) and 16 (H=40, 3 blocks, the last one ragged) units per block.
SHAPES = [
    (5, 3, 24, 40, 132),
    (4, 1, 16, 24, 1),
    (3, 9, 40, 56, 2),
    (3, 16, 8, 40, 3),
    (3, 33, 16, 40, 3),  # three 16-row batch tiles, the last of 1 row
    (2, 64, 8, 24, 132),  # the largest batch: four full tiles
]


@pytest.mark.parametrize("dtype_name", ["bf16", "f16"])
@pytest.mark.parametrize("T, B, I, H, sm_count", SHAPES)
def test_parity_forward_backward(driver, tmp_path, dtype_name, T, B, I, H, sm_count):
    _check(driver, tmp_path, dtype_name, T, B, I, H, sm_count)


@pytest.fixture(scope="session")
def small_batch_driver(emu_dir) -> Path:
    """The kernels with 1 (forward) and 2 (backward) K chunks per load batch, so that tiny K
    runs the warps' loop over several load batches and both backward accumulator sets."""
    exe = emu_dir / "lstm_emu_driver_small_batch"
    flags = ["-O1", "-DSHA_RNN_LSTM_FWD_LOAD_BATCH=1", "-DSHA_RNN_LSTM_BWD_LOAD_BATCH=2"]
    result = _compile(exe, flags)
    assert result.returncode == 0, f"g++ failed to compile the emulation:\n{result.stderr[-6000:]}"
    return exe


def _check(driver, tmp_path, dtype_name, T, B, I, H, sm_count):
    dtype = DTYPES[dtype_name]
    master = _inputs(T, B, I, H)
    actual, proc = run_emulated(driver, tmp_path, dtype_name, master, sm_count)
    assert actual is not None, f"emulation failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    expected = run_torch(master, dtype, torch.float64)
    lowp = run_torch(master, dtype, dtype)
    assert set(actual) == set(expected)
    for name in expected:
        assert actual[name].dtype == dtype, name
        assert_parity(f"{name} ({dtype_name}, T={T} B={B} I={I} H={H} SMs={sm_count})",
                      actual[name], expected[name], lowp=lowp[name], dtype=dtype)  # fmt: skip


@pytest.mark.parametrize("small_batch", [False, True])
def test_parity_several_k_chunks_per_warp(driver, small_batch_driver, tmp_path, small_batch):
    """H = 264: the forward's K = 264 gives warp 0 two 32-wide chunks, the backward's K = 1056
    five (both accumulator sets); 32 units per block, 9 blocks."""
    exe = small_batch_driver if small_batch else driver
    _check(exe, tmp_path, "f16" if small_batch else "bf16", 2, 5, 16, 264, 9)


def test_inference_forward_saves_nothing_and_matches(driver, tmp_path):
    master = _inputs(4, 3, 16, 40, seed=1)
    train, proc = run_emulated(driver, tmp_path, "bf16", master, 132)
    assert train is not None, proc.stderr[-3000:]
    infer, proc = run_emulated(driver, tmp_path, "bf16", master, 132, mode="infer")
    assert infer is not None, proc.stderr[-3000:]
    for name in ("out", "c_n"):
        assert torch.equal(infer[name], train[name]), name


# ---- the emulated runtime refuses what a GPU refuses -----------------------------------------
def test_launch_too_large_for_co_residency_is_refused(driver, tmp_path):
    """The plan for 132 SMs (5 blocks) on an emulated device with 4 SMs: cooperative launch
    would deadlock on a GPU; the launcher's occupancy check refuses it first."""
    master = _inputs(2, 2, 8, 40)
    _, proc = run_emulated(driver, tmp_path, "bf16", master, 132, env={"CUDA_EMU_SM_COUNT": "4"})
    assert proc.returncode == 2, proc.stderr
    assert "cannot be co-resident" in proc.stderr and "4 SMs" in proc.stderr, proc.stderr


def test_shared_memory_beyond_opt_in_is_refused(driver, tmp_path):
    master = _inputs(2, 2, 8, 40)
    env = {"CUDA_EMU_SMEM_OPTIN": "4096"}
    _, proc = run_emulated(driver, tmp_path, "bf16", master, 132, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "bytes of shared memory per block, the device allows 4096" in proc.stderr


# ---- planted bugs: the emulation catches what a GPU would get wrong ---------------------------
@pytest.mark.parametrize(
    "plant, expect",
    [
        ("swap_mma_a", "parity"),  # A registers a1/a2 swapped: wrong products
        # Readers that do not poll: every publishing store is held back until the launch ends,
        # so they read the launcher's fill (NaN) whatever the thread timing.
        ("skip_poll", "parity"),
    ],
)
def test_planted_bug_is_caught(driver, tmp_path, plant, expect):
    """A wrong fragment layout and a reader that takes unpublished words are caught by parity.
    Races (a skipped barrier, a non-atomic poll) are left to the ThreadSanitizer tests below:
    whether an early reader happens to see a half-written buffer depends on thread timing,
    and a test must not depend on timing."""
    master = _inputs(3, 3, 16, 40, seed=2)
    actual, proc = run_emulated(
        driver, tmp_path, "bf16", master, 132, env={"CUDA_EMU_PLANT": plant}
    )
    if actual is None:  # a hang (watchdog) or a refusal also counts as caught
        assert proc.returncode in (2, 124), proc.stderr
        return
    expected = run_torch(master, torch.bfloat16, torch.float64)
    lowp = run_torch(master, torch.bfloat16, torch.bfloat16)
    with pytest.raises(AssertionError):
        for name in expected:
            assert_parity(name, actual[name], expected[name], lowp=lowp[name])


def test_missing_shared_memory_opt_in_is_refused(driver, tmp_path):
    """H = 1024 needs 76 KB per block (> 48 KB without the opt-in): a launcher that skips
    cudaFuncSetAttribute is refused before any thread starts."""
    master = _inputs(1, 1, 8, 1024)
    _, proc = run_emulated(
        driver, tmp_path, "bf16", master, 132, env={"CUDA_EMU_PLANT": "no_smem_optin"}
    )
    assert proc.returncode == 2, proc.stderr
    # The occupancy query already sees 0 blocks per SM (as the CUDA runtime's does).
    refused = ("MaxDynamicSharedMemorySize missing", "0 per SM")
    assert any(words in proc.stderr for words in refused), proc.stderr


# ---- ThreadSanitizer: the barriers order every shared access ---------------------------------
@pytest.fixture(scope="session")
def tsan_driver(emu_dir) -> Path:
    if not _probe(emu_dir, ("-fsanitize=thread",)):
        pytest.skip("g++ cannot link -fsanitize=thread (libtsan missing)")
    exe = emu_dir / "lstm_emu_driver_tsan"
    result = _compile(exe, ["-O1", "-g", "-fsanitize=thread"])
    assert result.returncode == 0, result.stderr[-6000:]
    return exe


TSAN_ENV = {"TSAN_OPTIONS": "halt_on_error=1 exitcode=66 report_signal_unsafe=0"}


# Small grids under ThreadSanitizer: the sm_90 backward in one cluster of 2 blocks (GPCs of 2
# SMs), and the sm_80 backward without clusters.
TSAN_PATHS = {"cluster": {"CUDA_EMU_GPC_SMS": "2"}, "sm_80": {"CUDA_EMU_CC_MAJOR": "8"}}


@pytest.mark.parametrize("path", sorted(TSAN_PATHS))
def test_thread_sanitizer_finds_no_race(tsan_driver, tmp_path, path):
    master = _inputs(2, 3, 8, 16)
    env = dict(TSAN_ENV, **TSAN_PATHS[path])
    actual, proc = run_emulated(tsan_driver, tmp_path, "bf16", master, 132, env=env)
    assert proc.returncode == 0 and "ThreadSanitizer" not in proc.stderr, proc.stderr[-6000:]
    expected = run_torch(master, torch.bfloat16, torch.float64)
    assert_parity("out (tsan build)", actual["out"], expected["out"], dtype=torch.bfloat16)


@pytest.mark.parametrize("plant", ["skip_syncthreads:1", "skip_syncthreads:3", "plain_poll"])
def test_thread_sanitizer_sees_a_removed_barrier(tsan_driver, tmp_path, plant):
    """skip_syncthreads:1: the first MMA reads the weight slice before it is loaded.
    skip_syncthreads:3: without the barrier between the two halves of the split-K sum (the
    forward's 3rd __syncthreads), warps add into a partial tile while others still store it.
    plain_poll: blocks poll the previous step's h / dgates with plain loads while other blocks
    publish it (the hand-off must be relaxed atomics: ld/st.relaxed.gpu on the GPU)."""
    master = _inputs(2, 3, 8, 16)
    env = dict(TSAN_ENV, CUDA_EMU_PLANT=plant, **TSAN_PATHS["cluster"])
    _, proc = run_emulated(tsan_driver, tmp_path, "bf16", master, 132, env=env)
    assert proc.returncode == 66 and "ThreadSanitizer: data race" in proc.stderr, proc.stderr


# ---- bounded step waits: lost words are an error naming the step and the blocks, not a hang ---
# 4 s at the emulated clock's 0.01 GHz: far above a legal wait of these tiny grids (even on a
# loaded 2-core machine), short enough for the test.
WAIT_LIMIT_ENV = {"CUDA_EMU_WAIT_LIMIT_CYCLES": str(4 * 10**7)}


# The cluster backward at H = 40 in one cluster of 8: rank r polls dgates columns
# [24 r, 24 r + 24) of 4H = 160, so only the ranks whose range holds one of the lost block's
# four gate columns wait for it (block 4: units 32-39, columns 32-39, 72-79, 112-119, 152-159).
ALL_FIVE = set(range(5))


@pytest.mark.parametrize(
    "lost_epoch, pass_name, step, late, waiters, env",
    [
        (2, "forward", 1, 4, ALL_FIVE, {}),  # the forward's epoch 2 publishes h_1
        # T = 3: the forward publishes epochs 1-2, the backward's epoch 3 is t = 0. The sm_90
        # backward runs a cluster of 8 (5 blocks padded to 8: blocks 5-7 own no unit, so the
        # lost block is named, 4), sm_80's 5 blocks.
        (3, "backward", 0, 4, {1, 3, 4, 6}, {"CUDA_EMU_LOSE_BLOCK": "4"}),
        (3, "backward", 0, 2, {0, 2, 4, 5}, {"CUDA_EMU_LOSE_BLOCK": "2"}),
        (3, "backward", 0, 4, ALL_FIVE, {"CUDA_EMU_CC_MAJOR": "8"}),
    ],
)
def test_lost_step_words_are_an_error_naming_step_and_block(
    driver, tmp_path, lost_epoch, pass_name, step, late, waiters, env
):
    """CUDA_EMU_PLANT=lose_store:N: one block (the grid's last unless CUDA_EMU_LOSE_BLOCK)
    publishes no epoch >= N. The blocks that poll its words give up after the limit and
    record the error word; the driver exits 4 with it and _cuda.status_error turns it into the
    message the host raises."""
    master = _inputs(3, 2, 8, 40)
    env = dict(WAIT_LIMIT_ENV, CUDA_EMU_PLANT=f"lose_store:{lost_epoch}", **env)
    _, proc = run_emulated(driver, tmp_path, "bf16", master, 132, env=env)
    assert proc.returncode == 4, f"expected a step error, got {proc.returncode}:\n{proc.stderr}"
    words = proc.stderr.split("lstm step error:")[1].split()
    assert words[0] == pass_name, proc.stderr
    message = _cuda.status_error(words[0], int(words[1]), seq_len=3)
    assert message is not None
    assert f"LSTM {pass_name}: block " in message, message
    assert f"waiting for block {late} to publish step {step} of 3" in message, message
    waiting = int(message.split(": block ")[1].split()[0])
    # Whichever waiting block gave up first (the late one too: it polls its own words).
    assert waiting in waiters, message


def test_wait_limit_does_not_fire_on_a_correct_run(driver, tmp_path):
    """The same short limit on an unplanted run: every wait is legal, no error word."""
    master = _inputs(3, 2, 8, 40)
    actual, proc = run_emulated(driver, tmp_path, "bf16", master, 132, env=WAIT_LIMIT_ENV)
    assert actual is not None, f"({proc.returncode}) {proc.stderr[-3000:]}"


@pytest.mark.parametrize("env", [{}, {"CUDA_EMU_CC_MAJOR": "8"}], ids=["sm_90", "sm_80"])
def test_nan_inputs_finish_with_nan_results(driver, tmp_path, env):
    """A diverged model feeds NaNs: the kernels still finish, with no error word, and return
    NaNs. h0 and c0 hold the NaN whose bits are 0xFFFF; the emulation's conversions keep a NaN's
    payload, so a published pair would come out as the unpublished word 0xFFFFFFFF (and every
    reader would wait for it) unless the kernel stores it as another NaN."""
    master = _inputs(3, 2, 8, 40)
    nan = torch.full((2, 40), -1, dtype=torch.int16).view(torch.bfloat16)
    actual, proc = run_emulated(
        driver, tmp_path, "bf16", master, 132, env=dict(WAIT_LIMIT_ENV, **env),
        override={"h0": nan, "c0": nan},
    )  # fmt: skip
    assert actual is not None, f"({proc.returncode}) {proc.stderr[-3000:]}"
    for name in ("out", "c_n", "dx", "dW_hh", "dh0", "dc0"):
        assert torch.isnan(actual[name]).all(), name


# ---- the sm_90 cluster backward: split K, partials through distributed shared memory --------
@pytest.mark.parametrize(
    "dtype_name, T, B, I, H, env, cluster",
    [
        # H = 40: 5 blocks padded to 8; 4H = 160 splits in K ranges of 24: rank 6 gets 16, rank 7
        # none (its partial is zero).
        # (f16 at clusters of 8: test_parity_forward_backward's H = 40 and H = 24 shapes.)
        ("bf16", 3, 3, 24, 40, {}, 8),
        # GPCs of 4 SMs hold no cluster of 8; B = 17: two row tiles, so the deferred cluster
        # wait runs between tiles as well as between steps.
        ("bf16", 2, 17, 8, 56, {"CUDA_EMU_GPC_SMS": "4"}, 4),
        ("f16", 3, 2, 8, 24, {"CUDA_EMU_GPC_SMS": "2"}, 2),  # two accumulator sets
        # 128 of 132 SMs reserved: 4 usable, the 3 blocks run as one cluster of 4.
        ("bf16", 2, 3, 8, 24, {"SHA_RNN_KERNELS_LSTM_RESERVE_SMS": "128"}, 4),
        ("bf16", 3, 3, 24, 40, {"CUDA_EMU_CC_MAJOR": "8"}, 1),  # sm_80: no clusters
    ],
)
def test_cluster_backward_parity(driver, tmp_path, dtype_name, T, B, I, H, env, cluster):
    dtype = DTYPES[dtype_name]
    master = _inputs(T, B, I, H, seed=3)
    actual, proc = run_emulated(driver, tmp_path, dtype_name, master, 132, env=env)
    assert actual is not None, f"emulation failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    assert f"backward cluster size: {cluster}\n" in proc.stdout, proc.stdout
    expected = run_torch(master, dtype, torch.float64)
    lowp = run_torch(master, dtype, dtype)
    for name in expected:
        assert_parity(f"{name} ({dtype_name}, H={H}, cluster {cluster})", actual[name],
                      expected[name], lowp=lowp[name], dtype=dtype)  # fmt: skip


def test_refused_cluster_launch_falls_back_to_the_plain_backward(driver, tmp_path):
    """A runtime that refuses a cooperative launch with clusters: the backward runs the kernel
    without clusters (same results) and stops asking for clusters on that device."""
    master = _inputs(3, 3, 24, 40, seed=3)
    env = {"CUDA_EMU_PLANT": "no_cooperative_clusters"}
    actual, proc = run_emulated(driver, tmp_path, "bf16", master, 132, env=env)
    assert actual is not None, f"emulation failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    assert "backward cluster size: 8\n" in proc.stdout, proc.stdout
    assert "backward cluster size after the launch: 1\n" in proc.stdout, proc.stdout
    expected = run_torch(master, torch.bfloat16, torch.float64)
    lowp = run_torch(master, torch.bfloat16, torch.bfloat16)
    for name in expected:
        assert_parity(f"{name} (clusters refused)", actual[name], expected[name],
                      lowp=lowp[name], dtype=torch.bfloat16)  # fmt: skip


def test_reserved_sms_that_leave_too_few_are_refused(driver, tmp_path):
    """5 blocks on a 6-SM device with 2 SMs reserved: the launcher says so instead of
    launching a grid that would take the reserved SMs."""
    master = _inputs(2, 2, 8, 40)
    env = {"CUDA_EMU_SM_COUNT": "6", "SHA_RNN_KERNELS_LSTM_RESERVE_SMS": "2"}
    _, proc = run_emulated(driver, tmp_path, "bf16", master, 132, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "cannot be co-resident" in proc.stderr and "2 reserved" in proc.stderr, proc.stderr


@pytest.mark.parametrize("plant", ["skip_cluster_sync:1", "skip_cluster_sync:2"])
def test_thread_sanitizer_sees_a_removed_cluster_barrier(tsan_driver, tmp_path, plant):
    """skip_cluster_sync:1: blocks gather the cluster's slot sums before the other blocks have
    written them. skip_cluster_sync:2: a block writes the second row tile's slot sum while the
    others may still read the first one's (the deferred wait is gone; it orders a block's next
    write of its slot sum after the others' reads, between the row tiles of a step, here two
    at B = 17, and between steps, which the relaxed hand-off does not order). Clusters of 2."""
    master = _inputs(2, 17, 8, 16)
    env = dict(TSAN_ENV, CUDA_EMU_PLANT=plant, CUDA_EMU_GPC_SMS="2")
    _, proc = run_emulated(tsan_driver, tmp_path, "bf16", master, 132, env=env)
    assert "backward cluster size: 2" in proc.stdout, proc.stdout
    assert proc.returncode == 66 and "ThreadSanitizer: data race" in proc.stderr, proc.stderr
