"""Registering data with ScForge: raw counts accepted, everything else rejected clearly."""

from __future__ import annotations

import re

import numpy as np
import pytest
import scanpy as sc

from scforge_scvi import ScForge
from scforge_scvi.model import SCFORGE_REGISTRY_KEYS as KEYS


def _manager(data):
    return ScForge._get_most_recent_anndata_manager(data, required=True)


def test_setup_anndata_registers_counts_and_labels(pbmc68k_counts):
    adata = pbmc68k_counts
    adata.X = adata.X * 0  # X is not what gets registered: the layer is
    ScForge.setup_anndata(adata, layer="counts", labels_key="louvain", batch_key="bulk_labels")
    manager = _manager(adata)
    args = manager.registry["setup_args"]
    assert (args["layer"], args["labels_key"], args["batch_key"]) == (
        "counts",
        "louvain",
        "bulk_labels",
    )
    registered = manager.get_from_registry(KEYS.X_KEY)
    assert (registered != adata.layers["counts"]).nnz == 0
    labels = manager.get_state_registry(KEYS.LABELS_KEY).categorical_mapping
    assert set(adata.obs["louvain"].cat.categories) <= set(labels)
    assert manager.summary_stats.n_batch == adata.obs["bulk_labels"].nunique()


def test_missing_labels_key_names_it_and_the_columns(pbmc68k_counts):
    with pytest.raises(KeyError, match="labels_key='cell_type'") as err:
        ScForge.setup_anndata(pbmc68k_counts, layer="counts", labels_key="cell_type")
    assert "bulk_labels" in str(err.value) and "louvain" in str(err.value)


def test_missing_layer_names_the_available_layers(pbmc68k_counts):
    with pytest.raises(KeyError, match=r"Layer 'raw_counts' not found.*\['counts'\]"):
        ScForge.setup_anndata(pbmc68k_counts, layer="raw_counts")


def test_log_normalised_data_is_rejected():
    reduced = sc.datasets.pbmc68k_reduced()
    logn = reduced.raw.to_adata()  # scanpy ships log-normalised values in .raw
    with pytest.raises(ValueError, match=r"adata\.X contains non-integer values") as err:
        ScForge.setup_anndata(logn)
    assert "layer='counts'" in str(err.value)

    logn.layers["lognorm"] = logn.X.copy()
    with pytest.raises(ValueError, match=re.escape("adata.layers['lognorm']")):
        ScForge.setup_anndata(logn, layer="lognorm")

    # .X of pbmc68k_reduced is scaled: negative values
    with pytest.raises(ValueError, match=r"adata\.X contains negative values"):
        ScForge.setup_anndata(reduced)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_nan_or_infinite_counts_are_rejected(pbmc68k_counts, bad_value):
    pbmc68k_counts.layers["counts"].data[-1] = bad_value  # the very last stored value
    with pytest.raises(ValueError, match=re.escape("adata.layers['counts'] contains NaN or inf")):
        ScForge.setup_anndata(pbmc68k_counts, layer="counts")


def test_zero_count_cells_warn(pbmc68k_counts):
    counts = pbmc68k_counts.layers["counts"].tolil()
    counts[[3, 10], :] = 0
    pbmc68k_counts.layers["counts"] = counts.tocsr()
    with pytest.warns(UserWarning, match=r"2 cells have zero counts in adata\.layers\['counts'\]"):
        ScForge.setup_anndata(pbmc68k_counts, layer="counts")
    assert _manager(pbmc68k_counts).summary_stats.n_cells == 700  # they are kept


# -- MuData ----------------------------------------------------------------------------------
@pytest.fixture
def mdata(pbmc68k_counts):
    md = pytest.importorskip("mudata")
    md.set_options(pull_on_update=False)
    return md.MuData({"rna": pbmc68k_counts})


def test_setup_mudata_registers_the_rna_modality(mdata):
    rna = mdata.mod["rna"]
    ScForge.setup_mudata(
        mdata,
        rna_layer="counts",
        labels_key="louvain",
        modalities={"rna_layer": "rna", "labels_key": "rna"},
    )
    manager = _manager(mdata)
    assert manager.registry["setup_method_name"] == "setup_mudata"
    assert (manager.get_from_registry(KEYS.X_KEY) != rna.layers["counts"]).nnz == 0
    codes = manager.get_from_registry(KEYS.LABELS_KEY).ravel()
    mapping = manager.get_state_registry(KEYS.LABELS_KEY).categorical_mapping
    np.testing.assert_array_equal(mapping[codes], rna.obs["louvain"].astype(str).to_numpy())


