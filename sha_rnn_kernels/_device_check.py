"""Device-check verdicts: what a check found, how it is compared, and where it is kept.

A check (see :mod:`sha_rnn_kernels._checks`) runs a small forward and backward of one kernel of
ours and of PyTorch and compares outputs and every gradient with the tolerance rule of
:mod:`sha_rnn_kernels.testing`: the kernel's error against a high-precision reference may be at
most twice the error of PyTorch in the kernel's dtype, plus a small absolute slack. This module
holds the :class:`Verdict`, that comparison and the store of verdicts (:class:`FirstUse`).

A verdict is kept for the process and written, atomically, to
``<cache>/device-checks/<hash>.json`` where ``<cache>`` is ``$SHA_RNN_KERNELS_CACHE_DIR``, else
``$XDG_CACHE_HOME/sha_rnn_kernels``, else ``~/.cache/sha_rnn_kernels``. The key holds the op,
backend, dtype and input class, the device name and compute capability, the driver and CUDA
versions, the torch, Triton and package versions and a hash of the kernel's source (and of the
check's), so any of those changing runs the check again.

``SHA_RNN_KERNELS_FIRST_USE_CHECK=0`` turns first-use checks off (see
:mod:`sha_rnn_kernels.dispatch`).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import math
import os
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from ._backend import capturing, is_compiling  # noqa: F401 - used here and re-exported
from .testing import ATOL, max_error

CACHE_ENV = "SHA_RNN_KERNELS_CACHE_DIR"
CHECK_ENV = "SHA_RNN_KERNELS_FIRST_USE_CHECK"
# A verdict whose error starts with this is kept for the process only: it says nothing about
# the kernel (the machine was too slow to build it, or no check could run).
NOT_CACHED = "not cached: "
FORMAT = 1

@dataclass
class Verdict:
    """The outcome of one device check.

    ``max_error`` and ``tolerance`` are those of the quantity nearest to (or furthest over) its
    tolerance, named by ``worst``; ``error`` holds the exception when the kernel raised.
    """

    op: str
    backend: str
    dtype: str
    shape: str
    passed: bool
    max_error: float = float("nan")
    tolerance: float = float("nan")
    worst: str = ""
    error: str = ""

    def describe(self) -> str:
        """What the check found: its error (a hang, a crash, an exception, a rate) or the
        quantity nearest its tolerance ("mismatch" when over it)."""
        if self.error:
            return self.error
        if math.isnan(self.max_error):
            return self.worst
        return (
            f"{'' if self.passed else 'mismatch: '}{self.worst}: max |error| "
            f"{self.max_error:.3g} {'<=' if self.passed else '>'} tolerance {self.tolerance:.3g}"
        )


# ----------------------------------------------------------------------------------------------
# Comparing results
# ----------------------------------------------------------------------------------------------


def compare(
    op: str,
    backend: str,
    dtype: torch.dtype,
    shape: str,
    actual: Dict[str, torch.Tensor],
    expected: Dict[str, torch.Tensor],
    lowp: Dict[str, torch.Tensor],
) -> Verdict:
    """A verdict from the kernel's results, the high-precision reference and PyTorch in the
    kernel's dtype (same keys): each quantity may be off by ``2 * lowp error + atol``."""
    worst = None
    for name, want in expected.items():
        got = actual.get(name)
        if got is None or tuple(got.shape) != tuple(want.shape):
            return Verdict(op, backend, _dtype_name(dtype), shape, False, math.inf, 0.0, name,
                           f"{name}: missing or shape {None if got is None else tuple(got.shape)}"
                           f" instead of {tuple(want.shape)}")  # fmt: skip
        err = max_error(got, want)
        tol = 2.0 * max_error(lowp[name], want) + ATOL.get(dtype, 1e-4)
        ratio = err / tol if tol > 0 else math.inf
        if math.isnan(err):
            ratio, err = math.inf, math.inf
        if worst is None or ratio > worst[0]:
            worst = (ratio, name, err, tol)
    assert worst is not None
    ratio, name, err, tol = worst
    return Verdict(op, backend, _dtype_name(dtype), shape, ratio <= 1.0, err, tol, name)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (how verdicts and cache keys name a dtype)."""
    return _dtype_name(dtype)


# ----------------------------------------------------------------------------------------------
# What a verdict is keyed on
# ----------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """``$SHA_RNN_KERNELS_CACHE_DIR``, else ``$XDG_CACHE_HOME/sha_rnn_kernels``, else
    ``~/.cache/sha_rnn_kernels``."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "sha_rnn_kernels"


