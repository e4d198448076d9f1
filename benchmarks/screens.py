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
    backbone_gene_features,
    load_pbmc3k_counts,
    make_screen,
    perturbation_feature_table,
)


def score_screen(kind: str, seed: int, *, backbone: bool = False, **sizes) -> dict:
    """Build one screen, split it and score the linear model against the perturbation mean.

    With ``backbone=True`` the linear model is also scored on the target genes' embeddings
    in a small pretrained backbone (:func:`semisynthetic.backbone_gene_features`).
    """
    source = load_pbmc3k_counts()
    start = time.perf_counter()
    adata = make_screen(
        kind,
        source,
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
    split = adata.obs["split"].astype(str).to_numpy()
    is_control = (adata.obs[PERT] == CONTROL).to_numpy()
    logn = log1p_anndata(adata)
    train = logn[split == "train"]
    real = logn[(split == "test") | is_control].copy()
    real_val = logn[(split == "val") | is_control].copy()
    kw = {"perturbation_key": PERT, "control_label": CONTROL, "cell_type_key": "louvain"}
    tables = {"linear": perturbation_feature_table(adata)}
    facts = {"kind": kind, "train perturbations": len(perts) - n_test - n_val, "build_s": build_s}
    if backbone:
        start = time.perf_counter()
        tables["linear on backbone"] = backbone_gene_features(adata, source, seed=seed)
        facts["backbone_s"] = time.perf_counter() - start
    predictions = {"perturbation mean": perturbation_mean_baseline(train, real, **kw)}
    for name, features in tables.items():
        chosen = select_linear(train, real_val, features, kw)
        predictions[name] = linear_baseline(
            train, real, perturbation_features=features, **chosen, **kw
        )
        facts[f"{name} settings"] = chosen
    rows = []
    for name, pred in predictions.items():
        table = evaluate_perturbation_predictions(real, pred, **kw)
        table.insert(0, "method", name)
        table.insert(0, "seed", seed)
        rows.append(table)
    summary = summarise(pd.concat(rows, ignore_index=True))
    overall = summary[summary["cell_type"] == "all"].set_index("method")
    for name in tables:
        facts[f"{name} score"] = round(float(overall.loc[name, "score"]), 4)
        facts[f"{name} pearson_delta"] = round(float(overall.loc[name, "pearson_delta"]), 4)
    facts["perturbation mean pearson_delta"] = round(
        float(overall.loc["perturbation mean", "pearson_delta"]), 4
    )
    return facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", nargs="+", default=list(SCREEN_KINDS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--backbone", action="store_true", help="also score backbone gene embeddings"
    )
    args = parser.parse_args()
    quiet()
    for kind in args.kinds:
        print(score_screen(kind, args.seed, backbone=args.backbone), flush=True)


if __name__ == "__main__":
    main()
