"""Datasets that ship with the installed packages (no download)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import scipy.sparse as sp


def pbmc68k_counts() -> ad.AnnData:
    """700 PBMCs x 765 genes with integer counts, from scanpy's ``pbmc68k_reduced``.

    scanpy ships this dataset log-normalised in ``.raw``; the counts are recovered as
    ``round(expm1(raw.X) * n_counts / 1e4)``. ``obs`` keeps ``bulk_labels`` and ``louvain``;
    ``layers["counts"]`` holds the counts as well as ``X``.
    """
    import scanpy as sc

    reduced = sc.datasets.pbmc68k_reduced()
    logn = reduced.raw.X.toarray() if sp.issparse(reduced.raw.X) else reduced.raw.X
    counts = np.round(np.expm1(logn) * reduced.obs["n_counts"].to_numpy()[:, None] / 1e4)
    x = sp.csr_matrix(counts.astype(np.float32))
    adata = ad.AnnData(X=x, obs=reduced.obs[["bulk_labels", "louvain"]].copy())
    adata.var_names = reduced.raw.var_names.copy()
    adata.layers["counts"] = x.copy()
    return adata
