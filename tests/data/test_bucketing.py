"""Length-grouped batches: same cells, less padding, embeddings in the cells' order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scforge_scvi import ScForge
from scforge_scvi.data import LengthGroupedSampler, token_lengths


@pytest.fixture
def model(pbmc68k_counts):
    ScForge.setup_anndata(pbmc68k_counts, layer="counts", labels_key="bulk_labels")
    torch.manual_seed(0)
    return ScForge(pbmc68k_counts, hidden_dim=16, num_layers=1, num_heads=2, max_genes=200)


def test_token_lengths_equal_what_the_tokenizer_emits(model, pbmc68k_counts):
    batch = next(iter(model._loader(pbmc68k_counts, None, batch_size=pbmc68k_counts.n_obs)))
    emitted = batch["padding_mask"].sum(1).numpy()
    np.testing.assert_array_equal(model._token_lengths(pbmc68k_counts), emitted)
    dense = pbmc68k_counts.layers["counts"].toarray()
    gene_index = model.gene_match(pbmc68k_counts).vocab_ids
    np.testing.assert_array_equal(token_lengths(dense, gene_index, 200, 1), emitted)


def test_grouped_epoch_sees_every_cell_once_with_less_padding():
    lengths = np.random.default_rng(0).integers(50, 1000, size=1000)

    def padded_tokens(batches):
        return sum(len(b) * lengths[b].max() for b in batches)

    torch.manual_seed(1)
    grouped = list(LengthGroupedSampler(lengths, 32, shuffle=True, group_batches=16))
    torch.manual_seed(1)
    plain = list(LengthGroupedSampler(lengths, 32, shuffle=True, group_batches=1))
    for batches in (grouped, plain):
        np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(1000))
        assert len(batches) == 32
    real = lengths.sum()
    assert real / padded_tokens(grouped) > 0.95 > 0.8 > real / padded_tokens(plain)
    torch.manual_seed(1)  # the epoch's order is drawn from the global generator
    again = list(LengthGroupedSampler(lengths, 32, shuffle=True, group_batches=16))
    assert all(np.array_equal(a, b) for a, b in zip(grouped, again))
    torch.manual_seed(2)
    other = list(LengthGroupedSampler(lengths, 32, shuffle=True, group_batches=16))
    assert not all(np.array_equal(a, b) for a, b in zip(grouped, other))


def test_evaluation_order_is_longest_first_and_fixed():
    lengths = np.array([3, 9, 1, 9, 5])
    batches = list(LengthGroupedSampler(lengths, 2, shuffle=False))
    np.testing.assert_array_equal(np.concatenate(batches), [1, 3, 4, 0, 2])


def test_embeddings_come_back_in_the_order_asked(model, pbmc68k_counts):
    full = model.get_latent_representation()
    picked = np.array([5, 600, 3, 42, 199, 0])
    np.testing.assert_allclose(
        model.get_latent_representation(indices=picked), full[picked], atol=1e-5
    )
    # the same cells one at a time: no batch neighbour changes a cell's embedding
    one = np.concatenate(
        [model.get_latent_representation(indices=[i], batch_size=1) for i in picked]
    )
    np.testing.assert_allclose(one, full[picked], atol=1e-5)


def test_training_with_and_without_grouping_learns(model):
    model.train(max_epochs=2, batch_size=32, plan_kwargs={"lr": 1e-3})
    grouped = model.history["train_loss_epoch"].to_numpy(dtype=float).ravel()
    assert grouped[-1] < grouped[0]
    model.train(max_epochs=1, batch_size=32, group_by_length=False, plan_kwargs={"lr": 1e-3})
    assert np.isfinite(model.history["train_loss_epoch"].to_numpy(dtype=float)).all()
