"""Generation from a checkpoint of the training command: reproducible sampling, the incremental
T=1 decode path against the whole context (float64, past the memory's truncation), what one
decode step does to the memory, top-k and temperature, and bad input at the API and the CLI."""

import math
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sha_rnn_kernels import SHARNN, train
from sha_rnn_kernels.evaluate import load_model
from sha_rnn_kernels.generate import Decoder, main, next_token_probs
from sha_rnn_kernels.testing import SAMPLE_TEXT, TINY_TRAIN_ARGS, checkpoint_path_for

TEXT, TINY = SAMPLE_TEXT, TINY_TRAIN_ARGS


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("generate")
    corpus = folder / "corpus.txt"
    corpus.write_bytes(TEXT * 40)
    path = folder / "tiny.pt"
    train.run(TINY + ["--data", str(corpus), "--max-steps", "12", "--save", str(path)])
    return str(path)


def run_cli(argv, capsysbinary):
    code = main(argv)
    out, err = capsysbinary.readouterr()
    return code, out, err.decode()


def whole_context_logits(model, ids, window):
    """Every position's logits from one pass over the whole context ``ids [T]``, written from
    the model's definition: query t attends to the keys ``t - window < s <= t`` (the last
    ``window`` positions, itself included), which is what streaming one byte at a time with a
    ``window``-key memory computes."""
    e = model.ninp
    h = model.encoder(ids.reshape(-1, 1))
    for block in model.blocks:
        h, _ = block.rnn(block.lnstart(h))
        if block.attn is not None:
            a = block.attn
            mh, h = block.lnmem(h), block.lnmid(h)
            q = torch.sigmoid(a.qs).reshape(e) * a.qln(a.q(h))
            k = mh * torch.sigmoid(a.ks).reshape(e)
            v = mh * a.value_gate()
            scores = torch.einsum("tbe,sbe->bts", q, k) / math.sqrt(e)
            t = torch.arange(len(ids))
            visible = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - window)
            scores = scores.masked_fill(~visible, float("-inf"))
            h = torch.einsum("bts,sbe->tbe", torch.softmax(scores, -1), v) + h
        h = block.ff(block.lnxff(h)) + block.lnff(h)
    return model.decoder(h[:, 0])


def assert_close(actual, expected, what, atol=1e-10, rtol=1e-10):
    diff = (actual - expected).abs()
    worst = int(diff.argmax())
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), (
        f"{what}: worst at flat index {worst}: {actual.flatten()[worst].item()} vs "
        f"{expected.flatten()[worst].item()} (max diff {diff.max().item():.3e})"
    )


def test_seed_gives_same_text_and_seeds_differ(checkpoint, capsysbinary):
    argv = ["--checkpoint", checkpoint, "--prompt", "the quick", "--length", "60", "--threads", "1"]
    code, first, err = run_cli(argv + ["--seed", "3"], capsysbinary)
    assert code == 0 and err == "" and len(first) == 60
    assert run_cli(argv + ["--seed", "3"], capsysbinary)[1] == first
    assert run_cli(argv + ["--seed", "4"], capsysbinary)[1] != first
    # The Python API draws the same bytes from the same seed.
    model, config = load_model(checkpoint)
    g = torch.Generator().manual_seed(3)
    tokens = model.generate(list(b"the quick"), 60, generator=g, segment_len=config["bptt"])
    assert bytes(tokens) == first


def test_prompt_file_and_raw_bytes(checkpoint, capsysbinary, tmp_path):
    # A prompt that is not UTF-8 and an output that need not be: bytes in, bytes out.
    prompt = tmp_path / "prompt.bin"
    prompt.write_bytes(b"\xff\xfe the lazy \x80")
    argv = ["--checkpoint", checkpoint, "--prompt-file", str(prompt), "--length", "40",
            "--seed", "1", "--temperature", "3.0"]  # fmt: skip
    code, out, err = run_cli(argv, capsysbinary)
    assert code == 0 and len(out) == 40, err
    model, config = load_model(checkpoint)
    g = torch.Generator().manual_seed(1)
    expected = model.generate(prompt.read_bytes(), 40, 3.0, None, g, config["bptt"])
    assert bytes(expected) == out


