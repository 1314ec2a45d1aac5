"""Device checks, the verdict store, ``auto``'s use of verdicts and ``python -m
sha_rnn_kernels.check`` (sha_rnn_kernels/_checks.py, _device_check.py, dispatch.py, check.py), on
the CPU with fake kernels and fake devices. The contained runner: tests/test_contained.py."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import sha_rnn_kernels.functional as SF
from sha_rnn_kernels import _backend, _checks, _contained, _device_check, check, dispatch, reference
from sha_rnn_kernels._device_check import FirstUse, Verdict

CPU = torch.device("cpu")


def torch_lstm(*args):
    return reference.lstm_torch(*args, training=True)


def wrong_lstm(*args):
    """A kernel with a bug: the forget gate's bias is ignored (bias_hh off by its f block)."""
    x, w_ih, w_hh, b_ih, b_hh, h0, c0 = args
    hidden = w_hh.shape[1]
    mask = torch.ones_like(b_hh)
    mask[hidden : 2 * hidden] = 0
    return reference.lstm_torch(x, w_ih, w_hh, b_ih, b_hh * mask, h0, c0, training=True)


def raising_lstm(*args):
    raise RuntimeError("cudaErrorIllegalAddress: an illegal memory access was encountered")


def fake_identity(driver="555.42"):
    return lambda device: {"device": "NVIDIA Fake", "capability": "9.0", "driver": driver,
                           "torch": torch.__version__, "package": "0.1.0"}  # fmt: skip


@pytest.fixture
def first_use(tmp_path, monkeypatch):
    """A fresh FirstUse writing to a temporary cache, installed as the process's one."""
    store = FirstUse(identity=fake_identity(), directory=lambda: tmp_path)
    monkeypatch.setattr(_device_check, "FIRST_USE", store)
    _backend._warned.clear()
    return store


# ----------------------------------------------------------------------------------------------
# The LSTM check itself
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lstm_check_passes_a_correct_kernel(dtype):
    verdict = _checks.check_lstm(torch_lstm, CPU, dtype, hidden=12, batch=3, steps=4,
                                       input_size=8)  # fmt: skip
    assert verdict.passed, verdict.describe()
    assert verdict.max_error <= verdict.tolerance and not verdict.error


def test_lstm_check_fails_a_wrong_kernel_and_names_the_quantity():
    verdict = _checks.check_lstm(wrong_lstm, CPU, torch.float32, hidden=12, batch=3,
                                       steps=4, input_size=8)  # fmt: skip
    assert not verdict.passed
    assert verdict.max_error > verdict.tolerance
    assert verdict.worst in ("out", "h_n", "c_n", "dbias_hh", "dbias_ih", "dx")


def test_lstm_check_turns_an_exception_into_a_failure():
    verdict = _checks.check_lstm(raising_lstm, CPU, torch.float32, hidden=12, batch=3,
                                       steps=2, input_size=8)  # fmt: skip
    assert not verdict.passed and "illegal memory access" in verdict.error


def test_lstm_check_leaves_the_global_rng_and_grad_mode_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    with torch.no_grad():
        verdict = _checks.check_lstm(torch_lstm, CPU, torch.float32, hidden=8, batch=2,
                                           steps=2, input_size=8)  # fmt: skip
        assert not torch.is_grad_enabled()
    assert verdict.passed
    assert torch.equal(torch.rand(3), expected)


def test_lstm_check_catches_an_unwritten_output():
    def lazy(*args):
        out, h_n, c_n = torch_lstm(*args)
        out = out.clone()
        out[-1, -1, -1] = float("nan")  # one element never written
        return out, h_n, c_n

    verdict = _checks.check_lstm(lazy, CPU, torch.float32, hidden=8, batch=2, steps=2,
                                       input_size=8)  # fmt: skip
    assert not verdict.passed and verdict.worst == "out"


def test_batch_buckets():
    assert [_device_check.batch_bucket(b) for b in (1, 16, 17, 32, 33, 64)] == [
        16, 16, 32, 32, 48, 64]  # fmt: skip
    assert _device_check.check_batches(9) == (16, 9)
    assert _device_check.check_batches(64) == (64, 33)


