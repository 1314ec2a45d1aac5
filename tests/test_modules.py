"""The modules against the model's definition (README.md, "The model"): names, init, the
block's and model's exact computation."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from sha_rnn_kernels import LSTM, SHARNN, Boom, SHALayer, SingleHeadAttention
from sha_rnn_kernels.testing import assert_parity

EPS = 1e-12


def spec_names(nlayers: int, attn_block: int) -> dict:
    """Every parameter name (and shape) of the original code, written out by hand."""
    V, E, Fh = 11, 8, 20
    names = {"encoder.weight": (V, E), "decoder.weight": (V, E), "decoder.bias": (V,)}
    for i in range(nlayers):
        p = f"blocks.{i}."
        names[p + "rnn.weight_ih_l0"] = (4 * E, E)
        names[p + "rnn.weight_hh_l0"] = (4 * E, E)
        names[p + "rnn.bias_ih_l0"] = (4 * E,)
        names[p + "rnn.bias_hh_l0"] = (4 * E,)
        names[p + "ff.linear1.weight"] = (Fh, E)
        names[p + "ff.linear1.bias"] = (Fh,)
        for ln in ("lnstart", "lnmid", "lnmem", "lnout", "lnff", "lnxff"):
            names[p + ln + ".weight"] = (E,)
            names[p + ln + ".bias"] = (E,)
        if i == attn_block:
            for g in ("qs", "ks", "vs", "r_gate"):
                names[p + "attn." + g] = (1, 1, E)
            names[p + "attn.qkvs"] = (1, 3, E)
            names[p + "attn.q.weight"] = (E, E)
            names[p + "attn.q.bias"] = (E,)
            names[p + "attn.qln.weight"] = (E,)
            names[p + "attn.qln.bias"] = (E,)
            names[p + "attn.vq.l1.weight"] = (2 * E, E)
            names[p + "attn.vq.l1.bias"] = (2 * E,)
    return names


def test_state_dict_of_the_original_loads_strict():
    names = spec_names(4, 2)
    state = {n: torch.randn(s) for n, s in names.items()}
    state["decoder.weight"] = state["encoder.weight"]
    model = SHARNN(11, ninp=8, nhid=20, nlayers=4)
    assert set(model.state_dict()) == set(names)
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.decoder.weight, state["encoder.weight"])
    assert model.decoder.weight is model.encoder.weight


def test_lstm_state_dict_moves_to_and_from_torch():
    ours, theirs = LSTM(5, 7), torch.nn.LSTM(5, 7)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(4, 3, 5)
    (a, (ha, ca)), (b, (hb, cb)) = ours(x), theirs(x)
    assert_parity("out", a.detach(), b.detach(), atol=2e-6)
    assert ha.shape == hb.shape == (1, 3, 7) and ca.shape == cb.shape
    theirs.load_state_dict(ours.state_dict(), strict=True)
    # unbatched input, batch_first
    u, (hu, _) = ours(x[:, 0])
    assert u.shape == (4, 7) and hu.shape == (1, 7)
    assert_parity("unbatched", u.detach(), a[:, 0].detach(), atol=1e-6)
    bf = LSTM(5, 7, batch_first=True)
    bf.load_state_dict(ours.state_dict())
    assert_parity("batch_first", bf(x.transpose(0, 1))[0].transpose(0, 1).detach(), a.detach())


def test_init_follows_the_spec():
    E = 64
    model = SHARNN(50, ninp=E, nhid=256, nlayers=4)
    std = 0.1 / math.sqrt(E)
    attn = model.blocks[2].attn
    for w in (model.encoder.weight, model.blocks[0].ff.linear1.weight, attn.q.weight,
              attn.vq.l1.weight):  # fmt: skip
        assert abs(w.std().item() - std) < 0.15 * std
    for b in (model.decoder.bias, model.blocks[1].ff.linear1.bias, attn.q.bias, attn.vq.l1.bias):
        assert torch.count_nonzero(b) == 0
    for g in (attn.qs, attn.ks, attn.vs):
        assert torch.count_nonzero(g) == 0
    ln = model.blocks[3].lnff
    assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0) and ln.eps == 1e-12
    bound = 1 / math.sqrt(E)
    w = model.blocks[0].rnn.weight_hh_l0
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound  # PyTorch's LSTM init
    assert [b.attn is not None for b in model.blocks] == [False, False, True, False]
    assert sum(p.numel() for p in SHARNN(205).parameters()) == 53_798_093


def test_parameter_count_of_the_paper_model():
    model = SHARNN(205)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 53.8
    model.blocks[2].attn.vq_collapse()
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 51.7


# ---- an independent float64 re-derivation of the model, from torch primitives only ----------
def ln(x, p, name):
    return F.layer_norm(x, x.shape[-1:], p[name + ".weight"], p[name + ".bias"], EPS)


def spec_lstm(x, p, prefix, state):
    H = p[prefix + "weight_hh_l0"].shape[1]
    h, c = (torch.zeros(x.shape[1], H, dtype=x.dtype),) * 2 if state is None else state
    outs = []
    for t in range(x.shape[0]):
        z = (x[t] @ p[prefix + "weight_ih_l0"].t() + p[prefix + "bias_ih_l0"]
             + h @ p[prefix + "weight_hh_l0"].t() + p[prefix + "bias_hh_l0"])  # fmt: skip
        i, f, g, o = z.chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs), (h, c)


def spec_block(h, p, i, mem, state, max_positions, has_attn):
    b = f"blocks.{i}."
    h = ln(h, p, b + "lnstart")
    h, new_state = spec_lstm(h, p, b + "rnn.", state)  # no residual around the LSTM
    new_mem = None
    if has_attn:
        mh = ln(h, p, b + "lnmem")
        h = ln(h, p, b + "lnmid")
        big = mh if mem is None else torch.cat([mem, mh])
        new_mem = big[-max_positions:]
        a = b + "attn."
        E = h.shape[-1]
        q = h @ p[a + "q.weight"].t() + p[a + "q.bias"]
        q = torch.sigmoid(p[a + "qs"]) * ln(q, p, a + "qln")
        k = torch.sigmoid(p[a + "ks"]) * big
        cf = torch.sigmoid(p[a + "vs"]) @ p[a + "vq.l1.weight"].t() + p[a + "vq.l1.bias"]
        v = torch.sigmoid(cf[..., E:]) * torch.tanh(cf[..., :E]) * big
        T, K = h.shape[0], big.shape[0]
        s = torch.einsum("ibe,jbe->bij", q, k) / math.sqrt(E)
        mask = torch.arange(K)[None, :] > torch.arange(T)[:, None] + (K - T)
        w = torch.softmax(s.masked_fill(mask, float("-inf")), -1)
        h = torch.einsum("bij,jbe->ibe", w, v) + h
    x, h = ln(h, p, b + "lnxff"), ln(h, p, b + "lnff")
    u = x @ p[b + "ff.linear1.weight"].t() + p[b + "ff.linear1.bias"]
    u = u * torch.sigmoid(1.702 * u)
    E = h.shape[-1]
    h = sum(u[..., c * E : (c + 1) * E] for c in range(u.shape[-1] // E)) + h
    return h, new_mem, new_state


def spec_model(tokens, p, nlayers, max_positions, hidden=None, mems=None):
    h = p["encoder.weight"][tokens]
    T = tokens.shape[0]
    new_hidden, new_mems = [], []
    for i in range(nlayers):
        mem = None if mems is None else mems[i]
        if mem is not None:
            mem = mem[max(0, mem.shape[0] - (max_positions - T)) :]
        h, m, s = spec_block(h, p, i, mem, None if hidden is None else hidden[i],
                             max_positions, i == nlayers - 2)  # fmt: skip
        new_hidden.append(s)
        new_mems.append(m)
    return h, new_hidden, new_mems


def randomize(model):
    with torch.no_grad():
        for name, q in model.named_parameters():
            q.copy_(torch.randn_like(q) * (0.3 if "ln" not in name else 1.0))
            if name.endswith("ln" + "start.weight"):
                q.add_(1)


@pytest.mark.parametrize("nlayers", [4, 3])
def test_model_reproduces_the_spec_over_three_segments(nlayers):
    V, E, Fh, maxpos = 13, 8, 19, 9
    model = SHARNN(V, ninp=E, nhid=Fh, nlayers=nlayers, max_positions=maxpos).double().eval()
    randomize(model)
    p = dict(model.named_parameters())
    p["decoder.weight"] = p["encoder.weight"]
    hidden = mems = ref_hidden = ref_mems = None
    for T in (4, 3, 4):  # the memory fills to 4, 7, then is cut to 9 - 4 = 5 before block 2
        x = torch.randint(0, V, (T, 2))
        with torch.no_grad():
            h, hidden, mems = model(x, hidden, mems)
            ref_h, ref_hidden, ref_mems = spec_model(x, p, nlayers, maxpos, ref_hidden, ref_mems)
        assert_parity("h", h, ref_h, atol=1e-10)
        for (a, b), (c, d) in zip(hidden, ref_hidden):
            assert_parity("h_n", a[0], c, atol=1e-10)
            assert_parity("c_n", b[0], d, atol=1e-10)
        attn = nlayers - 2
        assert_parity("memory", mems[attn], ref_mems[attn], atol=1e-10)
        assert all(m is None for i, m in enumerate(mems) if i != attn)
    assert mems[nlayers - 2].shape[0] == 9  # cat(5 kept, 4 new) = max_positions
    logits, _, _ = model.logits(x, hidden, mems)
    assert logits.shape == (4, 2, V)


def test_vq_collapse_keeps_the_output():
    attn = SingleHeadAttention(12).double().eval()
    with torch.no_grad():
        for q in attn.parameters():
            q.copy_(torch.randn_like(q))
    q, kv = torch.randn(5, 2, 12, dtype=torch.float64), torch.randn(9, 2, 12, dtype=torch.float64)
    before = attn(q, kv, kv)
    attn.vq_collapse()
    assert attn.collapsed and "vq.l1.weight" not in attn.state_dict()
    assert_parity("collapsed", attn(q, kv, kv), before, atol=1e-12)


def test_dropout_reaches_q_v_and_weights_in_training():
    torch.manual_seed(1)
    attn = SingleHeadAttention(16, dropout=0.5).train()
    q, kv = torch.randn(3, 2, 16), torch.randn(6, 2, 16)
    a, b = attn(q, kv, kv), attn(q, kv, kv)
    assert not torch.equal(a, b)
    attn.eval()
    assert torch.equal(attn(q, kv, kv), attn(q, kv, kv))
    boom = Boom(8, 24, dropout=0.5).train()
    x = torch.randn(4, 8)
    assert not torch.equal(boom(x), boom(x))


def test_shalayer_batch_first_and_memory_round_trip():
    torch.manual_seed(0)
    tm = SHALayer(8, 20, use_attn=True, max_positions=12).double().eval()
    bf = SHALayer(8, 20, use_attn=True, max_positions=12, batch_first=True).double().eval()
    bf.load_state_dict(tm.state_dict())
    randomize(tm)
    bf.load_state_dict(tm.state_dict())
    mem = hid = mem_b = hid_b = None
    for T in (3, 5, 4):
        x = torch.randn(T, 2, 8, dtype=torch.float64)
        if mem is not None:  # keep the memory within max_positions, as SHARNN does
            mem, mem_b = mem[max(0, mem.shape[0] - (12 - T)) :], mem_b[:, -(12 - T) :]
        h, mem, hid = tm(x, mem, hid)
        hb, mem_b, hid_b = bf(x.transpose(0, 1), mem_b, hid_b)
        assert_parity("h", hb.transpose(0, 1), h, atol=1e-12)
        assert_parity("mem", mem_b.transpose(0, 1), mem, atol=1e-12)


def test_memory_is_detached_but_hidden_is_not():
    layer = SHALayer(8, 16, use_attn=True)
    x = torch.randn(3, 2, 8, requires_grad=True)
    h, mem, (hn, cn) = layer(x)
    assert mem.requires_grad and hn.requires_grad
    h2, _, _ = layer(torch.randn(3, 2, 8), mem, (hn.detach(), cn.detach()))
    h2.sum().backward()  # must not reach into the first segment's graph
    assert x.grad is None


def test_model_errors_name_the_argument():
    model = SHARNN(10, ninp=8, nhid=16, nlayers=2, max_positions=6)
    with pytest.raises(ValueError, match="token id 10 outside the vocabulary"):
        model(torch.tensor([[1], [10]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1], [2]]))
    model.check_token_ids = False  # the caller vouches for the ids: no check, no sync
    with pytest.raises(IndexError):  # torch's own error from the embedding on the CPU
        model(torch.tensor([[1], [10]]))
    model.check_token_ids = True
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="max_positions"):
        model(torch.zeros(7, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="x must be a \\[T, B\\]"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="mems must hold 2"):
        model(torch.zeros(3, 1, dtype=torch.long), mems=[None])
    with pytest.raises(ValueError, match="targets"):
        model.loss(torch.zeros(3, 1, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long))
    layer = SHALayer(8, 16, use_attn=True, max_positions=6)
    with pytest.raises(ValueError, match="mem is too long"):
        layer(torch.randn(3, 1, 8), torch.randn(4, 1, 8))
    with pytest.raises(ValueError, match="width E = 8"):
        layer(torch.randn(3, 1, 8), torch.randn(2, 1, 6))
    with pytest.raises(ValueError, match="no attention"):
        SHALayer(8, 16)(torch.randn(3, 1, 8), torch.randn(2, 1, 8))
    with pytest.raises(ValueError, match="hidden_dim must be >= embed_dim"):
        Boom(8, 4)
    with pytest.raises(ValueError, match="dropout"):
        SHALayer(8, dropout=1.0)
    with pytest.raises(ValueError, match="backend"):
        Boom(8, backend="fast")


def test_model_memory_is_truncated_not_rejected():
    model = SHARNN(10, ninp=8, nhid=16, nlayers=2, max_positions=6).eval()
    x = torch.randint(0, 10, (4, 2))
    long_mem = [torch.randn(30, 2, 8), None]
    _, _, mems = model(x, mems=long_mem)
    assert mems[0].shape[0] == 6
    _, _, short = model(x, mems=[long_mem[0][-2:], None])
    assert torch.equal(mems[0], short[0])  # only the last max_positions - T positions count
    full = torch.randint(0, 10, (6, 2))  # T = max_positions: no memory position is kept
    _, _, with_mem = model(full, mems=long_mem)
    _, _, without = model(full)
    assert torch.equal(with_mem[0], without[0]) and with_mem[0].shape[0] == 6


# ---- traps a new user hits --------------------------------------------------------------------


def test_lstm_extra_positional_arguments_raise():
    # torch.nn.LSTM(8, 16, 2) means num_layers=2: here it must not silently become bias=2.
    with pytest.raises(TypeError, match="num_layers"):
        LSTM(8, 16, 2)
    with pytest.raises(ValueError, match="num_layers must be 1; got 2"):
        LSTM(8, 16, num_layers=2)
    with pytest.raises(ValueError, match="bidirectional"):
        LSTM(8, 16, bidirectional=True)
    with pytest.raises(ValueError, match="proj_size"):
        LSTM(8, 16, proj_size=4)
    lstm = LSTM(8, 16, num_layers=1, bias=False)  # the one-layer values are accepted
    assert lstm.bias_ih_l0 is None and lstm.num_layers == 1


def test_lstm_factory_kwargs_match_torch():
    ours = LSTM(5, 7, device="cpu", dtype=torch.float64)
    theirs = torch.nn.LSTM(5, 7, device="cpu", dtype=torch.float64)
    for name, p in ours.named_parameters():
        assert p.dtype == torch.float64 and p.device.type == "cpu", name
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(3, 2, 5, dtype=torch.float64)
    assert_parity("out", ours(x)[0].detach(), theirs(x)[0].detach(), atol=1e-12)


def test_lstm_rejects_packed_sequence():
    packed = torch.nn.utils.rnn.pack_padded_sequence(torch.randn(4, 2, 5), [4, 2])
    with pytest.raises(TypeError, match="PackedSequence.*pad_packed_sequence"):
        LSTM(5, 7)(packed)


def test_mems_entries_are_checked_by_index():
    model = SHARNN(10, ninp=8, nhid=16, nlayers=3, max_positions=12)  # attention in block 1
    x = torch.randint(0, 10, (3, 2))
    with pytest.raises(TypeError, match=r"mems\[1\] must be None or a \[M, B, E\] tensor; got int"):
        model(x, mems=[None, 5, None])
    with pytest.raises(ValueError, match=r"mems\[0\] is a \[4, 2, 8\] tensor but block 0 has no "):
        model(x, mems=[torch.randn(4, 2, 8), None, None])
    with pytest.raises(ValueError, match=r"mems\[1\] must be a \[M, B, E\]"):
        model(x, mems=[None, torch.randn(4, 8), None])
    with pytest.raises(TypeError, match="mems must be a list"):
        model(x, mems=torch.randn(4, 2, 8))
    # The original's [] marker for "no memory" is accepted anywhere.
    _, _, mems = model(x, mems=[[], torch.randn(4, 2, 8), []])
    assert mems[1].shape == (7, 2, 8) and mems[0] is None


def test_shalayer_rejects_a_segment_longer_than_its_window():
    layer = SHALayer(8, 16, use_attn=True, max_positions=6)
    with pytest.raises(ValueError, match="T = 7 positions > max_positions = 6"):
        layer(torch.randn(7, 1, 8))
    with pytest.raises(ValueError, match="T = 7 positions > max_positions = 6"):
        SHALayer(8, 16, use_attn=True, max_positions=6, batch_first=True)(torch.randn(1, 7, 8))
    h, mem, _ = layer(torch.randn(6, 1, 8))  # T = max_positions is allowed
    assert mem.shape == (6, 1, 8)
    SHALayer(8, 16, max_positions=6)(torch.randn(7, 1, 8))  # no attention: no window


def test_original_signatures():
    with pytest.raises(TypeError, match="no rnn_type.*SHARNN\\(ntoken, ninp, nhid, nlayers"):
        SHARNN("LSTM", 10, 8, 16, 2)
    model = SHARNN(10, 8, 16, 2).eval()
    x = torch.randint(0, 10, (4, 2))
    out = model(x, return_h=True)  # the original's five results
    assert len(out) == 5 and out[3] is None and out[4] is None
    h, hidden, mems = model(x)
    assert torch.equal(out[0], h) and torch.equal(out[2][0], mems[0])


@pytest.mark.parametrize("backend", ["auto", "reference", "torch"])
def test_compile_fullgraph_on_cpu(backend):
    # Every backend a CPU user can get (triton under the interpreter is covered with the ops):
    # one graph (fullgraph=True: any graph break raises), forward and backward, equal to eager.
    # aot_eager runs Dynamo and AOTAutograd as the default compiler does, without spending
    # tens of seconds in inductor's C++ code generation.
    model = SHARNN(32, ninp=16, nhid=32, nlayers=2, max_positions=16, backend=backend)
    model = model.double().eval()
    x = torch.randint(0, 32, (5, 2))
    ref, _, ref_mems = model(x)
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out, _, mems = compiled(x)
    out.sum().backward()
    assert_parity("out", out.detach(), ref.detach())
    assert_parity("mem", mems[0].detach(), ref_mems[0].detach())
    assert ref_grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, g in ref_grads.items():
        assert_parity(name, dict(model.named_parameters())[name].grad, g)


def test_compile_fullgraph_under_a_default_device():
    # torch.set_default_device installs a torch function mode for the rest of the process;
    # Dynamo must still trace the whole model under it.
    torch.set_default_device("cpu")
    try:
        model = SHARNN(32, ninp=16, nhid=32, nlayers=2, max_positions=16).eval()
        x = torch.randint(0, 32, (5, 2))
        out, _, _ = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
        out.sum().backward()
        assert_parity("out", out.detach(), model(x)[0].detach(), atol=1e-6)
    finally:
        torch.set_default_device(None)


def test_interpreter_set_after_import_says_what_to_do():
    import subprocess
    import sys

    code = (
        "import os, torch\n"
        "from sha_rnn_kernels import Boom\n"
        "m = Boom(8, 16, backend='triton')\n"  # imports the Triton file without the interpreter
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "try:\n"
        "    m(torch.randn(2, 8))\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )  # fmt: skip
    assert "BackendUnavailableError" in done.stdout, done.stdout + done.stderr
    assert "set it before importing sha_rnn_kernels" in done.stdout
    assert "fresh process" in done.stdout
