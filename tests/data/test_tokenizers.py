"""Tokenizers on real PBMC counts, checked against plain per-cell references."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scforge_scvi.data import (
    BinnedExpressionTokenizer,
    ContinuousTokenizer,
    GeneVocab,
    RankValueTokenizer,
    TokenCollator,
    build_tokenizer,
    fit_gene_medians,
)
from scforge_scvi.data._vocab import N_SPECIAL

STRATEGIES = ("rank_value", "binned_expression", "continuous")
CELLS = [0, 1, 57, 311, 699]  # a few cells of pbmc68k, spread over the dataset


@pytest.fixture
def vocab(pbmc68k_counts) -> GeneVocab:
    """pbmc68k's genes with medians fitted on its counts."""
    base = GeneVocab.from_adata(pbmc68k_counts)
    return fit_gene_medians(pbmc68k_counts.X, base.match(pbmc68k_counts).vocab_ids, base)


def _tokens(adata, vocab: GeneVocab, strategy: str = "rank_value", rows=None, **kwargs):
    tokenizer = build_tokenizer(strategy, vocab, **kwargs)
    x = adata.X if rows is None else adata.X[rows]
    return tokenizer(x, vocab.match(adata).vocab_ids)


def _gene_tokens(batch, i: int) -> np.ndarray:
    """Gene ids of cell ``i`` in order, special tokens and padding removed."""
    ids = batch.gene_ids[i][batch.padding_mask[i]].numpy()
    return ids[ids >= N_SPECIAL]


def _reference_ranking(
    counts: np.ndarray, vocab_ids: np.ndarray, medians: np.ndarray, max_genes: int
) -> np.ndarray:
    """Geneformer ranking of one cell, computed with pandas.

    Normalise to 10,000 counts (library size over all genes, as scanpy does), divide by each
    gene's median, sort by descending score then ascending vocabulary id, keep ``max_genes``.
    The arithmetic is float32 like the tokenizer's, so exact ties are the same ties.
    """
    library = np.float32(counts.astype(np.float64).sum())
    cell = pd.DataFrame({"vid": vocab_ids, "count": counts.astype(np.float32)})
    cell = cell[(cell["vid"] >= 0) & (cell["count"] > 0)]
    normalised = cell["count"].to_numpy() * (np.float32(1e4) / library)
    cell["score"] = normalised / medians[cell["vid"].to_numpy()]
    ranked = cell.sort_values(["score", "vid"], ascending=[False, True])
    return ranked["vid"].to_numpy()[:max_genes]


# -- rank order ------------------------------------------------------------------------------
@pytest.mark.parametrize("max_genes", [2048, 40])
def test_rank_order_matches_reference_pbmc68k(pbmc68k_counts, vocab, max_genes):
    tokenizer = RankValueTokenizer(vocab, max_genes=max_genes)
    vocab_ids = vocab.match(pbmc68k_counts).vocab_ids
    batch = tokenizer(pbmc68k_counts.X[CELLS], vocab_ids)
    for i, cell in enumerate(CELLS):
        counts = pbmc68k_counts.X[cell].toarray().ravel()
        expected = _reference_ranking(counts, vocab_ids, vocab.gene_medians, max_genes)
        np.testing.assert_array_equal(_gene_tokens(batch, i), expected)


def test_rank_order_matches_reference_pbmc3k(pbmc3k):
    # A vocabulary that lacks most of the data's genes: genes outside it are dropped from the
    # tokens but still count towards the library size.
    vocab = GeneVocab.from_name("human_protein_coding")
    match = vocab.match(pbmc3k, gene_key="gene_ids", min_coverage=0.3)
    assert 0 < match.n_matched < pbmc3k.n_vars
    vocab = fit_gene_medians(pbmc3k.X[:500], match.vocab_ids, vocab)
    cells = [0, 1, 1000, 2637]
    for max_genes in (2048, 100):
        batch = RankValueTokenizer(vocab, max_genes=max_genes)(pbmc3k.X[cells], match.vocab_ids)
        for i, cell in enumerate(cells):
            counts = pbmc3k.X[cell].toarray().ravel()
            expected = _reference_ranking(counts, match.vocab_ids, vocab.gene_medians, max_genes)
            np.testing.assert_array_equal(_gene_tokens(batch, i), expected)


def test_ties_are_broken_by_vocab_id(vocab):
    # five genes with equal count and equal median: the order must follow the vocabulary
    medians = np.ones(len(vocab), dtype=np.float32)
    tied = vocab.with_gene_medians(medians)
    gene_index = np.array([20, 7, 13, 9, 30])
    batch = RankValueTokenizer(tied)(np.full((1, 5), 3.0), gene_index)
    np.testing.assert_array_equal(_gene_tokens(batch, 0), np.sort(gene_index))


