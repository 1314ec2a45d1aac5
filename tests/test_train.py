"""The training command: a smoke run, exact resume (also after Ctrl-C / SIGTERM), DDP on gloo,
atomic checkpoints and the settings' layering. Tiny models on a tiny repetitive corpus."""

import math
import os
import signal
import socket

import pytest
import torch
import torch.multiprocessing as mp

from sha_rnn_kernels import train

TEXT = b"the quick brown fox jumps over the lazy dog; pack my box with five dozen jugs.\n"

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
    assert (paper["final_epochs"], paper["final_lr"], paper["max_positions"]) == (5, 1e-3, 5000)

    override = train.resolve_config(parse(["--preset", "enwik8", "--bptt", "512"]))
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
