"""Pretrained directories and checkpoints (JSON + safetensors, never pickles), and the import
of public Geneformer models (safetensors, weights-only torch files, restricted unpickling)."""

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
    "check_architecture",
    "geneformer_token_map",
    "load_geneformer_dictionary",
    "load_weights",
    "read_geneformer",
    "read_pretrained",
    "write_pretrained",
]
