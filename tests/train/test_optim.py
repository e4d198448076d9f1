import pytest
import torch
from torch import nn

from scforge_scvi.nn import BackboneConfig, ClassificationHead, ScForgeBackbone
from scforge_scvi.train._optim import (
    build_adamw,
    default_no_decay,
    format_parameter_summary,
    parameter_group_summary,
    parameter_groups,
)


def _backbone(value_encoding: str = "binned") -> ScForgeBackbone:
    torch.manual_seed(0)
    config = BackboneConfig(
        vocab_size=30, hidden_dim=16, num_layers=2, num_heads=2, value_encoding=value_encoding
    )
    return ScForgeBackbone(config)


def _names(groups, module, group_name):
    ids = {id(p) for g in groups if g["name"] == group_name for p in g["params"]}
    return {n for n, p in module.named_parameters() if id(p) in ids}


def test_decay_rule_on_the_backbone():
    backbone = _backbone()
    groups = parameter_groups(backbone, weight_decay=0.1, lr=1e-3, name="backbone")
    decayed = _names(groups, backbone, "backbone.decay")
    not_decayed = _names(groups, backbone, "backbone.no_decay")
    all_names = {n for n, _ in backbone.named_parameters()}
    assert decayed | not_decayed == all_names and not decayed & not_decayed
    assert "blocks.0.attn.q_proj.weight" in decayed
    assert "blocks.1.ffn.linear2.weight" in decayed
    for name in ("gene_embedding.weight", "position_embedding.weight", "value_embedding.weight"):
        assert name in not_decayed  # 2-D, but an embedding table
    assert "blocks.0.attn.q_proj.bias" in not_decayed
    assert "blocks.0.norm1.weight" in not_decayed and "norm.weight" in not_decayed
    params = dict(backbone.named_parameters())
    assert all(params[n].dim() >= 2 and "embedding" not in n for n in decayed)
    by_name = {g["name"]: g for g in groups}
    assert by_name["backbone.decay"]["weight_decay"] == 0.1
    assert by_name["backbone.no_decay"]["weight_decay"] == 0.0
    assert all(g["lr"] == 1e-3 and g["param_set"] == "backbone" for g in groups)


def test_continuous_value_mask_embedding_is_not_decayed():
    backbone = _backbone("continuous")
    groups = parameter_groups(backbone, weight_decay=0.1, lr=1e-3, name="b")
    assert "value_mask_embedding" in _names(groups, backbone, "b.no_decay")
    assert "value_encoder.0.weight" in _names(groups, backbone, "b.decay")


def test_include_frozen_flag():
    backbone = _backbone()
    backbone.requires_grad_(False)
    kept = parameter_groups(backbone, weight_decay=0.1, lr=1e-3)
    assert sum(len(g["params"]) for g in kept) == len(list(backbone.parameters()))
    assert parameter_groups(backbone, weight_decay=0.1, lr=1e-3, include_frozen=False) == []


def test_custom_rule_and_named_parameter_input():
    backbone = _backbone()
    groups = parameter_groups(
        backbone.named_parameters(),
        weight_decay=0.1,
        lr=1e-3,
        no_decay_rule=lambda name, p: default_no_decay(name, p) or "ffn" in name,
    )
    assert not any("ffn" in n for n in _names(groups, backbone, "params.decay"))
    with pytest.raises(TypeError, match="named_parameters"):
        parameter_groups(backbone.parameters(), weight_decay=0.1, lr=1e-3)


def test_build_adamw_with_a_learning_rate_per_set():
    backbone, head = _backbone(), ClassificationHead(16, 4, hidden_dim=8)
    optimizer = build_adamw({"backbone": (backbone, 1e-5), "head": (head, 1e-3)}, weight_decay=0.05)
    assert isinstance(optimizer, torch.optim.AdamW)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert set(groups) == {"backbone.decay", "backbone.no_decay", "head.decay", "head.no_decay"}
    assert groups["backbone.decay"]["lr"] == 1e-5 and groups["head.no_decay"]["lr"] == 1e-3
    assert groups["head.decay"]["weight_decay"] == 0.05
    assert groups["head.no_decay"]["weight_decay"] == 0.0
    assert all(g["eps"] == 1e-8 and g["betas"] == (0.9, 0.999) for g in groups.values())

    summary = parameter_group_summary(optimizer)
    assert set(summary) == {"backbone", "head"}
    n_backbone = sum(p.numel() for p in backbone.parameters())
    assert summary["backbone"]["decay_params"] + summary["backbone"]["no_decay_params"] == (
        n_backbone
    )
    assert summary["head"]["decay_tensors"] == 2 and summary["head"]["no_decay_tensors"] == 2
    text = format_parameter_summary(summary)
    assert text.count("\n") == 1 and "backbone: decay" in text and "head: decay" in text


def test_build_adamw_rejects_a_parameter_in_two_sets():
    backbone = _backbone()
    with pytest.raises(ValueError, match="also in set 'backbone'"):
        build_adamw({"backbone": (backbone, 1e-5), "again": (backbone.norm, 1e-3)})
    with pytest.raises(TypeError, match=r"\(module_or_named_parameters, lr\)"):
        build_adamw({"backbone": backbone})


def test_frozen_backbone_in_optimizer_trains_once_unfrozen():
    """Gradual unfreezing: backbone parameters sit in the optimizer from the start."""
    backbone, head = _backbone("none"), ClassificationHead(16, 3, hidden_dim=None)
    backbone.requires_grad_(False)
    optimizer = build_adamw({"backbone": (backbone, 1e-3), "head": (head, 1e-2)})
    summary = parameter_group_summary(optimizer)
    assert summary["backbone"]["trainable_params"] == 0
    gene_ids = torch.randint(1, 30, (4, 5))
    padding_mask = torch.ones(4, 5, dtype=torch.bool)
    labels = torch.tensor([0, 1, 2, 0])

    def step():
        optimizer.zero_grad()
        logits = head(backbone(gene_ids, padding_mask).cell_embedding)
        nn.functional.cross_entropy(logits, labels).backward()
        optimizer.step()

    before = backbone.blocks[0].attn.q_proj.weight.detach().clone()
    step()
    torch.testing.assert_close(backbone.blocks[0].attn.q_proj.weight, before)  # frozen
    backbone.requires_grad_(True)
    step()
    assert not torch.allclose(backbone.blocks[0].attn.q_proj.weight, before)  # now trains
