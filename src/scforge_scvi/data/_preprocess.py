"""Preprocessing shared by training and inference.

Everything here is computed on the fly from the registered raw counts, so that the exact same
transformation is applied when a model is trained, fine-tuned, and used to embed new cells.
The user's AnnData is never modified.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from ._vocab import GeneVocab

_NORMALIZE_CHOICES = ("library_size", "none")
_CHECK_CHUNK = 1 << 24  # stored values checked at a time by check_raw_counts


@dataclass(frozen=True)
class Preprocessing:
    """How raw counts become model inputs.

    Parameters
    ----------
    normalize
        ``"library_size"`` scales each cell to ``target_sum`` total counts (library size is the
        sum over all of the cell's registered genes); ``"none"`` keeps raw counts.
    target_sum
        Total counts per cell after library-size normalisation.
    log1p
        Apply ``log(1 + x)`` after normalisation (used by the binned and continuous tokenizers;
        ranks are unaffected by it).
    n_top_genes
        If set, the model reads only this many highly variable genes, selected once on the
        training data and stored in the gene vocabulary.
    """

    normalize: str = "library_size"
    target_sum: float = 1e4
    log1p: bool = True
    n_top_genes: int | None = None

    def __post_init__(self) -> None:
        if self.normalize not in _NORMALIZE_CHOICES:
            raise ValueError(
                f"preprocessing.normalize={self.normalize!r} is not valid; "
                f"choose one of {_NORMALIZE_CHOICES}."
            )
        if not self.target_sum > 0:
            raise ValueError(f"preprocessing.target_sum must be positive, got {self.target_sum}.")
        if self.n_top_genes is not None and self.n_top_genes < 1:
            raise ValueError(
                f"preprocessing.n_top_genes must be a positive integer or None, got {self.n_top_genes}."
            )

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-serialisable dict (stored in a pretrained ``config.json``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        """Settings from :meth:`to_dict`'s output; unknown keys are an error, not ignored."""
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"Unknown preprocessing keys {sorted(unknown)}; valid keys are "
                f"{sorted(cls.__dataclass_fields__)}."
            )
        return cls(**d)


def check_raw_counts(x: np.ndarray | sp.spmatrix, where: str, max_check: int = 1_000_000) -> None:
    """Raise a clear error unless ``x`` holds finite, non-negative integer counts.

    Parameters
    ----------
    x
        Dense or sparse matrix of counts.
    where
        Human-readable location used in the message, e.g. ``"adata.layers['counts']"``.
    max_check
        Only the first ``max_check`` stored values are checked for being integers (enough to
        catch normalised or log-transformed data, cheap on large matrices). NaN, infinite and
        negative values are looked for among all stored values: a single corrupt cell must
        not slip through.

    Raises
    ------
    ValueError
        Naming ``where`` and, for negative or non-integer values, how to pass raw counts.
    """
    values = x.data if sp.issparse(x) else np.asarray(x).ravel()
    values = np.asarray(values)
    if values.size == 0:
        return
    n_bad, lowest = 0, np.inf
    for start in range(0, values.size, _CHECK_CHUNK):  # bounded temporaries on large data
        chunk = values[start : start + _CHECK_CHUNK]
        finite = np.isfinite(chunk)
        n_bad += int(chunk.size - np.count_nonzero(finite))
        if finite.any():
            lowest = min(lowest, float(chunk[finite].min()))
    if n_bad:
        raise ValueError(
            f"{where} contains NaN or infinite values ({n_bad:,} of {values.size:,} stored "
            "values). scforge needs raw UMI/read counts; remove or fix those cells before "
            "calling setup_anndata."
        )
    hint = (
        " scforge needs raw counts: pass the layer that holds them, e.g. "
        "`setup_anndata(adata, layer='counts')`, or recover them before setup "
        "(normalised or log-transformed values cannot be used)."
    )
    if lowest < 0:
        raise ValueError(f"{where} contains negative values (min {lowest:g}).{hint}")
    head = values[:max_check]
    if not np.all(head == np.round(head)):
        bad = head[head != np.round(head)][0]
        raise ValueError(f"{where} contains non-integer values (e.g. {bad:g}).{hint}")


