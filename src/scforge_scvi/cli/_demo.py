"""`scforge demo`: pretrain a small model on data that ships with scanpy, embed, plot."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

#: the demo's model, measured in docs/benchmarks_embedding.md, which
#: ``benchmarks/embedding.py`` reads from here
DEMO_MODEL_KWARGS = {
    "tokenizer": "rank_value",
    "max_genes": 256,
    "hidden_dim": 64,
    "num_layers": 2,
    "num_heads": 4,
    "dropout": 0.1,
    "pooling": "mean",  # masked-gene pretraining trains every token, not <cls>
    # both lift the embedding's 15-NN accuracy of bulk_labels (docs/benchmarks_embedding.md)
    "architecture": {"gene_embedding_init": "pca"},
    "cell_expression_weight": 1.0,
}
#: the demo's training (beside ``max_epochs`` and ``seed``)
DEMO_TRAIN_KWARGS = {"batch_size": 32, "plan_kwargs": {"lr": 1e-3, "warmup_steps": 20}}


def knn_accuracy(embedding: np.ndarray, labels: np.ndarray, k: int = 15) -> float:
    """Held-out kNN classification accuracy of an embedding (5-fold cross-validation)."""
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    return float(cross_val_score(KNeighborsClassifier(k), embedding, labels, cv=5).mean())


def pca_embedding(adata, n_comps: int = 50, seed: int = 0) -> np.ndarray:
    """PCA of log-normalised highly variable genes of raw counts (scanpy's standard recipe).

    ``normalize_total(1e4)``, ``log1p``, ``highly_variable_genes(n_top_genes=2000)`` (every
    gene but one when there are fewer), ``scale(max_value=10)``, ``pca(n_comps)``; ``adata``
    is left unchanged.
    """
    import scanpy as sc

    logn = adata.copy()
    sc.pp.normalize_total(logn, target_sum=1e4)
    sc.pp.log1p(logn)
    sc.pp.highly_variable_genes(logn, n_top_genes=min(2000, adata.n_vars - 1))
    logn = logn[:, logn.var["highly_variable"].to_numpy()].copy()
    sc.pp.scale(logn, max_value=10)
    sc.tl.pca(logn, n_comps=n_comps, random_state=seed)
    return logn.obsm["X_pca"]


def run_demo(
    output: Path,
    *,
    max_epochs: int = 8,
    hidden_dim: int = DEMO_MODEL_KWARGS["hidden_dim"],
    num_layers: int = DEMO_MODEL_KWARGS["num_layers"],
    max_genes: int = DEMO_MODEL_KWARGS["max_genes"],
    seed: int = 0,
) -> dict:
    """Pretrain on pbmc68k_reduced, write embeddings (.h5ad) and UMAPs (.png) to ``output``.

    The figure has two panels: the UMAP of ``X_scforge`` beside the UMAP of 50 principal
    components of the same cells (:func:`pca_embedding`); both embeddings' 15-NN accuracy of
    ``bulk_labels`` is printed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    from scforge_scvi import ScForge
    from scforge_scvi.data import pbmc68k_counts

    start = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    adata = pbmc68k_counts()
    print(f"Data: pbmc68k_reduced, {adata.n_obs} cells x {adata.n_vars} genes (raw counts).")
    ScForge.setup_anndata(adata, layer="counts")
    shape = {"hidden_dim": hidden_dim, "num_layers": num_layers, "max_genes": max_genes}
    model = ScForge(adata, **{**DEMO_MODEL_KWARGS, **shape})
    print(model)
    model.train(
        max_epochs=max_epochs,
        seed=seed,
        checkpoint_dir=str(output / "checkpoints"),
        **DEMO_TRAIN_KWARGS,
    )
    model.save_pretrained(str(output / "best"))
    model.embed()

    adata.obsm["X_pca"] = pca_embedding(adata, seed=seed)
    sc.pp.neighbors(adata, use_rep="X_pca")
    sc.tl.umap(adata, random_state=seed)
    adata.obsm["X_umap_pca"] = adata.obsm.pop("X_umap")
    sc.pp.neighbors(adata, use_rep="X_scforge")
    sc.tl.umap(adata, random_state=seed)
    h5ad = output / "pbmc68k_scforge.h5ad"
    adata.write_h5ad(h5ad)

    labels = adata.obs["bulk_labels"].astype(str).to_numpy()
    acc = knn_accuracy(adata.obsm["X_scforge"], labels)
    pca_acc = knn_accuracy(adata.obsm["X_pca"], labels)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    sc.pl.umap(
        adata,
        color="bulk_labels",
        ax=left,
        show=False,
        legend_loc="none",
        title=f"scforge embedding (15-NN accuracy {acc:.2f})",
    )
    sc.pl.embedding(
        adata,
        basis="umap_pca",
        color="bulk_labels",
        ax=right,
        show=False,
        title=f"PCA, 50 components (15-NN accuracy {pca_acc:.2f})",
    )
    png = output / "umap_bulk_labels.png"
    fig.savefig(png, dpi=120, bbox_inches="tight")
    panels = len([ax for ax in fig.axes if ax.get_title()])
    plt.close(fig)
    chance = float(adata.obs["bulk_labels"].value_counts(normalize=True).max())
    elapsed = time.perf_counter() - start
    val = model.history["val_loss"].to_numpy().ravel()
    print()
    print(f"Validation masked-gene loss: {val[0]:.3f} (epoch 1) -> {val.min():.3f} (best)")
    print(f"Embeddings:     {h5ad} (obsm['X_scforge'])")
    print(f"UMAP:           {png}")
    print(f"Pretrained:     {output / 'best'}")
    print(
        f"Quality: 15-NN accuracy of bulk_labels on the embedding = {acc:.3f}, "
        f"on 50 PCs of log-normalised HVGs = {pca_acc:.3f} "
        f"(majority class {chance:.3f}); finished in {elapsed:.0f} s."
    )
    return {
        "knn_accuracy": acc,
        "pca_knn_accuracy": pca_acc,
        "majority": chance,
        "seconds": elapsed,
        "h5ad": str(h5ad),
        "png": str(png),
        "umap_panels": panels,
    }
