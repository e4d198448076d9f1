"""Matching a dataset's genes onto a :class:`~scforge_scvi.data.GeneVocab`.

:meth:`VocabMatchingMixin.match` (``vocab.match(adata)``) finds which of the data's identifiers
to compare (``var_names`` or a ``var`` column, Ensembl ids or symbols, whichever matches more),
maps each data gene to its token id, and refuses a match that covers too little of the data
with a message saying what to change.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from scforge_scvi._errors import ScForgeTypeError, ScForgeValueError

from ._gene_ids import (
    _ID_COLUMNS,
    _SYMBOL_COLUMNS,
    _as_str_index,
    _examples,
    _first_column,
    _looks_ensembl,
    _strip_versions,
    _var_column,
)

if TYPE_CHECKING:
    from anndata import AnnData


MatchBy = Literal["auto", "ensembl", "symbol"]


class VocabCoverageError(ScForgeValueError):
    """Too few of the data's genes were found in the gene vocabulary."""


@dataclass(frozen=True)
class GeneMatch:
    """How the genes of a dataset map onto a :class:`GeneVocab`.

    Attributes
    ----------
    vocab_ids
        Token id of each data gene (int64, length ``n_genes``); ``-1`` where the gene is not in
        the vocabulary or repeats an already matched vocabulary gene.
    n_genes
        Number of genes in the data.
    n_matched
        Number of data genes with a token id.
    coverage
        Fraction of the data's genes found in the vocabulary.
    vocab_coverage
        Fraction of the vocabulary's genes present in the data.
    matched_by
        ``"ensembl"`` or ``"symbol"``.
    duplicates
        Data gene names left unmatched because an earlier data gene took their vocabulary gene.
    ambiguous
        Data symbols matched to the first of several vocabulary genes sharing that symbol.
    data_key
        Which data identifiers were used, e.g. ``"var['gene_ids']"`` or ``"var_names"``.
    vocab_name
        The vocabulary's name as shown in messages.
    n_vocab_genes
        Number of genes in the vocabulary.
    """

    vocab_ids: np.ndarray
    n_genes: int
    n_matched: int
    coverage: float
    vocab_coverage: float
    matched_by: str
    duplicates: list[str] = field(default_factory=list)
    ambiguous: list[str] = field(default_factory=list)
    data_key: str = "names"
    vocab_name: str = ""
    n_vocab_genes: int = 0

    @property
    def matched(self) -> np.ndarray:
        """Boolean mask of the data genes that have a token id."""
        return self.vocab_ids >= 0

    def summary(self) -> str:
        """A one-paragraph, human-readable coverage report."""
        by = "Ensembl id" if self.matched_by == "ensembl" else "symbol"
        text = (
            f"Matched {self.n_matched:,} of {self.n_genes:,} data genes ({self.coverage:.1%}) "
            f"to the vocabulary {self.vocab_name} by {by} using {self.data_key}; they cover "
            f"{self.vocab_coverage:.1%} of its {self.n_vocab_genes:,} genes."
        )
        if self.n_matched < self.n_genes:
            text += f" {self.n_genes - self.n_matched:,} data genes have no token and are ignored."
        if self.duplicates:
            text += (
                f" {len(self.duplicates)} repeated an already matched gene and were left "
                f"unmatched ({_examples(self.duplicates, 3)})."
            )
        if self.ambiguous:
            text += (
                f" {len(self.ambiguous)} symbols are shared by several vocabulary genes and "
                f"went to the first of them ({_examples(self.ambiguous, 3)})."
            )
        return text


