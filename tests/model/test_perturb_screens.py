"""The suite of semi-synthetic screens (``make_screen`` in ``benchmarks/semisynthetic.py``).

Small screens built from pbmc68k cells: every kind builds in the common layout, its feature
table has a row per perturbation, its targets are knocked down, and the correlation screen
moves the genes co-expressed with each target.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from helpers import CELL_TYPE, CONTROL, PERT
from scforge_scvi.data._preprocess import log_normalize
from semisynthetic import (
    SCREEN_KINDS,
    control_gene_loadings,
    make_screen,
    perturbation_feature_table,
)

SIZES = {
    "n_genes": 200,
    "n_perturbations": 10,
    "n_cells_per_perturbation": 12,
    "n_controls_per_cell_type": 60,
}


@pytest.fixture(scope="module")
def screens(_pbmc68k_counts_once):
    source = _pbmc68k_counts_once.copy()
    return {
        kind: make_screen(
            kind, source, CELL_TYPE, seed=0, perturbation_key=PERT, control_label=CONTROL, **SIZES
        )
        for kind in SCREEN_KINDS
    }


def _pseudobulk(adata) -> pd.DataFrame:
    """Mean counts per perturbation (rows) and gene (columns), cell types pooled.

    Raw counts, not normalised ones: a screen whose perturbations shrink many genes shrinks
    the library sizes too, which lifts the normalised expression of every other gene.
    """
    x = np.asarray(adata.X.todense())
    return (
        pd.DataFrame(x, columns=adata.var_names)
        .groupby(adata.obs[PERT].to_numpy(), sort=False)
        .mean()
    )


@pytest.mark.parametrize("kind", SCREEN_KINDS)
def test_every_kind_builds_with_a_feature_table_and_knocked_down_targets(screens, kind):
    adata = screens[kind]
    truth = adata.uns["perturbation_truth"]
    perts = [str(p) for p in truth["perturbations"]]
    assert list(adata.obs[PERT].cat.categories) == [CONTROL, *perts]
    assert set(truth["lfc"]) == set(adata.obs[CELL_TYPE].cat.categories)
    if kind == "small":
        assert adata.obs[CELL_TYPE].nunique() == 3
    for lfc in truth["lfc"].values():
        assert lfc.shape == (len(perts), adata.n_vars)
    np.testing.assert_array_equal(adata.X.data, np.round(adata.X.data))

    table = perturbation_feature_table(adata)
    assert list(table.index) == perts
    assert table.shape[1] == (10 if kind == "latent" else 16)
    assert np.isfinite(table.to_numpy()).all()

    bulk = _pseudobulk(adata)
    for p in perts:
        target = truth["targets"][p]
        assert bulk.loc[p, target] < 0.5 * bulk.loc[CONTROL, target], (p, target)


def test_the_feature_table_is_the_targets_control_loadings(screens):
    adata = screens["pathway"]
    truth = adata.uns["perturbation_truth"]
    loadings = control_gene_loadings(adata, PERT, CONTROL)
    targets = [truth["targets"][str(p)] for p in truth["perturbations"]]
    np.testing.assert_allclose(
        perturbation_feature_table(adata).to_numpy(), loadings.loc[targets].to_numpy(), rtol=1e-5
    )


def test_correlation_screen_moves_the_genes_co_expressed_with_the_target(screens):
    adata = screens["correlation"]
    truth = adata.uns["perturbation_truth"]
    is_control = (adata.obs[PERT] == CONTROL).to_numpy()
    x = np.asarray(log_normalize(adata.X[is_control]).todense())
    z = (x - x.mean(0)) / (x.std(0) + 1e-9)
    r = z.T @ z / len(z)  # control cells' gene-gene correlations
    agreement = []
    for lfc in truth["lfc"].values():
        for p, name in enumerate(truth["perturbations"]):
            t = adata.var_names.get_loc(truth["targets"][str(name)])
            moved = np.flatnonzero(lfc[p] != 0)
            moved = moved[moved != t]
            assert 0 < moved.size < adata.n_vars / 4
            agreement.append(np.corrcoef(lfc[p][moved], -r[t, moved])[0, 1])
    # the knockdown moves co-expressed genes down and anti-correlated genes up
    assert np.median(agreement) > 0.5
    assert np.mean(np.asarray(agreement) > 0) > 0.9
