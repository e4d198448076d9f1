"""``ScForge``'s grouped settings: few arguments, the former flat keywords still read."""

from __future__ import annotations

import inspect
import warnings

import pytest

from scforge_scvi import ScForge, ScForgeTypeError, ScForgeValueError
from scforge_scvi.model import Architecture
from scforge_scvi.model._settings import flattened, grouped, init_defaults


def _future_warnings(caught) -> list[str]:
    """The renaming warnings among ``caught``, each up to its ';'."""
    messages = [str(w.message) for w in caught if w.category is FutureWarning]
    return [m.split(";")[0] for m in messages if m.startswith(("ScForge(", "train("))]


TINY = {"hidden_dim": 16, "num_layers": 1, "num_heads": 2, "max_genes": 32}


@pytest.fixture(scope="module")
def cells(_pbmc68k_counts_once):
    adata = _pbmc68k_counts_once[:200].copy()
    ScForge.setup_anndata(adata, layer="counts")
    return adata


@pytest.mark.parametrize("method", [ScForge.__init__, ScForge.train])
def test_init_and_train_take_at_most_twenty_arguments(method):
    arguments = [p for p in inspect.signature(method).parameters if p != "self"]
    assert len(arguments) <= 20, arguments


def test_flat_keywords_build_the_grouped_model_with_a_warning(cells):
    grouped_model = ScForge(
        cells,
        **TINY,
        preprocessing={"n_top_genes": None},
        architecture={"ffn_dim": 24, "n_bins": 11},
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flat_model = ScForge(cells, **TINY, n_top_genes=None, ffn_dim=24, n_bins=11)
    assert _future_warnings(caught) == [
        "ScForge(n_top_genes=...) is now ScForge(preprocessing={'n_top_genes': ...})",
        "ScForge(ffn_dim=...) is now ScForge(architecture={'ffn_dim': ...})",
        "ScForge(n_bins=...) is now ScForge(architecture={'n_bins': ...})",
    ]
    assert flat_model.backbone_config == grouped_model.backbone_config
    assert flat_model.preprocessing == grouped_model.preprocessing
    assert (
        flat_model.architecture == grouped_model.architecture == Architecture(ffn_dim=24, n_bins=11)
    )
    assert flat_model.init_params_ == grouped_model.init_params_
    assert grouped_model.backbone_config.ffn_dim == 24 and len(grouped_model.vocab) > 200


def test_unknown_settings_are_refused_naming_them(cells):
    with pytest.raises(ScForgeTypeError, match=r"unexpected keyword arguments \['n_layers'\]"):
        ScForge(cells, n_layers=2)
    with pytest.raises(ScForgeValueError, match=r"Unknown architecture keys \['ffn'\]"):
        ScForge(cells, architecture={"ffn": 32})
    with pytest.raises(ScForgeValueError, match="gene_embedding_init must be one of"):
        Architecture(gene_embedding_init="zeros")


def test_flat_and_grouped_names_translate_both_ways():
    defaults = init_defaults(ScForge)
    assert defaults["n_top_genes"] == 2000 and defaults["norm_position"] == "pre"
    assert "preprocessing" not in defaults and "architecture" not in defaults
    assert flattened(grouped(defaults)) == defaults
    assert grouped({"dropout": 0.2, "layer_norm_eps": 1e-12}) == {
        "dropout": 0.2,
        "architecture": {"layer_norm_eps": 1e-12},
    }


def test_former_train_keywords_reach_the_plan_with_a_warning(cells):
    model = ScForge(cells, **TINY)
    fit = {"max_epochs": 1, "batch_size": 64, "enable_progress_bar": False, "logger": False}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.train(**fit, lr=2e-3, gradient_clip=0.5, num_workers=0)
    assert _future_warnings(caught) == [
        "train(lr=...) is now train(plan_kwargs={'lr': ...})",
        "train(num_workers=...) is now train(datasplitter_kwargs={'num_workers': ...})",
        "train(gradient_clip=...) is now train(gradient_clip_val=...)",
    ]
    assert model.trainer.lightning_module.lr == 2e-3
    assert model.trainer.gradient_clip_val == 0.5
