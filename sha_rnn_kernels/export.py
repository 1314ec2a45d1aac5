"""Share a trained model: ``python -m sha_rnn_kernels.export CHECKPOINT OUTDIR [--torch-export]``.

Turns a training checkpoint (or a pretrained folder) into ``OUTDIR/config.json`` +
``OUTDIR/model.safetensors`` (:mod:`sha_rnn_kernels.pretrained`), without the optimizer and
RNG states. ``--torch-export`` also writes ``OUTDIR/model.pt2``: the inference step as a
``torch.export`` program, :class:`InferenceStep` ``(x [T, B], h [L, B, E], c [L, B, E],
memory [M, B, E]) -> (logits [T, B, V], h, c, memory)``, traced at the shapes given by
``--segment``, ``--batch`` and ``--memory`` (static shapes; export again for others). Load it
with ``torch.export.load(path).module()``.

The program holds the ops the model's backend resolves to while tracing: ``"auto"`` on the CPU
gives the reference's ATen ops; ``backend="triton"`` (on a GPU, or on the CPU under
``TRITON_INTERPRET=1``) gives the package's custom ops, traced through their fake kernels.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .checkpoint import CheckpointError
from .pretrained import replacement_error

__all__ = ["InferenceStep", "export_program", "export_checkpoint", "main"]


class InferenceStep(nn.Module):
    """One inference segment of a :class:`~sha_rnn_kernels.SHARNN` with its state as tensors.

    ``h`` and ``c`` stack the blocks' LSTM states ``[nlayers, B, E]``; ``memory`` is the
    attention block's memory ``[M, B, E]`` (the model keeps at most ``max_positions``). A
    program exported with ``M = 0`` is the first segment's: no memory yet, as ``mems=None``.
    Returns the logits and the new ``h``, ``c`` and memory (``min(M + T, max_positions)``
    positions).
    """

    def __init__(self, model) -> None:
        super().__init__()
        attn = [i for i, block in enumerate(model.blocks) if block.attn is not None]
        if len(attn) != 1:
            raise ValueError(f"InferenceStep needs one attention block; the model has {attn}")
        self.model = model
        self.attn_index = attn[0]

    def forward(self, x: Tensor, h: Tensor, c: Tensor, memory: Tensor):
        n = len(self.model.blocks)
        hidden = [(h[i : i + 1], c[i : i + 1]) for i in range(n)]
        mems: list = [None] * n
        mems[self.attn_index] = memory
        logits, new_hidden, new_mems = self.model.logits(x, hidden, mems)
        new_h = torch.cat([state[0] for state in new_hidden])
        new_c = torch.cat([state[1] for state in new_hidden])
        return logits, new_h, new_c, new_mems[self.attn_index]


def example_inputs(model, segment: int, batch: int, memory: int) -> tuple:
    """Inputs of the traced shapes (zeros state, random ids), on the model's device."""
    weight = model.encoder.weight
    e, n = model.ninp, len(model.blocks)
    x = torch.randint(0, model.ntoken, (segment, batch), device=weight.device)
    state = torch.zeros(n, batch, e, device=weight.device, dtype=weight.dtype)
    mem = torch.zeros(memory, batch, e, device=weight.device, dtype=weight.dtype)
    return x, state, state.clone(), mem


def export_program(model, segment: int = 64, batch: int = 1, memory: int = 256):
    """``torch.export.export`` of :class:`InferenceStep` at these shapes (model in eval mode)."""
    for name, value, low in (("segment", segment, 1), ("batch", batch, 1), ("memory", memory, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}; got {value!r}")
    if segment > model.max_positions:
        raise ValueError(
            f"segment {segment} exceeds the model's max_positions {model.max_positions}"
        )
    model.eval()
    # The id range check reads a value back to the host, which a traced program cannot do.
    checks, model.check_token_ids = model.check_token_ids, False
    try:
        return torch.export.export(
            InferenceStep(model), example_inputs(model, segment, batch, memory)
        )
    finally:
        model.check_token_ids = checks


def export_checkpoint(
    checkpoint: str,
    outdir: str,
    torch_export: bool = False,
    segment: Optional[int] = None,
    batch: int = 1,
    memory: Optional[int] = None,
    label: str = "checkpoint",
) -> list:
    """Write the pretrained folder (and ``model.pt2``); returns the paths written."""
    from .evaluate import load_model
    from .pretrained import CONFIG_NAME, WEIGHTS_NAME, save_pretrained

    model, config = load_model(checkpoint, label=label)
    training = {k: v for k, v in config.items() if k not in ("device", "quiet", "threads")}
    save_pretrained(model, outdir, training=training)
    written = [os.path.join(outdir, CONFIG_NAME), os.path.join(outdir, WEIGHTS_NAME)]
    if torch_export:
        if segment is None:
            segment = min(int(config.get("bptt", 64)), model.max_positions)
        if memory is None:
            memory = max(1, model.max_positions - segment)
        program = export_program(model, segment, batch, memory)
        path = os.path.join(outdir, "model.pt2")
        torch.export.save(program, path)
        written.append(path)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    """0 done; 2 (one line on stderr, no traceback) for a bad argument or file."""
    p = argparse.ArgumentParser(
        prog="sha-rnn-export",
        description="Turn a training checkpoint into a shareable folder: config.json + "
        "model.safetensors (loads with SHARNN.from_pretrained, evaluate and generate); "
        "--torch-export also writes model.pt2.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a --save file of train (or a folder)")
    p.add_argument("outdir", metavar="OUTDIR", help="the folder to write")
    p.add_argument("--torch-export", action="store_true", help="also write OUTDIR/model.pt2")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a model OUTDIR already holds"
    )
    p.add_argument("--segment", type=int, default=None, help="traced T (default: training bptt)")
    p.add_argument("--batch", type=int, default=1, help="traced batch")
    p.add_argument(
        "--memory",
        type=int,
        default=None,
        help="traced memory length (default: max_positions - T; 0: the first segment's program)",
    )
    args = p.parse_args(argv)
    problem = replacement_error(args.outdir, args.overwrite, flag="OUTDIR")
    if problem is not None:
        print(f"{p.prog}: error: {problem}", file=sys.stderr)
        return 2
    try:
        written = export_checkpoint(
            args.checkpoint, args.outdir, args.torch_export, args.segment, args.batch,
            args.memory, label="CHECKPOINT",
        )  # fmt: skip
    except (CheckpointError, ValueError, OSError) as exc:
        print(f"{p.prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