class VocabMatchingMixin:
    """The :meth:`match` method of :class:`~scforge_scvi.data.GeneVocab`.

    It reads the vocabulary's lookup tables: ``n_genes``, ``n_special``, ``_label``,
    ``_gene_index``, ``_symbol_table``, ``_ambiguous_symbols``, ``_ensembl_mask`` and
    ``_symbols``.
    """

    def match(
        self,
        data: AnnData | Sequence[str],
        *,
        gene_key: str | None = None,
        by: MatchBy = "auto",
        min_coverage: float = 0.5,
        coverage_of: Literal["data", "vocab"] = "data",
    ) -> GeneMatch:
        """Map the genes of a dataset onto token ids of this vocabulary.

        Parameters
        ----------
        data
            An AnnData (its ``var`` is read) or a sequence of gene names.
        gene_key
            Column of ``adata.var`` holding the identifiers to match; ``None`` uses
            ``var_names`` (or, with ``by="auto"``, whichever of ``var_names`` and the common
            columns ``gene_ids``, ``gene_id``, ``ensembl_id`` / ``gene_symbols``, ... matches
            better).
        by
            ``"ensembl"`` compares Ensembl gene ids (version suffixes such as ``.16`` are
            ignored); ``"symbol"`` compares gene symbols exactly (case-sensitive; a symbol shared
            by several vocabulary genes goes to the first of them); ``"auto"`` tries Ensembl ids
            where the data has them and symbols where it has them, and keeps whichever matches
            more of the data's genes (Ensembl ids on a tie).
        min_coverage
            Smallest accepted fraction of the data's genes found in the vocabulary.
        coverage_of
            Which fraction ``min_coverage`` applies to: ``"data"`` (of the data's genes in the
            vocabulary) or ``"vocab"`` (of the vocabulary's genes in the data; for a
            vocabulary selected from a dataset's genes, e.g. highly variable ones).

        Returns
        -------
        The :class:`GeneMatch`; ``vocab_ids[j]`` is the token id of data gene ``j`` or ``-1``.
        A data gene naming a vocabulary gene already matched by an earlier data gene is left
        unmatched, listed in :attr:`GeneMatch.duplicates` and warned about.

        Raises
        ------
        VocabCoverageError
            If less than ``min_coverage`` of the data's genes are in the vocabulary.
        """
        if by not in ("auto", "ensembl", "symbol"):
            raise ScForgeValueError(f"by must be 'auto', 'ensembl' or 'symbol'; got {by!r}.")
        if not 0.0 <= min_coverage <= 1.0:
            raise ScForgeValueError(f"min_coverage must lie in [0, 1]; got {min_coverage}.")

        best: GeneMatch | None = None
        for kind, key, names in _candidates(data, gene_key=gene_key, by=by):
            result = self._match_names(names, kind=kind, key=key)
            if best is None or result.n_matched > best.n_matched:
                best = result
        assert best is not None

        if coverage_of not in ("data", "vocab"):
            raise ScForgeValueError(f"coverage_of must be 'data' or 'vocab'; got {coverage_of!r}.")
        if coverage_of == "vocab" and best.vocab_coverage < min_coverage:
            raise VocabCoverageError(
                f"Only {best.vocab_coverage:.1%} of the {best.n_vocab_genes} genes of the "
                f"vocabulary {self._label} are in the data (matched by {best.matched_by} using "
                f"{best.data_key}); at least {min_coverage:.1%} required. Lower `min_coverage` "
                "to accept the match anyway."
            )
        if coverage_of == "data" and best.coverage < min_coverage:
            raise VocabCoverageError(self._coverage_message(best, data, min_coverage))
        if best.duplicates:
            warnings.warn(
                f"{len(best.duplicates)} data gene(s) name a vocabulary gene already matched by "
                f"an earlier gene of the data and were left unmatched: "
                f"{_examples(best.duplicates)}. Make the data's gene identifiers unique to "
                "choose which copy is used.",
                UserWarning,
                stacklevel=2,
            )
        return best

    def _match_names(self, names: pd.Index, *, kind: str, key: str) -> GeneMatch:
        """Token ids of ``names``, compared as ``kind`` (``"ensembl"`` or ``"symbol"``)."""
        if kind == "ensembl":
            positions = self._gene_index.get_indexer(_strip_versions(names))
            ambiguous = np.zeros(len(names), dtype=bool)
        else:
            symbols, first_positions = self._symbol_table
            hit = symbols.get_indexer(names)
            positions = np.full(len(names), -1, dtype=np.int64)
            positions[hit >= 0] = first_positions[hit[hit >= 0]]
            ambiguous = np.asarray(names.isin(self._ambiguous_symbols), dtype=bool)

        # A vocabulary gene matched twice keeps its first data gene; later ones become -1.
        matched = np.flatnonzero(positions >= 0)
        _, first_seen = np.unique(positions[matched], return_index=True)
        repeated = np.setdiff1d(matched, matched[first_seen])
        positions[repeated] = -1

        vocab_ids = np.where(positions >= 0, positions + self.n_special, -1).astype(np.int64)
        n_matched = int((positions >= 0).sum())
        return GeneMatch(
            vocab_ids=vocab_ids,
            n_genes=len(names),
            n_matched=n_matched,
            coverage=n_matched / len(names) if len(names) else 0.0,
            vocab_coverage=n_matched / self.n_genes,
            matched_by=kind,
            duplicates=list(names[repeated]),
            ambiguous=list(names[ambiguous & (positions >= 0)]),
            data_key=key,
            vocab_name=self._label,
            n_vocab_genes=self.n_genes,
        )

    def _coverage_message(self, best: GeneMatch, data: Any, min_coverage: float) -> str:
        if _is_anndata(data):
            var_names = _as_str_index(data.var_names)
            looks = "Ensembl ids" if _looks_ensembl(var_names) else "gene symbols"
            hint = (
                "Check that the same kind of identifier is compared on both sides: pass "
                "`gene_key` naming the var column with the identifiers (e.g. 'gene_ids' for "
                "Ensembl ids), set `by` to 'ensembl' or 'symbol' to match what it holds (here "
                f"var_names look like {looks}: {_examples(list(var_names[:3]), 3)}; var "
                f"columns: {list(map(str, data.var.columns))})"
            )
        else:
            hint = (
                "Check that the names are the kind of identifier the vocabulary holds and set "
                "`by` to 'ensembl' or 'symbol' accordingly"
            )
        kinds = "Ensembl ids" if self._ensembl_mask.mean() > 0.5 else "gene symbols"
        if self._symbols is not None:
            kinds += " with symbols"
        return (
            f"Only {best.coverage:.1%} ({best.n_matched} of {best.n_genes}) of the data's genes "
            f"are in the vocabulary {self._label} (matched by {best.matched_by} using "
            f"{best.data_key}); at least {min_coverage:.1%} required. {hint}, and that the "
            f"vocabulary ({kinds}) is for the data's species. Lower `min_coverage` to accept "
            "the match anyway."
        )


