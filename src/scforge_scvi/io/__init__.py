"""Pretrained directories and checkpoints (JSON + safetensors, never pickles)."""

from ._pretrained import (
    ARCHITECTURE_KEYS,
    CheckpointMismatchError,
    LoadReport,
    Pretrained,
    check_architecture,
    load_weights,
    read_pretrained,
    write_pretrained,
)

__all__ = [
    "ARCHITECTURE_KEYS",
    "CheckpointMismatchError",
    "LoadReport",
    "Pretrained",
    "check_architecture",
    "load_weights",
    "read_pretrained",
    "write_pretrained",
]
