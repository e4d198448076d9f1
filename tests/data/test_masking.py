"""Masked-gene selection on tokenised PBMC cells: seeding, special tokens and proportions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scforge_scvi.data import (
    GeneVocab,
    MaskingConfig,
    TokenizedBatch,
    build_tokenizer,
    fit_gene_medians,
    mask_tokens,
)


@pytest.fixture
def vocab(pbmc68k_counts) -> GeneVocab:
    base = GeneVocab.from_adata(pbmc68k_counts)
    return fit_gene_medians(pbmc68k_counts.X, base.match(pbmc68k_counts).vocab_ids, base)


@pytest.fixture
def batch(pbmc68k_counts, vocab) -> TokenizedBatch:
    """All 700 cells (about 150,000 gene tokens), continuous values."""
    tokenizer = build_tokenizer("continuous", vocab)
    return tokenizer(pbmc68k_counts.X, vocab.match(pbmc68k_counts).vocab_ids)


def _mask(batch, vocab, config=None, seed=None):
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return mask_tokens(
        batch,
        config or MaskingConfig(),
        vocab_size=len(vocab),
        n_special=vocab.n_special,
        mask_id=vocab.mask_id,
        generator=generator,
    )


def test_same_seed_same_masks_other_seed_other_masks(batch, vocab):
    first, again, other = (_mask(batch, vocab, seed=s) for s in (0, 0, 1))
    assert torch.equal(first.target_mask, again.target_mask)
    assert torch.equal(first.gene_ids, again.gene_ids)
    assert not torch.equal(first.target_mask, other.target_mask)


def test_special_tokens_and_padding_are_never_selected(batch, vocab):
    masked = _mask(batch, vocab, MaskingConfig(mask_ratio=0.9), seed=0)
    special = batch.gene_ids < vocab.n_special
    assert not (masked.target_mask & special).any()
    assert not (masked.target_mask & ~batch.padding_mask).any()
    # unselected tokens are untouched: <cls> and padding stay as they were
    unselected = ~masked.target_mask
    assert torch.equal(masked.gene_ids[unselected], batch.gene_ids[unselected])


def test_random_replacements_are_gene_tokens(batch, vocab):
    config = MaskingConfig(mask_ratio=0.5, random_replace_ratio=0.5, keep_ratio=0.0)
    masked = _mask(batch, vocab, config, seed=0)
    new = masked.gene_ids[masked.target_mask]
    replaced = new[new != vocab.mask_id]
    assert replaced.numel() > 10_000
    assert (replaced >= vocab.n_special).all() and (replaced < len(vocab)).all()


def test_targets_are_the_original_tokens(batch, vocab):
    masked = _mask(batch, vocab, seed=3)
    assert torch.equal(masked.target_ids, batch.gene_ids[masked.target_mask])
    assert torch.equal(masked.target_values, batch.values[masked.target_mask])
    assert masked.target_ids.shape == (int(masked.target_mask.sum()),)


def test_selected_fraction_and_action_proportions(batch, vocab):
    config = MaskingConfig(mask_ratio=0.15, random_replace_ratio=0.1, keep_ratio=0.1)
    masked = _mask(batch, vocab, config, seed=0)
    maskable = batch.padding_mask & (batch.gene_ids >= vocab.n_special)
    selected = masked.target_mask
    assert maskable.sum() > 100_000
    assert abs(selected.sum() / maskable.sum() - 0.15) < 0.005

    new, old = masked.gene_ids[selected], batch.gene_ids[selected]
    n = selected.sum()
    to_mask = (new == vocab.mask_id).sum() / n
    kept = (new == old).sum() / n
    replaced = ((new != vocab.mask_id) & (new != old)).sum() / n
    # a random replacement draws the original gene again with probability 1 / n_genes
    assert abs(to_mask - 0.8) < 0.01
    assert abs(kept - 0.1) < 0.01
    assert abs(replaced - 0.1) < 0.01


def test_every_non_empty_cell_has_a_target(pbmc68k_counts, vocab):
    # short cells and a tiny mask ratio: most cells would get no target by chance alone
    tokenizer = build_tokenizer("rank_value", vocab, max_genes=3)
    x = pbmc68k_counts.X[:200].tolil()
    x[5, :] = 0  # an empty cell: <cls> only
    batch = tokenizer(x.tocsr(), vocab.match(pbmc68k_counts).vocab_ids)
    for ratio in (0.0, 0.01):
        masked = _mask(batch, vocab, MaskingConfig(mask_ratio=ratio), seed=0)
        per_cell = masked.target_mask.sum(1)
        assert per_cell[5] == 0
        assert (np.delete(per_cell.numpy(), 5) >= 1).all()
        if ratio == 0.0:  # exactly the one guaranteed target
            assert (np.delete(per_cell.numpy(), 5) == 1).all()


def test_masking_config_validation():
    with pytest.raises(ValueError, match="mask_ratio"):
        MaskingConfig(mask_ratio=1.5)
    with pytest.raises(ValueError, match=r"random_replace_ratio \(0.6\) \+ keep_ratio \(0.6\)"):
        MaskingConfig(random_replace_ratio=0.6, keep_ratio=0.6)
