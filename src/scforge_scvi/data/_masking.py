"""BERT-style masking of gene tokens for masked-gene pretraining."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scforge_scvi._settings import MaskingConfig  # the settings; data re-exports them

from ._tokenizers import TokenizedBatch


@dataclass
class MaskedBatch:
    """Model input after masking, with the prediction targets.

    Attributes
    ----------
    gene_ids
        ``(B, L)`` input gene ids (selected tokens replaced by ``<mask>`` or a random gene).
    target_mask
        ``(B, L)`` bool, ``True`` at the selected positions: the loss is computed there, and
        the expression value is hidden there whatever happened to the gene token.
    target_ids
        ``(M,)`` original gene ids at the selected positions, ``M = target_mask.sum()``.
    target_values
        ``(M,)`` original expression values there, or ``None``.
    """

    gene_ids: torch.Tensor
    target_mask: torch.Tensor
    target_ids: torch.Tensor
    target_values: torch.Tensor | None


def mask_tokens(
    batch: TokenizedBatch,
    config: MaskingConfig,
    *,
    vocab_size: int,
    n_special: int,
    mask_id: int,
    generator: torch.Generator | None = None,
) -> MaskedBatch:
    """Select and corrupt tokens for masked-gene modelling.

    Special tokens (``<cls>``, ``<pad>``) are never selected and random replacements are always
    gene tokens. Random numbers are drawn on the CPU from ``generator`` (then moved to the
    batch's device), so a seeded generator gives identical masks on any device; every cell with
    at least one gene token gets at least one selected token.
    """
    ids = batch.gene_ids
    maskable = batch.padding_mask & (ids >= n_special)
    shape = ids.shape
    u_select = torch.rand(shape, generator=generator).to(ids.device)
    u_action = torch.rand(shape, generator=generator).to(ids.device)
    random_genes = torch.randint(n_special, vocab_size, shape, generator=generator).to(ids.device)

    selected = maskable & (u_select < config.mask_ratio)
    # guarantee one target per non-empty cell: the maskable token with the smallest draw
    forced = torch.where(maskable, u_select, torch.full_like(u_select, 2.0)).argmin(dim=1)
    none_yet = maskable.any(1) & ~selected.any(1)
    selected[none_yet, forced[none_yet]] = True

    replace_random = selected & (u_action < config.random_replace_ratio)
    keep = selected & ~replace_random & (u_action < config.random_replace_ratio + config.keep_ratio)
    to_mask = selected & ~replace_random & ~keep

    gene_ids = ids.clone()
    gene_ids[to_mask] = mask_id
    gene_ids[replace_random] = random_genes[replace_random]
    values = batch.values
    return MaskedBatch(
        gene_ids=gene_ids,
        target_mask=selected,
        target_ids=ids[selected],
        target_values=None if values is None else values[selected],
    )
