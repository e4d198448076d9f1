"""How much each screen of the suite rewards its feature table: linear model vs perturbation mean.

For each kind of :func:`semisynthetic.make_screen` (pbmc3k, default sizes), whole
perturbations are held out as in ``perturbation.py --split unseen`` (a quarter test, a
twelfth validation, in every cell type) and the linear model of Ahlmann-Eltze et al. on the
screen's feature table (ridge and width chosen on validation) is scored against the
perturbation mean with cell-eval's normalised score. A screen is useful for the benchmark
when that score is clearly above 0 but far from 1.

Run under ``nice`` on a shared machine::

    nice -n 15 python benchmarks/screens.py --kinds correlation pathway
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from perturbation import CONTROL, PERT, quiet, select_linear, summarise
from scforge_scvi.perturb._data import assign_perturbation_split
from scforge_scvi.perturb._metrics import (
    evaluate_perturbation_predictions,
    linear_baseline,
    log1p_anndata,
    perturbation_mean_baseline,
)
from semisynthetic import (
    PBMC3K_CELL_TYPES,
    SCREEN_KINDS,
    load_pbmc3k_counts,
    make_screen,
    perturbation_feature_table,
)


def score_screen(kind: str, seed: int, **sizes) -> dict:
    """Build one screen, split it and score the linear model against the perturbation mean."""
    start = time.perf_counter()
    adata = make_screen(
        kind,
        load_pbmc3k_counts(),
        "louvain",
        cell_types=PBMC3K_CELL_TYPES,
        seed=seed,
        perturbation_key=PERT,
        control_label=CONTROL,
        **sizes,
    )
    build_s = time.perf_counter() - start
    perts = list(
        np.random.default_rng(seed).permutation(adata.uns["perturbation_truth"]["perturbations"])
    )
    n_test, n_val = len(perts) // 4, len(perts) // 12
    assign_perturbation_split(
        adata,
        PERT,
        CONTROL,
        "louvain",
        test_perturbations=perts[:n_test],
        val_perturbations=perts[n_test : n_test + n_val],
    )
    features = perturbation_feature_table(adata)
    split = adata.obs["split"].astype(str).to_numpy()
    is_control = (adata.obs[PERT] == CONTROL).to_numpy()
    logn = log1p_anndata(adata)
    train = logn[split == "train"]
    real = logn[(split == "test") | is_control].copy()
    real_val = logn[(split == "val") | is_control].copy()
    kw = {"perturbation_key": PERT, "control_label": CONTROL, "cell_type_key": "louvain"}
    chosen = select_linear(train, real_val, features, kw)
    predictions = {
        "perturbation mean": perturbation_mean_baseline(train, real, **kw),
        "linear": linear_baseline(train, real, perturbation_features=features, **chosen, **kw),
    }
    rows = []
    for name, pred in predictions.items():
        table = evaluate_perturbation_predictions(real, pred, **kw)
        table.insert(0, "method", name)
        table.insert(0, "seed", seed)
        rows.append(table)
    summary = summarise(pd.concat(rows, ignore_index=True))
    overall = summary[(summary["cell_type"] == "all") & (summary["method"] == "linear")].iloc[0]
    return {
        "kind": kind,
        "score": float(overall["score"]),
        "pearson_delta": float(overall["pearson_delta"]),
        "linear": chosen,
        "train perturbations": len(perts) - n_test - n_val,
        "build_s": build_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", nargs="+", default=list(SCREEN_KINDS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    quiet()
    for kind in args.kinds:
        print(score_screen(kind, args.seed), flush=True)


if __name__ == "__main__":
    main()
