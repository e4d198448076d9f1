"""Optional HVG selection: chosen once on the training data, then part of the model.

The data keep all their genes; only the selected ones have tokens. Their share of the data's
genes (200 of 765 here) is below the default ``min_coverage`` of 0.5, so a selected
vocabulary is checked by the share of its own genes found in the data instead.
"""

from __future__ import annotations

import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp
import torch

from helpers import setup_counts
from scforge_scvi import ScForge

TINY = {"hidden_dim": 16, "num_layers": 1, "num_heads": 2, "max_genes": 32}
N_TOP = 200
MIN_COVERAGE = 0.2


@pytest.fixture(scope="module")
def counts(_pbmc68k_counts_once):
    return setup_counts(_pbmc68k_counts_once.copy())


@pytest.fixture(scope="module")
def model(counts):
    torch.manual_seed(0)
    return ScForge(
        setup_counts(counts.copy()),
        min_coverage=MIN_COVERAGE,
        **TINY,
        preprocessing={"n_top_genes": N_TOP},
    )


def _scanpy_hvg(adata, n_top_genes=None):
    """The reference: scanpy's own HVG table on log-normalised counts."""
    reference = sc.AnnData(adata.layers["counts"].copy(), var=adata.var[[]].copy())
    sc.pp.normalize_total(reference, target_sum=1e4)
    sc.pp.log1p(reference)
    return sc.pp.highly_variable_genes(reference, n_top_genes=n_top_genes, inplace=False)


def test_vocabulary_holds_the_highly_variable_genes(model, counts):
    expected = set(counts.var_names[_scanpy_hvg(counts, N_TOP)["highly_variable"].to_numpy()])
    assert model.vocab.n_genes == N_TOP
    assert set(model.vocab.genes) == expected
    assert model.preprocessing.n_top_genes == N_TOP

    # tokens only ever name selected genes
    batch = model.tokenizer(counts.layers["counts"][:50], model.gene_match(counts).vocab_ids)
    genes = batch.gene_ids[batch.padding_mask & (batch.gene_ids >= model.vocab.n_special)]
    names = {model.vocab.id_to_token(int(i)) for i in genes.unique()}
    assert names <= expected and len(names) > 50


def test_selection_is_not_redone_on_new_data(model, counts, tmp_path):
    model.save_pretrained(str(tmp_path / "hvg"))
    # another set of cells would select other genes; the model keeps its own
    query = setup_counts(counts[400:].copy())
    reloaded = ScForge.from_pretrained(str(tmp_path / "hvg"), query)
    assert reloaded.vocab.genes == model.vocab.genes
    assert reloaded.preprocessing.n_top_genes == N_TOP
    np.testing.assert_allclose(
        reloaded.get_latent_representation(),
        model.get_latent_representation(counts, indices=np.arange(400, counts.n_obs)),
        atol=1e-5,
    )


def test_hvg_selection_works_at_the_default_coverage(counts):
    model = ScForge(setup_counts(counts.copy()), **TINY, preprocessing={"n_top_genes": N_TOP})
    assert model.vocab.n_genes == N_TOP


def test_hvg_selection_leaves_the_users_counts_alone(counts):
    adata = setup_counts(counts.copy())
    ScForge(adata, min_coverage=MIN_COVERAGE, **TINY, preprocessing={"n_top_genes": N_TOP})
    assert (adata.layers["counts"] != counts.layers["counts"]).nnz == 0


def test_a_tie_at_the_cut_still_selects_exactly_n_top_genes(counts):
    # a copy of the N_TOP-th most variable gene ties with it; ask for the number of genes that
    # ends on the tied pair, where scanpy selects both
    order = np.argsort(-_scanpy_hvg(counts)["dispersions_norm"].to_numpy(), kind="stable")
    gene = counts.var_names[order[N_TOP - 1]]
    column = counts[:, gene].layers["counts"]
    tied = sc.AnnData(
        X=sp.hstack([counts.layers["counts"], column]).tocsr(),
        obs=counts.obs[[]].copy(),
    )
    tied.var_names = [*counts.var_names, f"{gene}-copy"]
    tied.layers["counts"] = tied.X.copy()
    dispersion = _scanpy_hvg(tied)["dispersions_norm"].to_numpy()
    assert dispersion[-1] == dispersion[counts.var_names.get_loc(gene)]
    n_top = int((dispersion > dispersion[-1]).sum()) + 1
    assert _scanpy_hvg(tied, n_top)["highly_variable"].sum() == n_top + 1  # scanpy keeps the tie

    model = ScForge(
        setup_counts(tied), min_coverage=MIN_COVERAGE, **TINY, preprocessing={"n_top_genes": n_top}
    )
    assert model.vocab.n_genes == n_top
    assert gene in model.vocab.genes and f"{gene}-copy" not in model.vocab.genes