# ----------------------------------------------------------------------------------------------
# First use: the verdict store
# ----------------------------------------------------------------------------------------------


def _verdict(passed=True):
    return Verdict("lstm", "cuda", "bfloat16", "T=16 B=16 H=1024", passed, 0.01, 0.05, "out")


def test_verdict_is_run_once_and_kept_on_disk(first_use, tmp_path):
    runs = []

    def run():
        runs.append(1)
        return _verdict()

    shape = (("H", 1024), ("B", 16))
    for _ in range(3):
        verdict = first_use.verdict("lstm", "cuda", CPU, torch.bfloat16, shape, run)
        assert verdict.passed
    assert len(runs) == 1 and first_use.runs == 1
    files = list((tmp_path / "device-checks").iterdir())
    assert len(files) == 1 and files[0].suffix == ".json"  # no temporary file left behind
    record = json.loads(files[0].read_text())
    assert record["key"]["device"] == "NVIDIA Fake" and record["key"]["dtype"] == "bfloat16"
    assert record["key"]["shape"] == [["H", 1024], ["B", 16]]
    assert record["verdict"]["passed"] is True

    # A new store on the same directory (as in a new process) reads it instead of running.
    again = FirstUse(identity=fake_identity(), directory=lambda: tmp_path)
    verdict = again.verdict("lstm", "cuda", CPU, torch.bfloat16, shape, raising_verdict)
    assert verdict.passed and again.runs == 0


def raising_verdict():
    raise AssertionError("the check ran although a verdict was cached")


@pytest.mark.parametrize("change", ["driver", "dtype", "hidden", "bucket", "source"])
def test_a_changed_key_runs_the_check_again(first_use, tmp_path, change, monkeypatch):
    shape = (("H", 1024), ("B", 16))
    first_use.verdict("lstm", "cuda", CPU, torch.bfloat16, shape, _verdict)
    store = FirstUse(identity=fake_identity(), directory=lambda: tmp_path)
    dtype = torch.bfloat16
    if change == "driver":
        store = FirstUse(identity=fake_identity("560.1"), directory=lambda: tmp_path)
    elif change == "dtype":
        dtype = torch.float16
    elif change == "hidden":
        shape = (("H", 1536), ("B", 16))
    elif change == "bucket":
        shape = (("H", 1024), ("B", 32))
    else:
        monkeypatch.setitem(_device_check._FINGERPRINTS, ("lstm", "cuda"), "a-new-kernel")
    store.verdict("lstm", "cuda", CPU, dtype, shape, lambda: _verdict(False))
    assert store.runs == 1


def test_an_exception_in_the_check_is_a_failed_verdict(first_use):
    def run():
        raise RuntimeError("the extension failed to build")

    verdict = first_use.verdict("lstm", "cuda", CPU, torch.bfloat16, (("H", 8),), run)
    assert not verdict.passed and "failed to build" in verdict.error


def test_a_corrupt_or_foreign_cache_file_is_ignored(first_use, tmp_path):
    shape = (("H", 64), ("B", 16))
    first_use.verdict("lstm", "cuda", CPU, torch.bfloat16, shape, _verdict)
    (path,) = (tmp_path / "device-checks").iterdir()
    path.write_text("{not json")
    store = FirstUse(identity=fake_identity(), directory=lambda: tmp_path)
    store.verdict("lstm", "cuda", CPU, torch.bfloat16, shape, _verdict)
    assert store.runs == 1
    record = json.loads(path.read_text())
    record["key"]["device"] = "another GPU"  # a file whose key is not this one
    path.write_text(json.dumps(record))
    store = FirstUse(identity=fake_identity(), directory=lambda: tmp_path)
    store.verdict("lstm", "cuda", CPU, torch.bfloat16, shape, _verdict)
    assert store.runs == 1


