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
    The ``scforge demo`` recipe (``scforge_scvi.cli._demo.DEMO_MODEL_KWARGS``: rank-value
    tokens, 256 genes a cell, a 2-layer, 64-wide transformer, PCA start of the gene
    embeddings, masked-gene plus cell-level reconstruction pretraining for ``--epochs``
    epochs), then one row for each embedding read-out of ``--readouts`` from the same weights
    (``embed()``'s ``layers`` / ``pooling`` / ``normalize``; ``default`` is ``embed()``'s
    default). ``--set KEY=VALUE`` changes one ``ScForge(...)`` argument of the recipe
    (repeatable; the value is read as YAML, so ``--set max_genes=512`` is an int).
``scvi``
    scvi-tools ``SCVI`` with default settings on the raw counts of the same highly variable
    genes, ``get_latent_representation()`` (10 dimensions).

Data: ``pbmc68k`` (scanpy's ``pbmc68k_reduced`` counts, ``obs["bulk_labels"]``) and
``pbmc3k`` (``../shared/data/pbmc3k_raw_labeled.h5ad``, ``obs["louvain"]``), loaded as in
``benchmarks/annotation.py``; ``--shape`` derives one of that script's shapes (``genes500``,
``thin30``, ...) from each.

Scores: always the 15-NN accuracy and the label silhouette (scikit-learn). With ``--scib``
(needs the ``metrics`` extra, ``pip install -e ".[metrics]"``), also scib-metrics'
bio-conservation scores: NMI and ARI of Leiden clusters on a 15-NN graph (resolution
optimised), the rescaled cell-type silhouette (``silhouette_label``) and their mean
(``bio_conservation``).

