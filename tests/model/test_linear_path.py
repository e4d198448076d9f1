"""The linear path of the annotation head: a logistic regression on log-normalised genes,
mixed with the transformer's head by a share chosen on validation cells."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from scforge_scvi import ScForge
from scforge_scvi._errors import ScForgeValueError
from scforge_scvi.data._preprocess import log_normalize
from scforge_scvi.model._linear import (
    MIN_VALIDATION_CELLS,
    choose_mix,
    features,
    fit_logreg,
    softmax,
    spread_labels,
)

TINY = {"hidden_dim": 32, "num_layers": 1, "num_heads": 2, "max_genes": 64, "head_hidden_dim": 32}
FIT = {"batch_size": 64, "train_size": 0.7, "validation_size": 0.15, "enable_progress_bar": False}


@pytest.fixture(scope="module")
def finetuned(_pbmc68k_counts_once):
    adata = _pbmc68k_counts_once.copy()
    ScForge.setup_anndata(adata, layer="counts", labels_key="bulk_labels")
    torch.manual_seed(0)
    model = ScForge(adata, **TINY)
    model.train(max_epochs=2, **FIT)
    return model


def test_features_are_log_normalised_counts_in_token_columns(pbmc68k_counts):
    counts = sp.csr_matrix(pbmc68k_counts.layers["counts"])
    ids = np.arange(counts.shape[1])[::-1] + 4  # reversed token order after 4 specials
    ids[:10] = -1  # genes outside the vocabulary
    x = features(counts, ids, counts.shape[1] + 4, 1e4)
    expected = log_normalize(counts).toarray()  # library size over every registered gene
    np.testing.assert_allclose(x[:, ids[10:]].toarray(), expected[:, 10:], rtol=1e-6)
    assert x[:, :4].nnz == 0 and x.shape == (counts.shape[0], counts.shape[1] + 4)


def test_folded_logistic_regression_matches_scikit_learns_pipeline(pbmc68k_counts):
    x = log_normalize(sp.csr_matrix(pbmc68k_counts.layers["counts"]))
    labels = pbmc68k_counts.obs["bulk_labels"].cat.codes.to_numpy()
    weight, bias = fit_logreg(x, labels, labels.max() + 1)
    dense = x.toarray()
    scaler = StandardScaler().fit(dense)
    clf = LogisticRegression(max_iter=2000, random_state=0).fit(scaler.transform(dense), labels)
    np.testing.assert_allclose(
        softmax(np.asarray(x @ weight.T) + bias),
        clf.predict_proba(scaler.transform(dense)),
        atol=1e-4,
    )


def test_a_class_without_training_cells_is_never_predicted_by_the_linear_path(pbmc68k_counts):
    x = log_normalize(sp.csr_matrix(pbmc68k_counts.layers["counts"]))
    labels = pbmc68k_counts.obs["louvain"].cat.codes.to_numpy()
    weight, bias = fit_logreg(x, labels, labels.max() + 2)  # one extra, absent class
    assert (softmax(np.asarray(x @ weight.T) + bias)[:, -1] < 1e-6).all()


def test_share_goes_to_the_better_path_and_falls_back_to_linear_on_few_cells():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 3, 200)
    right = np.eye(3)[codes] * 0.8 + 0.2 / 3
    wrong = np.eye(3)[(codes + 1) % 3] * 0.8 + 0.2 / 3
    assert choose_mix(right, wrong, codes) == 1.0
    assert choose_mix(wrong, right, codes) == 0.5  # the backbone keeps half its optimal share
    assert choose_mix(right, right, codes) == 1.0  # a tie goes to the linear path
    few = MIN_VALIDATION_CELLS - 1
    assert choose_mix(wrong[:few], right[:few], codes[:few]) == 1.0
    lone = np.append(codes, 3)  # a class with a single validation cell does not decide
    padded = np.pad(right, ((0, 1), (0, 1)), constant_values=0.01)
    assert choose_mix(np.pad(wrong, ((0, 1), (0, 1)), constant_values=0.01), padded, lone) == 0.5


def test_default_prediction_mixes_the_two_paths_with_the_chosen_share(finetuned):
    """The default probabilities are the calibrated mixture of the two paths."""
    mix = float(finetuned.module.linear_path.mix)
    assert finetuned.module.linear_path.fitted and 0.0 <= mix <= 1.0
    paths = {h: finetuned._probabilities(finetuned.adata, head=h) for h in ("backbone", "linear")}
    default = finetuned.predict(return_probabilities=True).to_numpy()
    mixture = mix * paths["linear"] + (1 - mix) * paths["backbone"]
    np.testing.assert_allclose(default, finetuned.module.calibration.calibrated(mixture), atol=1e-5)
    np.testing.assert_allclose(default.sum(1), 1.0, atol=1e-5)


def test_linear_path_alone_is_the_printed_baseline(finetuned):
    scores = finetuned.evaluate()
    # same cells, same regression; the baseline picks its HVGs on its own training cells
    assert abs(scores["linear_macro_f1"] - scores["baseline_logreg"]["macro_f1"]) < 0.05
    assert {"backbone_macro_f1", "linear_path_share"} <= set(scores)


def test_reloaded_model_predicts_identically_with_genes_reordered(finetuned, tmp_path):
    before = finetuned.predict(return_probabilities=True).to_numpy()
    finetuned.save_pretrained(str(tmp_path / "m"))
    reordered = finetuned.adata[:, ::-1].copy()
    for key in ("_scvi_uuid", "_scvi_manager_uuid"):  # a copy inherits its parent's setup
        reordered.uns.pop(key, None)
    ScForge.setup_anndata(reordered, layer="counts", labels_key="bulk_labels")
    reloaded = ScForge.from_pretrained(str(tmp_path / "m"), reordered)
    assert float(reloaded.module.linear_path.mix) == float(finetuned.module.linear_path.mix)
    np.testing.assert_allclose(
        reloaded.predict(return_probabilities=True).to_numpy(), before, atol=1e-5
    )


def test_without_the_linear_path_the_transformer_head_predicts_alone(_pbmc68k_counts_once):
    adata = _pbmc68k_counts_once[:300].copy()
    ScForge.setup_anndata(adata, layer="counts", labels_key="bulk_labels")
    model = ScForge(adata, **TINY)
    model.train(max_epochs=1, linear_path=False, **FIT)
    assert not model.module.linear_path.fitted
    np.testing.assert_allclose(
        model.predict(return_probabilities=True).to_numpy(),
        model._probabilities(adata, head="backbone"),
        atol=1e-6,
    )
    with pytest.raises(ScForgeValueError, match="linear path is not fitted"):
        model.predict(head="linear")
    with pytest.raises(ScForgeValueError, match="head='both' is not valid"):
        model.predict(head="both")


def test_few_labelled_cells_spread_their_labels_to_the_unlabelled_ones(_pbmc68k_counts_once):
    """Most cells registered as the unlabelled category: the labels spread to the other
    training cells mostly right, the linear path is the regression on all training and
    validation cells with those labels (too few validation cells to mix: it predicts alone),
    and every cell, unlabelled ones included, gets a known label."""
    adata = _pbmc68k_counts_once.copy()
    truth = adata.obs["bulk_labels"].astype(str).to_numpy()
    labelled = np.random.default_rng(0).random(adata.n_obs) < 0.2
    adata.obs["few"] = np.where(labelled, truth, "Unknown")
    ScForge.setup_anndata(adata, layer="counts", labels_key="few", unlabeled_category="Unknown")
    torch.manual_seed(0)
    model = ScForge(adata, **TINY)
    model.train(max_epochs=1, **FIT)
    assert "Unknown" not in model.class_names_
    assert labelled[model.validation_indices_].sum() < MIN_VALIDATION_CELLS
    assert float(model.module.linear_path.mix) == 1.0

    names = list(model.class_names_)
    cells = np.union1d(model.train_indices_, model.validation_indices_)
    x = features(adata.layers["counts"], model.gene_match().vocab_ids, len(model.vocab), 1e4, cells)
    codes = np.array([names.index(c) for c in truth[cells]])
    given = np.where(labelled[cells], codes, len(names))
    spread = spread_labels(x, given, len(names))
    np.testing.assert_array_equal(spread[labelled[cells]], codes[labelled[cells]])
    # always predicting the largest class would be right for about a third of them
    assert (spread == codes)[~labelled[cells]].mean() > 0.65
    weight, bias = fit_logreg(x, spread, len(names))
    np.testing.assert_allclose(model.module.linear_path.weight.numpy(), weight, atol=1e-5)
    np.testing.assert_allclose(model.module.linear_path.bias.numpy(), bias, atol=1e-4)
    model.predict()
    assert set(adata.obs["scforge_prediction"]) <= set(model.class_names_)
