"""The evaluation command: equal to the trainer's own numbers at the same batch size and bptt,
the paper's protocol (one stream carried across the whole split) checked against a hand loop,
the corpus taken from the checkpoint or --data, and bad input."""

import math
import subprocess
import sys

import pytest
import torch

from sha_rnn_kernels import data as data_lib
from sha_rnn_kernels import train
from sha_rnn_kernels.evaluate import evaluate_checkpoint, load_model, main
from sha_rnn_kernels.testing import SAMPLE_TEXT, TINY_TRAIN_ARGS, checkpoint_path_for

TEXT, TINY = SAMPLE_TEXT, TINY_TRAIN_ARGS


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint of 30 steps on ~6 KB (a 300-byte test split) and the trainer's result."""
    folder = tmp_path_factory.mktemp("evaluate")
    corpus = folder / "corpus.txt"
    corpus.write_bytes((TEXT * 80)[:6000])
    path = folder / "tiny.pt"
    result = train.run(TINY + ["--data", str(corpus), "--max-steps", "30", "--save", str(path)])
    return str(path), result, str(corpus)


def test_equals_the_trainers_evaluation(trained, capsys):
    path, result, _ = trained
    assert result.test_bpc is not None and result.valid_bpc[-1][0] == 30
    # The trainer's final test and evaluate's default both use the original protocol (test
    # batch 8, the training bptt 16): the same number, to the last bit.
    assert evaluate_checkpoint(path, "test") == result.test_bpc
    # The trainer validates at its --eval-batch-size 4; the original protocol at min(100, 4).
    assert evaluate_checkpoint(path, "valid") == result.valid_bpc[-1][1]
    assert main(["--checkpoint", path, "--split", "test", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out == (
        f"test bpc {result.test_bpc:.4f} (protocol original: batch 8, bptt 16, memory 48)\n"
    )
    assert main(["--checkpoint", path, "--protocol", "stream", "--quiet"]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith("test bpc ") and out.endswith(
        "(protocol stream: batch 1, bptt 16, memory 48)\n"
    ), out
    assert main(["--checkpoint", path, "--split", "valid", "--bptt", "8", "--quiet"]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith("valid bpc ") and out.endswith(
        "(protocol original, --bptt 8: batch 4, bptt 8, memory 48)\n"
    ), out


def hand_loop_bpc(model, stream, bptt, carry):
    """Mean -log2 p of every byte of ``stream`` after the first, read as one stream in ``bptt``
    segments; the state and memory are carried from segment to segment when ``carry``."""
    nats, hidden, mems = 0.0, None, None
    with torch.no_grad():
        for start in range(0, stream.numel() - 1, bptt):
            x = stream[start : min(start + bptt, stream.numel() - 1)]
            y = stream[start + 1 : start + 1 + x.numel()]
            if not carry:
                hidden = mems = None
            logits, hidden, mems = model.logits(x.reshape(-1, 1), hidden, mems)
            nats -= logits[:, 0].log_softmax(-1).gather(1, y.reshape(-1, 1)).sum().item()
    return nats / (stream.numel() - 1) / math.log(2)


def test_paper_protocol_matches_a_hand_loop(trained):
    # Batch 1, segments of the training bptt, state and memory carried across the whole test
    # split, against the same computed by hand in float64.
    path, _, corpus = trained
    got = evaluate_checkpoint(path, "test", protocol="stream")
    model, _ = load_model(path, dtype=torch.float64)
    stream = data_lib.load_corpus(corpus).test.long()
    carried = hand_loop_bpc(model, stream, 16, carry=True)
    assert abs(got - carried) < 1e-5, (got, carried)
    # Restarting the state at every segment gives another number, so the check above can fail.
    assert abs(hand_loop_bpc(model, stream, 16, carry=False) - carried) > 1e-4


def test_data_flag_reads_another_corpus(trained, tmp_path):
    path, result, corpus = trained
    assert evaluate_checkpoint(path, "test", data=corpus) == result.test_bpc
    other = tmp_path / "other.txt"
    other.write_bytes(bytes(range(256)) * 30)
    assert evaluate_checkpoint(path, "test", data=str(other)) > result.test_bpc + 0.5


def test_progress_is_plain_when_not_a_terminal(trained, capsys):
    path, _, _ = trained
    assert main(["--checkpoint", path, "--split", "valid"]) == 0
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out.startswith("valid bpc ") and lines, err
    assert all(line.startswith("valid: ") and "segments" in line for line in lines), err
    assert lines[-1].endswith("(100%)") and "\r" not in err


@pytest.mark.parametrize(
    "case, argv, match",
    [
        ("missing", [], "no such file"),
        ("plain_dict", [], "--checkpoint {path}: not a sha_rnn_kernels training checkpoint"),
        ("text_file", [], "--checkpoint {path}: not a sha_rnn_kernels training checkpoint"),
        ("ok", ["--protocol", "paper"], "invalid choice"),
        ("ok", ["--batch-size", "0"], "--batch-size must be a positive int; got 0"),
        ("ok", ["--bptt", "49"], "--bptt 49 exceeds the model's max_positions 48"),
        ("ok", ["--data", "/nonexistent/corpus"], "no such file"),
        ("ok", ["--split", "train"], "invalid choice"),
        ("ok", ["--batch-size", "1000"], "too few for --batch-size 1000"),
    ],
)
def test_bad_input_is_one_line_and_status_2(trained, tmp_path, capsys, case, argv, match):
    path = checkpoint_path_for(case, trained[0], tmp_path)
    try:
        code = main(["--checkpoint", path, "--quiet"] + argv)
    except SystemExit as exc:  # argparse's own errors (one line too: see _Parser)
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("sha-rnn-evaluate: error: "), err
    assert match.format(path=path) in err, err


def test_process_exit_status(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sha_rnn_kernels.evaluate", "--checkpoint",
         str(tmp_path / "missing.pt")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
