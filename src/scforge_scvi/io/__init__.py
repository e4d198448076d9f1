"""Pretrained directories and checkpoints (JSON + safetensors, never pickles), and the import
of public Geneformer models (safetensors, weights-only torch files, restricted unpickling)."""

from scforge_scvi._atomic import atomic_directory, atomic_file, check_writable, resolve_directory

from ._adapters import read_adapter, write_adapter
from ._checkpoint import module_state_dict, read_lightning_checkpoint, run_differences
from ._geneformer import (
    GeneformerImportError,
    RestrictedUnpickler,
    UnsafePickleError,
    geneformer_token_map,
    load_geneformer_dictionary,
    read_geneformer,
)
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
    "GeneformerImportError",
    "LoadReport",
    "Pretrained",
    "RestrictedUnpickler",
    "UnsafePickleError",
    "atomic_directory",
    "atomic_file",
    "check_architecture",
    "check_writable",
    "geneformer_token_map",
    "load_geneformer_dictionary",
    "load_weights",
    "module_state_dict",
    "read_adapter",
    "read_geneformer",
    "read_lightning_checkpoint",
    "read_pretrained",
    "resolve_directory",
    "run_differences",
    "write_adapter",
    "write_pretrained",
]
