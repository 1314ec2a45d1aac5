"""What a new user runs into (issue "new-user traps, round 2"): the commands as subprocesses
(exit status, one line, no traceback), the thread count, existing checkpoints kept, the
progress bar in a pseudo-terminal, and the Python API's messages and batch_first."""

import os
import subprocess
import sys
import time

import pytest
import torch

from sha_rnn_kernels import LSTM, SHARNN, cli, train
from sha_rnn_kernels.testing import SAMPLE_TEXT

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = [
    "--emsize", "32", "--nhid", "64", "--nlayers", "2", "--bptt", "16",
    "--max-positions", "48", "--batch-size", "4", "--eval-batch-size", "4",
    "--warmup", "5", "--lr", "1e-2", "--eval-interval", "0",
]  # fmt: skip


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(SAMPLE_TEXT * 50)
    return str(path)


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)  # a user's shell: Triton not interpreted
    env.update(extra)
    return env


def _command(module, args, cwd, timeout=240):
    return subprocess.run(
        [sys.executable, "-m", f"sha_rnn_kernels.{module}", *args], cwd=cwd, env=_env(),
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _one_line_error(proc, prog="sha-rnn-train"):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), proc.stderr
    return lines[0]


# ---- 3, 7: every value checked in one line, a backend that cannot run refused early ----------


BAD_VALUES = [
    (["--dropout", "1.5"], "--dropout must lie in [0, 1); got 1.5"),
    (["--lr", "-1"], "--lr must lie in (0, inf); got -1.0"),
    (["--lr", "nan"], "--lr must lie in (0, inf); got nan"),
    (["--beta2", "1"], "--beta2 must lie in [0, 1); got 1.0"),
    (["--seed", "-3"], "--seed must lie in [0, 4.29497e+09]; got -3"),
    (["--backend", "cudnn"], "got 'cudnn' (see sha-rnn-train --help)"),
    # Refused before the data is read: the missing file is never reached.
    (["--backend", "triton", "--data", "/nonexistent/file"],
     "backend='triton' cannot run the lstm on cpu"),
    (["--backend", "lstm=cuda", "--data", "/nonexistent/file", "--device", "cpu"],
     "backend='cuda' cannot run the lstm on cpu"),
]  # fmt: skip


@pytest.mark.parametrize("args, match", BAD_VALUES[:1] + BAD_VALUES[5:7])
def test_bad_values_are_one_line_and_exit_2(tmp_path, args, match):
    """As a user runs them (a process of its own, Triton not interpreted)."""
    proc = _command("train", args + ["--save", ""], tmp_path)
    assert match in _one_line_error(proc)