# -- gene order and gene subsets -------------------------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gene_order_of_the_anndata_does_not_matter(pbmc68k_counts, vocab, strategy):
    permuted = pbmc68k_counts[:, np.random.default_rng(1).permutation(765)].copy()
    expected = _tokens(pbmc68k_counts, vocab, strategy, rows=CELLS)
    got = _tokens(permuted, vocab, strategy, rows=CELLS)
    torch.testing.assert_close(got.gene_ids, expected.gene_ids, rtol=0, atol=0)
    torch.testing.assert_close(got.padding_mask, expected.padding_mask, rtol=0, atol=0)
    if strategy == "rank_value":
        assert got.values is None
    else:
        torch.testing.assert_close(got.values, expected.values, rtol=0, atol=0)


def test_gene_subset_maps_to_the_same_vocab_ids(pbmc68k_counts, vocab):
    full_ids = vocab.match(pbmc68k_counts).vocab_ids
    keep = np.sort(np.random.default_rng(2).choice(765, size=400, replace=False))
    subset = pbmc68k_counts[:, keep].copy()
    np.testing.assert_array_equal(vocab.match(subset).vocab_ids, full_ids[keep])

    # a cell's tokens are the subset's expressed genes, in the order of the full ranking
    full = _tokens(pbmc68k_counts, vocab, rows=CELLS)
    part = _tokens(subset, vocab, rows=CELLS)
    for i in range(len(CELLS)):
        in_subset = np.isin(_gene_tokens(full, i), full_ids[keep])
        np.testing.assert_array_equal(_gene_tokens(part, i), _gene_tokens(full, i)[in_subset])


# -- values ----------------------------------------------------------------------------------
def test_binned_values(pbmc68k_counts, vocab):
    n_bins = 51
    batch = _tokens(pbmc68k_counts, vocab, "binned_expression", n_bins=n_bins)
    values, mask = batch.values.numpy(), batch.padding_mask.numpy()
    assert batch.values.dtype == torch.int64
    assert (values[:, 0] == 0).all() and (values[~mask] == 0).all()  # <cls> and <pad>
    genes = mask.copy()
    genes[:, 0] = False
    assert values[genes].min() == 1 and values[genes].max() == n_bins - 1

    counts = pbmc68k_counts.X.toarray()
    column = {g: j for j, g in enumerate(vocab.match(pbmc68k_counts).vocab_ids)}
    for i in CELLS:
        ids = batch.gene_ids[i][genes[i]].numpy()
        expression = counts[i, [column[g] for g in ids]]
        bins = values[i][genes[i]]
        # equal expression shares a bin, and bins never decrease with expression
        per_value = pd.Series(bins).groupby(expression).agg(["min", "max"])
        assert (per_value["min"] == per_value["max"]).all()
        assert np.all(np.diff(per_value["min"].to_numpy()) >= 0)
        assert per_value["min"].iloc[-1] == n_bins - 1  # the highest value is in the top bin
        assert len(set(bins)) > 1


def test_continuous_values_are_log1p_of_the_right_gene(pbmc68k_counts, vocab):
    batch = _tokens(pbmc68k_counts, vocab, "continuous")
    counts = pbmc68k_counts.X.toarray().astype(np.float64)
    normalised = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    # the same values looked up by vocabulary id
    by_vocab_id = np.zeros((counts.shape[0], len(vocab)))
    by_vocab_id[:, vocab.match(pbmc68k_counts).vocab_ids] = normalised
    ids, mask = batch.gene_ids.numpy(), batch.padding_mask.numpy()
    genes = mask & (ids >= vocab.n_special)
    rows = np.nonzero(genes)[0]
    expected = by_vocab_id[rows, ids[genes]]
    assert (expected > 0).all()
    np.testing.assert_allclose(batch.values.numpy()[genes], expected, rtol=1e-5)
    assert batch.values.dtype == torch.float32
    assert (batch.values.numpy()[~genes] == 0).all()


