"""A config that names only the data builds the model and the recipe of ``ScForge(adata)``.

The schema reads its defaults from the Python API, so the command line and the API cannot
drift apart: the same backbone, tokenizer, preprocessing, vocabulary and training arguments.
"""

from __future__ import annotations

import inspect

import pytest

from scforge_scvi import ScForge
from scforge_scvi.cli._runs import build_model, train_kwargs
from scforge_scvi.config import ScForgeConfig
from scforge_scvi.data import pbmc68k_counts
from scforge_scvi.model._training import GRADIENT_CLIP_VAL

MINIMAL = {"data": {"paths": ["cells.h5ad"]}, "finetune": {"label_key": "bulk_labels"}}


def _defaults(function) -> dict:
    parameters = inspect.signature(function).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


@pytest.fixture(scope="module")
def adata():
    cells = pbmc68k_counts()
    ScForge.setup_anndata(cells, layer="counts", labels_key="bulk_labels")
    return cells


def test_minimal_config_builds_the_default_model(adata):
    from_config = build_model(adata, ScForgeConfig.from_dict(MINIMAL), checkpoint=None)
    from_api = ScForge(adata)
    assert from_config.backbone_config == from_api.backbone_config
    assert from_config.preprocessing == from_api.preprocessing
    assert from_config.vocab.to_dict() == from_api.vocab.to_dict()
    for name in ("strategy", "max_genes", "prepend_cls", "value_encoding"):
        assert getattr(from_config.tokenizer, name) == getattr(from_api.tokenizer, name), name
    assert from_config.init_params_ == from_api.init_params_


def test_minimal_config_trains_with_the_default_recipe():
    fit = train_kwargs(ScForgeConfig.from_dict(MINIMAL), objective="classify")
    defaults = _defaults(ScForge.train)
    for name in (
        "max_epochs", "batch_size", "class_weights", "train_size", "seed", "distributed",
        "linear_path", "strategy", "early_stopping",
    ):  # fmt: skip
        assert fit[name] == defaults[name], name
    plan = _defaults(ScForge._training_plan_cls.__init__)
    assert fit["plan_kwargs"] == {
        **{k: plan[k] for k in ("lr", "weight_decay", "betas", "warmup_steps", "min_lr_ratio")},
        "backbone_lr": plan["lr"],
        "head_lr": plan["lr"],
        "label_smoothing": plan["label_smoothing"],
    }
    # Lightning's own defaults, and the clipping train() applies unless told otherwise
    assert fit["datasplitter_kwargs"] == {"num_workers": 0}
    assert (fit["accelerator"], fit["devices"], fit["num_nodes"]) == ("auto", "auto", 1)
    assert str(fit["precision"]) == "32" and fit["gradient_clip_val"] == GRADIENT_CLIP_VAL


def test_old_key_names_are_read_with_a_warning():
    old = {"data": {"paths": ["a.h5ad"], "preprocessing": {"hvg": 300}}}
    with pytest.warns(FutureWarning, match="'hvg' is renamed 'data.preprocessing.n_top_genes'"):
        config = ScForgeConfig.from_dict(old)
    assert config.data.preprocessing.n_top_genes == 300
    with pytest.warns(FutureWarning, match="'hvg' is renamed"):
        config = ScForgeConfig.from_dict(MINIMAL, ["data.preprocessing.hvg=100"])
    assert config.data.preprocessing.n_top_genes == 100
