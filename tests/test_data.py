"""Corpus reading, the 90/5/5 split, batching and the bptt jitter."""

import zipfile

import numpy as np
import pytest
import torch

from sha_rnn_kernels import data


@pytest.mark.parametrize(
    "total, expected",
    [
        (100_000_000, (90_000_000, 5_000_000, 5_000_000)),  # enwik8's standard split
        (1000, (900, 50, 50)),
        (1019, (919, 50, 50)),  # the remainder goes to train
        (40, (36, 2, 2)),
    ],
)
def test_split_sizes(total, expected):
    assert data.split_sizes(total) == expected


def test_split_rejects_tiny_corpus():
    with pytest.raises(ValueError, match="at least 40 bytes"):
        data.split_sizes(39)


def test_text_file_split_is_contiguous(tmp_path):
    raw = bytes(range(256)) * 4 + b"tail"
    path = tmp_path / "corpus.txt"
    path.write_bytes(raw)
    corpus = data.load_corpus(str(path))
    assert corpus.name == "corpus.txt"
    assert corpus.train.dtype == torch.uint8 and corpus.train.device.type == "cpu"
    n_train, n_valid, n_test = data.split_sizes(len(raw))
    assert (corpus.train.numel(), corpus.valid.numel(), corpus.test.numel()) == (
        n_train,
        n_valid,
        n_test,
    )
    joined = torch.cat([corpus.train, corpus.valid, corpus.test])
    assert bytes(joined.tolist()) == raw


def test_enwik8_zip_is_read_and_named(tmp_path):
    raw = b"<mediawiki>" + bytes(range(32, 127)) * 3
    path = tmp_path / "enwik8.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("enwik8", raw)
    assert data.read_corpus_bytes(str(path)) == raw
    with pytest.warns(UserWarning, match="not the standard enwik8 split"):
        corpus = data.load_corpus(str(path))
    assert corpus.name == "enwik8"
    assert bytes(corpus.test.tolist()) == raw[-data.split_sizes(len(raw))[2] :]


def test_zip_with_several_files_is_rejected(tmp_path):
    path = tmp_path / "corpus.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a.txt", b"a" * 100)
        archive.writestr("b.txt", b"b" * 100)
    with pytest.raises(ValueError, match="one file"):
        data.read_corpus_bytes(str(path))


def test_enwik8_detection():
    assert data.is_enwik8("/x/enwik8", 10)
    assert data.is_enwik8("/x/enwik8.zip", 10)
    assert data.is_enwik8("/x/dump.bin", 100_000_000)
    assert not data.is_enwik8("/x/enwik9", 10)


def test_stdlib_corpus_is_deterministic_and_capped():
    files = data.stdlib_source_files()
    assert files and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    first = data.load_corpus(None, max_bytes=50_000)
    second = data.load_corpus(None, max_bytes=50_000)
    assert first.name == "python-stdlib"
    total = first.train.numel() + first.valid.numel() + first.test.numel()
    assert total == 50_000
    assert torch.equal(first.train, second.train) and torch.equal(first.test, second.test)
    # The bytes start with the first file in sorted order.
    head = files[0].read_bytes()[:100]
    assert bytes(first.train[: len(head)].tolist()) == head


def test_batchify_columns_are_contiguous_streams():
    stream = torch.arange(23, dtype=torch.uint8)
    batched = data.batchify(stream, 4)
    assert batched.shape == (5, 4) and batched.dtype == torch.uint8
    assert batched[:, 1].tolist() == [5, 6, 7, 8, 9]
    assert data.shard_columns(batched, 1, 2).tolist() == batched[:, 2:4].tolist()
    with pytest.raises(ValueError, match="multiple of the world size"):
        data.shard_columns(batched, 0, 3)


def test_get_batch_targets_are_shifted_and_clipped_at_the_end():
    batched = data.batchify(torch.arange(40, dtype=torch.uint8), 2)  # 20 rows
    x, y = data.get_batch(batched, 0, 7, torch.device("cpu"))
    assert x.dtype == torch.int64 and x.shape == (7, 2)
    assert torch.equal(y[:-1], x[1:]) and x[:, 0].tolist() == list(range(7))
    x, y = data.get_batch(batched, 15, 7, torch.device("cpu"))
    assert x.shape == (4, 2) and y[-1].tolist() == [19, 39]


@pytest.mark.parametrize("bptt", [1, 4, 5, 16, 64, 1024])
def test_seq_len_jitter_bounds(bptt):
    rng = np.random.RandomState(0)
    lengths = np.array([data.sample_seq_len(rng, bptt) for _ in range(4000)])
    assert lengths.max() <= bptt
    assert lengths.min() >= min(5, bptt)
    if bptt >= 64:
        # About 5% of segments are drawn around bptt / 2, the rest around bptt (capped at it).
        short = np.mean(lengths < 0.75 * bptt)
        assert 0.03 < short < 0.07, short
        # Draws above bptt are capped to it: about 0.95 / 2 of all segments.
        assert 0.42 < np.mean(lengths == bptt) < 0.53
        near_half = lengths[lengths < 0.75 * bptt]
        assert abs(near_half.mean() - bptt / 2) < 2.0


def test_describe_says_what_was_read_and_the_split(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"0123456789" * 100)
    whole = data.load_corpus(str(path))
    assert whole.describe() == (
        "data: corpus.txt, read all 1,000 bytes; split 900 train / 50 valid / 50 test bytes"
    )
    capped = data.load_corpus(str(path), max_bytes=400)
    assert capped.describe() == (
        "data: corpus.txt, read the first 400 of 1,000 bytes (--max-bytes); split 360 train / "
        "20 valid / 20 test bytes"
    )
    stdlib = data.load_corpus(None, max_bytes=1000)
    assert "read the first 1,000 of " in stdlib.describe()


def test_unusable_files_name_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data .*nope.txt: no such file"):
        data.load_corpus(str(tmp_path / "nope.txt"))
    with pytest.raises(FileNotFoundError, match="not a file"):
        data.load_corpus(str(tmp_path))
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="--data .*empty.txt: the file is empty"):
        data.load_corpus(str(empty))
    tiny = tmp_path / "tiny.txt"
    tiny.write_bytes(b"x" * 20)
    with pytest.raises(ValueError, match="--data .*tiny.txt: a corpus needs at least 40 bytes"):
        data.load_corpus(str(tiny))
    with pytest.raises(ValueError, match="--max-bytes must be positive"):
        data.load_corpus(str(tiny), max_bytes=0)
