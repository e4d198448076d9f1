"""Streamed cells: backed shards read in chunks give the in-memory model's inputs, every
training cell once per epoch, disjoint equal shares per rank, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from torch.utils.data import DataLoader

import scforge_scvi as sf
from scforge_scvi.data import CellStream, StreamedCells, VocabCoverageError
from scforge_scvi.data._splits import split_cells
from scforge_scvi.data._streaming import CELL_INDEX_KEY

TINY = {"hidden_dim": 16, "num_layers": 1, "num_heads": 2, "max_genes": 48}
TINY["architecture"] = {"ffn_dim": 32}


@pytest.fixture
def shards(pbmc68k_counts, tmp_path):
    """pbmc68k in three shards: h5ad, h5ad with genes reversed and a gene subset, zarr."""
    adata = pbmc68k_counts
    del adata.layers["counts"]
    paths = [tmp_path / "a.h5ad", tmp_path / "b.h5ad", tmp_path / "c.zarr"]
    adata[:250].write_h5ad(paths[0])
    adata[250:500, ::-1][:, 5:].copy().write_h5ad(paths[1])  # other order, 5 genes fewer
    adata[500:].copy().write_zarr(paths[2])
    return adata, paths


def _stream(cells, ids, *, batch_size=16, shuffle=True, seed=0):
    """A stream that emits raw counts and cell indices (identity collation)."""
    columns = [np.arange(s.n_vars) for s in cells.shards]
    return CellStream(
        cells,
        ids,
        columns=columns,
        n_columns=max(s.n_vars for s in cells.shards),
        collate=lambda batch: batch,
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
    )


def _seen(stream) -> list[np.ndarray]:
    return [batch[CELL_INDEX_KEY].ravel() for batch in stream]


def test_streamed_embeddings_equal_the_in_memory_ones(shards):
    adata, paths = shards
    sf.ScForge.setup_anndata(adata)
    model = sf.ScForge(adata, **TINY)
    streamed = model.get_latent_representation(StreamedCells(paths, chunk_size=64), batch_size=50)
    # shard b lacks the last 5 genes: its cells embed like the in-memory cells without them
    zeroed = adata.copy()
    x = zeroed.X.tolil()
    x[250:500, -5:] = 0
    zeroed.X = x.tocsr()
    sf.ScForge.setup_anndata(zeroed)
    expected = model.get_latent_representation(zeroed)
    np.testing.assert_allclose(streamed, expected, atol=1e-5)
    assert not np.allclose(expected[250:500], model.get_latent_representation(adata)[250:500])


def test_every_training_cell_once_per_epoch_reshuffled(shards):
    _, paths = shards
    cells = StreamedCells(paths[:1] + paths[2:], chunk_size=32, buffer_size=64)
    ids = np.setdiff1d(np.arange(cells.n_obs), np.arange(0, cells.n_obs, 7))  # a held-out set
    stream = _stream(cells, ids)
    epoch0 = _seen(stream)
    assert len(epoch0) == len(stream)
    np.testing.assert_array_equal(np.sort(np.concatenate(epoch0)), ids)
    again = _seen(stream)
    assert all(np.array_equal(x, y) for x, y in zip(epoch0, again))  # same seed and epoch
    stream.set_epoch(1)
    epoch1 = np.concatenate(_seen(stream))
    np.testing.assert_array_equal(np.sort(epoch1), ids)
    assert not np.array_equal(epoch1, np.concatenate(epoch0))
    # a minibatch mixes several chunks (cells of the buffer are shuffled together)
    assert len(np.unique(epoch0[0] // 32)) > 1


def test_ranks_share_every_global_batch(shards):
    _, paths = shards
    cells = StreamedCells(paths[:1] + paths[2:], chunk_size=32, buffer_size=96)
    for n in (cells.n_obs, cells.n_obs - 1):  # an even and an odd number of cells
        ids = np.arange(n)
        ranks = [_stream(cells, ids, batch_size=8) for _ in range(2)]
        for r, stream in enumerate(ranks):
            stream.set_rank(r, 2)
        seen = [_seen(stream) for stream in ranks]
        assert len(ranks[0]) == len(ranks[1]) == len(seen[0]) == len(seen[1])
        rank0, rank1 = (np.concatenate(s) for s in seen)
        assert not np.intersect1d(rank0, rank1).size
        assert len(rank0) == len(rank1) == n // 2  # the odd cell out sits out this epoch
    # step k of the two ranks together is step k of one process with twice the batch
    single = _seen(_stream(cells, np.arange(cells.n_obs), batch_size=16))
    ranks = [_stream(cells, np.arange(cells.n_obs), batch_size=8) for _ in range(2)]
    for r, stream in enumerate(ranks):
        stream.set_rank(r, 2)
    seen = [_seen(stream) for stream in ranks]
    assert len(single) == len(seen[0])
    for k, batch in enumerate(single):
        np.testing.assert_array_equal(np.sort(np.r_[seen[0][k], seen[1][k]]), np.sort(batch))


def test_data_loader_workers_split_the_windows(shards):
    _, paths = shards
    cells = StreamedCells(paths[:1], chunk_size=16, buffer_size=32)
    stream = _stream(cells, np.arange(cells.n_obs))
    loader = DataLoader(stream, batch_size=None, num_workers=2)
    seen = np.concatenate([b[CELL_INDEX_KEY].numpy().ravel() for b in loader])
    np.testing.assert_array_equal(np.sort(seen), np.arange(cells.n_obs))


def test_validation_cells_are_disjoint_from_training():
    train, val, test = split_cells(1000, 0.8, 0.1, seed=3)
    assert (len(train), len(val), len(test)) == (800, 100, 100)
    assert not np.intersect1d(train, val).size and not np.intersect1d(train, test).size
    np.testing.assert_array_equal(split_cells(1000, 0.8, 0.1, seed=3)[1], val)


def test_train_on_streamed_shards_with_labels(shards):
    _, paths = shards
    cells = StreamedCells(paths, chunk_size=64)
    sample = cells.sample(300, seed=0)
    assert sample.n_obs == 300 and "shard" in sample.obs
    sf.ScForge.setup_anndata(sample, labels_key="louvain")
    model = sf.ScForge(sample, **TINY)
    model.train(
        max_epochs=2, data=cells, batch_size=32, accelerator="cpu", plan_kwargs={"lr": 1e-3}
    )
    assert len(model.train_indices_) + len(model.validation_indices_) == cells.n_obs
    loss = model.history["val_loss"].to_numpy(dtype=float).ravel()
    assert len(loss) == 2 and loss[-1] < loss[0]


def test_unknown_streamed_label_names_the_shard(shards):
    _, paths = shards
    cells = StreamedCells(paths[:1])
    sample = cells.sample(100)
    sample.obs["louvain"] = sample.obs["louvain"].cat.remove_categories(["3"])
    sample = sample[sample.obs["louvain"].notna()].copy()
    sf.ScForge.setup_anndata(sample, labels_key="louvain")
    model = sf.ScForge(sample, **TINY)
    with pytest.raises(ValueError, match=r"a\.h5ad.*labels the model does not know: \[.*'3'"):
        model.train(max_epochs=1, data=cells, accelerator="cpu")


def test_low_coverage_shard_is_named(shards, tmp_path):
    adata, paths = shards
    other = adata[:50].copy()
    names = other.var_names.to_numpy().astype(object)
    n_renamed = int(0.8 * other.n_vars)  # some genes in common (else StreamedCells refuses)
    names[:n_renamed] = [f"not_a_gene_{i}" for i in range(n_renamed)]
    other.var_names = names
    bad = tmp_path / "renamed.h5ad"
    other.write_h5ad(bad)
    sf.ScForge.setup_anndata(adata)
    model = sf.ScForge(adata, **TINY)
    with pytest.raises(VocabCoverageError, match=r"renamed\.h5ad"):
        model.get_latent_representation(StreamedCells([paths[0], bad]))


def test_empty_shard_is_skipped_with_a_warning(shards, tmp_path):
    adata, paths = shards
    empty = tmp_path / "empty.h5ad"
    adata[:0].copy().write_h5ad(empty)
    with pytest.warns(UserWarning, match="empty.h5ad' holds no cells; skipped"):
        cells = StreamedCells([empty, paths[0]])
    assert cells.n_obs == 250


def test_truncated_shard_fails_with_its_path(shards, tmp_path):
    _, paths = shards
    cells = StreamedCells(paths[:1], chunk_size=32)
    with open(paths[0], "r+b") as f:  # cut the file after the stream was set up
        f.truncate(paths[0].stat().st_size // 2)
    with pytest.raises(OSError, match=r"a\.h5ad"):
        _seen(_stream(cells, np.arange(cells.n_obs)))


def test_bad_shards_give_clear_errors(shards, tmp_path):
    adata, paths = shards
    with pytest.raises(FileNotFoundError, match=r"missing\.h5ad"):
        StreamedCells([tmp_path / "missing.h5ad"])
    with pytest.raises(KeyError, match="Layer 'counts' is not in"):
        StreamedCells(paths[:1], layer="counts").shards[0].read_rows(0, 2)
    csc = adata[:20].copy()
    csc.X = sp.csc_matrix(csc.X)
    csc.write_h5ad(tmp_path / "csc.h5ad")
    with pytest.raises(ValueError, match="column by column"):
        StreamedCells([tmp_path / "csc.h5ad"])


def test_multi_process_training_needs_streamed_cells(pbmc68k_counts):
    sf.ScForge.setup_anndata(pbmc68k_counts)
    model = sf.ScForge(pbmc68k_counts, **TINY)
    with pytest.raises(ValueError, match="needs streamed cells"):
        model.train(max_epochs=1, distributed="ddp", devices=2, accelerator="cpu")
