"""Device checks: run a kernel of ours against PyTorch on the device, and remember the verdict.

A check runs a small forward and backward of one op on the kernel under test and on PyTorch
(``torch.lstm``, i.e. cuDNN, for the LSTM; the float64 reference for Boom and attention) and
compares outputs and every gradient with the tolerance rule of :mod:`sha_rnn_kernels.testing`:
the kernel's error against a high-precision reference may be at most twice the error of PyTorch
in the kernel's dtype, plus a small absolute slack. It takes milliseconds on a GPU.

First use (:class:`FirstUse`): before ``backend="auto"`` hands an input class (device, dtype,
hidden size, batch bucket) to a kernel that has never run on this device, the check runs once.
The verdict is kept for the process and written, atomically, to
``<cache>/device-checks/<hash>.json`` where ``<cache>`` is ``$SHA_RNN_KERNELS_CACHE_DIR``, else
``$XDG_CACHE_HOME/sha_rnn_kernels``, else ``~/.cache/sha_rnn_kernels``. The key holds the device
name and compute capability, the driver and CUDA versions, the torch, Triton and package versions
and a hash of the kernel's source, so any of those changing runs the check again. A failed check
(a mismatch, or an exception) makes ``auto`` warn once and use PyTorch for that input class.

Where no check may run, only a verdict already known is used, and an unknown one counts as
"not checked" (``auto`` then uses PyTorch): under ``torch.compile`` tracing (the inputs are
fake tensors there, and the check would be baked into the graph) and while a CUDA graph is
being captured. To have a compiled model use the kernel from its first call, call
:func:`sha_rnn_kernels.check.prepare_lstm` before compiling, run
``python -m sha_rnn_kernels.check`` once on the machine (it writes the verdicts to the cache),
or call the model once eagerly before compiling.

``SHA_RNN_KERNELS_FIRST_USE_CHECK=0`` skips the check: ``auto`` then trusts every kernel that
can take the inputs (for users who ran ``python -m sha_rnn_kernels.check`` and want no checking
at all in their processes, or whose cache directory cannot be written).
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

from . import reference
from .testing import ATOL, max_error

CACHE_ENV = "SHA_RNN_KERNELS_CACHE_DIR"
CHECK_ENV = "SHA_RNN_KERNELS_FIRST_USE_CHECK"
FORMAT = 1

# An LSTM kernel: (x, w_ih, w_hh, b_ih, b_hh, h0, c0) -> (out [T, B, H], h_n [B, H], c_n [B, H]).
LstmKernel = Callable[..., Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


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
        if self.error:
            return f"raised {self.error}"
        return (
            f"{self.worst}: max |error| {self.max_error:.3g} "
            f"{'<=' if self.passed else '>'} tolerance {self.tolerance:.3g}"
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


@contextlib.contextmanager
def _check_mode(device: torch.device):
    """Gradients on (even under no_grad or inference_mode), autocast off, NaN-filled kernel
    outputs, and the reference's cuDNN in true float32 (no TF32)."""
    from .testing import poison_outputs

    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autocast(device_type=device.type, enabled=False))
        stack.enter_context(poison_outputs())
        if device.type == "cuda":
            stack.enter_context(torch.backends.cudnn.flags(enabled=True, allow_tf32=False))
        yield


def _randn(generator: torch.Generator, *shape, scale: float = 1.0) -> torch.Tensor:
    # A private generator: a check never moves the user's random stream.
    return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale


