"""``python -m sha_rnn_kernels.train``: the training command (see ``sha_rnn_kernels.train``)."""

import sys

from . import main

sys.exit(main())
