"""Files written by scforge, read safely: JSON, safetensors and Lightning checkpoints;
comparing runs.

A ``.ckpt`` is read with ``torch.load(weights_only=True)``: tensors and plain data only, no
pickled object is ever run. The training plans store their model description under one
key of the checkpoint, which :func:`run_differences` compares to decide whether a run may
be resumed.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scforge_scvi._errors import ScForgeValueError, one_line


def read_json(file: Path, writer: str) -> Any:
    """The JSON in ``file``, written by ``writer`` (named in the error when it is not JSON)."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ScForgeValueError(
            f"{file} is not valid JSON ({one_line(err)}); the directory is truncated or was "
            f"not written by {writer}."
        ) from None


def read_tensors(file: Path, consequence: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors ``file``; ``consequence`` ends the error of a bad file."""
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise ScForgeValueError(
            f"{file} is truncated or corrupt and cannot be read ({one_line(err)}); {consequence}"
        ) from None


def write_tensors(file: Path, state_dict: dict[str, torch.Tensor], **metadata: str) -> None:
    """Write ``state_dict`` (CPU, contiguous copies) to the safetensors ``file``."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(file), metadata=metadata or None)


def read_lightning_checkpoint(
    path: str | os.PathLike, *, key: str, expected: str = "pass a .ckpt written by scforge"
) -> dict[str, Any]:
    """The contents of a Lightning checkpoint whose plan stored metadata under ``key``.

    Parameters
    ----------
    path
        The ``.ckpt`` file.
    key
        Top-level key of the metadata (``"scforge"`` for :class:`~scforge_scvi.ScForge`).
    expected
        What to pass instead, ending each error message.

    Raises
    ------
    ScForgeValueError
        If the file holds pickled objects (never unpickled), is truncated, is not a PyTorch
        checkpoint, or lacks the metadata or a ``state_dict``.
    """
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused an object: nothing was run
        raise ScForgeValueError(
            f"{path} holds pickled Python objects, not only tensors, and scforge never "
            f"unpickles those (nothing in it was run); {expected}."
        ) from None
    except Exception as err:  # truncated, empty, not a zip/pickle at all
        raise ScForgeValueError(
            f"{path} could not be read as a checkpoint: it is truncated or not a PyTorch "
            f"checkpoint ({one_line(err)}); {expected}."
        ) from None
    meta = ckpt.get(key) if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ScForgeValueError(
            f"{path} is not a checkpoint written by scforge (no {key!r} metadata; a "
            f"checkpoint of another model or architecture); {expected}."
        )
    return ckpt


def module_state_dict(ckpt: dict[str, Any], prefix: str = "module.") -> dict[str, torch.Tensor]:
    """The training plan's module weights of a checkpoint, keyed as in the module."""
    return {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}


def run_differences(
    saved: Any, current: Any, *, ignore: tuple[str, ...] = ()
) -> dict[str, tuple[Any, Any]]:
    """Dotted keys at which two run descriptions (nested dicts) differ: the same-run check.

    A run may be resumed only when this is empty. ``ignore`` lists dotted keys allowed to
    differ (e.g. ``"training.max_epochs"``). Each key maps to its saved and current value.

    Examples
    --------
    >>> run_differences({"training": {"lr": 1e-3}}, {"training": {"lr": 1e-4}})
    {'training.lr': (0.001, 0.0001)}
    """
    return {key: pair for key, pair in _differences(saved, current, "") if key not in ignore}


def _differences(a: Any, b: Any, prefix: str) -> list[tuple[str, tuple[Any, Any]]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _differences(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    return [] if a == b else [(prefix, (a, b))]