# -- shapes: padding, truncation, <cls> ------------------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_padding_to_the_longest_cell(pbmc68k_counts, vocab, strategy):
    x = pbmc68k_counts.X[CELLS]
    n_expressed = np.diff(x.indptr)
    batch = _tokens(pbmc68k_counts, vocab, strategy, rows=CELLS)
    assert batch.gene_ids.shape == (len(CELLS), n_expressed.max() + 1)
    np.testing.assert_array_equal(batch.padding_mask.sum(1).numpy(), n_expressed + 1)
    # real tokens first, then padding: the mask is a prefix of every row
    mask = batch.padding_mask.numpy()
    np.testing.assert_array_equal(mask, np.arange(mask.shape[1]) < mask.sum(1, keepdims=True))
    assert (batch.gene_ids[~batch.padding_mask] == vocab.pad_id).all()
    assert (batch.gene_ids[batch.padding_mask] != vocab.pad_id).all()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_max_genes_keeps_the_top_of_the_ranking(pbmc68k_counts, vocab, strategy):
    full = _tokens(pbmc68k_counts, vocab, strategy, rows=CELLS)
    short = _tokens(pbmc68k_counts, vocab, strategy, rows=CELLS, max_genes=25)
    assert short.gene_ids.shape == (len(CELLS), 26)
    assert (short.padding_mask.sum(1) == 26).all()  # every cell here expresses > 25 genes
    torch.testing.assert_close(short.gene_ids, full.gene_ids[:, :26], rtol=0, atol=0)
    if strategy != "rank_value":  # values describe the cell, not the truncation
        torch.testing.assert_close(short.values, full.values[:, :26], rtol=0, atol=0)
    assert build_tokenizer(strategy, vocab, max_genes=25).max_length == 26


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_prepend_cls(pbmc68k_counts, vocab, strategy):
    with_cls = _tokens(pbmc68k_counts, vocab, strategy, rows=CELLS, prepend_cls=True)
    without = _tokens(pbmc68k_counts, vocab, strategy, rows=CELLS, prepend_cls=False)
    assert (with_cls.gene_ids[:, 0] == vocab.cls_id).all()
    assert (with_cls.gene_ids[:, 1:] != vocab.cls_id).all()
    assert (without.gene_ids != vocab.cls_id).all()
    torch.testing.assert_close(without.gene_ids, with_cls.gene_ids[:, 1:], rtol=0, atol=0)
    torch.testing.assert_close(without.padding_mask, with_cls.padding_mask[:, 1:], rtol=0, atol=0)
    if strategy != "rank_value":
        torch.testing.assert_close(without.values, with_cls.values[:, 1:], rtol=0, atol=0)


@pytest.mark.parametrize("prepend_cls", [True, False])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_empty_cells_get_exactly_one_cls_token(pbmc68k_counts, vocab, strategy, prepend_cls):
    x = pbmc68k_counts.X[:4].tolil()
    x[1, :] = 0  # no counts at all
    gene_index = vocab.match(pbmc68k_counts).vocab_ids.copy()
    gene_index[x[3].nonzero()[1]] = -1  # counts only in genes outside the vocabulary
    tokenizer = build_tokenizer(strategy, vocab, prepend_cls=prepend_cls)
    batch = tokenizer(x.tocsr(), gene_index)
    for empty in (1, 3):
        assert batch.padding_mask[empty].sum() == 1
        assert batch.gene_ids[empty, 0] == vocab.cls_id
        if batch.values is not None:
            assert (batch.values[empty] == 0).all()
    assert (batch.padding_mask[[0, 2]].sum(1) > 1).all()

    # a batch of empty cells only is still one <cls> per cell
    alone = tokenizer(sp.csr_matrix((2, gene_index.size), dtype=np.float32), gene_index)
    assert alone.gene_ids.tolist() == [[vocab.cls_id], [vocab.cls_id]]
    assert alone.padding_mask.all()


# -- input formats ---------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_dense_sparse_and_torch_inputs_agree(pbmc68k_counts, vocab, strategy):
    x = pbmc68k_counts.X[:64]
    gene_index = vocab.match(pbmc68k_counts).vocab_ids
    tokenizer = build_tokenizer(strategy, vocab)
    expected = tokenizer(x, gene_index)
    dense = x.toarray()
    inputs = {
        "numpy": dense,
        "scipy csc": sp.csc_matrix(x),
        "torch dense": torch.from_numpy(dense),
        "torch sparse csr": torch.from_numpy(dense).to_sparse_csr(),
    }
    for name, counts in inputs.items():
        got = tokenizer(counts, gene_index)
        for field in ("gene_ids", "padding_mask", "values"):
            a, b = getattr(got, field), getattr(expected, field)
            assert (a is None) == (b is None), name
            if a is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{field} from {name}")