@pytest.mark.parametrize("window_reached", [False, True])
def test_incremental_steps_equal_whole_context(checkpoint, window_reached):
    # float64; 70 positions against a 48-key window (truncation reached) or a 96-key one (not).
    model, _ = load_model(checkpoint, dtype=torch.float64)
    window = 48 if window_reached else 96
    model.max_positions = window
    for block in model.blocks:
        block.max_positions = window
    ids = torch.tensor(list((TEXT * 2)[:70]))
    with torch.no_grad():
        expected = whole_context_logits(model, ids, window)
        decoder = Decoder(model)
        got = [decoder.prefill(ids[:1].reshape(1, 1), segment_len=16)]
        got += [decoder.step(ids[t : t + 1]) for t in range(1, len(ids))]
    got = torch.cat(got)
    assert_close(got.log_softmax(-1), expected.log_softmax(-1), "next-byte log-probs")
    if window_reached:
        # The window matters at these positions, so the test would see a wrong one.
        unlimited = whole_context_logits(model, ids, 10**6)
        assert (unlimited[-10:] - expected[-10:]).abs().max() > 1e-6


@pytest.mark.parametrize("batch", [1, 2])
def test_segmented_prompt_then_steps_equal_the_module_forward(checkpoint, batch):
    # A 40-byte prompt read in 16-byte segments, then T=1 steps past the 48-key window: the
    # decode path equals SHARNN.forward with the memory carried the ordinary way (cat and cut).
    model, _ = load_model(checkpoint, dtype=torch.float64)
    text = torch.tensor(list((TEXT * 2)[:100]))
    ids = torch.stack([text, text.flip(0)][:batch], 1)  # [100, batch]
    with torch.no_grad():
        decoder = Decoder(model, batch=batch)
        got = [decoder.prefill(ids[:40], segment_len=16)]
        got += [decoder.step(ids[t]) for t in range(40, 99)]
        hidden = mems = None
        expected = []
        for start in range(0, 40, 16):
            logits, hidden, mems = model.logits(ids[start : min(start + 16, 40)], hidden, mems)
        expected.append(logits[-1])
        for t in range(40, 99):
            logits, hidden, mems = model.logits(ids[t : t + 1], hidden, mems)
            expected.append(logits[-1])
    assert decoder.count[0] == 48  # the ring buffer is full and has wrapped
    assert_close(torch.cat(got), torch.cat(expected), "logits")


class MemoryOps(TorchDispatchMode):
    """Records the ops that do work proportional to the attention memory: every non-view op with
    an input holding at least half as many elements as the memory (the memory itself, a view of
    most of it, or a copy). Writing one key into it is not such work."""

    def __init__(self, memory: torch.Tensor):
        super().__init__()
        self.size = memory.numel() // 2
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not func.is_view:
            leaves = torch.utils._pytree.tree_leaves((args, kwargs))
            if any(isinstance(t, torch.Tensor) and t.numel() >= self.size for t in leaves):
                self.ops.append(str(func))
        return func(*args, **kwargs)


def test_a_step_works_on_the_memory_once():
    # 600 keys of width 32 (19200 elements): half of that is more than any weight (256 x 32),
    # so the size singles out the memory, its views and its copies.
    model = SHARNN(256, ninp=32, nhid=64, nlayers=3, max_positions=600).eval()
    ids = torch.randint(0, 256, (620, 1))
    with torch.no_grad():
        decoder = Decoder(model)
        decoder.prefill(ids[:600], segment_len=200)
        decoder.step(ids[600, :])  # the buffer is full: the next step overwrites in place
        with MemoryOps(decoder.rings[1]) as counter:
            decoder.step(ids[601, :])
    assert len(counter.ops) == 1, counter.ops
    # The module's own T=1 forward copies the memory (cat), gates its keys and values, ...
    with torch.no_grad():
        _, hidden, mems = model(ids[:600], None, None)
        with MemoryOps(mems[1]) as counter:
            model(ids[600:601], hidden, mems)
    assert len(counter.ops) >= 3, counter.ops


