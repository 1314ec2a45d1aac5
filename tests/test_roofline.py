"""The speed-of-light report: its counts against hand computations at small shapes, the command
line, and the join with measured rows of a result file."""

import json

import pytest

from benchmarks import report, roofline

SMALL = {"V": 11, "E": 4, "F": 8, "L": 3, "T": 3, "B": 2, "M": 5}


def test_lstm_counts_by_hand():
    # T=3, B=2, E=H=4: 6 tokens, gates 4H=16. Forward: x W_ih^T and h W_hh^T, 2 m n k each.
    fwd = roofline.lstm_cost(3, 2, 4, 4, "fwd")
    assert fwd.flops == 2 * 6 * 16 * 4 + 2 * 6 * 16 * 4 == 1536
    # x and h in bf16 (48 bytes each), c in fp32 (96), weights 16*4 + 16*4 + 32 biases in fp32.
    assert fwd.bytes == 48 + 48 + 96 + (64 + 64 + 32) * 4
    assert fwd.chain_steps == 3 and fwd.chain_flops == 2 * 2 * 16 * 4
    both = roofline.lstm_cost(3, 2, 4, 4, "fwd+bwd")
    assert both.flops == 3 * 1536 and both.chain_steps == 6


def test_attention_pairs_match_the_mask():
    T, B, M = 3, 2, 5
    # Query i (0-based) sees the M memory keys and segment keys 0..i.
    visible = sum(1 for _ in range(B) for i in range(T) for j in range(M + T) if j <= M + i)
    segment = sum(1 for _ in range(B) for i in range(T) for j in range(M, M + T) if j <= M + i)
    assert roofline.attention_pairs(T, B, M) == (visible, segment) == (42, 12)
    E = 4
    fwd = roofline.attention_cost(T, B, E, M, "fwd")
    assert fwd.flops == 4 * E * 42  # QK^T and PV, 2 E FLOPs per pair each
    # q (48), keys = values (8 x 2 x 4 x 2 = 128), O (48), row statistics (24), saved P (84).
    assert fwd.bytes == 48 + 128 + 48 + 24 + 84
    both = roofline.attention_cost(T, B, E, M, "fwd+bwd")
    # dP and dQ over every pair, dK and dV over the segment's pairs only.
    assert both.flops == 4 * E * 42 + 4 * E * 42 + 4 * E * 12


def test_boom_counts_by_hand():
    fwd = roofline.boom_cost(6, 4, 8, "fwd")
    assert fwd.flops == 2 * 6 * 4 * 8 == 384
    # x and y (48 bytes each), W and bias in fp32 ((32 + 8) x 4), the pre-activation (96).
    assert fwd.bytes == 48 + 160 + 48 + 96
    assert roofline.boom_cost(6, 4, 8, "fwd+bwd").flops == 3 * 384


def test_parameter_count_matches_the_model():
    from sha_rnn_kernels import SHARNN

    model = SHARNN(SMALL["V"], SMALL["E"], SMALL["F"], SMALL["L"], backend="reference")
    assert roofline.n_params(SMALL) == sum(p.numel() for p in model.parameters())
    assert roofline.n_params(roofline.PAPER) == pytest.approx(53.8e6, rel=1e-3)


def test_bounds_by_hand():
    gpu = roofline.GPUS["h100"]
    rate = gpu["achievable"]
    lstm = roofline.lstm_cost(1024, 16, 1024, 1024, "fwd")
    b = roofline.bounds(lstm, gpu)
    assert b["compute"] == pytest.approx(lstm.flops / rate["flops"])
    assert b["memory"] == pytest.approx(lstm.bytes / rate["bytes"])
    # The recurrence: 1024 steps of (barrier + 2 B 4H H FLOPs at the chip's rate).
    step = 1e-6 + 2 * 16 * 4096 * 1024 / rate["flops"]
    assert b["latency"] == pytest.approx(1024 * step)
    assert b["bound"] == max(b["compute"], b["memory"], b["latency"]) == b["latency"]
    layer = roofline.layer_cost(roofline.PAPER)
    parts = [roofline.bounds(p, gpu)["bound"] for p in layer.parts]
    assert roofline.bounds(layer, gpu)["bound"] == pytest.approx(sum(parts))


def test_epoch_is_step_times_5494():
    out = roofline.rows("h100")
    step = next(r for r in out if r["op"] == "step")
    epoch = next(r for r in out if r["op"] == "epoch")
    assert roofline.steps_per_epoch(roofline.PAPER) == 5494
    assert epoch["bound_ms"] == pytest.approx(step["bound_ms"] * 5494)


