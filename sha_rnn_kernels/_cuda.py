"""The persistent CUDA LSTM of ``csrc/``: lazy JIT build, launch planning and autograd.

Importing this module builds nothing and never touches CUDA. The extension is compiled on the
first call that runs the kernel, with ``torch.utils.cpp_extension.load`` and ninja, for the
architecture of that device only (sm_80 -> ``sm_80``, sm_90 -> ``sm_90a``), and cached in
``$SHA_RNN_KERNELS_BUILD_DIR`` (default: torch's extensions directory, which honours
``TORCH_EXTENSIONS_DIR``) under a name that hashes the sources, the architecture and the torch
and CUDA versions. An exclusive ``flock`` around the build makes concurrent processes (DDP
ranks, parallel test workers) wait for one build instead of racing; the lock goes away with
its process, so a killed build never leaves a stale lock behind.

Kernel design (details in ``csrc/lstm_persistent.cu``, budget in ``docs/design/lstm.md``): one
cooperative launch per sequence; block g of ``ceil(H / units)`` blocks owns ``units`` hidden
units and keeps their W_hh rows (forward) or W_hh columns (backward) in shared memory; per step
it multiplies h_{t-1} (or dgates_t) by that slice with mma.sync and fuses the gates and the
cell update. Blocks hand each step over through the data itself: the launch's output buffer is
filled with an "unpublished" word first, blocks publish with relaxed 32-bit stores and poll
what they need with relaxed loads until it is published (no flags, no fences). On sm_90 the
backward runs in thread block clusters that split K (each block polls 1/C of dgates_t and the
partial sums meet in distributed shared memory). A poll that exceeds
:data:`WAIT_LIMIT_CYCLES` ends the launch and raises (:func:`check_status`) instead of hanging.
``$SHA_RNN_KERNELS_LSTM_RESERVE_SMS`` SMs are left free for other work (e.g. NCCL). The input
projection and the weight gradients are torch GEMMs. Without a GPU the same kernels run on the
CPU through the g++ emulation in ``csrc/emu/`` (``python -m pytest tests/test_lstm_emulation.py``).

Precision: float16 and bfloat16 with fp32 accumulation and an fp32 cell state. float32 inputs
are not taken (the reason function says so and ``backend="auto"`` uses another backend).

Limits, checked before anything is built or launched (:func:`lstm_unsupported_reason`):
``B <= 64`` (up to four 16-row MMA tiles, looped over inside each step), ``H % 8 == 0`` and
the W_hh slices must fit: at most one block per SM and :func:`fwd_smem_bytes` /
:func:`bwd_smem_bytes` within the device's opt-in shared memory per block. The largest H is
1632 on an H100 (132 SMs, 227 KiB), 1120 on an A100 (108 SMs, 163 KiB), 1024 on a 128-SM
sm_89 (99 KiB); every multiple of 8 below fits.

Memory checks on a GPU (small shape, forward and backward, both dtypes)::

    compute-sanitizer --tool memcheck  python -m sha_rnn_kernels._cuda
    compute-sanitizer --tool racecheck python -m sha_rnn_kernels._cuda
    compute-sanitizer --tool synccheck python -m sha_rnn_kernels._cuda
"""

import contextlib
import hashlib
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .ops._common import empty

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: torch's own build baton still serialises
    fcntl = None

SOURCES = ("lstm_persistent.cu", "lstm_binding.cpp", "lstm_persistent.h")
BUILD_DIR_ENV = "SHA_RNN_KERNELS_BUILD_DIR"
VERBOSE_ENV = "SHA_RNN_KERNELS_VERBOSE_BUILD"
RESERVE_SMS_ENV = "SHA_RNN_KERNELS_LSTM_RESERVE_SMS"

# Launch constants shared with csrc/lstm_persistent.h (kLstm*): keep both in step.
WARPS = 8
PARTIAL_SLOTS = 4
MAX_BATCH = 64
UNIT_CHOICES = (8, 16, 24, 32)
DTYPES = (torch.float16, torch.bfloat16)