def test_missing_labels_are_registered_as_the_unlabelled_category(pbmc68k_counts):
    adata = pbmc68k_counts
    labels = adata.obs["louvain"].astype(object).to_numpy()
    labels[::7] = None
    labels[1::7] = np.nan
    labels[2::7] = "Unknown"
    adata.obs["cell_type"] = labels
    before = adata.obs["cell_type"].copy()
    ScForge.setup_anndata(adata, layer="counts", labels_key="cell_type")
    assert adata.obs["cell_type"].equals(before)  # the user's column is left as it was
    state = _manager(adata).get_state_registry(KEYS.LABELS_KEY)
    assert state.categorical_mapping[-1] == state.unlabeled_category == "Unknown"
    assert "nan" not in map(str, state.categorical_mapping)
    codes = _manager(adata).get_from_registry(KEYS.LABELS_KEY).ravel()
    unlabelled = adata.obs["cell_type"].isna().to_numpy() | (labels == "Unknown")
    assert (codes[unlabelled] == len(state.categorical_mapping) - 1).all()
    assert (codes[~unlabelled] < len(state.categorical_mapping) - 1).all()

    marked = pbmc68k_counts.copy()
    marked.obs["cell_type"] = np.where(unlabelled, "Unknown", labels)
    ScForge.setup_anndata(marked, layer="counts", labels_key="cell_type")
    np.testing.assert_array_equal(
        _manager(marked).get_from_registry(KEYS.LABELS_KEY).ravel(), codes
    )


def test_setup_mudata_reads_missing_labels_as_unlabelled(mdata):
    rna = mdata.mod["rna"]
    rna.obs["cell_type"] = rna.obs["louvain"].astype(object)
    rna.obs.iloc[:20, rna.obs.columns.get_loc("cell_type")] = np.nan
    before = rna.obs["cell_type"].copy()
    ScForge.setup_mudata(
        mdata,
        rna_layer="counts",
        labels_key="cell_type",
        modalities={"rna_layer": "rna", "labels_key": "rna"},
    )
    assert rna.obs["cell_type"].equals(before)
    manager = _manager(mdata)
    state = manager.get_state_registry(KEYS.LABELS_KEY)
    codes = manager.get_from_registry(KEYS.LABELS_KEY).ravel()
    assert state.categorical_mapping[-1] == state.unlabeled_category
    assert (codes[:20] == len(state.categorical_mapping) - 1).all()
    assert (codes[20:] < len(state.categorical_mapping) - 1).all()


def test_setup_mudata_rejects_bad_input(mdata):
    with pytest.raises(ValueError, match=r"modalities=\{'rna_layer'.*\['rna'\]"):
        ScForge.setup_mudata(mdata, rna_layer="counts")
    with pytest.raises(KeyError, match=r"'protein'.*available modalities: \['rna'\]"):
        ScForge.setup_mudata(mdata, modalities={"rna_layer": "protein"})
    with pytest.raises(KeyError, match=r"Layer 'raw'.*\['counts'\]"):
        ScForge.setup_mudata(mdata, rna_layer="raw", modalities={"rna_layer": "rna"})
    with pytest.raises(KeyError, match=r"labels_key='cell_type'.*louvain"):
        ScForge.setup_mudata(
            mdata,
            labels_key="cell_type",
            modalities={"rna_layer": "rna", "labels_key": "rna"},
        )
    mdata.mod["rna"].layers["lognorm"] = sc.pp.log1p(mdata.mod["rna"].X, copy=True)
    with pytest.raises(ValueError, match=re.escape("mdata.mod['rna'].layers['lognorm']")):
        ScForge.setup_mudata(mdata, rna_layer="lognorm", modalities={"rna_layer": "rna"})


def test_setup_anndata_on_pbmc3k(pbmc3k):
    ScForge.setup_anndata(pbmc3k, labels_key="louvain")
    assert _manager(pbmc3k).summary_stats.n_labels == pbmc3k.obs["louvain"].nunique() + 1
