"""Sharing a trained model safely: no file we load runs code (a hostile pickle given to every
command that loads a file is refused and its payload never runs), the pretrained folder
(config.json + model.safetensors) round-trips bit for bit, state dicts saved as the original
code saves them load with weights_only=True and strict=True, and torch.export of the inference
step runs and matches eager."""

import builtins
import os
import pickle
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch

from sha_rnn_kernels import SHARNN, train
from sha_rnn_kernels.checkpoint import CheckpointError, load_tensors
from sha_rnn_kernels.checkpoint import main as checkpoint_main
from sha_rnn_kernels.evaluate import evaluate_checkpoint, load_model
from sha_rnn_kernels.evaluate import main as evaluate_main
from sha_rnn_kernels.export import InferenceStep, example_inputs, export_program
from sha_rnn_kernels.export import main as export_main
from sha_rnn_kernels.generate import main as generate_main
from sha_rnn_kernels.testing import SAMPLE_TEXT, TINY_TRAIN_ARGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Hostile:
    """Unpickling this writes ``marker``: the proof that a loader ran the file's code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('ran')",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-step tiny checkpoint, its corpus and the pretrained folder export made of it."""
    folder = tmp_path_factory.mktemp("safe")
    corpus = folder / "corpus.txt"
    corpus.write_bytes((SAMPLE_TEXT * 80)[:6000])
    ckpt = folder / "tiny.pt"
    pretrained = folder / "tiny-pretrained"
    train.run(
        TINY_TRAIN_ARGS + ["--data", str(corpus), "--max-steps", "3", "--save", str(ckpt),
                           "--save-pretrained", str(pretrained)]
    )  # fmt: skip
    return str(ckpt), str(corpus), str(pretrained)


def hostile_files(folder):
    """``{name: path}`` of hostile files and the marker their payload would write: a torch zip
    file shaped like a training checkpoint, and a plain pickle (torch's legacy layout)."""
    marker = folder / "MARKER"
    zipped = folder / "hostile.pt"
    torch.save({"format": train.CHECKPOINT_FORMAT, "config": {}, "model": Hostile(marker)}, zipped)
    legacy = folder / "hostile-legacy.pt"
    with open(legacy, "wb") as f:
        pickle.dump({"model": Hostile(marker)}, f)
    return {"zip": str(zipped), "legacy": str(legacy)}, marker


def test_the_hostile_files_do_run_code_when_fully_unpickled(tmp_path):
    # The refusals below mean something only if these files really carry a payload.
    files, marker = hostile_files(tmp_path)
    for path in files.values():
        try:
            torch.load(path, weights_only=False)
        except RuntimeError:  # the legacy file: its payload ran while torch read its header
            pass
        assert marker.exists()
        marker.unlink()


def _cli(module, argv, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-m", f"sha_rnn_kernels.{module}"] + argv, capture_output=True,
        text=True, timeout=300, cwd=tmp_path, env=env,
    )  # fmt: skip


def _assert_refused(code, err, prog, flag, path):
    assert code == 2, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"{prog}: error: {flag} {path}: refused: loading it would run code"), err


def test_every_command_refuses_a_hostile_pickle(trained, tmp_path, capsys):
    ckpt, corpus, _ = trained
    files, marker = hostile_files(tmp_path)
    bad = files["zip"]
    commands = [
        (train.main, ["--resume", bad, "--save", ""], "sha-rnn-train", "--resume"),
        (train.main, TINY_TRAIN_ARGS + ["--data", corpus, "--init-from", bad, "--save", ""],
         "sha-rnn-train", "--init-from"),
        (evaluate_main, ["--checkpoint", bad, "--quiet"], "sha-rnn-evaluate", "--checkpoint"),
        (generate_main, ["--checkpoint", bad, "--prompt", "ab"], "sha-rnn-generate",
         "--checkpoint"),
        (export_main, [bad, str(tmp_path / "out")], "sha-rnn-export", "CHECKPOINT"),
    ]  # fmt: skip
    for main, argv, prog, flag in commands:
        code = main(argv)
        _assert_refused(code, capsys.readouterr().err, prog, flag, bad)
        assert not marker.exists(), prog
    assert not (tmp_path / "out").exists()
    # The same through a real process: exit status 2, one line, no traceback, nothing ran.
    proc = _cli("generate", ["--checkpoint", bad, "--prompt", "ab"], tmp_path)
    _assert_refused(proc.returncode, proc.stderr, "sha-rnn-generate", "--checkpoint", bad)
    assert not marker.exists()