def test_top_k_one_is_greedy(checkpoint):
    model, config = load_model(checkpoint, dtype=torch.float64)
    prompt = list(b"pack my ")
    g = torch.Generator().manual_seed(0)
    tokens = list(model.generate(prompt, 30, top_k=1, generator=g, segment_len=16))
    with torch.no_grad():
        decoder = Decoder(model)
        logits = decoder.prefill(torch.tensor(prompt).reshape(-1, 1), 16)
        greedy = []
        for _ in range(30):
            greedy.append(int(logits[0].argmax()))
            logits = decoder.step(torch.tensor(greedy[-1:]))
    assert tokens == greedy


def test_temperature_and_top_k_distributions():
    torch.manual_seed(0)
    logits = torch.randn(3, 11, dtype=torch.float64)
    for temperature in (0.3, 1.0, 2.5):
        expected = torch.softmax(logits / temperature, -1)
        assert_close(next_token_probs(logits, temperature), expected, f"T={temperature}")
    probs = next_token_probs(logits, 0.7, top_k=4)
    top = logits.topk(4, -1).indices
    kept = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, top, True)
    assert torch.equal(probs > 0, kept)
    renormalised = torch.softmax(logits / 0.7, -1) * kept
    assert_close(probs, renormalised / renormalised.sum(-1, keepdim=True), "top-4")
    assert torch.equal(next_token_probs(logits, 1.0, top_k=11), next_token_probs(logits, 1.0))
    # Sampling follows the distribution: 4000 draws of a 3-way distribution at T = 2.
    three = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    draws = torch.multinomial(next_token_probs(three, 2.0), 4000, True, generator=g)
    freq = torch.bincount(draws, minlength=3).double() / 4000
    assert_close(freq, torch.softmax(three / 2.0, -1), "sampled frequencies", atol=0.03)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(prompt_ids=[]), ValueError, "prompt_ids is empty"),
        (dict(prompt_ids=b""), ValueError, "prompt_ids is empty"),
        (dict(prompt_ids=[1, 256]), ValueError, r"prompt_ids\[1\] = 256 is outside .*\[0, 256\)"),
        (dict(prompt_ids=torch.tensor([-1])), ValueError, r"prompt_ids\[0\] = -1"),
        (dict(prompt_ids=[1.5]), TypeError, r"prompt_ids\[0\] must be an int"),
        (dict(prompt_ids=torch.zeros(2, 2, dtype=torch.long)), ValueError, "1-D tensor"),
        (dict(length=0), ValueError, "length must be an int >= 1; got 0"),
        (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0; got 0.0"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(top_k=0), ValueError, r"top_k must be None or an int in \[1, 256\]; got 0"),
        (dict(top_k=257), ValueError, "top_k"),
        (dict(generator=0), TypeError, "generator must be a torch.Generator"),
        (dict(segment_len=49), ValueError, "segment_len"),
    ],
)
def test_api_rejects_bad_arguments(kwargs, error, match):
    model = SHARNN(256, ninp=8, nhid=16, nlayers=2, max_positions=48)
    args = dict(prompt_ids=[1, 2], length=3)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        model.generate(**args)  # checked at the call, before any iteration


def test_generation_leaves_mode_and_grad_alone(checkpoint):
    model, _ = load_model(checkpoint)
    model.train()
    tokens = model.generate([1, 2, 3], 5, generator=torch.Generator().manual_seed(0))
    first = next(tokens)
    assert torch.is_grad_enabled() and model.training  # between yields, as the caller left it
    assert len([first, *tokens]) == 5


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", "no such file"),
        ("plain_dict", "not a sha_rnn_kernels training checkpoint"),
        ("text_file", "not a sha_rnn_kernels training checkpoint"),
        ("empty_prompt", "the prompt is empty"),
        ("zero_length", "--length must be >= 1; got 0"),
        ("no_prompt", "--prompt TEXT or --prompt-file FILE"),
        ("bad_top_k", "--top-k must lie in [1, 256]; got 0"),
    ],
)
def test_cli_bad_input_is_one_line_and_status_2(checkpoint, tmp_path, capsysbinary, case, match):
    path = checkpoint_path_for(case, checkpoint, tmp_path)
    argv = ["--prompt", "abc", "--length", "5"]
    if case == "empty_prompt":
        argv = ["--prompt", "", "--length", "5"]
    elif case == "zero_length":
        argv = ["--prompt", "abc", "--length", "0"]
    elif case == "no_prompt":
        argv = ["--length", "5"]
    elif case == "bad_top_k":
        argv += ["--top-k", "0"]
    code, out, err = run_cli(["--checkpoint", path] + argv, capsysbinary)
    assert code == 2 and out == b""
    assert err.count("\n") == 1 and err.startswith("sha-rnn-generate: error: "), err
    assert match in err, err


