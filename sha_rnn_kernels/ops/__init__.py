"""Triton kernels, one op per file (boom.py, attention.py, lstm.py).

These modules are imported lazily by :mod:`sha_rnn_kernels.functional`: ``@triton.jit`` reads
``TRITON_INTERPRET`` when a kernel is defined, so importing them eagerly would fix the mode too
early.
"""
