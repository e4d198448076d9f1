import json

import pytest
import torch
from torch import nn

from scforge_scvi.nn import BackboneConfig, ScForgeBackbone
from scforge_scvi.train._lora import (
    DEFAULT_TARGET_MODULES,
    LoraSettings,
    apply_lora,
    count_parameters,
    load_lora_state_dict,
    lora_layer_names,
    lora_state_dict,
    merge_lora,
)

NUM_LAYERS = 2


def _backbone(seed: int = 0) -> ScForgeBackbone:
    torch.manual_seed(seed)
    config = BackboneConfig(
        vocab_size=30,
        hidden_dim=16,
        num_layers=NUM_LAYERS,
        num_heads=2,
        value_encoding="binned",
        n_bins=5,
        pooling="mean",
    )
    return ScForgeBackbone(config)


def _inputs():
    gen = torch.Generator().manual_seed(0)
    gene_ids = torch.randint(1, 30, (4, 6), generator=gen)
    padding_mask = torch.ones(4, 6, dtype=torch.bool)
    padding_mask[1, 4:] = False
    values = torch.randint(0, 5, (4, 6), generator=gen)
    target = torch.randn(4, 6, 16, generator=gen)
    return gene_ids, padding_mask, values, target


def _hidden(model):
    gene_ids, padding_mask, values, _ = _inputs()
    return model(gene_ids, padding_mask, values).hidden


def _train(model, n_steps: int, lr: float = 1e-2):
    """Take a few AdamW steps on an MSE loss; yield after each backward (grads populated)."""
    gene_ids, padding_mask, values, target = _inputs()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    for _ in range(n_steps):
        optimizer.zero_grad()
        hidden = model(gene_ids, padding_mask, values).hidden
        loss = ((hidden - target)[padding_mask] ** 2).mean()
        loss.backward()
        yield
        optimizer.step()


def _settings(**overrides) -> LoraSettings:
    return LoraSettings(**{"rank": 4, "alpha": 8, "dropout": 0.0, **overrides})


def test_every_targeted_adapter_gets_a_gradient_and_base_stays_frozen():
    model = apply_lora(_backbone(), _settings())
    names = lora_layer_names(model)
    assert len(names) == NUM_LAYERS * len(DEFAULT_TARGET_MODULES)
    for target in DEFAULT_TARGET_MODULES:
        assert sum(n.endswith("." + target) for n in names) == NUM_LAYERS

    lora_params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(lora_params) == 2 * len(names)  # one lora_A and one lora_B per layer
    got_grad = dict.fromkeys(lora_params, False)
    for _ in _train(model, n_steps=2):
        for name, param in model.named_parameters():
            if name in lora_params:
                got_grad[name] |= param.grad is not None and bool(param.grad.abs().sum() > 0)
            else:
                assert not param.requires_grad and param.grad is None, name
    # lora_B starts at zero, so lora_A's first gradient is zero; by step 2 both must have one.
    assert all(got_grad.values()), [n for n, ok in got_grad.items() if not ok]


def test_adapted_model_starts_equal_to_the_base():
    base = _backbone().eval()
    with torch.no_grad():
        expected = _hidden(base)
        adapted = apply_lora(base, _settings(dropout=0.1)).eval()
        torch.testing.assert_close(_hidden(adapted), expected, atol=0, rtol=0)


def test_only_adapters_are_trainable():
    model = _backbone()
    _, total = count_parameters(model)
    apply_lora(model, _settings())
    trainable, total_after = count_parameters(model)
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert trainable == n_lora and total_after == total + n_lora
    assert 0 < trainable < total / 4


def test_merged_model_matches_adapted_model_and_restores_keys():
    model = _backbone()
    original_keys = list(model.state_dict())
    apply_lora(model, _settings())
    for _ in _train(model, n_steps=3):
        pass
    model.eval()
    with torch.no_grad():
        adapted = _hidden(model)
        base_q = model.blocks[0].attn.q_proj.base_layer.weight.clone()
        merged = merge_lora(model)
        assert merged is model and lora_layer_names(merged) == []
        assert list(merged.state_dict()) == original_keys
        assert type(merged.blocks[0].attn.q_proj) is nn.Linear
        assert not torch.allclose(merged.blocks[0].attn.q_proj.weight, base_q)  # adapters folded
        torch.testing.assert_close(_hidden(merged), adapted, atol=1e-5, rtol=0)
    # the merged weights load into a fresh backbone and give the same outputs
    fresh = _backbone(seed=1).eval()
    fresh.load_state_dict(merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(_hidden(fresh), adapted, atol=1e-5, rtol=0)


def test_lora_state_dict_round_trips_onto_a_fresh_base():
    settings = _settings()
    trained = apply_lora(_backbone(), settings)
    for _ in _train(trained, n_steps=3):
        pass
    adapters = lora_state_dict(trained)
    assert adapters and all("lora_" in k for k in adapters)
    assert all(k in trained.state_dict() for k in adapters)

    fresh = apply_lora(_backbone(), settings)  # same base weights, new random lora_A
    load_lora_state_dict(fresh, adapters)
    trained.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(_hidden(fresh), _hidden(trained), atol=0, rtol=0)


def test_load_lora_state_dict_is_strict():
    model = apply_lora(_backbone(), _settings())
    adapters = lora_state_dict(model)
    missing_key = next(iter(adapters))
    incomplete = {k: v for k, v in adapters.items() if k != missing_key}
    with pytest.raises(KeyError, match="missing 1 key"):
        load_lora_state_dict(model, incomplete)
    with pytest.raises(KeyError, match="unexpected 1 key"):
        load_lora_state_dict(model, {**adapters, "blocks.9.attn.q_proj.lora_A.default.weight": 0})
    only_attention = apply_lora(_backbone(), _settings(target_modules=("q_proj", "v_proj")))
    with pytest.raises(KeyError, match="missing 0 key"):
        load_lora_state_dict(only_attention, adapters)
    with pytest.raises(ValueError, match="apply_lora"):
        load_lora_state_dict(_backbone(), adapters)


def test_subset_of_targets():
    model = apply_lora(_backbone(), _settings(target_modules=["q_proj", "v_proj"]))
    names = lora_layer_names(model)
    assert len(names) == 2 * NUM_LAYERS
    assert all(n.endswith((".q_proj", ".v_proj")) for n in names)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"Available Linear module names.*q_proj"):
        apply_lora(_backbone(), _settings(target_modules=("query",)))
    model = apply_lora(_backbone(), _settings())
    with pytest.raises(ValueError, match="already carries LoRA"):
        apply_lora(model, _settings())
    with pytest.raises(ValueError, match="no LoRA adapters to merge"):
        merge_lora(_backbone())


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"rank": 0}, "rank"),
        ({"alpha": 0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"target_modules": ()}, "target_modules"),
    ],
)
def test_settings_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        LoraSettings(**overrides)


def test_settings_round_trip_through_json():
    settings = LoraSettings(rank=4, alpha=8.0, target_modules=("q_proj",))
    restored = LoraSettings.from_dict(json.loads(json.dumps(settings.to_dict())))
    assert restored == settings and restored.scaling == 2.0
    with pytest.raises(ValueError, match="lora_r"):
        LoraSettings.from_dict({"lora_r": 4})