# The kernel's speed at the paper's shape (H100, bf16, T=1024, B=16, H=1024), in one place for
# the ``auto`` policy's reasons and the docs: ESTIMATED from byte and FLOP counts and assumed
# L2 latency and bandwidth (docs/design/lstm.md, 2026-12-06), not measured.
ESTIMATE_US_PER_STEP = {"forward": (0.9, 1.7), "backward": (0.8, 1.7)}
ESTIMATE_MS_PER_LAYER = (2.5, 4.2)  # forward + backward, with the four GEMMs around it
ESTIMATE = (
    "~0.9-1.7 us per forward and ~0.8-1.7 us per backward step, 2.5-4.2 ms per layer forward + "
    "backward (~3.1 ms at mid rates; estimated from byte and FLOP counts, docs/design/lstm.md)"
)

# Bounded step waits (csrc/lstm_persistent.h: kLstmWaitLimitCycles, kLstmStatusWords): the
# status buffer a launch returns holds a uint64 error word, all ones when no wait gave up.
WAIT_LIMIT_CYCLES = 1 << 33
STATUS_WORDS = 2
NO_ERROR = (1 << 64) - 1

# Opt-in shared memory per block by compute capability, for torch builds whose device
# properties lack ``shared_memory_per_block_optin``.
_SMEM_OPTIN_BY_CAPABILITY = {(8, 0): 166912, (8, 7): 166912, (9, 0): 232448, (10, 0): 232448}
_SMEM_OPTIN_DEFAULT = 101376  # sm_86 / sm_89 / sm_120: 99 KiB


# --------------------------------------------------------------------------------------------
# Sources, architecture flags, launch planning (pure functions: tested on CPU)
# --------------------------------------------------------------------------------------------
def source_candidates() -> Tuple[Path, ...]:
    """Where the CUDA sources may be: the copy an installed wheel carries inside the package,
    then the repository's top-level ``csrc/``."""
    package = Path(__file__).resolve().parent
    return (package / "csrc", package.parent / "csrc")


def source_dir(candidates: Optional[Sequence[Path]] = None) -> Optional[Path]:
    """The first candidate directory holding every file of :data:`SOURCES`, or None."""
    for directory in candidates if candidates is not None else source_candidates():
        if all((Path(directory) / name).is_file() for name in SOURCES):
            return Path(directory)
    return None


def arch_flag(capability: Tuple[int, int]) -> str:
    """The ``sm_XX`` target for a device: Hopper gets ``sm_90a``, others ``sm_<major><minor>``.

    >>> arch_flag((8, 0)), arch_flag((9, 0))
    ('sm_80', 'sm_90a')
    """
    major, minor = int(capability[0]), int(capability[1])
    if (major, minor) < (8, 0):
        raise ValueError(f"the CUDA LSTM needs compute capability >= 8.0; got {major}.{minor}")
    return "sm_90a" if (major, minor) == (9, 0) else f"sm_{major}{minor}"


def gencode_flags(capability: Tuple[int, int]) -> list:
    """nvcc flags compiling for exactly this device's architecture."""
    arch = arch_flag(capability)
    return ["-gencode", f"arch={arch.replace('sm_', 'compute_')},code={arch}"]


