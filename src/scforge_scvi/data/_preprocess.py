"""Preprocessing shared by training and inference.

Everything here is computed on the fly from the registered raw counts, so that the exact same
transformation is applied when a model is trained, fine-tuned, and used to embed new cells.
The user's AnnData is never modified.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import h5py
import numpy as np
import scipy.sparse as sp

from scforge_scvi._errors import ScForgeTypeError, ScForgeValueError
from scforge_scvi._settings import from_known_keys

from ._vocab import GeneVocab

_NORMALIZE_CHOICES = ("library_size", "none")
_CHECK_CHUNK = 1 << 24  # stored values checked at a time by check_raw_counts
_CHECK_ROWS = 4096  # rows of a backed matrix read at a time


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
        If set, a vocabulary built from the data keeps only this many highly variable genes,
        selected once on the training data and stored in the gene vocabulary; ``None`` keeps
        every gene.
    """

    normalize: str = "library_size"
    target_sum: float = 1e4
    log1p: bool = True
    n_top_genes: int | None = 2000

    def __post_init__(self) -> None:
        if self.normalize not in _NORMALIZE_CHOICES:
            raise ScForgeValueError(
                f"preprocessing.normalize={self.normalize!r} is not valid; "
                f"choose one of {_NORMALIZE_CHOICES}."
            )
        if not self.target_sum > 0:
            raise ScForgeValueError(
                f"preprocessing.target_sum must be positive, got {self.target_sum}."
            )
        if self.n_top_genes is not None and self.n_top_genes < 1:
            raise ScForgeValueError(
                "preprocessing.n_top_genes must be a positive integer or None, got "
                f"{self.n_top_genes}."
            )

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-serialisable dict (stored in a pretrained ``config.json``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        """Settings from :meth:`to_dict`'s output; unknown keys are an error, not ignored."""
        return from_known_keys(cls, d, "preprocessing")


def is_backed(x: Any) -> bool:
    """Whether ``x`` is a matrix on disk (a backed AnnData's ``X``), not in memory."""
    from anndata.abc import CSCDataset, CSRDataset

    return isinstance(x, CSRDataset | CSCDataset | h5py.Dataset)


def backed_source(adata: Any) -> str:
    """`` (backed by 'file')`` for a backed AnnData, else an empty string (for messages)."""
    filename = getattr(adata, "filename", None) if getattr(adata, "isbacked", False) else None
    return f" (backed by '{filename}')" if filename else ""


def row_blocks(x: Any, rows: int | None = None):
    """``(start, block)`` pairs covering ``x``: the whole matrix when it is in memory, blocks
    of ``rows`` (default 4096) consecutive rows read from disk when it is backed (never all
    of it at once).
    """
    rows = rows or _CHECK_ROWS
    if not is_backed(x):
        yield 0, x
        return
    from anndata.abc import CSCDataset

    if isinstance(x, CSCDataset):  # rows of a column-compressed file cannot be read cheaply
        raise ScForgeValueError(
            "The backed counts are stored column by column (CSC), so they cannot be read a "
            "block of cells at a time; rewrite the file with X as CSR "
            "(adata.X = adata.X.tocsr()) or load it into memory (adata.to_memory())."
        )
    n = int(x.shape[0])
    for start in range(0, n, rows):
        yield start, x[start : min(start + rows, n)]


def read_row_sample(x: Any, max_rows: int, seed: int = 0) -> tuple[np.ndarray, Any]:
    """At most ``max_rows`` rows of ``x`` in memory (seeded sample, in row order) and their
    indices. An in-memory ``x`` with no more rows than that is returned as it is."""
    n = int(x.shape[0])
    if n <= max_rows and not is_backed(x):
        return np.arange(n), x
    rows = np.arange(n)
    if n > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False))
    if not is_backed(x):
        return rows, x[rows]
    blocks = []
    for start, block in row_blocks(x):
        mine = rows[(rows >= start) & (rows < start + block.shape[0])] - start
        blocks.append(block[mine])
    if sp.issparse(blocks[0]):
        return rows, sp.vstack(blocks, format="csr")
    return rows, np.concatenate([np.asarray(b) for b in blocks])


def check_raw_counts(x: Any, where: str, max_check: int = 1_000_000) -> np.ndarray:
    """Raise a clear error unless ``x`` holds finite, non-negative integer counts.

    Parameters
    ----------
    x
        Dense or sparse matrix of counts, in memory or backed on disk (a backed AnnData's
        ``X``: read a block of rows at a time, never loaded whole).
    where
        Human-readable location used in the message, e.g. ``"adata.layers['counts']"``.
    max_check
        Only the first ``max_check`` stored values are checked for being integers (enough to
        catch normalised or log-transformed data, cheap on large matrices). NaN, infinite and
        negative values are looked for among all stored values: a single corrupt cell must
        not slip through.

    Returns
    -------
    The total counts of each cell (float64), computed in the same pass.

    Raises
    ------
    ScForgeValueError
        Naming ``where`` and, for negative or non-integer values, how to pass raw counts.
    ScForgeTypeError
        When the matrix does not hold numbers.
    """
    n_bad, n_values, lowest = 0, 0, np.inf
    n_int_checked, non_integer = 0, None
    sums = np.zeros(int(x.shape[0]), dtype=np.float64)
    for start, block in row_blocks(x):
        values = block.data if sp.issparse(block) else np.asarray(block).ravel()
        values = np.asarray(values)
        if values.dtype.kind not in "biuf":
            raise ScForgeTypeError(
                f"{where} holds values of dtype {values.dtype}, not numbers; scforge needs "
                "raw UMI/read counts (integers stored as int or float)."
            )
        n_values += values.size
        for lo in range(0, values.size, _CHECK_CHUNK):  # bounded temporaries on large data
            chunk = values[lo : lo + _CHECK_CHUNK]
            finite = np.isfinite(chunk)
            n_bad += int(chunk.size - np.count_nonzero(finite))
            if finite.any():
                lowest = min(lowest, float(chunk[finite].min()))
        if non_integer is None and n_int_checked < max_check and not n_bad:
            head = values[: max_check - n_int_checked]
            n_int_checked += head.size
            off = head != np.round(head)
            if off.any():
                non_integer = head[off][0]
        if not n_bad and values.size:
            stop = start + block.shape[0]
            sums[start:stop] = np.asarray(block.sum(axis=1), dtype=np.float64).ravel()
    if n_bad:
        raise ScForgeValueError(
            f"{where} contains NaN or infinite values ({n_bad:,} of {n_values:,} stored "
            "values). scforge needs raw UMI/read counts; remove or fix those cells before "
            "calling setup_anndata."
        )
    hint = (
        " scforge needs raw counts: pass the layer that holds them, e.g. "
        "`setup_anndata(adata, layer='counts')`, or recover them before setup "
        "(normalised or log-transformed values cannot be used)."
    )
    if lowest < 0:
        raise ScForgeValueError(f"{where} contains negative values (min {lowest:g}).{hint}")
    if non_integer is not None:
        raise ScForgeValueError(
            f"{where} contains non-integer values (e.g. {non_integer:g}).{hint}"
        )
    return sums


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
        raise ScForgeValueError(
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
