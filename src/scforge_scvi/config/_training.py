"""The ``training``, ``finetune`` and ``benchmarks`` sections of the configuration schema."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from scforge_scvi.model._training import GRADIENT_CLIP_VAL
from scforge_scvi.train import STRATEGIES, LoraSettings
from scforge_scvi.train._lora import DEFAULT_TARGET_MODULES

from ._fields import (
    LORA_DEFAULTS,
    MODEL_DEFAULTS,
    PLAN_DEFAULTS,
    TRAIN_DEFAULTS,
    DropoutRate,
    Float,
    Int,
    PathValue,
    Ratio,
    Section,
    warn_user,
)

LORA_TARGETABLE_MODULES = DEFAULT_TARGET_MODULES
"""The ``nn.Linear`` modules of a backbone block that LoRA adapters can wrap."""

DEFAULT_LORA_TARGET_MODULES = LORA_TARGETABLE_MODULES
"""Modules adapted when ``finetune.lora.target_modules`` is null: every linear layer of a block."""

PRECISIONS = (
    "32-true",
    "32",
    "bf16-mixed",
    "bf16-true",
    "bf16",
    "16-mixed",
    "16-true",
    "16",
    "64-true",
    "64",
)

FinetuneStrategy = Literal[STRATEGIES]  # type: ignore[valid-type]


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


class OptimizerConfig(Section):
    """``training.optimizer``."""

    name: Literal["adamw"] = Field(
        "adamw", description="Optimizer; 'adamw' (Adam with weight decay)."
    )
    lr: Float = Field(
        PLAN_DEFAULTS["lr"],
        gt=0,
        description=(
            "Peak learning rate: how large each update step is (of the backbone and the head, "
            "unless finetune.backbone_lr / head_lr are given)."
        ),
    )
    weight_decay: Float = Field(
        PLAN_DEFAULTS["weight_decay"],
        ge=0,
        description="Pull of weights towards zero (regularisation); 0 disables it.",
    )
    betas: tuple[Float, Float] = Field(
        PLAN_DEFAULTS["betas"],
        description="AdamW's two momentum coefficients, each in [0, 1).",
    )

    @field_validator("betas")
    @classmethod
    def _check_betas(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"both values must be in [0, 1), got {list(betas)}")
        return betas


class SchedulerConfig(Section):
    """``training.scheduler``: how the learning rate changes over training."""

    name: Literal["cosine_warmup", "constant"] = Field(
        "cosine_warmup",
        description=(
            "'cosine_warmup' rises linearly for warmup_steps, then follows a cosine down to "
            "min_lr_ratio x lr at the last step and stays there; 'constant' keeps lr after the "
            "warmup."
        ),
    )
    warmup_steps: Int | None = Field(
        PLAN_DEFAULTS["warmup_steps"],
        ge=0,
        description=(
            "Optimizer steps over which the learning rate rises from 0 to lr; null: as "
            "ScForge.train, a share of the run's steps."
        ),
    )
    min_lr_ratio: Ratio = Field(
        PLAN_DEFAULTS["min_lr_ratio"],
        description="'cosine_warmup' only: final learning rate as a fraction of lr.",
    )


class TrainingConfig(Section):
    """``training``: the training loop, hardware and outputs."""

    batch_size: Int = Field(
        TRAIN_DEFAULTS["batch_size"], ge=1, description="Cells per optimizer step (per device)."
    )
    max_epochs: Int | None = Field(
        TRAIN_DEFAULTS["max_epochs"],
        ge=1,
        description=(
            "Passes over the training cells; null: as ScForge.train (10 for pretraining, "
            "about 1,000 optimizer steps for a task head)."
        ),
    )
    seed: Int = Field(
        TRAIN_DEFAULTS["seed"],
        description=(
            "Random seed for weight initialisation, train/validation/test splits, masks and "
            "benchmark splits; the same seed reproduces a run."
        ),
    )
    precision: Literal[PRECISIONS] = Field(  # type: ignore[valid-type]
        "32",  # Lightning's default
        description=(
            "Number format of the computations: '32-true' (full precision), 'bf16-mixed' "
            "(faster, less memory on recent GPUs), '16-mixed', ..."
        ),
    )
    optimizer: OptimizerConfig = Field(
        default_factory=OptimizerConfig, description="Optimizer and learning rate."
    )
    scheduler: SchedulerConfig = Field(
        default_factory=SchedulerConfig, description="Learning-rate schedule."
    )
    gradient_clip: Float | None = Field(
        GRADIENT_CLIP_VAL,
        ge=0,
        description=(
            "Largest allowed gradient norm; bigger updates are scaled down (stabilises "
            "training). null or 0 disables clipping."
        ),
    )
    checkpoint_dir: PathValue = Field(
        Path("checkpoints"),
        description=(
            "Folder for best.ckpt (lowest validation loss), last.ckpt and the training log."
        ),
    )
    val_split: Float = Field(
        round(1.0 - TRAIN_DEFAULTS["train_size"], 6),
        ge=0,
        lt=1,
        description="Fraction of cells held out to measure validation loss and pick the best model.",
    )
    test_split: Float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Fraction of cells held out entirely and scored once after training.",
    )
    patience: Int | None = Field(
        None,
        ge=1,
        description=(
            "Stop early after this many epochs without a lower validation loss; null trains "
            "for max_epochs. Needs val_split > 0."
        ),
    )
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = Field(
        "auto",
        description="Hardware: 'auto' picks a GPU when there is one, else the CPU.",
    )
    devices: Int | list[Int] | Literal["auto"] = Field(
        "auto",
        description=("How many devices (e.g. 2), which ones (e.g. [0, 1]), -1 for all, or 'auto'."),
    )
    strategy: str = Field(
        TRAIN_DEFAULTS["distributed"],
        min_length=1,
        description=(
            "How training is spread over several devices (a Lightning strategy name such as "
            "'ddp' or 'fsdp'; passed to ScForge.train(distributed=...), which needs streamed "
            "cells, data.streaming: true); 'auto' chooses."
        ),
    )
    num_nodes: Int = Field(1, ge=1, description="Number of machines taking part.")

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_as_text(cls, value: Any) -> Any:
        # YAML reads `precision: 32` as a number.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("devices", mode="before")
    @classmethod
    def _check_devices(cls, value: Any) -> Any:
        ok = (
            value == "auto"
            or (
                isinstance(value, int)
                and not isinstance(value, bool)
                and (value >= 1 or value == -1)
            )
            or (
                isinstance(value, list)
                and len(value) > 0
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
            )
        )
        if not ok:
            raise ValueError(
                f"expected 'auto', a number of devices (>= 1, or -1 for all) or a list of "
                f"device indices such as [0, 1]; got {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _check_splits(self) -> TrainingConfig:
        if self.val_split + self.test_split >= 1.0:
            raise ValueError(
                f"val_split ({self.val_split}) + test_split ({self.test_split}) leaves no "
                "cells for training; their sum must be below 1"
            )
        if self.patience is not None and self.val_split == 0:
            raise ValueError(
                "patience (early stopping) needs a validation set to watch; set val_split > 0 "
                "or patience: null"
            )
        return self


# --------------------------------------------------------------------------------------------
# finetune
# --------------------------------------------------------------------------------------------


class HeadConfig(Section):
    """``finetune.head``: the small network put on top of the cell embedding."""

    task: Literal["classification", "regression"] = Field(
        "classification",
        description=(
            "'classification' predicts a category per cell (e.g. cell type); 'regression' "
            "predicts a number per cell."
        ),
    )
    n_classes: Int | None = Field(
        None,
        ge=2,
        description=(
            "Number of categories; null counts them in the label column. Classification only."
        ),
    )
    hidden_dim: Int = Field(
        MODEL_DEFAULTS["head_hidden_dim"], ge=1, description="Width of the head's hidden layer."
    )
    dropout: DropoutRate = Field(
        MODEL_DEFAULTS["head_dropout"], description="Dropout in the head (regularisation)."
    )

    @model_validator(mode="after")
    def _check_task(self) -> HeadConfig:
        if self.task == "regression" and self.n_classes is not None:
            raise ValueError("n_classes is for classification; set it to null for regression")
        return self


class LoraConfig(Section):
    """``finetune.lora``: low-rank adapters (LoRA) trained on a frozen backbone."""

    enabled: bool = Field(
        False,
        description=(
            "Train small adapter matrices instead of the backbone; the backbone stays frozen."
        ),
    )
    rank: Int = Field(
        LORA_DEFAULTS.rank,
        ge=1,
        description="Adapter rank: higher means more capacity and more parameters.",
    )
    alpha: Float = Field(
        LORA_DEFAULTS.alpha,
        gt=0,
        description="Adapter scaling; updates are scaled by alpha / rank (often 2 x rank).",
    )
    dropout: DropoutRate = Field(
        LORA_DEFAULTS.dropout, description="Dropout on the adapters' input."
    )
    target_modules: list[str] | None = Field(
        None,
        min_length=1,
        description=(
            "Layers of each transformer block that get adapters, from "
            f"{', '.join(LORA_TARGETABLE_MODULES)}; null means all of them."
        ),
    )

    @field_validator("target_modules")
    @classmethod
    def _check_targets(cls, names: list[str] | None) -> list[str] | None:
        if names is None:
            return None
        for name in names:
            if name not in LORA_TARGETABLE_MODULES:
                hint = difflib.get_close_matches(name, LORA_TARGETABLE_MODULES, n=1)
                did_you_mean = f"did you mean '{hint[0]}'? " if hint else ""
                raise ValueError(
                    f"unknown module '{name}'; {did_you_mean}choose from "
                    f"{', '.join(LORA_TARGETABLE_MODULES)}"
                )
        if len(set(names)) != len(names):
            raise ValueError(f"modules listed twice in {names}")
        return names

    @property
    def resolved_target_modules(self) -> list[str]:
        """``target_modules``, or the default modules when it is null."""
        return list(self.target_modules or DEFAULT_LORA_TARGET_MODULES)

    def to_settings(self) -> LoraSettings:
        """The settings ``ScForge.train(lora=...)`` takes."""
        return LoraSettings(
            self.rank, self.alpha, self.dropout, tuple(self.resolved_target_modules)
        )


class FinetuneConfig(Section):
    """``finetune``: adapt a pretrained model to predict a label per cell.

    See the module documentation for how :attr:`strategy` follows from these keys.
    """

    label_key: str = Field(
        min_length=1,
        description="Column of obs with the label to learn per cell (e.g. 'louvain', 'cell_type').",
    )
    unlabeled_category: str = Field(
        "Unknown",
        min_length=1,
        description=(
            "Value of label_key that marks an unlabelled cell (cells with an empty label are "
            "unlabelled too): such cells are tokenized and split like the others but left "
            "out of the loss and of the scores, so a few labelled cells can fine-tune a model "
            "pretrained on many."
        ),
    )
    linear_path: bool = Field(
        TRAIN_DEFAULTS["linear_path"],
        description=(
            "With a classification head, also fit a logistic regression on the log-normalised "
            "genes and mix it with the head, its share chosen on the validation cells "
            "(ScForge.train(linear_path=...)); false: the transformer's head alone."
        ),
    )
    freeze_backbone: bool = Field(
        False,
        description=(
            "Start with the pretrained backbone frozen, training only the head "
            "(for freeze_backbone_epochs epochs)."
        ),
    )
    freeze_backbone_epochs: Int = Field(
        0,
        ge=0,
        description=(
            "With freeze_backbone, epochs before the backbone is unfrozen (gradual "
            "unfreezing); a value >= training.max_epochs keeps it frozen throughout."
        ),
    )
    head: HeadConfig = Field(default_factory=HeadConfig, description="The prediction head.")
    lora: LoraConfig = Field(
        default_factory=LoraConfig, description="Low-rank adapters instead of backbone updates."
    )
    backbone_lr: Float | None = Field(
        None,
        gt=0,
        description=(
            "Learning rate of the pretrained backbone (of the adapters with LoRA); usually "
            "10-100x below head_lr. null uses training.optimizer.lr."
        ),
    )
    head_lr: Float | None = Field(
        None,
        gt=0,
        description="Learning rate of the new head; null uses training.optimizer.lr.",
    )
    class_weights: Literal["balanced", "sqrt"] | None = Field(
        TRAIN_DEFAULTS["class_weights"],
        description=(
            "Weights of the classification loss: 'balanced' (inverse class frequency of the "
            "training cells, which lifts macro-F1 on small classes), 'sqrt' (its square root) "
            "or null (plain cross-entropy)."
        ),
    )
    label_smoothing: Float = Field(
        PLAN_DEFAULTS["label_smoothing"],
        ge=0,
        lt=1,
        description=(
            "Share of the target probability spread over all classes in the training loss "
            "(0: plain cross-entropy); validation metrics use the plain cross-entropy."
        ),
    )

    # training.max_epochs of the enclosing config, set by ScForgeConfig; decides "frozen".
    _max_epochs: int | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _warn_ignored_keys(self) -> FinetuneConfig:
        epochs = self.freeze_backbone_epochs
        if self.lora.enabled and epochs > 0:
            warn_user(
                f"finetune.freeze_backbone_epochs ({epochs}) is ignored with LoRA: the "
                "backbone stays frozen and only the adapters and head are trained."
            )
        elif not self.lora.enabled and self.freeze_backbone and epochs == 0:
            warn_user(
                "finetune.freeze_backbone is true but freeze_backbone_epochs is 0, so the "
                "backbone is never frozen (full fine-tuning). Set freeze_backbone_epochs to "
                "the number of frozen epochs, or >= training.max_epochs to keep it frozen."
            )
        elif not self.freeze_backbone and epochs > 0:
            warn_user(
                f"finetune.freeze_backbone_epochs ({epochs}) is ignored because "
                "freeze_backbone is false; set freeze_backbone: true for gradual unfreezing."
            )
        return self

    def strategy_for(self, max_epochs: int | None) -> FinetuneStrategy:
        """The fine-tuning strategy these settings select for a run of ``max_epochs``.

        Parameters
        ----------
        max_epochs
            Length of the run; None when unknown (then the backbone counts as unfrozen
            eventually, i.e. never ``"frozen"``).

        Returns
        -------
        str
            ``"lora"``, ``"frozen"``, ``"gradual_unfreeze"`` or ``"full"``.
        """
        if self.lora.enabled:
            return "lora"
        if not self.freeze_backbone or self.freeze_backbone_epochs == 0:
            return "full"
        if max_epochs is not None and self.freeze_backbone_epochs >= max_epochs:
            return "frozen"
        return "gradual_unfreeze"

    @property
    def strategy(self) -> FinetuneStrategy:
        """The strategy for the enclosing config's ``training.max_epochs``."""
        return self.strategy_for(self._max_epochs)

    def learning_rates(self, default_lr: float) -> tuple[float, float]:
        """``(backbone_lr, head_lr)``, each falling back to ``default_lr`` when null."""
        return (self.backbone_lr or default_lr, self.head_lr or default_lr)


