"""Resuming a run from its ``last.ckpt`` continues it exactly as if it had never stopped.

``scforge pretrain|finetune --resume RUN_DIR`` hands ``RUN_DIR/last.ckpt`` to
:meth:`~scforge_scvi.ScForge.train` as ``ckpt_path``; these tests call that directly on 256
real PBMCs with a tiny model (deterministic on the CPU) and compare N + N epochs with 2N
epochs in one go.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch import Callback

from scforge_scvi import ScForge

TINY = {"hidden_dim": 16, "num_layers": 1, "num_heads": 2, "max_genes": 32, "dropout": 0.1}
FIT = {"batch_size": 64, "seed": 0, "enable_progress_bar": False}


class _LearningRates(Callback):
    """The learning rate of the first parameter group at every optimizer step."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.fixture
def cells(_pbmc68k_counts_once):
    adata = _pbmc68k_counts_once[:256].copy()
    ScForge.setup_anndata(adata, layer="counts")
    return adata


def _run(adata, checkpoint_dir, max_epochs, resume=False, **plan) -> _LearningRates:
    torch.manual_seed(0)
    lrs = _LearningRates()
    kwargs = {"plan_kwargs": {"lr": 3e-3, **plan}}
    if resume:
        kwargs["ckpt_path"] = str(checkpoint_dir / "last.ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # few batches per epoch
        ScForge(adata, **TINY).train(
            max_epochs=max_epochs,
            checkpoint_dir=str(checkpoint_dir),
            callbacks=[lrs],
            **FIT,
            **kwargs,
        )
    return lrs


def _weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path / "last.ckpt", weights_only=True)["state_dict"]


def test_n_plus_n_epochs_reach_the_weights_of_2n_straight(cells, tmp_path):
    constant = {"min_lr_ratio": 1.0}  # a schedule that does not depend on the epoch budget
    _run(cells, tmp_path / "straight", 2, **constant)
    _run(cells, tmp_path / "resumed", 1, **constant)
    _run(cells, tmp_path / "resumed", 2, resume=True, **constant)
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)


def test_first_resumed_step_uses_the_schedule_of_the_new_epoch_budget(cells, tmp_path):
    straight = _run(cells, tmp_path / "straight", 2).lrs
    first = _run(cells, tmp_path / "resumed", 1).lrs
    resumed = _run(cells, tmp_path / "resumed", 2, resume=True).lrs
    assert len(first) + len(resumed) == len(straight)
    assert resumed == pytest.approx(straight[len(first) :])
