"""scforge_scvi: single-cell transformer foundation models for the scverse.

Pretrain a transformer on raw counts with masked-gene modelling, fine-tune it for cell-type
annotation or perturbation response, and write embeddings and predictions back into
``AnnData``.
"""

from . import data, nn, perturb, pl, train
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
    "data",
    "nn",
    "perturb",
    "pl",
    "train",
    "tune_cpu_allocator",
]


def __getattr__(name: str):
    # ``sf.bench`` without an import statement: the deprecated alias module warns when loaded
    if name == "bench":
        import scforge_scvi.bench as bench

        return bench
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
