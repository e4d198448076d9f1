"""Preprocessing: count checks, normalisation and per-gene medians, on real PBMC counts."""

from __future__ import annotations

import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp

from scforge_scvi.data import (
    GeneVocab,
    Preprocessing,
    check_raw_counts,
    fit_gene_medians,
    library_size,
    log_normalize,
    nonzero_column_medians,
)


@pytest.fixture
def counts(pbmc68k_counts) -> sp.csr_matrix:
    return pbmc68k_counts.layers["counts"]


# -- check_raw_counts ------------------------------------------------------------------------
def test_raw_counts_pass(counts):
    check_raw_counts(counts, "adata.layers['counts']")
    check_raw_counts(counts.toarray(), "adata.X")


@pytest.mark.parametrize(
    ("bad_value", "message"),
    [
        (-1.0, "negative values"),
        (2.5, "non-integer values"),
        (np.nan, "NaN or infinite"),
        (np.inf, "NaN or infinite"),
        (-np.inf, "NaN or infinite"),
    ],
)
@pytest.mark.parametrize("dense", [False, True])
def test_raw_count_errors_name_the_layer(counts, bad_value, message, dense):
    x = counts.copy()
    x.data[7] = bad_value
    where = "adata.layers['counts']"
    with pytest.raises(ValueError, match=message) as err:
        check_raw_counts(x.toarray() if dense else x, where)
    assert where in str(err.value)
    if np.isfinite(bad_value):  # the hint says how to pass raw counts
        assert "layer='counts'" in str(err.value)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -3.0])
def test_a_single_bad_value_deep_in_a_large_matrix_is_found(counts, bad_value):
    # 8 stacked copies of pbmc68k: more stored values than the integer check samples
    big = sp.vstack([counts] * 8, format="csr")
    assert big.nnz > 1_000_000
    check_raw_counts(big, "adata.X")
    big.data[-5] = bad_value  # in the last cell, past the first million values
    with pytest.raises(ValueError, match=r"adata\.X contains (NaN or infinite|negative) values"):
        check_raw_counts(big, "adata.X")


def test_log_normalised_values_rejected(pbmc68k_counts):
    logn = log_normalize(pbmc68k_counts.X)
    with pytest.raises(ValueError, match=r"adata\.X contains non-integer values"):
        check_raw_counts(logn, "adata.X")


# -- normalisation ---------------------------------------------------------------------------
def test_library_size_is_total_counts(counts):
    np.testing.assert_array_equal(library_size(counts), counts.toarray().sum(1))


@pytest.mark.parametrize("dense", [False, True])
def test_log_normalize_matches_scanpy(pbmc68k_counts, dense):
    adata = pbmc68k_counts
    x = adata.X.toarray() if dense else adata.X
    ours = log_normalize(x, target_sum=1e4)
    # the input is left untouched
    np.testing.assert_array_equal(adata.layers["counts"].toarray(), sp.csr_matrix(x).toarray())

    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    reference = adata.X.toarray()

    assert sp.issparse(ours) != dense
    assert ours.dtype == np.float32
    ours = ours.toarray() if sp.issparse(ours) else ours
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)


def test_log_normalize_without_log_sums_to_target(counts):
    normalised = log_normalize(counts, target_sum=1e4, log1p=False)
    np.testing.assert_allclose(np.asarray(normalised.sum(1)).ravel(), 1e4, rtol=1e-5)


def test_zero_count_cell_stays_zero(counts):
    x = counts.tolil()
    x[3, :] = 0
    out = log_normalize(x.tocsr())
    assert np.isfinite(out.data).all()
    assert out[3].sum() == 0
    assert out[4].sum() > 0


# -- per-gene medians ------------------------------------------------------------------------
def _loop_median(counts: sp.csr_matrix, column: int, target_sum: float = 1e4) -> float:
    """Reference: one gene at a time, the median over cells expressing it."""
    total = counts.toarray().astype(np.float64).sum(1)
    col = counts[:, column].toarray().ravel()
    expressed = col > 0
    return float(np.median(col[expressed] / total[expressed] * target_sum))


def test_nonzero_column_medians_match_loop(counts):
    normalised = log_normalize(counts, log1p=False)
    medians = nonzero_column_medians(normalised)
    for column in (0, 1, 17, 100, 500, 764):
        np.testing.assert_allclose(medians[column], _loop_median(counts, column), rtol=1e-5)


def test_nonzero_column_medians_of_unexpressed_gene_is_nan(counts):
    x = counts.tolil()
    x[:, 5] = 0
    medians = nonzero_column_medians(x.tocsr())
    assert np.isnan(medians[5])
    assert np.isfinite(np.delete(medians, 5)).all()


def test_fit_gene_medians_matches_loop(pbmc68k_counts):
    adata = pbmc68k_counts
    vocab = GeneVocab.from_adata(adata)
    # shuffle the columns: the statistics must still land on the right vocabulary ids
    rng = np.random.default_rng(0)
    shuffled = adata[:, rng.permutation(adata.n_vars)].copy()
    match = vocab.match(shuffled)
    fitted = fit_gene_medians(shuffled.layers["counts"], match.vocab_ids, vocab)

    assert fitted.gene_medians.shape == (len(vocab),)
    assert vocab.gene_medians is None  # the input vocabulary is not modified
    original = adata.layers["counts"]
    for gene in ("CD3D", "LYZ", "MS4A1", "NKG7", "FCER1A"):
        column = adata.var_names.get_loc(gene)
        np.testing.assert_allclose(
            fitted.gene_medians[vocab.token_to_id(gene)], _loop_median(original, column), rtol=1e-5
        )


def test_unseen_genes_get_the_median_of_fitted_medians(pbmc68k_counts):
    adata = pbmc68k_counts
    genes = [*adata.var_names, "NOT_IN_DATA"]
    vocab = GeneVocab.from_genes(genes)
    fitted = fit_gene_medians(adata.X, vocab.match(adata).vocab_ids, vocab)
    seen = fitted.gene_medians[vocab.n_special : vocab.n_special + adata.n_vars]
    assert fitted.gene_medians[vocab.token_to_id("NOT_IN_DATA")] == np.float32(np.median(seen))
    assert np.all(fitted.gene_medians > 0)


def test_gene_medians_are_not_refitted_silently(pbmc68k_counts):
    adata = pbmc68k_counts
    vocab = GeneVocab.from_adata(adata)
    ids = vocab.match(adata).vocab_ids
    fitted = fit_gene_medians(adata.X, ids, vocab)
    with pytest.raises(ValueError, match="refit=True"):
        fit_gene_medians(adata.X[:100], ids, fitted)
    refitted = fit_gene_medians(adata.X[:100], ids, fitted, refit=True)
    assert not np.array_equal(refitted.gene_medians, fitted.gene_medians)


# -- Preprocessing config --------------------------------------------------------------------
def test_preprocessing_round_trip_and_validation():
    config = Preprocessing(target_sum=1e6, log1p=False)
    assert Preprocessing.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="library_size"):
        Preprocessing(normalize="cpm")
    with pytest.raises(ValueError, match="target_sum"):
        Preprocessing(target_sum=0)
    with pytest.raises(ValueError, match="Unknown preprocessing keys"):
        Preprocessing.from_dict({"normalise": "library_size"})