def smem_row_stride(k: int) -> int:
    """Shared-memory row stride (elements) of a slice with ``k`` columns: the smallest value
    ``>= k`` that is 32 mod 64, so the kernel's 16-byte loads are free of bank conflicts."""
    return ((k + 31) // 64) * 64 + 32


def partial_stride(cols: int) -> int:
    """Row stride (floats) of a split-K partial tile: 8 floats of padding against bank
    conflicts of the 8-byte partial stores."""
    return cols + 8


def fwd_smem_bytes(hidden: int, units: int) -> int:
    """Forward kernel's shared memory: W_hh rows (4 units x H, 2 bytes), the split-K partial
    tiles (``PARTIAL_SLOTS`` x 16 x (4 units + 8), fp32), the cell state (``MAX_BATCH`` x units,
    fp32)."""
    return (
        4 * units * smem_row_stride(hidden) * 2
        + PARTIAL_SLOTS * 16 * partial_stride(4 * units) * 4
        + MAX_BATCH * units * 4
    )


def bwd_smem_bytes(hidden: int, units: int) -> int:
    """Backward kernel's shared memory: W_hh columns (units x 4H, 2 bytes), partial tiles
    (``PARTIAL_SLOTS`` x 16 x (units + 8), fp32), dh and dc (2 x ``MAX_BATCH`` x units, fp32)."""
    return (
        units * smem_row_stride(4 * hidden) * 2
        + PARTIAL_SLOTS * 16 * partial_stride(units) * 4
        + 2 * MAX_BATCH * units * 4
    )


def reserve_sms() -> int:
    """SMs the kernels leave free for other work on the GPU (e.g. NCCL under DDP): the integer
    in ``$SHA_RNN_KERNELS_LSTM_RESERVE_SMS``, default 0."""
    raw = os.environ.get(RESERVE_SMS_ENV, "").strip()
    if not raw:
        return 0
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{RESERVE_SMS_ENV} must be a non-negative integer; got {raw!r}")
    return value


@dataclass(frozen=True)
class LaunchPlan:
    units: int  # hidden units per block
    blocks: int  # grid size (cooperative, one block per SM at most)
    fwd_smem: int  # bytes of dynamic shared memory per block
    bwd_smem: int


def plan_launch(
    hidden: int, batch: int, sm_count: int, smem_per_block: int, reserve: int = 0
) -> Union[LaunchPlan, str]:
    """How the kernels split ``hidden`` units over the SMs, or why they cannot.

    The fewest units per block whose grid fits one block per SM on the ``sm_count - reserve``
    SMs the launch may fill (most SMs streaming weights); its W_hh slice must then fit the
    opt-in shared memory of a block, forward and backward. (On sm_90 the backward may run the
    same 8-unit plan in thread block clusters; the launcher picks the cluster size.)

    >>> plan_launch(1024, 16, sm_count=132, smem_per_block=232448).units
    8
    >>> plan_launch(1024, 16, sm_count=132, smem_per_block=232448, reserve=8).units
    16
    """
    if reserve < 0 or reserve >= sm_count:
        return f"the SM reserve must be in [0, {sm_count}) on a {sm_count}-SM device; got {reserve}"
    reserved = f" ({reserve} of {sm_count} SMs reserved)" if reserve else ""
    sm_count -= reserve
    if batch > MAX_BATCH:
        return f"batch {batch} is larger than the kernel's {MAX_BATCH} rows (4 MMA tiles)"
    if hidden % 8 != 0:
        return f"hidden size H={hidden} is not a multiple of 8"
    for units in UNIT_CHOICES:
        blocks = -(-hidden // units)
        if blocks > sm_count:
            continue
        fwd, bwd = fwd_smem_bytes(hidden, units), bwd_smem_bytes(hidden, units)
        if max(fwd, bwd) > smem_per_block:
            return (
                f"hidden size H={hidden} does not fit on chip: {blocks} blocks of {units} units "
                f"need {max(fwd, bwd) / 1024:.0f} KiB of shared memory each, the device has "
                f"{sm_count} SMs with {smem_per_block / 1024:.0f} KiB per block{reserved}"
            )
        return LaunchPlan(units, blocks, fwd, bwd)
    return (
        f"hidden size H={hidden} does not fit on chip: even {UNIT_CHOICES[-1]} units per block "
        f"need {-(-hidden // UNIT_CHOICES[-1])} blocks, the device has {sm_count} SMs{reserved}"
    )


def shape_dtype_reason(dtypes: Sequence[torch.dtype], batch: int, hidden: int) -> Optional[str]:
    """The device-independent limits: dtype, batch tile, hidden a multiple of 8."""
    for dtype in dtypes:
        if dtype not in DTYPES:
            return (
                f"the CUDA LSTM takes float16 and bfloat16 (tensor cores, fp32 accumulation); "
                f"got {dtype}"
            )
    if batch > MAX_BATCH:
        return f"batch {batch} is larger than the kernel's {MAX_BATCH} rows (4 MMA tiles)"
    if hidden % 8 != 0:
        return f"hidden size H={hidden} is not a multiple of 8"
    return None


def _smem_optin(props: Any, capability: Tuple[int, int]) -> int:
    value = getattr(props, "shared_memory_per_block_optin", None)
    if value:
        return int(value)
    return _SMEM_OPTIN_BY_CAPABILITY.get(tuple(capability), _SMEM_OPTIN_DEFAULT)


@cache
def _toolchain_reason() -> Optional[str]:
    """Why the extension cannot be built here (no CUDA torch, nvcc, ninja or sources)."""
    if torch.version.cuda is None:
        return "this torch build has no CUDA support"
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja); the CUDA extension is built with it"
    cuda_home = cpp_extension.CUDA_HOME
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return "nvcc was not found (set CUDA_HOME); the CUDA extension is compiled on first use"
    if source_dir() is None:
        where = " or ".join(str(p) for p in source_candidates())
        return f"the CUDA sources {SOURCES} were not found in {where}"
    return None


def lstm_unsupported_reason(x: Tensor, weight_ih: Tensor, weight_hh: Tensor) -> Optional[str]:
    """Why the CUDA LSTM cannot take these (already validated) inputs, or None when it can.

    Never builds the extension; touches CUDA only for CUDA tensors (device properties).

    Args:
        x: ``[T, B, I]``; weight_ih: ``[4H, I]``; weight_hh: ``[4H, H]``.
    """
    if x.device.type != "cuda":
        return f"the CUDA LSTM needs CUDA tensors; got tensors on {x.device}"
    batch, hidden = x.shape[1], weight_hh.shape[1]
    reason = shape_dtype_reason((x.dtype, weight_ih.dtype, weight_hh.dtype), batch, hidden)
    if reason is not None:
        return reason
    if not torch.cuda.is_available():
        return "torch.cuda is not available"
    capability = torch.cuda.get_device_capability(x.device)
    try:
        arch = arch_flag(capability)
    except ValueError as exc:
        return str(exc)
    if arch in _build_errors:
        return f"the CUDA extension failed to build earlier in this process: {_build_errors[arch]}"
    if arch not in _extensions:
        reason = _toolchain_reason()
        if reason is not None:
            return reason
    props = torch.cuda.get_device_properties(x.device)
    try:
        reserve = reserve_sms()
    except ValueError as exc:
        return str(exc)
    plan = plan_launch(
        hidden, batch, props.multi_processor_count, _smem_optin(props, capability), reserve
    )
    return plan if isinstance(plan, str) else None


# --------------------------------------------------------------------------------------------
# JIT build
# --------------------------------------------------------------------------------------------
_extensions: dict = {}
_build_errors: dict = {}
_build_mutex = threading.Lock()


def build_root() -> Path:
    """Where extensions are built: ``$SHA_RNN_KERNELS_BUILD_DIR``, else torch's default."""
    root = os.environ.get(BUILD_DIR_ENV)
    if root:
        return Path(root)
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    from torch.utils import cpp_extension

    return Path(cpp_extension.get_default_build_root())


def extension_name(arch: str, directory: Path) -> str:
    """A name unique to the sources, the target and the toolchain (a stale build never
    loads after the sources or torch change)."""
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update(name.encode())
        digest.update((directory / name).read_bytes())
    for part in (arch, torch.__version__, str(torch.version.cuda), sys.version.split()[0]):
        digest.update(part.encode())
    return f"sha_rnn_lstm_{arch}_{digest.hexdigest()[:12]}"


@contextlib.contextmanager
def build_lock(path: Path, timeout: float = 3600.0, poll: float = 0.1) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block.

    Raises TimeoutError after ``timeout`` seconds of waiting for another holder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(path, "a+") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"waited {timeout:.0f} s for {path}: another process is building the "
                        f"CUDA extension (remove nothing; wait or raise the timeout)"
                    ) from None
                time.sleep(poll)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def load_extension(device: torch.device) -> Any:
    """The compiled extension for ``device``'s architecture (built on first use)."""
    capability = torch.cuda.get_device_capability(device)
    arch = arch_flag(capability)
    module = _extensions.get(arch)
    if module is not None:
        return module
    with _build_mutex:
        if arch in _extensions:
            return _extensions[arch]
        directory = source_dir()
        if directory is None:
            raise RuntimeError(
                f"the CUDA sources {SOURCES} were not found in {source_candidates()}"
            )
        from torch.utils import cpp_extension

        name = extension_name(arch, directory)
        build_dir = build_root() / name
        build_dir.mkdir(parents=True, exist_ok=True)
        try:
            with build_lock(build_root() / f"{name}.lock"):
                module = cpp_extension.load(
                    name=name,
                    sources=[
                        str(directory / "lstm_persistent.cu"),
                        str(directory / "lstm_binding.cpp"),
                    ],
                    extra_cflags=["-O3"],
                    extra_cuda_cflags=["-O3", "-lineinfo", *gencode_flags(capability)],
                    extra_include_paths=[str(directory)],
                    build_directory=str(build_dir),
                    verbose=os.environ.get(VERBOSE_ENV) == "1",
                )
        except Exception as exc:
            _build_errors[arch] = f"{type(exc).__name__}: {str(exc)[:500]}"
            raise
        _extensions[arch] = module
        return module


