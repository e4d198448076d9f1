"""End to end: a tiny ScForge pretrained on real PBMC counts, saved, reloaded and applied.

One model is trained once per module (warmup + cosine schedule, checkpoints written) and
shared by the tests that only read it; the few tests that need their own training run keep
it to one short epoch.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import scanpy as sc
import torch
from lightning.pytorch import Callback

from helpers import setup_counts
from scforge_scvi import ScForge

TINY = {"hidden_dim": 32, "num_layers": 1, "num_heads": 2, "max_genes": 64}
LR, WARMUP, MIN_LR_RATIO, EPOCHS = 3e-3, 5, 0.1, 6
QUIET = {"batch_size": 64, "enable_progress_bar": False}


class LearningRateRecorder(Callback):
    """Record the learning rate of every optimizer step, and the one left after training."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.final: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_end(self, trainer, pl_module) -> None:
        self.final = trainer.optimizers[0].param_groups[0]["lr"]


@pytest.fixture(scope="module")
def counts(_pbmc68k_counts_once):
    return setup_counts(_pbmc68k_counts_once.copy())


@pytest.fixture(scope="module")
def trained(counts, tmp_path_factory):
    """(model, learning-rate recorder, checkpoint dir) after a short pretraining run."""
    ckpt_dir = tmp_path_factory.mktemp("checkpoints")
    recorder = LearningRateRecorder()
    torch.manual_seed(0)
    model = ScForge(counts, **TINY)
    model.train(
        max_epochs=EPOCHS,
        checkpoint_dir=str(ckpt_dir),
        callbacks=[recorder],
        seed=0,
        **QUIET,
        plan_kwargs={"lr": LR, "warmup_steps": WARMUP, "min_lr_ratio": MIN_LR_RATIO},
    )
    return model, recorder, ckpt_dir


@pytest.fixture(scope="module")
def embedding(trained):
    return trained[0].get_latent_representation()


def _untrained_val_loss(adata) -> float:
    """Validation loss of a fresh model: same split and masks, a learning rate of zero."""
    torch.manual_seed(0)
    fresh = ScForge(adata, **TINY)
    fresh.train(max_epochs=1, seed=0, limit_train_batches=1, **QUIET, plan_kwargs={"lr": 0.0})
    return float(fresh.history["val_loss"].to_numpy().ravel()[0])


def test_pretraining_lowers_the_masked_gene_loss(trained, counts):
    model = trained[0]
    val = model.history["val_loss"].to_numpy().ravel().astype(float)
    assert len(val) == EPOCHS
    start = _untrained_val_loss(counts)
    assert np.log(len(model.vocab)) - 0.3 < start  # untrained: about uniform over the genes
    # from ~6.65 nats untrained to ~6.25: the perplexity of masked genes drops by a third
    assert val.min() < start - 0.25
    assert val[-1] < val[0]
    assert model.best_epoch_ == int(np.argmin(val))


def test_save_and_load_round_trip(trained, counts, embedding, tmp_path):
    model = trained[0]
    model.save(str(tmp_path / "scvi"), overwrite=True)
    loaded = ScForge.load(str(tmp_path / "scvi"), adata=counts)
    np.testing.assert_array_equal(loaded.get_latent_representation(), embedding)


def test_pretrained_round_trip_never_unpickles(trained, counts, embedding, tmp_path, monkeypatch):
    path = tmp_path / "pretrained"
    trained[0].save_pretrained(str(path))
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json",
        "gene_vocab.json",
        "model.safetensors",
    ]

    def refuse(*args, **kwargs):
        raise AssertionError("a pretrained directory must load without unpickling")

    for owner, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(owner, name, refuse)
    loaded = ScForge.from_pretrained(str(path), counts)
    monkeypatch.undo()
    assert not loaded.load_report_.initialised
    np.testing.assert_array_equal(loaded.get_latent_representation(), embedding)


def test_gene_order_does_not_matter(trained, counts, embedding, tmp_path):
    model = trained[0]
    perm = np.random.default_rng(0).permutation(counts.n_vars)
    shuffled = setup_counts(counts[:, perm].copy())
    np.testing.assert_allclose(model.get_latent_representation(shuffled), embedding, atol=1e-6)
    model.save_pretrained(str(tmp_path / "pretrained"))
    reloaded = ScForge.from_pretrained(str(tmp_path / "pretrained"), shuffled)
    np.testing.assert_allclose(reloaded.get_latent_representation(), embedding, atol=1e-6)


