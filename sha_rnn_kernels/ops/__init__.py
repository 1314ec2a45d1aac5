"""Triton kernels, one op per public file (boom.py, attention.py, lstm.py, decode.py).

An op too large for one file is split by meaning into ``_<op>_*.py`` parts (attention: forward,
backward, what they share; LSTM: the step kernels), and its public file re-exports their names,
kernels included. ``_common.py`` and ``_dropout.py`` hold what several ops share.

These modules are imported lazily by :mod:`sha_rnn_kernels.functional`: ``@triton.jit`` reads
``TRITON_INTERPRET`` when a kernel is defined, so importing them eagerly would fix the mode too
early.
"""
