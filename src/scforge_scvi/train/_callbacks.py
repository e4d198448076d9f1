"""Lightning callbacks: best weights with atomic checkpoints, epoch seeds, streams."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

from scforge_scvi._logging import logger
from scforge_scvi.io._checkpoint import module_state_dict


def atomic_save_checkpoint(trainer: Trainer, path: Path) -> None:
    """Write a Lightning checkpoint to a temporary file, then rename it over ``path``.

    A crash mid-write leaves the previous checkpoint intact.
    """
    from scforge_scvi._atomic import atomic_file

    with atomic_file(path) as tmp:
        trainer.save_checkpoint(tmp, weights_only=False)  # resumable: optimizer, schedule, loops


class BestCheckpoint(Callback):
    """Track the best validation epoch; restore its weights when training ends.

    Parameters
    ----------
    monitor
        Logged metric that decides the best epoch.
    mode
        ``"min"`` (a loss: the lowest value wins) or ``"max"`` (e.g. accuracy: the highest
        value wins, and of equal values the later epoch, trained at a lower learning rate).
    dirpath
        If given, ``best.ckpt`` (minimum ``monitor``) and ``last.ckpt`` (end of every
        validation) are written there atomically; both are resumable Lightning checkpoints.
    restore_best
        Load the best weights into the module at the end of training, so that embedding and
        prediction use them.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        dirpath: str | os.PathLike | None = None,
        restore_best: bool = True,
        mode: str = "min",
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}.")
        self.monitor = monitor
        self.mode = mode
        self.dirpath = Path(dirpath) if dirpath is not None else None
        if self.dirpath is not None:  # fail now, not after the first epoch of training
            from scforge_scvi._atomic import check_writable

            check_writable(self.dirpath, "checkpoints")
        self.restore_best = restore_best
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self._best_state: dict[str, torch.Tensor] | None = None

    @property
    def best_state(self) -> dict[str, torch.Tensor] | None:
        """CPU copy of the module's state dict at the best epoch.

        ``None`` until a validation improved on ``best_score``. After resuming, until one does,
        the weights are read from ``best.ckpt`` (checkpoints save only the score and epoch);
        ``None`` without one.
        """
        best = None if self.dirpath is None else self.dirpath / "best.ckpt"
        if self._best_state is None and self.best_score is not None and best and best.is_file():
            ckpt = torch.load(best, map_location="cpu", weights_only=True)
            self._best_state = module_state_dict(ckpt)
        return self._best_state

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value = float(value)
        better = (
            (value < self.best_score if self.mode == "min" else value >= self.best_score)
            if self.best_score is not None
            else True
        )
        if better:
            self.best_score, self.best_epoch = value, trainer.current_epoch
            self._best_state = {
                k: v.detach().to("cpu", copy=True) for k, v in pl_module.module.state_dict().items()
            }
            self._save(trainer, "best.ckpt")
        self._save(trainer, "last.ckpt")

    @rank_zero_only
    def _save(self, trainer: Trainer, name: str) -> None:
        if self.dirpath is not None:
            atomic_save_checkpoint(trainer, self.dirpath / name)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.restore_best and self.best_state is not None:
            pl_module.module.load_state_dict(self.best_state)
            logger.info(
                f"Restored the best weights (epoch {self.best_epoch}, "
                f"{self.monitor}={self.best_score:.4f})."
            )

    def state_dict(self) -> dict:
        return {"best_score": self.best_score, "best_epoch": self.best_epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best_score = state_dict.get("best_score")
        self.best_epoch = state_dict.get("best_epoch")


class StreamEpoch(Callback):
    """Reshuffle a streamed training set at the start of every epoch.

    Calls ``set_epoch`` on the trainer's datamodule (e.g.
    :class:`~scforge_scvi.data.StreamedDataModule`) before the epoch's loaders start, so the
    order depends on (seed, epoch) only and a resumed run sees the same order as a straight one.
    """

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if callable(getattr(datamodule, "set_epoch", None)):
            datamodule.set_epoch(trainer.current_epoch)


class EpochSeed(Callback):
    """Reseed the global random number generators when each training epoch starts.

    The data order of the in-memory loaders and dropout draw from the global generators,
    which a checkpoint does not restore. Seeding them from ``(seed, epoch, rank)`` makes an
    epoch the same whether the run went straight through or was resumed before it (and
    gives every DDP rank its own dropout).
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        key = (self.seed * 1_000_003 + trainer.current_epoch) * 4_099 + trainer.global_rank
        torch.manual_seed(key % (2**63 - 1))
        np.random.seed(key % 2**32)  # noqa: NPY002 - the legacy global generator, on purpose
        random.seed(key)