def test_missing_genes_count_as_unexpressed(trained, counts, tmp_path):
    """A query holding a gene subset embeds like the full data with those genes zeroed."""
    model = trained[0]
    keep = np.sort(np.random.default_rng(1).permutation(counts.n_vars)[: int(0.9 * counts.n_vars)])
    subset = setup_counts(counts[:, keep].copy())
    zeroed = counts.copy()
    dropped = np.setdiff1d(np.arange(counts.n_vars), keep)
    layer = zeroed.layers["counts"].tolil()
    layer[:, dropped] = 0
    zeroed.layers["counts"] = layer.tocsr()
    setup_counts(zeroed)
    expected = model.get_latent_representation(zeroed)
    assert not np.allclose(expected, model.get_latent_representation())  # the genes mattered

    z = model.get_latent_representation(subset)
    assert z.shape == (counts.n_obs, TINY["hidden_dim"])
    np.testing.assert_allclose(z, expected, atol=1e-5)
    model.save_pretrained(str(tmp_path / "pretrained"))
    reloaded = ScForge.from_pretrained(str(tmp_path / "pretrained"), subset)
    np.testing.assert_allclose(reloaded.get_latent_representation(), expected, atol=1e-5)


def test_padding_does_not_change_an_embedding(trained, counts):
    """Cells with few genes embed the same alone as padded in a batch of full-length cells."""
    model = trained[0]
    short = counts.copy()
    layer = short.layers["counts"].tolil()
    n_kept = [3, 10, 25, 50]
    for cell, n in enumerate(n_kept):
        row = layer[cell].toarray().ravel()
        row[np.argsort(-row, kind="stable")[n:]] = 0
        layer[cell] = row
    short.layers["counts"] = layer.tocsr()
    setup_counts(short)
    together = model.get_latent_representation(short)
    for cell in range(len(n_kept)):
        alone = model.get_latent_representation(short, indices=[cell])
        np.testing.assert_allclose(alone[0], together[cell], atol=1e-5)
    assert not np.allclose(together[0], together[1], atol=1e-3)


def test_learning_rate_warms_up_then_decays_to_its_floor(trained):
    model, recorder, _ = trained
    lrs = np.asarray(recorder.lrs)
    n_steps = EPOCHS * int(np.ceil(len(model.train_indices_) / QUIET["batch_size"]))
    assert len(lrs) == n_steps
    assert np.all(np.diff(lrs[: WARMUP + 1]) > 0)
    assert lrs[WARMUP] == pytest.approx(LR)
    assert np.all(np.diff(lrs[WARMUP:]) <= 1e-12)
    assert recorder.final == pytest.approx(MIN_LR_RATIO * LR)
    assert lrs.min() >= MIN_LR_RATIO * LR - 1e-12


def test_checkpoints_load_without_pickles(trained, counts, embedding):
    _, _, ckpt_dir = trained
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["best.ckpt", "last.ckpt"]
    for name in ("best.ckpt", "last.ckpt"):
        ckpt = torch.load(ckpt_dir / name, map_location="cpu", weights_only=True)
        assert ckpt["scforge"]["config"]["backbone"]["hidden_dim"] == TINY["hidden_dim"]
        assert ckpt["scforge"]["vocab"]
        assert "optimizer_states" in ckpt  # resumable
    last = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == EPOCHS - 1
    # the best weights were restored after training: the model is best.ckpt
    from_best = ScForge.from_pretrained(str(ckpt_dir / "best.ckpt"), counts)
    np.testing.assert_array_equal(from_best.get_latent_representation(), embedding)


def test_embed_feeds_scanpy_neighbors_and_umap(trained, counts):
    adata = counts.copy()
    trained[0].embed(adata)
    assert adata.obsm["X_scforge"].shape == (adata.n_obs, TINY["hidden_dim"])
    assert np.isfinite(adata.obsm["X_scforge"]).all()
    assert adata.uns["scforge"]["embed"]["params"]["key_added"] == "X_scforge"
    sc.pp.neighbors(adata, use_rep="X_scforge", n_neighbors=10)
    sc.tl.umap(adata, random_state=0)
    assert adata.obsm["X_umap"].shape == (adata.n_obs, 2)
    assert np.isfinite(adata.obsm["X_umap"]).all()