@pytest.mark.parametrize("flavor", ["zip", "legacy"])
def test_python_loaders_refuse_a_hostile_pickle(tmp_path, flavor, capsys):
    files, marker = hostile_files(tmp_path)
    bad = files[flavor]
    for call in (
        lambda: load_model(bad),
        lambda: train.load_checkpoint(bad),
        lambda: load_tensors(bad, "path"),
        lambda: evaluate_checkpoint(bad),
    ):
        with pytest.raises(ValueError, match="refused: loading it would run code"):
            call()
    assert evaluate_main(["--checkpoint", bad, "--quiet"]) == 2
    assert generate_main(["--checkpoint", bad, "--prompt", "a"]) == 2
    assert train.main(["--resume", bad, "--save", ""]) == 2
    # A hostile file put where the pretrained folder keeps its weights: not a pickle to
    # safetensors, so it is refused as unreadable, and nothing runs either.
    folder = tmp_path / "folder"
    SHARNN(256, ninp=16, nhid=32, nlayers=2, max_positions=16).save_pretrained(str(folder))
    os.replace(bad, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors cannot be loaded"):
        SHARNN.from_pretrained(str(folder))
    # Converting an older checkpoint unpickles it in full, so it needs an explicit --trust.
    assert checkpoint_main([files["zip" if flavor == "legacy" else "legacy"], "new.pt"]) == 2
    assert "add --trust" in capsys.readouterr().err
    assert not marker.exists()


def test_messages_name_what_the_user_passed(trained, tmp_path, capsys):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    text = tmp_path / "notes.txt"
    text.write_text("some notes\n")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(open(trained[0], "rb").read()[:2000])
    foreign = "not a sha_rnn_kernels training checkpoint"
    for path, why in ((empty, "the file is empty"), (text, foreign), (corrupt, foreign)):
        for main, argv in ((evaluate_main, ["--quiet"]), (generate_main, ["--prompt", "a"])):
            assert main(["--checkpoint", str(path)] + argv) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f": error: --checkpoint {path}: {why}" in err, err
            assert "--resume" not in err
        # From Python: the argument's name, no flag.
        with pytest.raises(CheckpointError, match=f"^path {path}: {why}"):
            load_model(str(path))
    with pytest.raises(CheckpointError, match=f"^path {tmp_path}/nope.pt: no such file"):
        load_model(str(tmp_path / "nope.pt"))
    # A folder: the resume of a training run needs a file; evaluate reads it as a pretrained
    # folder and says what is missing in it.
    assert train.main(["--resume", str(tmp_path), "--save", ""]) == 2
    assert f"--resume {tmp_path}: is a folder, not a checkpoint file" in capsys.readouterr().err
    assert evaluate_main(["--checkpoint", str(tmp_path), "--quiet"]) == 2
    assert f"--checkpoint {tmp_path}: no config.json in it" in capsys.readouterr().err
    # And as a process: exit status 2, one line, no traceback.
    proc = _cli("evaluate", ["--checkpoint", str(empty)], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr == (
        f"sha-rnn-evaluate: error: --checkpoint {empty}: the file is empty\n"
    ), proc.stderr


def test_checkpoints_hold_only_plain_data_and_resume(trained):
    ckpt, _, _ = trained
    payload = torch.load(ckpt, weights_only=True)  # would raise if it needed any code
    assert payload["format"] == train.CHECKPOINT_FORMAT and isinstance(payload["rng"], dict)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(ckpt) == []


def test_an_older_checkpoint_is_refused_then_converted(trained, tmp_path, capsys):
    from sha_rnn_kernels.checkpoint import numpy_state_from_plain

    payload = torch.load(trained[0], weights_only=True)
    rng = payload["rng"]
    old = dict(payload, format=1, rng=dict(rng, data=numpy_state_from_plain(rng["data"]),
                                           numpy=numpy_state_from_plain(rng["numpy"])))  # fmt: skip
    old_path, new_path = tmp_path / "old.pt", tmp_path / "new.pt"
    torch.save(old, old_path)  # numpy arrays inside: weights_only cannot read it
    with pytest.raises(ValueError, match="python -m sha_rnn_kernels.checkpoint --trust"):
        train.load_checkpoint(str(old_path))
    assert checkpoint_main(["--trust", str(old_path), str(new_path)]) == 0
    converted = train.load_checkpoint(str(new_path))
    assert converted["step"] == payload["step"] and converted["format"] == 2
    assert numpy_state_from_plain(converted["rng"]["data"])[1].tolist() == (
        old["rng"]["data"][1].tolist()
    )
    result = train.run(["--resume", str(new_path), "--max-steps", "4", "--save", ""])
    assert result.step == 4


def _tiny(**kwargs):
    torch.manual_seed(3)
    model = SHARNN(256, ninp=16, nhid=32, nlayers=3, max_positions=24, **kwargs)
    with torch.no_grad():  # non-zero gates, so that every parameter matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("variant", ["tied", "untied", "vq_collapsed"])
def test_save_pretrained_round_trips_bit_for_bit(tmp_path, variant):
    model = _tiny(tie_weights=variant != "untied")
    if variant == "vq_collapsed":
        model.blocks[1].attn.vq_collapse()
    model.save_pretrained(str(tmp_path / "m"))
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]
    again = SHARNN.from_pretrained(str(tmp_path / "m"))
    assert (again.decoder.weight is again.encoder.weight) == (variant != "untied")
    assert again.state_dict().keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name
    x = torch.randint(0, 256, (7, 2))
    a, ha, ma = model.logits(x)
    b, hb, mb = again.logits(x)
    assert torch.equal(a, b) and torch.equal(ma[1], mb[1]) and torch.equal(ha[2][1], hb[2][1])


def test_bad_pretrained_folders_are_clear_errors(tmp_path):
    model = _tiny()
    folder = tmp_path / "m"
    model.save_pretrained(str(folder))
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors cannot be loaded .*Safetensor"):
        SHARNN.from_pretrained(str(folder))
    weights.write_bytes(b"")
    with pytest.raises(CheckpointError, match="model.safetensors is empty"):
        SHARNN.from_pretrained(str(folder))
    weights.unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors in it"):
        SHARNN.from_pretrained(str(folder))
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json cannot be read"):
        SHARNN.from_pretrained(str(folder))
    with pytest.raises(CheckpointError, match="no such folder"):
        SHARNN.from_pretrained(str(tmp_path / "absent"))
    # Weights of another size than the config says.
    _tiny().save_pretrained(str(tmp_path / "a"))
    SHARNN(256, ninp=8, nhid=32, nlayers=3, max_positions=24).save_pretrained(str(tmp_path / "b"))
    os.replace(tmp_path / "b" / "model.safetensors", tmp_path / "a" / "model.safetensors")
    with pytest.raises(CheckpointError, match="cannot be loaded into the model"):
        SHARNN.from_pretrained(str(tmp_path / "a"))


def original_state_dict(ntoken, ninp, nhid, nlayers):
    """A state dict named and shaped as smerity/sha-rnn's model.py names its SHARNN (written out
    from that code's modules, not from ours): attention in block nlayers - 2, tied weights."""
    g = torch.Generator().manual_seed(0)
    state = OrderedDict()

    def put(name, *shape):
        state[name] = torch.randn(*shape, generator=g) * 0.1

    put("encoder.weight", ntoken, ninp)
    for i in range(nlayers):
        b = f"blocks.{i}."
        if i == nlayers - 2:
            for gate in ("qs", "ks", "vs", "r_gate"):
                put(b + f"attn.{gate}", 1, 1, ninp)
            put(b + "attn.qkvs", 1, 3, ninp)
            put(b + "attn.q.weight", ninp, ninp)
            put(b + "attn.q.bias", ninp)
            put(b + "attn.qln.weight", ninp)
            put(b + "attn.qln.bias", ninp)
            put(b + "attn.vq.l1.weight", 2 * ninp, ninp)
            put(b + "attn.vq.l1.bias", 2 * ninp)
        put(b + "ff.linear1.weight", nhid, ninp)
        put(b + "ff.linear1.bias", nhid)
        for ln in ("lnstart", "lnmid", "lnmem", "lnout", "lnff", "lnxff"):
            put(b + f"{ln}.weight", ninp)
            put(b + f"{ln}.bias", ninp)
        put(b + "rnn.weight_ih_l0", 4 * ninp, ninp)
        put(b + "rnn.weight_hh_l0", 4 * ninp, ninp)
        put(b + "rnn.bias_ih_l0", 4 * ninp)
        put(b + "rnn.bias_hh_l0", 4 * ninp)
    state["decoder.weight"] = state["encoder.weight"]  # tie_weights: one tensor, two names
    put("decoder.bias", ntoken)
    return state


def test_an_original_state_dict_loads_weights_only_and_strict(tmp_path):
    state = original_state_dict(205, 16, 64, 4)
    path = tmp_path / "original-state-dict.pt"
    torch.save(state, path)  # what torch.save(model.state_dict()) writes
    loaded = torch.load(path, weights_only=True)
    assert loaded is not None and load_tensors(str(path), "path").keys() == state.keys()
    model = SHARNN(205, ninp=16, nhid=64, nlayers=4)
    model.load_state_dict(loaded, strict=True)
    for name, value in state.items():
        assert torch.equal(model.state_dict()[name], value), name


def test_evaluate_and_generate_take_the_pretrained_folder(trained, capsysbinary):
    ckpt, _, folder = trained
    assert evaluate_checkpoint(folder, "valid") == evaluate_checkpoint(ckpt, "valid")
    outputs = []
    for path in (ckpt, folder):
        assert generate_main(["--checkpoint", path, "--prompt", "the ", "--length", "20"]) == 0
        outputs.append(capsysbinary.readouterr().out)
    assert outputs[0] == outputs[1] and len(outputs[0]) == 20


def test_export_command_and_torch_export_match_eager(trained, tmp_path, capsys):
    ckpt, _, _ = trained
    out = tmp_path / "exported"
    assert export_main([ckpt, str(out), "--torch-export", "--segment", "8", "--memory", "20"]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "model.pt2", "model.safetensors"]
    model, config = load_model(str(out))
    assert config["bptt"] == 16  # the run's settings travel with the folder
    reference, _ = load_model(ckpt)
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    program = torch.export.load(str(out / "model.pt2")).module()
    torch.manual_seed(1)
    x, h, c, mem = example_inputs(model, 8, 1, 20)
    h, c, mem = torch.randn_like(h), torch.randn_like(c), torch.randn_like(mem)
    got = program(x, h, c, mem)
    model.check_token_ids = False
    with torch.no_grad():
        want = InferenceStep(model)(x, h, c, mem)
    assert [t.shape for t in got] == [(8, 1, 256), h.shape, c.shape, (28, 1, 32)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # A fresh state goes through the same program: its state output feeds the next segment.
    again = program(x, got[1], got[2], got[3][-20:])
    assert torch.isfinite(again[0]).all()


def test_export_program_rejects_bad_shapes_and_traces_the_first_segment():
    model = _tiny()
    # memory 0: the program of the first segment, equal to the model without memory.
    program = export_program(model, segment=5, batch=2, memory=0).module()
    x = torch.randint(0, 256, (5, 2))
    zeros = torch.zeros(3, 2, 16)
    logits, h, c, mem = program(x, zeros, zeros, torch.zeros(0, 2, 16))
    want, hidden, mems = model.logits(x)
    assert torch.equal(logits, want) and torch.equal(mem, mems[1])
    assert torch.equal(h, torch.cat([state[0] for state in hidden]))
    with pytest.raises(ValueError, match="segment 25 exceeds the model's max_positions 24"):
        export_program(model, segment=25)
    with pytest.raises(ValueError, match="batch must be an int >= 1; got 0"):
        export_program(model, batch=0)
    with pytest.raises(ValueError, match="memory must be an int >= 0; got -1"):
        export_program(model, memory=-1)


def test_torch_export_keeps_the_packages_custom_ops():
    # backend="triton" (Triton's interpreter on the CPU here): the exported program calls the
    # package's custom ops, traced through their fake kernels, and matches eager.
    torch.manual_seed(0)
    model = SHARNN(256, ninp=32, nhid=64, nlayers=2, max_positions=16, backend="triton").eval()
    program = export_program(model, segment=4, batch=2, memory=8)
    called = set()
    for module in program.graph_module.modules():
        if hasattr(module, "graph"):
            called |= {str(n.target) for n in module.graph.nodes if n.op == "call_function"}
    ops = {"sha_rnn_kernels.attention_fwd.default", "sha_rnn_kernels.boom_fwd.default",
           "sha_rnn_kernels.lstm_fwd.default"}  # fmt: skip
    assert ops <= called, sorted(called)
    x, h, c, mem = example_inputs(model, 4, 2, 8)
    h, c, mem = torch.randn_like(h), torch.randn_like(c), torch.randn_like(mem)
    got = program.module()(x, h, c, mem)
    model.check_token_ids = False
    with torch.no_grad():
        want = InferenceStep(model)(x, h, c, mem)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
