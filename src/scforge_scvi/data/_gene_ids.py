"""Gene identifiers: Ensembl ids and symbols, and where an AnnData keeps them.

Shared by the vocabulary (:mod:`._vocab`) and the matching of data genes onto it
(:mod:`._matching`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from scforge_scvi._errors import ScForgeValueError

if TYPE_CHECKING:
    from anndata import AnnData

# Ensembl gene ids: ENSG00000141510, ENSMUSG00000059552, ENSGR0000182378 (a PAR copy on chrY),
# optionally followed by a version (".16") and GENCODE's "_PAR_Y" tag.
_ENSEMBL_PATTERN = r"ENS[A-Z]*\d{10,}"
_ENSEMBL_RE = re.compile(rf"^{_ENSEMBL_PATTERN}(?:\.\d+)?(?:_PAR_Y)?$")
_VERSION_RE = re.compile(rf"^({_ENSEMBL_PATTERN})\.\d+")

# var columns searched (in this order) when ``by="auto"`` looks for the other kind of identifier.
_ID_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "ensembl_ids")
_SYMBOL_COLUMNS = ("gene_symbols", "gene_symbol", "symbol", "symbols", "gene_name", "feature_name")


def _as_str_index(values: Any) -> pd.Index:
    """Return ``values`` as a pandas Index of strings (missing values become ``""``)."""
    index = pd.Index(values)
    if index.dtype != object or not all(isinstance(v, str) for v in index):
        index = pd.Index(["" if pd.isna(v) else str(v) for v in index], dtype=object)
    return index


def _strip_versions(names: pd.Index) -> pd.Index:
    """Drop Ensembl version suffixes: ``ENSG00000141510.16`` -> ``ENSG00000141510``."""
    return pd.Index(names.str.replace(_VERSION_RE, r"\1", regex=True), dtype=object)


def _is_ensembl(names: pd.Index) -> np.ndarray:
    return np.asarray(names.str.match(_ENSEMBL_RE), dtype=bool)


def _looks_ensembl(names: pd.Index) -> bool:
    """Whether most identifiers in ``names`` are Ensembl gene ids."""
    return len(names) > 0 and bool(_is_ensembl(names).mean() > 0.5)


def _examples(names: Sequence[str], k: int = 5) -> str:
    shown = ", ".join(repr(n) for n in list(names)[:k])
    return shown + (", ..." if len(names) > k else "")


def _var_column(adata: AnnData, key: str) -> pd.Index:
    if key not in adata.var.columns:
        raise ScForgeValueError(
            f"gene_key {key!r} is not a column of adata.var; available columns: "
            f"{list(map(str, adata.var.columns))}. Use gene_key=None for adata.var_names."
        )
    return _as_str_index(adata.var[key])


def _first_column(var: pd.DataFrame, columns: Sequence[str], *, ensembl: bool) -> str | None:
    """The first of ``columns`` present in ``var`` whose values are (not) Ensembl ids."""
    for column in columns:
        if column in var.columns and _looks_ensembl(_as_str_index(var[column])) == ensembl:
            return column
    return None
