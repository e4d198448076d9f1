"""Benchmarks: metrics and honest baselines for annotation and perturbation response."""

from scforge_scvi.perturb._metrics import (
    aggregate_metrics,
    control_mean_baseline,
    evaluate_perturbation_predictions,
    linear_baseline,
    normalized_score,
    perturbation_mean_baseline,
)

from ._annotation import (
    baseline_logreg,
    classification_scores,
    embedding_quality,
    evaluate_annotation,
    linear_probe,
    logreg_on_cells,
    stratified_split,
)

__all__ = [
    "aggregate_metrics",
    "baseline_logreg",
    "classification_scores",
    "control_mean_baseline",
    "embedding_quality",
    "evaluate_annotation",
    "evaluate_perturbation_predictions",
    "linear_baseline",
    "linear_probe",
    "logreg_on_cells",
    "normalized_score",
    "perturbation_mean_baseline",
    "stratified_split",
]
