"""Perturbation data: validation, the cell-load reader, feature tables and splits.

Real screens in the cell-load layout (one h5ad with a perturbation column, a control label
and a cell-type column) are read by :func:`read_perturbation_h5ad`.

Splits follow cell-load: *few-shot* holds out chosen perturbations within some cell types
(their controls and the other perturbations stay in training), *zero-shot* holds out whole
cell types.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from scforge_scvi._errors import ScForgeFileNotFoundError, ScForgeKeyError, ScForgeValueError
from scforge_scvi._logging import logger
from scforge_scvi.data._preprocess import check_raw_counts
from scforge_scvi.data._splits import split_cells

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "test": "test"}


# ----------------------------------------------------------------------------- validation
def _obs_column(adata: ad.AnnData, key: str, what: str) -> pd.Series:
    if key not in adata.obs.columns:
        raise ScForgeKeyError(
            f"{what} column {key!r} is not in adata.obs; available columns: "
            f"{list(adata.obs.columns)}."
        )
    return adata.obs[key]


def validate_perturbation_adata(
    adata: ad.AnnData,
    perturbation_key: str,
    control_label: str,
    cell_type_key: str | None = None,
    batch_key: str | None = None,
) -> None:
    """Raise a clear error unless ``adata`` is usable for perturbation modelling.

    Checks that the columns exist, that ``control_label`` is one of the perturbations, that
    every perturbation category has cells, and that every cell type (and batch, when given)
    with perturbed cells also has control cells to serve as basal cells.

    Parameters
    ----------
    adata
        Cells x genes.
    perturbation_key
        ``adata.obs`` column naming each cell's perturbation.
    control_label
        Value of that column for control cells (e.g. ``"non-targeting"``).
    cell_type_key, batch_key
        Optional ``adata.obs`` columns; basal cells are sampled within them.
    """
    perts = _obs_column(adata, perturbation_key, "Perturbation")
    if perts.isna().any():
        raise ScForgeValueError(
            f"adata.obs[{perturbation_key!r}] has {int(perts.isna().sum())} missing values; "
            "every cell needs a perturbation (controls included)."
        )
    perts = perts.astype(str)
    present = pd.Index(perts.unique())
    if control_label not in present:
        raise ScForgeValueError(
            f"Control label {control_label!r} is not a value of adata.obs[{perturbation_key!r}]; "
            f"available categories: {sorted(present)}."
        )
    if isinstance(adata.obs[perturbation_key].dtype, pd.CategoricalDtype):
        categories = adata.obs[perturbation_key].cat.categories.astype(str)
        empty = sorted(set(categories) - set(present))
        if empty:
            raise ScForgeValueError(
                f"Perturbation(s) {empty} of adata.obs[{perturbation_key!r}] have no cells. "
                f"Drop the unused categories first: "
                f"adata.obs[{perturbation_key!r}] = "
                f"adata.obs[{perturbation_key!r}].cat.remove_unused_categories()."
            )
    group_keys = [k for k in (cell_type_key, batch_key) if k is not None]
    if not group_keys:
        return
    groups = pd.DataFrame(
        {k: _obs_column(adata, k, "Grouping").astype(str).to_numpy() for k in group_keys}
    )
    groups["_is_control"] = (perts == control_label).to_numpy()
    has_control = groups.groupby(group_keys, observed=True)["_is_control"].any()
    missing = has_control[~has_control]
    if len(missing):
        names = [" / ".join(np.atleast_1d(i).astype(str)) for i in missing.index]
        raise ScForgeValueError(
            f"No {control_label!r} control cells for {' x '.join(group_keys)} {names}; basal "
            "cells are sampled from the controls of the same group. Add controls or drop "
            "those cells."
        )


def read_perturbation_h5ad(
    path: str | Path,
    *,
    perturbation_key: str = "target_gene",
    control_label: str = "non-targeting",
    cell_type_key: str | None = "cell_type",
    batch_key: str | None = None,
    layer: str | None = None,
) -> ad.AnnData:
    """Read a Perturb-seq screen stored in the cell-load layout and validate it.

    The layout is one ``.h5ad`` per dataset with raw counts (in ``X`` or ``layer``), a
    perturbation column, a control label and a cell-type column (cell-load's ``pert_col``,
    ``control_pert`` and ``cell_type_key``; a ``batch_col`` is optional).

    Parameters
    ----------
    path
        The ``.h5ad`` file.
    perturbation_key, control_label, cell_type_key, batch_key
        See :func:`validate_perturbation_adata`.
    layer
        Layer with raw counts; ``None`` reads ``X``.

    Returns
    -------
    The AnnData, unchanged, after the checks.
    """
    path = Path(path)
    if not path.exists():
        raise ScForgeFileNotFoundError(f"No perturbation dataset at {path}.")
    adata = ad.read_h5ad(path)
    check_perturbation_counts(
        adata, layer, perturbation_key, control_label, cell_type_key, batch_key
    )
    return adata


def check_perturbation_counts(
    adata: ad.AnnData,
    layer: str | None,
    perturbation_key: str,
    control_label: str,
    cell_type_key: str | None = None,
    batch_key: str | None = None,
) -> None:
    """Raise unless ``adata`` has raw counts in ``X`` (or ``layer``) and passes
    :func:`validate_perturbation_adata`."""
    if layer is not None and layer not in adata.layers:
        raise ScForgeKeyError(
            f"Layer {layer!r} not found; available layers: {sorted(adata.layers)} "
            "(use layer=None for adata.X)."
        )
    counts = adata.X if layer is None else adata.layers[layer]
    check_raw_counts(counts, "adata.X" if layer is None else f"adata.layers[{layer!r}]")
    validate_perturbation_adata(adata, perturbation_key, control_label, cell_type_key, batch_key)


# ------------------------------------------------------------------ perturbation features
def feature_table(
    features: pd.DataFrame | Mapping[str, Sequence[float]], what: str = "perturbation feature table"
) -> pd.DataFrame:
    """A perturbation feature table as a float32 DataFrame indexed by name, checked.

    Parameters
    ----------
    features
        A DataFrame indexed by perturbation name (one column per feature) or a mapping
        name -> vector.
    what
        How error messages name the table.
    """
    if isinstance(features, pd.DataFrame):
        table = features.copy()
    elif isinstance(features, Mapping):
        table = pd.DataFrame.from_dict(
            {k: np.asarray(v, dtype=np.float64).ravel() for k, v in features.items()},
            orient="index",
        )
    else:
        raise TypeError(
            f"The {what} must be a DataFrame indexed by perturbation name or a mapping "
            f"name -> vector, got {type(features).__name__}."
        )
    table.index = table.index.astype(str)
    if table.index.has_duplicates:
        dupes = sorted(set(table.index[table.index.duplicated()]))
        raise ValueError(f"The {what} has duplicate rows for {dupes}.")
    if table.shape[1] == 0:
        raise ValueError(f"The {what} has no columns.")
    try:
        values = table.to_numpy(dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise ValueError(f"The {what} must hold numbers only ({err}).") from err
    if not np.isfinite(values).all():
        bad = sorted(table.index[~np.isfinite(values).all(axis=1)])
        raise ValueError(f"The {what} contains NaN or infinite values (rows {bad[:10]}).")
    return pd.DataFrame(values, index=table.index)


# ---------------------------------------------------------------------------------- splits
def _check_names(requested: Sequence[str] | None, valid: pd.Index, what: str) -> list[str]:
    requested = [] if requested is None else [str(x) for x in requested]
    unknown = sorted(set(requested) - set(valid))
    if unknown:
        raise ScForgeValueError(f"Unknown {what} {unknown}; valid values: {sorted(valid)}.")
    return requested


def assign_perturbation_split(
    adata: ad.AnnData,
    perturbation_key: str,
    control_label: str,
    cell_type_key: str | None = None,
    *,
    val_perturbations: Sequence[str] | None = None,
    test_perturbations: Sequence[str] | None = None,
    fewshot_cell_types: Sequence[str] | None = None,
    val_cell_types: Sequence[str] | None = None,
    test_cell_types: Sequence[str] | None = None,
    key_added: str = "split",
) -> pd.Series:
    """Assign each cell to ``"train"``, ``"val"`` or ``"test"`` as cell-load does.

    *Few-shot*: cells of ``val_perturbations`` / ``test_perturbations`` in the
    ``fewshot_cell_types`` (default: every cell type that is not held out whole) go to val /
    test; the controls and the other perturbations of those cell types stay in training.
    *Zero-shot*: every cell of ``val_cell_types`` / ``test_cell_types`` (controls included)
    goes to val / test. Everything else is training.

    Parameters
    ----------
    adata
        Cells x genes; ``adata.obs[key_added]`` is written (categorical).
    perturbation_key, control_label, cell_type_key
        See :func:`validate_perturbation_adata`.
    val_perturbations, test_perturbations
        Perturbations held out (few-shot); the control cannot be held out.
    fewshot_cell_types
        Cell types in which they are held out.
    val_cell_types, test_cell_types
        Cell types held out whole (zero-shot); needs ``cell_type_key``.
    key_added
        Name of the obs column written.

    Returns
    -------
    The split column (also written to ``adata.obs[key_added]``).
    """
    perts = _obs_column(adata, perturbation_key, "Perturbation").astype(str)
    valid_perts = pd.Index(perts.unique())
    val_p = _check_names(val_perturbations, valid_perts, "val_perturbations")
    test_p = _check_names(test_perturbations, valid_perts, "test_perturbations")
    if control_label in val_p + test_p:
        raise ScForgeValueError(
            f"The control {control_label!r} cannot be held out: its cells are the basal input."
        )
    overlap = sorted(set(val_p) & set(test_p))
    if overlap:
        raise ScForgeValueError(f"Perturbations {overlap} are in both val and test.")
    if cell_type_key is None:
        if val_cell_types or test_cell_types or fewshot_cell_types:
            raise ScForgeValueError("Holding out cell types needs `cell_type_key`.")
        cell_types = pd.Series("all", index=adata.obs_names)
    else:
        cell_types = _obs_column(adata, cell_type_key, "Cell-type").astype(str)
    valid_types = pd.Index(cell_types.unique())
    val_c = _check_names(val_cell_types, valid_types, "val_cell_types")
    test_c = _check_names(test_cell_types, valid_types, "test_cell_types")
    if set(val_c) & set(test_c):
        raise ScForgeValueError(
            f"Cell types {sorted(set(val_c) & set(test_c))} are in both val and test."
        )
    if fewshot_cell_types is None:
        fewshot = [c for c in valid_types if c not in val_c + test_c]
    else:
        fewshot = _check_names(fewshot_cell_types, valid_types, "fewshot_cell_types")

    split = np.full(adata.n_obs, "train", dtype=object)
    in_fewshot = cell_types.isin(fewshot).to_numpy()
    split[in_fewshot & perts.isin(val_p).to_numpy()] = "val"
    split[in_fewshot & perts.isin(test_p).to_numpy()] = "test"
    split[cell_types.isin(val_c).to_numpy()] = "val"
    split[cell_types.isin(test_c).to_numpy()] = "test"
    column = pd.Series(pd.Categorical(split, categories=list(SPLITS)), index=adata.obs_names)
    adata.obs[key_added] = column
    counts = column.value_counts().reindex(list(SPLITS)).to_dict()
    logger.info("Wrote adata.obs[%r]: %s cells", key_added, counts)
    return column


def normalize_split_labels(values: pd.Series, key: str) -> np.ndarray:
    """Map a split column to ``"train" / "val" / "test"`` (``"validation"`` is accepted)."""
    labels = values.astype(str)
    unknown = sorted(set(labels.unique()) - set(_SPLIT_ALIASES))
    if unknown:
        raise ScForgeValueError(
            f"adata.obs[{key!r}] has values {unknown}; valid split values are "
            f"{sorted(_SPLIT_ALIASES)}."
        )
    return labels.map(_SPLIT_ALIASES).to_numpy()


def perturbation_split(
    adata: ad.AnnData,
    split_key: str | None,
    validation_size: float,
    seed: int,
    perturbation_key: str,
    control_label: str,
) -> np.ndarray:
    """``"train" / "val" / "test"`` per cell: ``adata.obs[split_key]``, or at random.

    Without ``split_key`` a random ``validation_size`` of the perturbed cells validates
    (in-distribution validation); the controls all train.
    """
    if split_key is not None:
        if split_key not in adata.obs:
            raise KeyError(
                f"Split column {split_key!r} is not in adata.obs; available columns: "
                f"{list(adata.obs.columns)}. Write one with scforge_scvi.perturb.assign_perturbation_split."
            )
        return normalize_split_labels(adata.obs[split_key], split_key)
    if not 0.0 <= validation_size < 1.0:
        raise ValueError(f"validation_size must be in [0, 1), got {validation_size}.")
    split = np.full(adata.n_obs, "train", dtype=object)
    if validation_size == 0:
        return split
    _, val, _ = split_cells(adata.n_obs, 1.0 - validation_size, validation_size, seed)
    is_val = np.isin(np.arange(adata.n_obs), val)
    perts = adata.obs[perturbation_key].astype(str).to_numpy()
    split[is_val & (perts != control_label)] = "val"
    return split


def check_genes(adata: ad.AnnData, genes: Sequence[str]) -> None:
    """Raise unless ``adata`` has exactly ``genes``, in order."""
    names = [str(g) for g in adata.var_names]
    if names != list(genes):
        first = next(
            (i for i, (a, b) in enumerate(zip(names, genes)) if a != b),
            min(len(names), len(genes)),
        )
        raise ValueError(
            f"The AnnData's genes ({len(names)}) differ from the model's genes "
            f"({len(genes)}) in name or order, first at position {first}; subset and "
            "reorder it with adata[:, model.genes_]."
        )


# ------------------------------------------------------------ the model's feature table
def stored_feature_table(
    features: pd.DataFrame | Mapping[str, Sequence[float]], categories: Sequence[str], control: str
) -> tuple[list[str], np.ndarray]:
    """The feature table as the perturbation model stores it: ``(names, rows)``.

    The categories come first, in category order (the control's row is a placeholder: the
    control has a learned vector), then every other perturbation of the user's table in its
    order: those have no training cells and are predicted from their features alone.
    """
    table = feature_table(features)
    missing = [c for c in categories if c != control and c not in table.index]
    if missing:
        raise ValueError(
            f"Perturbations {missing[:10]}{' ...' if len(missing) > 10 else ''} "
            f"({len(missing)} in all) are missing from the perturbation feature table; every "
            "perturbation with cells needs a row (a missing one is never replaced by zeros). "
            "The control needs none: it has its own learned vector."
        )
    known = set(categories)
    names = list(categories) + [n for n in table.index if n not in known and n != control]
    values = np.zeros((len(names), table.shape[1]), dtype=np.float32)
    rows = [i for i, n in enumerate(names) if n != control]
    values[rows] = table.loc[[names[i] for i in rows]].to_numpy(dtype=np.float32)
    return names, values


def perturbation_inputs(
    names: Sequence[str],
    features: pd.DataFrame | Mapping[str, Sequence[float]] | None,
    categories: Sequence[str],
    table: np.ndarray | None,
    table_names: Sequence[str],
) -> tuple[np.ndarray, np.ndarray | None]:
    """Row index (or ``-1``) and, for a table model, feature vector of each perturbation.

    A one-hot model (``table=None``) knows its ``categories`` only. A table model reads a
    perturbation's features from ``features`` (rows there take precedence), else from its
    stored ``table`` (rows named ``table_names``).
    """
    names = [str(n) for n in names]
    categories = list(categories)
    if table is None:
        if features is not None:
            raise ValueError(
                "perturbation_features= was passed to predict, but this model is one-hot "
                "(created without perturbation_features): it cannot read feature vectors "
                "and only predicts the perturbations it was trained on."
            )
        unknown = sorted(set(names) - set(categories))
        if unknown:
            raise ValueError(
                f"Unknown perturbations {unknown}; the model knows {len(categories)}: "
                f"{categories[:20]}{' ...' if len(categories) > 20 else ''}. "
                "A one-hot model only predicts perturbations it was trained on; to predict "
                "new ones, create the model with perturbation_features= (a feature vector per "
                "perturbation, e.g. an embedding of the target gene)."
            )
        return np.array([categories.index(n) for n in names], dtype=np.int64), None
    width = table.shape[1]
    given = None
    if features is not None:
        given = feature_table(features, "perturbation feature table passed to predict")
        if given.shape[1] != width:
            raise ValueError(
                f"The perturbation feature table passed to predict has {given.shape[1]} "
                f"columns; the model reads vectors of width {width}."
            )
    row = {n: i for i, n in enumerate(table_names)}
    missing = sorted(
        n for n in set(names) if n not in row and (given is None or n not in given.index)
    )
    if missing:
        raise ValueError(
            f"No perturbation features for {missing[:20]}{' ...' if len(missing) > 20 else ''} "
            f"({len(missing)} in all): they are not in the model's perturbation table "
            f"({len(table_names) - 1} perturbations) nor in a table passed to "
            "predict. Pass their feature vectors as predict(..., perturbation_features=table) "
            f"(a DataFrame indexed by perturbation name, or a mapping name -> vector of width "
            f"{width}), or include them in the perturbation_features= given when creating "
            "the model."
        )
    codes = np.array([row.get(n, -1) for n in names], dtype=np.int64)
    vectors = np.stack(
        [
            given.loc[n].to_numpy() if given is not None and n in given.index else table[row[n]]
            for n in names
        ]
    ).astype(np.float32)
    return codes, vectors
