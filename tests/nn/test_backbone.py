import json

import pytest
import torch
from torch import nn

from scforge_scvi.nn import (
    BackboneConfig,
    ClassificationHead,
    ExpressionHead,
    MaskedGeneHead,
    RegressionHead,
    ScForgeBackbone,
)
from scforge_scvi.nn._backbone import FeedForward

VOCAB, N_BINS, HIDDEN = 40, 7, 16
ENCODINGS = ["none", "binned", "continuous"]


def _config(**overrides) -> BackboneConfig:
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_dim=HIDDEN,
        num_layers=2,
        num_heads=4,
        n_bins=N_BINS,
        max_seq_len=32,
    )
    return BackboneConfig(**{**kwargs, **overrides})


def _backbone(**overrides) -> ScForgeBackbone:
    torch.manual_seed(0)
    return ScForgeBackbone(_config(**overrides))


def _cells(lengths: list[int], encoding: str, seed: int = 0):
    """A padded batch: gene ids, padding mask and values matching ``encoding``."""
    gen = torch.Generator().manual_seed(seed)
    L = max(lengths)
    padding_mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    gene_ids = torch.randint(1, VOCAB, (len(lengths), L), generator=gen).masked_fill(
        ~padding_mask, 0
    )
    if encoding == "binned":
        values = torch.randint(0, N_BINS, gene_ids.shape, generator=gen).masked_fill(
            ~padding_mask, 0
        )
    elif encoding == "continuous":
        values = torch.rand(gene_ids.shape, generator=gen).masked_fill(~padding_mask, 0.0)
    else:
        values = None
    return gene_ids, padding_mask, values


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_forward_shapes_and_zero_padding(encoding, pooling):
    backbone = _backbone(value_encoding=encoding, pooling=pooling)
    gene_ids, padding_mask, values = _cells([5, 3, 8], encoding)
    out = backbone(gene_ids, padding_mask, values)
    assert out.hidden.shape == (3, 8, HIDDEN)
    assert out.cell_embedding.shape == (3, HIDDEN)
    assert torch.isfinite(out.hidden).all()
    assert (out.hidden[~padding_mask] == 0).all()


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_padding_invariance(encoding, pooling):
    """A cell gives the same states alone and batched with longer cells (fp32, atol 1e-5)."""
    backbone = _backbone(value_encoding=encoding, pooling=pooling).eval()
    lengths = [3, 9, 1, 6]
    gene_ids, padding_mask, values = _cells(lengths, encoding)
    value_mask = torch.zeros_like(padding_mask)
    value_mask[:, 0] = True  # one hidden value per cell, also at risk of leaking through padding
    if encoding == "none":
        value_mask = None
    with torch.no_grad():
        batched = backbone(gene_ids, padding_mask, values, value_mask)
        for i, n in enumerate(lengths):
            alone = backbone(
                gene_ids[i : i + 1, :n],
                padding_mask[i : i + 1, :n],
                None if values is None else values[i : i + 1, :n],
                None if value_mask is None else value_mask[i : i + 1, :n],
            )
            torch.testing.assert_close(batched.hidden[i, :n], alone.hidden[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(
                batched.cell_embedding[i], alone.cell_embedding[0], atol=1e-5, rtol=0
            )


def test_mean_pooling_is_masked_mean_over_real_tokens():
    backbone = _backbone(pooling="mean")
    hidden = torch.randn(2, 4, HIDDEN)
    padding_mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    pooled = backbone.pool(hidden, padding_mask)
    torch.testing.assert_close(pooled[0], hidden[0, :2].mean(0))
    torch.testing.assert_close(pooled[1], hidden[1].mean(0))


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("encoding", ["binned", "continuous"])
def test_values_are_used_and_value_mask_hides_them(encoding, scaled):
    backbone = _backbone(value_encoding=encoding, scaled_gene_embedding=scaled).eval()
    gene_ids, padding_mask, values = _cells([6, 6], encoding)
    other = _cells([6, 6], encoding, seed=1)[2]
    value_mask = torch.zeros_like(padding_mask)
    value_mask[:, 2:4] = True
    changed = values.clone()
    changed[value_mask] = other[value_mask]
    with torch.no_grad():
        # unmasked: the value at a position changes the output
        assert not torch.allclose(
            backbone(gene_ids, padding_mask, values).hidden,
            backbone(gene_ids, padding_mask, changed).hidden,
        )
        # masked: the hidden value cannot leak into the output
        torch.testing.assert_close(
            backbone(gene_ids, padding_mask, values, value_mask).hidden,
            backbone(gene_ids, padding_mask, changed, value_mask).hidden,
        )


def test_positions_make_order_matter():
    gene_ids, padding_mask, _ = _cells([6], "none")
    permuted = gene_ids[:, torch.tensor([3, 1, 5, 0, 2, 4])]
    for use_positions, order_matters in [(True, True), (False, False)]:
        backbone = _backbone(use_positions=use_positions, pooling="mean").eval()
        assert hasattr(backbone, "position_embedding") == use_positions
        with torch.no_grad():
            a = backbone(gene_ids, padding_mask).cell_embedding
            b = backbone(permuted, padding_mask).cell_embedding
        assert torch.allclose(a, b, atol=1e-5) != order_matters


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_gradients_reach_every_parameter(encoding):
    backbone = _backbone(value_encoding=encoding)
    head = MaskedGeneHead(HIDDEN, VOCAB, backbone.gene_embedding)
    gene_ids, padding_mask, values = _cells([7, 4, 5], encoding)
    value_mask = None
    masked = torch.zeros_like(padding_mask)
    masked[:, 1:3] = True
    if encoding != "none":
        value_mask = masked
    out = backbone(gene_ids, padding_mask, values, value_mask)
    logits = head(out.hidden[masked])  # (M, V)
    loss = nn.functional.cross_entropy(logits, gene_ids[masked]) + out.cell_embedding.pow(2).mean()
    loss.backward()
    for name, param in [*backbone.named_parameters(), *head.named_parameters()]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_masked_gene_head_is_tied_and_returns_m_by_vocab():
    backbone = _backbone()
    head = MaskedGeneHead(HIDDEN, VOCAB, backbone.gene_embedding)
    assert head.tied
    assert all("embedding" not in k for k in head.state_dict())  # weight stored once
    assert (head(torch.randn(5, HIDDEN))).shape == (5, VOCAB)
    with torch.no_grad():
        backbone.gene_embedding.weight.mul_(2.0)  # the head follows the embedding
        h = head.transform(torch.ones(1, HIDDEN))
        expected = h @ backbone.gene_embedding.weight.T + head.bias
        torch.testing.assert_close(head(torch.ones(1, HIDDEN)), expected)

    untied = MaskedGeneHead(HIDDEN, VOCAB)
    assert not untied.tied and untied(torch.randn(3, HIDDEN)).shape == (3, VOCAB)
    with pytest.raises(ValueError, match="Tied embedding has shape"):
        MaskedGeneHead(HIDDEN, VOCAB + 1, backbone.gene_embedding)


def test_task_heads_shapes():
    x = torch.randn(4, HIDDEN)
    assert ExpressionHead(HIDDEN, N_BINS)(x).shape == (4, N_BINS)
    assert ExpressionHead(HIDDEN, 1)(x).shape == (4, 1)
    assert ClassificationHead(HIDDEN, 5)(x).shape == (4, 5)
    assert RegressionHead(HIDDEN, 3, hidden_dim=8)(x).shape == (4, 3)
    for hidden_dim in (None, 0):
        probe = ClassificationHead(HIDDEN, 5, hidden_dim=hidden_dim)
        assert [type(m) for m in probe.net] == [nn.Linear]
    with pytest.raises(ValueError, match="n_classes"):
        ClassificationHead(HIDDEN, 1)


def test_lora_target_names_are_linear_modules():
    backbone = _backbone(num_layers=3)
    modules = dict(backbone.named_modules())
    for i in range(3):
        for suffix in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"):
            assert isinstance(modules[f"blocks.{i}.{suffix}"], nn.Linear)
        for suffix in ("ffn.linear1", "ffn.linear2", "norm1", "norm2"):
            assert f"blocks.{i}.{suffix}" in modules
    assert not any(isinstance(m, nn.MultiheadAttention) for m in backbone.modules())


def test_init_scales_residual_projections_and_zeroes_padding_row():
    backbone = _backbone(hidden_dim=64, num_layers=8, vocab_size=500)
    assert (backbone.gene_embedding.weight[0] == 0).all()
    q_std = torch.stack([b.attn.q_proj.weight for b in backbone.blocks]).std()
    out_std = torch.stack([b.attn.out_proj.weight for b in backbone.blocks]).std()
    assert 0.018 < q_std < 0.022
    assert out_std < q_std / 3  # 0.02 / sqrt(2 * 8) = 0.005
    assert backbone.num_parameters(trainable_only=True) == backbone.num_parameters()


def test_config_round_trip_through_json():
    config = _config(value_encoding="binned", pooling="mean", ffn_dim=24, use_positions=False)
    restored = BackboneConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert _config().resolved_ffn_dim == 4 * HIDDEN and config.resolved_ffn_dim == 24


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="d_model"):
        BackboneConfig.from_dict({"vocab_size": 10, "d_model": 8})
    with pytest.raises(ValueError, match="vocab_size"):
        BackboneConfig.from_dict({"hidden_dim": 8})


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"num_heads": 5}, "divisible by num_heads"),
        ({"activation": "swish"}, "activation must be one of"),
        ({"pooling": "max"}, "pooling must be one of"),
        ({"value_encoding": "log"}, "value_encoding must be one of"),
        ({"dropout": 1.0}, "dropout"),
        ({"n_bins": 1}, "n_bins"),
        ({"pad_token_id": VOCAB}, "pad_token_id"),
        ({"num_layers": 0}, "num_layers"),
    ],
)
def test_config_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        _config(**overrides)


