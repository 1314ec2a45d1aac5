"""A trained SHA-RNN as a shareable folder: ``config.json`` + ``model.safetensors``.

``config.json`` holds every constructor argument of :class:`~sha_rnn_kernels.SHARNN` (and
whether its attention's ``vq`` was collapsed), plus, when the folder came from a training run,
the run's settings under ``"training"`` (bptt, corpus, batch sizes) so that ``evaluate`` and
``generate`` use the same protocol as for the training checkpoint. ``model.safetensors`` holds
the weights; safetensors files contain only tensors and a JSON header, so loading one runs no
code. Loading a local folder needs no network.

Example::

    >>> model.save_pretrained("my-sha-rnn")
    >>> again = SHARNN.from_pretrained("my-sha-rnn")          # same outputs, bit for bit
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch

from .checkpoint import CheckpointError

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "save_pretrained", "from_pretrained", "is_pretrained"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "sha_rnn_kernels.SHARNN"
_ARGS = ("ntoken", "ninp", "nhid", "nlayers", "dropout", "dropouth", "dropouti", "max_positions")


def _json_value(value: Any) -> Any:
    """``value`` if JSON keeps it exactly (None, bool, int, float, str), else its str."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def save_pretrained(model, directory: str, training: Optional[dict] = None) -> None:
    """Write ``directory/config.json`` and ``directory/model.safetensors`` for ``model``.

    Args:
        model: a :class:`~sha_rnn_kernels.SHARNN`.
        directory: created if missing; the two files in it are replaced.
        training: the training run's settings (stored under ``"training"``), optional.
    """
    from safetensors.torch import save_model

    # A SHARNN by what it holds (this module sits below modules.py and does not import it).
    if not isinstance(model, torch.nn.Module) or not all(hasattr(model, n) for n in _ARGS):
        raise TypeError(f"model must be a SHARNN; got {type(model).__name__}")
    if not isinstance(directory, (str, os.PathLike)) or os.fspath(directory) == "":
        raise ValueError(f"directory must be a folder path; got {directory!r}")
    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"directory {directory}: exists and is not a folder")
    os.makedirs(directory, exist_ok=True)
    config = {"format": FORMAT, "format_version": 1}
    config.update({name: getattr(model, name) for name in _ARGS})
    config["tie_weights"] = model.decoder.weight is model.encoder.weight
    backend = model.backend
    config["backend"] = backend if backend is None or isinstance(backend, str) else dict(backend)
    config["vq_collapsed"] = [
        i for i, block in enumerate(model.blocks) if block.attn is not None and block.attn.collapsed
    ]
    if training is not None:
        config["training"] = {k: _json_value(v) for k, v in training.items()}
    # Tied weights are one tensor: save_model stores it once and load_model ties it again.
    weights = os.path.join(directory, WEIGHTS_NAME)
    tmp = weights + f".tmp-{os.getpid()}"
    save_model(model, tmp, metadata={"format": FORMAT})
    os.replace(tmp, weights)
    with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def replacement_error(directory: Optional[str], overwrite: bool,
                      flag: str = "--save-pretrained") -> Optional[str]:  # fmt: skip
    """The one-line refusal when ``directory`` already holds a pretrained model (its
    ``model.safetensors``) and ``overwrite`` was not given; None otherwise. Checked before any
    data is read, so a run never ends by replacing a shared model it was not asked to."""
    if not directory or overwrite or not os.path.exists(os.path.join(directory, WEIGHTS_NAME)):
        return None
    return (
        f"{flag} {directory} already holds a model ({WEIGHTS_NAME}); choose another folder or "
        f"add --overwrite to replace it"
    )


def is_pretrained(path: Any) -> bool:
    """True when ``path`` is a folder (the pretrained layout), False for anything else."""
    return isinstance(path, (str, os.PathLike)) and os.path.isdir(path)


def read_config(directory: str, label: str = "directory") -> dict:
    """The folder's ``config.json``, checked; :class:`CheckpointError` naming ``label``."""
    if not isinstance(directory, (str, os.PathLike)):
        raise CheckpointError(f"{label} must be a folder path; got {type(directory).__name__}")
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        what = "no such folder" if not os.path.exists(directory) else "not a folder"
        raise CheckpointError(f"{label} {directory}: {what} (expected {CONFIG_NAME} and "
                              f"{WEIGHTS_NAME} in a folder)")  # fmt: skip
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{label} {directory}: no {CONFIG_NAME} in it (write one with save_pretrained or "
            f"python -m sha_rnn_kernels.export)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        message = f"{label} {directory}: {CONFIG_NAME} cannot be read ({exc})"
        raise CheckpointError(message) from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{label} {directory}: {CONFIG_NAME} is not a sha_rnn_kernels "
                              f"SHARNN config (no \"format\": \"{FORMAT}\")")  # fmt: skip
    missing = [name for name in _ARGS if name not in config]
    if missing:
        raise CheckpointError(f"{label} {directory}: {CONFIG_NAME} lacks {', '.join(missing)}")
    return config


def from_pretrained(
    model_class: type,
    directory: str,
    device: Optional[torch.device] = None,
    dtype: Optional[torch.dtype] = None,
    backend: Any = None,
    label: str = "directory",
) -> tuple:
    """``(model, config)``: the model saved in ``directory`` (built as ``model_class``, i.e.
    :class:`~sha_rnn_kernels.SHARNN`, which passes itself), in eval mode, and its
    ``config.json``. ``backend`` (None: the saved one) picks the kernels.

    Raises:
        CheckpointError: a missing folder or file, a config that is not ours, weights that are
            empty, truncated or do not fit the config.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    config = read_config(directory, label)
    directory = os.fspath(directory)
    weights = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise CheckpointError(f"{label} {directory}: no {WEIGHTS_NAME} in it")
    if os.path.getsize(weights) == 0:
        raise CheckpointError(f"{label} {directory}: {WEIGHTS_NAME} is empty")
    try:
        model = model_class(
            **{name: config[name] for name in _ARGS},
            tie_weights=bool(config.get("tie_weights", True)),
            backend=backend if backend is not None else config.get("backend"),
        )
        for i in config.get("vq_collapsed", []):
            model.blocks[i].attn.vq_collapse()
    except (TypeError, ValueError, IndexError, AttributeError) as exc:
        raise CheckpointError(f"{label} {directory}: {CONFIG_NAME} does not describe a "
                              f"SHARNN ({type(exc).__name__}: {exc})") from None  # fmt: skip
    try:
        load_model(model, weights, strict=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError) as exc:
        text = " ".join(str(exc).split())[:200]
        raise CheckpointError(
            f"{label} {directory}: {WEIGHTS_NAME} cannot be loaded into the model its "
            f"{CONFIG_NAME} describes ({type(exc).__name__}: {text})"
        ) from None
    model.eval()
    model.to(device=device or torch.device("cpu"), dtype=dtype)
    return model, config
