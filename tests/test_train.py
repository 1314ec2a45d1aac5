"""The training command: a smoke run, exact resume (also after Ctrl-C / SIGTERM), DDP on gloo,
atomic checkpoints and the settings' layering. Tiny models on a tiny repetitive corpus."""

import math
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from sha_rnn_kernels import train
from sha_rnn_kernels.testing import SAMPLE_TEXT

TEXT = SAMPLE_TEXT

# A 2-block model (attention in block 0), 4 columns of 16 bytes: tens of milliseconds a step.
TINY = [
    "--emsize", "32", "--nhid", "64", "--nlayers", "2", "--bptt", "16",
    "--max-positions", "48", "--batch-size", "4", "--eval-batch-size", "4",
    "--warmup", "5", "--lr", "1e-2", "--log-interval", "1", "--threads", "1", "--quiet",
]  # fmt: skip


@pytest.fixture
def corpus(tmp_path):
    """About 4 KB: 800 training rows of 4 columns, a few validation segments."""
    path = tmp_path / "corpus.txt"
    path.write_bytes(TEXT * 50)
    return str(path)


@pytest.fixture
def small_corpus(tmp_path):
    """About 800 bytes: an epoch is ~12 steps, so short runs cross epoch boundaries."""
    path = tmp_path / "small.txt"
    path.write_bytes(TEXT * 10)
    return str(path)


def params_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key}: max diff {(a[key] - b[key]).abs().max()}"


def test_smoke_loss_falls(corpus, tmp_path):
    ckpt = tmp_path / "smoke.pt"
    result = train.run(
        TINY + ["--data", corpus, "--max-steps", "30", "--eval-interval", "15", "--save", str(ckpt)]
    )
    losses = result.train_losses
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > math.log(256) - 0.5  # starts near uniform over bytes
    assert last < first - 1.0, (first, last)
    steps = [s for s, _ in result.valid_bpc]
    assert steps == [15, 30]
    assert result.valid_bpc[1][1] < result.valid_bpc[0][1] < 8.0
    assert result.test_bpc is not None and math.isfinite(result.test_bpc)
    assert ckpt.exists() and result.checkpoint == str(ckpt)
    saved = train.load_checkpoint(str(ckpt))
    assert saved["step"] == 30 and saved["config"]["bptt"] == 16
    assert [tuple(h.shape) for h in saved["hidden"][0]] == [(1, 4, 32), (1, 4, 32)]
    assert saved["mems"][0].shape[1:] == (4, 32) and saved["mems"][1] is None


@pytest.mark.parametrize("split_at", [5, 12])
def test_resume_gives_identical_losses(small_corpus, tmp_path, split_at):
    # Dropout is on, the state is reset at random, and 20 steps cross an epoch boundary (~12
    # steps an epoch), so the data position, every RNG and the carried state must all be restored.
    args = TINY + ["--data", small_corpus, "--epochs", "3", "--reset-prob", "0.2",
                   "--eval-interval", "4"]  # fmt: skip
    whole = train.run(args + ["--max-steps", "20", "--save", ""])
    assert whole.epoch >= 1, "the run should cross an epoch boundary"

    ckpt = str(tmp_path / "part.pt")
    first = train.run(args + ["--max-steps", str(split_at), "--save", ckpt])
    assert first.step == split_at
    # Unset flags come from the checkpoint; --max-steps given here overrides it.
    second = train.run(["--resume", ckpt, "--max-steps", "20", "--quiet", "--threads", "1"])
    assert second.start_step == split_at and second.step == 20
    assert first.train_losses + second.train_losses == whole.train_losses
    assert_same_params(params_of(second.model), params_of(whole.model))
    assert second.config["reset_prob"] == 0.2 and second.config["save"] == ckpt


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_then_resume_continues(corpus, tmp_path, signum):
    args = TINY + ["--data", corpus, "--eval-interval", "0"]
    whole = train.run(args + ["--max-steps", "9", "--save", ""])

    def interrupt(step, loss):
        if step == 4:
            signal.raise_signal(signum)

    ckpt = str(tmp_path / "interrupted.pt")
    stopped = train.run(args + ["--max-steps", "9", "--save", ckpt], step_callback=interrupt)
    assert stopped.interrupted and stopped.step == 4 and stopped.test_bpc is None
    assert train.load_checkpoint(ckpt)["step"] == 4
    # The handlers are restored once the run returns.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    resumed = train.run(["--resume", ckpt, "--quiet", "--threads", "1"])
    assert not resumed.interrupted and resumed.step == 9
    assert stopped.train_losses + resumed.train_losses == whole.train_losses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world_size, port, argv, out_dir):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
    )  # fmt: skip
    result = train.run(argv)
    torch.save(
        {"params": params_of(result.model), "losses": result.train_losses,
         "valid": result.valid_bpc, "checkpoint": result.checkpoint},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )  # fmt: skip