def library_size(x: np.ndarray | sp.spmatrix) -> np.ndarray:
    """Total counts per cell as a float64 vector."""
    return np.asarray(x.sum(axis=1), dtype=np.float64).ravel()


def log_normalize(
    x: np.ndarray | sp.spmatrix, target_sum: float = 1e4, log1p: bool = True
) -> np.ndarray | sp.csr_matrix:
    """Library-size normalise (to ``target_sum``) and optionally ``log1p`` a count matrix.

    Returns a new float32 matrix (CSR if the input is sparse); the input is not modified.
    Cells with zero counts stay all-zero.
    """
    size = library_size(x)
    scale = np.divide(target_sum, size, out=np.zeros_like(size), where=size > 0)
    if sp.issparse(x):
        out = sp.csr_matrix(x, dtype=np.float32, copy=True)
        out.data *= np.repeat(scale, np.diff(out.indptr)).astype(np.float32)
        if log1p:
            np.log1p(out.data, out=out.data)
        return out
    out = np.asarray(x, dtype=np.float32) * scale[:, None].astype(np.float32)
    return np.log1p(out) if log1p else out


def nonzero_column_medians(x: sp.spmatrix | np.ndarray) -> np.ndarray:
    """Median of the non-zero values of each column (NaN for an all-zero column).

    Vectorised: one sort of the stored values keyed by column, no loop over genes.
    """
    csc = sp.csc_matrix(x)
    csc.eliminate_zeros()
    counts = np.diff(csc.indptr)
    cols = np.repeat(np.arange(csc.shape[1]), counts)
    order = np.lexsort((csc.data, cols))
    data = csc.data[order].astype(np.float64)
    start = csc.indptr[:-1]
    lo = start + (counts - 1) // 2
    hi = start + counts // 2
    med = np.full(csc.shape[1], np.nan)
    has = counts > 0
    med[has] = 0.5 * (data[lo[has]] + data[hi[has]])
    return med


def fit_gene_medians(
    x: np.ndarray | sp.spmatrix,
    vocab_ids: np.ndarray,
    vocab: GeneVocab,
    *,
    target_sum: float = 1e4,
    refit: bool = False,
) -> GeneVocab:
    """Fit Geneformer's per-gene statistic: the non-zero median of normalised expression.

    Fitted once on the training corpus and stored in the vocabulary, which travels with the
    model; fine-tuning and inference reuse it and never refit it.

    Parameters
    ----------
    x
        Raw counts, cells x genes.
    vocab_ids
        Vocabulary id of each column of ``x`` (``-1`` for genes outside the vocabulary), e.g.
        ``vocab.match(adata).vocab_ids``.
    vocab
        The vocabulary to attach the statistics to.
    target_sum
        Library size the counts are normalised to (as the tokenizer does).
    refit
        Replace statistics the vocabulary already holds. Without it that is an error, so that
        a pretrained model's statistics are never silently recomputed on new data.

    Returns
    -------
    A copy of ``vocab`` with ``gene_medians`` set. Genes never expressed in ``x`` (and the
    special tokens) get the median of the fitted values, a neutral scale.
    """
    if vocab.gene_medians is not None and not refit:
        raise ValueError(
            "This vocabulary already holds per-gene medians (fitted on the pretraining corpus). "
            "They are part of the model and are not refitted; pass refit=True to replace them."
        )
    normalized = log_normalize(x, target_sum=target_sum, log1p=False)
    col_medians = nonzero_column_medians(normalized)
    vocab_ids = np.asarray(vocab_ids)
    in_vocab = (vocab_ids >= 0) & np.isfinite(col_medians)
    medians = np.full(len(vocab), np.nan)
    medians[vocab_ids[in_vocab]] = col_medians[in_vocab]
    fitted = medians[np.isfinite(medians)]
    fill = float(np.median(fitted)) if fitted.size else 1.0
    medians[~np.isfinite(medians)] = fill
    return vocab.with_gene_medians(medians.astype(np.float32))
