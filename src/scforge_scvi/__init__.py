"""scforge_scvi: single-cell transformer foundation models for the scverse.

Pretrain a transformer on raw counts with masked-gene modelling, fine-tune it for cell-type
annotation, and write embeddings and predictions back into ``AnnData``.
"""

from importlib.metadata import PackageNotFoundError, version

from . import data, nn, pl, train
from .data import GeneVocab
from .model import ScForge

try:
    __version__ = version("scforge-scvi")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["GeneVocab", "ScForge", "data", "nn", "pl", "train"]
