"""Fine-tuning ScForge for cell-type annotation on real PBMCs: strategies, predictions,
class-name round trips, LoRA adapters and plots.

One tiny model is pretrained once per module and fine-tuned from its directory, as a user
would; the strategy tests run on a 300-cell subset to stay fast.
"""

from __future__ import annotations

import logging
import warnings

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch import Callback
from safetensors.torch import load_file

from scforge_scvi import ScForge
from scforge_scvi._logging import logger
from scforge_scvi.train._lora import lora_layer_names

matplotlib.use("Agg")

TINY = {
    "hidden_dim": 32,
    "num_layers": 1,
    "num_heads": 2,
    "max_genes": 64,
    "head_hidden_dim": 32,
    "dropout": 0.0,
}
FIT = {"batch_size": 64, "enable_progress_bar": False}


# -- fixtures ----------------------------------------------------------------------------------
class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def scforge_log():
    """Messages of the package logger (it does not propagate to the root logger)."""
    handler = _Records()
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory, _pbmc68k_counts_once):
    adata = _pbmc68k_counts_once.copy()
    ScForge.setup_anndata(adata, layer="counts")
    model = ScForge(adata, **TINY)
    model.train(max_epochs=2, **FIT, plan_kwargs={"lr": 3e-3})
    path = tmp_path_factory.mktemp("pretrained") / "base"
    model.save_pretrained(str(path))
    assert "val_perplexity" in model.history  # no labels registered: masked-gene pretraining
    return path


@pytest.fixture
def subset(_pbmc68k_counts_once):
    """300 random PBMCs registered with their louvain labels."""
    idx = np.random.default_rng(0).choice(_pbmc68k_counts_once.n_obs, 300, replace=False)
    adata = _pbmc68k_counts_once[np.sort(idx)].copy()
    ScForge.setup_anndata(adata, layer="counts", labels_key="louvain")
    return adata


class _Snapshots(Callback):
    """Backbone/head weights after each training epoch and the optimizer's parameters."""

    def __init__(self) -> None:
        self.backbone: list[dict[str, torch.Tensor]] = []
        self.head: list[dict[str, torch.Tensor]] = []
        self.optimized: set[int] = set()
        self.frozen_at_start: bool | None = None

    @staticmethod
    def _copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def on_train_start(self, trainer, pl_module) -> None:
        for group in trainer.optimizers[0].param_groups:
            self.optimized.update(id(p) for p in group["params"])
        self.frozen_at_start = not any(
            p.requires_grad for p in pl_module.module.backbone.parameters()
        )

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.backbone.append(self._copy(pl_module.module.backbone))
        self.head.append(self._copy(pl_module.module.classifier))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _finetune(path, adata, *, epochs=1, callbacks=(), **kwargs) -> ScForge:
    model = ScForge.from_pretrained(str(path), adata)
    model.train(
        max_epochs=epochs, callbacks=list(callbacks), **FIT, **kwargs, plan_kwargs={"lr": 3e-3}
    )
    return model


@pytest.fixture(scope="module")
def finetuned(pretrained_dir, _pbmc68k_counts_once):
    """Gradual unfreezing on all 700 cells with a held-out test split (15 %)."""
    adata = _pbmc68k_counts_once.copy()
    ScForge.setup_anndata(adata, layer="counts", labels_key="louvain")
    snapshots, log = _Snapshots(), _Records()
    base = {
        k: v.clone()
        for k, v in ScForge.from_pretrained(str(pretrained_dir), adata)
        .module.backbone.state_dict()
        .items()
    }
    logger.addHandler(log)
    try:
        model = _finetune(
            pretrained_dir,
            adata,
            epochs=4,
            strategy="gradual_unfreeze",
            freeze_backbone_epochs=1,
            train_size=0.7,
            validation_size=0.15,
            class_weights=None,  # accuracy is what the tests below compare with the majority
            callbacks=[snapshots],
        )
    finally:
        logger.removeHandler(log)
    return {
        "model": model,
        "adata": adata,
        "snapshots": snapshots,
        "log": log.messages,
        "base": base,
    }


