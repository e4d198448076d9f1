"""LoRA adapter directories: ``adapter_config.json`` + ``adapter_model.safetensors``.

Only the adapters and the task head are stored (a small fraction of the model); the base
model is a pretrained directory of its own (:mod:`scforge_scvi.io._pretrained`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scforge_scvi._atomic import atomic_directory, resolve_directory
from scforge_scvi._errors import ScForgeFileNotFoundError, ScForgeValueError, one_line

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


def write_adapter(
    path: str | os.PathLike,
    config: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    *,
    overwrite: bool = True,
) -> int:
    """Write an adapter directory atomically; return the size of its weights in bytes."""
    path = Path(path)
    with atomic_directory(path, overwrite=overwrite) as tmp:
        (tmp / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2))
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS_NAME))
    return (path / ADAPTER_WEIGHTS_NAME).stat().st_size


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The configuration and the tensors of an adapter directory.

    Raises
    ------
    ScForgeFileNotFoundError
        If ``path`` lacks one of the two files.
    ScForgeValueError
        If a file is truncated or corrupt.
    """
    path = resolve_directory(path)
    config_file, weights_file = path / ADAPTER_CONFIG_NAME, path / ADAPTER_WEIGHTS_NAME
    if not config_file.is_file() or not weights_file.is_file():
        raise ScForgeFileNotFoundError(
            f"'{path}' is not an adapter directory: it needs {ADAPTER_CONFIG_NAME} and "
            f"{ADAPTER_WEIGHTS_NAME} (written by save_adapter)."
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ScForgeValueError(
            f"{config_file} is not valid JSON ({one_line(err)}); the directory is "
            "truncated or was not written by save_adapter."
        ) from None
    try:
        state = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as err:
        raise ScForgeValueError(
            f"{weights_file} is truncated or corrupt and cannot be read "
            f"({one_line(err)}); nothing was loaded."
        ) from None
    return config, state
