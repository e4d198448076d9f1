"""scforge_scvi: single-cell transformer foundation models for the scverse.

Pretrain a transformer on raw counts with masked-gene modelling, fine-tune it for cell-type
annotation or perturbation response, and write embeddings and predictions back into
``AnnData``.
"""

from importlib.metadata import PackageNotFoundError, version

from . import data, nn, perturb, pl, train
from ._allocator import tune_cpu_allocator
from ._errors import ScForgeError, ScForgeTypeError, ScForgeValueError
from .data import GeneVocab, StreamedCells
from .model import ScForge, ScForgeCellEncoder
from .perturb import ScForgePerturb

try:
    __version__ = version("scforge-scvi")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

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
