"""Benchmarks: metrics and honest baselines for annotation (and perturbation, see its module)."""

from ._annotation import (
    baseline_logreg,
    classification_scores,
    embedding_quality,
    linear_probe,
    stratified_split,
)

__all__ = [
    "baseline_logreg",
    "classification_scores",
    "embedding_quality",
    "linear_probe",
    "stratified_split",
]
