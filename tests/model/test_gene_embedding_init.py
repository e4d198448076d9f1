"""``ScForge(gene_embedding_init="pca")``: gene embeddings start from the cells' PCA loadings."""

from __future__ import annotations

import numpy as np
import pytest
import scanpy as sc
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from helpers import setup_counts
from scforge_scvi import ScForge
from scforge_scvi._errors import ScForgeValueError

TINY = {"hidden_dim": 16, "num_layers": 1, "num_heads": 2, "max_genes": 64}
N_TOP = 200


@pytest.fixture(scope="module")
def counts(_pbmc68k_counts_once):
    return setup_counts(_pbmc68k_counts_once.copy())


def _model(counts, init):
    torch.manual_seed(0)
    return ScForge(counts, **TINY, architecture={"gene_embedding_init": init})


def test_gene_embeddings_are_scanpys_pca_loadings_of_the_vocabulary_genes(counts):
    torch.manual_seed(0)
    model = ScForge(
        counts,
        min_coverage=0.2,
        **TINY,
        preprocessing={"n_top_genes": N_TOP},
        architecture={"gene_embedding_init": "pca"},
    )
    genes = model.vocab.genes  # in token order, after the special tokens
    reference = sc.AnnData(counts.layers["counts"].copy(), var=counts.var[[]].copy())
    sc.pp.normalize_total(reference, target_sum=1e4)  # over all genes, as the tokenizer does
    sc.pp.log1p(reference)
    reference = reference[:, genes].copy()
    sc.pp.scale(reference, max_value=10)
    sc.pp.pca(reference, n_comps=TINY["hidden_dim"], random_state=0)
    expected = reference.varm["PCs"]  # (genes, components)

    weight = model.module.backbone.gene_embedding.weight.detach().numpy()
    rows = weight[model.vocab.n_special :]  # token id = position in `genes` + n_special
    assert rows.std() == pytest.approx(0.02, rel=1e-3)  # the scale of the random init
    for k in range(5):  # the leading components, up to their sign
        assert abs(np.corrcoef(rows[:, k], expected[:, k])[0, 1]) > 0.99
    # the special tokens keep their own vectors: <pad> stays zero
    assert not weight[model.vocab.pad_id].any()


def test_pca_start_makes_the_untrained_embedding_tell_cell_types_apart(counts):
    labels = counts.obs["bulk_labels"].astype(str).to_numpy()

    def probe(model):
        z = model.get_latent_representation()
        z = (z - z.mean(0)) / z.std(0)
        probe = LogisticRegression(max_iter=2000)
        return cross_val_score(probe, z, labels, cv=3, scoring="f1_macro").mean()

    random_f1, pca_f1 = probe(_model(counts, "random")), probe(_model(counts, "pca"))
    assert pca_f1 > random_f1 + 0.1, (random_f1, pca_f1)


def test_a_pca_started_model_reloads_its_trained_weights(counts, tmp_path, monkeypatch):
    model = _model(counts, "pca")
    model.train(max_epochs=1, seed=0, limit_train_batches=4, batch_size=64, enable_progress_bar=False, plan_kwargs={"lr": 3e-3})  # fmt: skip
    model.save_pretrained(str(tmp_path / "pca"))

    def no_decomposition(*args, **kwargs):
        raise AssertionError("the checkpoint's weights replace the PCA start: not computed")

    monkeypatch.setattr("scforge_scvi.model._model.gene_pca_loadings", no_decomposition)
    loaded = ScForge.from_pretrained(str(tmp_path / "pca"), counts)
    assert loaded.architecture.gene_embedding_init == "pca"
    assert loaded.init_params_["non_kwargs"]["architecture"]["gene_embedding_init"] == "pca"
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation()
    )


def test_an_unknown_gene_embedding_init_names_the_choices(counts):
    with pytest.raises(ScForgeValueError, match=r"gene_embedding_init.*'random', 'pca'.*'svd'"):
        ScForge(counts, **TINY, architecture={"gene_embedding_init": "svd"})
