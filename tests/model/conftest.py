"""Shared perturbation fixtures: semi-synthetic screens built with ``benchmarks/semisynthetic.py``.

The screens' keys and the tiny ScForgePerturb settings are in ``tests/helpers.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = str(Path(__file__).resolve().parents[2] / "benchmarks")
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)

from helpers import CELL_TYPE, CONTROL, PERT  # noqa: E402
from scforge_scvi.perturb._data import assign_perturbation_split  # noqa: E402
from semisynthetic import make_semisynthetic_perturbation_data  # noqa: E402


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