# -- 1. objective ------------------------------------------------------------------------------
def test_labels_default_to_classification_and_objective_overrides(pretrained_dir, subset):
    model = ScForge.from_pretrained(str(pretrained_dir), subset)
    head = _Snapshots._copy(model.module.classifier)
    model.train(max_epochs=1, objective="pretrain", **FIT)
    assert "val_perplexity" in model.history and "val_acc" not in model.history
    assert _same(head, _Snapshots._copy(model.module.classifier))  # head untouched

    model = ScForge.from_pretrained(str(pretrained_dir), subset)
    model.train(max_epochs=1, **FIT)  # labels registered: classify by default
    assert "val_acc" in model.history and "val_perplexity" not in model.history
    assert not _same(head, _Snapshots._copy(model.module.classifier))


# -- 2. strategies -----------------------------------------------------------------------------
def test_frozen_trains_the_head_only(pretrained_dir, subset):
    snapshots = _Snapshots()
    model = ScForge.from_pretrained(str(pretrained_dir), subset)
    backbone = _Snapshots._copy(model.module.backbone)
    head = _Snapshots._copy(model.module.classifier)
    model.train(
        max_epochs=1, strategy="frozen", callbacks=[snapshots], **FIT, plan_kwargs={"lr": 3e-3}
    )
    assert _same(backbone, snapshots.backbone[-1])
    assert not _same(head, snapshots.head[-1])


def test_full_trains_the_backbone(pretrained_dir, subset):
    snapshots = _Snapshots()
    model = ScForge.from_pretrained(str(pretrained_dir), subset)
    backbone = _Snapshots._copy(model.module.backbone)
    model.train(
        max_epochs=1, strategy="full", callbacks=[snapshots], **FIT, plan_kwargs={"lr": 3e-3}
    )
    assert not _same(backbone, snapshots.backbone[-1])


def test_gradual_unfreezing_trains_the_backbone_after_the_frozen_epochs(finetuned):
    snapshots, model = finetuned["snapshots"], finetuned["model"]
    assert snapshots.frozen_at_start
    backbone_params = {id(p) for p in model.module.backbone.parameters()}
    assert backbone_params <= snapshots.optimized  # in the optimizer from the first step
    assert _same(finetuned["base"], snapshots.backbone[0])  # frozen during epoch 0
    assert not _same(finetuned["base"], snapshots.backbone[-1])
    assert "Unfreezing backbone at epoch 1" in finetuned["log"]


class _LoraGradients(Callback):
    """Which adapter / base weights ever received a non-zero gradient."""

    def __init__(self) -> None:
        self.nonzero: dict[str, bool] = {}

    def on_after_backward(self, trainer, pl_module) -> None:
        for name, p in pl_module.module.backbone.named_parameters():
            if "lora_" in name or name.endswith("base_layer.weight"):
                got = p.grad is not None and bool(p.grad.abs().sum() > 0)
                self.nonzero[name] = self.nonzero.get(name, False) or got


@pytest.fixture(scope="module")
def lora_model(pretrained_dir, _pbmc68k_counts_once):
    adata = _pbmc68k_counts_once[::2].copy()
    ScForge.setup_anndata(adata, layer="counts", labels_key="louvain")
    grads = _LoraGradients()
    model = ScForge.from_pretrained(str(pretrained_dir), adata)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.train(
            max_epochs=1,
            strategy="lora",
            freeze_backbone_epochs=1,
            lora={"rank": 4, "dropout": 0.0},
            callbacks=[grads],
            **FIT,
            plan_kwargs={"lr": 3e-3},
        )
    return {"model": model, "adata": adata, "grads": grads, "warnings": caught}


def test_lora_adapts_every_target_and_nothing_else(lora_model):
    model, grads = lora_model["model"], lora_model["grads"]
    layers = lora_layer_names(model.module.backbone)
    assert {name.rsplit(".", 1)[-1] for name in layers} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        "linear1",
        "linear2",
    }
    for layer in layers:
        assert grads.nonzero[f"{layer}.lora_A.default.weight"], layer
        assert grads.nonzero[f"{layer}.lora_B.default.weight"], layer
        assert not grads.nonzero[f"{layer}.base_layer.weight"], layer
    messages = [str(w.message) for w in lora_model["warnings"] if w.category is UserWarning]
    assert any("freeze_backbone_epochs is ignored" in m for m in messages)


# -- 3. held-out accuracy ----------------------------------------------------------------------
def test_finetuned_model_beats_the_majority_class_on_held_out_cells(finetuned):
    model, adata = finetuned["model"], finetuned["adata"]
    test = model.test_indices_
    assert len(test) > 90 and not set(test) & set(model.train_indices_)
    result = model.evaluate()
    assert {"accuracy", "macro_f1", "weighted_f1", "per_class_f1", "confusion"} <= set(result)
    truth = adata.obs["louvain"].to_numpy()[test]
    majority = pd.Series(truth).value_counts(normalize=True).max()
    assert result["accuracy"] > majority + 0.15, (result["accuracy"], majority)
    assert result["confusion"].to_numpy().sum() == len(test)
    assert 0 < result["macro_f1"] <= 1 and set(result["per_class_f1"]) == set(model.class_names_)


