"""Embedding benchmark: ScForge's cell embedding against PCA (and scVI) by label structure.

For each dataset and embedding: the 5-fold cross-validated accuracy of a 15-nearest-neighbour
classifier of the labels (``sklearn``, stratified folds) and the silhouette of the labels
(Euclidean), with the wall time of computing the embedding (training included).

Arms:

``pca``
    50 principal components of log-normalised highly variable genes, scanpy's standard
    recipe: ``normalize_total(1e4)``, ``log1p``, ``highly_variable_genes(n_top_genes=2000)``
    (every gene but one when there are fewer), ``scale(max_value=10)``, ``pca(50)``.
``scforge``
    The ``scforge demo`` recipe (rank-value tokens, 256 genes a cell, a 2-layer, 64-wide
    transformer, masked-gene pretraining for ``--epochs`` epochs), then one row for each
    embedding read-out of ``--readouts`` from the same weights (``embed()``'s
    ``layers`` / ``pooling`` / ``normalize``; ``default`` is ``embed()``'s default).
    ``--cell-expression-weight`` and ``--gene-embedding-init`` change the pretraining
    (``ScForge(cell_expression_weight=..., gene_embedding_init=...)``).
``scvi``
    scvi-tools ``SCVI`` with default settings on the raw counts of the same highly variable
    genes, ``get_latent_representation()`` (10 dimensions).

Data: ``pbmc68k`` (scanpy's ``pbmc68k_reduced`` counts, ``obs["bulk_labels"]``) and
``pbmc3k`` (``../shared/data/pbmc3k_raw_labeled.h5ad``, ``obs["louvain"]``), loaded as in
``benchmarks/annotation.py``.

Run ``python benchmarks/embedding.py --datasets pbmc68k pbmc3k --arms pca scforge scvi``;
``--json FILE`` writes every row.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings

import numpy as np
import torch

from annotation import load

#: embed() read-outs: name -> keyword arguments of ``ScForge.embed``
READOUTS = {
    "default": {},
    "last/model-pooling/none": {"layers": None, "pooling": None, "normalize": "none"},
    "last/mean/standardize": {"layers": -1, "pooling": "mean", "normalize": "standardize"},
    "last/mean/l2": {"layers": -1, "pooling": "mean", "normalize": "l2"},
    "last/cls/standardize": {"layers": -1, "pooling": "cls", "normalize": "standardize"},
    "input/mean/none": {"layers": 0, "pooling": "mean", "normalize": "none"},
    "input/mean/standardize": {"layers": 0, "pooling": "mean", "normalize": "standardize"},
    "block1/mean/standardize": {"layers": 1, "pooling": "mean", "normalize": "standardize"},
    "input+last/mean/standardize": {
        "layers": [0, -1],
        "pooling": "mean",
        "normalize": "standardize",
    },
    "all/mean/standardize": {"layers": [0, 1, 2], "pooling": "mean", "normalize": "standardize"},
}
ARMS = ("pca", "scforge", "scvi")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", choices=("pbmc68k", "pbmc3k"), default=["pbmc68k"])
    p.add_argument("--arms", nargs="+", choices=ARMS, default=["pca", "scforge"])
    p.add_argument("--readouts", nargs="+", choices=tuple(READOUTS), default=list(READOUTS))
    p.add_argument("--epochs", type=int, default=8, help="ScForge pretraining epochs (demo: 8)")
    p.add_argument(
        "--cell-expression-weight",
        type=float,
        default=0.0,
        help="ScForge's cell-level reconstruction objective (0: off, the default)",
    )
    p.add_argument(
        "--gene-embedding-init",
        choices=("random", "pca"),
        default="random",
        help="ScForge's start of the gene embeddings (default: random, the library default)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def scores(embedding: np.ndarray, labels: np.ndarray, seed: int) -> dict[str, float]:
    """15-NN accuracy (5-fold, stratified, shuffled with ``seed``) and label silhouette."""
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    accuracy = cross_val_score(KNeighborsClassifier(15), embedding, labels, cv=folds)
    return {
        "knn15_accuracy": float(accuracy.mean()),
        "knn15_accuracy_sd": float(accuracy.std()),
        "silhouette": float(silhouette_score(embedding, labels)),
    }


def hvg(adata):
    """Log-normalised highly variable genes of raw counts (scanpy's standard recipe)."""
    import scanpy as sc

    logn = adata.copy()
    sc.pp.normalize_total(logn, target_sum=1e4)
    sc.pp.log1p(logn)
    sc.pp.highly_variable_genes(logn, n_top_genes=min(2000, adata.n_vars - 1))
    return logn[:, logn.var["highly_variable"].to_numpy()].copy()


def pca_arm(adata, seed: int) -> np.ndarray:
    import scanpy as sc

    logn = hvg(adata)
    sc.pp.scale(logn, max_value=10)
    sc.tl.pca(logn, n_comps=50, random_state=seed)
    return logn.obsm["X_pca"]


def scvi_arm(adata, seed: int) -> np.ndarray:
    import scvi

    scvi.settings.seed = seed
    genes = hvg(adata).var_names
    counts = adata[:, genes].copy()
    scvi.model.SCVI.setup_anndata(counts)
    model = scvi.model.SCVI(counts)
    model.train(enable_progress_bar=False)
    return model.get_latent_representation()


def scforge_arm(adata, args) -> tuple[dict[str, np.ndarray], float]:
    """Embeddings of every requested read-out of one pretrained model, and the train time."""
    from scforge_scvi import ScForge

    cells = adata.copy()
    ScForge.setup_anndata(cells)
    model = ScForge(
        cells,
        tokenizer="rank_value",
        max_genes=256,
        hidden_dim=64,
        num_layers=2,
        num_heads=4,
        dropout=0.1,
        pooling="mean",
        cell_expression_weight=args.cell_expression_weight,
        gene_embedding_init=args.gene_embedding_init,
    )
    start = time.perf_counter()
    model.train(
        max_epochs=args.epochs,
        batch_size=32,
        lr=1e-3,
        warmup_steps=20,
        seed=args.seed,
        enable_progress_bar=False,
    )
    train_seconds = time.perf_counter() - start
    embeddings = {}
    for name in args.readouts:
        model.embed(cells, **READOUTS[name])
        embeddings[name] = cells.obsm["X_scforge"].copy()
    return embeddings, train_seconds


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "scvi", "scforge_scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)
    rows = []
    for dataset in args.datasets:
        adata, key = load(dataset)
        labels = adata.obs[key].astype(str).to_numpy()
        for arm in args.arms:
            start = time.perf_counter()
            if arm == "scforge":
                embeddings, train_seconds = scforge_arm(adata, args)
                total = time.perf_counter() - start
            else:
                fit = pca_arm if arm == "pca" else scvi_arm
                embeddings = {"": fit(adata, args.seed)}
                total = train_seconds = time.perf_counter() - start
            for readout, embedding in embeddings.items():
                row = {
                    "dataset": dataset,
                    "labels": key,
                    "n_cells": adata.n_obs,
                    "arm": arm,
                    "readout": readout,
                    "dims": int(embedding.shape[1]),
                    "fit_seconds": round(train_seconds, 1),
                    "arm_seconds": round(total, 1),
                    **scores(embedding, labels, args.seed),
                }
                rows.append(row)
                print(
                    f"{dataset:8s} {arm:8s} {readout:30s} {row['dims']:4d} dims  "
                    f"15-NN acc {row['knn15_accuracy']:.3f} ± {row['knn15_accuracy_sd']:.3f}  "
                    f"silhouette {row['silhouette']:+.3f}  fit {train_seconds:6.1f} s",
                    flush=True,
                )
    print()
    print("| dataset | arm | read-out | dims | 15-NN accuracy | silhouette | fit (s) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['dataset']} | {r['arm']} | {r['readout'] or '-'} | {r['dims']} | "
            f"{r['knn15_accuracy']:.3f} ± {r['knn15_accuracy_sd']:.3f} | "
            f"{r['silhouette']:+.3f} | {r['fit_seconds']:.0f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
