"""LoRA adapter directories: ``adapter_config.json`` + ``adapter_model.safetensors``.

Only the adapters and the task head are stored (a small fraction of the model); the base
model is a pretrained directory of its own (:mod:`scforge_scvi.io._pretrained`). Adapter
weights are the state-dict keys that contain :data:`LORA_KEY` (peft's ``lora_A`` / ``lora_B``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from scforge_scvi._atomic import atomic_directory, resolve_directory
from scforge_scvi._errors import ScForgeFileNotFoundError

from ._checkpoint import read_json, read_tensors, write_tensors

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
LORA_KEY = "lora_"


def is_lora_key(key: str) -> bool:
    """Whether a state-dict key names a LoRA adapter weight."""
    return LORA_KEY in key


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
        write_tensors(tmp / ADAPTER_WEIGHTS_NAME, state_dict)
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
    config = read_json(config_file, "save_adapter")
    return config, read_tensors(weights_file, "nothing was loaded.")
