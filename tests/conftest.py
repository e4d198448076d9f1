"""Shared fixtures: real PBMC data with integer counts.

``pbmc68k_counts`` ships with scanpy and is always available; ``pbmc3k`` is read from the
shared data folder next to the repository and the tests that use it skip when it is absent.
Both are loaded once per session and handed to each test as a fresh copy, so a test may
modify its AnnData freely.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import pytest

from scforge_scvi.data import pbmc68k_counts as load_pbmc68k_counts

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
PBMC3K_PATH = SHARED_DATA / "pbmc3k_raw_labeled.h5ad"


@pytest.fixture(scope="session")
def _pbmc68k_counts_once() -> ad.AnnData:
    return load_pbmc68k_counts()


@pytest.fixture
def pbmc68k_counts(_pbmc68k_counts_once: ad.AnnData) -> ad.AnnData:
    """700 PBMCs x 765 genes: CSR float32 integer counts in ``X`` and ``layers["counts"]``.

    Recovered from scanpy's ``pbmc68k_reduced`` as ``round(expm1(raw.X) * n_counts / 1e4)``;
    ``obs`` holds ``bulk_labels`` and ``louvain``.
    """
    return _pbmc68k_counts_once.copy()


@pytest.fixture(scope="session")
def _pbmc3k_once() -> ad.AnnData:
    if not PBMC3K_PATH.exists():
        pytest.skip(f"{PBMC3K_PATH.name} not found in <repo>/../shared/data")
    return ad.read_h5ad(PBMC3K_PATH)


@pytest.fixture
def pbmc3k(_pbmc3k_once: ad.AnnData) -> ad.AnnData:
    """10x PBMC 3k: 2,638 cells x 32,738 genes, raw UMI counts (CSR float32) in ``X``.

    ``var_names`` are gene symbols, ``var["gene_ids"]`` Ensembl ids, ``obs["louvain"]`` cell
    types.
    """
    return _pbmc3k_once.copy()
