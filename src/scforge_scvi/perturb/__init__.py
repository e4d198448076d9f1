"""Perturbation response in the style of a state-transition model: sets of control cells
mapped to sets of perturbed cells.

The package holds everything of the feature, as an ``scvi.external`` package does: the
model class (:class:`ScForgePerturb`), its torch module, data and set sampling, training
plan, losses and checkpoints, and the metrics and baselines that score its predictions.
"""

from ._data import assign_perturbation_split
from ._metrics import (
    aggregate_metrics,
    compare_predictions,
    control_mean_baseline,
    evaluate_perturbation_predictions,
    linear_baseline,
    normalized_score,
    perturbation_mean_baseline,
)
from ._model import ScForgePerturb
from ._module import PerturbConfig

__all__ = [
    "PerturbConfig",
    "ScForgePerturb",
    "aggregate_metrics",
    "assign_perturbation_split",
    "compare_predictions",
    "control_mean_baseline",
    "evaluate_perturbation_predictions",
    "linear_baseline",
    "normalized_score",
    "perturbation_mean_baseline",
]
