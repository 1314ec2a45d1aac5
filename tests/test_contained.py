"""The contained runner (sha_rnn_kernels/_contained.py): checks in a child process against
planted kernels that hang, crash, raise or return wrong numbers; ``auto`` falling back once;
two gloo ranks agreeing on a verdict; ``backends()`` and ``explain()`` (dispatch.py)."""

import os
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import sha_rnn_kernels
import sha_rnn_kernels.functional as SF
from sha_rnn_kernels import BackendUnavailableError, _backend, _contained, _device_check, dispatch
from sha_rnn_kernels._device_check import FirstUse, Verdict

CPU = torch.device("cpu")
HOOK = str(Path(__file__).with_name("fake_kernels.py"))
LSTM_JOB = _contained.spec("lstm", "triton", CPU, torch.float32, (("H", 8), ("B", 16)))


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SHA_RNN_KERNELS_CACHE_DIR", str(tmp_path))
    store = FirstUse()
    monkeypatch.setattr(_device_check, "FIRST_USE", store)
    _backend._warned.clear()
    return store


def test_each_fault_is_a_failed_verdict_with_its_reason():
    """Hang, abort, SIGSEGV, exception and wrong numbers, each in its own child, all at once;
    the parent goes on. The hang gets a 20 s timeout, the others 300 s (time to import torch
    on a busy machine)."""
    expected = {
        "hang": "hang: no verdict within 20 s",
        "abort": "crash: the check died of SIGABRT",
        "segv": "crash: the check died of SIGSEGV",
        "raise": "exception: RuntimeError: CUDA error: an illegal memory access",
        "wrong": "mismatch: out: max |error|",
    }
    results = {}
    with ThreadPoolExecutor(len(expected)) as pool:
        # os.environ is process-wide: give each child its fault through the command's env.
        futures = {kind: pool.submit(_child, kind, 20.0 if kind == "hang" else 300.0)
                   for kind in expected}  # fmt: skip
        results = {kind: f.result() for kind, f in futures.items()}
    for kind, (verdict, _) in results.items():
        assert not verdict.passed, kind
        assert verdict.describe().startswith(expected[kind]), (kind, verdict.describe())
    assert 20.0 <= results["hang"][1] < 20.0 + 300.0  # the timeout starts once ready


def _child(kind: str, seconds: float):
    """run_in_child with the fault's environment (without touching os.environ)."""
    env = _contained._child_env()
    env.update(SHA_RNN_KERNELS_CHECK_HOOK=HOOK, FAKE_KERNEL=kind)
    start = time.monotonic()
    verdict = _contained.run_in_child(LSTM_JOB, seconds, env=env)
    return verdict, time.monotonic() - start


def test_a_passing_check_in_a_child():
    verdict, _ = _child("none", 120.0)
    assert verdict.passed and verdict.op == "lstm" and "H=8" in verdict.shape, verdict


def test_a_child_too_slow_to_start_is_not_cached(fresh_cache, monkeypatch, tmp_path):
    """The timeout counts once the child is ready to run the kernel; a child that does not get
    there in BUILD_TIMEOUT (starting Python, building the CUDA extension) fails this process's
    first use, but the verdict says nothing about the kernel and is not written to disk."""
    monkeypatch.setattr(_contained, "BUILD_TIMEOUT", 0.5)
    verdict = _contained.run_in_child(LSTM_JOB, 300.0)
    assert verdict.describe().startswith("not cached: timeout: the check did not start within")
    key = fresh_cache.key("lstm", "triton", CPU, torch.float32, (("H", 8), ("B", 16)))
    fresh_cache.store(key, verdict)
    assert fresh_cache.lookup(key) is verdict
    assert not (tmp_path / "device-checks").exists()


