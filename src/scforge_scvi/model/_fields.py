"""Registry fields of `ScForge` beyond those of scvi-tools."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData
from pandas.api.types import CategoricalDtype
from scvi.data._utils import _make_column_categorical
from scvi.data.fields import LabelsWithUnlabeledObsField
from scvi.data.fields._mudata import MuDataWrapper


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
