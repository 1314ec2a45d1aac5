"""Speed measurements of sha_rnn_kernels against its baselines (see ``benchmarks/run.py``)."""
