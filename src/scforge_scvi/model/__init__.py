"""scvi-tools model classes, the public face of scforge_scvi, and the annotation scores that
evaluate them."""

from ._cell_encoder import ScForgeCellEncoder
from ._constants import SCFORGE_OUTPUT_KEYS, SCFORGE_REGISTRY_KEYS
from ._evaluate import (
    baseline_logreg,
    classification_scores,
    embedding_quality,
    linear_probe,
    logreg_on_cells,
    probe_split,
)
from ._model import ScForge
from ._module import ScForgeModule
from ._settings import Architecture

__all__ = [
    "SCFORGE_OUTPUT_KEYS",
    "SCFORGE_REGISTRY_KEYS",
    "Architecture",
    "ScForge",
    "ScForgeCellEncoder",
    "ScForgeModule",
    "baseline_logreg",
    "classification_scores",
    "embedding_quality",
    "linear_probe",
    "logreg_on_cells",
    "probe_split",
]


def __getattr__(name: str):
    # deprecated alias, kept for one release: the perturbation model lives in scforge_scvi.perturb
    if name == "ScForgePerturb":
        import warnings

        from scforge_scvi.perturb import ScForgePerturb

        warnings.warn(
            "scforge_scvi.model.ScForgePerturb moved to scforge_scvi.perturb.ScForgePerturb "
            "(also scforge_scvi.ScForgePerturb); the old name goes in the next release.",
            DeprecationWarning,
            stacklevel=2,
        )
        return ScForgePerturb
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
