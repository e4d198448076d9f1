"""`scforge demo`: pretrain a small model on data that ships with scanpy, embed, plot."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def knn_accuracy(embedding: np.ndarray, labels: np.ndarray, k: int = 15) -> float:
    """Held-out kNN classification accuracy of an embedding (5-fold cross-validation)."""
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    return float(cross_val_score(KNeighborsClassifier(k), embedding, labels, cv=5).mean())


def run_demo(
    output: Path,
    *,
    max_epochs: int = 8,
    hidden_dim: int = 64,
    num_layers: int = 2,
    max_genes: int = 256,
    seed: int = 0,
) -> dict:
    """Pretrain on pbmc68k_reduced, write embeddings (.h5ad) and a UMAP (.png) to ``output``."""
    import matplotlib

    matplotlib.use("Agg")
    import scanpy as sc

    from scforge_scvi import ScForge
    from scforge_scvi.data import pbmc68k_counts

    start = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    adata = pbmc68k_counts()
    print(f"Data: pbmc68k_reduced, {adata.n_obs} cells x {adata.n_vars} genes (raw counts).")
    ScForge.setup_anndata(adata, layer="counts")
    model = ScForge(
        adata,
        tokenizer="rank_value",
        max_genes=max_genes,
        hidden_dim=hidden_dim,
        num_layers=num_layers,
        num_heads=4,
        dropout=0.1,
        pooling="mean",  # masked-gene pretraining trains every token, not <cls>
    )
    print(model)
    model.train(
        max_epochs=max_epochs,
        batch_size=32,
        lr=1e-3,
        warmup_steps=20,
        seed=seed,
        checkpoint_dir=str(output / "checkpoints"),
    )
    model.save_pretrained(str(output / "best"))
    model.embed()

    sc.pp.neighbors(adata, use_rep="X_scforge")
    sc.tl.umap(adata, random_state=seed)
    h5ad = output / "pbmc68k_scforge.h5ad"
    adata.write_h5ad(h5ad)
    ax = sc.pl.umap(adata, color="bulk_labels", show=False, title="scforge embedding (bulk_labels)")
    png = output / "umap_bulk_labels.png"
    ax.figure.savefig(png, dpi=120, bbox_inches="tight")

    labels = adata.obs["bulk_labels"].astype(str).to_numpy()
    acc = knn_accuracy(adata.obsm["X_scforge"], labels)
    chance = float(adata.obs["bulk_labels"].value_counts(normalize=True).max())
    elapsed = time.perf_counter() - start
    val = model.history["val_loss"].to_numpy().ravel()
    print()
    print(f"Validation masked-gene loss: {val[0]:.3f} (epoch 1) -> {val.min():.3f} (best)")
    print(f"Embeddings:     {h5ad} (obsm['X_scforge'])")
    print(f"UMAP:           {png}")
    print(f"Pretrained:     {output / 'best'}")
    print(
        f"Quality: 15-NN accuracy of bulk_labels on the embedding = {acc:.3f} "
        f"(majority class {chance:.3f}); finished in {elapsed:.0f} s."
    )
    return {"knn_accuracy": acc, "majority": chance, "seconds": elapsed, "h5ad": str(h5ad)}
