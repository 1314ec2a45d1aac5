"""Byte-level corpora for training: enwik8, any file, or the Python standard library's source.

Tokens are raw bytes (vocabulary 256, id = byte value). Corpora live on the CPU as ``uint8``
(enwik8's 100M tokens are 100 MB instead of 800 MB of int64) and one batch at a time is copied
to the training device and widened to int64 there.

Splits: the first 90% of the bytes train, the next 5% validate, the last 5% test. For enwik8's
100,000,000 bytes this is exactly the standard 90M / 5M / 5M split.

Example:
    >>> corpus = load_corpus(None, max_bytes=200_000)   # stdlib source, no download
    >>> train = batchify(corpus.train, batch_size=16)   # [rows, 16] uint8
    >>> x, y = get_batch(train, 0, 64, torch.device("cpu"))
    >>> x.shape, x.dtype
    (torch.Size([64, 16]), torch.int64)
"""

from __future__ import annotations

import math
import os
import sysconfig
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

VOCAB_SIZE = 256
ENWIK8_BYTES = 100_000_000
# Folders under the stdlib path that hold third-party code, not the standard library.
_NOT_STDLIB = {"site-packages", "dist-packages", "__pycache__"}


@dataclass
class Corpus:
    """One corpus split three ways, each a 1-D ``uint8`` CPU tensor of byte ids."""

    name: str
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    # Bytes in the whole source before ``max_bytes`` cut it (None: not known).
    source_bytes: Optional[int] = None

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    def describe(self) -> str:
        """What was read and how it was split, e.g. ``data: corpus.txt, read all 4,000 bytes;
        split 3,600 train / 200 valid / 200 test bytes``."""
        total = self.train.numel() + self.valid.numel() + self.test.numel()
        if self.source_bytes is not None and self.source_bytes > total:
            read = f"the first {total:,} of {self.source_bytes:,} bytes (--max-bytes)"
        else:
            read = f"all {total:,} bytes"
        return (
            f"data: {self.name}, read {read}; split {self.train.numel():,} train / "
            f"{self.valid.numel():,} valid / {self.test.numel():,} test bytes"
        )


def split_sizes(total: int) -> Tuple[int, int, int]:
    """``(train, valid, test)`` byte counts for a corpus of ``total`` bytes: 90% / 5% / 5%.

    Valid and test get ``total * 5 // 100`` each and train the rest, so 100,000,000 bytes give
    the standard enwik8 split (90M, 5M, 5M).
    """
    held_out = total * 5 // 100
    if held_out < 2:
        raise ValueError(
            f"a corpus needs at least 40 bytes for a 90/5/5 split with 2+ bytes of valid and "
            f"test each; got {total} bytes"
        )
    return total - 2 * held_out, held_out, held_out


def is_enwik8(path: str, size: int) -> bool:
    """True when ``path`` is enwik8: named ``enwik8`` (or ``enwik8.zip``), or 100,000,000 bytes."""
    return Path(path).name.split(".")[0] == "enwik8" or size == ENWIK8_BYTES


def read_corpus_bytes(path: str) -> bytes:
    """The raw bytes of a file, or of the single file inside a ``.zip`` (such as enwik8.zip)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            stem = Path(path).name.split(".")[0]
            named = [m for m in members if Path(m.filename).name == stem]
            if len(members) == 1:
                member = members[0]
            elif len(named) == 1:
                member = named[0]
            else:
                raise ValueError(
                    f"--data {path}: a zip must hold one file (or one named {stem!r}); "
                    f"got {[m.filename for m in members]}"
                )
            return archive.read(member)
    with open(path, "rb") as f:
        return f.read()


def stdlib_source_files() -> list[Path]:
    """The standard library's ``*.py`` files, sorted by their path relative to the stdlib."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        f
        for f in root.rglob("*.py")
        if f.is_file() and not _NOT_STDLIB.intersection(f.relative_to(root).parts)
    ]
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def stdlib_source_bytes(
    max_bytes: Optional[int] = None, files: Optional[list[Path]] = None
) -> bytes:
    """The concatenated source of ``files`` (default :func:`stdlib_source_files`), cut at
    ``max_bytes``.

    Deterministic for a given Python version; needs no download.
    """
    chunks, total = [], 0
    for f in stdlib_source_files() if files is None else files:
        data = f.read_bytes()
        if max_bytes is not None and total + len(data) >= max_bytes:
            chunks.append(data[: max_bytes - total])
            total = max_bytes
            break
        chunks.append(data)
        total += len(data)
    return b"".join(chunks)


def _to_uint8(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())


