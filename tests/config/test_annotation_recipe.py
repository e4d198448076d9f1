"""The annotation tutorial's config is the Python recipe, and runs through the command line.

``docs/tutorials/configs/annotate_pbmc3k.yaml`` must stay the defaults of ``ScForge`` and
``ScForge.train`` (the recipe measured in ``docs/benchmarks_annotation.md``), so that the
benchmark's figures hold for a user who follows the shell path.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from scforge_scvi import ScForge
from scforge_scvi.cli import main
from scforge_scvi.cli._runs import model_kwargs, train_kwargs
from scforge_scvi.config import ScForgeConfig
from scforge_scvi.data import pbmc68k_counts
from scforge_scvi.model._settings import flattened, init_defaults
from scforge_scvi.train._schedules import default_max_epochs, default_warmup_steps

RECIPE = Path(__file__).parents[2] / "docs" / "tutorials" / "configs" / "annotate_pbmc3k.yaml"
PBMC3K_CELLS = 2638


def _defaults(function) -> dict:
    return {
        name: p.default
        for name, p in inspect.signature(function).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


@pytest.fixture(scope="module")
def recipe() -> ScForgeConfig:
    return ScForgeConfig.from_yaml(RECIPE)


def test_config_builds_the_default_model(recipe):
    defaults = init_defaults(ScForge)
    built = flattened(model_kwargs(recipe))
    for name in (
        "tokenizer", "max_genes", "n_top_genes", "hidden_dim", "num_layers", "num_heads",
        "pooling", "n_bins", "dropout", "normalize", "target_sum", "log1p", "head_hidden_dim",
    ):  # fmt: skip
        assert built[name] == defaults[name], name


def test_config_trains_with_the_default_schedule(recipe):
    defaults = _defaults(ScForge.train)
    fit = train_kwargs(recipe, objective="classify")
    plan, plan_defaults = fit["plan_kwargs"], _defaults(ScForge._training_plan_cls.__init__)
    for name in ("batch_size", "class_weights"):
        assert fit[name] == defaults[name], name
    for name in ("lr", "weight_decay", "min_lr_ratio", "label_smoothing"):
        assert plan[name] == plan_defaults[name], name
    assert fit["strategy"] == "full" and plan["backbone_lr"] == plan["head_lr"] == plan["lr"]
    # the training file holds 80% of pbmc3k; the config's validation share of it is 1/8
    n_train = round(0.8 * PBMC3K_CELLS * fit["train_size"])
    steps = n_train // fit["batch_size"] * fit["max_epochs"]
    assert fit["max_epochs"] == default_max_epochs("classify", n_train, fit["batch_size"])
    assert plan["warmup_steps"] == default_warmup_steps(steps)


def test_pretrain_then_finetune_with_the_tutorial_config(tmp_path, monkeypatch, capsys):
    """Both commands of the tutorial run on real counts (tiny epochs and cells for speed)."""
    (tmp_path / "data").mkdir()
    cells = pbmc68k_counts()
    del cells.layers["counts"]
    cells.obs["louvain"] = cells.obs["bulk_labels"]
    cells.write_h5ad(tmp_path / "data" / "pbmc3k_train.h5ad")
    monkeypatch.chdir(tmp_path)
    fast = ["training.max_epochs=1", "training.batch_size=64", "data.num_workers=0"]
    assert main(["pretrain", "--config", str(RECIPE), "--set", *fast,
                 "training.checkpoint_dir=runs/pbmc3k/pretrain"]) == 0  # fmt: skip
    assert main(["finetune", "--config", str(RECIPE), "--checkpoint",
                 "runs/pbmc3k/pretrain/best", "--set", *fast]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "'finetune' section is not used by 'scforge pretrain'" in err
    query = pbmc68k_counts()
    ScForge.setup_anndata(query, layer="counts")
    model = ScForge.from_pretrained("runs/pbmc3k/finetune/best", query)
    assert set(model.class_names_) == set(cells.obs["louvain"].astype(str))
    assert model.tokenizer.max_genes == 512 and model.preprocessing.n_top_genes == 2000