def _plan(device: torch.device, hidden: int, batch: int) -> LaunchPlan:
    capability = torch.cuda.get_device_capability(device)
    props = torch.cuda.get_device_properties(device)
    plan = plan_launch(
        hidden, batch, props.multi_processor_count, _smem_optin(props, capability), reserve_sms()
    )
    if isinstance(plan, str):
        raise RuntimeError(f"sha_rnn_kernels CUDA LSTM: {plan}")
    return plan


def status_error(pass_name: str, word: int, seq_len: int) -> Optional[str]:
    """The error a kernel's error word reports, or None for ``NO_ERROR``.

    ``word`` is ``(epoch << 32) | (late block << 16) | waiting block``: a block of the launch
    polled more than ``WAIT_LIMIT_CYCLES`` for words the late block had to publish in step
    ``epoch`` (the forward's epoch e publishes h_{e-1}; the backward's publishes dgates of
    step T - e).

    >>> status_error("forward", (3 << 32) | (4 << 16) | 1, seq_len=8)[:60]
    'sha_rnn_kernels CUDA LSTM forward: block 1 gave up waiting f'
    """
    if word == NO_ERROR:
        return None
    epoch, late, waiting = word >> 32, (word >> 16) & 0xFFFF, word & 0xFFFF
    if pass_name == "forward":
        step, what = epoch - 1, f"h_{epoch - 1}"
    else:
        step, what = seq_len - epoch, f"the gate gradient of step {seq_len - epoch}"
    return (
        f"sha_rnn_kernels CUDA LSTM {pass_name}: block {waiting} gave up waiting for block "
        f"{late} to publish step {step} of {seq_len} ({what}) after {WAIT_LIMIT_CYCLES} cycles; "
        f"the kernel stopped instead of hanging and its outputs are invalid. Words that never "
        f"arrive are a kernel bug or a GPU fault (or another process preempted the GPU for "
        f"seconds); backend='torch' runs the LSTM on cuDNN meanwhile"
    )