@pytest.mark.parametrize("args, match", BAD_VALUES)
def test_bad_values_in_process(capsys, monkeypatch, args, match):
    """Every case, in this process (fast); the interpreter is off as in a user's shell."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    try:
        code = train.main(args + ["--save", ""])
    except SystemExit as exc:  # the parser's own errors exit from parse_args
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert match in err


@pytest.mark.parametrize(
    "args, match",
    [
        (["--temperature", "0"], "--temperature must lie in (0, inf); got 0.0"),
        (["--top-k", "0"], "--top-k must lie in [1, 256]; got 0"),
        (["--segment-len", "0"], "--segment-len must lie in [1, inf); got 0"),
    ],
)
def test_generate_flags_are_named_as_flags(capsys, args, match):
    from sha_rnn_kernels import generate

    assert generate.main(["--prompt", "x", "--checkpoint", "unused.pt", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines() == [f"sha-rnn-generate: error: {match}"]


# ---- 2: running the README's command twice keeps the first model ------------------------------


def test_an_existing_checkpoint_is_not_replaced(corpus, tmp_path, capsys):
    ckpt = tmp_path / "checkpoints" / "model.pt"
    run = TINY + ["--data", corpus, "--save", str(ckpt), "--quiet"]
    assert train.main(run + ["--max-steps", "2"]) == 0
    before = ckpt.read_bytes()
    # The same command again, as a user runs it: refused in one line, the model kept.
    line = _one_line_error(_command("train", run + ["--max-steps", "2"], tmp_path))
    assert f"--save {ckpt} exists" in line and f"--resume {ckpt}" in line
    assert "--overwrite" in line
    # An untrained --max-steps 0 run, and --save naming a file other than the one resumed.
    other = tmp_path / "other.pt"
    other.write_bytes(before)
    for argv in (run + ["--max-steps", "0"], ["--resume", str(other), "--save", str(ckpt)]):
        assert train.main(argv) == 2
        err = capsys.readouterr().err
        assert f"--save {ckpt} exists" in err and len(err.strip().splitlines()) == 1
    assert ckpt.read_bytes() == before
    assert not (tmp_path / "checkpoints" / "model.pt.lock").exists()
    # Resuming the file itself updates it; --overwrite replaces it on purpose.
    assert train.main(["--resume", str(ckpt), "--max-steps", "3", "--quiet"]) == 0
    assert train.load_checkpoint(str(ckpt))["step"] == 3
    assert train.main(run + ["--max-steps", "1", "--overwrite"]) == 0
    assert train.load_checkpoint(str(ckpt))["step"] == 1


def test_an_existing_pretrained_folder_is_not_replaced(corpus, tmp_path, capsys):
    """--save-pretrained (train) and OUTDIR (export) keep a model already in the folder."""
    from sha_rnn_kernels import export

    folder, ckpt = tmp_path / "shared", tmp_path / "model.pt"
    run = TINY + ["--data", corpus, "--quiet", "--max-steps", "1", "--save-pretrained", str(folder)]
    assert train.main(run + ["--save", str(ckpt)]) == 0
    weights = (folder / "model.safetensors").read_bytes()
    # Refused before training, whatever --save says, and the folder's model kept.
    assert train.main(run + ["--save", ""]) == 2
    err = capsys.readouterr().err
    assert f"--save-pretrained {folder} already holds a model" in err, err
    assert len(err.strip().splitlines()) == 1 and "--overwrite" in err
    assert export.main([str(ckpt), str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"OUTDIR {folder} already holds a model" in err and "Traceback" not in err
    assert (folder / "model.safetensors").read_bytes() == weights
    # --overwrite replaces it on purpose.
    assert export.main([str(ckpt), str(folder), "--overwrite"]) == 0
    assert train.main(run + ["--save", "", "--overwrite"]) == 0


# ---- 1: one CPU thread by default on the CPU --------------------------------------------------


def test_cpu_runs_default_to_one_thread(corpus, capsys):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert cli.threads_for(None, cpu) == cli.DEFAULT_CPU_THREADS == 1
    assert cli.threads_for(3, cpu) == 3 and cli.threads_for(None, cuda) is None
    seen = []
    before = torch.get_num_threads()
    result = train.run(
        TINY + ["--data", corpus, "--max-steps", "1", "--save", "", "--device", "cpu"],
        step_callback=lambda step, loss: seen.append(torch.get_num_threads()),
    )
    assert result.step == 1 and seen == [1]
    assert torch.get_num_threads() == before  # restored after the run
    assert ", 1 CPU thread (--threads)" in capsys.readouterr().out
    argv = TINY + ["--data", corpus, "--max-steps", "1", "--save", "", "--threads", "2"]
    train.run(argv, step_callback=lambda step, loss: seen.append(torch.get_num_threads()))
    assert seen == [1, 2]


# ---- 10: honest lengths and help texts --------------------------------------------------------


def test_epoch_length_is_an_estimate_and_help_texts_are_single(corpus, capsys):
    train.run(TINY + ["--data", corpus, "--log-interval", "10", "--save", ""])
    out = capsys.readouterr().out
    length = [line for line in out.splitlines() if line.startswith("length:")][0]
    estimate = int(length.split("about ")[1].split()[0])
    last = [line for line in out.splitlines() if "end of epoch 1" in line][0]
    steps = int(last.split("| step ")[1].split()[0])
    assert f"/~{estimate} |" in out  # step lines say the total is approximate
    assert abs(steps - estimate) <= max(2, steps // 10), (steps, estimate)

    from sha_rnn_kernels import evaluate, generate

    for parser in (evaluate.build_parser(), generate.build_parser(), train.build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.help:
                text = formatter._get_help_string(action)
                assert "(default: None)" not in text and text.count("default:") <= 1, text
    assert "~2 min" not in train.build_parser().format_help()


# ---- 11: a progress bar in a pseudo-terminal --------------------------------------------------


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_progress_shows_in_a_pseudo_terminal(corpus, tmp_path):
    """A pseudo-terminal with no size (as `script` and many CI runners make) reports 0 x 0;
    the bar must still show while the run trains, before its end lines."""
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sha_rnn_kernels.train", *TINY, "--data", corpus,
         "--max-steps", "20", "--save", "", "--log-interval", "5"],
        stdin=follower, stdout=follower, stderr=follower, cwd=tmp_path,
        env=_env(COLUMNS="", LINES=""),
    )  # fmt: skip
    os.close(follower)
    chunks, deadline = [], time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            data = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    assert proc.wait(timeout=60) == 0
    out = b"".join(chunks).decode("utf-8", "replace")
    end = out.index("| end |")
    bar = out[:end]
    # Drawn before the first step (0/20) and brought up to date by the last (20/20), before the
    # end lines; between, tqdm redraws at most every 0.5 s, so how often depends on the speed.
    start, done = bar.find("| 0/20 ["), bar.find("| 20/20 [")
    assert "train:" in bar and 0 <= start < done, out
    assert "Traceback" not in out


# ---- 5: SHARNN(batch_first=True) --------------------------------------------------------------


def test_sharnn_batch_first_matches_time_major():
    torch.manual_seed(0)
    kwargs = dict(ninp=16, nhid=32, nlayers=2, max_positions=24, dropout=0.0, dropouth=0.0,
                  dropouti=0.0)  # fmt: skip
    time_major = SHARNN(50, **kwargs).double()
    batch_first = SHARNN(50, batch_first=True, **kwargs).double()
    batch_first.load_state_dict(time_major.state_dict())
    x = torch.randint(0, 50, (9, 3))  # [T, B]
    logits, hidden, mems = time_major.logits(x[:-1])
    logits_bf, hidden_bf, mems_bf = batch_first.logits(x[:-1].t())
    assert logits_bf.shape == (3, 8, 50)
    torch.testing.assert_close(logits_bf, logits.transpose(0, 1), rtol=0, atol=1e-12)
    assert mems_bf[0].shape == (3, 8, 16) and mems_bf[1] is None  # [B, M, E]
    for state, state_bf in zip(hidden, hidden_bf):
        for t, t_bf in zip(state, state_bf):
            assert t_bf.shape == (1, 3, 16)  # as torch.nn.LSTM's, whatever the layout
            torch.testing.assert_close(t_bf, t, rtol=0, atol=1e-12)
    # The next segment carries the state and the memory in the batch-first layout.
    loss, _, _ = time_major.loss(x[1:], x[1:].flip(0), hidden, mems)
    loss_bf, _, mems2 = batch_first.loss(x[1:].t(), x[1:].flip(0).t(), hidden_bf, mems_bf)
    # loss() reduces in float32 (logits.float()), in another order for the other layout.
    torch.testing.assert_close(loss_bf, loss, rtol=0, atol=1e-6)
    assert mems2[0].shape == (3, 16, 16)
    with pytest.raises(ValueError, match=r"x must be a \[B, T\] tensor"):
        batch_first(x[:, 0])
    g = torch.Generator().manual_seed(1)
    ids = list(batch_first.generate([1, 2, 3], 4, generator=g, segment_len=2))
    g = torch.Generator().manual_seed(1)
    assert ids == list(time_major.generate([1, 2, 3], 4, generator=g, segment_len=2))


# ---- 9: messages that name what the user passed -----------------------------------------------


def test_messages_name_the_callers_mistake():
    lstm = LSTM(8, 16)
    with pytest.raises(ValueError, match=r"I = input_size = 8: its last dimension must be 8; "
                                         r"got \[5, 2, 9\]"):  # fmt: skip
        lstm(torch.randn(5, 2, 9))
    h0 = torch.zeros(1, 5, 16)
    with pytest.raises(ValueError, match=r"h0\) must be \[1, B, H\] = \[1, 4, 16\] .*"
                                         r"got \[1, 5, 16\]"):  # fmt: skip
        lstm(torch.randn(3, 4, 8), (h0, h0))
    model = SHARNN(256, ninp=16, nhid=32, nlayers=2, max_positions=24)
    x = torch.randint(0, 256, (6, 2))
    targets = x.clone()
    targets[2, 1] = 300
    with pytest.raises(ValueError, match=r"targets holds token id 300 outside the vocabulary"):
        model.loss(x, targets)
    with pytest.raises(TypeError, match="targets must hold integer token ids"):
        model.loss(x, targets.float())
    import sha_rnn_kernels.functional as SF

    w_ih, w_hh = torch.randn(64, 8), torch.randn(64, 16)
    with pytest.raises(ValueError, match=r"x's last dimension \(the input size\) is 9 but "
                                         r"weight_ih is \[64, 8\]"):  # fmt: skip
        SF.lstm(torch.randn(3, 2, 9), w_ih, w_hh)
