"""The masked-gene objective of ScForgeModule on tokenised PBMC cells.

The expression objective of the binned and continuous tokenizers: its weight is applied, its
targets are the hidden values, and it trains; the values of masked tokens never reach the
hidden states. The cell-level reconstruction: its targets are every gene's value in the cell,
masked genes included, and it trains.
"""

from __future__ import annotations

import pytest
import torch

from scforge_scvi.data import GeneVocab, MaskingConfig, build_tokenizer, fit_gene_medians
from scforge_scvi.model._module import ScForgeModule
from scforge_scvi.nn import BackboneConfig

STRATEGIES = {"binned_expression": "binned", "continuous": "continuous"}
N_BINS = 11
MASKING = MaskingConfig(mask_ratio=0.3)


@pytest.fixture(scope="module")
def vocab(_pbmc68k_counts_once) -> GeneVocab:
    adata = _pbmc68k_counts_once
    base = GeneVocab.from_adata(adata)
    return fit_gene_medians(adata.X, base.match(adata).vocab_ids, base)


def _tokens(adata, vocab, strategy: str, n_cells: int = 16):
    tokenizer = build_tokenizer(strategy, vocab, max_genes=48, n_bins=N_BINS)
    return tokenizer(adata.X[:n_cells], vocab.match(adata).vocab_ids)


def _module(vocab, encoding: str, weight: float = 1.0, cell_weight: float = 0.0) -> ScForgeModule:
    torch.manual_seed(0)
    config = BackboneConfig(
        vocab_size=len(vocab),
        hidden_dim=32,
        num_layers=1,
        num_heads=2,
        dropout=0.0,
        max_seq_len=49,
        value_encoding=encoding,
        n_bins=N_BINS,
        use_positions=False,
    )
    return ScForgeModule(
        config,
        n_special=vocab.n_special,
        mask_id=vocab.mask_id,
        expression_loss_weight=weight,
        cell_expression_weight=cell_weight,
    )