def test_forward_input_errors():
    gene_ids, padding_mask, _ = _cells([4], "none")
    with pytest.raises(ValueError, match="max_seq_len=32"):
        _backbone()(torch.ones(1, 33, dtype=torch.long), torch.ones(1, 33, dtype=torch.bool))
    with pytest.raises(ValueError, match="value_encoding='none'"):
        _backbone()(gene_ids, padding_mask, torch.zeros(1, 4))
    with pytest.raises(ValueError, match="needs `values`"):
        _backbone(value_encoding="continuous")(gene_ids, padding_mask)
    with pytest.raises(ValueError, match=r"\[0, n_bins=7\)"):
        _backbone(value_encoding="binned")(gene_ids, padding_mask, torch.full((1, 4), N_BINS))
    with pytest.raises(ValueError, match="shape of gene_ids"):
        _backbone()(gene_ids, padding_mask[:, :2])


# -- BERT-style options (imported Geneformer models) -----------------------------------------
def test_defaults_are_pre_norm_without_embedding_norm():
    backbone = _backbone()
    assert all(type(block).__name__ == "TransformerBlock" for block in backbone.blocks)
    assert isinstance(backbone.norm, nn.LayerNorm)
    assert not any(k.startswith("embedding_norm") for k in backbone.state_dict())


