"""BERT-style masking of gene tokens for masked-gene pretraining."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ._tokenizers import TokenizedBatch


@dataclass(frozen=True)
class MaskingConfig:
    """Which tokens are hidden, and how.

    Parameters
    ----------
    mask_ratio
        Fraction of a cell's gene tokens selected as prediction targets.
    random_replace_ratio
        Of the selected tokens, the fraction replaced by a random gene token.
    keep_ratio
        Of the selected tokens, the fraction left unchanged. The rest become ``<mask>``.
        Whatever happens to the gene token, the expression value of every selected token is
        hidden, so the target never leaks into the input.
    """

    mask_ratio: float = 0.15
    random_replace_ratio: float = 0.1
    keep_ratio: float = 0.1

    def __post_init__(self) -> None:
        for name in ("mask_ratio", "random_replace_ratio", "keep_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"masking.{name} must be in [0, 1], got {value}.")
        if self.random_replace_ratio + self.keep_ratio > 1.0:
            raise ValueError(
                "masking.random_replace_ratio + masking.keep_ratio must be <= 1, got "
                f"{self.random_replace_ratio} + {self.keep_ratio}."
            )

    def to_dict(self) -> dict[str, Any]:
        """The three ratios as a JSON-serialisable dict."""
        return asdict(self)


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
