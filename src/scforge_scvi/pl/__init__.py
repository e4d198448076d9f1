"""Plots of training and results, each returning a matplotlib Axes (scanpy-style ``ax``,
``show``, ``save``)."""

from ._plots import (
    confusion_matrix,
    per_class_f1,
    perturbation_deltas,
    training_curves,
    training_history,
)

__all__ = [
    "confusion_matrix",
    "per_class_f1",
    "perturbation_deltas",
    "training_curves",
    "training_history",
]