@pytest.mark.slow
def test_ddp_gloo_two_ranks_stay_identical(corpus, tmp_path):
    ckpt = str(tmp_path / "ddp.pt")
    argv = TINY + ["--data", corpus, "--max-steps", "6", "--eval-interval", "3", "--save", ckpt,
                   "--device", "cpu"]  # fmt: skip
    mp.spawn(_ddp_worker, args=(2, _free_port(), argv, str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert_same_params(rank0["params"], rank1["params"])
    # Each rank trained on its own two columns: different losses, but the same evaluation
    # (summed over both ranks' columns).
    assert len(rank0["losses"]) == 6 and rank0["losses"] != rank1["losses"]
    assert rank0["valid"] == rank1["valid"] and len(rank0["valid"]) == 2
    assert rank0["checkpoint"] == ckpt and rank1["checkpoint"] is None
    saved = train.load_checkpoint(ckpt)
    assert saved["world_size"] == 2 and saved["step"] == 6
    # The saved LSTM state and memory hold both ranks' columns (the full batch of 4).
    assert saved["hidden"][0][0].shape == (1, 4, 32) and saved["mems"][0].shape[1] == 4
    assert_same_params(saved["model"], rank0["params"])


def test_bf16_autocast_trains(corpus):
    result = train.run(TINY + ["--data", corpus, "--max-steps", "6", "--dtype", "bf16",
                               "--eval-interval", "0", "--save", ""])  # fmt: skip
    assert len(result.train_losses) == 6 and all(math.isfinite(x) for x in result.train_losses)
    assert math.isfinite(result.valid_bpc[-1][1])


def test_default_corpus_end_to_end():
    # The stdlib corpus with no --data, cut short: main() returns 0 and saves nothing.
    argv = TINY + ["--max-bytes", "20000", "--max-steps", "2", "--save", ""]
    assert train.main(argv) == 0


def test_atomic_save_keeps_old_checkpoint_on_failure(tmp_path):
    path = str(tmp_path / "ck.pt")
    train.save_checkpoint(path, {"format": train.CHECKPOINT_FORMAT, "step": 1})
    with pytest.raises(Exception):  # noqa: B017 - whatever pickle raises for a lambda
        train.save_checkpoint(path, {"format": train.CHECKPOINT_FORMAT, "bad": lambda: 0})
    assert train.load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["ck.pt"]  # no temporary file left behind


def test_load_rejects_foreign_file(tmp_path):
    path = str(tmp_path / "weights.pt")
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not a sha_rnn_kernels training checkpoint"):
        train.load_checkpoint(path)


def test_config_layers():
    parse = train.build_parser().parse_args
    default = train.resolve_config(parse([]))
    assert default["preset"] == "default" and default["data"] is None
    assert default["emsize"] == 128 and default["max_steps"] == 600
    # The paper's recipe is kept where the default preset does not change it.
    assert (default["min_trust"], default["clip"], default["wdecay"]) == (0.25, 0.25, 1.2e-6)

    paper = train.resolve_config(parse(["--data", "/data/enwik8.zip"]))
    assert paper["preset"] == "enwik8"
    shape = (paper["emsize"], paper["nhid"], paper["nlayers"], paper["bptt"])
    assert shape == (1024, 4096, 4, 1024)
    assert (paper["lr"], paper["warmup"], paper["batch_size"], paper["epochs"]) == (
        2e-3, 800, 16, 32,
    )  # fmt: skip
    # Phase 1 only, as the original's first command; phase 2 is its own run (test_presets.py).
    assert (paper["final_epochs"], paper["max_positions"], paper["seed"]) == (0, 5000, 5512)

    override = train.resolve_config(
        parse(["--preset", "enwik8", "--data", "enwik8.zip", "--bptt", "512"])
    )
    assert override["bptt"] == 512 and override["emsize"] == 1024

    # On resume the checkpoint's settings fill what the command line leaves out, except the
    # machine's own (device, threads).
    saved = dict(default, bptt=32, device="cuda", threads=3)
    resumed = train.resolve_config(parse(["--resume", "x.pt", "--lr", "1e-3"]), saved)
    assert (resumed["bptt"], resumed["lr"], resumed["device"], resumed["threads"]) == (
        32, 1e-3, None, None,
    )  # fmt: skip


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--bptt", "400"], "exceeds --max-positions"),
        (["--emsize", "0"], "--emsize must be >= 1"),
        (["--reset-prob", "2"], "--reset-prob"),
        (["--epochs", "0", "--final-epochs", "0"], "at least 1"),
    ],
)
def test_config_rejects_bad_values(argv, match):
    with pytest.raises(ValueError, match=match):
        train.resolve_config(train.build_parser().parse_args(argv))


