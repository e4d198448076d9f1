"""``scforge demo``: the README's main job, run with a tiny model for speed."""

from __future__ import annotations

import contextlib
import io

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pytest

from scforge_scvi import ScForge
from scforge_scvi.cli import main
from scforge_scvi.cli._demo import run_demo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    output = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = run_demo(output, max_epochs=1, hidden_dim=16, num_layers=1, max_genes=32)
    return output, result, printed.getvalue()


def test_demo_writes_embeddings_umap_and_a_pretrained_model(demo):
    output, _, _ = demo
    adata = ad.read_h5ad(output / "pbmc68k_scforge.h5ad")
    assert adata.n_obs == 700
    assert adata.obsm["X_scforge"].shape == (700, 16)
    assert np.isfinite(adata.obsm["X_scforge"]).all()
    assert adata.obsm["X_umap"].shape == (700, 2)
    assert "bulk_labels" in adata.obs
    assert adata.obsm["X_pca"].shape == (700, 50)
    assert adata.obsm["X_umap_pca"].shape == (700, 2)
    assert (output / "umap_bulk_labels.png").read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]

    # the pretrained directory it points to reloads into the same embedding
    for key in ("_scvi_uuid", "_scvi_manager_uuid"):
        adata.uns.pop(key, None)
    ScForge.setup_anndata(adata, layer="counts")
    reloaded = ScForge.from_pretrained(str(output / "best"), adata)
    reloaded.embed(adata, key_added="X_reloaded")
    np.testing.assert_allclose(adata.obsm["X_reloaded"], adata.obsm["X_scforge"], atol=1e-5)


def test_demo_figure_puts_the_pca_umap_beside_the_scforge_umap(demo):
    output, result, _ = demo
    assert result["umap_panels"] == 2
    height, width = plt.imread(output / "umap_bulk_labels.png").shape[:2]
    assert width > 1.5 * height  # two panels side by side


def test_demo_prints_its_outputs_and_a_quality_figure(demo):
    output, result, printed = demo
    assert str(output / "pbmc68k_scforge.h5ad") in printed
    assert str(output / "umap_bulk_labels.png") in printed
    assert (
        f"15-NN accuracy of bulk_labels on the embedding = {result['knn_accuracy']:.3f}" in printed
    )
    assert f"on 50 PCs of log-normalised HVGs = {result['pca_knn_accuracy']:.3f}" in printed
    assert 0.0 < result["majority"] < 1.0
    assert 0.0 <= result["knn_accuracy"] <= 1.0
    assert 0.0 <= result["pca_knn_accuracy"] <= 1.0


def test_demo_is_a_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    assert "--output" in capsys.readouterr().out