# --------------------------------------------------------------------------------------------
# benchmarks
# --------------------------------------------------------------------------------------------


class BenchmarkSpec(Section):
    """One entry of ``benchmarks``: an evaluation of the model's cell embeddings or predictions.

    ``linear_probe`` trains a logistic regression on the model's cell embeddings of
    ``train_split`` of the cells and scores it on the rest; with ``train_split: 0.0`` it scores
    the fine-tuned model's own classification head on every cell instead. ``baseline_logreg``
    is the honest reference: the same logistic regression on log-normalised gene expression.
    ``embedding_quality`` scores how well the embedding separates the labels (and mixes the
    batches, with ``batch_key``) without training anything.
    """

    name: Literal["linear_probe", "embedding_quality", "baseline_logreg"] = Field(
        description="Which evaluation to run: linear_probe, embedding_quality or baseline_logreg."
    )
    label_key: str = Field(
        min_length=1, description="Column of obs with the true labels (e.g. 'louvain')."
    )
    batch_key: str | None = Field(
        None,
        description=(
            "embedding_quality only: column of obs with the batch (donor, sample) of each "
            "cell, to score how well batches mix."
        ),
    )
    train_split: Float = Field(
        0.8,
        ge=0,
        lt=1,
        description=(
            "linear_probe and baseline_logreg: fraction of cells used to train the classifier, "
            "the rest are scored (stratified by label, seeded by training.seed). "
            "0.0 (linear_probe only) scores a fine-tuned model's own predictions on all cells. "
            "Not used by embedding_quality."
        ),
    )

    @model_validator(mode="after")
    def _check_combination(self) -> BenchmarkSpec:
        if self.batch_key is not None and self.name != "embedding_quality":
            raise ValueError(
                f"batch_key is only used by embedding_quality, not {self.name}; remove it"
            )
        if self.name == "baseline_logreg" and self.train_split == 0.0:
            raise ValueError(
                "train_split (0.0) leaves baseline_logreg no cells to train on; use e.g. 0.8"
            )
        return self
