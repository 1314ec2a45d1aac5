"""The trainer's data: the corpus read whole, its splits in batch columns (this rank's share),
and the draws that jitter segment lengths and reset the carried state.

Segment lengths and state resets come from one numpy generator seeded alike on every rank, so
the ranks step through the data together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import data as data_lib
from .distributed import Dist
from .settings import UsageError


@dataclass
class Splits:
    """A run's corpus and its splits as ``[rows, columns]`` byte ids: ``train`` and ``valid``
    hold this rank's columns; ``test`` is evaluated with ``test_dist`` (see ``_test_source``)."""

    corpus: data_lib.Corpus
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    test_dist: Dist


def load_splits(config: dict, ddp: Dist, device: torch.device) -> Splits:
    """Read ``--data`` (``--max-bytes`` cuts it) and batchify its splits; errors name the flag."""
    try:
        corpus = data_lib.load_corpus(config["data"], config["max_bytes"])
    except (OSError, ValueError) as exc:
        message = str(exc) if str(exc).startswith("--") else f"--data {config['data']}: {exc}"
        raise UsageError(message) from None
    train_src = data_lib.shard_columns(
        _batchify(corpus, "train", config["batch_size"], "--batch-size", 3), ddp.rank,
        ddp.world_size,
    )  # fmt: skip
    valid_src = data_lib.shard_columns(
        _batchify(corpus, "valid", config["eval_batch_size"], "--eval-batch-size"), ddp.rank,
        ddp.world_size,
    )  # fmt: skip
    test_src, test_dist = _test_source(corpus, config["test_batch_size"], ddp)
    if device.type == "cuda":
        train_src, valid_src, test_src = (t.pin_memory() for t in (train_src, valid_src, test_src))
    return Splits(corpus, train_src, valid_src, test_src, test_dist)


def _batchify(
    corpus: data_lib.Corpus, split: str, batch_size: int, flag: str, min_rows: int = 2
) -> torch.Tensor:
    """``data.batchify`` of one split, with an error naming the split and the flag to change."""
    tokens = getattr(corpus, split)
    if tokens.numel() // batch_size < min_rows:
        fits = tokens.numel() // min_rows
        raise UsageError(
            f"the {split} split of {corpus.name} holds {tokens.numel():,} bytes, too few for "
            f"{flag} {batch_size} columns of {min_rows}+ bytes: lower {flag}"
            + (f" to at most {fits}" if fits >= 1 else "")
            + " or give more data (--data, --max-bytes)"
        )
    return data_lib.batchify(tokens, batch_size)


def _test_source(corpus, batch: int, ddp: Dist) -> tuple:
    """The test split in ``batch`` columns and the Dist to evaluate it with: sharded across
    ranks when ``batch`` divides among them, else every rank reads all columns (the same
    number on each, no all-reduce), so the original's batch of 8 works on any world size."""
    source = _batchify(corpus, "test", batch, "--test-batch-size")
    if batch % ddp.world_size == 0:
        return data_lib.shard_columns(source, ddp.rank, ddp.world_size), ddp
    return source, Dist()


def draw_resets(rng: np.random.RandomState, reset_prob: float) -> tuple[bool, bool]:
    """Whether to drop the LSTM state and the memory after a step: two draws, as the original
    (one each, after the jitter's two, from the same generator), each true when the draw
    exceeds ``1 - reset_prob`` (its ``random() > 0.975``). No draw when ``reset_prob`` is 0."""
    if reset_prob <= 0:
        return False, False
    return rng.random_sample() > 1.0 - reset_prob, rng.random_sample() > 1.0 - reset_prob