# -- 4. predict --------------------------------------------------------------------------------
def test_predict_writes_categorical_predictions_and_probabilities(finetuned):
    model, adata = finetuned["model"], finetuned["adata"].copy()
    ScForge.setup_anndata(adata, layer="counts", labels_key="louvain")
    model.predict(adata)
    pred = adata.obs["scforge_prediction"]
    assert isinstance(pred.dtype, pd.CategoricalDtype)
    assert list(pred.cat.categories) == model.class_names_
    conf = adata.obs["scforge_confidence"].to_numpy()
    assert ((conf >= 0) & (conf <= 1)).all()
    probs = adata.obsm["scforge_probabilities"]
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs.max(1), conf, atol=1e-6)


def test_predictions_ignore_gene_order_and_need_no_labels(finetuned, _pbmc68k_counts_once):
    model = finetuned["model"]
    reference = model.predict(finetuned["adata"], return_probabilities=True)

    query = _pbmc68k_counts_once.copy()
    del query.obs["louvain"]  # a query without the label column
    rng = np.random.default_rng(1)
    query = query[:, rng.permutation(query.n_vars)].copy()
    probs = model.predict(query, return_probabilities=True)
    np.testing.assert_allclose(probs.to_numpy(), reference.to_numpy(), atol=1e-6)
    assert "louvain" not in query.obs  # the user's obs is not filled in
    assert (query.obs["scforge_prediction"] == finetuned["adata"].obs["scforge_prediction"]).all()


def test_a_gene_subset_predicts_as_if_the_missing_genes_were_not_detected(
    finetuned, _pbmc68k_counts_once
):
    model = finetuned["model"]
    keep = np.random.default_rng(2).random(_pbmc68k_counts_once.n_vars) < 0.8
    subset = _pbmc68k_counts_once[:, keep].copy()
    zeroed = _pbmc68k_counts_once.copy()
    counts = zeroed.layers["counts"].tolil()
    counts[:, np.flatnonzero(~keep)] = 0
    zeroed.layers["counts"] = counts.tocsr()
    for query in (subset, zeroed):
        ScForge.setup_anndata(query, layer="counts")
    np.testing.assert_allclose(
        model.predict(subset, return_probabilities=True).to_numpy(),
        model.predict(zeroed, return_probabilities=True).to_numpy(),
        atol=1e-6,
    )


def test_prediction_without_overlapping_genes_is_refused(finetuned, _pbmc68k_counts_once):
    from scforge_scvi.data import VocabCoverageError

    query = _pbmc68k_counts_once.copy()
    query.var_names = [f"UNKNOWN_{i}" for i in range(query.n_vars)]
    ScForge.setup_anndata(query, layer="counts")
    with pytest.raises(VocabCoverageError, match=r"Only 0\.0% \(0 of 765\)"):
        finetuned["model"].predict(query)
    assert "scforge_prediction" not in query.obs


def test_rare_classes_are_warned_about_and_kept_out_of_stratification(pretrained_dir, subset):
    labels = subset.obs["louvain"].astype(str).to_numpy()
    labels[0] = "singleton"
    subset.obs["cell_type"] = pd.Categorical(labels)
    ScForge.setup_anndata(subset, layer="counts", labels_key="cell_type")
    model = ScForge.from_pretrained(str(pretrained_dir), subset)
    with pytest.warns(UserWarning, match=r"fewer than 3 cells.*'singleton'"):
        model.train(max_epochs=1, train_size=0.7, validation_size=0.15, **FIT)
    assert "singleton" in model.class_names_  # kept as a class, not dropped
    splits = (model.train_indices_, model.validation_indices_, model.test_indices_)
    assert sum(map(len, splits)) == subset.n_obs
    # the other classes are still stratified: each appears in the test split in proportion
    test_labels = pd.Series(labels[model.test_indices_]).value_counts(normalize=True)
    overall = pd.Series(labels).value_counts(normalize=True)
    common = overall[overall > 0.1].index
    np.testing.assert_allclose(test_labels[common], overall[common], atol=0.03)


