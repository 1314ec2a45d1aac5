"""Faulty kernels planted in the child process of a contained check (not a test module).

``SHA_RNN_KERNELS_CHECK_HOOK`` points the child at this file; ``FAKE_KERNEL`` picks the fault
and ``FAKE_OP`` the op (``lstm`` on ``triton`` by default, or ``boom``), whose Triton kernel the
fault replaces.
"""

import os
import signal
import time

import torch

from sha_rnn_kernels import _checks, reference


def _lstm_right(x, w_ih, w_hh, b_ih, b_hh, h0, c0):
    return reference.lstm_torch(x, w_ih, w_hh, b_ih, b_hh, h0, c0, training=True)


def _boom_right(x, weight, bias, *, dropout_p, seed, fused=False):
    from sha_rnn_kernels.ops import boom

    return boom.boom(x, weight, bias, dropout_p=dropout_p, seed=seed, fused=fused)


def _fault(right, kind):
    def kernel(*args, **kwargs):
        if kind == "hang":
            time.sleep(3600)  # a lost step hand-off: the kernel never returns
        if kind == "abort":
            os.abort()  # what an illegal address that aborts the process looks like
        if kind == "segv":
            os.kill(os.getpid(), signal.SIGSEGV)
        if kind == "raise":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        result = right(*args, **kwargs)
        if kind == "wrong":  # one element off: a tile edge computed wrongly
            first = result[0] if isinstance(result, tuple) else result
            bump = torch.zeros_like(first)
            bump.view(-1)[-1] = 1.0
            result = (first + bump, *result[1:]) if isinstance(result, tuple) else first + bump
        return result

    return kernel


_op = os.environ.get("FAKE_OP", "lstm")
_right = _boom_right if _op == "boom" else _lstm_right
_checks.override(_op, "triton", _fault(_right, os.environ["FAKE_KERNEL"]))
