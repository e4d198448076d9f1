"""The YAML schema: the tutorial's configs validate, mistakes are reported by key path."""

import re
import warnings
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from scforge_scvi.config import (
    DEFAULT_LORA_TARGET_MODULES,
    ConfigError,
    FinetuneConfig,
    ScForgeConfig,
    TokenizerConfig,
    apply_overrides,
)

HERE = Path(__file__).parent
FULL = HERE / "tutorial_finetune_full.yaml"
LORA = HERE / "tutorial_finetune_lora.yaml"
EVAL = HERE / "tutorial_eval.yaml"
SEED = HERE.parents[1] / ".." / "shared" / "seeds" / "000_48585d29f221c431.txt"


@pytest.fixture
def full() -> dict:
    return yaml.safe_load(FULL.read_text())


def problems_of(data: dict, overrides=()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        ScForgeConfig.from_dict(data, overrides)
    return info.value.problems


# ---- the tutorial's configs ----------------------------------------------------------------


@pytest.mark.parametrize("path", [FULL, LORA, EVAL], ids=lambda p: p.stem)
def test_tutorial_configs_validate_without_warnings(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = ScForgeConfig.from_yaml(path)
    assert config.tokenizer.max_genes <= config.model.max_seq_len
    assert config.model.pooling == "cls"


def test_tutorial_values_are_read_as_meant():
    full = ScForgeConfig.from_yaml(FULL)
    assert full.finetune.strategy == "gradual_unfreeze"
    assert full.training.optimizer.lr == pytest.approx(5e-5)
    assert full.finetune.learning_rates(full.training.optimizer.lr) == (1e-5, 1e-3)
    assert full.data.paths == [Path("data/pbmc3k.h5ad")]
    assert full.tokenizer.max_genes == 2048  # genes: the [CLS] token is not counted

    lora = ScForgeConfig.from_yaml(LORA)
    assert lora.finetune.strategy == "lora"
    assert lora.finetune.lora.resolved_target_modules == list(DEFAULT_LORA_TARGET_MODULES)

    evaluation = ScForgeConfig.from_yaml(EVAL)
    assert evaluation.finetune is None
    [probe] = evaluation.benchmarks
    assert (probe.name, probe.label_key, probe.train_split) == ("linear_probe", "louvain", 0.0)


@pytest.mark.skipif(not SEED.exists(), reason="the seed tutorial (../shared/seeds) is absent")
def test_tutorial_files_are_verbatim_copies():
    full_block, lora_block, eval_block = re.findall(r"```yaml\n(.*?)```", SEED.read_text(), re.S)
    assert FULL.read_text() == full_block
    assert EVAL.read_text() == eval_block
    lora_text = LORA.read_text()
    assert lora_text.endswith(lora_block)
    assert full_block[: full_block.index("finetune:\n")] in lora_text


# ---- error messages -------------------------------------------------------------------------


def test_unknown_key_names_path_suggestion_and_valid_keys(full):
    full["training"]["max_epoch"] = 3
    [message] = problems_of(full)
    assert message.startswith("Unknown key 'training.max_epoch': did you mean 'max_epochs'?")
    assert "Valid keys in 'training': batch_size, max_epochs, seed" in message


def test_unknown_key_at_top_level_and_in_wrong_section(full):
    full["trainng"] = {}
    full["training"]["label_key"] = "louvain"
    messages = "\n".join(problems_of(full))
    assert "Unknown key 'trainng': did you mean 'training'?" in messages
    assert "Unknown key 'training.label_key': 'label_key' belongs in 'finetune'" in messages


def test_wrong_type_names_path_expected_type_and_value(full):
    full["training"]["optimizer"]["lr"] = "fast"
    [message] = problems_of(full)
    assert message == (
        "Wrong type for 'training.optimizer.lr': expected a number, got 'fast' (text)"
    )


def test_every_problem_is_reported_at_once(full):
    full["model"]["pooling"] = "clss"
    full["tokenizer"]["strategy"] = "rank_values"
    full["data"]["paths"] = []
    full["finetune"]["head"]["dropout"] = 1.5
    messages = problems_of(full)
    assert len(messages) == 4
    text = "\n".join(messages)
    assert "'model.pooling': 'clss' is not one of cls, mean. Did you mean 'cls'?" in text
    assert "Did you mean 'rank_value'?" in text
    assert "'data.paths'" in text
    assert "'finetune.head.dropout'" in text


def test_error_message_names_the_file(tmp_path, full):
    full["model"]["num_layers"] = "six"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(full))
    with pytest.raises(ConfigError, match=r"config\.yaml.*'model\.num_layers'.*whole number"):
        ScForgeConfig.from_yaml(path)


def test_benchmark_errors_name_the_list_position(full):
    full["benchmarks"] = [
        {"name": "linear_probe", "label_key": "louvain"},
        {"name": "baseline_logreg", "labl_key": "louvain"},
    ]
    messages = "\n".join(problems_of(full))
    assert "Unknown key 'benchmarks[1].labl_key': did you mean 'label_key'?" in messages
    assert "Missing required key 'benchmarks[1].label_key'" in messages


def test_gene_vocab_must_be_named_or_a_file(full):
    full["data"]["gene_vocab"] = "human_protein"
    [message] = problems_of(full)
    assert "'data.gene_vocab'" in message and "did you mean 'human_protein_coding'" in message
    full["data"]["gene_vocab"] = "vocab/genes.tsv"
    assert ScForgeConfig.from_dict(full).data.gene_vocab == "vocab/genes.tsv"


def test_numbers_refuse_booleans(full):
    full["model"]["num_layers"] = True
    [message] = problems_of(full)
    assert "'model.num_layers'" in message


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"'nowhere\.yaml' does not exist"):
        ScForgeConfig.from_yaml("nowhere.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("data:\n  paths: [a.h5ad\nmodel:\n  hidden_dim: 64\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml.*line \d+"):
        ScForgeConfig.from_yaml(broken)


def test_a_key_written_twice_is_an_error(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("data:\n  paths: [a.h5ad]\ntraining:\n  max_epochs: 3\ntraining:\n  seed: 1\n")
    with pytest.raises(ConfigError, match=r"line 5.*duplicate key 'training'.*line 3"):
        ScForgeConfig.from_yaml(path)


def test_empty_sections_take_defaults():
    config = ScForgeConfig.from_dict({"data": {"paths": ["a.h5ad"]}, "tokenizer": None})
    assert config.tokenizer == TokenizerConfig()
    assert config.benchmarks == [] and config.finetune is None


# ---- overrides ------------------------------------------------------------------------------


def test_overrides_parse_yaml_values_and_leave_input_alone(full):
    updated = apply_overrides(
        full,
        [
            "model.hidden_dim=64",
            "training.max_epochs=1",
            "data.paths=[a.h5ad, b.h5ad]",
            "tokenizer.prepend_cls=false",
            "training.optimizer.lr=1e-3",
            "finetune.lora.enabled=true",
            "finetune.freeze_backbone_epochs=0",
            "benchmarks=[{name: linear_probe, label_key: louvain}]",
        ],
        ScForgeConfig,
    )
    assert full["model"]["hidden_dim"] == 512  # the input is not modified
    assert updated["model"]["hidden_dim"] == 64
    assert updated["data"]["paths"] == ["a.h5ad", "b.h5ad"]
    assert updated["tokenizer"]["prepend_cls"] is False
    assert updated["finetune"]["lora"] == {
        **full["finetune"].get("lora", {}),
        "enabled": True,
    }
    config = ScForgeConfig.from_dict(
        updated, ["model.pooling=mean", "benchmarks[0].train_split=0.5"]
    )
    assert config.training.optimizer.lr == pytest.approx(1e-3)
    assert config.model.hidden_dim == 64 and config.training.max_epochs == 1
    assert config.benchmarks[0].train_split == 0.5
    assert config.finetune.strategy == "lora"


def test_override_creates_missing_sections():
    config = ScForgeConfig.from_dict(
        {}, ["data.paths=[a.h5ad]", "finetune.label_key=louvain", "finetune.head.hidden_dim=32"]
    )
    assert config.finetune.label_key == "louvain" and config.finetune.head.hidden_dim == 32


def test_bad_overrides_are_all_reported(full):
    with pytest.raises(ConfigError) as info:
        apply_overrides(
            full,
            ["model.hiden_dim=64", "max_epochs", "model.pooling.kind=x", "benchmarks.3.name=x"],
            ScForgeConfig,
        )
    messages = info.value.problems
    assert len(messages) == 4
    assert "Unknown key 'model.hiden_dim': did you mean 'hidden_dim'?" in messages[0]
    assert "expected key=value" in messages[1]
    assert "'model.pooling' is a single value" in messages[2]
    assert "no entry 3" in messages[3]


def test_from_yaml_applies_overrides_before_validation():
    # hidden_dim 100 alone is invalid with 8 heads; the override of num_heads fixes it.
    config = ScForgeConfig.from_yaml(FULL, overrides=["model.hidden_dim=100", "model.num_heads=4"])
    assert (config.model.hidden_dim, config.model.num_heads) == (100, 4)


# ---- writing --------------------------------------------------------------------------------


def test_to_yaml_round_trip(tmp_path):
    config = ScForgeConfig.from_yaml(LORA, overrides=["training.precision=32", "model.ffn_dim=128"])
    written = config.to_yaml(tmp_path / "run" / "config.yaml")
    assert [p.name for p in written.parent.iterdir()] == ["config.yaml"]  # no temp file left
    again = ScForgeConfig.from_yaml(written)
    assert again == config
    assert again.to_dict() == config.to_dict()
    assert again.training.precision == "32"
    assert again.finetune.strategy == "lora"
    assert yaml.safe_load(written.read_text())["training"]["optimizer"]["betas"] == [0.9, 0.999]


# ---- strategy and cross-section checks ------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "max_epochs", "expected"),
    [
        ({"lora": {"enabled": True}}, 20, "lora"),
        ({"freeze_backbone": True, "freeze_backbone_epochs": 999999}, 20, "frozen"),
        ({"freeze_backbone": True, "freeze_backbone_epochs": 20}, 20, "frozen"),
        ({"freeze_backbone": True, "freeze_backbone_epochs": 5}, 20, "gradual_unfreeze"),
        ({}, 20, "full"),
    ],
)
def test_strategy_derivation(full, settings, max_epochs, expected):
    full["finetune"] = {"label_key": "louvain", **settings}
    full["training"]["max_epochs"] = max_epochs
    assert ScForgeConfig.from_dict(full).finetune.strategy == expected


def test_standalone_finetune_config_never_counts_as_frozen():
    finetune = FinetuneConfig(label_key="x", freeze_backbone=True, freeze_backbone_epochs=50)
    assert finetune.strategy == "gradual_unfreeze"
    assert finetune.strategy_for(max_epochs=10) == "frozen"


def test_sequence_longer_than_model_names_both_keys(full):
    [message] = problems_of(full, ["tokenizer.max_genes=4096", "data.max_genes=null"])
    assert "tokenizer.max_genes (4096)" in message and "model.max_seq_len (2048)" in message


def test_cls_pooling_needs_cls_token(full):
    [message] = problems_of(full, ["tokenizer.prepend_cls=false"])
    assert "model.pooling" in message and "tokenizer.prepend_cls" in message
    config = ScForgeConfig.from_dict(full, ["tokenizer.prepend_cls=false", "model.pooling=mean"])
    assert config.tokenizer.max_genes == 2048


def test_heads_must_divide_hidden_dim(full):
    [message] = problems_of(full, ["model.hidden_dim=500"])
    assert message.startswith("model.hidden_dim (500) must be divisible by num_heads (8)")


def test_data_and_tokenizer_max_genes_must_agree(full):
    [message] = problems_of(full, ["data.max_genes=1024"])
    assert "data.max_genes (1024)" in message and "tokenizer.max_genes (2048)" in message


def test_masking_ratios(full):
    messages = problems_of(full, ["tokenizer.masking.mask_ratio=1.5"])
    assert "'tokenizer.masking.mask_ratio'" in messages[0]
    [message] = problems_of(full, ["tokenizer.masking.keep_ratio=0.95"])
    assert message.startswith("tokenizer.masking.random_replace_ratio (0.1) + keep_ratio (0.95)")


def test_early_stopping_needs_validation_cells(full):
    [message] = problems_of(full, ["training.patience=3", "training.val_split=0"])
    assert "training.patience" in message and "val_split" in message


def test_lora_warns_that_unfreezing_is_ignored(full):
    with pytest.warns(UserWarning, match="freeze_backbone_epochs .* ignored with LoRA"):
        config = ScForgeConfig.from_dict(full, ["finetune.lora.enabled=true"])
    assert config.finetune.strategy == "lora"


def test_freeze_without_frozen_epochs_warns_full_finetuning(full):
    with pytest.warns(UserWarning, match="never frozen"):
        config = ScForgeConfig.from_dict(full, ["finetune.freeze_backbone_epochs=0"])
    assert config.finetune.strategy == "full"


def test_benchmark_combinations(full):
    base = "benchmarks=[{name: %s, label_key: louvain, %s}]"
    [message] = problems_of(full, [base % ("baseline_logreg", "train_split: 0.0")])
    assert "benchmarks[0].train_split (0.0)" in message
    [message] = problems_of(full, [base % ("linear_probe", "batch_key: donor")])
    assert "benchmarks[0].batch_key" in message and "embedding_quality" in message


# ---- documentation --------------------------------------------------------------------------


def _sections(model: type[BaseModel]):
    yield model
    for field in model.model_fields.values():
        for candidate in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                yield from _sections(candidate)


def test_every_key_is_described_for_help_texts():
    undocumented = [
        f"{section.__name__}.{name}"
        for section in _sections(ScForgeConfig)
        for name, field in section.model_fields.items()
        if not field.description
    ]
    assert undocumented == []