def driver_version() -> str:
    """The CUDA driver's version (``cuDriverGetVersion``), without initialising CUDA."""
    names = ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so")
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            version = ctypes.c_int(0)
            if lib.cuDriverGetVersion(ctypes.byref(version)) == 0:
                return f"{version.value // 1000}.{version.value % 1000 // 10}"
        except (OSError, AttributeError):
            continue
    return "unknown"


_FINGERPRINTS: Dict[Tuple[str, str], str] = {}


def source_fingerprint(op: str, backend: str) -> str:
    """A hash of the source of ``op``'s kernel on ``backend`` and of its check (a changed kernel
    is checked anew even when the package version stayed the same). The Triton kernels share
    helpers across files, so every file of ``ops/`` counts for each of them."""
    key = (op, backend)
    if key not in _FINGERPRINTS:
        here = Path(__file__).resolve().parent
        paths = [here / "_checks.py"]
        if backend == "cuda" and op == "lstm":
            from . import _cuda

            directory = _cuda.source_dir()
            paths += [here / "_cuda.py"]
            paths += [directory / n for n in _cuda.SOURCES] if directory is not None else []
        else:
            paths += sorted((here / "ops").glob("*.py"))
        digest = hashlib.sha256()
        for path in paths:
            digest.update(path.name.encode())
            digest.update(path.read_bytes() if path.exists() else b"missing")
        _FINGERPRINTS[key] = digest.hexdigest()[:16]
    return _FINGERPRINTS[key]