def _fixture_results(tmp_path):
    common = {"dtype": "bf16", "paper_shape": True, "device": "NVIDIA H100 80GB HBM3"}
    boom = {"T": 1024, "B": 16, "E": 1024, "F": 4096}
    lstm = {"T": 1024, "B": 16, "I": 1024, "H": 1024}
    rows = [
        {**common, "op": "boom", "impl": "sha_rnn_kernels", "pass": "fwd+bwd", "ms_median": 1.0,
         "config": "train", "shape": boom},
        {**common, "op": "boom", "impl": "sha_rnn_kernels", "pass": "fwd+bwd", "ms_median": 0.2,
         "config": "eval", "shape": boom},  # not the training configuration: not joined
        {**common, "op": "lstm", "impl": "cudnn", "pass": "fwd+bwd", "ms_median": 3.0,
         "shape": lstm},
        {**common, "op": "lstm", "impl": "sha_rnn_kernels", "pass": "fwd+bwd", "ms_median": 4.0,
         "device": "NVIDIA A100-SXM4-80GB", "shape": lstm},  # another GPU
        {**common, "op": "epoch", "impl": "sha_rnn_kernels", "pass": "fwd+bwd", "ms_median": 50.0,
         "epoch_s": 274.7, "tokens_per_s": 327680.0, "shape": dict(roofline.PAPER)},
    ]  # fmt: skip
    (tmp_path / "NVIDIA_H100.json").write_text(json.dumps(rows))
    return rows


def test_measured_fraction_join(tmp_path):
    _fixture_results(tmp_path)
    results = roofline.load_results(str(tmp_path))
    out = {(r["op"], r["pass"]): r for r in roofline.report("h100", results)}
    boom = out[("boom", "fwd+bwd")]
    assert boom["measured_ms"] == 1.0
    assert boom["fraction"] == pytest.approx(boom["bound_ms"] / 1.0)
    assert out[("lstm", "fwd+bwd")]["measured_ms"] is None  # cudnn and the A100 row don't count
    step, epoch = out[("step", "fwd+bwd+opt")], out[("epoch", "step x 5494")]
    assert step["measured_ms"] == 50.0 and epoch["measured_ms"] == 50.0 * 5494
    assert epoch["fraction"] == pytest.approx(step["fraction"])
    a100 = {(r["op"], r["pass"]): r for r in roofline.report("a100", results)}
    assert a100[("lstm", "fwd+bwd")]["measured_ms"] == 4.0
    assert a100[("boom", "fwd+bwd")]["measured_ms"] is None


def test_cli_prints_the_table(tmp_path, capsys):
    _fixture_results(tmp_path)
    assert roofline.main(["--gpu", "h100", "--results-dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    boom_line = next(line for line in text.splitlines() if line.startswith("boom ")
                     and "fwd+bwd" in line)  # fmt: skip
    assert "1.000" in boom_line and "%" in boom_line
    for gpu in ("h200", "a100"):
        assert roofline.main(["--gpu", gpu, "--markdown", "--rates", "spec"]) == 0
        assert "| lstm | fwd |" in capsys.readouterr().out
    assert roofline.main(["--json"]) == 0
    assert json.loads(capsys.readouterr().out)[-1]["op"] == "epoch"
    with pytest.raises(SystemExit):
        roofline.main(["--gpu", "v100"])


def test_report_section_carries_the_table(tmp_path):
    _fixture_results(tmp_path)
    paths = sorted(str(p) for p in tmp_path.glob("*.json"))
    text = report.section(paths, include_smoke=False)
    assert "### Speed of light" in text
    assert "#### H100 SXM5 80GB" in text and "#### A100 SXM4 80GB" in text
    assert "(bound)" in text and "measured ms" in text and "(count)" in text
    boom = next(line for line in text.splitlines() if line.startswith("| boom | fwd+bwd |")
                and "| 1.000 |" in line)  # fmt: skip
    assert boom.count("%") == 1
    # Without any result file: the H100 table, bounds only.
    empty = report.section([], include_smoke=False)
    assert "#### H100 SXM5 80GB" in empty and "| lstm | fwd+bwd |" in empty


def test_design_estimates_compose_the_step_and_epoch():
    found = {r["op"]: r for r in roofline.estimate_rows("h100", SMALL)}
    kernels = {op: (lo, hi) for op, lo, hi, _ in roofline.ESTIMATES["h100"]}
    bound = {r["op"]: r["bound_ms"] for r in roofline.rows("h100", SMALL)}
    rest = (bound["q projection"] + 2 * bound["glue, other block"]
            + bound["glue, attention block"] + bound["embed/decoder/loss"] + bound["optimizer"])
    low = 3 * (kernels["lstm"][0] + kernels["boom"][0]) + kernels["attention"][0] + rest
    high = 3 * (kernels["lstm"][1] + kernels["boom"][1]) + kernels["attention"][1] + 2 * rest
    assert found["step"]["low_ms"] == pytest.approx(low)
    assert found["step"]["high_ms"] == pytest.approx(high)
    steps = roofline.steps_per_epoch(SMALL)
    assert found["epoch"]["high_ms"] == pytest.approx(high * steps)
    cudnn = roofline.CUDNN_BF16_LSTM_MS["h100"]
    assert found["step, cuDNN bf16 LSTM"]["low_ms"] == pytest.approx(
        low + 3 * (cudnn - kernels["lstm"][0])
    )
    # Every line says it is an estimate; a GPU without kernel estimates gets no table.
    assert all("(estimate)" in line for line in roofline.estimate_lines("h100")[2:])
    assert roofline.estimate_rows("a100") == [] and roofline.estimate_lines("a100") == []
