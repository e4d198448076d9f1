"""Helpers shared by test modules (importable because ``tests/`` has a conftest.py)."""

from __future__ import annotations

from scforge_scvi import ScForge


def setup_counts(adata):
    """Register ``adata`` afresh with raw counts in ``layers["counts"]``.

    A copy inherits its parent's scvi-tools identity; dropping it gives the copy its own setup.
    """
    for key in ("_scvi_uuid", "_scvi_manager_uuid"):
        adata.uns.pop(key, None)
    ScForge.setup_anndata(adata, layer="counts")
    return adata


def write_geneformer_dir(
    path,
    genes,
    medians,
    *,
    version: str = "V2",
    hidden_act: str = "gelu",
    max_position_embeddings: int = 80,
    seed: int = 0,
    weights: str = "safetensors",
):
    """Write a tiny random Geneformer-like model directory, as Geneformer releases it.

    A ``BertForMaskedLM`` built by ``transformers`` (hidden 32, 2 layers, 2 heads,
    intermediate 64) with every weight perturbed away from its initial value (so biases and
    LayerNorms are exercised), saved with ``save_pretrained``, plus the two pickled
    dictionaries: token ids in a shuffled gene order (so scforge must permute them), V2 with
    ``<pad>, <mask>, <cls>, <eos>`` and V1 with ``<pad>, <mask>``; medians as numpy float64.

    Returns
    -------
    ``(model, token_dictionary)``: the ``transformers`` model in eval mode and its tokens.
    """
    import pickle
    from pathlib import Path

    import numpy as np
    import torch
    from transformers import BertConfig, BertForMaskedLM

    path = Path(path)
    rng = np.random.default_rng(seed)
    specials = ["<pad>", "<mask>", "<cls>", "<eos>"] if version == "V2" else ["<pad>", "<mask>"]
    tokens = {name: i for i, name in enumerate(specials)}
    order = rng.permutation(len(genes))
    tokens.update({str(genes[j]): len(specials) + i for i, j in enumerate(order)})
    config = BertConfig(
        vocab_size=len(tokens),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_position_embeddings,
        hidden_act=hidden_act,
        hidden_dropout_prob=0.02,
        attention_probs_dropout_prob=0.02,
        pad_token_id=0,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = BertForMaskedLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(path)
    if weights == "bin":  # the older release format
        (path / "model.safetensors").unlink()
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    suffix = "gc104M" if version == "V2" else "gc30M"
    with open(path / f"token_dictionary_{suffix}.pkl", "wb") as f:
        pickle.dump(tokens, f)
    with open(path / f"gene_median_dictionary_{suffix}.pkl", "wb") as f:
        pickle.dump({str(g): np.float64(m) for g, m in zip(genes, medians)}, f)
    return model, tokens


# Perturbation screens of the tests (``make_screen`` in tests/conftest.py)
PERT, CONTROL, CELL_TYPE = "target_gene", "non-targeting", "bulk_labels"
PERTURB_TINY = {
    "hidden_dim": 32,
    "num_layers": 1,
    "num_heads": 2,
    "encoder_hidden_dim": 64,
    "dropout": 0.0,
    "cell_set_len": 16,
}


def split_screen(screen):
    """``(training cells, held-out mask, split)`` of a screen with ``obs["split"]``: every cell
    but the test perturbations' (unused categories dropped, ready to register), the test
    perturbations' cells with the controls, and the split as strings."""
    split = screen.obs["split"].astype(str).to_numpy()
    data = screen[split != "test"].copy()
    data.obs[PERT] = data.obs[PERT].cat.remove_unused_categories()
    held_out = (split == "test") | (screen.obs[PERT] == CONTROL).to_numpy()
    return data, held_out, split


QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "logger": None}
