"""Registration of `ScForge` data: the checks of ``setup_anndata`` and fields beyond scvi-tools'."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from anndata import AnnData
from pandas.api.types import CategoricalDtype, is_bool_dtype, is_float_dtype, is_numeric_dtype
from scvi.data import AnnDataManager
from scvi.data._utils import _make_column_categorical
from scvi.data.fields import (
    CategoricalObsField,
    LabelsWithUnlabeledObsField,
    LayerField,
    MuDataCategoricalObsField,
    MuDataLayerField,
    NumericalObsField,
)
from scvi.data.fields._mudata import MuDataWrapper
from scvi.utils import setup_anndata_dsp

from scforge_scvi._errors import ScForgeKeyError, ScForgeTypeError, ScForgeValueError
from scforge_scvi._logging import logger
from scforge_scvi.data import check_raw_counts
from scforge_scvi.data._preprocess import backed_source

from ._constants import SCFORGE_REGISTRY_KEYS as KEYS

if TYPE_CHECKING:
    from mudata import MuData


def check_adata(adata) -> None:
    """Refuse what scvi-tools would fail on obscurely: a non-AnnData, a backed subset."""
    if not isinstance(adata, AnnData):
        raise ScForgeTypeError(
            f"setup_anndata needs an AnnData, got {type(adata).__name__}; for cells on disk "
            "read them with anndata.read_h5ad(path, backed='r') or stream them with "
            "StreamedCells(paths)."
        )
    if adata.isbacked and adata.is_view:
        raise ScForgeValueError(
            f"This AnnData is a subset (view) of the backed file '{adata.filename}', which "
            "cannot be registered without copying it; register the whole backed AnnData, or "
            "load the subset into memory with adata[...].to_memory()."
        )


def check_counts(counts, where: str) -> None:
    """Reject anything but raw counts; warn about cells without any count.

    A backed matrix (``X`` of ``read_h5ad(..., backed="r")``) is read a block of rows at a
    time, never loaded whole.
    """
    n_obs, n_vars = counts.shape
    if n_obs == 0 or n_vars == 0:
        raise ScForgeValueError(
            f"{where} is empty ({n_obs} cells x {n_vars} genes); scforge needs at least one "
            "cell and one gene of raw counts."
        )
    sums = check_raw_counts(counts, where)
    n_empty = int((sums == 0).sum())
    if n_empty:
        warnings.warn(
            f"{n_empty} cells have zero counts in {where}; they are kept and tokenised to "
            "the <cls> token alone (their embedding carries no expression information).",
            UserWarning,
            stacklevel=3,
        )


def check_columns(
    frame: pd.DataFrame, keys: Mapping[str, str | None], where: str, error=ScForgeKeyError
) -> None:
    """Raise ``error`` for the first of ``keys`` (argument name -> column) not in ``frame``."""
    for name, key in keys.items():
        if key is not None and key not in frame:
            raise error(
                f"{name}={key!r} is not a column of {where}; available columns: "
                f"{list(frame.columns)}."
            )


def check_labels_column(column: pd.Series, key: str) -> None:
    """A labels column holds class names: floats (a measurement) are a mistake."""
    if is_float_dtype(column.dtype):
        raise ScForgeTypeError(
            f"labels_key={key!r} is a column of floating-point numbers ({column.nunique()} "
            "distinct values), not class labels; pass a column of class names (strings or "
            "categories, e.g. adata.obs[key].astype(str)), or target_key= to regress a number."
        )


def check_target_column(column: pd.Series, key: str) -> None:
    """A regression target is a finite number for every cell."""
    if not is_numeric_dtype(column.dtype) or is_bool_dtype(column.dtype):
        raise ScForgeTypeError(
            f"target_key={key!r} is a column of {column.dtype} values, not numbers; a "
            "regression target must be numeric (for classes use labels_key=)."
        )
    if not np.isfinite(column.to_numpy(dtype=np.float64, na_value=np.nan)).all():
        raise ScForgeValueError(
            f"target_key={key!r} holds NaN or infinite values; every cell needs a finite target."
        )


class LabelsWithMissingObsField(LabelsWithUnlabeledObsField):
    """Labels whose missing values (NaN) count as the unlabelled category.

    scvi-tools' :class:`~scvi.data.fields.LabelsWithUnlabeledObsField` refuses a label
    column with missing values. Here a missing label is read as ``unlabeled_category``
    when the column is encoded: the cell gets the code of the unlabelled category in the
    private ``obs["_scvi_labels"]`` column, while the user's column is left untouched.
    Columns without missing values are registered exactly as scvi-tools does.
    """

    def _filled_labels(self, obs: pd.DataFrame) -> pd.Series:
        """The label column with its missing values replaced by the unlabelled category."""
        labels = obs[self._original_attr_key]
        missing = labels.isna().to_numpy()
        unlabeled = self._unlabeled_category
        if isinstance(labels.dtype, CategoricalDtype):
            if unlabeled not in labels.cat.categories:
                labels = labels.cat.add_categories([unlabeled])
            return labels.fillna(unlabeled)
        return labels.astype(object).where(~missing, unlabeled)

    def _has_missing(self, adata: AnnData) -> bool:
        obs = getattr(adata, self.attr_name)
        key = self._original_attr_key
        return key in obs and bool(obs[key].isna().any())

    def _encode(self, adata: AnnData, labels: pd.Series, mapping: np.ndarray) -> dict:
        """Write the codes of ``labels`` under ``mapping``, the unlabelled category last."""
        unlabeled = self._unlabeled_category
        mapping = np.asarray(mapping).copy()
        if (labels.to_numpy() == unlabeled).any():
            where = np.flatnonzero(mapping == unlabeled)[0]
            mapping[where], mapping[-1] = mapping[-1], mapping[where]
        elif unlabeled not in mapping:
            mapping = np.asarray([*mapping, unlabeled])
        # encoded in a frame of its own: the user's column keeps its missing values
        key = self._original_attr_key
        frame = pd.DataFrame({key: labels.to_numpy()}, index=labels.index)
        mapping = _make_column_categorical(
            frame, key, self.attr_key, categorical_dtype=CategoricalDtype(mapping, ordered=True)
        )
        getattr(adata, self.attr_name)[self.attr_key] = frame[self.attr_key].to_numpy()
        return {
            self.CATEGORICAL_MAPPING_KEY: mapping,
            self.ORIGINAL_ATTR_KEY: self._original_attr_key,
            self.UNLABELED_CATEGORY: unlabeled,
        }

    def register_field(self, adata: AnnData) -> dict:
        """Register the field, reading missing labels as unlabelled."""
        if not self._has_missing(adata):
            return super().register_field(adata)
        self.validate_field(adata)
        labels = self._filled_labels(getattr(adata, self.attr_name))
        categories = labels.astype("category").cat.categories.to_numpy(copy=True)
        return self._encode(adata, labels, categories)

    def transfer_field(
        self,
        state_registry: dict,
        adata_target: AnnData,
        allow_missing_labels: bool = False,
        **kwargs,
    ) -> dict:
        """Transfer the field onto ``adata_target``, reading missing labels as unlabelled."""
        if not self._has_missing(adata_target):
            return super().transfer_field(
                state_registry, adata_target, allow_missing_labels=allow_missing_labels, **kwargs
            )
        self.validate_field(adata_target)
        labels = self._filled_labels(getattr(adata_target, self.attr_name))
        mapping = state_registry[self.CATEGORICAL_MAPPING_KEY]
        new = pd.Index(pd.unique(labels.to_numpy())).difference(pd.Index(mapping))
        if len(new):
            key = self._original_attr_key
            raise ValueError(
                f"obs[{key!r}] holds labels that the registered setup does not know: "
                f"{[str(c) for c in new[:5]]}; known labels are {[str(c) for c in mapping]}."
            )
        return self._encode(adata_target, labels, mapping)


MuDataLabelsWithMissingObsField = MuDataWrapper(LabelsWithMissingObsField)


class RegistrationMixin:
    """``setup_anndata`` / ``setup_mudata`` of :class:`~scforge_scvi.ScForge`, and the
    registration of query data (another gene order, no labels) when it is used."""

    @classmethod
    @setup_anndata_dsp.dedent
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = None,
        labels_key: str | None = None,
        batch_key: str | None = None,
        target_key: str | None = None,
        unlabeled_category: str = "Unknown",
        gene_key: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Register an AnnData holding raw counts.

        Parameters
        ----------
        %(param_adata)s
        layer
            Layer holding the raw counts (``None``: ``adata.X``). Counts must be non-negative
            integers; normalised or log-transformed values are rejected.
        labels_key
            ``adata.obs`` column of cell-type (or other class) labels for fine-tuning. Cells
            labelled ``unlabeled_category`` and cells whose label is missing (NaN, ``None``)
            are unlabelled: they are left out of the loss and of the evaluation, form their
            own stratum in the train/validation/test split, and are still predicted. The
            column itself is never modified (the codes live in ``obs["_scvi_labels"]``).
        %(param_batch_key)s
        target_key
            Numeric ``adata.obs`` column to regress (fine-tuning a regression head).
        unlabeled_category
            Label value marking unlabelled cells.
        gene_key
            ``adata.var`` column with gene identifiers to match against the vocabulary
            (``None``: ``adata.var_names``, or a column of Ensembl ids when one is found).
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        check_adata(adata)
        where = f"adata.layers[{layer!r}]" if layer is not None else "adata.X"
        where += backed_source(adata) if layer is None else ""
        if layer is not None and layer not in adata.layers:
            raise ScForgeKeyError(
                f"Layer {layer!r} not found; available layers: {sorted(adata.layers)} "
                "(use layer=None for adata.X)."
            )
        keys = {"labels_key": labels_key, "batch_key": batch_key, "target_key": target_key}
        check_columns(adata.obs, keys, "adata.obs")
        check_columns(adata.var, {"gene_key": gene_key}, "adata.var")
        if labels_key is not None:
            check_labels_column(adata.obs[labels_key], labels_key)
        if target_key is not None:
            check_target_column(adata.obs[target_key], target_key)
        check_counts(adata.layers[layer] if layer is not None else adata.X, where)
        fields = [
            LayerField(KEYS.X_KEY, layer, is_count_data=True),
            CategoricalObsField(KEYS.BATCH_KEY, batch_key),
        ]
        if labels_key is None:
            fields.append(CategoricalObsField(KEYS.LABELS_KEY, None))
        else:
            fields.append(
                LabelsWithMissingObsField(KEYS.LABELS_KEY, labels_key, unlabeled_category)
            )
        if target_key is not None:
            fields.append(NumericalObsField(KEYS.TARGET_KEY, target_key))
        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        manager.register_fields(adata, **kwargs)
        cls.register_manager(manager)

    @classmethod
    @setup_anndata_dsp.dedent
    def setup_mudata(
        cls,
        mdata: MuData,
        rna_layer: str | None = None,
        labels_key: str | None = None,
        batch_key: str | None = None,
        unlabeled_category: str = "Unknown",
        modalities: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        """%(summary_mdata)s.

        The raw counts are read from one modality (``modalities["rna_layer"]``); labels and
        batches from that modality's ``obs`` or, when no modality is given for them, from
        ``mdata.obs``.

        Parameters
        ----------
        %(param_mdata)s
        rna_layer
            Layer of the RNA modality holding the raw counts (``None``: its ``.X``). Counts
            must be non-negative integers; normalised or log-transformed values are rejected.
        labels_key
            ``obs`` column of cell-type (or other class) labels for fine-tuning. Cells whose
            label is ``unlabeled_category`` or missing (NaN) are left out of the loss and of
            the evaluation but still predicted; the column itself is never modified.
        %(param_batch_key)s
        unlabeled_category
            Label value marking unlabelled cells.
        %(param_modalities)s
            ``"rna_layer"`` is required, e.g. ``{"rna_layer": "rna", "labels_key": "rna"}``.

        Examples
        --------
        >>> sf.ScForge.setup_mudata(mdata, rna_layer="counts", modalities={"rna_layer": "rna"})
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        available = list(mdata.mod)
        if not modalities or "rna_layer" not in modalities:
            raise ValueError(
                "setup_mudata needs modalities={'rna_layer': <modality with the counts>}; "
                f"available modalities: {available}."
            )
        modalities = cls._create_modalities_attr_dict(modalities, setup_method_args)
        for arg, mod in modalities.items():
            if mod is not None and mod not in mdata.mod:
                raise KeyError(
                    f"modalities[{arg!r}]={mod!r} is not a modality of the MuData; available "
                    f"modalities: {available}."
                )
        rna = mdata.mod[modalities.rna_layer]
        where = f"mdata.mod[{modalities.rna_layer!r}]"
        if rna_layer is not None and rna_layer not in rna.layers:
            raise KeyError(
                f"Layer {rna_layer!r} not found in {where}; available layers: "
                f"{sorted(rna.layers)} (use rna_layer=None for its .X)."
            )
        for key, name in ((labels_key, "labels_key"), (batch_key, "batch_key")):
            mod = modalities[name]
            obs = mdata.obs if mod is None else mdata.mod[mod].obs
            where_obs = "mdata.obs" if mod is None else f"mdata.mod[{mod!r}].obs"
            check_columns(obs, {name: key}, where_obs, error=KeyError)
        counts = rna.layers[rna_layer] if rna_layer is not None else rna.X
        check_counts(counts, f"{where}.layers[{rna_layer!r}]" if rna_layer else f"{where}.X")
        fields = [
            MuDataLayerField(
                KEYS.X_KEY,
                rna_layer,
                mod_key=modalities.rna_layer,
                is_count_data=True,
                mod_required=True,
            ),
            MuDataCategoricalObsField(KEYS.BATCH_KEY, batch_key, mod_key=modalities.batch_key),
        ]
        if labels_key is None:
            fields.append(MuDataCategoricalObsField(KEYS.LABELS_KEY, None))
        else:
            fields.append(
                MuDataLabelsWithMissingObsField(
                    KEYS.LABELS_KEY, labels_key, unlabeled_category, mod_key=modalities.labels_key
                )
            )
        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        manager.register_fields(mdata, **kwargs)
        cls.register_manager(manager)

    def _validate_anndata(self, adata: AnnData | None = None, copy_if_view: bool = True):
        """Like scvi-tools', but a query keeps its own registration and needs no labels.

        Genes are matched through the vocabulary, so a query registered with
        :meth:`setup_anndata` may hold its genes in another order or a subset of them (the
        transfer of the training setup by scvi-tools would reject a different gene count). A
        query without the label (or regression target) column is registered label-free:
        scvi-tools would otherwise fail on the missing column; a query only needs counts to
        be embedded or predicted. Missing labels (NaN) of a query are read as unlabelled.
        """
        keys = [self._setup_arg("labels_key"), self._setup_arg("target_key")]
        if adata is not None and self.get_anndata_manager(adata) is None:
            if adata.is_view and copy_if_view:
                adata = adata.copy()
            manager = self._get_most_recent_anndata_manager(adata)
            absent = [k for k in keys if k is not None and k not in adata.obs]
            if manager is None and absent:
                # not set up by the user: use the model's setup minus labels and target
                skip = {"labels_key", "unlabeled_category", "target_key"}
                args = self.adata_manager.registry["setup_args"]
                type(self).setup_anndata(adata, **{k: v for k, v in args.items() if k not in skip})
                manager = self._get_most_recent_anndata_manager(adata, required=True)
                logger.info(f"Registered the query AnnData without labels ({absent[0]!r} absent).")
            if manager is not None:
                self._register_manager_for_instance(manager)
        return super()._validate_anndata(adata, copy_if_view=copy_if_view)

    def _setup_arg(self, name: str) -> Any:
        return self.adata_manager.registry["setup_args"].get(name)

    def _registered_class_names(self) -> list[str]:
        if self._setup_arg("labels_key") is None:
            return []
        state = self.adata_manager.get_state_registry(KEYS.LABELS_KEY)
        unlabeled = state.unlabeled_category
        return [str(c) for c in state.categorical_mapping if c != unlabeled]

    def _has_regression_target(self) -> bool:
        return self._setup_arg("target_key") is not None

    def _counts(self, adata: AnnData):
        layer = self._setup_arg("layer")
        return adata.layers[layer] if layer is not None else adata.X
