"""Scoring of annotations: macro F1 over the classes that occur among the scored cells."""

import numpy as np
import pytest
import scanpy as sc
from sklearn.metrics import f1_score

from scforge_scvi.bench import classification_scores


@pytest.fixture(scope="module")
def bulk_labels() -> np.ndarray:
    return sc.datasets.pbmc68k_reduced().obs["bulk_labels"].astype(str).to_numpy()


def test_class_without_cells_does_not_lower_macro_f1(bulk_labels):
    classes = np.unique(bulk_labels)
    truth = bulk_labels[bulk_labels != "CD34+"]  # test cells without a single CD34+ cell
    scores = classification_scores(truth, truth, classes, per_class=True)
    assert scores["macro_f1"] == pytest.approx(1.0)
    assert scores["weighted_f1"] == pytest.approx(1.0)
    assert set(scores["per_class_f1"]) == set(classes)  # every class of the model is listed
    assert scores["support"]["CD34+"] == 0


def test_predicted_class_without_cells_scores_zero(bulk_labels):
    classes = np.unique(bulk_labels)
    truth = bulk_labels[bulk_labels != "CD34+"]
    predicted = truth.copy()
    predicted[0] = "CD34+"  # one false positive of a class with no test cell
    scores = classification_scores(truth, predicted, classes, per_class=True)
    assert scores["per_class_f1"]["CD34+"] == 0.0
    # sklearn's own macro F1 over the classes in the truth or the predictions: CD34+ included
    assert scores["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro"))
    assert scores["macro_f1"] < 0.91  # one tenth of the classes scores 0
