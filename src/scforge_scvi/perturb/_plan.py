"""Lightning training plan for :class:`~scforge_scvi.perturb._module.PerturbationSetModel`.

A batch is a stack of cell sets: ``basal`` control cells, the observed ``target`` cells of the
same perturbation and cell type, and the perturbation (and batch) of each set. The loss is a
weighted sum of the per-set energy distance and the MSE of the set means, both in the gene
space that is evaluated; each term is logged on its own.

Optimisation (:func:`~scforge_scvi.train._optim.configure_adamw`, as for ScForge): AdamW
with two parameter sets, ``heads`` (encoders, decoder) and ``backbone`` (the set transformer,
and a pluggable basal encoder), both in the optimizer from the first step. The learning rate
of each follows :func:`~scforge_scvi.train._schedules.cosine_with_warmup`. With ``freeze_backbone`` the backbone is frozen (``requires_grad=False`` and a zero learning
rate) for ``freeze_backbone_epochs`` epochs, or for good when that is ``None``; when it
unfreezes, its learning rate starts a warmup + cosine of its own from that step.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import lightning.pytorch as pl
import torch

from scforge_scvi.train._freezing import GradualUnfreezing
from scforge_scvi.train._optim import configure_adamw

from ._losses import PerturbLossWeights, perturbation_set_loss
from ._module import PerturbationSetModel, PerturbOutput


@dataclass
class PerturbTrainingConfig:
    """Optimisation settings of :class:`PerturbTrainingPlan` (all plain values, JSON-able).

    Parameters
    ----------
    lr
        Peak learning rate of the heads.
    backbone_lr
        Peak learning rate of the backbone; ``None`` means ``lr``.
    weight_decay
        AdamW weight decay of >= 2-D weights (never biases, norms or embedding tables).
    warmup_steps
        Linear warmup of the heads (and of an unfrozen-from-the-start backbone).
    min_lr_ratio
        Floor of the cosine as a fraction of the peak; it stays there after the last step.
    energy_weight, mean_mse_weight
        Weights of the energy distance and of the set-mean MSE.
    freeze_backbone
        Start with the backbone frozen.
    freeze_backbone_epochs
        Epochs before the backbone unfreezes; ``None`` keeps it frozen for the whole run.
    unfreeze_warmup_steps
        Warmup of the backbone after it unfreezes; ``None`` means ``warmup_steps``.
    """

    lr: float = 1e-3
    backbone_lr: float | None = None
    weight_decay: float = 0.01
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    energy_weight: float = 1.0
    mean_mse_weight: float = 1.0
    freeze_backbone: bool = False
    freeze_backbone_epochs: int | None = None
    unfreeze_warmup_steps: int | None = None

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}.")
        if self.backbone_lr is not None and not self.backbone_lr > 0:
            raise ValueError(f"backbone_lr must be positive or None, got {self.backbone_lr}.")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}.")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}.")
        if self.freeze_backbone_epochs is not None:
            if not self.freeze_backbone:
                raise ValueError(
                    "freeze_backbone_epochs is set but freeze_backbone=False; set "
                    "freeze_backbone=True to freeze first, or drop freeze_backbone_epochs."
                )
            if self.freeze_backbone_epochs < 0:
                raise ValueError(
                    f"freeze_backbone_epochs must be >= 0, got {self.freeze_backbone_epochs}."
                )
        if self.unfreeze_warmup_steps is not None and self.unfreeze_warmup_steps < 0:
            raise ValueError(
                f"unfreeze_warmup_steps must be >= 0, got {self.unfreeze_warmup_steps}."
            )
        PerturbLossWeights(energy=self.energy_weight, mean_mse=self.mean_mse_weight)  # validates

    @property
    def loss_weights(self) -> PerturbLossWeights:
        """The loss weights as a :class:`PerturbLossWeights`."""
        return PerturbLossWeights(energy=self.energy_weight, mean_mse=self.mean_mse_weight)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dictionary of all fields."""
        return asdict(self)