def test_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("SHA_RNN_KERNELS_CHECK_TIMEOUT", "7.5")
    assert _contained.timeout() == 7.5
    monkeypatch.setenv("SHA_RNN_KERNELS_CHECK_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="SHA_RNN_KERNELS_CHECK_TIMEOUT must be a positive"):
        _contained.timeout()
    monkeypatch.delenv("SHA_RNN_KERNELS_CHECK_TIMEOUT")
    assert _contained.timeout() == 120.0


def test_without_a_child_the_check_runs_here_after_one_warning(monkeypatch):
    def no_child(job, seconds=None, env=None):
        raise OSError("this is a frozen application")

    monkeypatch.setattr(_contained, "run_in_child", no_child)
    here = Verdict("lstm", "triton", "float32", "", True)
    monkeypatch.setattr(_contained, "_run_here", lambda job: here)
    _contained._no_child_warned.clear()
    with pytest.warns(RuntimeWarning, match="cannot run in a child process .*frozen"):
        assert _contained.run_check(LSTM_JOB).passed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _contained.run_check(LSTM_JOB).passed


def test_auto_falls_back_once_when_the_contained_check_fails(fresh_cache, monkeypatch):
    """auto on a (CPU-as-GPU) Boom whose planted kernel returns a wrong element: the check runs
    once in a child, auto warns once and runs the reference, and the faulty kernel never runs
    in this process."""
    if not _backend.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1")
    monkeypatch.setattr(dispatch, "AUTO_DEVICES", ("cuda", "cpu"))
    monkeypatch.setenv("SHA_RNN_KERNELS_CHECK_HOOK", HOOK)
    monkeypatch.setenv("FAKE_KERNEL", "wrong")
    monkeypatch.setenv("FAKE_OP", "boom")
    from sha_rnn_kernels.ops import boom as boom_ops

    def never(*args, **kwargs):
        raise AssertionError("a kernel that has not passed ran in the user's process")

    monkeypatch.setattr(boom_ops, "boom", never)
    x, w = torch.randn(5, 16), torch.randn(40, 16)
    with pytest.warns(RuntimeWarning, match="boom: .*uses the PyTorch reference .*first-use check"):
        out = SF.boom(x, w)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(SF.boom(x, w), out)
    torch.testing.assert_close(out, SF.boom(x, w, backend="reference"))
    assert fresh_cache.runs == 1
    verdict = FirstUse().lookup(fresh_cache.key("boom", "triton", CPU, torch.float32,
                                                 (("E", 16), ("F", 40))))  # from disk
    assert not verdict.passed and verdict.describe().startswith("mismatch: out")


# ----------------------------------------------------------------------------------------------
# torch.distributed: two gloo ranks
# ----------------------------------------------------------------------------------------------

_RANK = r"""
import os, sys, torch, torch.distributed as dist
from sha_rnn_kernels import _contained, _device_check
from sha_rnn_kernels._device_check import Verdict
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=rank,
                        world_size=2)
ran = []
def fake(job):  # this rank's check: passes on rank 1's node, fails on rank 0's
    ran.append(job["shape"])
    return Verdict(job["op"], job["backend"], job["dtype"], "", rank == 1, 0.0, 1.0, "out")
_contained.run_check = fake
cpu = torch.device("cpu")
v1 = _contained.first_use_verdict("boom", "triton", cpu, torch.float32, (("E", 16), ("F", 40)))
v2 = _contained.first_use_verdict("boom", "triton", cpu, torch.float32, (("E", 16), ("F", 40)))
print("RESULT", rank, len(ran), v1.passed, v2.passed, v1.describe(), flush=True)
dist.destroy_process_group()
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("nodes", [1, 2], ids=["one-node", "two-nodes"])
def test_ranks_agree_on_one_verdict(tmp_path, nodes):
    """One node (LOCAL_RANK 0 and 1): only local rank 0 checks, rank 1 follows its failure.
    Two nodes (each rank local rank 0): both check; rank 1's passed, rank 0's failed, so both
    use the failure. Agreed once per process (the second call runs no collective)."""
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, SHA_RNN_KERNELS_CACHE_DIR=str(tmp_path / f"node{rank % nodes}"),
                   LOCAL_RANK=str(rank if nodes == 1 else 0))  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-c", _RANK, str(rank), port], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = {}
    for out, _ in outs:
        line = next(x for x in out.splitlines() if x.startswith("RESULT"))
        _, rank, runs, passed1, passed2, reason = line.split(" ", 5)
        results[int(rank)] = (int(runs), passed1, passed2, reason)
    assert results[0][:3] == (1, "False", "False")
    assert results[1][:3] == ((0 if nodes == 1 else 1), "False", "False")
    assert "failed on another rank" in results[1][3]


# ----------------------------------------------------------------------------------------------
# backends() and explain()
# ----------------------------------------------------------------------------------------------


def test_backends_restricts_auto(monkeypatch):
    x, w = torch.randn(3, 8), torch.randn(16, 8)
    lstm_in = (torch.randn(3, 2, 4), torch.randn(20, 4), torch.randn(20, 5))
    with sha_rnn_kernels.backends("reference"):
        assert dispatch.select("lstm", "auto", *lstm_in) == "reference"
        assert dispatch.select("lstm", "torch", *lstm_in) == "torch"  # explicit: not restricted
        with sha_rnn_kernels.backends("triton"):
            with pytest.raises(BackendUnavailableError, match="restricted to \\('triton',\\)"):
                SF.boom(x, w)
        assert dispatch.allowed() == ("reference",)
    assert dispatch.allowed() is None
    assert dispatch.select("lstm", "auto", *lstm_in) == "torch"
    with pytest.raises(ValueError, match="each name must be one of"):
        with sha_rnn_kernels.backends("cudnn"):
            pass
    # On CUDA-like tensors the restriction skips the kernel quietly, with no check run.
    monkeypatch.setattr(dispatch, "AUTO_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(_contained, "run_check", lambda job: pytest.fail("a check ran"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with sha_rnn_kernels.backends("torch", "reference"):
            assert dispatch.select("boom", "auto", x, w, None) == "reference"


def test_explain_names_every_backend_and_runs_no_check(fresh_cache, monkeypatch):
    monkeypatch.setattr(dispatch, "AUTO_DEVICES", ("cuda", "cpu"))
    monkeypatch.setitem(dispatch.CONSTRAINTS, ("lstm", "cuda"), ())
    monkeypatch.setattr(_contained, "run_check", lambda job: pytest.fail("a check ran"))
    lstm_in = (torch.randn(3, 2, 8, dtype=torch.bfloat16), torch.randn(1024, 8,
               dtype=torch.bfloat16), torch.randn(1024, 256, dtype=torch.bfloat16))  # fmt: skip
    text = sha_rnn_kernels.explain("lstm", *lstm_in)
    assert "lstm on cpu, bfloat16" in text
    assert "cuda       CHOSEN once its check passes (not checked yet" in text
    assert "torch      lower priority" in text
    key = fresh_cache.key("lstm", "cuda", CPU, torch.bfloat16, (("H", 256), ("B", 16)))
    fresh_cache.store(key, Verdict("lstm", "cuda", "bfloat16", "", False, 1.0, 0.1, "dx"))
    rows = dict(dispatch.explain_rows("lstm", *lstm_in))
    assert rows["cuda"].startswith("passed over: failed its first-use check")
    assert rows["torch"] == "CHOSEN"
    small = dict(dispatch.explain_rows("lstm", *lstm_in[:2], lstm_in[2][..., :64]))
    assert small["cuda"].startswith("passed over: H = 64 <= 128: cuDNN's persistent small-H")
    boom_rows = dict(dispatch.explain_rows("boom", torch.randn(3, 8), torch.randn(16, 8), None,
                                           backend="reference"))  # fmt: skip
    assert boom_rows["reference"] == "CHOSEN: requested"
    with pytest.raises(ValueError, match="op must be one of"):
        dispatch.explain_rows("ffn", torch.randn(3))


@pytest.mark.gpu
def test_auto_checks_each_kernel_once_on_the_gpu(cuda, fresh_cache):
    """On a GPU: the first bf16 Boom and attention under auto run their checks in children, pass,
    and run on Triton; a second call checks nothing."""
    x = torch.randn(64, 2, 256, device=cuda, dtype=torch.bfloat16)
    w = torch.randn(1024, 256, device=cuda, dtype=torch.bfloat16) / 16
    assert dispatch.select("boom", "auto", x, w, None) == "triton"
    assert dispatch.select("attention", "auto", x, x, x) == "triton"
    assert fresh_cache.runs == 2
    assert dispatch.select("boom", "auto", x, w, None) == "triton" and fresh_cache.runs == 2
