"""Perturbation-response benchmark: ScForgePerturb against three baselines.

A semi-synthetic Perturb-seq screen is built from real PBMC 3k cells (known perturbation
programs applied to real cells, counts drawn again; see
``scforge_scvi.data._perturb_data.make_semisynthetic_perturbation_data``). Perturbations are
held out few-shot, as cell-load does: in two cell types a set of perturbations is held out
for test (and a few for validation), while the other cell types see every perturbation.

Every method predicts the held-out (cell type, perturbation) groups from the controls of the
same cell type; cell-eval's metrics are computed per group and averaged, and the
baseline-normalised score is reported against the perturbation-mean baseline (cell-eval's
default) and against the control mean.

Run ``python benchmarks/perturbation.py`` (about 2-4 minutes on 2 CPU cores) or
``--quick`` for a smaller run on scanpy's pbmc68k_reduced.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import numpy as np
import pandas as pd
import scvi
import torch

from scforge_scvi.bench._perturbation import (
    aggregate_metrics,
    control_mean_baseline,
    evaluate_perturbation_predictions,
    linear_baseline,
    log1p_anndata,
    normalized_score,
    perturbation_mean_baseline,
)
from scforge_scvi.data._datasets import pbmc68k_counts
from scforge_scvi.data._perturb_data import (
    assign_perturbation_split,
    load_pbmc3k_counts,
    make_semisynthetic_perturbation_data,
)
from scforge_scvi.model._perturb_model import ScForgePerturb

PERT, CONTROL = "target_gene", "non-targeting"


def build_dataset(quick: bool, seed: int):
    """The semi-synthetic screen, its few-shot split and the cell-type column name."""
    if quick:
        source, cell_type_key = pbmc68k_counts(), "bulk_labels"
        cell_types = ["CD14+ Monocyte", "Dendritic", "CD19+ B", "CD4+/CD25 T Reg"]
        fewshot = ["CD14+ Monocyte", "CD19+ B"]
        sizes = {
            "n_genes": 300,
            "n_perturbations": 20,
            "n_cells_per_perturbation": 40,
            "n_controls_per_cell_type": 200,
        }
    else:
        try:
            source, cell_type_key = load_pbmc3k_counts(), "louvain"
        except FileNotFoundError:
            logging.warning("pbmc3k not found in ../shared/data; running the quick benchmark.")
            return build_dataset(True, seed)
        cell_types = ["CD4 T cells", "CD14+ Monocytes", "B cells", "CD8 T cells"]
        fewshot = ["CD14+ Monocytes", "B cells"]
        sizes = {
            "n_genes": 1000,
            "n_perturbations": 40,
            "n_cells_per_perturbation": 50,
            "n_controls_per_cell_type": 300,
        }
    adata = make_semisynthetic_perturbation_data(
        source,
        cell_type_key,
        cell_types=cell_types,
        perturbation_key=PERT,
        control_label=CONTROL,
        seed=seed,
        **sizes,
    )
    perts = np.random.default_rng(seed).permutation(
        adata.uns["perturbation_truth"]["perturbations"]
    )
    n_test = len(perts) // 4
    assign_perturbation_split(
        adata,
        PERT,
        CONTROL,
        cell_type_key,
        test_perturbations=perts[:n_test],
        val_perturbations=perts[n_test : n_test + max(2, len(perts) // 10)],
        fewshot_cell_types=fewshot,
    )
    return adata, cell_type_key, fewshot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small run on pbmc68k_reduced")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for name in ("lightning", "lightning.pytorch", "scvi", "scforge_scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    scvi.settings.seed = args.seed
    # One intra-op thread: for a model this small, two threads on two shared cores spend
    # most of their time waiting on each other (an epoch took 18x longer under load).
    torch.set_num_threads(1)

    t0 = time.perf_counter()
    adata, cell_type_key, fewshot = build_dataset(args.quick, args.seed)
    data_s = time.perf_counter() - t0
    split = adata.obs["split"].astype(str)
    logn = log1p_anndata(adata)
    train = logn[split.to_numpy() == "train"]
    held_out = (split == "test") | (
        adata.obs[cell_type_key].isin(fewshot) & (adata.obs[PERT] == CONTROL)
    )
    real = logn[held_out.to_numpy()].copy()
    kw = {"perturbation_key": PERT, "control_label": CONTROL, "cell_type_key": cell_type_key}

    predictions, seconds = {}, {}
    start = time.perf_counter()
    predictions["control mean"] = control_mean_baseline(real, **kw)
    seconds["control mean"] = time.perf_counter() - start
    start = time.perf_counter()
    predictions["perturbation mean"] = perturbation_mean_baseline(train, real, **kw)
    seconds["perturbation mean"] = time.perf_counter() - start
    start = time.perf_counter()
    predictions["linear (Ahlmann-Eltze)"] = linear_baseline(train, real, **kw)
    seconds["linear (Ahlmann-Eltze)"] = time.perf_counter() - start

    ScForgePerturb.setup_anndata(adata, PERT, CONTROL, cell_type_key=cell_type_key)
    model = ScForgePerturb(
        adata,
        hidden_dim=128,
        num_layers=2,
        num_heads=4,
        encoder_hidden_dim=512,
        dropout=0.1,
        cell_set_len=32,
    )
    epochs = args.epochs or (20 if args.quick else 40)
    model.train(
        max_epochs=epochs,
        lr=1e-3,
        weight_decay=0.01,
        warmup_steps=50,
        min_lr_ratio=0.05,
        sets_per_batch=16,
        split_key="split",
        seed=args.seed,
    )
    seconds["ScForgePerturb"] = model.training_time_s_
    # every control cell of the cell type is perturbed once (n_cells="controls"): the
    # model's pseudobulk then carries little sampling noise, like the baselines' means
    pred = model.predict(adata[held_out.to_numpy()].copy(), n_cells="controls", seed=args.seed)
    predictions["ScForgePerturb"] = pred

    rows = {}
    for name, p in predictions.items():
        rows[name] = aggregate_metrics(evaluate_perturbation_predictions(real, p, **kw))
    table = pd.DataFrame(rows).T
    for base in ("perturbation mean", "control mean"):
        table[f"score vs {base}"] = [
            normalized_score(rows[name], rows[base])["avg_score"] for name in table.index
        ]
    table["train s"] = pd.Series(seconds)

    n_groups = int(
        (real.obs[PERT] != CONTROL)
        .groupby(real.obs[cell_type_key], observed=True)
        .sum()
        .gt(0)
        .sum()
    )
    n_test = real.obs.loc[real.obs[PERT] != CONTROL, PERT].nunique()
    print(
        f"\nSemi-synthetic screen: {adata.n_obs} cells x {adata.n_vars} genes, "
        f"{adata.obs[PERT].nunique() - 1} perturbations, {adata.obs[cell_type_key].nunique()} "
        f"cell types (built in {data_s:.1f} s). Held out (few-shot): {n_test} perturbations in "
        f"{n_groups} cell types; best epoch {model.best_epoch_} of {epochs}.\n"
    )
    with pd.option_context(
        "display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4f}".format
    ):
        print(table)
    ours = rows["ScForgePerturb"]
    print()
    for base in ("control mean", "perturbation mean", "linear (Ahlmann-Eltze)"):
        other = rows[base]
        defined = [m for m in ours.index if np.isfinite(other[m])]
        wins = [
            m
            for m in defined
            if (ours[m] < other[m] if m in ("mae", "mse") else ours[m] > other[m])
        ]
        undefined = [m for m in ours.index if m not in defined]
        note = f"; {', '.join(undefined)} undefined for the baseline" if undefined else ""
        score = normalized_score(ours, other)["avg_score"]
        print(
            f"ScForgePerturb vs {base}: better on {len(wins)}/{len(defined)} metrics "
            f"({', '.join(wins) or 'none'}){note}; normalised score {score:.3f} "
            f"(0 = no better than the baseline, 1 = perfect)."
        )


if __name__ == "__main__":
    main()
