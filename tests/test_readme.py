"""README.md: every python example runs as written (on this machine's CPU or GPU), the test
command is the one CI runs, and the repository speaks for itself (no references to documents
outside it)."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def python_blocks() -> list:
    with open(README, encoding="utf-8") as f:
        text = f.read()
    return re.findall(r"^```python\n(.*?)^```", text, re.M | re.S)


def test_readme_has_examples():
    assert len(python_blocks()) >= 3


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs(index, tmp_path):
    code = python_blocks()[index]
    if "ENWIK8.pt" in code:
        # The conversion example: stand in for the original's pickled [model, criterion] with a
        # model of this package (same parameter names), its value gate folded by vq_collapse().
        import torch

        from sha_rnn_kernels import SHARNN

        original = SHARNN(205, ninp=16, nhid=48, nlayers=3)
        original.blocks[1].attn.vq_collapse()
        torch.save([original, None], tmp_path / "ENWIK8.pt")
    if "sha-rnn-default.pt" in code:
        # The generation example reads the training command's checkpoint: train a tiny one there.
        from sha_rnn_kernels import train

        corpus = tmp_path / "corpus.txt"
        corpus.write_bytes(b"def main(argv):\n    return len(argv)\n" * 60)
        train.run([
            "--data", str(corpus), "--emsize", "16", "--nhid", "32", "--nlayers", "2",
            "--bptt", "16", "--batch-size", "4", "--eval-batch-size", "4", "--max-steps", "4",
            "--threads", "1", "--quiet", "--eval-interval", "0",
            "--save", str(tmp_path / "checkpoints" / "sha-rnn-default.pt"),
        ])  # fmt: skip
    # A user's environment: the package from this checkout, no interpreter flag set by the tests.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, f"README python block {index} failed:\n{code}\n{done.stderr}"
    if "ENWIK8.pt" in code:
        converted = torch.load(tmp_path / "sha-rnn-state-dict.pt")
        expected = original.state_dict()
        assert converted.keys() == expected.keys()
        assert all(torch.equal(converted[k], expected[k]) for k in expected)


def test_readme_test_command_is_what_ci_runs():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci_last = [line for line in f.read().splitlines() if line.strip()][-1]
    assert f"```bash\n{ci_last}\n```" in text
    assert ci_last == 'pip install -e ".[test]" && python -m pytest tests'


def test_license_is_the_one_setup_names():
    with open(os.path.join(ROOT, "LICENSE"), encoding="utf-8") as f:
        text = f.read()
    assert text.startswith("MIT License") and "the sha_rnn_kernels authors" in text
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
        assert 'license="MIT"' in f.read()


def test_no_references_to_documents_outside_the_repository():
    names = ["SPEC" + ".md", "BENCHMARKS" + ".md", "STYLE" + ".md", "shared" + "/"]
    skip_dirs = {".git", ".ci-venv", ".venv", "venv", "build", "dist", "__pycache__", "results"}
    offenders = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in skip_dirs and not d.endswith(".egg-info")]
        for name in files:
            kinds = (".py", ".md", ".cu", ".cpp", ".h", ".sh", ".toml", ".in", ".txt")
            if not name.endswith(kinds):
                continue
            path = os.path.join(folder, name)
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
            offenders += [f"{os.path.relpath(path, ROOT)}: {n}" for n in names if n in text]
    assert not offenders