Run ``python benchmarks/embedding.py --datasets pbmc68k pbmc3k --arms pca scforge scvi``;
``--json FILE`` writes every row, ``--save-embeddings DIR`` every embedding (``.npz``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from annotation import SHAPES, load, reshape

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
DATASETS = ("pbmc68k", "pbmc3k", "pbmc2batch")
#: coarse cell types shared by pbmc3k's ``louvain`` and pbmc68k_reduced's ``bulk_labels``
COARSE = {
    "CD4 T cells": "CD4 T",
    "CD4+/CD25 T Reg": "CD4 T",
    "CD4+/CD45RO+ Memory": "CD4 T",
    "CD4+/CD45RA+/CD25- Naive T": "CD4 T",
    "CD8 T cells": "CD8 T",
    "CD8+ Cytotoxic T": "CD8 T",
    "CD8+/CD45RA+ Naive Cytotoxic": "CD8 T",
    "B cells": "B",
    "CD19+ B": "B",
    "NK cells": "NK",
    "CD56+ NK": "NK",
    "CD14+ Monocytes": "Monocyte",
    "FCGR3A+ Monocytes": "Monocyte",
    "CD14+ Monocyte": "Monocyte",
    "Dendritic cells": "Dendritic",
    "Dendritic": "Dendritic",
    "Megakaryocytes": "Megakaryocyte",
    "CD34+": "CD34+",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=["pbmc68k"])
    p.add_argument(
        "--shape", choices=SHAPES, default="none", help="a derived shape (benchmarks/annotation.py)"
    )
    p.add_argument("--arms", nargs="+", choices=ARMS, default=["pca", "scforge"])
    p.add_argument("--readouts", nargs="+", choices=tuple(READOUTS), default=list(READOUTS))
    p.add_argument("--epochs", type=int, default=8, help="ScForge pretraining epochs (demo: 8)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change one ScForge(...) argument of the demo recipe (max_genes=512), or one "
        "train() argument (train.masking={mask_ratio: 0.3})",
    )
    p.add_argument("--scib", action="store_true", help="add scib-metrics bio-conservation")
    p.add_argument("--save-embeddings", default=None, metavar="DIR")
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


def recipe(overrides: list[str]) -> tuple[dict, dict]:
    """The demo's ``ScForge(...)`` and ``train(...)`` arguments with ``KEY=VALUE`` overrides.

    Values are read as YAML; a key ``train.NAME`` changes the ``train()`` argument ``NAME``
    (the ``plan_kwargs`` entry for a training-plan setting such as ``lr`` or ``masking``).
    """
    import yaml

    from scforge_scvi.cli._demo import DEMO_MODEL_KWARGS, DEMO_TRAIN_KWARGS
    from scforge_scvi.model._settings import flattened, grouped
    from scforge_scvi.model._training import _PLAN_KEYWORDS as PLAN_KEYWORDS

    model, train = flattened(DEMO_MODEL_KWARGS), dict(DEMO_TRAIN_KWARGS)
    plan = train["plan_kwargs"] = dict(DEMO_TRAIN_KWARGS["plan_kwargs"])
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: write KEY=VALUE, e.g. --set max_genes=512")
        target, key = (train, key[6:]) if key.startswith("train.") else (model, key)
        if target is train and key in PLAN_KEYWORDS:
            target = plan  # the optimizer, schedule and masking are training-plan settings
        target[key] = yaml.safe_load(value)
    return grouped(model), train


def load_dataset(name: str):
    """``(adata, labels key, batch key or None)``; ``pbmc2batch`` is built from the other two.

    ``pbmc2batch``: pbmc3k and pbmc68k_reduced on their shared genes (pbmc68k_reduced's 765),
    ``obs["batch"]`` naming the source and ``obs["cell_type"]`` the coarse type both label
    sets agree on (:data:`COARSE`): two sequencing runs of different depth, one set of types.
    """
    import anndata as ad

    if name != "pbmc2batch":
        return (*load(name), None)
    parts = {}
    for source in ("pbmc3k", "pbmc68k"):
        adata, key = load(source)
        adata.obs["cell_type"] = adata.obs[key].astype(str).map(COARSE)
        parts[source] = adata
    genes = parts["pbmc68k"].var_names.intersection(parts["pbmc3k"].var_names)
    merged = ad.concat({k: v[:, genes] for k, v in parts.items()}, label="batch", index_unique="-")
    merged.obs = merged.obs[["cell_type", "batch"]]
    return merged, "cell_type", "batch"


def scib_scores(
    embedding: np.ndarray, labels: np.ndarray, batch: np.ndarray | None, seed: int
) -> dict[str, float]:
    """scib-metrics scores of an embedding.

    Bio-conservation: Leiden NMI/ARI (resolution optimised), the rescaled label silhouette,
    and their mean. With ``batch``, batch correction as well: the batch silhouette per label,
    the integration LISI, kBET per label and the graph connectivity, and their mean.
    """
    import scib_metrics
    from scib_metrics.nearest_neighbors import pynndescent

    x = np.ascontiguousarray(embedding, dtype=np.float32)
    neighbors = pynndescent(x, n_neighbors=15, random_state=seed)
    out = dict(scib_metrics.nmi_ari_cluster_labels_leiden(neighbors, labels, seed=seed))
    out["asw_label"] = scib_metrics.silhouette_label(x, labels)
    out = {k: float(v) for k, v in out.items()}
    out["bio_conservation"] = float(np.mean([out["nmi"], out["ari"], out["asw_label"]]))
    if batch is not None:
        batch_scores = {
            "asw_batch": scib_metrics.silhouette_batch(x, labels, batch),
            "ilisi": scib_metrics.ilisi_knn(neighbors, batch),
            "kbet": scib_metrics.kbet_per_label(neighbors, batch, labels),
            "graph_connectivity": scib_metrics.graph_connectivity(neighbors, labels),
        }
        out.update({k: float(v) for k, v in batch_scores.items()})
        out["batch_correction"] = float(np.mean(list(batch_scores.values())))
    return out


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


def scvi_arm(adata, seed: int, batch_key: str | None = None) -> np.ndarray:
    import scvi

    scvi.settings.seed = seed
    genes = hvg(adata).var_names
    counts = adata[:, genes].copy()
    scvi.model.SCVI.setup_anndata(counts, batch_key=batch_key)
    model = scvi.model.SCVI(counts)
    model.train(enable_progress_bar=False)
    return model.get_latent_representation()


def scforge_arm(adata, args, batch_key=None) -> tuple[dict[str, np.ndarray], float]:
    """Embeddings of every requested read-out of one pretrained model, and the train time."""
    from scforge_scvi import ScForge

    cells = adata.copy()
    ScForge.setup_anndata(cells, batch_key=batch_key)
    model_kwargs, train_kwargs = recipe(args.overrides)
    model = ScForge(cells, **model_kwargs)
    start = time.perf_counter()
    model.train(max_epochs=args.epochs, seed=args.seed, enable_progress_bar=False, **train_kwargs)
    train_seconds = time.perf_counter() - start
    embeddings = {}
    for name in args.readouts:
        model.embed(cells, **READOUTS[name])
        embeddings[name] = cells.obsm["X_scforge"].copy()
    return embeddings, train_seconds


#: scib-metrics columns of the summary table: (row key, header)
SCIB_COLUMNS = (
    ("nmi", "NMI"),
    ("ari", "ARI"),
    ("asw_label", "label ASW"),
    ("bio_conservation", "bio"),
    ("asw_batch", "batch ASW"),
    ("ilisi", "iLISI"),
    ("kbet", "kBET"),
    ("graph_connectivity", "graph conn."),
    ("batch_correction", "batch"),
)


def print_table(rows: list[dict]) -> None:
    """Markdown table of every row, with the scib-metrics columns that any row has."""
    extra = [(k, name) for k, name in SCIB_COLUMNS if any(k in r for r in rows)]
    head = "".join(f" {name} |" for _, name in extra)
    print()
    print(f"| dataset | arm | read-out | dims | 15-NN accuracy | silhouette |{head} fit (s) |")
    print("|---|---|---|---:|---:|---:|" + "---:|" * (len(extra) + 1))
    for r in rows:
        cells = "".join(f" {r[k]:.3f} |" if k in r else " - |" for k, _ in extra)
        print(
            f"| {r['dataset']} | {r['arm']} | {r['readout'] or '-'} | {r['dims']} | "
            f"{r['knn15_accuracy']:.3f} ± {r['knn15_accuracy_sd']:.3f} | "
            f"{r['silhouette']:+.3f} |{cells} {r['fit_seconds']:.0f} |"
        )


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "scvi", "scforge_scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)
    rows = []
    for dataset in args.datasets:
        adata, key, batch_key = load_dataset(dataset)
        adata = reshape(adata, key, args.shape)
        labels = adata.obs[key].astype(str).to_numpy()
        batch = None if batch_key is None else adata.obs[batch_key].astype(str).to_numpy()
        for arm in args.arms:
            start = time.perf_counter()
            if arm == "scforge":
                embeddings, train_seconds = scforge_arm(adata, args, batch_key)
            elif arm == "pca":
                embeddings = {"": pca_arm(adata, args.seed)}
            else:
                embeddings = {"": scvi_arm(adata, args.seed, batch_key)}
            total = time.perf_counter() - start
            if arm != "scforge":
                train_seconds = total
            for readout, embedding in embeddings.items():
                row = {
                    "dataset": dataset,
                    "shape": args.shape,
                    "labels": key,
                    "n_cells": adata.n_obs,
                    "arm": arm,
                    "readout": readout,
                    "dims": int(embedding.shape[1]),
                    "fit_seconds": round(train_seconds, 1),
                    "arm_seconds": round(total, 1),
                    **scores(embedding, labels, args.seed),
                    **(scib_scores(embedding, labels, batch, args.seed) if args.scib else {}),
                }
                rows.append(row)
                bio = f"  bio {row['bio_conservation']:.3f}" if args.scib else ""
                print(
                    f"{dataset:8s} {arm:8s} {readout:30s} {row['dims']:4d} dims  "
                    f"15-NN acc {row['knn15_accuracy']:.3f} ± {row['knn15_accuracy_sd']:.3f}  "
                    f"silhouette {row['silhouette']:+.3f}{bio}  fit {train_seconds:6.1f} s",
                    flush=True,
                )
            if args.save_embeddings:
                folder = Path(args.save_embeddings)
                folder.mkdir(parents=True, exist_ok=True)
                named = {(k or arm).replace("/", "_"): v for k, v in embeddings.items()}
                extra = {} if batch is None else {"batch": batch}
                np.savez(folder / f"{dataset}_{arm}.npz", labels=labels, **extra, **named)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