def check_status(step_buffer: Tensor, pass_name: str, seq_len: int) -> None:
    """Raise RuntimeError when a step wait of the launch gave up (see :func:`status_error`).

    Reads the error word back (a stream synchronisation); skipped while a CUDA graph is
    being captured, where no synchronisation is allowed (the graph's replays are unchecked).
    """
    if step_buffer.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    low, high = (int(v) & 0xFFFFFFFF for v in step_buffer[:STATUS_WORDS].tolist())
    message = status_error(pass_name, (high << 32) | low, seq_len)
    if message is not None:
        raise RuntimeError(message)


def _aligned(t: Tensor) -> Tensor:
    """Contiguous and 16-byte aligned (the kernels read 16-byte vectors and 32-bit pairs)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


# --------------------------------------------------------------------------------------------
# The GEMMs around the recurrence (shared with the CPU emulation tests)
# --------------------------------------------------------------------------------------------
def combine_bias(bias_ih: Optional[Tensor], bias_hh: Optional[Tensor]) -> Optional[Tensor]:
    """The one bias the input projection adds: ``b_ih + b_hh``, either alone, or None."""
    if bias_ih is not None and bias_hh is not None:
        return bias_ih + bias_hh
    return bias_ih if bias_ih is not None else bias_hh


def input_projection(x: Tensor, weight_ih: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``xproj [T, B, 4H] = x W_ih^T + bias``: one GEMM over all T*B rows before the loop."""
    steps, batch, input_size = x.shape
    x2d = x.reshape(steps * batch, input_size)
    if bias is None:
        xproj = torch.mm(x2d, weight_ih.t())
    else:
        xproj = torch.addmm(bias, x2d, weight_ih.t())
    return xproj.view(steps, batch, weight_ih.shape[0])


