"""Tokenizers: a minibatch of raw counts -> padded gene-token sequences.

All tokenizers share one vectorised path over the CSR structure of the minibatch (no Python
loop per cell) and differ only in how genes are scored for ordering and which value travels
with each gene token:

==================== ============================================ ========================
strategy             order of genes in a cell                      value per token
==================== ============================================ ========================
``rank_value``       normalised expression / gene's non-zero median none (rank = position)
``binned_expression`` normalised expression                        per-cell quantile bin
``continuous``       normalised expression                        log1p(normalised)
==================== ============================================ ========================

Ties are broken by vocabulary id, so a cell's tokens never depend on the order of genes in the
AnnData. Tokenisation runs on the CPU in the data loader (numpy), so it overlaps with the
model's work on the accelerator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
import torch

from ._preprocess import Preprocessing
from ._vocab import GeneVocab


@dataclass
class TokenizedBatch:
    """A padded batch of gene-token sequences.

    Attributes
    ----------
    gene_ids
        ``(B, L)`` int64 vocabulary ids; ``<pad>`` after a cell's last token.
    values
        ``(B, L)`` expression values per token (int64 bins for ``binned_expression``, float32
        for ``continuous``) or ``None`` for ``rank_value``.
    padding_mask
        ``(B, L)`` bool, ``True`` at real tokens (CLS included).
    """

    gene_ids: torch.Tensor
    values: torch.Tensor | None
    padding_mask: torch.Tensor


_VOCAB_BITS = 18  # vocabulary ids < 262,144
_ROW_SHIFT = _VOCAB_BITS + 31  # then 31 bits of a positive float32 score
_MAX_CELLS = 1 << (63 - _ROW_SHIFT)  # 16,384 cells per call
_VOCAB_MASK = (1 << _VOCAB_BITS) - 1
_SCORE_MASK = (1 << 31) - 1


class Tokenizer:
    """Base class: shared CSR minibatch tokenisation.

    Parameters
    ----------
    vocab
        The model's gene vocabulary (with per-gene medians for ``rank_value``).
    max_genes
        Keep at most this many genes per cell (the highest-scoring ones).
    prepend_cls
        Start every sequence with the ``<cls>`` token.
    preprocessing
        Normalisation applied to the raw counts before scoring.
    """

    strategy: ClassVar[str]
    value_encoding: ClassVar[str]  # "none" | "binned" | "continuous"
    ordered: ClassVar[bool]  # does the position carry meaning (rank)?

    def __init__(
        self,
        vocab: GeneVocab,
        *,
        max_genes: int = 2048,
        prepend_cls: bool = True,
        preprocessing: Preprocessing | None = None,
    ) -> None:
        if len(vocab) > 1 << _VOCAB_BITS:
            raise ValueError(f"Vocabularies of at most {1 << _VOCAB_BITS} tokens are supported.")
        if max_genes < 1:
            raise ValueError(f"tokenizer.max_genes must be >= 1, got {max_genes}.")
        self.vocab_size = len(vocab)
        self.pad_id, self.cls_id = vocab.pad_id, vocab.cls_id
        self.max_genes = int(max_genes)
        self.prepend_cls = bool(prepend_cls)
        self.preprocessing = preprocessing or Preprocessing()

    # -- hooks -------------------------------------------------------------------------------
    def _score(self, normalized: np.ndarray, vocab_ids: np.ndarray) -> np.ndarray:
        """Positive score ordering genes within a cell (higher first)."""
        return normalized

    def _token_values(
        self,
        row: np.ndarray,
        score: np.ndarray,
        pos: np.ndarray,
        n_in_cell: np.ndarray,
    ) -> np.ndarray | None:
        """Value of every expressed gene, given in sorted order (``pos`` = rank in its cell)."""
        return None

    # -- shared path -------------------------------------------------------------------------
    @property
    def max_length(self) -> int:
        """Longest sequence this tokenizer can emit."""
        return self.max_genes + int(self.prepend_cls)

    def __call__(self, counts: Any, gene_index: np.ndarray) -> TokenizedBatch:
        """Tokenise a minibatch.

        Parameters
        ----------
        counts
            ``(B, G)`` raw counts: a scipy sparse matrix, a numpy array, or a dense or sparse
            CSR torch tensor on the CPU.
        gene_index
            ``(G,)`` vocabulary id of each column, ``-1`` for genes outside the vocabulary
            (``GeneVocab.match(adata).vocab_ids``).
        """
        if isinstance(counts, torch.Tensor):
            if counts.layout == torch.sparse_csr:
                shape = tuple(counts.shape)
                counts = sp.csr_matrix(
                    (
                        counts.values().numpy(),
                        counts.col_indices().numpy(),
                        counts.crow_indices().numpy(),
                    ),
                    shape=shape,
                )
            else:
                counts = counts.to_dense().numpy()
        csr = counts if sp.isspmatrix_csr(counts) else sp.csr_matrix(counts)
        gene_index = np.asarray(gene_index)
        if gene_index.shape[0] != csr.shape[1]:
            raise ValueError(
                f"gene_index has {gene_index.shape[0]} entries but the counts have "
                f"{csr.shape[1]} genes."
            )
        return self.tokenize_csr(csr.indptr, csr.indices, csr.data, csr.shape[0], gene_index)

    def tokenize_csr(
        self,
        indptr: np.ndarray,
        indices: np.ndarray,
        data: np.ndarray,
        n_cells: int,
        gene_index: np.ndarray,
    ) -> TokenizedBatch:
        """Tokenise the CSR arrays of a ``(n_cells, G)`` count matrix."""
        if n_cells > _MAX_CELLS:  # the sort key holds the row in the top bits
            raise ValueError(f"Tokenise at most {_MAX_CELLS} cells at once, got {n_cells}.")
        row = np.repeat(np.arange(n_cells, dtype=np.int64), np.diff(indptr))
        val = np.asarray(data, dtype=np.float32)

        # library size over all registered genes, as in scanpy's normalize_total
        libsize = np.bincount(row, weights=val, minlength=n_cells).astype(np.float32)
        vid = np.asarray(gene_index, dtype=np.int64)[indices]
        kept = np.flatnonzero((vid >= 0) & (val > 0))
        row, vid, val = row[kept], vid[kept], val[kept]
        if self.preprocessing.normalize == "library_size":
            val = val * (np.float32(self.preprocessing.target_sum) / libsize[row])
        score = np.asarray(self._score(val, vid), dtype=np.float32)

        # One sort orders every cell: by row, then descending score, then vocabulary id (so a
        # cell's tokens never depend on the gene order of the AnnData). The bit pattern of a
        # positive float32 is monotonic in its value, so the key is exact and unique.
        inv_score = _SCORE_MASK - score.view(np.int32).astype(np.int64)
        key = np.sort((row << _ROW_SHIFT) | (inv_score << _VOCAB_BITS) | vid)
        row = key >> _ROW_SHIFT
        vid = key & _VOCAB_MASK
        score = (_SCORE_MASK - ((key >> _VOCAB_BITS) & _SCORE_MASK)).astype(np.int32)
        score = score.view(np.float32)

        n_in_cell = np.bincount(row, minlength=n_cells)
        start = np.cumsum(n_in_cell) - n_in_cell
        pos = np.arange(row.size) - start[row]
        values = self._token_values(row, score, pos, n_in_cell)

        offset = int(self.prepend_cls)
        n_tokens = np.minimum(n_in_cell, self.max_genes) + offset
        # an empty cell (no expressed vocabulary gene) keeps one <cls> token, never zero tokens
        length = max(int(n_tokens.max()) if n_cells else 1, 1)
        kept = slice(None)
        if n_in_cell.max(initial=0) > self.max_genes:
            kept = np.flatnonzero(pos < self.max_genes)
        flat = row[kept] * length + pos[kept] + offset  # position in the (B, L) output
        gene_ids = np.full(n_cells * length, self.pad_id, dtype=np.int64)
        padding_mask = np.zeros(n_cells * length, dtype=bool)
        gene_ids[flat] = vid[kept]
        padding_mask[flat] = True
        cls_rows = np.ones(n_cells, dtype=bool) if self.prepend_cls else n_in_cell == 0
        gene_ids[np.flatnonzero(cls_rows) * length] = self.cls_id
        padding_mask[np.flatnonzero(cls_rows) * length] = True

        out_values = None
        if values is not None:
            out_values = np.zeros(n_cells * length, dtype=values.dtype)
            out_values[flat] = values[kept]
            out_values = torch.from_numpy(out_values.reshape(n_cells, length))
        return TokenizedBatch(
            gene_ids=torch.from_numpy(gene_ids.reshape(n_cells, length)),
            values=out_values,
            padding_mask=torch.from_numpy(padding_mask.reshape(n_cells, length)),
        )

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "max_genes": self.max_genes,
            "prepend_cls": self.prepend_cls,
        }

    def extra_repr(self) -> str:
        return f"max_genes={self.max_genes}, prepend_cls={self.prepend_cls}"


class RankValueTokenizer(Tokenizer):
    """Geneformer-style rank-value encoding.

    Genes are ranked by normalised expression divided by the gene's non-zero median over the
    training corpus (stored in the vocabulary, see :func:`fit_gene_medians`), so that
    housekeeping genes expressed everywhere rank below genes that distinguish the cell. The
    token's position is its rank; no expression value is carried.
    """

    strategy = "rank_value"
    value_encoding = "none"
    ordered = True

    def __init__(self, vocab: GeneVocab, **kwargs: Any) -> None:
        super().__init__(vocab, **kwargs)
        if vocab.gene_medians is None:
            raise ValueError(
                "The rank_value tokenizer needs per-gene medians in the vocabulary. Fit them once "
                "on the training data with `scforge_scvi.data.fit_gene_medians(adata, vocab)`."
            )
        self.gene_medians = np.asarray(vocab.gene_medians, dtype=np.float32)

    def _score(self, normalized: np.ndarray, vocab_ids: np.ndarray) -> np.ndarray:
        return normalized / self.gene_medians[vocab_ids]


class BinnedExpressionTokenizer(Tokenizer):
    """scGPT-style value binning.

    Each cell's non-zero ``log1p`` values are split into ``n_bins - 1`` quantile bins of that
    cell (bin ``b`` holds values above a fraction ``(b-1)/(n_bins-1)`` of the cell's expressed
    genes), so bins are comparable across sequencing depths; equal values share a bin. Bin 0 is
    reserved for the ``<cls>`` token and padding.
    """

    strategy = "binned_expression"
    value_encoding = "binned"
    ordered = False

    def __init__(self, vocab: GeneVocab, *, n_bins: int = 51, **kwargs: Any) -> None:
        super().__init__(vocab, **kwargs)
        if n_bins < 2:
            raise ValueError(f"tokenizer.n_bins must be >= 2, got {n_bins}.")
        self.n_bins = int(n_bins)

    def _token_values(self, row, score, pos, n_in_cell) -> np.ndarray:
        # last rank of each run of equal values, so that equal values share a bin
        run_start = np.ones(row.size, dtype=bool)
        run_start[1:] = (row[1:] != row[:-1]) | (score[1:] != score[:-1])
        starts = np.flatnonzero(run_start)
        ends = np.append(starts[1:], row.size) - 1
        run_end = np.repeat(pos[ends], ends - starts + 1)
        n = n_in_cell[row]
        frac = (n - 1 - run_end) / n  # fraction of the cell's genes with a strictly lower value
        return 1 + np.minimum((frac * (self.n_bins - 1)).astype(np.int64), self.n_bins - 2)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "n_bins": self.n_bins}


class ContinuousTokenizer(Tokenizer):
    """Gene tokens with their normalised (and ``log1p``-ed, if configured) expression value."""

    strategy = "continuous"
    value_encoding = "continuous"
    ordered = False

    def _token_values(self, row, score, pos, n_in_cell) -> np.ndarray:
        return np.log1p(score) if self.preprocessing.log1p else score


TOKENIZERS: dict[str, type[Tokenizer]] = {
    cls.strategy: cls
    for cls in (RankValueTokenizer, BinnedExpressionTokenizer, ContinuousTokenizer)
}


def build_tokenizer(
    strategy: str, vocab: GeneVocab, preprocessing: Preprocessing | None = None, **kwargs: Any
) -> Tokenizer:
    """Build a tokenizer by name (``rank_value``, ``binned_expression``, ``continuous``)."""
    if strategy not in TOKENIZERS:
        raise ValueError(
            f"Unknown tokenizer strategy {strategy!r}; choose one of {sorted(TOKENIZERS)}."
        )
    if strategy != "binned_expression":
        kwargs.pop("n_bins", None)
    return TOKENIZERS[strategy](vocab, preprocessing=preprocessing, **kwargs)
