"""Lightning training plan for pretraining and fine-tuning :class:`ScForgeModule`.

One plan serves every stage; what differs is the objective (``pretrain``: masked genes,
``classify`` / ``regress``: a task head) and the fine-tuning strategy, which only decides what
is trainable and at which learning rate:

============== ===================================================================
strategy       trainable parameters
============== ===================================================================
``full``       everything, backbone at ``backbone_lr``, heads at ``head_lr``
``frozen``     heads only (the backbone never unfreezes)
``gradual``    heads first; the backbone joins after ``freeze_backbone_epochs``
``lora``       heads and LoRA adapters (backbone weights frozen)
============== ===================================================================

Backbone parameters are in the optimizer from the first step in their own group, so that
gradual unfreezing actually trains them (a parameter without gradient is skipped by AdamW).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scvi.train import TrainingPlan

from scforge_scvi._errors import ScForgeValueError
from scforge_scvi._settings import MaskingConfig

from ._optim import configure_adamw
from ._schedules import default_warmup_steps


def class_weights(how: str | Sequence[float], codes: np.ndarray | None, n_classes: int):
    """Loss weight of each of ``n_classes`` classes, as a float32 tensor.

    Parameters
    ----------
    how
        ``"balanced"`` (inverse class frequency, mean 1 over the cells), ``"sqrt"`` (its
        square root) or one weight per class.
    codes
        Label code of each training cell (codes >= ``n_classes`` are unlabelled); needed by
        ``"balanced"`` and ``"sqrt"``.
    n_classes
        Number of classes.
    """
    if not isinstance(how, str):
        weights = torch.as_tensor(np.asarray(how, dtype=np.float32))
        if weights.shape != (n_classes,):
            raise ValueError(
                f"class_weights needs {n_classes} values (one per class of "
                f"model.class_names_), got shape {tuple(weights.shape)}."
            )
        return weights
    if how not in ("balanced", "sqrt"):
        raise ValueError(
            f"class_weights={how!r}: use 'balanced', 'sqrt', a list of weights or None."
        )
    if codes is None:
        raise ValueError(
            f"class_weights={how!r} counts the training cells' labels, which needs the "
            "registered AnnData; pass one weight per class with streamed data."
        )
    counts = np.bincount(codes[codes < n_classes].astype(int), minlength=n_classes)
    freq = np.maximum(counts, 1).astype(np.float64)
    weights = freq.sum() / (n_classes * freq)
    if how == "sqrt":
        weights = np.sqrt(weights)
    weights = weights / (weights * counts).sum() * counts.sum()  # mean 1 over cells
    return torch.as_tensor(weights, dtype=torch.float32)


class ScForgeTrainingPlan(TrainingPlan):
    """Training plan for :class:`~scforge_scvi.model.ScForgeModule`.

    Parameters
    ----------
    module
        The module to train.
    objective
        ``"pretrain"`` (masked-gene modelling), ``"classify"`` or ``"regress"``.
    lr
        Peak learning rate of pretraining (and of the heads when ``head_lr`` is None).
    weight_decay
        AdamW weight decay for >= 2-D weights (never biases, norms or embeddings).
    betas
        AdamW's coefficients of the running averages of the gradient and its square.
    warmup_steps
        Linear warmup steps of the warmup + cosine schedule; ``None``: 50, or a tenth of
        the run when that is shorter.
    min_lr_ratio
        Floor of the cosine schedule as a fraction of the peak; the schedule stays there
        after its last step.
    masking
        Masking of the pretraining objective: a :class:`~scforge_scvi.data.MaskingConfig` or
        a dict of its fields.
    backbone_lr, head_lr
        Discriminative learning rates for fine-tuning.
    seed
        Seeds the masks: validation masks are identical every epoch, training masks are
        reproducible.
    class_weights
        Optional per-class weights of the classification loss.
    token_dropout
        Fraction of each training cell's gene tokens hidden at random in fine-tuning steps
        (an augmentation; never in validation, inference or pretraining).
    label_smoothing
        Share of the target probability spread over all classes in the classification loss
        of training steps (``torch.nn.functional.cross_entropy``'s ``label_smoothing``);
        validation metrics stay those of the plain cross-entropy. With class weights each
        cell counts with its own class's weight. Off by default
        (``docs/benchmarks_annotation.md``).
    checkpoint_metadata
        JSON-like description of the model (config and vocabulary) stored in every Lightning
        checkpoint under ``"scforge"``, so that a ``.ckpt`` loads with ``weights_only=True``
        into fine-tuning, benchmarking and export.
    """

    def __init__(
        self,
        module,
        *,
        objective: str = "pretrain",
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        masking: MaskingConfig | dict | None = None,
        backbone_lr: float | None = None,
        head_lr: float | None = None,
        seed: int = 0,
        class_weights: torch.Tensor | None = None,
        token_dropout: float = 0.0,
        label_smoothing: float = 0.0,
        checkpoint_metadata: dict | None = None,
    ) -> None:
        super().__init__(module, lr=lr, weight_decay=weight_decay, optimizer="AdamW")
        self.objective = objective
        self.betas = (float(betas[0]), float(betas[1]))
        self.warmup_steps = None if warmup_steps is None else int(warmup_steps)
        self.min_lr_ratio = float(min_lr_ratio)
        is_settings = isinstance(masking, MaskingConfig)
        self.masking = masking if is_settings else MaskingConfig(**(masking or {}))
        self.backbone_lr = lr if backbone_lr is None else backbone_lr
        self.head_lr = lr if head_lr is None else head_lr
        self.seed = int(seed)
        self.class_weights = class_weights
        if not 0.0 <= token_dropout < 1.0:
            raise ScForgeValueError(
                f"token_dropout={token_dropout!r} must lie in [0, 1): it is the fraction of a "
                "cell's gene tokens hidden in each fine-tuning step."
            )
        self.token_dropout = float(token_dropout)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={label_smoothing!r}: use a value in [0, 1).")
        self.label_smoothing = float(label_smoothing)
        self.checkpoint_metadata = checkpoint_metadata

    # -- steps -------------------------------------------------------------------------------
    def _mask_generator(self, stage: str, batch_idx: int) -> torch.Generator:
        """Masks depend on (seed, stage, epoch for training, batch index, rank) only."""
        epoch = self.current_epoch if stage == "train" else 0
        rank = self.global_rank if self._trainer is not None else 0  # ranks mask differently
        key = ((self.seed * 1_000_003 + epoch) * 1_000_003 + batch_idx) * 4_099 + rank
        key = key * 2 + (stage == "train")
        return torch.Generator().manual_seed(key % (2**63 - 1))

    def _common_step(self, batch: dict[str, torch.Tensor], batch_idx: int, stage: str):
        inference_kwargs: dict[str, Any] = {}
        if self.objective == "pretrain":
            inference_kwargs = {
                "masking": self.masking,
                "generator": self._mask_generator(stage, batch_idx),
            }
        elif stage == "train" and self.token_dropout > 0:
            inference_kwargs = {
                "token_dropout": self.token_dropout,
                "generator": self._mask_generator(stage, batch_idx),
            }
        loss_kwargs: dict[str, Any] = {"objective": self.objective}
        if self.class_weights is not None:
            loss_kwargs["class_weights"] = self.class_weights.to(self.device)
        if self.objective == "classify" and stage == "train" and self.label_smoothing > 0:
            loss_kwargs["label_smoothing"] = self.label_smoothing
        _, _, out = self.forward(batch, inference_kwargs=inference_kwargs, loss_kwargs=loss_kwargs)
        prefix = "train" if stage == "train" else "val"
        n = out.n_obs_minibatch
        on_step = stage == "train"
        self.log(
            f"{prefix}_loss",
            out.loss,
            prog_bar=True,
            on_step=on_step,
            on_epoch=True,
            batch_size=n,
            sync_dist=not on_step,
        )
        for name, value in out.extra_metrics.items():
            short = {"accuracy": "acc"}.get(name, name)
            self.log(
                f"{prefix}_{short}",
                value,
                prog_bar=short == "acc" and prefix == "val",
                on_step=False,
                on_epoch=True,
                batch_size=n,
                sync_dist=True,
            )
        return out

    def training_step(self, batch, batch_idx):
        return self._common_step(batch, batch_idx, "train").loss

    def validation_step(self, batch, batch_idx):
        out = self._common_step(batch, batch_idx, "validation")
        if self.objective == "pretrain":
            gene_loss = out.extra_metrics["gene_loss"]
            self.log(
                "val_perplexity",
                torch.exp(gene_loss),
                on_epoch=True,
                batch_size=out.n_obs_minibatch,
                sync_dist=True,
            )

    def on_train_start(self) -> None:
        # A restored LambdaLR keeps the old run's last learning rate until its next step, and
        # the old run may have planned fewer epochs: start on the schedule of this run.
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR) and scheduler.last_epoch:
                step = scheduler.last_epoch
                groups = scheduler.optimizer.param_groups
                for group, base, schedule in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
                    group["lr"] = base * schedule(step)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.checkpoint_metadata is not None:
            checkpoint["scforge"] = self.checkpoint_metadata

    # -- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self):
        module = self.module
        sets = {"backbone": (module.backbone, self.backbone_lr)}
        if self.objective == "pretrain":
            sets = {"backbone": (module.backbone, self.lr)}
            sets["pretraining_heads"] = (torch.nn.ModuleList(module.pretraining_heads), self.lr)
        else:
            sets["heads"] = (torch.nn.ModuleList(module.heads), self.head_lr)
        total = int(self.trainer.estimated_stepping_batches)
        return configure_adamw(
            sets,
            total_steps=total,
            warmup_steps=(
                default_warmup_steps(total) if self.warmup_steps is None else self.warmup_steps
            ),
            min_lr_ratio=self.min_lr_ratio,
            weight_decay=self.weight_decay,
            betas=self.betas,
        )