def load_corpus(path: Optional[str] = None, max_bytes: Optional[int] = None) -> Corpus:
    """Read a corpus and split it 90/5/5.

    Args:
        path: enwik8 (raw or the official ``enwik8.zip``), any other file (its bytes), or None
            for the Python standard library's source.
        max_bytes: keep only the first ``max_bytes`` bytes before splitting (None: all). A
            capped enwik8 is no longer the standard split, so that warns.
    """
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"--max-bytes must be positive; got {max_bytes}")
    if path is None:
        files = stdlib_source_files()
        data = stdlib_source_bytes(max_bytes, files)
        name = "python-stdlib"
        source_bytes = sum(f.stat().st_size for f in files)
    else:
        if not os.path.exists(path):
            raise FileNotFoundError(f"--data {path}: no such file")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--data {path}: not a file")
        data = read_corpus_bytes(path)
        if not data:
            raise ValueError(f"--data {path}: the file is empty")
        source_bytes = len(data)
        enwik8 = is_enwik8(path, len(data))
        name = "enwik8" if enwik8 else Path(path).name
        if max_bytes is not None and len(data) > max_bytes:
            data = data[:max_bytes]
        if enwik8 and len(data) != ENWIK8_BYTES:
            warnings.warn(
                f"{path} looks like enwik8 but holds {len(data):,} bytes, not "
                f"{ENWIK8_BYTES:,}: the 90/5/5 split is not the standard enwik8 split",
                stacklevel=2,
            )
    tokens = _to_uint8(data)
    try:
        n_train, n_valid, _ = split_sizes(tokens.numel())
    except ValueError as exc:
        raise ValueError(f"--data {path if path is not None else name}: {exc}") from None
    return Corpus(
        name=name,
        train=tokens[:n_train],
        valid=tokens[n_train : n_train + n_valid],
        test=tokens[n_train + n_valid :],
        source_bytes=source_bytes,
    )


def batchify(data: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cut a 1-D token stream into ``batch_size`` contiguous streams: ``[rows, batch_size]``.

    Column b holds bytes ``b * rows ... (b + 1) * rows - 1``; the tail that does not fill a row
    is dropped. The dtype (uint8) and device (CPU) are kept.
    """
    if data.dim() != 1:
        raise ValueError(f"data must be 1-D; got shape {tuple(data.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    rows = data.numel() // batch_size
    if rows < 2:
        raise ValueError(
            f"{data.numel()} tokens cannot fill batch_size={batch_size} columns of 2+ tokens"
        )
    return data[: rows * batch_size].view(batch_size, rows).t().contiguous()


def shard_columns(batched: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """The columns of ``[rows, B]`` that data-parallel rank ``rank`` of ``world_size`` trains on."""
    batch_size = batched.shape[1]
    if batch_size % world_size != 0:
        raise ValueError(
            f"batch size {batch_size} must be a multiple of the world size {world_size}"
        )
    per_rank = batch_size // world_size
    return batched[:, rank * per_rank : (rank + 1) * per_rank].contiguous()


def sample_seq_len(rng: np.random.RandomState, bptt: int) -> int:
    """The original's jittered segment length.

    ``bptt`` with probability 0.95, else ``bptt / 2``; then ``int(N(that, 5))``, at least 5 and
    at most ``bptt`` (so ``bptt < 5`` always gives ``bptt``).
    """
    base = bptt if rng.random_sample() < 0.95 else bptt / 2.0
    return min(max(5, int(rng.normal(base, 5))), bptt)


def expected_steps(rows: int, bptt: int) -> int:
    """About how many :func:`sample_seq_len` segments cover ``rows - 2`` rows (an epoch of
    the trainer): the rows over the mean jittered length, which is a little under ``bptt``
    (a fixed-seed sample of 4096 draws estimates it)."""
    rng = np.random.RandomState(0)
    base = np.where(rng.random_sample(4096) < 0.95, float(bptt), bptt / 2.0)
    lengths = np.clip(np.trunc(rng.normal(base, 5)), 5, bptt)
    return max(1, math.ceil((rows - 2) / min(float(lengths.mean()), bptt)))


def get_batch(
    source: torch.Tensor, start: int, seq_len: int, device: torch.device
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-byte targets ``[L, B]`` int64 on ``device`` from rows ``start ...``.

    ``L = min(seq_len, rows - 1 - start)``. One copy moves the ``L + 1`` rows (asynchronously
    when ``source`` is pinned); the widening to int64 happens on ``device``.
    """
    length = min(seq_len, source.shape[0] - 1 - start)
    if length < 1:
        raise ValueError(f"no targets left at row {start} of {source.shape[0]}")
    rows = source[start : start + length + 1]
    rows = rows.to(device, non_blocking=rows.is_pinned()).long()
    return rows[:-1], rows[1:]
