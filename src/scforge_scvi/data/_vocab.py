"""The gene vocabulary: which genes a model knows, and the token id of each.

A model's vocabulary is fixed when the model is created and travels with it (as
``gene_vocab.json`` in a pretrained directory). New data is *matched* against the vocabulary,
never used to rebuild it, so that token ``i`` means the same gene in pretraining, fine-tuning
and inference.

Token ids ``0..3`` are the special tokens :data:`SPECIAL_TOKENS`; gene ``j`` of
:attr:`GeneVocab.genes` has token id ``j + N_SPECIAL``.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from scforge_scvi._errors import (
    ScForgeFileNotFoundError,
    ScForgeKeyError,
    ScForgeValueError,
)

from ._gene_ids import (
    _SYMBOL_COLUMNS,
    _VERSION_RE,
    _as_str_index,
    _examples,
    _first_column,
    _is_ensembl,
    _looks_ensembl,
    _strip_versions,
    _var_column,
)
from ._matching import VocabMatchingMixin

if TYPE_CHECKING:
    from anndata import AnnData


SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<cls>", "<mask>", "<unk>")
PAD_ID, CLS_ID, MASK_ID, UNK_ID = range(4)
N_SPECIAL = len(SPECIAL_TOKENS)

FORMAT_NAME = "scforge-gene-vocab"
FORMAT_VERSION = 1

# Named vocabularies shipped as package data: name -> (file under resources/, description).
_NAMED_VOCABS: dict[str, tuple[str, str]] = {
    "human_protein_coding": (
        "human_protein_coding.tsv",
        "GENCODE v22 human protein-coding genes",
    ),
}

# A first line of a text vocabulary whose first field is one of these is a header, not a gene.
_HEADER_FIELDS = frozenset(("ensembl_id", "gene_id", "gene_ids", "gene", "genes", "symbol", "id"))


class GeneVocab(VocabMatchingMixin):
    """An ordered, immutable gene vocabulary with special tokens.

    Token ids ``0..3`` are ``<pad>``, ``<cls>``, ``<mask>`` and ``<unk>``; gene ``j`` of
    :attr:`genes` has token id ``j + 4``.

    Parameters
    ----------
    genes
        Primary gene identifiers, unique: Ensembl gene ids where known (version suffixes such as
        ``.16`` are removed), gene symbols otherwise.
    symbols
        Gene symbols parallel to ``genes`` (``""`` where unknown), or ``None``. Symbols need not be
        unique; see :meth:`match` for how a symbol shared by several genes is resolved.
    gene_medians
        Optional per-token statistic (e.g. the median of each gene's normalised expression on
        the pretraining corpus), ``float32`` of length ``len(vocab)``, special tokens included.
        It is fitted elsewhere; the vocabulary only validates, stores and saves it. Entries of
        genes must be finite and positive; entries of special tokens must be finite.
    gene_medians_dtype
        ``"float32"`` (default) or ``"float64"``: precision in which ``gene_medians`` are kept
        and saved. ``"float64"`` keeps imported statistics (Geneformer's gene median
        dictionary) bit for bit, for tokenizers that score in float64.
    source
        Where the vocabulary came from (kept for provenance).
    name
        Optional short name used in messages, e.g. ``"human_protein_coding"``.

    Notes
    -----
    Symbols shared by several genes (GENCODE has ~100, e.g. the X and Y copies of
    pseudoautosomal genes such as ``CD99``) resolve to the **first** gene with that symbol in
    vocabulary order, both in :meth:`token_to_id` and in :meth:`match` with ``by="symbol"``;
    :attr:`GeneMatch.ambiguous` lists the data genes matched this way.

    Examples
    --------
    >>> vocab = GeneVocab.from_name("human_protein_coding")
    >>> match = vocab.match(adata, gene_key="gene_ids")
    >>> print(match.summary())
    """

    def __init__(
        self,
        genes: Sequence[str],
        symbols: Sequence[str] | None = None,
        *,
        gene_medians: np.ndarray | Sequence[float] | None = None,
        gene_medians_dtype: Literal["float32", "float64"] = "float32",
        source: str = "",
        name: str | None = None,
    ) -> None:
        if gene_medians_dtype not in ("float32", "float64"):
            raise ValueError(
                f"gene_medians_dtype must be 'float32' or 'float64', got {gene_medians_dtype!r}."
            )
        self._medians_dtype = np.dtype(gene_medians_dtype)
        gene_index = _as_str_index(genes)
        if len(gene_index) == 0:
            raise ScForgeValueError("A GeneVocab needs at least one gene; got an empty gene list.")
        gene_index = _strip_versions(gene_index)
        bad = [g for g in ("", *SPECIAL_TOKENS) if g in gene_index]
        if bad:
            raise ScForgeValueError(
                f"Gene identifiers may not be empty or a special token; found {_examples(bad)}."
            )
        _check_unique(gene_index, where="the gene list")
        self._genes: tuple[str, ...] = tuple(gene_index)

        self._symbols: tuple[str, ...] | None = None
        if symbols is not None:
            symbol_index = _as_str_index(symbols)
            if len(symbol_index) != len(gene_index):
                raise ScForgeValueError(
                    f"`symbols` must be parallel to `genes`: got {len(symbol_index)} symbols for "
                    f"{len(gene_index)} genes."
                )
            self._symbols = tuple(symbol_index)

        self._source = str(source)
        self._name = None if name is None else str(name)
        self._gene_medians = None if gene_medians is None else self._check_medians(gene_medians)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_genes(
        cls,
        genes: Sequence[str],
        symbols: Sequence[str] | None = None,
        *,
        source: str = "gene list",
        name: str | None = None,
    ) -> GeneVocab:
        """Build a vocabulary from a list of gene identifiers.

        Parameters
        ----------
        genes
            Unique gene identifiers (Ensembl ids or symbols), in token order.
        symbols
            Optional symbols parallel to ``genes``.
        source
            Provenance note stored with the vocabulary.
        name
            Optional short name.

        Raises
        ------
        ValueError
            If an identifier occurs twice.
        """
        return cls(genes, symbols, source=source, name=name)

    @classmethod
    def from_adata(cls, adata: AnnData, *, gene_key: str | None = None) -> GeneVocab:
        """Build a vocabulary from the genes of an AnnData, in ``adata.var`` order.

        Parameters
        ----------
        adata
            The AnnData whose genes become the vocabulary.
        gene_key
            Column of ``adata.var`` holding the gene identifiers (e.g. ``"gene_ids"`` with
            Ensembl ids). ``None`` uses ``adata.var_names``.

        Returns
        -------
        The vocabulary. With ``gene_key``, ``adata.var_names`` are recorded as symbols (unless
        they are Ensembl ids themselves); without it, symbols are recorded when ``var_names``
        are Ensembl ids and a symbol column such as ``"gene_symbols"`` exists.

        Raises
        ------
        ValueError
            If the identifiers are not unique (call ``adata.var_names_make_unique()`` or pass a
            ``gene_key`` with unique ids) or ``gene_key`` is not a column of ``adata.var``.
        """
        var_names = _as_str_index(adata.var_names)
        symbols: pd.Index | None = None
        if gene_key is None:
            genes, where = var_names, "adata.var_names"
            if _looks_ensembl(var_names):
                column = _first_column(adata.var, _SYMBOL_COLUMNS, ensembl=False)
                symbols = None if column is None else _as_str_index(adata.var[column])
        else:
            genes, where = _var_column(adata, gene_key), f"adata.var[{gene_key!r}]"
            if not _looks_ensembl(var_names):
                symbols = var_names
        _check_unique(_strip_versions(genes), where=where)
        return cls(genes, symbols, source=f"AnnData {where}")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> GeneVocab:
        """Read a vocabulary from a file.

        Parameters
        ----------
        path
            Either a JSON file written by :meth:`save`, or a text/TSV file with one gene per
            line: the identifier, optionally a tab and the symbol (further columns are ignored).
            Lines starting with ``#`` and blank lines are skipped, and so is a first line that is
            a column header (``ensembl_id``, ``gene_id``, ``gene``, ``symbol``, ...).

        Returns
        -------
        The vocabulary.
        """
        path = Path(path)
        text = _read_text(path)
        if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
            return cls._from_json_text(text, path)
        return cls._from_table_text(text, source=f"file {path.name}", name=None, path=path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> GeneVocab:
        """Read a vocabulary saved with :meth:`save` (JSON)."""
        path = Path(path)
        return cls._from_json_text(_read_text(path), path)

    @classmethod
    def from_name(cls, name: str) -> GeneVocab:
        """Load a named vocabulary shipped with scforge_scvi.

        Parameters
        ----------
        name
            One of :meth:`available_names`; ``"human_protein_coding"`` holds the 19,814
            protein-coding genes of GENCODE v22 (Ensembl ids, symbols recorded).

        Raises
        ------
        ValueError
            If no vocabulary has that name; the message lists the available ones.
        """
        if name not in _NAMED_VOCABS:
            raise ScForgeValueError(
                f"Unknown gene vocabulary {name!r}. Available named vocabularies: "
                f"{', '.join(repr(n) for n in cls.available_names())}. To use your own genes, "
                "call GeneVocab.from_file(path) or GeneVocab.from_adata(adata)."
            )
        return _load_named(name)

    @staticmethod
    def available_names() -> list[str]:
        """Names accepted by :meth:`from_name`."""
        return sorted(_NAMED_VOCABS)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, origin: str = "the input") -> GeneVocab:
        """Rebuild a vocabulary from :meth:`to_dict` output, validating its format."""
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ScForgeValueError(
                f"{origin} is not a scforge gene vocabulary: expected a JSON object with "
                f'"format": "{FORMAT_NAME}", found {found!r}. Write vocabularies with '
                "GeneVocab.save, or read gene lists with GeneVocab.from_file."
            )
        version = data.get("format_version")
        if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
            raise ScForgeValueError(
                f"{origin} has gene vocabulary format_version {version!r}; this version of "
                f"scforge_scvi reads format_version 1 to {FORMAT_VERSION}."
            )
        missing = [k for k in ("special_tokens", "genes") if k not in data]
        if missing:
            raise ScForgeValueError(
                f"{origin} is missing the field(s) {missing} of a gene vocabulary."
            )
        if tuple(data["special_tokens"]) != SPECIAL_TOKENS:
            raise ScForgeValueError(
                f"{origin} has special tokens {data['special_tokens']!r}, but scforge_scvi uses "
                f"{list(SPECIAL_TOKENS)!r}; token ids would not line up."
            )
        for key in ("genes", "symbols"):
            value = data.get(key)
            if not (key == "symbols" and value is None) and not (
                isinstance(value, list) and all(isinstance(v, str) for v in value)
            ):
                raise ScForgeValueError(f"{origin}: field {key!r} must be a list of strings.")
        medians = data.get("gene_medians")
        if medians is not None and not (
            isinstance(medians, list) and all(isinstance(v, int | float) for v in medians)
        ):
            raise ScForgeValueError(
                f"{origin}: field 'gene_medians' must be a list of numbers or null."
            )
        medians_dtype = data.get("gene_medians_dtype", "float32")
        if medians_dtype not in ("float32", "float64"):
            raise ScForgeValueError(
                f"{origin}: field 'gene_medians_dtype' must be 'float32' or 'float64', got "
                f"{medians_dtype!r}."
            )
        return cls(
            data["genes"],
            data.get("symbols"),
            gene_medians=medians,
            gene_medians_dtype=medians_dtype,
            source=str(data.get("source") or ""),
            name=data.get("name"),
        )

    @classmethod
    def _from_json_text(cls, text: str, path: Path) -> GeneVocab:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ScForgeValueError(
                f"Could not read a gene vocabulary from '{path}': it is not valid JSON "
                f"({exc.msg} at line {exc.lineno}, column {exc.colno}). The file may be truncated "
                "or was not written by GeneVocab.save."
            ) from None
        return cls.from_dict(data, origin=f"'{path}'")

    @classmethod
    def _from_table_text(cls, text: str, *, source: str, name: str | None, path: Path) -> GeneVocab:
        rows = [
            line.rstrip("\r").split("\t")
            for line in text.split("\n")
            if line.strip() and not line.startswith("#")
        ]
        if rows and rows[0][0].strip().lower() in _HEADER_FIELDS:
            rows = rows[1:]
        if not rows:
            raise ScForgeValueError(
                f"'{path}' lists no genes (one gene identifier per line expected)."
            )
        genes = [row[0].strip() for row in rows]
        n_columns = {min(len(row), 2) for row in rows}
        if n_columns == {2}:
            symbols = [row[1].strip() for row in rows]
        elif n_columns == {1}:
            symbols = None
        else:
            raise ScForgeValueError(
                f"'{path}' mixes lines with and without a symbol column; give every line "
                "either 'gene_id' alone or 'gene_id<TAB>symbol'."
            )
        return cls(genes, symbols, source=source, name=name)

    # ------------------------------------------------------------------ saving
    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready content written by :meth:`save`."""
        data = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "name": self._name,
            "source": self._source,
            "special_tokens": list(SPECIAL_TOKENS),
            "genes": list(self._genes),
            "symbols": None if self._symbols is None else list(self._symbols),
            "gene_medians": None if self._gene_medians is None else self._gene_medians.tolist(),
        }
        if self._medians_dtype == np.float64:  # float32, the default, is not written
            data["gene_medians_dtype"] = "float64"
        return data

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary as JSON.

        The file is written to a temporary file in the same directory and then moved into
        place, so a crash never leaves a half-written vocabulary behind.
        """
        from scforge_scvi._atomic import atomic_file

        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict()) + "\n", encoding="utf-8")

    # ------------------------------------------------------------------ properties
    @property
    def genes(self) -> list[str]:
        """Primary gene identifiers, in token order (token id = position + ``n_special``)."""
        return list(self._genes)

    @property
    def symbols(self) -> list[str] | None:
        """Gene symbols parallel to :attr:`genes`, or ``None``."""
        return None if self._symbols is None else list(self._symbols)

    @property
    def gene_medians(self) -> np.ndarray | None:
        """Per-token statistic of length ``len(self)`` (read-only view), or ``None``."""
        return self._gene_medians

    @property
    def gene_medians_dtype(self) -> str:
        """Precision in which :attr:`gene_medians` are kept: ``"float32"`` or ``"float64"``."""
        return self._medians_dtype.name

    @property
    def source(self) -> str:
        """Where the vocabulary came from."""
        return self._source

    @property
    def name(self) -> str | None:
        """Short name, e.g. ``"human_protein_coding"``."""
        return self._name

    @property
    def n_genes(self) -> int:
        """Number of genes (special tokens excluded)."""
        return len(self._genes)

    @property
    def gene_ids(self) -> np.ndarray:
        """Token ids of the genes (int64), from ``n_special`` to ``len(self) - 1``."""
        return np.arange(N_SPECIAL, len(self), dtype=np.int64)

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """The special tokens, in id order."""
        return SPECIAL_TOKENS

    @property
    def n_special(self) -> int:
        """Number of special tokens (the id of the first gene)."""
        return N_SPECIAL

    @property
    def pad_id(self) -> int:
        """Token id of ``<pad>``."""
        return PAD_ID

    @property
    def cls_id(self) -> int:
        """Token id of ``<cls>``."""
        return CLS_ID

    @property
    def mask_id(self) -> int:
        """Token id of ``<mask>``."""
        return MASK_ID

    @property
    def unk_id(self) -> int:
        """Token id of ``<unk>``."""
        return UNK_ID

    def __len__(self) -> int:
        return N_SPECIAL + len(self._genes)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._find(name) is not None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GeneVocab):
            return NotImplemented
        same_medians = (self._gene_medians is None and other._gene_medians is None) or (
            self._gene_medians is not None
            and other._gene_medians is not None
            and self._gene_medians.dtype == other._gene_medians.dtype
            and np.array_equal(self._gene_medians, other._gene_medians)
        )
        return (
            self._genes == other._genes
            and self._symbols == other._symbols
            and same_medians
            and self._name == other._name
            and self._source == other._source
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        ids = "ensembl" if self._ensembl_mask.mean() > 0.5 else "symbol"
        return (
            f"GeneVocab(name={self._name!r}, n_genes={self.n_genes}, ids={ids!r}, "
            f"symbols={self._symbols is not None}, gene_medians={self._gene_medians is not None})"
        )

    # ------------------------------------------------------------------ lookups
    def token_to_id(self, name: str) -> int:
        """Token id of a special token, an Ensembl id (version ignored) or a gene symbol.

        A symbol shared by several genes resolves to the first of them.

        Raises
        ------
        KeyError
            If ``name`` is not in the vocabulary.
        """
        token_id = self._find(name)
        if token_id is None:
            raise ScForgeKeyError(
                f"{name!r} is neither a special token, a gene id nor a gene symbol of the "
                f"vocabulary {self._label} ({self.n_genes} genes)."
            )
        return token_id

    def id_to_token(self, token_id: int) -> str:
        """The special token or primary gene identifier with id ``token_id``."""
        token_id = int(token_id)
        if not 0 <= token_id < len(self):
            raise IndexError(f"Token id {token_id} is out of range [0, {len(self)}).")
        if token_id < N_SPECIAL:
            return SPECIAL_TOKENS[token_id]
        return self._genes[token_id - N_SPECIAL]

    def _find(self, name: str) -> int | None:
        if name in SPECIAL_TOKENS:
            return SPECIAL_TOKENS.index(name)
        position = self._id_positions.get(_VERSION_RE.sub(r"\1", name))
        if position is None:
            position = self._symbol_positions.get(name)
        return None if position is None else position + N_SPECIAL

    @functools.cached_property
    def _label(self) -> str:
        return repr(self._name) if self._name else f"from {self._source or 'an unnamed source'}"

    @functools.cached_property
    def _ensembl_mask(self) -> np.ndarray:
        return _is_ensembl(self._gene_index)

    @functools.cached_property
    def _gene_index(self) -> pd.Index:
        return pd.Index(self._genes, dtype=object)

    @functools.cached_property
    def _id_positions(self) -> dict[str, int]:
        return {gene: i for i, gene in enumerate(self._genes)}

    @functools.cached_property
    def _symbol_keys(self) -> pd.Index:
        """The symbol of each gene: its recorded symbol, else the gene itself if it is not an
        Ensembl id, else ``""`` (no symbol)."""
        genes = np.asarray(self._genes, dtype=object)
        keys = np.where(self._ensembl_mask, "", genes).astype(object)
        if self._symbols is not None:
            symbols = np.asarray(self._symbols, dtype=object)
            keys = np.where(symbols != "", symbols, keys).astype(object)
        return pd.Index(keys, dtype=object)

    @functools.cached_property
    def _symbol_table(self) -> tuple[pd.Index, np.ndarray]:
        """Unique symbols and the position of the first gene carrying each."""
        keys = self._symbol_keys
        first = ~keys.duplicated(keep="first") & (keys != "")
        return pd.Index(keys[first], dtype=object), np.flatnonzero(first)

    @functools.cached_property
    def _symbol_positions(self) -> dict[str, int]:
        symbols, positions = self._symbol_table
        return dict(zip(symbols, positions.tolist()))

    @functools.cached_property
    def _ambiguous_symbols(self) -> pd.Index:
        keys = self._symbol_keys
        return pd.Index(keys[keys.duplicated(keep=False) & (keys != "")].unique(), dtype=object)

    # ------------------------------------------------------------------ medians
    def with_gene_medians(self, gene_medians: np.ndarray | Sequence[float] | None) -> GeneVocab:
        """A copy of this vocabulary with ``gene_medians`` attached (``None`` removes them).

        Parameters
        ----------
        gene_medians
            One value per token, ``len(self)`` values with the special tokens first; gene
            entries finite and positive.
        """
        return GeneVocab(
            self._genes,
            self._symbols,
            gene_medians=gene_medians,
            gene_medians_dtype=self.gene_medians_dtype,
            source=self._source,
            name=self._name,
        )

    def _check_medians(self, values: np.ndarray | Sequence[float]) -> np.ndarray:
        medians = np.array(values, dtype=self._medians_dtype)
        if medians.ndim != 1 or len(medians) != len(self):
            hint = (
                f" (that is one per gene; prepend {N_SPECIAL} entries for the special tokens)"
                if medians.ndim == 1 and len(medians) == self.n_genes
                else ""
            )
            raise ScForgeValueError(
                f"gene_medians must hold one value per token, {len(self)} values "
                f"({N_SPECIAL} special tokens + {self.n_genes} genes); got shape "
                f"{medians.shape}{hint}."
            )
        if not np.isfinite(medians).all():
            first = int(np.flatnonzero(~np.isfinite(medians))[0])
            raise ScForgeValueError(
                f"gene_medians must be finite; token {first} has {medians[first]}."
            )
        bad = np.flatnonzero(medians[N_SPECIAL:] <= 0)
        if len(bad):
            i = int(bad[0])
            raise ScForgeValueError(
                f"gene_medians of genes must be positive; {len(bad)} are not, e.g. gene "
                f"{self._genes[i]!r} (token {i + N_SPECIAL}) has {medians[i + N_SPECIAL]}."
            )
        medians.setflags(write=False)
        return medians


# ---------------------------------------------------------------------- helpers
def _check_unique(genes: pd.Index, *, where: str) -> None:
    if genes.is_unique:
        return
    duplicated = list(genes[genes.duplicated()].unique())
    raise ScForgeValueError(
        f"Gene identifiers in {where} must be unique to build a GeneVocab, but "
        f"{len(duplicated)} occur more than once (after removing Ensembl version suffixes): "
        f"{_examples(duplicated)}. For an AnnData, call `adata.var_names_make_unique()` or pass "
        "`gene_key` naming a var column with unique ids (e.g. Ensembl ids in 'gene_ids')."
    )


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise ScForgeFileNotFoundError(f"No gene vocabulary file at '{path}'.")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ScForgeValueError(
            f"'{path}' is not a text file; expected a gene vocabulary JSON written by "
            "GeneVocab.save or a text file with one gene per line."
        ) from None


@functools.cache
def _load_named(name: str) -> GeneVocab:
    """Read a packaged vocabulary once; GeneVocab is immutable, so the object is shared."""
    filename, description = _NAMED_VOCABS[name]
    resource = files("scforge_scvi.data") / "resources" / filename
    return GeneVocab._from_table_text(
        resource.read_text(encoding="utf-8"),
        source=f"{description} (scforge_scvi package data {filename})",
        name=name,
        path=Path(filename),
    )
