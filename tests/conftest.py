"""Shared fixtures: real PBMC data with integer counts, and perturbation screens built from them.

``pbmc68k_counts`` ships with scanpy and is always available; ``pbmc3k`` is read from the
shared data folder next to the repository and the tests that use it skip when it is absent.
Both are loaded once per session and handed to each test as a fresh copy, so a test may
modify its AnnData freely. The semi-synthetic screens are built with
``benchmarks/semisynthetic.py``; their keys and the tiny ScForgePerturb settings are in
``tests/helpers.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import anndata as ad
import pytest
import torch

BENCHMARKS = str(Path(__file__).resolve().parents[1] / "benchmarks")
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)

from helpers import CELL_TYPE, CONTROL, PERT  # noqa: E402
from scforge_scvi.data import pbmc68k_counts as load_pbmc68k_counts  # noqa: E402
from scforge_scvi.perturb._data import assign_perturbation_split  # noqa: E402
from semisynthetic import make_semisynthetic_perturbation_data  # noqa: E402

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


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one intra-op thread (two thrash on busy shared cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def make_screen(_pbmc68k_counts_once):
    """Build a screen from pbmc68k cells and split its perturbations.

    ``make_screen(n_test=..., n_val=..., fewshot_cell_types=..., **screen)``: the first
    ``n_test`` perturbations are test perturbations, the next ``n_val`` validation ones;
    ``screen`` goes to ``make_semisynthetic_perturbation_data`` (seed 0).
    """

    def make(*, n_test: int, n_val: int, fewshot_cell_types=None, **screen):
        adata = make_semisynthetic_perturbation_data(
            _pbmc68k_counts_once.copy(),
            CELL_TYPE,
            perturbation_key=PERT,
            control_label=CONTROL,
            seed=0,
            **screen,
        )
        perts = list(adata.uns["perturbation_truth"]["perturbations"])
        assign_perturbation_split(
            adata,
            PERT,
            CONTROL,
            CELL_TYPE,
            test_perturbations=perts[:n_test],
            val_perturbations=perts[n_test : n_test + n_val],
            fewshot_cell_types=fewshot_cell_types,
        )
        return adata

    return make


@pytest.fixture(scope="session")
def unseen_screen(make_screen):
    """2 cell types x 24 perturbations with informative 8-d features; 4 test, 3 val."""
    return make_screen(
        cell_types=["CD14+ Monocyte", "CD19+ B"],
        n_genes=150,
        n_perturbations=24,
        n_cells_per_perturbation=20,
        n_controls_per_cell_type=100,
        n_programs=4,
        program_effect=2.0,
        n_features=8,
        feature_noise=0.2,
        n_test=4,
        n_val=3,
    )