def _partly_unlabelled(cells, marker):
    """300 PBMCs whose ``cell_type`` is their louvain label, or ``marker`` for 30 % of them."""
    idx = np.random.default_rng(0).choice(cells.n_obs, 300, replace=False)
    adata = cells[np.sort(idx)].copy()
    labels = adata.obs["louvain"].astype(object).to_numpy()
    hidden = np.random.default_rng(1).random(adata.n_obs) < 0.3
    labels[hidden] = marker
    adata.obs["cell_type"] = pd.Categorical(labels)  # np.nan stays a missing value
    ScForge.setup_anndata(adata, layer="counts", labels_key="cell_type")
    return adata, hidden


def test_nan_labels_train_exactly_like_the_unlabelled_category(
    pretrained_dir, _pbmc68k_counts_once, tmp_path
):
    missing, hidden = _partly_unlabelled(_pbmc68k_counts_once, np.nan)
    marked, _ = _partly_unlabelled(_pbmc68k_counts_once, "Unknown")
    column = missing.obs["cell_type"].copy()
    assert column.isna().sum() == hidden.sum() > 0
    models = []
    for adata in (missing, marked):
        torch.manual_seed(0)  # the same initial classification head
        model = ScForge.from_pretrained(str(pretrained_dir), adata)
        model.train(
            max_epochs=2, train_size=0.7, validation_size=0.15, **FIT, plan_kwargs={"lr": 3e-3}
        )
        models.append(model)
    model, reference = models
    pd.testing.assert_series_equal(missing.obs["cell_type"], column)  # never modified
    assert model.class_names_ == reference.class_names_
    assert "Unknown" not in model.class_names_
    for split in ("train_indices_", "validation_indices_", "test_indices_"):
        np.testing.assert_array_equal(getattr(model, split), getattr(reference, split))
    # the same split, and every weight identical to training with the cells marked "Unknown"
    assert _same(model.module.state_dict(), reference.module.state_dict())

    # cells with a missing label carry the code past the last class: no part in the loss
    module = model.module
    tensors = next(iter(model._loader(missing, np.flatnonzero(hidden)[:8])))
    assert (tensors["labels"] == len(model.class_names_)).all()
    out = module.loss(
        tensors, module.inference(**module._get_inference_input(tensors)), {}, objective="classify"
    )
    assert out.n_obs_minibatch == 0 and float(out.loss) == 0.0

    # still predicted, and left out of the evaluation
    model.predict()
    pred = missing.obs["scforge_prediction"]
    assert pred[hidden].notna().all() and set(pred.cat.categories) == set(model.class_names_)
    metrics = model.evaluate()
    assert metrics["n_cells"] == int((~hidden[model.test_indices_]).sum()) > 0
    expected = reference.evaluate()
    assert (metrics["n_cells"], metrics["accuracy"]) == (expected["n_cells"], expected["accuracy"])

    # a query with missing labels, never set up, is predicted through the model's setup
    probs = model.predict(missing, return_probabilities=True).to_numpy()
    query = _pbmc68k_counts_once[missing.obs_names].copy()
    query.obs["cell_type"] = column
    query_probs = model.predict(query, return_probabilities=True).to_numpy()
    np.testing.assert_allclose(query_probs, probs, atol=1e-6)
    pd.testing.assert_series_equal(query.obs["cell_type"], column)

    # save/load and from_pretrained onto data with missing labels keep the fitted head
    model.save(str(tmp_path / "model"), save_anndata=False)
    loaded_on = query.copy()
    loaded = ScForge.load(str(tmp_path / "model"), adata=loaded_on)
    assert loaded.class_names_ == model.class_names_
    np.testing.assert_allclose(
        loaded.predict(loaded_on, return_probabilities=True).to_numpy(), probs, atol=1e-6
    )
    model.save_pretrained(str(tmp_path / "pretrained"))
    again, _ = _partly_unlabelled(_pbmc68k_counts_once, np.nan)
    restored = ScForge.from_pretrained(str(tmp_path / "pretrained"), again)
    np.testing.assert_allclose(
        restored.predict(again, return_probabilities=True).to_numpy(), probs, atol=1e-6
    )