def test_an_unwritable_cache_keeps_the_verdict_for_the_process(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    store = FirstUse(identity=fake_identity(), directory=lambda: blocker / "cache")
    shape = (("H", 64),)
    assert store.verdict("lstm", "cuda", CPU, torch.bfloat16, shape, _verdict).passed
    assert store.verdict("lstm", "cuda", CPU, torch.bfloat16, shape, raising_verdict).passed


def test_no_check_runs_while_compiling(first_use, monkeypatch):
    monkeypatch.setattr(_device_check, "is_compiling", lambda: True)
    shape = (("H", 64),)
    assert first_use.verdict("lstm", "cuda", CPU, torch.bfloat16, shape, raising_verdict) is None
    monkeypatch.setattr(_device_check, "is_compiling", lambda: False)
    first_use.verdict("lstm", "cuda", CPU, torch.bfloat16, shape, _verdict)
    monkeypatch.setattr(_device_check, "is_compiling", lambda: True)
    assert first_use.verdict("lstm", "cuda", CPU, torch.bfloat16, shape, raising_verdict).passed


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("SHA_RNN_KERNELS_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _device_check.cache_dir() == tmp_path / "xdg" / "sha_rnn_kernels"
    monkeypatch.setenv("SHA_RNN_KERNELS_CACHE_DIR", str(tmp_path / "mine"))
    assert _device_check.cache_dir() == tmp_path / "mine"


_FRESH_PROCESS = """
import sys, torch
from sha_rnn_kernels import _device_check
def boom():
    raise SystemExit("the check ran again in a fresh process")
v = _device_check.FIRST_USE.verdict("lstm", "cuda", torch.device("cpu"), torch.bfloat16,
                                    (("H", 1024), ("B", 16)), boom)
print("cached", v.passed, _device_check.FIRST_USE.runs)
"""


def test_a_cached_verdict_is_reused_by_a_fresh_process(tmp_path, monkeypatch):
    monkeypatch.setenv("SHA_RNN_KERNELS_CACHE_DIR", str(tmp_path))
    store = FirstUse()  # the real key: device, driver, versions, source hash
    store.verdict("lstm", "cuda", CPU, torch.bfloat16, (("H", 1024), ("B", 16)), _verdict)
    env = dict(os.environ, SHA_RNN_KERNELS_CACHE_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", _FRESH_PROCESS], env=env, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["cached", "True", "0"]


# ----------------------------------------------------------------------------------------------
# "auto" for the LSTM (dispatch.py), with the contained runner replaced by a fake
# ----------------------------------------------------------------------------------------------


def _lstm_inputs(dtype=torch.bfloat16, batch=3, hidden=136):
    x = torch.randn(4, batch, 8, dtype=dtype)
    return x, torch.randn(4 * hidden, 8, dtype=dtype), torch.randn(4 * hidden, hidden, dtype=dtype)


@pytest.fixture
def cpu_as_gpu(first_use, monkeypatch):
    """``auto`` treats CPU tensors as it treats CUDA ones, and the CUDA LSTM takes any input;
    checks run in-process through ``runner`` (set ``runner.kernel``), counted in ``runs``."""
    monkeypatch.setattr(dispatch, "AUTO_DEVICES", ("cuda", "cpu"))
    monkeypatch.setitem(dispatch.CONSTRAINTS, ("lstm", "cuda"), ())

    class Runner:
        kernel = staticmethod(torch_lstm)
        specs = []

        def __call__(self, job):
            self.specs.append(job)
            assert job["op"] == "lstm" and job["backend"] == "cuda" and job["tiny"]
            return _checks.check_lstm(self.kernel, CPU, getattr(torch, job["dtype"]), 12, 3,
                                      steps=3, input_size=8)  # fmt: skip

    runner = Runner()
    monkeypatch.setattr(_contained, "run_check", runner)
    return runner


def test_auto_uses_the_kernel_once_it_passed(cpu_as_gpu, first_use):
    x, w_ih, w_hh = _lstm_inputs()
    assert dispatch.select("lstm", "auto", x, w_ih, w_hh) == "cuda"
    assert first_use.runs == 1
    assert dispatch.select("lstm", "auto", x, w_ih, w_hh) == "cuda" and first_use.runs == 1
    x2, w_ih2, w_hh2 = _lstm_inputs(batch=9)  # same bucket (16): the verdict is reused
    assert dispatch.select("lstm", None, x2, w_ih2, w_hh2) == "cuda" and first_use.runs == 1
    assert cpu_as_gpu.specs[0]["shape"] == {"H": 136, "B": 16}


def test_auto_warns_once_and_uses_cudnn_after_a_failed_check(cpu_as_gpu, first_use):
    cpu_as_gpu.kernel = staticmethod(wrong_lstm)
    x, w_ih, w_hh = _lstm_inputs()
    with pytest.warns(RuntimeWarning, match="uses torch.lstm .*failed its first-use check"):
        assert dispatch.select("lstm", "auto", x, w_ih, w_hh) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.select("lstm", "auto", x, w_ih, w_hh) == "torch"
        out, _ = SF.lstm(x, w_ih, w_hh)  # the op goes on, on the fallback
    assert first_use.runs == 1 and out.shape == (4, 3, 136)


def test_auto_keeps_fp16_fp32_and_small_hidden_sizes_on_cudnn(cpu_as_gpu, first_use):
    cpu_as_gpu.kernel = staticmethod(raising_lstm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deliberate choice: no warning
        for dtype in (torch.float16, torch.float32):
            assert dispatch.select("lstm", "auto", *_lstm_inputs(dtype)) == "torch"
        assert dispatch.select("lstm", "auto", *_lstm_inputs(hidden=128)) == "torch"
    assert first_use.runs == 0


def test_auto_warns_once_when_the_kernel_cannot_take_the_inputs(cpu_as_gpu, first_use,
                                                                 monkeypatch):  # fmt: skip
    monkeypatch.setitem(dispatch.CONSTRAINTS, ("lstm", "cuda"),
                        (lambda *t: "batch 80 is larger than 64 rows",))  # fmt: skip
    with pytest.warns(RuntimeWarning, match="cuda: batch 80 is larger than 64 rows"):
        assert dispatch.select("lstm", "auto", *_lstm_inputs()) == "torch"
    assert first_use.runs == 0


def test_auto_under_compile_uses_only_a_known_verdict(cpu_as_gpu, first_use, monkeypatch):
    cpu_as_gpu.kernel = staticmethod(raising_lstm)
    monkeypatch.setattr(_device_check, "is_compiling", lambda: True)
    x, w_ih, w_hh = _lstm_inputs()
    assert dispatch.select("lstm", "auto", x, w_ih, w_hh) == "torch"  # unknown: nothing run
    assert first_use.runs == 0
    key = first_use.key("lstm", "cuda", CPU, torch.bfloat16, _checks.input_class("lstm", x, w_ih,
                                                                                  w_hh))
    first_use.store(key, _verdict(True))
    assert dispatch.select("lstm", "auto", x, w_ih, w_hh) == "cuda"


def test_the_check_can_be_turned_off(cpu_as_gpu, first_use, monkeypatch):
    monkeypatch.setenv("SHA_RNN_KERNELS_FIRST_USE_CHECK", "0")
    cpu_as_gpu.kernel = staticmethod(raising_lstm)
    assert dispatch.select("lstm", "auto", *_lstm_inputs()) == "cuda"
    assert first_use.runs == 0


def test_prepare_lstm_fills_the_cache_that_compile_reads(cpu_as_gpu, first_use, monkeypatch):
    assert check.prepare_lstm("cpu", torch.bfloat16, hidden=136, batch=3).passed
    assert first_use.runs == 1
    monkeypatch.setattr(_device_check, "is_compiling", lambda: True)
    cpu_as_gpu.kernel = staticmethod(raising_lstm)
    assert dispatch.select("lstm", "auto", *_lstm_inputs(batch=3)) == "cuda"
    assert first_use.runs == 1
    monkeypatch.setitem(dispatch.CONSTRAINTS, ("lstm", "cuda"),
                        (lambda *t: "hidden size does not fit",))  # fmt: skip
    verdict = check.prepare_lstm("cpu", torch.bfloat16, hidden=4096, batch=3)
    assert verdict.worst == "skipped" and "does not fit" in verdict.error


# ----------------------------------------------------------------------------------------------
# python -m sha_rnn_kernels.check
# ----------------------------------------------------------------------------------------------


def test_check_command_without_a_gpu_says_so(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert check.main([]) == 0
    assert "No CUDA device is available" in capsys.readouterr().out


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SHA_RNN_KERNELS_CACHE_DIR", str(tmp_path))
    store = FirstUse()
    monkeypatch.setattr(_device_check, "FIRST_USE", store)
    return store


HOOK = str(Path(__file__).with_name("fake_kernels.py"))


def test_check_command_runs_the_triton_checks_on_the_interpreter(fresh_cache, capsys):
    """The real check of every Triton kernel, each in a child process, through the interpreter;
    the verdicts land where auto looks for them."""
    if not _backend.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1")
    assert check.main(["--quiet"]) == 0
    out = capsys.readouterr().out
    for op in ("boom", "attention", "decode", "lstm"):
        assert f"\n{op} " in out
    assert "All checks passed" in out and "FAIL" not in out
    key = fresh_cache.key("attention", "triton", CPU, torch.float32, (("E", 16),))
    assert FirstUse().lookup(key).passed  # on disk


def test_check_command_fails_on_a_wrong_kernel(fresh_cache, monkeypatch, capsys):
    if not _backend.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1")
    monkeypatch.setenv("SHA_RNN_KERNELS_CHECK_HOOK", HOOK)
    monkeypatch.setenv("FAKE_KERNEL", "wrong")
    monkeypatch.setattr(check, "plan", _only_lstm(check.plan))
    assert check.main(["--quiet"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "FAILED" in out


def _only_lstm(plan):
    return lambda *args: [row for row in plan(*args) if row[0] == "lstm"]


def test_explain_command(capsys):
    assert check.main(["--explain", "lstm", "--device", "cpu", "--dtypes", "bf16", "--hidden",
                       "32", "--width", "16", "--batch", "2"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "lstm on cpu, bfloat16, [64, 2, 16] [128, 16] [128, 32], backend='auto':" in out
    assert "torch      CHOSEN" in out and "cuda" in out and "triton" in out
    assert check.main(["--explain", "boom", "--device", "cpu", "--backend", "boom=fast"]) == 2
    capsys.readouterr()
    assert check.main(["--explain", "--device", "cpu", "--dtypes", "fp32", "--width", "16"]) == 0
    out = capsys.readouterr().out
    for label in ("lstm", "single_head_attention", "boom", "decode attention"):
        assert f"{label} on cpu, float32" in out


def test_check_table_lists_every_column():
    raised = Verdict("lstm", "cuda", "float16", "T=16", False, error="RuntimeError: boom")
    rows = [_verdict(True), _verdict(False), raised]
    text = check.table(rows)
    header = text.splitlines()[0].split()
    assert header == ["op", "backend", "dtype", "shape", "verdict", "max", "error", "tolerance"]
    assert "pass" in text and "FAIL" in text and "ERROR" in text and "RuntimeError: boom" in text
    assert check.failed(rows) and not check.failed(rows[:1])


# ----------------------------------------------------------------------------------------------
# GPU only
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_check_command_passes_on_the_gpu_and_feeds_auto(cuda, tmp_path, monkeypatch):
    """The whole command on the device; afterwards a fresh store finds the CUDA LSTM's verdict
    on disk, and auto runs bf16 on the kernel without checking again (where it is supported)."""
    monkeypatch.setenv("SHA_RNN_KERNELS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_device_check, "FIRST_USE", FirstUse())
    assert check.main(["--quiet", "--hidden", "256", "--batch", "16"]) == 0
    store = FirstUse()
    monkeypatch.setattr(_device_check, "FIRST_USE", store)
    from sha_rnn_kernels import _cuda

    x = torch.randn(8, 16, 64, device=cuda, dtype=torch.bfloat16)
    w_ih = torch.randn(1024, 64, device=cuda, dtype=torch.bfloat16) * 0.05
    w_hh = torch.randn(1024, 256, device=cuda, dtype=torch.bfloat16) * 0.05
    reason = _cuda.lstm_unsupported_reason(x, w_ih, w_hh)
    if reason is not None:
        pytest.skip(f"the CUDA LSTM cannot run here: {reason}")
    calls = []
    monkeypatch.setattr(_cuda, "lstm", lambda *a, _f=_cuda.lstm: calls.append(1) or _f(*a))
    out, _ = SF.lstm(x, w_ih, w_hh)
    assert calls and store.runs == 0
    expected, _ = SF.lstm(x.float(), w_ih.float(), w_hh.float(), backend="torch")
    assert (out.float() - expected).abs().max().item() < 5e-2
