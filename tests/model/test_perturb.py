"""ScForgePerturb end to end on a small semi-synthetic screen built from pbmc68k cells."""

from __future__ import annotations

import json
import math

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from helpers import CELL_TYPE, CONTROL, PERT, QUIET
from helpers import PERTURB_TINY as TINY
from scforge_scvi import ScForge
from scforge_scvi.model._cell_encoder import ScForgeCellEncoder
from scforge_scvi.perturb._data import assign_perturbation_split, read_perturbation_h5ad
from scforge_scvi.perturb._metrics import (
    aggregate_metrics,
    control_mean_baseline,
    evaluate_perturbation_predictions,
    log1p_anndata,
)
from scforge_scvi.perturb._model import ScForgePerturb
from scforge_scvi.perturb._sets import PerturbSetDataModule
from scforge_scvi.train._schedules import cosine_with_warmup

FEWSHOT = "CD14+ Monocyte"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def screen(make_screen) -> ad.AnnData:
    """1,200 cells x 200 genes: 3 cell types, 8 perturbations; 2 held out in monocytes."""
    return make_screen(
        cell_types=["CD14+ Monocyte", "Dendritic", "CD19+ B"],
        n_genes=200,
        n_perturbations=8,
        n_cells_per_perturbation=40,
        n_controls_per_cell_type=80,
        n_programs=4,
        program_effect=2.5,  # strong programs: at this size weaker ones drown in sampling noise
        n_test=2,
        n_val=1,
        fewshot_cell_types=[FEWSHOT],
    )


@pytest.fixture
def adata(screen) -> ad.AnnData:
    data = screen.copy()
    ScForgePerturb.setup_anndata(data, PERT, CONTROL, cell_type_key=CELL_TYPE)
    return data


class LearningRates(Callback):
    """Learning rate of each parameter set at every training step."""

    def __init__(self) -> None:
        self.rates: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        groups = trainer.optimizers[0].param_groups
        self.rates.append({g["param_set"]: g["lr"] for g in groups})