def test_learning_rate_schedule():
    config = dict(lr=2e-3, warmup=800, epochs=32, final_lr=1e-3)
    assert train.learning_rate(config, 1, 0) == pytest.approx(2e-3 / 800)
    assert train.learning_rate(config, 400, 0) == pytest.approx(1e-3)
    assert train.learning_rate(config, 800, 0) == train.learning_rate(config, 5000, 3) == 2e-3
    assert train.learning_rate(config, 200_000, 32) == 1e-3
    assert train.learning_rate(dict(config, warmup=0), 1, 0) == 2e-3


# ---- what a new user runs into ----------------------------------------------------------------


def _error_line(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sha-rnn-train: error: "), err
    return lines[0]


@pytest.mark.parametrize(
    "make, extra, match",
    [
        (None, [], r"--data .*missing.txt: no such file"),
        (b"", [], r"--data .*f.txt: the file is empty"),
        (b"abc" * 10, [], r"--data .*f.txt: a corpus needs at least 40 bytes"),
        # 1000 bytes: 50 of valid cannot fill 16 x 2+ rows.
        (TEXT * 13, ["--eval-batch-size", "32"],
         r"the valid split of f.txt holds 51 bytes, too few for --eval-batch-size 32 .*"
         r"lower --eval-batch-size to at most 25"),
        (TEXT * 13, ["--batch-size", "400"],
         r"the train split .* --batch-size 400 .*lower --batch-size"),
    ],
)  # fmt: skip
def test_bad_data_is_one_line_and_exit_2(tmp_path, capsys, make, extra, match):
    path = tmp_path / ("missing.txt" if make is None else "f.txt")
    if make is not None:
        path.write_bytes(make)
    argv = TINY + ["--data", str(path), "--max-steps", "1", "--save", ""] + extra
    assert train.main(argv) == 2
    assert re.search(match, _error_line(capsys))


def test_bad_resume_and_save_are_one_line_and_exit_2(corpus, tmp_path, capsys):
    garbage = tmp_path / "notes.pt"
    garbage.write_bytes(b"these are not the weights you are looking for")
    assert train.main(["--resume", str(garbage)]) == 2
    assert "not a sha_rnn_kernels training checkpoint" in _error_line(capsys)
    assert train.main(["--resume", str(tmp_path / "nope.pt")]) == 2
    assert "no such file" in _error_line(capsys)
    # --save under a path whose parent is a file: found before any training.
    blocker = tmp_path / "file"
    blocker.write_bytes(b"x")
    argv = TINY + ["--data", corpus, "--max-steps", "1", "--save", str(blocker / "ck.pt")]
    assert train.main(argv) == 2
    line = _error_line(capsys)
    assert "--save" in line and "cannot write there" in line

    ckpt = str(tmp_path / "ck.pt")
    assert train.main(TINY + ["--data", corpus, "--max-steps", "1", "--save", ckpt]) == 0
    capsys.readouterr()
    assert train.main(["--resume", ckpt, "--emsize", "64"]) == 2
    assert "--emsize 64 differs from the checkpoint's 32" in _error_line(capsys)


def test_a_user_file_is_read_whole_and_logged_plainly(corpus, capsys):
    parse = train.build_parser().parse_args
    config = train.resolve_config(parse(["--data", corpus]))
    assert config["preset"] == "default" and config["max_bytes"] is None
    assert config["max_steps"] is None  # full epochs, not the built-in corpus's 600 steps
    assert train.resolve_config(parse(["--data", corpus, "--max-bytes", "99"]))["max_bytes"] == 99

    argv = [a for a in TINY if a != "--quiet"]
    argv += ["--data", corpus, "--max-steps", "4", "--log-interval", "2", "--eval-interval", "0",
             "--save", ""]  # fmt: skip
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert "read all 3,950 bytes; split 3,556 train / 197 valid / 197 test bytes" in out
    assert "length: 4 steps (--max-steps 4" in out  # exact: fewer than an epoch
    # stdout is not a terminal here: one plain line per log interval, no progress bar.
    assert "\r" not in out
    steps = re.findall(r"^\| step (\d+)/4 \| loss [\d.]+ \| bpc [\d.]+ \| lr ", out, re.M)
    assert steps == ["2", "4"]


def test_help_shows_each_presets_defaults():
    text = " ".join(train.build_parser().format_help().split())
    assert "(default: None)" not in text
    assert "model width E (default: 128; enwik8: 1024)" in text
    assert "--bptt BPTT segment length (jittered) (default: 64; enwik8: 1024)" in text
    assert "(default: checkpoints/sha-rnn-default.pt; enwik8: checkpoints/sha-rnn-enwik8.pt)" in (
        text
    )
    assert "all of a --data file" in text


def test_diverged_run_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path, capsys):
    ckpt = str(tmp_path / "ck.pt")
    assert train.main(TINY + ["--data", corpus, "--max-steps", "3", "--save", ckpt]) == 0
    # Resumed at an absurd learning rate the weights blow up and the loss becomes NaN; a
    # checkpoint is due after every step, but none may hold non-finite weights.
    argv = ["--resume", ckpt, "--lr", "1e10", "--warmup", "0", "--max-steps", "40",
            "--save-interval", "1", "--quiet", "--threads", "1"]  # fmt: skip
    capsys.readouterr()
    assert train.main(argv) == 3
    err = capsys.readouterr().err
    kept = train.load_checkpoint(ckpt)
    assert all(bool(torch.isfinite(v).all()) for v in kept["model"].values())
    stopped = int(re.search(r"not finite by step (\d+)", err).group(1))
    assert 3 <= kept["step"] < stopped < 40
    assert "training diverged" in err
    assert f"last checkpoint {ckpt} (step {kept['step']}) is kept" in err
    result = train.run(argv)  # from the kept checkpoint: diverges again, reported in the result
    assert result.diverged and result.step < 40 and not math.isfinite(result.train_losses[-1])
    assert train.load_checkpoint(ckpt)["step"] >= kept["step"]