def test_embed_read_outs_layers_pooling_and_normalisation(trained, counts, embedding):
    model, d = trained[0], TINY["hidden_dim"]
    adata = counts.copy()
    # the raw read-out of the old default: the model's pooling of the final hidden states
    model.embed(adata, key_added="raw", layers=-1, pooling="mean", normalize="none")
    np.testing.assert_allclose(adata.obsm["raw"], embedding, atol=1e-6)
    np.testing.assert_allclose(
        model.get_latent_representation(counts, layers=1, pooling="mean"), embedding, atol=1e-6
    )
    # the input embeddings differ from the final states; a concatenation keeps each in order
    first = model.get_latent_representation(counts, layers=0)
    both = model.get_latent_representation(counts, layers=[0, -1])
    assert both.shape == (counts.n_obs, 2 * d)
    np.testing.assert_allclose(both[:, :d], first, atol=1e-6)
    np.testing.assert_allclose(both[:, d:], embedding, atol=1e-6)
    assert not np.allclose(first, embedding)
    # <cls> pooling differs from the mean over tokens
    cls = model.get_latent_representation(counts, pooling="cls")
    assert cls.shape == embedding.shape and not np.allclose(cls, embedding)
    standard = model.get_latent_representation(counts, normalize="standardize")
    np.testing.assert_allclose(standard.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(standard.std(0), 1.0, atol=1e-3)
    unit = model.get_latent_representation(counts, normalize="l2")
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    params = adata.uns["scforge"]["embed"]["params"]
    assert (params["layers"], params["pooling"], params["normalize"]) == (-1, "mean", "none")


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"layers": 2}, "layers"),
        ({"layers": []}, "layers"),
        ({"pooling": "max"}, "pooling"),
        ({"normalize": "zscore"}, "normalize"),
    ],
)
def test_embed_refuses_unknown_read_outs_naming_the_argument(trained, counts, kwargs, named):
    with pytest.raises(ValueError, match=named):
        trained[0].get_latent_representation(counts, **kwargs)


def _one_epoch(adata, seed: int) -> np.ndarray:
    torch.manual_seed(0)
    model = ScForge(adata, **TINY)
    model.train(max_epochs=1, seed=seed, limit_train_batches=4, **QUIET, plan_kwargs={"lr": LR})
    return model.get_latent_representation()


def test_training_is_reproducible_with_a_seed(counts):
    first = _one_epoch(counts, seed=0)
    np.testing.assert_array_equal(_one_epoch(counts, seed=0), first)
    assert not np.allclose(_one_epoch(counts, seed=1), first)


def test_cell_expression_objective_trains_and_reloads(counts, tmp_path):
    torch.manual_seed(0)
    model = ScForge(counts, cell_expression_weight=2.0, **TINY)
    model.train(max_epochs=3, seed=0, **QUIET, plan_kwargs={"lr": LR})
    cell = model.history["val_cell_expression_loss"].to_numpy().ravel().astype(float)
    assert cell[-1] < 0.9 * cell[0]
    model.save_pretrained(str(tmp_path / "cell"))
    loaded = ScForge.from_pretrained(str(tmp_path / "cell"), counts)
    assert not loaded.load_report_.initialised
    torch.testing.assert_close(
        loaded.module.cell_expression_head.weight, model.module.cell_expression_head.weight
    )
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation()
    )


def test_scaled_gene_embedding_reloads_with_identical_embeddings(counts, tmp_path):
    torch.manual_seed(0)
    model = ScForge(counts, **TINY, architecture={"scaled_gene_embedding": True})
    model.train(max_epochs=1, seed=0, limit_train_batches=4, **QUIET, plan_kwargs={"lr": LR})
    model.save_pretrained(str(tmp_path / "scaled"))
    loaded = ScForge.from_pretrained(str(tmp_path / "scaled"), counts)
    assert loaded.backbone_config.scaled_gene_embedding
    assert not loaded.load_report_.initialised
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation()
    )


def test_gene_embeddings_are_the_backbone_gene_token_weights(trained, counts):
    model = trained[0]
    table = model.gene_embeddings()
    weight = model.module.backbone.gene_embedding.weight.detach().cpu().numpy()
    assert list(table.index) == model.vocab.genes
    assert table.shape == (model.vocab.n_genes, model.backbone_config.hidden_dim)
    assert table.dtypes.eq(np.float32).all()
    np.testing.assert_array_equal(table.to_numpy(), weight[model.vocab.gene_ids])

    genes = list(counts.var_names[counts.var_names.isin(model.vocab.genes)][::-1][:20])
    picked = model.gene_embeddings(genes)
    assert list(picked.index) == genes
    np.testing.assert_array_equal(picked.to_numpy(), table.loc[genes].to_numpy())
    with pytest.raises(KeyError):
        model.gene_embeddings(["not-a-gene"])
