"""The trainer's fast defaults: the dtype it picks, ``--compile``, and how the blocks keep the
residual stream and the attention memory in the autocast dtype (one cast of the memory at most)."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sha_rnn_kernels import SHARNN, SHALayer, SingleHeadAttention, train

TEXT = b"the quick brown fox jumps over the lazy dog; pack my box with five dozen jugs.\n"
TINY = [
    "--emsize", "32", "--nhid", "64", "--nlayers", "2", "--bptt", "16",
    "--max-positions", "48", "--batch-size", "4", "--eval-batch-size", "4",
    "--warmup", "5", "--lr", "1e-2", "--log-interval", "1", "--threads", "1", "--quiet",
    "--save", "", "--eval-interval", "0",
]  # fmt: skip


def test_dtype_default_is_bf16_on_cuda_and_fp32_elsewhere():
    assert train.BASE_CONFIG["dtype"] == "auto"
    assert train.resolve_dtype("auto", torch.device("cuda", 0)) == "bf16"
    assert train.resolve_dtype("auto", torch.device("cpu")) == "fp32"
    for name in ("fp32", "bf16", "fp16"):
        assert train.resolve_dtype(name, torch.device("cuda", 0)) == name
    args = train.build_parser().parse_args(["--compile"])
    assert train.resolve_config(args)["compile"] is True
    assert train.resolve_config(train.build_parser().parse_args([]))["compile"] is False


def _train_compiled(tmp_path, backend):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(TEXT * 12)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        result = train.run(
            TINY + ["--data", str(corpus), "--max-steps", "2", "--compile", "--backend", backend]
        )
        assert len(result.train_losses) == 2
        assert all(math.isfinite(x) for x in result.train_losses), result.train_losses
        # The step really ran through Dynamo (a graph was captured), not eagerly.
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_compile_flag_traces_the_training_step(tmp_path, monkeypatch, backend):
    # Dynamo and AOTAutograd trace the forward and backward through the library's ops; code
    # generation is left out (Inductor on CPU takes minutes here; the slow test below runs it).
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: compile_(model, backend="aot_eager"))
    _train_compiled(tmp_path, backend)


@pytest.mark.slow
def test_compile_flag_trains_with_inductor(tmp_path):
    # 0.5 to 2.5 minutes on a 2-core CPU (Inductor builds C++; faster with a warm cache).
    _train_compiled(tmp_path, "torch")


class _CastsOf(TorchDispatchMode):
    """Counts ``aten._to_copy`` (dtype casts) of tensors whose first dimension is in ``lengths``."""

    def __init__(self, lengths):
        super().__init__()
        self.lengths = set(lengths)
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0].shape[0] in self.lengths:
            self.casts += 1
        return func(*args, **(kwargs or {}))


def test_layer_keeps_compute_dtype_and_casts_the_memory_once():
    torch.manual_seed(0)
    steps, batch, width, memory_len = 5, 3, 24, 11
    layer = SHALayer(width, 40, use_attn=True, dropout=0.1, max_positions=64, backend="reference")
    h = torch.randn(steps, batch, width)
    memory_fp32 = torch.randn(memory_len, batch, width)
    lengths = (memory_len, memory_len + steps)  # the memory, and memory plus segment
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # An incoming float32 memory is cast once (not once for the keys and once for the values).
        with _CastsOf(lengths) as counter:
            out, memory, _ = layer(h, memory_fp32)
        assert counter.casts == 1, counter.casts
        assert out.dtype == torch.bfloat16 and memory.dtype == torch.bfloat16
        assert memory.shape == (memory_len + steps, batch, width)
        # The memory a step returns is already in the compute dtype: the next step casts nothing.
        with _CastsOf((memory.shape[0], memory.shape[0] + steps)) as counter:
            out, memory2, _ = layer(out, memory)
        assert counter.casts == 0, counter.casts
        assert out.dtype == torch.bfloat16 and memory2.dtype == torch.bfloat16
    # Without autocast nothing changes: float32 in, float32 out.
    out, memory, _ = layer(h, memory_fp32)
    assert out.dtype == torch.float32 and memory.dtype == torch.float32


def test_attention_casts_a_shared_key_and_value_once():
    torch.manual_seed(0)
    attn = SingleHeadAttention(24, backend="reference")
    query, memory = torch.randn(5, 3, 24), torch.randn(11, 3, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with _CastsOf((11,)) as counter:
            out = attn(query, memory, memory)
        assert counter.casts == 1, counter.casts
        with _CastsOf((11,)) as counter:
            attn(query, memory, memory.clone())  # two tensors: two casts
        assert counter.casts == 2, counter.casts
    assert out.dtype == torch.bfloat16


def test_autocast_block_matches_float32_within_bf16_tolerance():
    torch.manual_seed(0)
    layer = SHALayer(40, 130, use_attn=True, max_positions=64, backend="reference").eval()
    h, memory = torch.randn(7, 2, 40), torch.randn(13, 2, 40)
    for p in layer.attn.parameters():  # non-zero gates, so the attention path matters
        p.data.add_(0.3 * torch.randn_like(p))
    expected, expected_memory, _ = layer.double()(h.double(), memory.double())
    layer.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, out_memory, _ = layer(h, memory)
    # The same block run in bf16 outright bounds the error an autocast run may have.
    twin = SHALayer(40, 130, use_attn=True, max_positions=64, backend="reference").eval()
    twin.load_state_dict(layer.state_dict())
    twin.bfloat16()
    low, _, _ = twin(h.bfloat16(), memory.bfloat16())
    low_err = (low.double() - expected).abs().max().item()
    err = (out.double() - expected).abs()
    worst = int(err.argmax())
    assert err.max().item() <= 2 * low_err + 5e-2, (
        f"worst at flat index {worst}: {out.flatten()[worst].item()} vs "
        f"{expected.flatten()[worst].item()} (bf16 run's error {low_err})"
    )
    torch.testing.assert_close(out_memory.double(), expected_memory, rtol=0, atol=2 * 2**-8 * 8)


def test_block_stays_in_compute_dtype_under_cuda_layer_norm_policy(monkeypatch):
    # CUDA autocast runs LayerNorm in float32 and returns float32 (CPU autocast keeps bf16).
    # Emulate that policy on the CPU: the block must still keep its stream and memory in bf16.
    layer_norm = torch.nn.LayerNorm.forward
    monkeypatch.setattr(torch.nn.LayerNorm, "forward", lambda self, x: layer_norm(self, x).float())
    torch.manual_seed(0)
    layer = SHALayer(24, 40, use_attn=True, max_positions=64, backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, memory, _ = layer(torch.randn(5, 3, 24), torch.randn(11, 3, 24))
        out, memory, _ = layer(out, memory)
    assert out.dtype == torch.bfloat16 and memory.dtype == torch.bfloat16


def test_model_memory_stays_in_compute_dtype():
    torch.manual_seed(0)
    model = SHARNN(50, ninp=16, nhid=32, nlayers=2, max_positions=20, backend="reference")
    x = torch.randint(0, 50, (6, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, hidden, mems = model.loss(x, x)
        loss, hidden, mems = model.loss(x, x, hidden, mems)
    assert mems[0].dtype == torch.bfloat16 and mems[1] is None
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