def test_checkpoint_path_is_locked_and_overwriting_is_announced(corpus, tmp_path, capsys):
    ckpt = tmp_path / "ck.pt"
    lock = tmp_path / "ck.pt.lock"
    argv = [a for a in TINY if a != "--quiet"]
    argv += ["--data", corpus, "--max-steps", "1", "--eval-interval", "0", "--save", str(ckpt)]
    assert train.main(argv) == 0
    assert ckpt.exists() and not lock.exists()  # the lock goes with the run
    capsys.readouterr()

    # Another live process holds the lock: this run must not write the same file.
    lock.write_text(f"{os.getpid()}\n")
    assert train.main(argv) == 2
    line = _error_line(capsys)
    assert f"another run (pid {os.getpid()}) is writing this checkpoint" in line
    assert lock.exists()  # not ours to remove

    # A lock left by a process that has exited is taken over; replacing the checkpoint needs
    # --overwrite, and is announced.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock.write_text(f"{gone.pid}\n")
    assert train.main(argv + ["--overwrite"]) == 0
    out = capsys.readouterr().out
    assert f"took over the stale lock of pid {gone.pid}" in out
    assert f"{ckpt} exists; this run replaces it (--overwrite)" in out
    assert "replaced the earlier file" in out and not lock.exists()

    # Continuing the same file with --resume is not announced as replacing it.
    resume = ["--resume", str(ckpt), "--max-steps", "2", "--threads", "1"]
    assert train.main(resume) == 0
    out = capsys.readouterr().out
    assert "replace" not in out and f"checkpoint: {ckpt} (step 2)" in out


def test_a_backend_that_cannot_run_is_one_line(corpus, capsys):
    # The persistent CUDA LSTM cannot take CPU tensors: said in one line, exit status 2.
    argv = TINY + ["--data", corpus, "--max-steps", "1", "--save", "", "--backend", "cuda",
                   "--device", "cpu"]  # fmt: skip
    assert train.main(argv) == 2
    assert "backend='cuda' cannot run" in _error_line(capsys)


def test_console_scripts_name_callables():
    """setup.py's entry points (sha-rnn-train=sha_rnn_kernels.train:main, ...) resolve: moving a
    command's ``main`` (as the trainer's split into a package did) must keep its target."""
    import ast
    import importlib
    import pathlib

    setup = pathlib.Path(__file__).resolve().parent.parent / "setup.py"
    tree = ast.parse(setup.read_text())
    strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)]
    scripts = [s for s in strings if isinstance(s, str) and "=sha_rnn_kernels." in s]
    assert "sha-rnn-train=sha_rnn_kernels.train:main" in scripts, scripts
    for script in scripts:
        module, _, name = script.partition("=")[2].partition(":")
        assert callable(getattr(importlib.import_module(module), name)), script


def test_the_step_loop_reads_whole():
    """The trainer's step loop stays short enough to see on one screen."""
    import inspect

    from sha_rnn_kernels.train.loop import Trainer

    lines = len(inspect.getsource(Trainer.loop).splitlines())
    assert lines <= 80, f"Trainer.loop is {lines} lines: move a job into a method of its own"