def _is_anndata(data: Any) -> bool:
    return hasattr(data, "var") and hasattr(data, "var_names")


def _candidates(
    data: AnnData | Sequence[str], *, gene_key: str | None, by: str
) -> list[tuple[str, str, pd.Index]]:
    """(kind, description, names) triples to try, Ensembl first so that it wins a tie."""
    if not _is_anndata(data):
        if gene_key is not None:
            raise ScForgeValueError("gene_key selects a column of adata.var; it needs an AnnData.")
        if isinstance(data, str):
            raise ScForgeTypeError(
                "match() needs an AnnData or a sequence of gene names, not a str."
            )
        names = _as_str_index(data)
        kinds = ["ensembl", "symbol"] if by == "auto" else [by]
        return [(kind, "the given names", names) for kind in kinds]

    var = data.var
    if gene_key is not None:
        names = _var_column(data, gene_key)
        kinds = ["ensembl", "symbol"] if by == "auto" else [by]
        return [(kind, f"var[{gene_key!r}]", names) for kind in kinds]

    var_names = _as_str_index(data.var_names)
    index_is_ensembl = _looks_ensembl(var_names)
    sources: dict[str, tuple[str, pd.Index]] = {}
    if index_is_ensembl:
        sources["ensembl"] = ("var_names", var_names)
        column = _first_column(var, _SYMBOL_COLUMNS, ensembl=False)
        if column is not None:
            sources["symbol"] = (f"var[{column!r}]", _as_str_index(var[column]))
    else:
        sources["symbol"] = ("var_names", var_names)
        column = _first_column(var, _ID_COLUMNS, ensembl=True)
        if column is not None:
            sources["ensembl"] = (f"var[{column!r}]", _as_str_index(var[column]))

    kinds = [k for k in ("ensembl", "symbol") if k in sources] if by == "auto" else [by]
    if by != "auto" and by not in sources:
        columns = _ID_COLUMNS if by == "ensembl" else _SYMBOL_COLUMNS
        what = "Ensembl ids" if by == "ensembl" else "gene symbols"
        raise ScForgeValueError(
            f"by={by!r} but neither adata.var_names nor any of the var columns {list(columns)} "
            f"hold {what}. Pass gene_key naming the var column with {what}; available columns: "
            f"{list(map(str, var.columns))}."
        )
    return [(kind, *sources[kind]) for kind in kinds]
