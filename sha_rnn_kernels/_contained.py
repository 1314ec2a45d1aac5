"""Contained device checks: each check runs in a child process, with a timeout.

The user's process never runs a kernel of ours that has not passed its check, and a check that
goes wrong cannot hurt it: the child (``python -m sha_rnn_kernels._contained``, a fresh
interpreter on the same device with its own CUDA context) runs :func:`sha_rnn_kernels._checks.run`
and prints its verdict. A hang (no verdict within ``SHA_RNN_KERNELS_CHECK_TIMEOUT`` seconds,
default 120, counted from when the child is ready to run the kernel; the child is killed), a
death by signal (an illegal address that aborts, SIGSEGV), a Python exception and a mismatch
each become a failed verdict whose ``error`` says which. A child not ready within
``BUILD_TIMEOUT`` (starting Python, building the CUDA extension) fails without being cached.
The child inherits the environment (``TRITON_INTERPRET``, ``TRITON_CACHE_DIR``, the cache
directory), so it also fills Triton's on-disk cache and builds the CUDA extension for the
parent. Where no child can be started (a frozen application, a sandbox without ``fork``), the
check runs in the process itself, after a one-time warning.

Distributed (``torch.distributed`` initialised): local rank 0 of each node (``LOCAL_RANK``;
every rank when it is unset) runs the checks no verdict is known for; then all ranks all-reduce
"passed" (a minimum over the world), so every rank uses the same backend. Every rank must
reach a first use together, as the ranks of a DDP job do (same ops, same input classes).

``SHA_RNN_KERNELS_CHECK_HOOK`` names a Python file the child runs before the check (tests use
it to plant kernels that hang, crash, raise or return wrong numbers, see
:func:`sha_rnn_kernels._checks.override`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, Optional

import torch

from . import _device_check
from ._device_check import NOT_CACHED, Verdict, dtype_name

TIMEOUT_ENV = "SHA_RNN_KERNELS_CHECK_TIMEOUT"
HOOK_ENV = "SHA_RNN_KERNELS_CHECK_HOOK"
DEFAULT_TIMEOUT = 120.0
# Seconds a child may take to start Python and build the CUDA extension before its check.
BUILD_TIMEOUT = 1800.0
_MARK = "SHA_RNN_KERNELS_VERDICT "
_no_child_warned = threading.Event()


def timeout() -> float:
    """Seconds a check may take: ``$SHA_RNN_KERNELS_CHECK_TIMEOUT``, else 120."""
    value = os.environ.get(TIMEOUT_ENV, "").strip()
    if not value:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds; got {value!r}")
    return seconds


def spec(op: str, backend: str, device: torch.device, dtype: torch.dtype, shape) -> Dict:
    """What the child is asked to check (JSON-able)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return {"op": op, "backend": backend, "device": str(device), "dtype": dtype_name(dtype),
            "shape": dict(shape), "tiny": device.type != "cuda"}  # fmt: skip


def _failed(job: Dict, error: str) -> Verdict:
    shape = " ".join(f"{k}={v}" for k, v in job["shape"].items())
    return Verdict(job["op"], job["backend"], job["dtype"], shape, False, error=error)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _tail(text: str, lines: int = 3) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return " | ".join(kept)[-600:]


def run_in_child(job: Dict, seconds: Optional[float] = None,
                 env: Optional[Dict[str, str]] = None) -> Verdict:  # fmt: skip
    """Run the check ``job`` (see :func:`spec`) in a child process and return its verdict
    (``env``: the child's environment, default this process's).

    The timeout counts from when the child is ready to run the kernel: after it started Python
    and, for the CUDA LSTM, built the extension (which may take minutes once; that stage has
    ``BUILD_TIMEOUT`` seconds, and running out of it gives a verdict that is not cached)."""
    seconds = timeout() if seconds is None else seconds
    if getattr(sys, "frozen", False) or not sys.executable:
        raise OSError("this is a frozen application: there is no Python interpreter to start")
    with tempfile.TemporaryDirectory(prefix="sha-rnn-check-") as scratch:
        ready = os.path.join(scratch, "ready")
        command = [sys.executable, "-m", "sha_rnn_kernels._contained", json.dumps(job), ready]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True, env=env or _child_env())
        out, err, stage = _wait(proc, ready, seconds)
    if stage is not None:
        if stage == "starting":
            return _failed(job, f"{NOT_CACHED}timeout: the check did not start within "
                                f"{BUILD_TIMEOUT:g} s (starting Python, building the kernel)"
                                f"{': ' + _tail(err) if err.strip() else ''}")  # fmt: skip
        return _failed(job, f"hang: no verdict within {seconds:g} s ({TIMEOUT_ENV}); the check "
                            f"was killed{': ' + _tail(err) if err.strip() else ''}")  # fmt: skip
    for line in reversed(out.splitlines()):
        if line.startswith(_MARK):
            return Verdict(**json.loads(line[len(_MARK):]))
    if proc.returncode < 0:
        return _failed(job, f"crash: the check died of {_signal_name(-proc.returncode)}"
                            f"{': ' + _tail(err) if err.strip() else ''}")  # fmt: skip
    return _failed(job, f"crash: the check exited with status {proc.returncode} and no "
                        f"verdict: {_tail(err) or 'no output'}")  # fmt: skip