def test_post_norm_block_is_bert_order():
    backbone = _backbone(norm_position="post", embedding_norm=True, layer_norm_eps=1e-12)
    assert isinstance(backbone.norm, nn.Identity)
    keys = set(backbone.state_dict())
    assert {"embedding_norm.weight", "embedding_norm.bias"} <= keys
    assert not any(k.startswith("norm.") for k in keys)
    backbone.eval()
    gene_ids, padding_mask, _ = _cells([6, 4], "none")
    # by hand: embeddings -> LayerNorm -> per block LN(h + attn(h)), LN(h + ffn(h))
    h = backbone.gene_embedding(gene_ids) + backbone.position_embedding.weight[:6]
    h = backbone.embedding_norm(h)
    for block in backbone.blocks:
        h = block.norm1(h + block.attn(h, padding_mask))
        h = block.norm2(h + block.ffn(h))
    with torch.no_grad():
        out = backbone(gene_ids, padding_mask)
    torch.testing.assert_close(out.hidden[padding_mask], h[padding_mask].detach())


def test_new_options_are_validated():
    with pytest.raises(ValueError, match="norm_position"):
        _config(norm_position="sandwich")
    with pytest.raises(ValueError, match="embedding_norm must be a bool"):
        _config(embedding_norm=1)
    old = {
        k: v for k, v in _config().to_dict().items() if k not in ("norm_position", "embedding_norm")
    }
    assert BackboneConfig.from_dict(old) == _config()  # configs saved before the options load