def _grads(loss: torch.Tensor, leaves: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    return {f"d{n}": g for n, g in zip(names, grads) if g is not None}


def _reference_dtype(device: torch.device) -> torch.dtype:
    # float64 where it is cheap (CPU, tests); on a GPU cuDNN in float32 (TF32 off), whose error
    # is orders of magnitude under any low-precision tolerance.
    return torch.float64 if device.type == "cpu" else torch.float32


# ----------------------------------------------------------------------------------------------
# The op checks
# ----------------------------------------------------------------------------------------------


def _check(op: str, backend: str, dtype: torch.dtype, shape: str, device: torch.device,
           kernel_run: Callable[[], Dict[str, torch.Tensor]],
           reference_run: Callable[[torch.dtype], Dict[str, torch.Tensor]],
           reference_dtype: torch.dtype) -> Verdict:  # fmt: skip
    """Run the kernel (an exception is a failed check), then the reference in
    ``reference_dtype`` and in the kernel's dtype, and compare."""
    with _check_mode(device):
        try:
            actual = kernel_run()
        except Exception as exc:  # noqa: BLE001 - any failure of the kernel is a failed check
            return Verdict(op, backend, _dtype_name(dtype), shape, False,
                           error=f"{type(exc).__name__}: {exc}")  # fmt: skip
        expected = reference_run(reference_dtype)
        lowp = reference_run(dtype)
    return compare(op, backend, dtype, shape, actual, expected, lowp)


def check_lstm(
    kernel: LstmKernel,
    device: torch.device,
    dtype: torch.dtype,
    hidden: int,
    batch: int,
    steps: int = 64,
    input_size: int = 64,
    backend: str = "cuda",
    seed: int = 0,
) -> Verdict:
    """``kernel`` against ``torch.lstm``: out, h_n, c_n and the gradients of x, both weights,
    both biases, h0 and c0, for a loss that uses out, h_n and c_n. 64 steps by default: enough
    hand-offs between steps (grid barriers or step flags) for an ordering bug to show, and
    still ~1 ms at H=1024 on a GPU (estimated: 64 x 6.5 us for the kernel, cuDNN about as
    much).

    Weights follow ``torch.nn.LSTM``'s init; inputs are random (a private generator).
    """
    shape = f"T={steps} B={batch} I={input_size} H={hidden}"
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(hidden)
    base = {
        "x": _randn(gen, steps, batch, input_size),
        "weight_ih": torch.rand(4 * hidden, input_size, generator=gen, dtype=torch.float64),
        "weight_hh": torch.rand(4 * hidden, hidden, generator=gen, dtype=torch.float64),
        "bias_ih": torch.rand(4 * hidden, generator=gen, dtype=torch.float64),
        "bias_hh": torch.rand(4 * hidden, generator=gen, dtype=torch.float64),
        "h0": _randn(gen, batch, hidden, scale=0.5),
        "c0": _randn(gen, batch, hidden, scale=0.5),
    }
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        base[name] = (base[name] * 2.0 - 1.0) * bound
    loss_weights = {
        "out": _randn(gen, steps, batch, hidden),
        "h_n": _randn(gen, batch, hidden),
        "c_n": _randn(gen, batch, hidden),
    }

    def run(fn: LstmKernel, run_dtype: torch.dtype) -> Dict[str, torch.Tensor]:
        leaves = {
            n: t.to(device=device, dtype=run_dtype).requires_grad_() for n, t in base.items()
        }
        out, h_n, c_n = fn(*leaves.values())
        results = {"out": out, "h_n": h_n, "c_n": c_n}
        loss = sum((results[n].double() * w.to(device)).sum() for n, w in loss_weights.items())
        grads = _grads(loss, leaves)
        return {**{n: r.detach() for n, r in results.items()}, **grads}

    def torch_lstm(*args):
        return reference.lstm_torch(*args, training=True)

    return _check("lstm", backend, dtype, shape, device, lambda: run(kernel, dtype),
                  lambda d: run(torch_lstm, d), _reference_dtype(device))  # fmt: skip


def check_boom(
    device: torch.device, dtype: torch.dtype, rows: int, width: int, hidden_dim: int,
    backend: str = "triton", seed: int = 0,
) -> Verdict:  # fmt: skip
    """The Triton Boom (dropout off) against the reference in float64: out, dx, dW, db."""
    from . import functional

    shape = f"N={rows} E={width} F={hidden_dim}"
    gen = torch.Generator().manual_seed(seed)
    base = {
        "x": _randn(gen, rows, width),
        "weight": _randn(gen, hidden_dim, width, scale=1.0 / math.sqrt(width)),
        "bias": _randn(gen, hidden_dim, scale=0.1),
    }
    grad_out = _randn(gen, rows, width)

    def run(run_backend: str, run_dtype: torch.dtype) -> Dict[str, torch.Tensor]:
        leaves = {n: t.to(device=device, dtype=run_dtype).requires_grad_() for n, t in base.items()}
        out = functional.boom(*leaves.values(), backend=run_backend)
        grads = _grads((out.double() * grad_out.to(device)).sum(), leaves)
        return {"out": out.detach(), **grads}

    return _check("boom", backend, dtype, shape, device, lambda: run(backend, dtype),
                  lambda d: run("reference", d), torch.float64)  # fmt: skip


def check_attention(
    device: torch.device, dtype: torch.dtype, query_len: int, key_len: int, batch: int,
    width: int, backend: str = "triton", seed: int = 0,
) -> Verdict:  # fmt: skip
    """The Triton attention (with key and value gates, dropout off) against the reference in
    float64: out, dq, dk, dv and the gates' gradients."""
    from . import functional

    shape = f"T={query_len} K={key_len} B={batch} E={width}"
    gen = torch.Generator().manual_seed(seed)
    base = {
        "q": _randn(gen, query_len, batch, width),
        "k": _randn(gen, key_len, batch, width),
        "v": _randn(gen, key_len, batch, width),
        "key_gate": torch.rand(width, generator=gen, dtype=torch.float64),
        "value_gate": torch.rand(width, generator=gen, dtype=torch.float64),
    }
    grad_out = _randn(gen, query_len, batch, width)

    def run(run_backend: str, run_dtype: torch.dtype) -> Dict[str, torch.Tensor]:
        leaves = {n: t.to(device=device, dtype=run_dtype).requires_grad_() for n, t in base.items()}
        out = functional.single_head_attention(
            leaves["q"], leaves["k"], leaves["v"], key_gate=leaves["key_gate"],
            value_gate=leaves["value_gate"], backend=run_backend,
        )  # fmt: skip
        grads = _grads((out.double() * grad_out.to(device)).sum(), leaves)
        return {"out": out.detach(), **grads}

    return _check("attention", backend, dtype, shape, device, lambda: run(backend, dtype),
                  lambda d: run("reference", d), torch.float64)  # fmt: skip


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
    """A hash of the source of ``op``'s kernel on ``backend`` (a changed kernel is checked
    anew even when the package version stayed the same)."""
    key = (op, backend)
    if key not in _FINGERPRINTS:
        here = Path(__file__).resolve().parent
        if backend == "cuda" and op == "lstm":
            from . import _cuda

            directory = _cuda.source_dir()
            paths = [directory / n for n in _cuda.SOURCES] if directory is not None else []
        else:
            name = "attention" if op == "attention" else op
            paths = [here / "ops" / f"{name}.py"]
        digest = hashlib.sha256()
        for path in paths:
            digest.update(path.name.encode())
            digest.update(path.read_bytes() if path.exists() else b"missing")
        _FINGERPRINTS[key] = digest.hexdigest()[:16]
    return _FINGERPRINTS[key]


def device_identity(device: torch.device) -> Dict[str, str]:
    """What a verdict depends on besides the op and its inputs: the device and the software."""
    from . import __version__

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


def is_compiling() -> bool:
    """True while torch.compile (Dynamo) traces the caller."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return bool(compiler.is_compiling())
    return False  # pragma: no cover - torch < 2.3


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


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
        # What ``auto`` decided per input class (filled by sha_rnn_kernels.functional).
        self.choices: Dict[tuple, str] = {}
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
        A directory that cannot be written only loses the disk copy."""
        key_text = json.dumps(key, sort_keys=True)
        with self._lock:
            self._verdicts[key_text] = verdict
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
        if is_compiling() or _capturing(device):
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
                                  error=f"{type(exc).__name__}: {exc}")  # fmt: skip
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


FIRST_USE = FirstUse()
