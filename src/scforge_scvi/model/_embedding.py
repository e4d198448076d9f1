"""Cell and gene embeddings of :class:`~scforge_scvi.ScForge`: what the backbone's states
and token embeddings give back to ``adata.obsm`` and to users' feature tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from scforge_scvi._errors import ScForgeValueError
from scforge_scvi._logging import logger
from scforge_scvi.data import StreamedCells

from ._constants import SCFORGE_OUTPUT_KEYS as OUT

#: cell-embedding normalisations (``embed(normalize=...)``)
NORMALIZATIONS = ("none", "l2", "standardize")


def normalize_embedding(embedding: np.ndarray, how: str) -> np.ndarray:
    """Normalise cell embeddings: ``"none"``, ``"l2"`` (rows) or ``"standardize"`` (columns).

    Parameters
    ----------
    embedding
        ``(n_cells, n_dims)``.
    how
        One of ``"none"``, ``"l2"`` (each row to unit length) and ``"standardize"`` (each
        column to mean 0, variance 1 over the rows; constant columns become 0).

    Returns
    -------
    The normalised float32 array (the input itself for ``"none"``).
    """
    if how not in NORMALIZATIONS:
        raise ScForgeValueError(f"normalize={how!r}: use one of {NORMALIZATIONS}.")
    if how == "none":
        return embedding
    x = embedding.astype(np.float64)
    if how == "l2":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    else:
        std = x.std(axis=0)
        x = (x - x.mean(axis=0)) / np.where(std > 1e-12, std, 1.0)
    return x.astype(np.float32)


class EmbeddingMixin:
    """:meth:`get_latent_representation`, :meth:`embed` and :meth:`gene_embeddings`."""

    def gene_embeddings(self, genes: Sequence[str] | None = None) -> pd.DataFrame:
        """The backbone's gene token embeddings, one row per gene.

        These are the learned vectors the backbone adds up for each gene token before the
        transformer layers (``backbone.gene_embedding``), e.g. a feature table of target
        genes for :class:`~scforge_scvi.ScForgePerturb` (``perturbation_features``).

        Parameters
        ----------
        genes
            Genes to return, in this order: gene ids (version ignored) or symbols of the
            model's vocabulary (default: every vocabulary gene, in token order).

        Returns
        -------
        DataFrame of shape ``(n_genes, hidden_dim)`` (float32), indexed by gene name (the
        names asked for, or the vocabulary's primary identifiers), columns ``dim0, dim1, ...``.

        Raises
        ------
        KeyError
            If a gene is not in the model's vocabulary.
        """
        if genes is None:
            names = self.vocab.genes
            ids = self.vocab.gene_ids
        else:
            names = [str(g) for g in genes]
            ids = np.asarray([self.vocab.token_to_id(g) for g in names], dtype=np.int64)
            special = [g for g, i in zip(names, ids, strict=True) if i < self.vocab.n_special]
            if special:
                raise ScForgeValueError(f"{special} are special tokens, not genes.")
        weight = self.module.backbone.gene_embedding.weight.detach()
        values = weight[torch.as_tensor(ids, dtype=torch.long)].float().cpu().numpy()
        return pd.DataFrame(
            values,
            index=pd.Index(names, dtype=object),
            columns=[f"dim{i}" for i in range(values.shape[1])],
        )

    def get_latent_representation(
        self,
        adata: AnnData | StreamedCells | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        *,
        layers: int | Sequence[int] | None = None,
        pooling: str | None = None,
        normalize: str = "none",
    ) -> np.ndarray:
        """Cell embeddings (pooled backbone output), ``(n_cells, hidden_dim)``.

        Parameters
        ----------
        adata
            AnnData with the same setup (``None``: the model's). Its genes may be in any order
            or a subset: they are mapped through the model's vocabulary. A
            :class:`~scforge_scvi.data.StreamedCells` is read from disk in chunks; rows come
            back in shard order.
        indices
            Cells to embed (default all).
        batch_size
            Minibatch size (default 64).
        layers
            Which token states are pooled. ``None`` (default): the final hidden states. An
            integer ``k``: ``0`` the summed input embeddings, ``1 .. num_layers - 1`` the
            output of that block, ``num_layers`` (or ``-1``) the final hidden states. A
            sequence of them: each pooled, concatenated in that order
            (``len(layers) * hidden_dim`` columns).
        pooling
            ``"mean"`` (over the real tokens, ``<cls>`` included) or ``"cls"`` (the ``<cls>``
            state; needs ``prepend_cls=True``). ``None``: the model's own ``pooling``.
        normalize
            ``"none"`` (default); ``"l2"``: each cell scaled to unit length;
            ``"standardize"``: each column centred and scaled to unit variance over the cells
            embedded together (so a cell's embedding depends on the other cells passed).

        Returns
        -------
        ``(n_cells, n_columns)`` float32 array.
        """
        if not isinstance(adata, StreamedCells):
            adata = self._validate_anndata(adata)
        if layers is None and pooling is None:
            fn = lambda out: out["embedding"]  # noqa: E731
        else:
            fn = self._pooled_layers(layers, pooling)
        embedding = self._infer(
            adata, indices, batch_size, fn, output_layer_states=layers is not None
        ).numpy()
        return normalize_embedding(embedding, normalize)

    def _pooled_layers(self, layers, pooling):
        """``fn(inference outputs)`` pooling the requested layers' token states."""
        n_layers = self.module.config.num_layers
        pooling = self.module.config.pooling if pooling is None else pooling
        if pooling not in ("mean", "cls"):
            raise ScForgeValueError(f"pooling={pooling!r}: use 'mean' or 'cls'.")
        if pooling == "cls" and not self.tokenizer.prepend_cls:
            raise ScForgeValueError("pooling='cls' needs a model tokenised with prepend_cls=True.")
        if layers is None:
            chosen = [n_layers]
        else:
            chosen = [layers] if isinstance(layers, (int, np.integer)) else list(layers)
            if not chosen:
                raise ScForgeValueError("layers=[]: name at least one layer.")
            for layer in chosen:
                if isinstance(layer, bool) or not -1 <= int(layer) <= n_layers:
                    raise ScForgeValueError(
                        f"layers={layers!r}: each layer must be an integer in "
                        f"[0, {n_layers}] (or -1 for the last) for this {n_layers}-layer model."
                    )
            chosen = [n_layers if int(k) == -1 else int(k) for k in chosen]
        backbone = self.module.backbone

        def fn(out: dict[str, Any]) -> torch.Tensor:
            states = out.get("layer_states")
            mask = out.get("padding_mask", out["tokens"].padding_mask)
            pooled = []
            for k in chosen:
                hidden = out["hidden"] if k == n_layers else states[k]
                pooled.append(backbone.pool(hidden, mask, pooling))
            return torch.cat(pooled, dim=-1)

        return fn

    def embed(
        self,
        adata: AnnData | None = None,
        *,
        key_added: str = OUT.EMBEDDING,
        batch_size: int | None = None,
        layers: int | Sequence[int] | None = None,
        pooling: str | None = None,
        normalize: str = "none",
    ) -> None:
        """Write cell embeddings into ``adata.obsm[key_added]`` (default ``"X_scforge"``).

        Then ``sc.pp.neighbors(adata, use_rep="X_scforge")`` and ``sc.tl.umap(adata)`` work
        as usual. Parameters are recorded in ``adata.uns["scforge"]["embed"]``.

        Parameters
        ----------
        adata
            AnnData with the same setup (``None``: the model's).
        key_added
            Key of ``adata.obsm`` for the embedding.
        batch_size
            Minibatch size (default 64).
        layers, pooling, normalize
            As in :meth:`get_latent_representation`.
        """
        adata = self._validate_anndata(adata)
        adata.obsm[key_added] = self.get_latent_representation(
            adata, batch_size=batch_size, layers=layers, pooling=pooling, normalize=normalize
        )
        recorded_layers = layers if layers is None or isinstance(layers, int) else list(layers)
        self._record(
            adata,
            "embed",
            key_added=key_added,
            layers="last" if recorded_layers is None else recorded_layers,
            pooling=pooling or self.module.config.pooling,
            normalize=normalize,
        )
        logger.info(f"Added adata.obsm[{key_added!r}] ({adata.obsm[key_added].shape[1]} dims).")
