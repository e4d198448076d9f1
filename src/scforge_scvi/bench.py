"""Deprecated alias of the former ``scforge_scvi.bench`` package, kept for one release.

The annotation scores moved to :mod:`scforge_scvi.model` (``stratified_split`` is now
:func:`~scforge_scvi.model.probe_split`, ``evaluate_annotation`` is
:meth:`~scforge_scvi.ScForge.evaluate`), the perturbation metrics and baselines to
:mod:`scforge_scvi.perturb`.
"""

import warnings

from scforge_scvi.model._evaluate import (
    baseline_logreg,
    classification_scores,
    embedding_quality,
    evaluate_annotation,
    linear_probe,
    logreg_on_cells,
)
from scforge_scvi.model._evaluate import probe_split as stratified_split
from scforge_scvi.perturb import (
    aggregate_metrics,
    control_mean_baseline,
    evaluate_perturbation_predictions,
    linear_baseline,
    normalized_score,
    perturbation_mean_baseline,
)

warnings.warn(
    "scforge_scvi.bench goes in the next release: import the annotation scores from "
    "scforge_scvi.model (stratified_split is now probe_split, evaluate_annotation is "
    "ScForge.evaluate) and the perturbation metrics and baselines from scforge_scvi.perturb.",
    DeprecationWarning,
    stacklevel=2,
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