class StopAfter(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


class BackboneSnapshots(Callback):
    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.weights.append(pl_module.module.blocks[0].attn.q_proj.weight.detach().clone())


def _held_out(adata: ad.AnnData) -> ad.AnnData:
    split = adata.obs["split"].astype(str)
    keep = (split == "test") | ((adata.obs[CELL_TYPE] == FEWSHOT) & (adata.obs[PERT] == CONTROL))
    return adata[keep.to_numpy()].copy()


def first_perturbation(adata: ad.AnnData) -> str:
    return next(p for p in adata.obs[PERT].cat.categories if p != CONTROL)


# ----------------------------------------------------------------------------- bad input
def test_setup_errors_name_the_problem(screen):
    data = screen.copy()
    with pytest.raises(ValueError, match=r"'control'.*available categories.*non-targeting"):
        ScForgePerturb.setup_anndata(data, PERT, "control", cell_type_key=CELL_TYPE)
    with pytest.raises(KeyError, match=r"'guide'.*available columns"):
        ScForgePerturb.setup_anndata(data, "guide", CONTROL)
    no_ctrl = data[
        ~((data.obs[CELL_TYPE] == "Dendritic") & (data.obs[PERT] == CONTROL)).to_numpy()
    ].copy()
    with pytest.raises(ValueError, match=r"No 'non-targeting' control cells.*Dendritic"):
        ScForgePerturb.setup_anndata(no_ctrl, PERT, CONTROL, cell_type_key=CELL_TYPE)
    empty = data.copy()
    empty.obs[PERT] = empty.obs[PERT].cat.add_categories(["GHOST"])
    with pytest.raises(ValueError, match=r"\['GHOST'\] .* have no cells"):
        ScForgePerturb.setup_anndata(empty, PERT, CONTROL, cell_type_key=CELL_TYPE)
    logged = log1p_anndata(data)
    with pytest.raises(ValueError, match="non-integer"):
        ScForgePerturb.setup_anndata(logged, PERT, CONTROL)


def test_perturbation_table_must_cover_every_perturbation(adata):
    perts = [p for p in adata.obs[PERT].cat.categories if p != CONTROL]
    table = pd.DataFrame(np.random.default_rng(0).normal(size=(len(perts), 5)), index=perts)
    with pytest.raises(ValueError, match=rf"\['{perts[-1]}'\].*missing from the perturbation"):
        ScForgePerturb(adata, **TINY, perturbation_features=table.iloc[:-1])
    model = ScForgePerturb(adata, **TINY, perturbation_features=table)  # control needs no row
    assert model.module.config.perturbation_features == "table"
    enc = model.module.perturbation_encoder
    np.testing.assert_allclose(
        enc.table[model.perturbations_.index(perts[0])], table.loc[perts[0]], rtol=1e-6
    )


# ------------------------------------------------------------------- training, prediction
def test_train_predict_and_beat_the_control_mean(adata):
    torch.manual_seed(0)
    model = ScForgePerturb(adata, **TINY)
    model.train(max_epochs=30, lr=3e-3, sets_per_batch=8, split_key="split", **QUIET)
    history = model.history["train_loss"]["train_loss"].astype(float).to_numpy()
    assert history[-3:].mean() < 0.95 * history[:3].mean()
    val = model.history["validation_loss"]["validation_loss"].astype(float).to_numpy()
    for term in ("train_energy", "train_mean_mse", "validation_energy", "validation_mean_mse"):
        assert term in model.history
    assert model.best_epoch_ == int(np.argmin(val))
    assert model.best_validation_loss_ == pytest.approx(val.min(), rel=1e-5)

    held_out = _held_out(adata)
    pred = model.predict(held_out, n_cells="observed")
    assert list(pred.var_names) == list(adata.var_names)
    assert (pred.X >= 0).all()
    real = log1p_anndata(held_out)

    def group_sizes(obs: pd.DataFrame) -> dict:
        return obs[[PERT, CELL_TYPE]].astype(str).value_counts().to_dict()

    assert group_sizes(pred.obs) == group_sizes(real.obs)  # same cells per group
    controls = pred.obs[PERT] == CONTROL
    assert not pred.obs.loc[controls, "scforge_predicted"].any()
    np.testing.assert_allclose(
        pred.X[controls.to_numpy()], real.X[(real.obs[PERT] == CONTROL).to_numpy()].toarray()
    )

    kw = {"perturbation_key": PERT, "control_label": CONTROL, "cell_type_key": CELL_TYPE}
    ours = aggregate_metrics(evaluate_perturbation_predictions(real, model.predict(held_out), **kw))
    base = aggregate_metrics(
        evaluate_perturbation_predictions(real, control_mean_baseline(real, **kw), **kw)
    )
    # held-out perturbations in monocytes, seen in the other two cell types: the predicted
    # pseudobulks are closer to the truth than "no effect"
    assert ours["mse"] < 0.85 * base["mse"]
    assert ours["mae"] < base["mae"]
    assert ours["pearson_delta"] > 0.3  # the control mean predicts no change at all

    every = model.predict(held_out, perturbations=[first_perturbation(adata)], n_cells=5)
    assert set(every.obs[PERT]) == {first_perturbation(adata), CONTROL}
    assert (every.obs[PERT] == first_perturbation(adata)).sum() == 5


def test_predict_rejects_bad_input(adata):
    model = ScForgePerturb(adata, **TINY)
    held_out = _held_out(adata)
    with pytest.raises(ValueError, match="differ from the model's genes"):
        model.predict(held_out[:, held_out.var_names[::-1]].copy())
    with pytest.raises(ValueError, match=r"Unknown perturbations \['NOPE'\]"):
        model.predict(held_out, perturbations=["NOPE"])
    no_controls = held_out[(held_out.obs[PERT] != CONTROL).to_numpy()].copy()
    with pytest.raises(ValueError, match="No 'non-targeting' control cells"):
        model.predict(no_controls)
    with pytest.raises(KeyError, match="'nosplit'"):
        model.train(max_epochs=1, split_key="nosplit")
    bad = np.where(
        (adata.obs[CELL_TYPE] == "Dendritic") & (adata.obs[PERT] == CONTROL), "test", "train"
    )
    adata.obs["bad_split"] = bad
    with pytest.raises(ValueError, match=r"'Dendritic'.*no training-split control cells"):
        model.train(max_epochs=1, split_key="bad_split")
    adata.obs["bad_split"] = "holdout"
    with pytest.raises(ValueError, match=r"\['holdout'\]; valid split values"):
        model.train(max_epochs=1, split_key="bad_split")


# ------------------------------------------------------------------------- checkpoints
def test_best_last_final_and_both_save_formats(adata, tmp_path):
    torch.manual_seed(0)
    model = ScForgePerturb(adata, **TINY)
    model.train(
        max_epochs=4,
        lr=3e-3,
        sets_per_batch=8,
        split_key="split",
        checkpoint_dir=tmp_path / "run",
        **QUIET,
    )
    for name in (
        "best.ckpt",
        "last.ckpt",
        "best/config.json",
        "best/model.safetensors",
        "final/model.safetensors",
    ):
        assert (tmp_path / "run" / name).exists(), name
    config = json.loads((tmp_path / "run" / "best" / "config.json").read_text())
    assert config["genes"] == list(adata.var_names)

    best = {k: v.clone() for k, v in model.module.state_dict().items()}
    model.use_checkpoint("final")
    final = model.module.state_dict()
    model.use_checkpoint("last")
    last = model.module.state_dict()
    assert all(torch.equal(final[k], last[k]) for k in final)  # training ran to the end
    held_out = _held_out(adata)
    pred_best = model.predict(held_out, seed=1)  # "best" by default
    assert all(torch.equal(best[k], v) for k, v in model.module.state_dict().items())

    loaded = ScForgePerturb.from_pretrained(tmp_path / "run" / "best", adata)
    assert not loaded.init_report_["initialised"] and not loaded.init_report_["skipped_shape"]
    np.testing.assert_allclose(
        loaded.predict(held_out, seed=1).X, pred_best.X, rtol=1e-5, atol=1e-6
    )

    model.save(tmp_path / "scvi_save")
    reloaded = ScForgePerturb.load(tmp_path / "scvi_save", adata=adata)
    np.testing.assert_allclose(
        reloaded.predict(held_out, seed=1).X, pred_best.X, rtol=1e-5, atol=1e-6
    )


def test_init_from_restarts_the_schedule_and_resume_continues_it(adata, tmp_path):
    run = tmp_path / "run"
    settings = {
        "max_epochs": 4,
        "lr": 1e-2,
        "warmup_steps": 3,
        "sets_per_batch": 8,
        "split_key": "split",
        "checkpoint_dir": run,
    }
    first = LearningRates()
    torch.manual_seed(0)
    ScForgePerturb(adata, **TINY).train(callbacks=[first, StopAfter(1)], **settings, **QUIET)
    steps_per_epoch = len(first.rates) // 2
    total = 4 * steps_per_epoch

    def scheduled(step: int) -> float:
        return 1e-2 * cosine_with_warmup(step, warmup_steps=3, total_steps=total)

    assert [r["heads"] for r in first.rates] == pytest.approx(
        [scheduled(s) for s in range(len(first.rates))]
    )

    # resume: the step, optimizer and schedule continue where the checkpoint stopped
    resumed_rates = LearningRates()
    resumed = ScForgePerturb(adata, **TINY)
    resumed.train(callbacks=[resumed_rates], resume_from=run / "last.ckpt", **settings, **QUIET)
    start = 2 * steps_per_epoch
    assert len(resumed_rates.rates) == total - start
    assert resumed_rates.rates[0]["heads"] == pytest.approx(scheduled(start))
    assert resumed.trainer.global_step == total

    # init-from: weights only; the new run starts at step 0 of a fresh warmup
    checkpoint_state = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    finetune_rates = LearningRates()
    finetuned = ScForgePerturb.from_pretrained(run / "last.ckpt", adata)
    weight = "decoder.linear2.weight"
    torch.testing.assert_close(
        finetuned.module.state_dict()[weight], checkpoint_state["state_dict"][f"module.{weight}"]
    )
    finetuned.train(
        callbacks=[finetune_rates],
        max_epochs=2,
        lr=1e-2,
        warmup_steps=3,
        sets_per_batch=8,
        split_key="split",
        **QUIET,
    )
    assert finetune_rates.rates[0]["heads"] == pytest.approx(1e-2 / 4)  # (0 + 1) / (3 + 1)
    assert not math.isclose(finetune_rates.rates[0]["heads"], scheduled(start))
    assert finetuned.trainer.global_step == 2 * steps_per_epoch

    with pytest.raises(ValueError, match=r"training.lr: 0.01 -> 0.005.*from_pretrained"):
        ScForgePerturb(adata, **TINY).train(
            resume_from=run / "last.ckpt", **{**settings, "lr": 5e-3}
        )


def test_freeze_then_unfreeze_and_frozen_new_parameters(adata, tmp_path):
    torch.manual_seed(0)
    source = ScForgePerturb(adata, **TINY)
    source.train(max_epochs=2, sets_per_batch=8, split_key="split", **QUIET)
    source.save_pretrained(tmp_path / "pretrained", checkpoint="best")

    with pytest.raises(ValueError, match="newly initialised backbone"):
        ScForgePerturb(adata, **TINY).train(max_epochs=1, freeze_backbone=True)

    deeper = ScForgePerturb.from_pretrained(tmp_path / "pretrained", adata, num_layers=2)
    assert any(k.startswith("blocks.1.") for k in deeper.init_report_["initialised"])
    with pytest.raises(ValueError, match="newly initialised backbone"):
        deeper.train(max_epochs=1, freeze_backbone=True)

    wider = ScForgePerturb.from_pretrained(tmp_path / "pretrained", adata, ffn_dim=48)
    skipped = wider.init_report_["skipped_shape"]
    assert any(k.startswith("blocks.0.ffn.") and "checkpoint (" in k for k in skipped), skipped
    assert "blocks.0.attn.q_proj.weight" in wider.init_report_["loaded"]
    with pytest.raises(ValueError, match=r"newly initialised backbone.*blocks\.0\.ffn"):
        wider.train(max_epochs=1, freeze_backbone=True)

    model = ScForgePerturb.from_pretrained(tmp_path / "pretrained", adata)
    loaded = model.module.blocks[0].attn.q_proj.weight.detach().clone()
    rates, snapshots = LearningRates(), BackboneSnapshots()
    model.train(
        max_epochs=2,
        lr=1e-2,
        warmup_steps=2,
        freeze_backbone=True,
        freeze_backbone_epochs=1,
        sets_per_batch=8,
        split_key="split",
        callbacks=[rates, snapshots],
        **QUIET,
    )
    per_epoch = len(rates.rates) // 2
    assert torch.equal(snapshots.weights[0], loaded)  # frozen during epoch 0
    assert not torch.equal(snapshots.weights[1], loaded)  # trained after unfreezing
    assert all(r["backbone"] == 0.0 for r in rates.rates[:per_epoch])
    assert rates.rates[per_epoch]["backbone"] == pytest.approx(1e-2 / 3)  # fresh warmup
    assert rates.rates[0]["heads"] == pytest.approx(1e-2 / 3)


# ------------------------------------------------------------- data layouts and options
def test_cell_load_reader_and_zero_shot_split(screen, tmp_path):
    path = tmp_path / "screen.h5ad"
    screen.write_h5ad(path)
    data = read_perturbation_h5ad(
        path, perturbation_key=PERT, control_label=CONTROL, cell_type_key=CELL_TYPE
    )
    assert data.shape == screen.shape
    with pytest.raises(ValueError, match="available categories"):
        read_perturbation_h5ad(path, perturbation_key=PERT, control_label="NT", cell_type_key=None)

    split = assign_perturbation_split(data, PERT, CONTROL, CELL_TYPE, test_cell_types=["CD19+ B"])
    is_b = (data.obs[CELL_TYPE] == "CD19+ B").to_numpy()
    assert (split[is_b] == "test").all() and (split[~is_b] == "train").all()
    ScForgePerturb.setup_anndata(data, PERT, CONTROL, cell_type_key=CELL_TYPE)
    model = ScForgePerturb(data, **TINY)
    model.train(max_epochs=1, sets_per_batch=8, split_key="split", **QUIET)
    pred = model.predict(data[is_b].copy())
    assert set(pred.obs[CELL_TYPE]) == {"CD19+ B"}
    assert pred.obs.loc[pred.obs["scforge_predicted"], PERT].nunique() == 8


def test_batches_and_a_pluggable_counts_encoder(screen):
    class LogCounts(torch.nn.Module):  # stands in for a pretrained cell encoder
        def __init__(self, n_genes: int) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(n_genes, 12)

        def forward(self, counts: torch.Tensor) -> torch.Tensor:
            return self.proj(torch.log1p(counts))

    data = screen.copy()
    data.obs["batch"] = np.where(np.arange(data.n_obs) % 2 == 0, "b0", "b1")
    ScForgePerturb.setup_anndata(data, PERT, CONTROL, cell_type_key=CELL_TYPE, batch_key="batch")
    model = ScForgePerturb(
        data, **TINY, basal_encoder=LogCounts(data.n_vars), basal_dim=12, basal_input="counts"
    )
    assert model.module.config.n_batches == 2
    # the encoder's own weights count as loaded, so its part of the backbone may be frozen
    assert not any(k.startswith("basal_encoder.") for k in model._fresh_parameters)
    model.train(max_epochs=1, sets_per_batch=8, split_key="split", **QUIET)
    pred = model.predict(_held_out(data), n_cells=4)
    assert {"batch", CELL_TYPE, PERT} <= set(pred.obs.columns)
    assert (pred.X >= 0).all()


def test_from_pretrained_matches_genes_by_name(adata, tmp_path):
    torch.manual_seed(0)
    source = ScForgePerturb(adata, **TINY)
    source.train(max_epochs=1, sets_per_batch=8, split_key="split", **QUIET)
    source.save_pretrained(tmp_path / "pretrained", checkpoint="best")
    reordered = adata[:, adata.var_names[::-1]].copy()
    ScForgePerturb.setup_anndata(reordered, PERT, CONTROL, cell_type_key=CELL_TYPE)
    model = ScForgePerturb.from_pretrained(tmp_path / "pretrained", reordered)
    assert any(
        r.startswith("decoder.linear2.weight (200/200 genes")
        for r in model.init_report_["remapped"]
    )
    old = source.module.decoder.linear2.weight.detach()
    new = model.module.decoder.linear2.weight.detach()
    torch.testing.assert_close(new, old.flip(0))  # row j of the new model is gene j's row


def test_fewshot_split_holds_out_perturbations_in_one_cell_type(screen):
    split = screen.obs["split"].astype(str)
    perts = list(screen.uns["perturbation_truth"]["perturbations"])
    in_fewshot = (screen.obs[CELL_TYPE] == FEWSHOT).to_numpy()
    pert = screen.obs[PERT].astype(str).to_numpy()
    assert set(split[in_fewshot & np.isin(pert, perts[:2])]) == {"test"}
    assert set(split[in_fewshot & (pert == perts[2])]) == {"val"}
    assert set(split[in_fewshot & (pert == CONTROL)]) == {"train"}  # controls stay in training
    assert set(split[~in_fewshot]) == {"train"}  # other cell types see every perturbation


def test_basal_cells_are_controls_of_the_same_cell_type_and_batch(screen):
    data = screen.copy()
    data.obs["batch"] = np.where(np.arange(data.n_obs) % 3 == 0, "b0", "b1")
    ScForgePerturb.setup_anndata(data, PERT, CONTROL, cell_type_key=CELL_TYPE, batch_key="batch")
    model = ScForgePerturb(data, **TINY)
    cells = model._read_cells(data)
    split = data.obs["split"].astype(str).to_numpy()
    control = model.perturbations_.index(CONTROL)
    module = PerturbSetDataModule(
        cells,
        split,
        control,
        set_len=16,
        sets_per_batch=8,
        seed=0,
        with_batch=True,
        with_counts=False,
        names={"cell_type": model.cell_types_, "batch": model.batches_},
    )
    for stage, sets in (("train", module.train_sets), ("val", module.val_sets)):
        target, basal, group = sets.target, sets.basal, sets.group
        assert len(group) > 0
        assert (split[target] == stage).all()
        assert (cells.perturbation[basal] == control).all()
        if stage == "train":  # training never reads a held-out cell, not even as basal input
            assert (split[basal] == "train").all()
        assert (cells.perturbation[target] == sets.group_perturbation[group][:, None]).all()
        for key in ("cell_type", "batch"):
            codes = getattr(cells, key)
            assert (codes[basal] == codes[target][:, :1]).all(), (stage, key)
            assert (codes[target] == codes[target][:, :1]).all(), (stage, key)
    train = module.train_sets
    batch = train[0]
    assert batch["basal"].shape == batch["target"].shape == (8, 16, data.n_vars)
    np.testing.assert_array_equal(batch["batch"].numpy(), train.group_batch[train.group[:8]])


def test_scforge_backbone_as_basal_encoder(screen, tmp_path):
    counts = screen.copy()
    ScForge.setup_anndata(counts)
    torch.manual_seed(0)
    scforge = ScForge(counts, hidden_dim=32, num_layers=1, num_heads=2, max_genes=64, dropout=0.0)
    source = {k: v.clone() for k, v in scforge.module.backbone.state_dict().items()}

    data = screen.copy()
    ScForgePerturb.setup_anndata(data, PERT, CONTROL, cell_type_key=CELL_TYPE)
    encoder = ScForgeCellEncoder.from_scforge(scforge, data)
    with pytest.raises(ValueError, match="basal_input='counts'"):
        ScForgePerturb(data, **TINY, basal_encoder=encoder)
    model = ScForgePerturb(data, **TINY, basal_encoder=encoder, basal_input="counts")
    assert model.module.config.basal_dim == 32  # the backbone's cell-embedding width
    copied = model.module.basal_encoder.backbone.state_dict()
    assert all(torch.equal(copied[k], v) for k, v in source.items())
    assert not any(k.startswith("basal_encoder.") for k in model._fresh_parameters)

    model.train(max_epochs=1, sets_per_batch=8, split_key="split", checkpoint_dir=tmp_path, **QUIET)
    assert (tmp_path / "best.ckpt").exists() and (tmp_path / "last.ckpt").exists()
    assert model.trainer.gradient_clip_val == 1.0
    decay = {g["weight_decay"] for g in model.trainer.optimizers[0].param_groups}
    assert decay == {0.0, 0.01}  # biases, norms and embeddings are not decayed
    tuned = model.module.basal_encoder.backbone.state_dict()
    assert not all(torch.equal(tuned[k], source[k]) for k in source)  # fine-tuned
    untouched = scforge.module.backbone.state_dict()
    assert all(torch.equal(untouched[k], v) for k, v in source.items())  # the source model
    pred = model.predict(_held_out(data), n_cells=4)
    assert list(pred.var_names) == list(data.var_names)
    assert (pred.X >= 0).all()