def test_unlabelled_cells_are_left_out_of_the_loss_and_still_predicted(pretrained_dir, subset):
    labels = subset.obs["louvain"].astype(str).to_numpy()
    labels[np.random.default_rng(0).random(subset.n_obs) < 0.5] = "Unknown"
    subset.obs["cell_type"] = labels
    ScForge.setup_anndata(subset, layer="counts", labels_key="cell_type")
    model = ScForge.from_pretrained(str(pretrained_dir), subset)
    assert "Unknown" not in model.class_names_
    model.train(max_epochs=1, **FIT, plan_kwargs={"lr": 3e-3})
    model.predict()
    pred = subset.obs["scforge_prediction"]
    assert pred.notna().all() and set(pred.cat.categories) == set(model.class_names_)

    # a minibatch of unlabelled cells contributes nothing to the loss
    module = model.module
    tensors = next(iter(model._loader(subset, np.flatnonzero(labels == "Unknown")[:8])))
    tensors["labels"] = torch.full((8, 1), len(model.class_names_))
    out = module.loss(
        tensors, module.inference(**module._get_inference_input(tensors)), {}, objective="classify"
    )
    assert out.n_obs_minibatch == 0 and float(out.loss) == 0.0


def test_regression_head_learns_a_marker_and_predicts_held_out_cells(_pbmc68k_counts_once):
    """A numeric obs column, the log-normalised LYZ expression, beats the mean on test cells.

    LYZ marks monocytes and ranks among a cell's top genes when it is high, so the rank-value
    tokens carry it (unlike the library size, which the per-cell normalisation removes).
    """
    adata = _pbmc68k_counts_once.copy()
    counts = adata.layers["counts"]
    total = np.asarray(counts.sum(axis=1)).ravel()
    lyz = np.asarray(counts[:, adata.var_names.get_loc("LYZ")].todense()).ravel()
    target = np.log1p(lyz / total * 1e4).astype(np.float32)
    adata.obs["lyz"] = target
    ScForge.setup_anndata(adata, layer="counts", target_key="lyz")
    torch.manual_seed(0)
    model = ScForge(adata, **TINY)
    assert model.module.regressor is not None and model.module.classifier is None
    model.train(max_epochs=8, train_size=0.7, validation_size=0.15, **FIT, plan_kwargs={"lr": 3e-3})
    assert "val_loss" in model.history and "val_perplexity" not in model.history

    model.predict()
    pred = adata.obs["scforge_prediction"].to_numpy()
    assert pred.dtype.kind == "f" and np.isfinite(pred).all()
    test, train = model.test_indices_, model.train_indices_
    mse = np.mean((pred[test] - target[test]) ** 2)
    mean_mse = np.mean((target[train].mean() - target[test]) ** 2)
    assert mse < 0.5 * mean_mse
    assert np.corrcoef(pred[test], target[test])[0, 1] > 0.7

    # a query without the target column is predicted all the same
    query = _pbmc68k_counts_once.copy()
    model.predict(query)
    np.testing.assert_allclose(query.obs["scforge_prediction"].to_numpy(), pred, atol=1e-5)


# -- 5. class names travel with the model ------------------------------------------------------
def test_fine_tuned_head_round_trips_and_resets_for_new_labels(
    finetuned, tmp_path, scforge_log, _pbmc68k_counts_once
):
    model, adata = finetuned["model"], finetuned["adata"]
    model.save_pretrained(str(tmp_path / "ft"))
    reference = model.predict(adata, return_probabilities=True)

    same = _pbmc68k_counts_once.copy()
    ScForge.setup_anndata(same, layer="counts", labels_key="louvain")
    loaded = ScForge.from_pretrained(str(tmp_path / "ft"), same)
    assert loaded.class_names_ == model.class_names_
    probs = loaded.predict(same, return_probabilities=True)
    np.testing.assert_allclose(probs.to_numpy(), reference.to_numpy(), atol=1e-6)
    assert not any("new classification head" in m for m in scforge_log)

    other = _pbmc68k_counts_once.copy()
    ScForge.setup_anndata(other, layer="counts", labels_key="bulk_labels")
    fresh = ScForge.from_pretrained(str(tmp_path / "ft"), other)
    assert set(fresh.class_names_) == set(other.obs["bulk_labels"].astype(str))
    assert any("new classification head is initialised" in m for m in scforge_log)
    np.testing.assert_allclose(  # the backbone is still the fine-tuned one
        fresh.get_latent_representation(), model.get_latent_representation(adata), atol=1e-5
    )


