"""Registry keys and the AnnData keys scforge writes."""

from typing import NamedTuple

from scvi import REGISTRY_KEYS


class _ScForgeRegistryKeys(NamedTuple):
    X_KEY: str = REGISTRY_KEYS.X_KEY
    BATCH_KEY: str = REGISTRY_KEYS.BATCH_KEY
    LABELS_KEY: str = REGISTRY_KEYS.LABELS_KEY
    TARGET_KEY: str = "target"  # numeric obs column for regression fine-tuning


class _ScForgeOutputKeys(NamedTuple):
    EMBEDDING: str = "X_scforge"
    PREDICTION: str = "scforge_prediction"
    CONFIDENCE: str = "scforge_confidence"
    PROBABILITIES: str = "scforge_probabilities"
    UNS: str = "scforge"


SCFORGE_REGISTRY_KEYS = _ScForgeRegistryKeys()
SCFORGE_OUTPUT_KEYS = _ScForgeOutputKeys()
