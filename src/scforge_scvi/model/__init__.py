"""scvi-tools model classes: the public face of scforge_scvi."""

from ._cell_encoder import ScForgeCellEncoder
from ._constants import SCFORGE_OUTPUT_KEYS, SCFORGE_REGISTRY_KEYS
from ._model import ScForge
from ._module import ScForgeModule
from ._perturb_model import ScForgePerturb

__all__ = [
    "SCFORGE_OUTPUT_KEYS",
    "SCFORGE_REGISTRY_KEYS",
    "ScForge",
    "ScForgeCellEncoder",
    "ScForgeModule",
    "ScForgePerturb",
]
