"""Helpers shared by test modules (importable because ``tests/`` has a conftest.py)."""

from __future__ import annotations

from scforge_scvi import ScForge


def setup_counts(adata):
    """Register ``adata`` afresh with raw counts in ``layers["counts"]``.

    A copy inherits its parent's scvi-tools identity; dropping it gives the copy its own setup.
    """
    for key in ("_scvi_uuid", "_scvi_manager_uuid"):
        adata.uns.pop(key, None)
    ScForge.setup_anndata(adata, layer="counts")
    return adata
