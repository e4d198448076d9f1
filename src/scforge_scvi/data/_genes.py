"""The genes of a dataset against a model's vocabulary: which vocabulary, and how genes match."""

from __future__ import annotations

from typing import Any

import numpy as np
from anndata import AnnData

from scforge_scvi._logging import logger

from ._preprocess import (
    Preprocessing,
    fit_gene_medians,
    is_backed,
    log_normalize,
    read_row_sample,
)
from ._vocab import GeneVocab

#: cells of a backed AnnData read to fit per-gene medians and select highly variable genes
BACKED_FIT_CELLS = 10_000
#: cells (a seeded sample) whose principal components initialise gene embeddings
PCA_FIT_CELLS = 5_000


def fitting_counts(adata: AnnData, counts, what: str):
    """``counts`` of ``adata`` in memory, for fitting the vocabulary's statistics.

    A backed matrix is not loaded whole: up to :data:`BACKED_FIT_CELLS` cells (a seeded
    sample, all of them when there are no more) are read from the file a block at a time.
    """
    if not is_backed(counts):
        return counts
    rows, sample = read_row_sample(counts, BACKED_FIT_CELLS, seed=0)
    if len(rows) < adata.n_obs:
        logger.info(
            f"{what} on {len(rows):,} of the {adata.n_obs:,} cells of the backed file "
            f"'{adata.filename}' (a seeded sample)."
        )
    return sample


def match_kwargs(
    vocab: GeneVocab, preprocessing: Preprocessing, gene_key: str | None, min_coverage: float
) -> dict[str, Any]:
    """Arguments of :meth:`GeneVocab.match` for a model's vocabulary.

    A vocabulary of selected (HVG) genes, exactly ``n_top_genes`` of them, is checked by the
    share of its genes found in the data; any other (a named one, or all genes of a dataset
    with fewer than ``n_top_genes``) by the share of the data's genes.
    """
    n_top = preprocessing.n_top_genes
    selected = bool(n_top) and len(vocab) - vocab.n_special == n_top
    return {
        "gene_key": gene_key,
        "min_coverage": min_coverage,
        "coverage_of": "vocab" if selected else "data",
    }


def resolve_vocab(
    vocab: GeneVocab | str | dict | None,
    adata: AnnData,
    counts,
    *,
    preprocessing: Preprocessing,
    gene_key: str | None,
    min_coverage: float,
) -> GeneVocab:
    """The vocabulary of a new model on ``adata`` (raw ``counts``), with per-gene medians.

    Parameters
    ----------
    vocab
        ``None`` builds it from ``adata``'s genes (after HVG selection when
        ``preprocessing.n_top_genes`` is set), a name such as ``"human_protein_coding"``, a
        file, a :class:`GeneVocab` or its :meth:`~GeneVocab.to_dict` (taken as it is).
    adata, counts
        The registered data and its counts.
    preprocessing, gene_key, min_coverage
        As of the model.

    Raises
    ------
    VocabCoverageError
        If too few genes of ``adata`` are in the vocabulary.
    """
    if isinstance(vocab, dict):
        return GeneVocab.from_dict(vocab)
    if isinstance(vocab, GeneVocab):
        resolved = vocab
    elif vocab is None:
        resolved = _vocab_from_data(adata, counts, preprocessing, gene_key)
    elif vocab in GeneVocab.available_names():
        resolved = GeneVocab.from_name(vocab)
    else:
        resolved = GeneVocab.from_file(vocab)
    # checked for every vocabulary, pretrained ones included: too few matching genes fail here
    match = resolved.match(adata, **match_kwargs(resolved, preprocessing, gene_key, min_coverage))
    if resolved.gene_medians is None:
        logger.info(f"Fitting per-gene medians on {adata.n_obs} cells.")
        resolved = fit_gene_medians(
            fitting_counts(adata, counts, "Per-gene medians are fitted"),
            match.vocab_ids,
            resolved,
            target_sum=preprocessing.target_sum,
        )
    return resolved


