"""scforge_scvi: single-cell transformer foundation models for the scverse.

Pretrain a transformer on raw counts with masked-gene modelling, fine-tune it for cell-type
annotation or perturbation response, and write embeddings and predictions back into
``AnnData``.
"""

from . import bench, data, nn, perturb, pl, train
from ._allocator import tune_cpu_allocator
from ._errors import ScForgeError, ScForgeTypeError, ScForgeValueError
from ._version import __version__ as __version__
from .data import GeneVocab, StreamedCells
from .model import ScForge, ScForgeCellEncoder
from .perturb import ScForgePerturb

__all__ = [
    "GeneVocab",
    "ScForge",
    "ScForgeCellEncoder",
    "ScForgeError",
    "ScForgePerturb",
    "ScForgeTypeError",
    "ScForgeValueError",
    "StreamedCells",
    "bench",
    "data",
    "nn",
    "perturb",
    "pl",
    "train",
    "tune_cpu_allocator",
]
