"""``ScForgeCellEncoder``: a pretrained ScForge backbone as ``ScForgePerturb``'s basal encoder."""

from __future__ import annotations

import copy
from typing import Any

import anndata as ad
import numpy as np
import torch
from scvi.model.base import BaseModelClass
from torch import nn

from scforge_scvi._logging import logger

BASAL_INPUTS = ("log1p", "counts")


class ScForgeCellEncoder(nn.Module):
    """A ScForge backbone as the basal encoder of :class:`~scforge_scvi.ScForgePerturb`.

    Tokenises raw counts of the perturbation AnnData's genes with the ScForge model's own
    tokenizer and returns the backbone's cell embeddings, so that the basal cells enter the set
    model through the pretrained representation while the prediction stays in gene space.
    Tokenisation runs on the CPU; the backbone's weights are trained (or frozen) with the rest
    of the set model's backbone.

    Parameters
    ----------
    backbone
        A :class:`~scforge_scvi.nn.ScForgeBackbone`, e.g. ``scforge_model.module.backbone``.
    tokenizer
        The tokenizer the backbone was trained with.
    gene_index
        ``(n_genes,)`` vocabulary id of each gene of the perturbation data, ``-1`` for genes
        outside the vocabulary.

    Examples
    --------
    >>> encoder = ScForgeCellEncoder.from_scforge(pretrained_scforge, adata)
    >>> model = ScForgePerturb(adata, basal_encoder=encoder, basal_input="counts")
    """

    #: what :class:`~scforge_scvi.ScForgePerturb` must pass to this encoder
    basal_input = "counts"

    def __init__(self, backbone: nn.Module, tokenizer: Any, gene_index: np.ndarray) -> None:
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.gene_index = np.asarray(gene_index, dtype=np.int64)
        self.output_dim = int(backbone.config.hidden_dim)

    @classmethod
    def from_scforge(
        cls, model: BaseModelClass, adata: ad.AnnData, *, gene_key: str | None = None
    ) -> ScForgeCellEncoder:
        """Wrap a copy of a (pretrained) ScForge model's backbone for the genes of ``adata``.

        Parameters
        ----------
        model
            A :class:`~scforge_scvi.ScForge` model; its backbone is copied, so fine-tuning the
            perturbation model leaves it unchanged.
        adata
            The perturbation AnnData (its genes, in order, are the encoder's input columns).
        gene_key
            ``adata.var`` column with the identifiers to match to the vocabulary (``None``:
            ``var_names``, see :meth:`~scforge_scvi.data.GeneVocab.match`).
        """
        match = model.vocab.match(adata, gene_key=gene_key, min_coverage=model.min_coverage)
        logger.info("Basal encoder genes: %s", match.summary())
        backbone = copy.deepcopy(model.module.backbone).cpu()
        return cls(backbone, model.tokenizer, match.vocab_ids)

    def forward(self, counts: torch.Tensor) -> torch.Tensor:  # (N, n_genes) -> (N, d)
        if counts.dim() != 2 or counts.shape[1] != len(self.gene_index):
            raise ValueError(
                f"ScForgeCellEncoder expects (N, {len(self.gene_index)}) raw counts, got "
                f"{tuple(counts.shape)}."
            )
        tokens = self.tokenizer(counts.detach().to("cpu", torch.float32), self.gene_index)
        device = next(self.backbone.parameters()).device
        values = None if tokens.values is None else tokens.values.to(device)
        out = self.backbone(tokens.gene_ids.to(device), tokens.padding_mask.to(device), values)
        return out.cell_embedding


def basal_width(encoder: nn.Module | None, basal_input: str, basal_dim: int | None) -> int | None:
    """Check what a basal encoder reads; return its output width (read from a
    :class:`ScForgeCellEncoder` when ``basal_dim`` is ``None``)."""
    if isinstance(encoder, ScForgeCellEncoder):
        if basal_input != encoder.basal_input:
            raise ValueError(
                "A ScForgeCellEncoder reads raw counts: pass basal_input='counts', got "
                f"{basal_input!r}."
            )
        if basal_dim is None:
            basal_dim = encoder.output_dim
    if basal_input not in BASAL_INPUTS:
        raise ValueError(f"basal_input must be one of {BASAL_INPUTS}, got {basal_input!r}.")
    if basal_input == "counts" and encoder is None:
        raise ValueError("basal_input='counts' needs a basal_encoder that reads counts.")
    return basal_dim
