"""What ScForge.train promises around the optimisation itself, on a tiny model.

Validation masks are the same every epoch, perplexity is logged every epoch, gradients are
clipped to ``gradient_clip``, and the progress bar shows the training and validation losses.
One short run with a learning rate of zero is shared: the weights never change, so any change
of the validation loss between epochs could only come from the masks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback

from helpers import setup_counts
from scforge_scvi import ScForge

TINY = {"hidden_dim": 32, "num_layers": 1, "num_heads": 2, "max_genes": 64}
CLIP = 1e-3


class GradientRecorder(Callback):
    """Gradient norm after every training step, and the progress-bar metrics at the end."""

    def __init__(self) -> None:
        self.norms: list[float] = []
        self.progress_bar: set[str] = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        grads = [p.grad for p in pl_module.module.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    def on_train_end(self, trainer, pl_module) -> None:
        self.progress_bar = set(trainer.progress_bar_metrics)


@pytest.fixture(scope="module")
def run(_pbmc68k_counts_once):
    adata = setup_counts(_pbmc68k_counts_once.copy())
    torch.manual_seed(0)
    model = ScForge(adata, **TINY)
    recorder = GradientRecorder()
    model.train(
        max_epochs=3,
        gradient_clip_val=CLIP,
        batch_size=64,
        limit_train_batches=2,
        callbacks=[recorder],
        enable_progress_bar=False,
        seed=0,
        plan_kwargs={"lr": 0.0},
    )
    return model, recorder


def test_validation_masks_are_identical_every_epoch(run):
    model, _ = run
    val = model.history["val_loss"].to_numpy().ravel().astype(float)
    assert len(val) == 3
    np.testing.assert_allclose(val, val[0], rtol=1e-6)


def test_perplexity_is_logged_every_epoch(run):
    model, _ = run
    ppl = model.history["val_perplexity"].to_numpy().ravel().astype(float)
    assert len(ppl) == 3 and np.isfinite(ppl).all()
    # an untrained model is about uniform over the genes: perplexity near the vocabulary size
    assert 0.5 * len(model.vocab) < ppl[0] < 2 * len(model.vocab)


def test_gradients_are_clipped(run):
    _, recorder = run
    assert len(recorder.norms) == 3 * 2
    assert max(recorder.norms) <= CLIP * (1 + 1e-4)
    assert min(recorder.norms) > 0.5 * CLIP  # the raw gradients are far larger


def test_progress_bar_shows_loss_and_val_loss(run):
    _, recorder = run
    assert "val_loss" in recorder.progress_bar
    assert any(name.startswith("train_loss") for name in recorder.progress_bar)


class SamplerRecorder(Callback):
    """The training loader's batch sampler and the optimizer's betas when training starts."""

    sampler = betas = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.sampler = trainer.train_dataloader.sampler
        self.betas = {group["betas"] for group in trainer.optimizers[0].param_groups}


def test_plan_and_datasplitter_kwargs_reach_the_plan_and_splitter(_pbmc68k_counts_once):
    adata = setup_counts(_pbmc68k_counts_once.copy())
    model = ScForge(adata, **TINY)
    with pytest.raises(ValueError, match=r"plan_kwargs cannot set \['seed'\]"):
        model.train(max_epochs=1, plan_kwargs={"seed": 1})
    with pytest.raises(ValueError, match=r"datasplitter_kwargs cannot set \['batch_size'\]"):
        model.train(max_epochs=1, datasplitter_kwargs={"batch_size": 8})
    recorder = SamplerRecorder()
    model.train(
        max_epochs=1,
        batch_size=64,
        datasplitter_kwargs={"group_batches": 2},
        plan_kwargs={"betas": (0.8, 0.95), "lr": 2e-3},
        limit_train_batches=1,
        callbacks=[recorder],
        enable_progress_bar=False,
    )
    assert recorder.sampler.group_batches == 2
    assert recorder.betas == {(0.8, 0.95)}  # every parameter group
    assert model.trainer.lightning_module.lr == 2e-3
    assert model.best_epoch_ == 0


def test_label_smoothing_applies_to_training_steps_only(_pbmc68k_counts_once):
    adata = _pbmc68k_counts_once.copy()
    for key in ("_scvi_uuid", "_scvi_manager_uuid"):
        adata.uns.pop(key, None)
    ScForge.setup_anndata(adata, layer="counts", labels_key="bulk_labels")
    torch.manual_seed(0)
    model = ScForge(adata, **TINY)
    with pytest.raises(ValueError, match=r"label_smoothing=1\.0: use a value in \[0, 1\)"):
        model.train(max_epochs=1, plan_kwargs={"label_smoothing": 1.0})

    seen: list[tuple[bool, float]] = []  # (training step?, smoothing of that loss)
    loss = model.module.loss

    def recording_loss(*args, **kwargs):
        seen.append((model.module.training, kwargs.get("label_smoothing", 0.0)))
        return loss(*args, **kwargs)

    model.module.loss = recording_loss
    model.train(
        max_epochs=1,
        batch_size=64,
        plan_kwargs={"label_smoothing": 0.2},
        limit_train_batches=2,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
    )
    assert {s for training, s in seen if training} == {0.2}
    assert {s for training, s in seen if not training} == {0.0}  # selection sees plain CE

    # the smoothed loss is cross-entropy against the smoothed targets
    batch = next(iter(model._loader(adata, batch_size=32)))
    model.module.eval()
    with torch.no_grad():
        inference = model.module.inference(**model.module._get_inference_input(batch))
        smoothed = loss(batch, inference, {}, objective="classify", label_smoothing=0.2).loss
        logits = model.module.classifier(inference["embedding"])
    labels = batch["labels"].view(-1).long()
    n = logits.shape[-1]
    target = torch.full_like(logits, 0.2 / n).scatter_(1, labels[:, None], 0.8 + 0.2 / n)
    per_cell = -(target * logits.log_softmax(-1)).sum(-1)
    assert torch.allclose(smoothed, per_cell.mean(), atol=1e-5)

    # with class weights, each cell counts with its own class's weight: the smoothing share
    # is spread evenly, not towards the classes of largest weight
    weights = torch.linspace(0.5, 20.0, n)
    with torch.no_grad():
        weighted = loss(
            batch,
            inference,
            {},
            objective="classify",
            label_smoothing=0.2,
            class_weights=weights,
        ).loss
    w = weights[labels]
    assert torch.allclose(weighted, (w * per_cell).sum() / w.sum(), atol=1e-5)
