"""Calibrated confidence, split-conformal prediction sets and the unknown-cell score of a
fine-tuned classifier, fitted on its validation cells and kept through save and load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from scforge_scvi import ScForge
from scforge_scvi._errors import ScForgeValueError
from scforge_scvi.model._calibration import (
    N_LEVELS,
    Calibration,
    expected_calibration_error,
    tempered,
)

TINY = {"hidden_dim": 32, "num_layers": 1, "num_heads": 2, "max_genes": 64, "head_hidden_dim": 32}
FIT = {"batch_size": 64, "train_size": 0.6, "validation_size": 0.2, "enable_progress_bar": False}
HELD_OUT = "CD14+ Monocyte"


@pytest.fixture(scope="module")
def calibrated(_pbmc68k_counts_once):
    """A classifier fine-tuned without one cell type: its cells are not even registered."""
    adata = _pbmc68k_counts_once.copy()
    known = adata[adata.obs["bulk_labels"] != HELD_OUT].copy()
    ScForge.setup_anndata(known, layer="counts", labels_key="bulk_labels")
    torch.manual_seed(0)
    model = ScForge(known, **TINY)
    model.train(max_epochs=3, **FIT)
    return model, adata


def _codes(model, adata, cells):
    return np.array([list(model.class_names_).index(c) for c in adata.obs["bulk_labels"][cells]])


def test_temperature_lowers_the_log_loss_of_held_out_cells(calibrated):
    """The temperature is fitted on validation cells (before the linear path is refitted on
    them); on the test cells it lowers the log-loss and keeps every predicted class."""
    model, _ = calibrated
    calibration = model.module.calibration
    assert calibration.fitted
    assert int(calibration.n_cells) == len(model.validation_indices_)
    test = model.test_indices_
    raw = model._probabilities(model.adata, test)
    codes = _codes(model, model.adata, test)
    rows = np.arange(len(test))
    loss = -np.log(np.clip(raw[rows, codes], 1e-12, 1)).mean()
    calibrated_loss = -np.log(calibration.calibrated(raw)[rows, codes]).mean()
    assert calibrated_loss < loss
    np.testing.assert_array_equal(calibration.calibrated(raw).argmax(1), raw.argmax(1))


@pytest.mark.parametrize("n", [7, 70, 251, 264, 1000, 1001])
def test_conformal_threshold_is_the_order_statistic_of_split_conformal(n):
    """At coverage c the threshold is the ceil((n + 1) c)-th smallest validation score (the
    largest when that exceeds n), read from the stored quantiles; never below it."""
    scores = np.random.default_rng(n).random(n)
    calibration = Calibration(n_tokens=4, n_classes=3)
    calibration.n_cells.fill_(n)
    levels = np.linspace(0.0, 1.0, N_LEVELS)
    calibration.score_quantiles.copy_(torch.as_tensor(np.quantile(scores, levels, method="higher")))
    ordered = np.sort(scores).astype(np.float32)
    for coverage in (0.5, 0.8, 0.9, 0.95, 0.999):
        k = min(n, int(np.ceil((n + 1) * coverage)))
        if n <= N_LEVELS:
            assert calibration.threshold(coverage) == pytest.approx(ordered[k - 1])
        else:
            assert calibration.threshold(coverage) >= ordered[k - 1]


def test_expected_calibration_error_of_known_cases():
    truth = np.array([0, 0, 1, 1])
    sure_and_right = np.eye(2)[truth]
    assert expected_calibration_error(sure_and_right, truth) == pytest.approx(0.0)
    sure_and_wrong = np.eye(2)[1 - truth]
    assert expected_calibration_error(sure_and_wrong, truth) == pytest.approx(1.0)
    half = np.full((4, 2), 0.5)
    assert expected_calibration_error(half, truth) == pytest.approx(0.0)
    np.testing.assert_allclose(tempered(np.array([[0.2, 0.8]]), 1.0), [[0.2, 0.8]], atol=1e-6)


def test_prediction_sets_cover_held_out_cells_and_grow_with_coverage(calibrated):
    model, _ = calibrated
    adata = model.adata
    model.predict(adata, coverage=0.9)
    test = model.test_indices_
    truth = adata.obs["bulk_labels"].astype(str).to_numpy()[test]
    sets = adata.obs["scforge_prediction_set"].to_numpy()[test]
    covered = np.mean([t in s.split(", ") for t, s in zip(truth, sets)])
    sizes = adata.obs["scforge_prediction_set_size"].to_numpy()[test]
    assert covered >= 0.8  # 0.9 in expectation; about 110 test cells
    assert sizes.mean() < len(model.class_names_) / 2
    probs = adata.obsm["scforge_probabilities"]
    calibration = model.module.calibration
    narrow = calibration.prediction_sets(probs, 0.5)
    wide = calibration.prediction_sets(probs, 0.99)
    assert (narrow <= wide).all() and wide.sum() > narrow.sum()


def test_cells_of_an_unseen_type_score_as_unknown(calibrated):
    model, adata = calibrated
    unseen = (adata.obs["bulk_labels"] == HELD_OUT).to_numpy()
    adata = adata.copy()
    del adata.obs["bulk_labels"]  # a query: no labels, one type the model never saw
    model.predict(adata, unknown_threshold=0.9)
    test = np.zeros(adata.n_obs, bool)
    test[np.flatnonzero(~unseen)[model.test_indices_]] = True
    scored = test | unseen
    score = adata.obs["scforge_unknown_score"].to_numpy()
    assert ((score >= 0) & (score <= 1)).all()
    assert roc_auc_score(unseen[scored], score[scored]) > 0.7
    unknown = (adata.obs["scforge_prediction"] == "unknown").to_numpy()
    assert unknown[unseen].mean() > unknown[test].mean()
    assert unknown[test].mean() < 0.25  # validation cells put the threshold: about 10% flagged


def test_reloaded_model_gives_the_same_confidence_sets_and_scores(calibrated, tmp_path):
    model, _ = calibrated
    query = model.adata[:200].copy()
    model.predict(query, coverage=0.9, unknown_threshold=0.99)
    model.save(str(tmp_path / "model"))
    again = ScForge.load(str(tmp_path / "model"), adata=model.adata)
    reloaded = model.adata[:200].copy()
    again.predict(reloaded, coverage=0.9, unknown_threshold=0.99)
    for column in ("scforge_confidence", "scforge_unknown_score"):
        np.testing.assert_allclose(reloaded.obs[column], query.obs[column], atol=1e-5)
    for column in ("scforge_prediction", "scforge_prediction_set"):
        assert (reloaded.obs[column].astype(str) == query.obs[column].astype(str)).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"coverage": 1.5}, r"coverage=1.5 is not valid: use a number in \(0, 1\)"),
        ({"coverage": 0}, r"coverage=0 is not valid"),
        ({"coverage": True}, r"coverage=True is not valid"),
        ({"unknown_threshold": -0.1}, r"unknown_threshold=-0.1 is not valid: .*\[0, 1\]"),
    ],
)
def test_out_of_range_arguments_are_refused(calibrated, kwargs, message):
    model, _ = calibrated
    with pytest.raises(ScForgeValueError, match=message):
        model.predict(**kwargs)


def test_a_model_without_enough_validation_cells_refuses_prediction_sets(_pbmc68k_counts_once):
    adata = _pbmc68k_counts_once[:300].copy()
    ScForge.setup_anndata(adata, layer="counts", labels_key="bulk_labels")
    model = ScForge(adata, **TINY)
    model.train(max_epochs=1, **{**FIT, "train_size": 0.9, "validation_size": 0.1})
    assert not model.module.calibration.fitted
    model.predict()  # uncalibrated probabilities, no unknown score
    assert "scforge_unknown_score" not in adata.obs
    with pytest.raises(ScForgeValueError, match=r"coverage=0\.9 needs a calibrated classifier"):
        model.predict(coverage=0.9)


def test_evaluate_reports_calibration_error_coverage_and_unknown_rate(calibrated):
    model, _ = calibrated
    scores = model.evaluate(baseline=False, coverage=0.9)
    assert 0 <= scores["ece"] <= 1 and 0 <= scores["ece_uncalibrated"] <= 1
    assert scores["coverage"] >= 0.8
    assert 1 <= scores["mean_set_size"] < len(model.class_names_)
    assert scores["unknown_rate"] < 0.1  # known types only; the threshold flags about 1%
