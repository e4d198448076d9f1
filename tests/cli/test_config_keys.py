"""Every key the config schema accepts does something: it changes what the command line hands
to the Python API, it is rejected with a clear message, or it is read by a named step.

A key added to the schema without being wired fails :func:`test_every_key_is_classified`
until it is listed below with a value that changes the API arguments (or with the step that
reads it). No data is read and nothing is trained.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from scforge_scvi.cli import _runs as runs
from scforge_scvi.config import ScForgeConfig

CONFIGS = Path(__file__).parents[1] / "config"
LORA = ["finetune.lora.enabled=true", "finetune.freeze_backbone_epochs=0"]

# key -> (overrides of both configs compared, overrides of the changed one)
CHANGES: dict[str, tuple[list[str], list[str]]] = {
    "data.preprocessing.normalize": ([], ["data.preprocessing.normalize=none"]),
    "data.preprocessing.target_sum": ([], ["data.preprocessing.target_sum=1e6"]),
    "data.preprocessing.log1p": ([], ["data.preprocessing.log1p=false"]),
    "data.preprocessing.n_top_genes": ([], ["data.preprocessing.n_top_genes=500"]),
    "data.num_workers": ([], ["data.num_workers=0"]),
    "tokenizer.strategy": ([], ["tokenizer.strategy=binned_expression"]),
    "tokenizer.max_genes": ([], ["tokenizer.max_genes=1024", "data.max_genes=1024"]),
    "tokenizer.prepend_cls": (["model.pooling=mean"], ["tokenizer.prepend_cls=false"]),
    "tokenizer.n_bins": ([], ["tokenizer.n_bins=11"]),
    "tokenizer.masking.mask_ratio": ([], ["tokenizer.masking.mask_ratio=0.3"]),
    "tokenizer.masking.random_replace_ratio": ([], ["tokenizer.masking.random_replace_ratio=0"]),
    "tokenizer.masking.keep_ratio": ([], ["tokenizer.masking.keep_ratio=0"]),
    "model.hidden_dim": ([], ["model.hidden_dim=256"]),
    "model.num_layers": ([], ["model.num_layers=2"]),
    "model.num_heads": ([], ["model.num_heads=4"]),
    "model.ffn_dim": ([], ["model.ffn_dim=128"]),
    "model.dropout": ([], ["model.dropout=0.0"]),
    "model.max_seq_len": ([], ["model.max_seq_len=4096"]),
    "model.pooling": ([], ["model.pooling=mean"]),
    "model.activation": ([], ["model.activation=relu"]),
    "training.batch_size": ([], ["training.batch_size=8"]),
    "training.max_epochs": ([], ["training.max_epochs=3"]),
    "training.seed": ([], ["training.seed=1"]),
    "training.precision": ([], ["training.precision=32-true"]),
    "training.optimizer.lr": ([], ["training.optimizer.lr=1e-3"]),
    "training.optimizer.weight_decay": ([], ["training.optimizer.weight_decay=0"]),
    "training.optimizer.betas": ([], ["training.optimizer.betas=[0.9, 0.98]"]),
    "training.scheduler.name": ([], ["training.scheduler.name=constant"]),
    "training.scheduler.warmup_steps": ([], ["training.scheduler.warmup_steps=0"]),
    "training.scheduler.min_lr_ratio": ([], ["training.scheduler.min_lr_ratio=0.2"]),
    "training.gradient_clip": ([], ["training.gradient_clip=null"]),
    "training.val_split": ([], ["training.val_split=0.2"]),
    "training.test_split": ([], ["training.test_split=0.2"]),
    "training.patience": ([], ["training.patience=3"]),
    "training.accelerator": ([], ["training.accelerator=cpu"]),
    "training.devices": ([], ["training.devices=1"]),
    "training.strategy": ([], ["training.strategy=ddp"]),
    "training.num_nodes": ([], ["training.num_nodes=2"]),
    "finetune.freeze_backbone": ([], ["finetune.freeze_backbone=false"]),
    "finetune.freeze_backbone_epochs": ([], ["finetune.freeze_backbone_epochs=2"]),
    "finetune.head.hidden_dim": ([], ["finetune.head.hidden_dim=64"]),
    "finetune.head.dropout": ([], ["finetune.head.dropout=0.3"]),
    "finetune.lora.enabled": ([], LORA),
    "finetune.lora.rank": (LORA, ["finetune.lora.rank=4"]),
    "finetune.lora.alpha": (LORA, ["finetune.lora.alpha=4"]),
    "finetune.lora.dropout": (LORA, ["finetune.lora.dropout=0.2"]),
    "finetune.lora.target_modules": (LORA, ["finetune.lora.target_modules=[q_proj]"]),
    "finetune.backbone_lr": ([], ["finetune.backbone_lr=1e-4"]),
    "finetune.head_lr": ([], ["finetune.head_lr=1e-2"]),
    "finetune.class_weights": ([], ["finetune.class_weights=null"]),
    "finetune.label_smoothing": ([], ["finetune.label_smoothing=0.1"]),
    "finetune.linear_path": ([], ["finetune.linear_path=false"]),
}

# keys read by a step other than the API arguments compared here, and where
READ_ELSEWHERE = {
    "data.source": "single choice ('local')",
    "data.paths": "runs.read_data (and the data loaders)",
    "data.streaming": "runs.read_training_data (streamed shards passed as data=)",
    "data.gene_vocab": "runs.build_model",
    "data.max_genes": "must equal tokenizer.max_genes (schema check)",
    "data.layer": "runs.setup_data",
    "data.gene_key": "runs.setup_data",
    "model.architecture": "single choice ('transformer_encoder')",
    "training.optimizer.name": "single choice ('adamw')",
    "training.checkpoint_dir": "the run directory of pretrain/finetune",
    "finetune.label_key": "runs.setup_data",
    "finetune.unlabeled_category": "runs.setup_data",
    "finetune.head.task": "runs.setup_data and the finetune objective",
    "finetune.head.n_classes": "runs.check_n_classes",
    "benchmarks.0.name": "scforge benchmark",
    "benchmarks.0.label_key": "scforge benchmark",
    "benchmarks.0.batch_key": "scforge benchmark",
    "benchmarks.0.train_split": "scforge benchmark",
}


def _leaves(value, prefix: str = ""):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, f"{prefix}.{key}" if prefix else key)
    elif isinstance(value, list) and value and isinstance(value[0], dict):
        yield from _leaves(value[0], f"{prefix}.0")
    else:
        yield prefix


def _config(overrides: list[str]) -> ScForgeConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # e.g. "freeze_backbone_epochs ignored"
        return ScForgeConfig.from_yaml(CONFIGS / "tutorial_finetune_full.yaml", overrides)


def _api_arguments(config: ScForgeConfig) -> dict | str:
    """What pretrain/finetune pass to ScForge and ScForge.train, or 'rejected'."""
    try:
        runs.check_supported(config)
    except runs.CliError:
        return "rejected"
    arguments: dict = {"model": runs.model_kwargs(config)}
    for objective in ("pretrain", "classify"):
        kwargs = runs.train_kwargs(config, objective=objective)
        kwargs.pop("callbacks")  # a fresh progress bar object every time
        arguments[objective] = kwargs
    return arguments


def test_every_key_is_classified():
    full = ScForgeConfig.from_yaml(CONFIGS / "tutorial_finetune_full.yaml").to_dict()
    evaluation = ScForgeConfig.from_yaml(CONFIGS / "tutorial_eval.yaml").to_dict()
    keys = set(_leaves(full)) | set(_leaves(evaluation))
    keys -= {"finetune", "benchmarks"}  # the empty section of one file, filled in the other
    assert keys - set(CHANGES) - set(READ_ELSEWHERE) == set(), "unwired or unlisted keys"
    assert set(CHANGES) & set(READ_ELSEWHERE) == set()
    assert set(CHANGES) | set(READ_ELSEWHERE) <= keys, "listed keys that are not in the schema"


@pytest.mark.parametrize("key", sorted(CHANGES))
def test_changing_a_key_changes_the_api_arguments_or_is_rejected(key):
    both, changed = CHANGES[key]
    before = _api_arguments(_config(both))
    assert before != "rejected", "the tutorial config must be supported"
    after = _api_arguments(_config(both + changed))
    assert after != before, f"{key}: accepted but ignored"
