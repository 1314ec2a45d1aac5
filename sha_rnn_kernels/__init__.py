"""sha_rnn_kernels: fused GPU kernels and drop-in modules for the SHA-RNN language model.

>>> from sha_rnn_kernels import SHARNN, SHALayer, LSTM, SingleHeadAttention, Boom
"""

from ._backend import BACKENDS, BackendUnavailableError
from ._version import __version__
from .dispatch import backends, explain
from .modules import LSTM, SHARNN, Boom, SHALayer, SingleHeadAttention

__all__ = [
    "BACKENDS",
    "LSTM",
    "SHARNN",
    "BackendUnavailableError",
    "Boom",
    "SHALayer",
    "SingleHeadAttention",
    "__version__",
    "backends",
    "explain",
]