def _vocab_from_data(adata, counts, preprocessing: Preprocessing, gene_key) -> GeneVocab:
    n_top = preprocessing.n_top_genes
    if n_top is not None and n_top < adata.n_vars:
        import scanpy as sc

        counts = fitting_counts(adata, counts, "Highly variable genes are selected")
        view = AnnData(X=counts.copy(), var=adata.var[[]].copy())
        view.var_names = adata.var_names
        sc.pp.normalize_total(view, target_sum=preprocessing.target_sum)
        sc.pp.log1p(view)
        hvg = sc.pp.highly_variable_genes(view, n_top_genes=n_top, inplace=False)
        adata = adata[:, _top_genes(hvg, n_top)]
    return GeneVocab.from_adata(adata, gene_key=gene_key)


def _top_genes(hvg, n_top: int) -> np.ndarray:
    """Mask of exactly ``n_top`` genes from scanpy's ``highly_variable_genes`` result.

    scanpy keeps every gene tied with the ``n_top``-th normalised dispersion, so a tie at the
    cut selects more than ``n_top`` genes (2,001 of 2,000 on some pbmc3k subsets), and the
    vocabulary would no longer be recognised as an HVG selection (see :func:`match_kwargs`).
    Of the tied genes, those first in the data's gene order are kept.
    """
    selected = hvg["highly_variable"].to_numpy()
    if selected.sum() <= n_top:
        return selected
    candidates = np.flatnonzero(selected)
    dispersion = hvg["dispersions_norm"].to_numpy()[candidates]
    keep = candidates[np.argsort(-dispersion, kind="stable")[:n_top]]
    mask = np.zeros_like(selected)
    mask[keep] = True
    return mask


def gene_pca_loadings(
    counts, vocab_ids: np.ndarray, n_components: int, preprocessing: Preprocessing, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Principal-component loadings of the vocabulary genes of a count matrix.

    scanpy's usual workflow: the counts are library-size normalised over all their genes to
    ``preprocessing.target_sum`` (and ``log1p``-ed when ``preprocessing.log1p``), restricted to
    the genes in the vocabulary, standardised per gene (clipped at 10, as
    ``scanpy.pp.scale(max_value=10)``), then decomposed. At most :data:`PCA_FIT_CELLS` cells (a
    seeded sample) are read; the standardised matrix is dense (float64, about 80 MB for
    5,000 cells and 2,000 genes). A gene's row of loadings places it in the space of the main
    axes of variation of the cells, so genes that vary together get nearby rows.

    Parameters
    ----------
    counts
        ``(cells, genes)`` raw counts (in memory or backed).
    vocab_ids
        ``(genes,)`` vocabulary id of each column, ``-1`` outside the vocabulary.
    n_components
        Components wanted; fewer are returned when the data has too few cells or genes.
    preprocessing
        The model's normalisation settings.
    seed
        Seed of the cell sample and of the randomised decomposition.

    Returns
    -------
    ids, loadings
        ``(n,)`` vocabulary ids of the genes and their ``(n, k)`` loadings (unit-norm
        columns, sign fixed so that each column's largest entry is positive), ``k <=
        n_components``.
    """
    from sklearn.utils.extmath import randomized_svd

    vocab_ids = np.asarray(vocab_ids)
    _, sample = read_row_sample(counts, PCA_FIT_CELLS, seed=seed)
    x = log_normalize(sample, preprocessing.target_sum, preprocessing.log1p)
    cols = np.flatnonzero(vocab_ids >= 0)
    x = x[:, cols]
    x = np.asarray(x.todense() if hasattr(x, "todense") else x, dtype=np.float64)
    x -= x.mean(axis=0)
    std = x.std(axis=0)
    x /= np.where(std > 0, std, 1.0)
    np.clip(x, None, 10.0, out=x)
    k = max(0, min(n_components, x.shape[0] - 1, x.shape[1] - 1))
    if k == 0:
        return vocab_ids[cols], np.zeros((cols.size, 0))
    _, _, vt = randomized_svd(x, k, random_state=seed)
    loadings = vt.T  # (n genes, k)
    rows = np.abs(loadings).argmax(axis=0)
    loadings *= np.sign(loadings[rows, np.arange(k)])
    return vocab_ids[cols], loadings