def device_identity(device: torch.device) -> Dict[str, str]:
    """What a verdict depends on besides the op and its inputs: the device and the software."""
    from ._version import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover
        triton_version = "none"
    identity = {
        "torch": torch.__version__,
        "triton": triton_version,
        "package": __version__,
        "cuda": str(torch.version.cuda),
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        identity.update(
            device=torch.cuda.get_device_name(index),
            capability=f"{major}.{minor}",
            driver=driver_version(),
        )
    else:
        identity.update(device=device.type, capability="", driver="")
    return identity


def batch_bucket(batch: int) -> int:
    """Batches share a verdict in buckets of 16 rows (the CUDA kernel's tile): 1-16 -> 16,
    17-32 -> 32, ..."""
    return 16 * max(1, -(-batch // 16))


def check_batches(batch: int) -> Tuple[int, ...]:
    """The batches a first-use check runs for ``batch``'s bucket: the bucket's largest batch
    (every row tile full) and one with a partly filled last tile."""
    bucket = batch_bucket(batch)
    return (bucket, bucket // 2 + 1)


# ----------------------------------------------------------------------------------------------
# First use
# ----------------------------------------------------------------------------------------------




def checks_enabled() -> bool:
    """False when ``SHA_RNN_KERNELS_FIRST_USE_CHECK=0`` turned first-use checks off."""
    return os.environ.get(CHECK_ENV, "1").strip() not in ("0", "false", "off", "no")


class FirstUse:
    """Verdicts of first-use checks, for the process and on disk.

    Args:
        identity: ``device -> dict`` of what a verdict depends on (default
            :func:`device_identity`); tests pass a fake one.
        directory: ``() -> Path`` of the cache directory (default :func:`cache_dir`).
    """

    def __init__(
        self,
        identity: Callable[[torch.device], Dict[str, str]] = device_identity,
        directory: Callable[[], Path] = cache_dir,
    ) -> None:
        self._identity = identity
        self._directory = directory
        self._verdicts: Dict[str, Verdict] = {}
        self._identities: Dict[str, Dict[str, str]] = {}
        self._lock = threading.RLock()
        # What ``auto`` decided per input class (filled by sha_rnn_kernels.dispatch).
        self.choices: Dict[tuple, str] = {}
        # Verdicts every rank of a torch.distributed job agreed on (sha_rnn_kernels._contained).
        self.agreed: Dict[str, Verdict] = {}
        self.runs = 0  # checks run by this process (for tests and the check command)

    def key(self, op: str, backend: str, device: torch.device, dtype: torch.dtype,
            shape: Sequence[Tuple[str, int]]) -> Dict[str, object]:  # fmt: skip
        """Everything a verdict is keyed on, as a JSON-able dict."""
        device_key = str(device)
        if device_key not in self._identities:
            self._identities[device_key] = dict(self._identity(device))
        identity = dict(self._identities[device_key])
        identity["source"] = source_fingerprint(op, backend)
        return {
            "format": FORMAT, "op": op, "backend": backend, "dtype": _dtype_name(dtype),
            "shape": [list(item) for item in shape], **identity,
        }  # fmt: skip

    def _path(self, key_text: str) -> Path:
        digest = hashlib.sha256(key_text.encode()).hexdigest()[:32]
        return self._directory() / "device-checks" / f"{digest}.json"

    def lookup(self, key: Dict[str, object]) -> Optional[Verdict]:
        """The verdict for ``key`` from this process, else from disk, else None."""
        key_text = json.dumps(key, sort_keys=True)
        with self._lock:
            verdict = self._verdicts.get(key_text)
            if verdict is not None:
                return verdict
            verdict = self._read(key_text, key)
            if verdict is not None:
                self._verdicts[key_text] = verdict
            return verdict

    def _read(self, key_text: str, key: Dict[str, object]) -> Optional[Verdict]:
        try:
            with open(self._path(key_text)) as handle:
                record = json.load(handle)
            if record.get("key") != json.loads(key_text):
                return None  # a hash collision or a foreign file: not ours
            return Verdict(**record["verdict"])
        except (OSError, ValueError, TypeError, KeyError):
            return None  # missing, unreadable or from another format: check again

    def store(self, key: Dict[str, object], verdict: Verdict) -> None:
        """Remember ``verdict`` for the process and write it to disk atomically (a file
        written to a temporary name in the same directory, then renamed over the target).
        A directory that cannot be written only loses the disk copy; a verdict whose error
        starts with :data:`NOT_CACHED` is not written."""
        key_text = json.dumps(key, sort_keys=True)
        with self._lock:
            self._verdicts[key_text] = verdict
            if verdict.error.startswith(NOT_CACHED):
                return
            path = self._path(key_text)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                handle = tempfile.NamedTemporaryFile(
                    "w", dir=path.parent, prefix=".tmp-", suffix=".json", delete=False
                )
                with handle:
                    json.dump({"key": key, "verdict": asdict(verdict)}, handle, indent=1)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(handle.name, path)
            except OSError:
                with contextlib.suppress(OSError, UnboundLocalError):
                    os.unlink(handle.name)

    def verdict(
        self,
        op: str,
        backend: str,
        device: torch.device,
        dtype: torch.dtype,
        shape: Sequence[Tuple[str, int]],
        run: Callable[[], Verdict],
    ) -> Optional[Verdict]:
        """The verdict for this input class, running ``run`` if none is known and a check may
        run now (not while compiling or capturing a CUDA graph: then None when unknown).

        An exception escaping ``run`` counts as a failed check.
        """
        key = self.key(op, backend, device, dtype, shape)
        known = self.lookup(key)
        if known is not None:
            return known
        if is_compiling() or capturing(device):
            return None
        with self._lock:
            known = self.lookup(key)
            if known is not None:
                return known
            self.runs += 1
            try:
                verdict = run()
            except Exception as exc:  # noqa: BLE001 - a failing check must not fail the op
                verdict = Verdict(op, backend, _dtype_name(dtype), str(dict(shape)), False,
                                  error=f"exception: {type(exc).__name__}: {exc}")  # fmt: skip
            self.store(key, verdict)
            return verdict

    def remember(self, key: Dict[str, object], verdict: Verdict) -> None:
        """Keep ``verdict`` for this process only (nothing is written)."""
        with self._lock:
            self._verdicts[json.dumps(key, sort_keys=True)] = verdict

    def forget(self) -> None:
        """Drop the verdicts held by this process (the disk copies stay)."""
        with self._lock:
            self._verdicts.clear()
            self._identities.clear()
            self.choices.clear()
            self.agreed.clear()


FIRST_USE = FirstUse()
