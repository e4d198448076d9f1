"""Freezing policy: which parameters train under each fine-tuning strategy, and when.

One implementation for every model: a strategy sets ``requires_grad`` before training,
:class:`GradualUnfreezing` thaws frozen parameters after some epochs, and
:func:`check_frozen_are_loaded` refuses to freeze parameters that are still random.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from scforge_scvi._errors import ScForgeValueError
from scforge_scvi._logging import logger

#: fine-tuning strategies of :meth:`scforge_scvi.ScForge.train`
STRATEGIES = ("full", "frozen", "gradual_unfreeze", "lora")


def _backbone_parameters(pl_module: LightningModule) -> Iterable[torch.nn.Parameter]:
    return pl_module.module.backbone.parameters()


class GradualUnfreezing(Callback):
    """Keep parameters frozen for the first epochs, then train them.

    The parameters stay in the optimizer throughout (their own group and learning rate), so
    unfreezing only flips ``requires_grad`` at the start of an epoch.

    Parameters
    ----------
    freeze_backbone_epochs
        Epochs during which the parameters are frozen; ``None`` keeps them frozen throughout.
    parameters
        ``parameters(pl_module)`` gives the parameters to freeze (default: those of
        ``pl_module.module.backbone``).
    """

    def __init__(
        self,
        freeze_backbone_epochs: int | None,
        parameters: Callable[[LightningModule], Iterable[torch.nn.Parameter]] | None = None,
    ) -> None:
        self.freeze_backbone_epochs = (
            None if freeze_backbone_epochs is None else int(freeze_backbone_epochs)
        )
        self.parameters = parameters or _backbone_parameters

    def frozen_at(self, epoch: int) -> bool:
        """Whether the parameters are frozen during ``epoch``."""
        return self.freeze_backbone_epochs is None or epoch < self.freeze_backbone_epochs

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        params = list(self.parameters(pl_module))
        was_frozen = not any(p.requires_grad for p in params)
        frozen = self.frozen_at(epoch)
        for p in params:
            p.requires_grad_(not frozen)
        if was_frozen and not frozen and epoch > 0:
            logger.info(f"Unfreezing backbone at epoch {epoch}")


def configure_strategy(
    module: torch.nn.Module, objective: str, strategy: str, freeze_backbone_epochs: int = 0
) -> list[Callback]:
    """Set ``requires_grad`` of ``module`` for a strategy; return the callbacks it needs.

    ``module`` has a ``backbone``, pretraining heads ``gene_head`` / ``expression_head`` and
    task heads ``heads``. Pretraining and ``"full"`` train the backbone, ``"frozen"`` and
    ``"lora"`` freeze it (LoRA adapters, added afterwards, train), ``"gradual_unfreeze"``
    thaws it at epoch ``freeze_backbone_epochs``. The heads of the objective train and the
    others are frozen, so that no parameter requiring a gradient goes without one (DDP
    refuses that).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown strategy {strategy!r}; choose one of {STRATEGIES}.")
    backbone, callbacks = module.backbone, []
    if objective == "pretrain" or strategy == "full":
        backbone.requires_grad_(True)
    elif strategy == "frozen":
        backbone.requires_grad_(False)
    elif strategy == "gradual_unfreeze":
        if freeze_backbone_epochs <= 0:
            warnings.warn(
                "strategy='gradual_unfreeze' with freeze_backbone_epochs=0 trains the "
                "backbone from the start (same as 'full').",
                UserWarning,
                stacklevel=3,
            )
        backbone.requires_grad_(freeze_backbone_epochs <= 0)
        callbacks.append(GradualUnfreezing(freeze_backbone_epochs))
    elif freeze_backbone_epochs:  # lora
        warnings.warn(
            "freeze_backbone_epochs is ignored with strategy='lora': the backbone "
            "stays frozen and only the adapters and the head train.",
            UserWarning,
            stacklevel=3,
        )
    for head in module.pretraining_heads:
        head.requires_grad_(objective == "pretrain")
    for head in module.heads:
        head.requires_grad_(objective != "pretrain")
    return callbacks


def check_frozen_are_loaded(
    frozen: Iterable[str], initialised: Iterable[str], *, setting: str, remedy: str
) -> None:
    """Refuse to freeze parameters that were newly initialised (not loaded from a checkpoint).

    Parameters
    ----------
    frozen
        Names of the parameters that will stay frozen.
    initialised
        Names of the parameters that were newly initialised, e.g.
        :attr:`scforge_scvi.io.LoadReport.initialised`.
    setting
        The setting that freezes them, for the message (``"strategy='frozen'"``).
    remedy
        What to do instead, for the message.

    Raises
    ------
    ScForgeValueError
        Naming how many such parameters there are and the first three.
    """
    fresh = sorted(set(frozen) & set(initialised))
    if fresh:
        raise ScForgeValueError(
            f"{setting} would freeze {len(fresh)} parameters that were not in the checkpoint "
            f"and are still random (e.g. {fresh[:3]}); {remedy}."
        )