def test_cli_process_exit_status(tmp_path):
    # The real entry point: status 2, one line, no traceback.
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    proc = subprocess.run(
        [sys.executable, "-m", "sha_rnn_kernels.generate", "--checkpoint", str(bad),
         "--prompt", "x"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_decode_attention_matches_the_reference_op(backend):
    # The decode step's attention (gates folded into q and the output; PyTorch's fused SDPA, or
    # the library's Triton kernel) against the reference op with gated keys and values.
    from sha_rnn_kernels import reference
    from sha_rnn_kernels._backend import triton_reason
    from sha_rnn_kernels.generate import _attend

    if backend == "triton" and triton_reason(torch.device("cpu")) is not None:
        pytest.skip("the Triton kernels need TRITON_INTERPRET=1 on the CPU")
    dtype = torch.float64 if backend == "reference" else torch.float32
    torch.manual_seed(1)
    attn = SHARNN(256, ninp=40, nhid=80, nlayers=2, backend=backend).blocks[0].attn
    q = torch.randn(2, 1, 40, dtype=dtype)
    ring = torch.randn(2, 20, 40, dtype=dtype)
    keys = ring[:, :13]  # a view of a part-filled ring buffer
    gk, gv = torch.rand(40, dtype=dtype), torch.randn(40, dtype=dtype)
    got = _attend(attn, q, keys, gk, gv)
    expected = reference.single_head_attention(
        *(t.double().transpose(0, 1) for t in (q, keys, keys)),
        key_gate=gk.double(),
        value_gate=gv.double(),
    ).transpose(0, 1)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_close(got.double(), expected, "attention", atol=tol, rtol=tol)


@pytest.mark.parametrize(
    "batch, key_len, width, dtype",
    [
        (1, 1, 40, torch.float32),  # one key
        (2, 13, 40, torch.float32),  # odd shapes, a part-filled ring
        (3, 301, 24, torch.float32),  # several key tiles per program, 4 programs to merge
        (1, 77, 130, torch.bfloat16),
    ],
)
def test_decode_kernel_matches_the_reference(batch, key_len, width, dtype):
    # The split-key Triton kernel (interpreted on the CPU) against the float64 reference with
    # gated keys and values; its buffers start as NaN (conftest), so an unwritten one fails.
    from sha_rnn_kernels import reference
    from sha_rnn_kernels._backend import triton_reason

    if triton_reason(torch.device("cpu")) is not None:
        pytest.skip("the Triton kernels need TRITON_INTERPRET=1 on the CPU")
    from sha_rnn_kernels.ops.decode import decode_attention

    torch.manual_seed(2)
    q = torch.randn(batch, width).to(dtype)
    ring = torch.randn(batch, key_len + 5, width).to(dtype)
    keys = ring[:, 2 : 2 + key_len]  # strided view
    gk, gv = torch.rand(width).to(dtype), torch.randn(width).to(dtype)
    got = decode_attention(q, keys, gk, gv)
    assert got.dtype == dtype and got.shape == (batch, width)
    expected = reference.single_head_attention(
        q.double().unsqueeze(0),
        keys.double().transpose(0, 1),
        keys.double().transpose(0, 1),
        key_gate=gk.double(),
        value_gate=gv.double(),
    )[0]
    # STYLE's rule: at most 2x the error of the same PyTorch code in the low precision, plus atol.
    low = reference.single_head_attention(
        q.unsqueeze(0), keys.transpose(0, 1), keys.transpose(0, 1), key_gate=gk, value_gate=gv
    )[0].double()
    bound = 2 * (low - expected).abs().max().item() + (1e-5 if dtype == torch.float32 else 5e-2)
    assert_close(got.double(), expected, f"decode {dtype}", atol=bound, rtol=0)