def _wait(proc: subprocess.Popen, ready: str, seconds: float):
    """(stdout, stderr, None) when the child ended; (.., .., stage) when it was killed for
    running out of time while ``"starting"`` or ``"checking"``."""
    deadline, started = time.monotonic() + BUILD_TIMEOUT, False
    while True:
        now = time.monotonic()
        try:
            out, err = proc.communicate(timeout=max(0.05, min(0.5, deadline - now)))
            return out, err, None
        except subprocess.TimeoutExpired:
            now = time.monotonic()
            if not started and os.path.exists(ready):
                started, deadline = True, now + seconds
            if now >= deadline:
                proc.kill()
                out, err = proc.communicate()
                return out, err, "checking" if started else "starting"


def _child_env() -> Dict[str, str]:
    env = dict(os.environ)
    # The child must import this very package, wherever the parent found it.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def run_check(job: Dict) -> Verdict:
    """The verdict of ``job``, from a child process; in this process where none can start."""
    try:
        return run_in_child(job)
    except OSError as exc:
        if not _no_child_warned.is_set():
            _no_child_warned.set()
            import warnings

            warnings.warn(f"sha_rnn_kernels: device checks cannot run in a child process "
                          f"({exc}); running them in this process, without a timeout",
                          RuntimeWarning, stacklevel=2)  # fmt: skip
        return _run_here(job)


def _run_here(job: Dict) -> Verdict:
    from . import _checks

    try:
        return _checks.run(job)
    except Exception as exc:  # noqa: BLE001 - a broken check is a failed check
        return _failed(job, f"exception: {type(exc).__name__}: {exc}")


# ----------------------------------------------------------------------------------------------
# First use, across the ranks of a distributed job
# ----------------------------------------------------------------------------------------------


def _distributed():
    """(rank, runs checks here) when torch.distributed is initialised, else None."""
    dist = getattr(torch, "distributed", None)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    local = os.environ.get("LOCAL_RANK")
    return dist.get_rank(), local is None or int(local) == 0


def _agree(verdict: Optional[Verdict], job: Dict) -> Verdict:
    """All ranks' verdicts as one: passed only where every rank that knows one passed."""
    import torch.distributed as dist

    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    passed = torch.tensor([0 if verdict is not None and not verdict.passed else 1], device=device)
    dist.all_reduce(passed, op=dist.ReduceOp.MIN)
    if int(passed.item()) == 1:
        if verdict is None or not verdict.passed:
            return Verdict(job["op"], job["backend"], job["dtype"], str(job["shape"]), True,
                           worst="passed on local rank 0 of this node")  # fmt: skip
        return verdict
    if verdict is not None and not verdict.passed:
        return verdict
    return _failed(job, "the check failed on another rank of this job")


def first_use_verdict(op: str, backend: str, device: torch.device, dtype: torch.dtype,
                      shape) -> Verdict:  # fmt: skip
    """The verdict ``auto`` goes by for this input class: known (this process or the disk
    cache), else checked now in a child; agreed by every rank of a distributed job."""
    store = _device_check.FIRST_USE
    job = spec(op, backend, device, dtype, shape)
    world = _distributed()
    if world is None:
        verdict = store.verdict(op, backend, device, dtype, shape, lambda: run_check(job))
        if verdict is None:
            return _failed(job, f"{NOT_CACHED}not checked: no check runs under torch.compile "
                                f"or while a CUDA graph is being captured")  # fmt: skip
        return verdict
    key = store.key(op, backend, device, dtype, shape)
    key_text = json.dumps(key, sort_keys=True)
    with store._lock:
        # Once per process: every rank reaches this point at the same first use.
        if key_text in store.agreed:
            return store.agreed[key_text]
        # Only the ranks that check read the node's cache: another local rank takes the verdict
        # through the agreement alone, whether or not local rank 0 has written it to the shared
        # cache yet (reading it would make that rank's reason depend on that race).
        verdict = store.lookup(key) if world[1] else None
        if verdict is None and world[1]:
            store.runs += 1
            verdict = run_check(job)
            store.store(key, verdict)
        verdict = _agree(verdict, job)
        store.agreed[key_text] = verdict
        return verdict


def _prepare(job: Dict) -> None:
    """What may take long once and is not the check: building the CUDA LSTM's extension."""
    if job["op"] == "lstm" and job["backend"] == "cuda" and "cuda" in str(job["device"]):
        from . import _cuda

        _cuda.load_extension(torch.device(str(job["device"])))


def _main(argv) -> int:
    """The child: run the hook (tests), build what the check needs, say so (the timeout starts
    then), run the check and print the verdict on one line."""
    job, ready = json.loads(argv[0]), argv[1] if len(argv) > 1 else None
    hook = os.environ.get(HOOK_ENV)
    if hook:
        import runpy

        runpy.run_path(hook)
    try:
        _prepare(job)
    except Exception as exc:  # noqa: BLE001 - a failed build is a failed check
        verdict = _failed(job, f"exception: building the kernel: {type(exc).__name__}: {exc}")
    else:
        if ready:
            open(ready, "w").close()
        verdict = _run_here(job)
    from dataclasses import asdict

    print(_MARK + json.dumps(asdict(verdict)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