@pytest.mark.parametrize("encoding", ["binned", "continuous"])
def test_scaled_gene_embedding_adds_level_times_a_gene_vector(encoding):
    """The input of a token is gene + value encoding + level x scaled gene embedding, the level
    being 0 where the value is masked (so a masked value cannot leak through it)."""
    backbone = _backbone(value_encoding=encoding, scaled_gene_embedding=True).eval()
    gene_ids, padding_mask, values = _cells([6, 4], encoding)
    value_mask = torch.zeros_like(padding_mask)
    value_mask[:, 1] = True
    level = values.float() / (N_BINS - 1) if encoding == "binned" else values.float()
    level = level.masked_fill(value_mask, 0.0)
    with torch.no_grad():
        plain = backbone.gene_embedding(gene_ids) + backbone._encode_values(values, value_mask)
        expected = plain + level[..., None] * backbone.scaled_gene_embedding(gene_ids)
        seen = []
        hook = backbone.embedding_dropout.register_forward_hook(lambda m, i, o: seen.append(i[0]))
        backbone(gene_ids, padding_mask, values, value_mask)
        hook.remove()
    expected = expected + backbone.position_embedding.weight[: gene_ids.shape[1]]
    torch.testing.assert_close(seen[0], expected)
    # every parameter, the scaled embedding included, is trained
    out = backbone.train()(gene_ids, padding_mask, values, value_mask)
    out.cell_embedding.pow(2).mean().backward()
    assert backbone.scaled_gene_embedding.weight.grad.abs().sum() > 0


def test_scaled_gene_embedding_needs_values():
    with pytest.raises(ValueError, match=r"scaled_gene_embedding.*value_encoding"):
        _config(value_encoding="none", scaled_gene_embedding=True)
    old = {k: v for k, v in _config().to_dict().items() if k != "scaled_gene_embedding"}
    assert BackboneConfig.from_dict(old).scaled_gene_embedding is False


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_feed_forward_recomputes_its_activation_with_identical_values_and_gradients(act):
    """The training path that recomputes activation and dropout in the backward pass gives
    the same output and gradients as the plain modules with the same random draws, and keeps
    at least one (B, L, ffn_dim) float tensor less for the backward pass."""
    config = BackboneConfig(
        vocab_size=50, hidden_dim=16, num_layers=1, num_heads=2, ffn_dim=64, activation=act
    )
    torch.manual_seed(0)
    ffn = FeedForward(config).train()
    x = torch.randn(3, 7, 16, requires_grad=True)

    def run(step):
        saved = []
        hooks = (lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t)
        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(*hooks):
            out = step(x)
        out.pow(2).sum().backward()
        grads = [x.grad.clone(), *(p.grad.clone() for p in ffn.parameters())]
        x.grad = None
        ffn.zero_grad()
        return out.detach(), grads, sum(saved)

    fused, fused_grads, fused_bytes = run(ffn)
    plain, plain_grads, plain_bytes = run(
        lambda v: ffn.linear2(ffn.dropout(ffn.activation(ffn.linear1(v))))
    )
    torch.testing.assert_close(fused, plain, rtol=0, atol=0)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert fused_bytes <= plain_bytes - 3 * 7 * 64 * 4
