"""Scoring of annotations: macro F1 over the classes that occur among the scored cells, the
probes' cell split, and the deprecated ``scforge_scvi.bench`` alias."""

import importlib
import sys

import numpy as np
import pytest
import scanpy as sc
from sklearn.metrics import f1_score

import scforge_scvi
from scforge_scvi import perturb
from scforge_scvi.model import classification_scores, linear_probe, probe_split


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


def test_probe_split_is_seeded_and_stratified(bulk_labels):
    train, held_out = probe_split(bulk_labels, 0.8, seed=3)
    again, _ = probe_split(bulk_labels, 0.8, seed=3)
    np.testing.assert_array_equal(train, again)
    assert len(np.intersect1d(train, held_out)) == 0
    assert len(train) + len(held_out) == len(bulk_labels)
    assert len(held_out) == round(0.2 * len(bulk_labels))
    assert set(bulk_labels[held_out]) == set(bulk_labels)  # every label on both sides


def test_linear_probe_scores_the_held_out_cells(bulk_labels):
    embedding = np.eye(len(np.unique(bulk_labels)))[np.unique(bulk_labels, return_inverse=True)[1]]
    scores = linear_probe(embedding, bulk_labels, train_split=0.8, seed=0)
    train, held_out = probe_split(bulk_labels, 0.8, seed=0)
    assert (scores["n_train"], scores["n_cells"]) == (len(train), len(held_out))
    assert scores["macro_f1"] == pytest.approx(1.0)


def test_bench_is_a_deprecated_alias(monkeypatch):
    monkeypatch.delitem(sys.modules, "scforge_scvi.bench", raising=False)
    monkeypatch.delitem(vars(scforge_scvi), "bench", raising=False)
    with pytest.warns(DeprecationWarning, match="scforge_scvi.bench goes"):
        bench = scforge_scvi.bench
    assert bench is importlib.import_module("scforge_scvi.bench")
    assert bench.classification_scores is classification_scores
    assert bench.stratified_split is probe_split
    assert bench.evaluate_perturbation_predictions is perturb.evaluate_perturbation_predictions