def test_tokenizer_errors(vocab):
    with pytest.raises(ValueError, match="gene_index has 3 entries but the counts have 4"):
        RankValueTokenizer(vocab)(np.ones((2, 4)), np.arange(3))
    with pytest.raises(ValueError, match="fit_gene_medians"):
        RankValueTokenizer(GeneVocab.from_genes(["A", "B"]))
    with pytest.raises(ValueError, match="n_bins"):
        BinnedExpressionTokenizer(vocab, n_bins=1)
    with pytest.raises(ValueError, match="choose one of"):
        build_tokenizer("word_piece", vocab)


def test_collator_replaces_counts_by_tokens(pbmc68k_counts, vocab):
    gene_index = vocab.match(pbmc68k_counts).vocab_ids
    tokenizer = ContinuousTokenizer(vocab, max_genes=100)
    collate = TokenCollator(tokenizer, gene_index, count_key="X")
    x = pbmc68k_counts.X[:8]
    out = collate({"X": x, "labels": np.arange(8)[:, None]})
    assert set(out) == {"gene_ids", "padding_mask", "values", "labels"}
    torch.testing.assert_close(out["gene_ids"], tokenizer(x, gene_index).gene_ids)
    assert out["labels"].shape == (8, 1)


# -- end-of-sequence token and float64 scores (imported Geneformer models) -------------------
@pytest.mark.parametrize("prepend_cls", [True, False])
def test_append_eos_ends_every_sequence(pbmc68k_counts, vocab, prepend_cls):
    x = pbmc68k_counts.X[:5].tolil()
    x[1, :] = 0  # an empty cell: its lone <cls>, then the end token
    gene_index = vocab.match(pbmc68k_counts).vocab_ids
    plain = RankValueTokenizer(vocab, max_genes=50, prepend_cls=prepend_cls)(x.tocsr(), gene_index)
    eos = RankValueTokenizer(vocab, max_genes=50, prepend_cls=prepend_cls, append_eos=True)
    assert eos.max_length == 50 + prepend_cls + 1
    batch = eos(x.tocsr(), gene_index)
    assert batch.gene_ids.shape[1] == plain.gene_ids.shape[1] + 1
    for i in range(5):
        ours = batch.gene_ids[i][batch.padding_mask[i]]
        base = plain.gene_ids[i][plain.padding_mask[i]]
        assert ours[-1] == eos.eos_id == vocab.unk_id
        torch.testing.assert_close(ours[:-1], base, rtol=0, atol=0)
    assert batch.gene_ids[1][batch.padding_mask[1]].tolist() == [vocab.cls_id, eos.eos_id]
    assert eos.to_dict() == {
        "strategy": "rank_value",
        "max_genes": 50,
        "prepend_cls": prepend_cls,
        "append_eos": True,
    }


def test_float64_scores_follow_geneformer_arithmetic(pbmc68k_counts, vocab):
    medians = vocab.gene_medians.astype(np.float64) * (1 + 1e-9)  # not float32-representable
    vocab64 = GeneVocab(vocab.genes, gene_medians=medians, gene_medians_dtype="float64")
    gene_index = vocab64.match(pbmc68k_counts).vocab_ids
    tokenizer = RankValueTokenizer(vocab64, max_genes=100, score_dtype="float64")
    assert tokenizer.to_dict()["score_dtype"] == "float64"
    x = pbmc68k_counts.X[CELLS]
    batch = tokenizer(x, gene_index)
    for i in range(len(CELLS)):
        row = x[i].toarray().ravel().astype(np.float64)
        keep = (gene_index >= 0) & (row > 0)
        vid = gene_index[keep]
        score = row[keep] * (1.0 / row.sum()) * 10_000.0 * (1.0 / medians[vid])
        expected = vid[np.lexsort((vid, -score))][:100]
        np.testing.assert_array_equal(_gene_tokens(batch, i), expected)


def test_score_dtype_is_checked_and_rank_value_only(vocab):
    with pytest.raises(ValueError, match="score_dtype must be one of"):
        RankValueTokenizer(vocab, score_dtype="float16")
    with pytest.raises(ValueError, match="only available with the rank_value"):
        build_tokenizer("continuous", vocab, score_dtype="float64")
    default = build_tokenizer("rank_value", vocab, score_dtype="float32")
    assert "score_dtype" not in default.to_dict() and "append_eos" not in default.to_dict()


def test_repr_shows_the_settings_that_rebuild_the_tokenizer(vocab):
    tokenizer = build_tokenizer("binned_expression", vocab, max_genes=64, n_bins=21)
    assert repr(tokenizer) == "BinnedExpressionTokenizer(max_genes=64, prepend_cls=True, n_bins=21)"
    eos = build_tokenizer("rank_value", vocab, append_eos=True)
    assert repr(eos) == "RankValueTokenizer(max_genes=2048, prepend_cls=True, append_eos=True)"