# -- 6. LoRA adapters --------------------------------------------------------------------------
def test_lora_adapter_round_trip(lora_model, pretrained_dir, tmp_path):
    model, adata = lora_model["model"], lora_model["adata"]
    reference = model.predict(adata, return_probabilities=True).to_numpy()

    size = model.save_adapter(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    full_size = (pretrained_dir / "model.safetensors").stat().st_size
    assert size == (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    # the adapters themselves; the task head (classifier, linear path, calibration) comes too
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    adapters = [v for k, v in saved.items() if k.startswith("backbone.")]
    assert sum(v.numel() * v.element_size() for v in adapters) < full_size / 2

    base = ScForge.from_pretrained(str(pretrained_dir), adata)
    before = base.predict(adata, return_probabilities=True).to_numpy()
    base.load_adapter(str(tmp_path / "adapter"))
    after = base.predict(adata, return_probabilities=True).to_numpy()
    np.testing.assert_array_equal(after, reference)
    assert not np.allclose(before, reference)  # the head and adapters came from the file

    model.save_pretrained(str(tmp_path / "merged"))
    merged = ScForge.from_pretrained(str(tmp_path / "merged"), adata)
    assert not lora_layer_names(merged.module.backbone)
    np.testing.assert_allclose(
        merged.predict(adata, return_probabilities=True).to_numpy(), reference, atol=1e-5
    )


def test_adapter_of_a_512_wide_6_layer_model_is_a_few_megabytes(subset, tmp_path):
    """Rank-8 adapters on every attention projection and both feed-forward linears.

    Per block: 4 x 8 x (512 + 512) for q/k/v/out and 2 x 8 x (512 + 2048) for the feed-forward
    pair, 73,728 parameters; 6 blocks hold 442,368 (1.77 MB in float32). The saved file adds
    the classification head (512 -> 256 -> classes), about 0.5 MB, and the buffers of the
    linear path and the calibration (a few floats per vocabulary gene).
    """
    adata = subset[:40].copy()  # few cells and genes: the adapter size depends on neither
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # rare classes in 40 cells
        ScForge.setup_anndata(adata, layer="counts", labels_key="louvain")
        model = ScForge(adata, hidden_dim=512, num_layers=6, num_heads=8, max_genes=4)
        model.train(
            max_epochs=1,
            strategy="lora",
            lora={"rank": 8},
            train_size=0.6,
            batch_size=12,
            enable_progress_bar=False,
        )
    adapter = sum(p.numel() for n, p in model.module.backbone.named_parameters() if "lora_" in n)
    assert adapter == 6 * (4 * 8 * (512 + 512) + 2 * 8 * (512 + 2048)) == 442_368
    head = 4 * sum(p.numel() for p in model.module.classifier.parameters())
    for part in (model.module.linear_path, model.module.calibration):
        head += sum(b.numel() * b.element_size() for b in part.buffers())
    size = model.save_adapter(str(tmp_path / "adapter"))
    assert 4 * adapter + head <= size < 4 * adapter + head + 64_000  # float32 + header
    assert size < 3e6


def test_load_adapter_rejects_other_labels(lora_model, pretrained_dir, tmp_path, subset):
    lora_model["model"].save_adapter(str(tmp_path / "adapter"))
    subset.obs["other"] = subset.obs["bulk_labels"]
    ScForge.setup_anndata(subset, layer="counts", labels_key="other")
    base = ScForge.from_pretrained(str(pretrained_dir), subset)
    with pytest.raises(ValueError, match="fitted for labels"):
        base.load_adapter(str(tmp_path / "adapter"))


def test_classification_keeps_the_epoch_of_best_validation_accuracy(finetuned):
    model = finetuned["model"]
    accuracy = model.history["val_acc"].iloc[:, 0].to_numpy()
    # of equal accuracies the later epoch (trained at a lower learning rate) is kept
    best = len(accuracy) - 1 - int(np.argmax(accuracy[::-1]))
    assert model.best_epoch_ == best


def test_default_epochs_give_similar_step_counts_to_small_and_large_data():
    from scforge_scvi.train._schedules import default_max_epochs

    assert default_max_epochs("pretrain", 10_000, 32) == 10
    small, large = (
        default_max_epochs("classify", 490, 32),
        default_max_epochs("classify", 1_900, 32),
    )
    assert small > large  # fewer cells, more epochs
    for n, epochs in ((490, small), (1_900, large)):
        assert 900 <= epochs * -(-n // 32) <= 1_100  # about 1,000 optimizer steps
    assert default_max_epochs("classify", 10, 32) == 100
    assert default_max_epochs("classify", 1_000_000, 32) == 5
