"""Plots: training curves and confusion matrices (scanpy-style ``ax``, ``show``, ``save``)."""

from ._plots import confusion_matrix, training_curves

__all__ = ["confusion_matrix", "training_curves"]