def gemm_gradients(
    x: Tensor, weight_ih: Tensor, h0: Tensor, out: Tensor, d_gates: Tensor
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``dx = dgates W_ih``, ``dW_ih = dgates^T x``, ``dW_hh = dgates^T h_{t-1}``, ``db =
    sum dgates`` from the kernel's ``d_gates [T, B, 4H]``: GEMMs over all T*B rows."""
    steps, batch, input_size = x.shape
    hidden = out.shape[2]
    dg = d_gates.view(steps * batch, 4 * hidden)
    dx = torch.mm(dg, weight_ih).view(steps, batch, input_size)
    dw_ih = torch.mm(dg.t(), x.reshape(steps * batch, input_size))
    h_prev = torch.cat([h0.unsqueeze(0), out[: steps - 1]]).view(steps * batch, hidden)
    dw_hh = torch.mm(dg.t(), h_prev)
    db = dg.sum(0, dtype=torch.float32).to(x.dtype)
    return dx, dw_ih, dw_hh, db


# --------------------------------------------------------------------------------------------
# Autograd: two custom ops so torch.compile(fullgraph=True) keeps them whole
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("sha_rnn_kernels::lstm_cuda_fwd", mutates_args=(), device_types="cuda")
def _lstm_fwd(
    x: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias: Optional[Tensor],
    h0: Tensor,
    c0: Tensor,
    save: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``out [T,B,H], h_n, c_n [B,H]`` and, when ``save``, the fp32 activations the
    backward needs: ``gates [T,B,4H]`` (i, f, g, o after their nonlinearity) and ``cells
    [T,B,H]`` (c_t); empty tensors otherwise."""
    steps, batch, input_size = x.shape
    hidden = weight_hh.shape[1]
    ext = load_extension(x.device)
    plan = _plan(x.device, hidden, batch)
    xproj = input_projection(x, weight_ih, bias)
    out = empty(steps, batch, hidden, dtype=x.dtype, device=x.device)
    c_n = empty(batch, hidden, dtype=x.dtype, device=x.device)
    act_shape = ((steps, batch, 4 * hidden), (steps, batch, hidden)) if save else ((0,), (0,))
    gates = empty(*act_shape[0], dtype=torch.float32, device=x.device)
    cells = empty(*act_shape[1], dtype=torch.float32, device=x.device)
    step_buffer = ext.forward(
        _aligned(xproj), _aligned(weight_hh), _aligned(h0), _aligned(c0), out, c_n,
        gates if save else None, cells if save else None, plan.units, reserve_sms(),
    )  # fmt: skip
    check_status(step_buffer, "forward", steps)
    return out, out[steps - 1].clone(), c_n, gates, cells


@_lstm_fwd.register_fake
def _lstm_fwd_fake(x, weight_ih, weight_hh, bias, h0, c0, save):
    steps, batch, _ = x.shape
    hidden = weight_hh.shape[1]
    act_shape = ((steps, batch, 4 * hidden), (steps, batch, hidden)) if save else ((0,), (0,))
    return (
        x.new_empty(steps, batch, hidden),
        x.new_empty(batch, hidden),
        x.new_empty(batch, hidden),
        x.new_empty(act_shape[0], dtype=torch.float32),
        x.new_empty(act_shape[1], dtype=torch.float32),
    )


@torch.library.custom_op("sha_rnn_kernels::lstm_cuda_bwd", mutates_args=(), device_types="cuda")
def _lstm_bwd(
    x: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    h0: Tensor,
    c0: Tensor,
    out: Tensor,
    gates: Tensor,
    cells: Tensor,
    d_out: Tensor,
    d_hn: Tensor,
    d_cn: Tensor,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``dx, dW_ih, dW_hh, db (= db_ih = db_hh), dh0, dc0``.

    The kernel runs the recurrence backwards and writes dgates (the gradient of the gate
    pre-activations); then dx = dgates W_ih, dW_ih = dgates^T x, dW_hh = dgates^T h_{t-1},
    db = sum over (T, B) of dgates are single GEMMs / reductions over all T*B rows.
    """
    steps, batch, input_size = x.shape
    hidden = weight_hh.shape[1]
    ext = load_extension(x.device)
    plan = _plan(x.device, hidden, batch)
    d_gates = empty(steps, batch, 4 * hidden, dtype=x.dtype, device=x.device)
    d_h0 = empty(batch, hidden, dtype=x.dtype, device=x.device)
    d_c0 = empty(batch, hidden, dtype=x.dtype, device=x.device)
    step_buffer = ext.backward(
        _aligned(weight_hh), _aligned(gates), _aligned(cells), _aligned(c0), _aligned(d_out),
        _aligned(d_hn), _aligned(d_cn), d_gates, d_h0, d_c0, plan.units, reserve_sms(),
    )  # fmt: skip
    check_status(step_buffer, "backward", steps)
    dx, dw_ih, dw_hh, db = gemm_gradients(x, weight_ih, h0, out, d_gates)
    return dx, dw_ih, dw_hh, db, d_h0, d_c0


@_lstm_bwd.register_fake
def _lstm_bwd_fake(x, weight_ih, weight_hh, h0, c0, out, gates, cells, d_out, d_hn, d_cn):
    return (
        torch.empty_like(x),
        torch.empty_like(weight_ih),
        torch.empty_like(weight_hh),
        weight_hh.new_empty(weight_hh.shape[0]),
        torch.empty_like(h0),
        torch.empty_like(c0),
    )


def _setup_context(ctx, inputs, output):
    x, weight_ih, weight_hh, bias, h0, c0, save = inputs
    out, _, _, gates, cells = output
    ctx.has_bias = bias is not None
    ctx.saved = save
    ctx.save_for_backward(x, weight_ih, weight_hh, h0, c0, out, gates, cells)


def _backward(ctx, d_out, d_hn, d_cn, _d_gates, _d_cells):
    if not ctx.saved:
        raise RuntimeError(
            "sha_rnn_kernels::lstm_cuda_fwd ran with save=False (no activations kept); call "
            "sha_rnn_kernels._cuda.lstm with grad mode on to differentiate it"
        )
    x, weight_ih, weight_hh, h0, c0, out, gates, cells = ctx.saved_tensors
    d_out = torch.zeros_like(out) if d_out is None else d_out
    d_hn = torch.zeros_like(h0) if d_hn is None else d_hn
    d_cn = torch.zeros_like(c0) if d_cn is None else d_cn
    dx, dw_ih, dw_hh, db, dh0, dc0 = _lstm_bwd(
        x, weight_ih, weight_hh, h0, c0, out, gates, cells, d_out, d_hn, d_cn
    )
    return dx, dw_ih, dw_hh, db if ctx.has_bias else None, dh0, dc0, None


_lstm_fwd.register_autograd(_backward, setup_context=_setup_context)


def lstm(
    x: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor],
    bias_hh: Optional[Tensor],
    h0: Optional[Tensor],
    c0: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer on the persistent CUDA kernels (``torch.nn.LSTM`` semantics).

    Inputs are validated by :func:`sha_rnn_kernels.functional.lstm` and pass
    :func:`lstm_unsupported_reason`; differentiable w.r.t. every tensor argument.

    Args:
        x: ``[T, B, I]`` (any strides); weight_ih: ``[4H, I]``; weight_hh: ``[4H, H]``;
        bias_ih, bias_hh: ``[4H]`` or None; h0, c0: ``[B, H]`` or None (zeros).

    Returns:
        ``out [T, B, H]``, ``h_n [B, H]``, ``c_n [B, H]``.

    Example:
        >>> out, h_n, c_n = lstm(x, w_ih, w_hh, b_ih, b_hh, None, None)  # doctest: +SKIP
    """
    batch, hidden = x.shape[1], weight_hh.shape[1]
    if h0 is None:
        h0 = x.new_zeros(batch, hidden)
    if c0 is None:
        c0 = x.new_zeros(batch, hidden)
    bias = combine_bias(bias_ih, bias_hh)
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight_ih, weight_hh, bias, h0, c0)
    )
    out, h_n, c_n, _, _ = _lstm_fwd(x, weight_ih, weight_hh, bias, h0, c0, save)
    return out, h_n, c_n


# --------------------------------------------------------------------------------------------
# Smoke run on a GPU (for compute-sanitizer, see the module docstring)
# --------------------------------------------------------------------------------------------
def _smoke(steps: int = 5, batch: int = 3, input_size: int = 24, hidden: int = 40) -> None:
    device = torch.device("cuda")
    for dtype in DTYPES:
        torch.manual_seed(0)
        ref = torch.nn.LSTM(input_size, hidden).to(device)
        x = torch.randn(steps, batch, input_size, device=device)
        h0 = torch.randn(batch, hidden, device=device)
        c0 = torch.randn(batch, hidden, device=device)
        params = [p.detach().to(dtype).requires_grad_() for p in ref.parameters()]
        inputs = [t.to(dtype).requires_grad_() for t in (x, h0, c0)]
        reason = lstm_unsupported_reason(inputs[0], params[0], params[1])
        if reason is not None:
            raise SystemExit(f"cannot run: {reason}")
        out, h_n, c_n = lstm(inputs[0], *params, inputs[1], inputs[2])
        (out.float().square().sum() + h_n.float().sum() + c_n.float().sum()).backward()
        torch.cuda.synchronize()
        with torch.no_grad():
            expected, (h_ref, c_ref) = ref(x, (h0[None], c0[None]))
        print(
            f"{dtype}: |out - nn.LSTM| = {(out.float() - expected).abs().max().item():.3g}, "
            f"|c_n| err = {(c_n.float() - c_ref[0]).abs().max().item():.3g}, "
            f"grads finite: {all(bool(t.grad.isfinite().all()) for t in params + inputs)}"
        )


if __name__ == "__main__":
    _smoke()
