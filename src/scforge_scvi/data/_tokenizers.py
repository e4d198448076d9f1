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

Scores are float32 by default. ``RankValueTokenizer(score_dtype="float64")`` instead follows
Geneformer's tokenizer operation for operation (see :class:`RankValueTokenizer`), which imported
Geneformer models use to reproduce its token ids exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
import torch

from ._preprocess import Preprocessing
from ._vocab import UNK_ID, GeneVocab

#: Token id of the end-of-sequence token of ``append_eos``: the ``<unk>`` slot of every
#: vocabulary, which no tokenizer emits otherwise (see :class:`Tokenizer`).
EOS_ID = UNK_ID
SCORE_DTYPES = ("float32", "float64")


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
    append_eos
        End every sequence with an end-of-sequence token (Geneformer V2 models). It is token id
        :data:`EOS_ID`, the vocabulary's ``<unk>`` slot: no tokenizer emits ``<unk>`` otherwise
        (genes outside the vocabulary are left out), and an imported Geneformer ``<eos>``
        embedding is stored there.
    preprocessing
        Normalisation applied to the raw counts before scoring.
    """

    strategy: ClassVar[str]
    value_encoding: ClassVar[str]  # "none" | "binned" | "continuous"
    ordered: ClassVar[bool]  # does the position carry meaning (rank)?
    score_dtype: str = "float32"  # "float64": Geneformer's arithmetic (rank_value only)

    def __init__(
        self,
        vocab: GeneVocab,
        *,
        max_genes: int = 2048,
        prepend_cls: bool = True,
        append_eos: bool = False,
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
        self.append_eos = bool(append_eos)
        self.eos_id = EOS_ID
        self.preprocessing = preprocessing or Preprocessing()

    # -- hooks -------------------------------------------------------------------------------
    def _score(self, normalized: np.ndarray, vocab_ids: np.ndarray) -> np.ndarray:
        """Positive score ordering genes within a cell (higher first)."""
        return normalized

    def _token_values(self, score: np.ndarray, n_in_cell: np.ndarray) -> np.ndarray | None:
        """Value of every expressed gene, from its score in sorted order.

        ``score`` holds the cells one after another (``n_in_cell`` genes each), each cell's
        genes in token order: descending score, ties by vocabulary id.
        """
        return None

    # -- shared path -------------------------------------------------------------------------
    @property
    def n_special_tokens(self) -> int:
        """Tokens of a sequence that are not genes: ``<cls>`` and ``<eos>`` when added."""
        return int(self.prepend_cls) + int(self.append_eos)

    @property
    def max_length(self) -> int:
        """Longest sequence this tokenizer can emit."""
        return self.max_genes + self.n_special_tokens

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

        Returns
        -------
        TokenizedBatch
            Padded to the longest cell of the minibatch. A cell without any count in a
            vocabulary gene (e.g. a cell with zero counts) is kept and gets the ``<cls>``
            token alone (then the end-of-sequence token with ``append_eos``), so that every
            cell has exactly one row and at least one real token.
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
        indptr = np.asarray(indptr, dtype=np.int64)
        val = np.asarray(data, dtype=np.float32)
        vid = np.asarray(gene_index, dtype=np.int64)[indices]

        # library size over all registered genes, as in scanpy's normalize_total
        libsize64 = _row_sums(val, indptr, np.float64)
        libsize = libsize64.astype(np.float32)
        n_in_cell = np.diff(indptr)
        if val.size and (vid.min() < 0 or not val.min() > 0):  # unknown genes, stored zeros
            keep = (vid >= 0) & (val > 0)
            n_in_cell = _row_sums(keep, indptr, np.int64)
            vid, val = vid[keep], val[keep]
        if self.score_dtype == "float64":
            vid = self._sort_float64(val, vid, libsize64, n_in_cell, n_cells)
            return self._scatter(vid, None, n_in_cell, n_cells)
        if self.preprocessing.normalize == "library_size":
            target = np.float32(self.preprocessing.target_sum)
            scale = np.divide(target, libsize, out=np.zeros_like(libsize), where=libsize > 0)
            val = val * np.repeat(scale, n_in_cell)
        score = np.asarray(self._score(val, vid), dtype=np.float32)

        # One sort orders every cell: by row, then descending score, then vocabulary id (so a
        # cell's tokens never depend on the gene order of the AnnData). The bit pattern of a
        # positive float32 is monotonic in its value, so the key is exact and unique:
        # key = row << _ROW_SHIFT | (_SCORE_MASK - score bits) << _VOCAB_BITS | vid.
        key = score.view(np.int32).astype(np.int64)
        key <<= _VOCAB_BITS
        base = (np.arange(n_cells, dtype=np.int64) << _ROW_SHIFT) | (_SCORE_MASK << _VOCAB_BITS)
        np.subtract(np.repeat(base, n_in_cell), key, out=key)
        key |= vid
        key.sort()  # rows keep their places and sizes: n_in_cell still holds
        np.bitwise_and(key, _VOCAB_MASK, out=vid)

        values = None
        if self.value_encoding != "none":
            bits = key >> _VOCAB_BITS
            bits &= _SCORE_MASK
            np.subtract(_SCORE_MASK, bits, out=bits)
            values = self._token_values(bits.astype(np.int32).view(np.float32), n_in_cell)
        return self._scatter(vid, values, n_in_cell, n_cells)

    def _sort_float64(
        self,
        val: np.ndarray,
        vid: np.ndarray,
        libsize: np.ndarray,
        n_in_cell: np.ndarray,
        n_cells: int,
    ) -> np.ndarray:
        """Vocabulary ids in token order, scored in float64 (``score_dtype="float64"``)."""
        score = val.astype(np.float64)
        if self.preprocessing.normalize == "library_size":
            # Geneformer's `X / n_counts * target_sum / median` on a sparse matrix, as scipy
            # evaluates it: each division is a product with the float64 reciprocal.
            inverse = np.divide(1.0, libsize, out=np.zeros_like(libsize), where=libsize > 0)
            score *= np.repeat(inverse, n_in_cell)
            score *= np.float64(self.preprocessing.target_sum)
        score *= self._score_factor64[vid]
        rows = np.repeat(np.arange(n_cells, dtype=np.int64), n_in_cell)
        # by row, then descending score, then vocabulary id
        return vid[np.lexsort((vid, -score, rows))]

    def _scatter(
        self,
        vid: np.ndarray,
        values: np.ndarray | None,
        n_in_cell: np.ndarray,
        n_cells: int,
    ) -> TokenizedBatch:
        """Truncate each cell's sorted tokens to ``max_genes`` and pad them into ``(B, L)``."""
        if n_in_cell.max(initial=0) > self.max_genes:  # keep each cell's first max_genes
            start = np.cumsum(n_in_cell) - n_in_cell
            kept = np.arange(vid.size) - np.repeat(start, n_in_cell) < self.max_genes
            vid = vid[kept]
            values = None if values is None else values[kept]

        # Scatter into (B, L): a cell's tokens fill its row from the left, in order, so a
        # boolean mask of the gene slots takes them in exactly the sorted order.
        offset = int(self.prepend_cls)
        n_tokens = np.minimum(n_in_cell, self.max_genes) + offset
        length = max(int(n_tokens.max(initial=0)), 1) + int(self.append_eos)
        slots = np.arange(length) < n_tokens[:, None]
        slots[:, :offset] = False
        gene_ids = np.full((n_cells, length), self.pad_id, dtype=np.int64)
        gene_ids[slots] = vid
        out_values = None
        if values is not None:
            out_values = np.zeros((n_cells, length), dtype=values.dtype)
            out_values[slots] = values
            out_values = torch.from_numpy(out_values)
        # an empty cell (no expressed vocabulary gene) keeps one <cls> token, never zero tokens
        cls_rows = slice(None) if self.prepend_cls else n_in_cell == 0
        gene_ids[cls_rows, 0] = self.cls_id
        padding_mask = slots
        padding_mask[cls_rows, 0] = True
        if self.append_eos:  # after the last token (after the lone <cls> of an empty cell)
            end = np.maximum(n_tokens, 1)
            gene_ids[np.arange(n_cells), end] = self.eos_id
            padding_mask[np.arange(n_cells), end] = True
        return TokenizedBatch(
            gene_ids=torch.from_numpy(gene_ids),
            values=out_values,
            padding_mask=torch.from_numpy(padding_mask),
        )

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Settings that rebuild this tokenizer with :func:`build_tokenizer` (JSON-safe).

        ``append_eos`` and ``score_dtype`` appear only when they differ from their defaults.
        """
        d: dict[str, Any] = {
            "strategy": self.strategy,
            "max_genes": self.max_genes,
            "prepend_cls": self.prepend_cls,
        }
        if self.append_eos:
            d["append_eos"] = True
        if self.score_dtype != "float32":
            d["score_dtype"] = self.score_dtype
        return d

    def __repr__(self) -> str:
        settings = {k: v for k, v in self.to_dict().items() if k != "strategy"}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in settings.items())})"


class RankValueTokenizer(Tokenizer):
    """Geneformer-style rank-value encoding.

    Genes are ranked by normalised expression divided by the gene's non-zero median over the
    training corpus (stored in the vocabulary, see :func:`fit_gene_medians`), so that
    housekeeping genes expressed everywhere rank below genes that distinguish the cell. The
    token's position is its rank; no expression value is carried.

    Parameters
    ----------
    vocab, **kwargs
        See :class:`Tokenizer`.
    score_dtype
        ``"float32"`` (default): ``counts * (target_sum / library size) / median`` in float32,
        sorted by one packed integer key. ``"float64"``: Geneformer's rule operation for
        operation, ``counts * (1 / n_counts) * target_sum * (1 / median)`` in float64 with the
        medians at the vocabulary's precision (this is how scipy evaluates Geneformer's
        ``X / n_counts * target_sum / median`` on a sparse matrix); slower (a lexsort). Both
        order a cell's genes by descending score and break exact ties by ascending vocabulary
        id. (Geneformer's own ``np.argsort(-score)`` leaves the order of tied genes to numpy's
        quicksort; only tied genes can come out in another order.)
    """

    strategy = "rank_value"
    value_encoding = "none"
    ordered = True

    def __init__(self, vocab: GeneVocab, *, score_dtype: str = "float32", **kwargs: Any) -> None:
        super().__init__(vocab, **kwargs)
        if vocab.gene_medians is None:
            raise ValueError(
                "The rank_value tokenizer needs per-gene medians in the vocabulary. Fit them once "
                "on the training data with `scforge_scvi.data.fit_gene_medians(adata, vocab)`."
            )
        if score_dtype not in SCORE_DTYPES:
            raise ValueError(
                f"tokenizer.score_dtype must be one of {SCORE_DTYPES}, got {score_dtype!r}."
            )
        self.score_dtype = score_dtype
        self.gene_medians = np.asarray(vocab.gene_medians, dtype=np.float32)
        if score_dtype == "float64":
            medians = np.asarray(vocab.gene_medians, dtype=np.float64)
            self._score_factor64 = np.divide(1.0, medians)

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

    def _token_values(self, score: np.ndarray, n_in_cell: np.ndarray) -> np.ndarray:
        if score.size == 0:  # no cell of the batch expresses a vocabulary gene
            return np.zeros(0, dtype=np.int64)
        # Runs of equal values within a cell share one bin, that of the run's last rank; the
        # bin is computed once per run.
        cell_start = np.cumsum(n_in_cell) - n_in_cell
        run_start = np.empty(score.size, dtype=bool)
        run_start[0] = True
        np.not_equal(score[1:], score[:-1], out=run_start[1:])
        run_start[cell_start[n_in_cell > 0]] = True
        starts = np.flatnonzero(run_start)
        lengths = np.diff(starts, append=score.size)
        cell = np.searchsorted(cell_start, starts, side="right") - 1  # empty cells share starts
        n = n_in_cell[cell]
        last_rank = starts + lengths - 1 - cell_start[cell]
        frac = (n - 1 - last_rank) / n  # fraction of the cell's genes with a strictly lower value
        bins = 1 + np.minimum((frac * (self.n_bins - 1)).astype(np.int64), self.n_bins - 2)
        return np.repeat(bins, lengths)

    def to_dict(self) -> dict[str, Any]:
        """Settings that rebuild this tokenizer, ``n_bins`` included."""
        return {**super().to_dict(), "n_bins": self.n_bins}


class ContinuousTokenizer(Tokenizer):
    """Gene tokens with their normalised (and ``log1p``-ed, if configured) expression value."""

    strategy = "continuous"
    value_encoding = "continuous"
    ordered = False

    def _token_values(self, score: np.ndarray, n_in_cell: np.ndarray) -> np.ndarray:
        return np.log1p(score) if self.preprocessing.log1p else score


def _row_sums(values: np.ndarray, indptr: np.ndarray, dtype: type) -> np.ndarray:
    """Sum of the stored values of each CSR row (0 for an empty row), accumulated in ``dtype``."""
    sums = np.zeros(indptr.size - 1, dtype=dtype)
    nonempty = np.flatnonzero(indptr[1:] > indptr[:-1])
    if nonempty.size:
        sums[nonempty] = np.add.reduceat(values, indptr[nonempty], dtype=dtype)
    return sums


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
    if strategy != "rank_value":
        score_dtype = kwargs.pop("score_dtype", "float32")
        if score_dtype != "float32":
            raise ValueError(
                f"score_dtype={score_dtype!r} is only available with the rank_value tokenizer."
            )
    return TOKENIZERS[strategy](vocab, preprocessing=preprocessing, **kwargs)