class PerturbTrainingPlan(pl.LightningModule):
    """Train a :class:`PerturbationSetModel` on batches of cell sets.

    Parameters
    ----------
    module
        The set model.
    config
        A :class:`PerturbTrainingConfig`.
    checkpoint_metadata
        ``{"config": ..., "vocab": ...}`` (plain values) written into every checkpoint under
        ``"scforge"``, so that :func:`~scforge_scvi.io.read_pretrained` reads the ``.ckpt``
        like a pretrained directory; a resumed run is checked against its configuration.
    """

    def __init__(
        self,
        module: PerturbationSetModel,
        config: PerturbTrainingConfig | None = None,
        checkpoint_metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.module = module
        self.config = config or PerturbTrainingConfig()
        self.loss_weights = self.config.loss_weights
        self.checkpoint_metadata = checkpoint_metadata

    # -- steps -------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> PerturbOutput:
        """Run the set model on a batch of sets."""
        return self.module(
            batch["basal"],
            batch["perturbation"],
            batch.get("batch"),
            basal_input=batch.get("basal_input"),
            cell_type=batch.get("cell_type"),
            basal_offset=batch.get("basal_offset"),
        )

    def _common_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        out = self(batch)
        terms = perturbation_set_loss(out.prediction, batch["target"], self.loss_weights)
        n_sets = batch["basal"].shape[0]
        for name, value in terms.items():
            self.log(
                f"{stage}_{name}",
                value,
                on_step=False,
                on_epoch=True,
                prog_bar=name == "loss",
                batch_size=n_sets,
                sync_dist=True,
            )
        return terms["loss"]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._common_step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._common_step(batch, "validation")

    # -- checkpoints -------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.checkpoint_metadata is not None:
            checkpoint["scforge"] = copy.deepcopy(self.checkpoint_metadata)

    # -- optimisation ------------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch, from the trainer's estimate."""
        total = int(self.trainer.estimated_stepping_batches)
        epochs = self.trainer.max_epochs
        if epochs is None or epochs < 1:
            return total
        return max(total // epochs, 1)

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.config
        backbone = torch.nn.ModuleList(self.module.backbone_modules())
        heads = torch.nn.ModuleList(self.module.head_modules())
        starts = None
        if cfg.freeze_backbone:  # the backbone's schedule starts when it unfreezes
            epochs = cfg.freeze_backbone_epochs
            warmup = cfg.unfreeze_warmup_steps
            starts = {
                "backbone": (
                    None if epochs is None else epochs * self.steps_per_epoch(),
                    cfg.warmup_steps if warmup is None else warmup,
                )
            }
        return configure_adamw(
            {
                "heads": (heads, cfg.lr),
                "backbone": (backbone, cfg.lr if cfg.backbone_lr is None else cfg.backbone_lr),
            },
            total_steps=int(self.trainer.estimated_stepping_batches),
            warmup_steps=cfg.warmup_steps,
            min_lr_ratio=cfg.min_lr_ratio,
            weight_decay=cfg.weight_decay,
            starts=starts,
        )


def backbone_freezing(config: PerturbTrainingConfig) -> GradualUnfreezing:
    """The callback that freezes the backbone as ``config`` says: with ``freeze_backbone``, for
    ``freeze_backbone_epochs`` epochs (``None``: the whole run).

    The backbone's parameters stay in the optimizer throughout (with a zero learning rate
    while frozen); the callback only switches ``requires_grad`` at the start of each epoch.
    """
    epochs = config.freeze_backbone_epochs if config.freeze_backbone else 0
    return GradualUnfreezing(epochs, parameters=_set_model_backbone)


def _set_model_backbone(pl_module: PerturbTrainingPlan) -> list[torch.nn.Parameter]:
    return [p for m in pl_module.module.backbone_modules() for p in m.parameters()]


def check_freezable(module: PerturbationSetModel, fresh: set[str]) -> None:
    """Raise if freezing the backbone would freeze parameters in ``fresh``.

    ``fresh`` names the parameters that were never trained or loaded (still random).
    """
    backbone = {id(p) for m in module.backbone_modules() for p in m.parameters()}
    frozen_new = sorted(n for n, p in module.named_parameters() if id(p) in backbone and n in fresh)
    if frozen_new:
        raise ValueError(
            f"freeze_backbone=True would freeze {len(frozen_new)} newly initialised backbone "
            f"parameter tensors (e.g. {frozen_new[:3]}): they were never trained or loaded. "
            "Initialise the backbone with ScForgePerturb.from_pretrained (checking the load "
            "report), or train without freezing."
        )