def _objective(module, tokens, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    out = module.inference(tokens, masking=MASKING, generator=generator)
    return out, module.loss({}, out, {}, objective="pretrain")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_expression_loss_is_added_with_its_weight(pbmc68k_counts, vocab, strategy):
    tokens = _tokens(pbmc68k_counts, vocab, strategy)
    module = _module(vocab, STRATEGIES[strategy]).eval()
    with torch.no_grad():
        _, full = _objective(module, tokens)
        module.expression_loss_weight = 0.25
        _, quarter = _objective(module, tokens)
        module.expression_loss_weight = 0.0
        _, off = _objective(module, tokens)
    gene, expression = full.extra_metrics["gene_loss"], full.extra_metrics["expression_loss"]
    assert expression > 0
    torch.testing.assert_close(full.loss, gene + expression)
    torch.testing.assert_close(quarter.loss, gene + 0.25 * expression)
    torch.testing.assert_close(off.loss, gene)
    assert "expression_loss" not in off.extra_metrics


def test_rank_value_has_no_expression_objective(pbmc68k_counts, vocab):
    tokens = _tokens(pbmc68k_counts, vocab, "rank_value")
    module = _module(vocab, "none")
    assert module.expression_head is None
    _, out = _objective(module, tokens)
    assert set(out.extra_metrics) == {"gene_loss"}
    torch.testing.assert_close(out.loss, out.extra_metrics["gene_loss"])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_masked_values_are_targets_and_never_inputs(pbmc68k_counts, vocab, strategy):
    tokens = _tokens(pbmc68k_counts, vocab, strategy)
    module = _module(vocab, STRATEGIES[strategy]).eval()
    with torch.no_grad():
        out, loss = _objective(module, tokens)
        target = out["masked"].target_mask
        # other values at exactly the masked positions (the same masks: same seed)
        changed = tokens.values.clone()
        if strategy == "binned_expression":
            changed[target] = (changed[target] % (N_BINS - 1)) + 1
        else:
            changed[target] = changed[target] + 1.5
        tokens.values = changed
        out_changed, loss_changed = _objective(module, tokens)
    assert torch.equal(out_changed["masked"].target_mask, target)
    # the hidden value cannot leak into the model's input ...
    torch.testing.assert_close(out_changed["hidden"], out["hidden"], rtol=0, atol=0)
    torch.testing.assert_close(
        loss_changed.extra_metrics["gene_loss"], loss.extra_metrics["gene_loss"]
    )
    # ... but it is what the expression head is scored against
    assert not torch.isclose(
        loss_changed.extra_metrics["expression_loss"], loss.extra_metrics["expression_loss"]
    )


def _train_on_one_batch(module, tokens, metric: str, steps: int = 15) -> list[float]:
    """``metric`` at each of ``steps`` Adam steps on one fixed batch with fixed masks."""
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        _, out = _objective(module, tokens)
        losses.append(float(out.extra_metrics[metric]))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    return losses


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_expression_objective_trains(pbmc68k_counts, vocab, strategy):
    tokens = _tokens(pbmc68k_counts, vocab, strategy)
    module = _module(vocab, STRATEGIES[strategy])
    losses = _train_on_one_batch(module, tokens, "expression_loss")
    assert losses[-1] < 0.7 * losses[0]


def test_token_dropout_hides_gene_tokens_but_never_cls(pbmc68k_counts, vocab):
    tokens = _tokens(pbmc68k_counts, vocab, "binned_expression")
    module = _module(vocab, "binned").eval()
    plain = module.inference(tokens)["embedding"]
    rate = 0.4
    out = module.inference(tokens, token_dropout=rate, generator=torch.Generator().manual_seed(3))
    again = module.inference(tokens, token_dropout=rate, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out["embedding"], again["embedding"])  # seeded: reproducible
    assert not torch.allclose(out["embedding"], plain)
    # the same draw, applied by hand: the dropped genes act exactly like padding
    draw = torch.rand(tokens.gene_ids.shape, generator=torch.Generator().manual_seed(3))
    special = tokens.gene_ids < vocab.n_special
    kept = tokens.padding_mask & ((draw >= rate) | special)
    assert kept[:, 0].all()  # CLS is never dropped
    genes = tokens.padding_mask & ~special
    dropped = (genes & ~kept).sum() / genes.sum()
    assert 0.3 < float(dropped) < 0.5
    by_hand = module.backbone(tokens.gene_ids, kept, tokens.values).cell_embedding
    torch.testing.assert_close(out["embedding"], by_hand)


def _cell_targets_by_hand(tokens, vocab, strategy: str) -> torch.Tensor:
    """Each cell's value of every vocabulary gene (0 where absent), cell by cell.

    Rank tokens: the gene's rank, 1 for the cell's first gene and ``1/T`` less for each next
    one, ``T`` the padded length of the minibatch.
    """
    target = torch.zeros(tokens.gene_ids.shape[0], len(vocab))
    padded_length = tokens.gene_ids.shape[1]
    for cell in range(tokens.gene_ids.shape[0]):
        rank = 0  # the cell's genes in token order: its first gene 1, each next 1/T less
        for slot, gene in enumerate(tokens.gene_ids[cell].tolist()):
            if not tokens.padding_mask[cell, slot] or gene < vocab.n_special:
                continue
            if strategy == "rank_value":
                target[cell, gene] = 1.0 - rank / padded_length
                rank += 1
            elif strategy == "binned_expression":
                target[cell, gene] = tokens.values[cell, slot] / (N_BINS - 1)
            else:
                target[cell, gene] = tokens.values[cell, slot]
    return target[:, vocab.n_special :]


@pytest.mark.parametrize("strategy", [*STRATEGIES, "rank_value"])
def test_cell_expression_loss_scores_every_gene_of_the_cell(pbmc68k_counts, vocab, strategy):
    tokens = _tokens(pbmc68k_counts, vocab, strategy)
    encoding = STRATEGIES.get(strategy, "none")
    module = _module(vocab, encoding, cell_weight=2.0).eval()
    with torch.no_grad():
        out, loss = _objective(module, tokens)
        pred = module.cell_expression_head(out["embedding"])[:, vocab.n_special :]
    target = _cell_targets_by_hand(tokens, vocab, strategy)
    expected = ((pred - target) ** 2).mean() / target.var()
    cell = loss.extra_metrics["cell_expression_loss"]
    torch.testing.assert_close(cell, expected)
    others = loss.extra_metrics["gene_loss"] + loss.extra_metrics.get("expression_loss", 0.0)
    torch.testing.assert_close(loss.loss, others + 2.0 * cell)
    # the targets above are the unmasked values: genes the mask hid are scored too
    assert out["masked"].target_mask.any()


def test_cell_expression_objective_trains_and_is_off_by_zero_weight(pbmc68k_counts, vocab):
    tokens = _tokens(pbmc68k_counts, vocab, "binned_expression")
    assert _module(vocab, "binned").cell_expression_head is None
    module = _module(vocab, "binned", cell_weight=1.0)
    losses = _train_on_one_batch(module, tokens, "cell_expression_loss")
    assert losses[-1] < 0.7 * losses[0]
