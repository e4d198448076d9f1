"""Backed AnnData (``read_h5ad(path, backed="r")``): registered, trained and applied like an
in-memory one, with ``X`` read from the file a block of rows at a time, never whole."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from anndata.abc import CSRDataset

import scforge_scvi as sf
from scforge_scvi._errors import ScForgeValueError
from scforge_scvi.data import _genes, _preprocess

TINY = {"hidden_dim": 16, "num_layers": 1, "num_heads": 2, "max_genes": 48}
TINY["architecture"] = {"ffn_dim": 32}
QUIET = {"batch_size": 32, "enable_progress_bar": False, "accelerator": "cpu", "logger": False}
BLOCK = 100  # rows of a backed matrix read at a time in these tests


@pytest.fixture
def files(pbmc68k_counts, tmp_path):
    """The PBMC counts in X of an .h5ad file: the in-memory AnnData and the backed one."""
    adata = pbmc68k_counts
    del adata.layers["counts"]
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    return ad.read_h5ad(path), ad.read_h5ad(path, backed="r")


@pytest.fixture
def reads(monkeypatch):
    """Row counts of every read of a backed sparse X (reads of whole X would show as 700)."""
    from anndata._core.sparse_dataset import BaseCompressedSparseDataset as Backed

    sizes: list[int] = []
    original = Backed.__getitem__

    def recording(self, key):
        out = original(self, key)
        sizes.append(out.shape[0])
        return out

    monkeypatch.setattr(Backed, "__getitem__", recording)
    monkeypatch.setattr(_preprocess, "_CHECK_ROWS", BLOCK)
    return sizes


def test_backed_setup_checks_counts_in_row_blocks(files, reads):
    _, backed = files
    sf.ScForge.setup_anndata(backed, labels_key="louvain")
    assert reads and max(reads) <= BLOCK
    assert sum(reads) >= backed.n_obs  # every cell checked (scvi-tools reads a few itself)
    assert isinstance(backed.X, CSRDataset)  # still on disk


def test_embeddings_of_a_backed_anndata_equal_the_in_memory_ones(files, reads):
    memory, backed = files
    sf.ScForge.setup_anndata(memory, labels_key="louvain")
    sf.ScForge.setup_anndata(backed, labels_key="louvain")
    torch.manual_seed(0)
    model = sf.ScForge(memory, **TINY)
    model.train(max_epochs=1, **QUIET)
    reads.clear()
    expected = model.get_latent_representation(memory, batch_size=50)
    np.testing.assert_allclose(
        model.get_latent_representation(backed, batch_size=50), expected, atol=1e-5
    )
    assert max(reads) <= 50  # one minibatch at a time
    picked = np.array([650, 3, 400, 2, 10])  # any order: rows come back in the order asked
    np.testing.assert_allclose(
        model.get_latent_representation(backed, indices=picked), expected[picked], atol=1e-5
    )
    model.embed(backed)
    model.predict(backed)
    model.embed(memory)
    model.predict(memory)
    np.testing.assert_allclose(backed.obsm["X_scforge"], memory.obsm["X_scforge"], atol=1e-5)
    np.testing.assert_allclose(
        backed.obsm["scforge_probabilities"], memory.obsm["scforge_probabilities"], atol=1e-5
    )
    assert (backed.obs["scforge_prediction"] == memory.obs["scforge_prediction"]).mean() > 0.99


def test_a_model_trains_on_a_backed_anndata(files, reads):
    """Built on the backed file, a model has the in-memory model's vocabulary statistics and
    weights; it trains and evaluates reading minibatches from the file."""
    memory, backed = files
    sf.ScForge.setup_anndata(memory, labels_key="louvain")
    sf.ScForge.setup_anndata(backed, labels_key="louvain")
    torch.manual_seed(0)
    from_memory = sf.ScForge(memory, **TINY)
    torch.manual_seed(0)
    model = sf.ScForge(backed, **TINY)
    np.testing.assert_array_equal(model.vocab.gene_medians, from_memory.vocab.gene_medians)
    np.testing.assert_allclose(
        model.get_latent_representation(backed),
        from_memory.get_latent_representation(memory),
        atol=1e-5,
    )
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    reads.clear()
    model.train(max_epochs=2, train_size=0.8, validation_size=0.1, **QUIET)
    assert max(reads) <= QUIET["batch_size"]
    assert any(not torch.equal(before[k], v) for k, v in model.module.state_dict().items())
    assert isinstance(backed.X, CSRDataset)
    np.testing.assert_allclose(
        model.get_latent_representation(backed),
        model.get_latent_representation(memory),
        atol=1e-5,
    )
    scores = model.evaluate()
    assert scores["n_cells"] == len(model.test_indices_) and 0 <= scores["accuracy"] <= 1


def test_statistics_of_a_large_backed_file_are_fitted_on_a_sample(
    files, reads, monkeypatch, caplog
):
    _, backed = files
    monkeypatch.setattr(_genes, "BACKED_FIT_CELLS", 300)
    monkeypatch.setattr(logging.getLogger("scforge_scvi"), "propagate", True)
    sf.ScForge.setup_anndata(backed)
    reads.clear()
    with caplog.at_level(logging.INFO, logger="scforge_scvi"):
        model = sf.ScForge(backed, **TINY, preprocessing={"n_top_genes": 200})
    assert "on 300 of the 700 cells of the backed file" in caplog.text
    assert max(reads) <= BLOCK
    assert model.vocab.n_genes == 200 and np.isfinite(model.vocab.gene_medians).all()


def test_bad_values_in_a_backed_file_are_found_and_named(pbmc68k_counts, tmp_path, reads):
    adata = pbmc68k_counts
    x = adata.X.tocsr(copy=True)
    x.data[-1] = np.nan  # in the last block
    adata.X = x
    path = tmp_path / "nan.h5ad"
    adata.write_h5ad(path)
    with pytest.raises(
        ScForgeValueError, match=r"adata\.X \(backed by '.*nan\.h5ad'\) contains NaN"
    ):
        sf.ScForge.setup_anndata(ad.read_h5ad(path, backed="r"))


def test_unusable_backed_data_is_refused_with_what_to_do(files, tmp_path):
    memory, backed = files
    with pytest.raises(ScForgeValueError, match=r"subset \(view\) of the backed file.*to_memory"):
        sf.ScForge.setup_anndata(backed[:100])
    csc = memory.copy()
    csc.X = sp.csc_matrix(csc.X)
    csc.write_h5ad(tmp_path / "csc.h5ad")
    with pytest.raises(ScForgeValueError, match=r"column by column \(CSC\).*tocsr"):
        sf.ScForge.setup_anndata(ad.read_h5ad(tmp_path / "csc.h5ad", backed="r"))
    sf.ScForge.setup_anndata(memory)
    model = sf.ScForge(memory, **TINY)
    with pytest.raises(ScForgeValueError, match=r"needs streamed cells.*backed='r'"):
        model.train(max_epochs=1, distributed="ddp", devices=2, accelerator="cpu")
