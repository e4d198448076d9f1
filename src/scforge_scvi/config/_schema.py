"""The YAML configuration schema: one pydantic model per section, validated as a whole.

A config file has the sections ``data``, ``tokenizer``, ``model``, ``training`` and, for the
commands that need them, ``finetune`` and ``benchmarks``. Every section rejects keys it does
not know; every problem found is reported at once, each naming its full dotted path
(``training.optimizer.lr``), in a single :class:`ConfigError`.

Relative paths
    Paths in a config (``data.paths``, a ``data.gene_vocab`` file, ``training.checkpoint_dir``)
    are kept as written and are interpreted relative to the *current working directory* of the
    command that uses them, not relative to the config file. Run ``scforge`` from your project
    directory, as in the tutorial (``./data/pbmc3k.h5ad``). A leading ``~`` is expanded.

Defaults
    A key left out takes the default of the argument of ``ScForge(...)``, ``ScForge.train(...)``
    or the settings class it is handed to (:class:`~scforge_scvi.data.Preprocessing`,
    :class:`~scforge_scvi.train.LoraSettings`, :class:`~scforge_scvi._settings.MaskingConfig`),
    read from there: a config that names only ``data.paths`` builds the model and recipe of
    ``ScForge(adata)`` and ``model.train()``. A key renamed in the schema keeps its old name
    for one release, with a ``FutureWarning``.

Sequence length
    ``tokenizer.max_genes`` and ``model.max_seq_len`` count genes, as ``ScForge(max_genes=...,
    max_seq_len=...)`` does: the ``[CLS]`` token of ``tokenizer.prepend_cls`` is not counted (the
    model adds its position). ``model.max_seq_len`` null means ``tokenizer.max_genes``, which it
    may not be below.

Fine-tuning strategy (:attr:`FinetuneConfig.strategy`)
    ================================================  ====================
    ``finetune`` settings                             strategy
    ================================================  ====================
    ``lora.enabled: true``                            ``"lora"``
    ``freeze_backbone: true``, epochs >= max_epochs   ``"frozen"``
    ``freeze_backbone: true``, 0 < epochs < max       ``"gradual_unfreeze"``
    anything else                                     ``"full"``
    ================================================  ====================

    where epochs is ``finetune.freeze_backbone_epochs`` and max is ``training.max_epochs``.
"""

from __future__ import annotations

import difflib
import inspect
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from scforge_scvi import _settings
from scforge_scvi._atomic import atomic_file
from scforge_scvi.data import TOKENIZERS
from scforge_scvi.model import ScForge
from scforge_scvi.nn._backbone import ACTIVATIONS, POOLINGS
from scforge_scvi.train import STRATEGIES, LoraSettings
from scforge_scvi.train._lora import DEFAULT_TARGET_MODULES

from ._errors import ConfigError, describe_errors, is_required_section, show
from ._yaml import describe_yaml_error, load_yaml

NAMED_GENE_VOCABS = ("human_protein_coding", "data")
"""Vocabulary names accepted by ``data.gene_vocab`` besides a file path."""

GENE_VOCAB_FILE_SUFFIXES = (".json", ".tsv")
DATA_FILE_SUFFIXES = (".h5ad", ".zarr")

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


def _keyword_defaults(function: Callable) -> dict[str, Any]:
    """The default of every keyword argument of ``function``."""
    parameters = inspect.signature(function).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


# the one home of every default: the Python API the sections are translated into
_MODEL = _keyword_defaults(ScForge.__init__)
_FIT = _keyword_defaults(ScForge.train)
_PLAN = _keyword_defaults(ScForge._training_plan_cls.__init__)
_MASKING = _settings.MaskingConfig()
_LORA = LoraSettings()


# --------------------------------------------------------------------------------------------
# Shared field types
# --------------------------------------------------------------------------------------------


def _reject_bool(value: Any) -> Any:
    # pydantic would read `true` as 1 for a number; in a config that is always a mistake.
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {str(value).lower()}")
    return value


def _expand_user(value: Any) -> Any:
    return Path(value).expanduser() if isinstance(value, str | Path) else value


_Int = Annotated[int, BeforeValidator(_reject_bool)]
_Float = Annotated[float, BeforeValidator(_reject_bool)]
_Ratio = Annotated[float, BeforeValidator(_reject_bool), Field(ge=0.0, le=1.0)]
_Dropout = Annotated[float, BeforeValidator(_reject_bool), Field(ge=0.0, lt=1.0)]
_PathValue = Annotated[Path, BeforeValidator(_expand_user)]


class _Section(BaseModel):
    """Base of every section: unknown keys are errors; an empty sub-section means defaults.

    ``renamed`` maps an old key of the section to the dotted path of its new name; the old
    key is still read, with a ``FutureWarning``.
    """

    model_config = ConfigDict(extra="forbid")
    renamed: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _empty_sections_use_defaults(cls, data: Any) -> Any:
        # `masking:` with every line below it commented out reads as null in YAML.
        if not isinstance(data, Mapping):
            return data
        data = {
            key: value
            for key, value in data.items()
            if not (value is None and is_required_section(cls, key))
        }
        for old, path in cls.renamed.items():
            if old in data:
                new = path.rpartition(".")[2]
                if new in data:
                    raise ValueError(f"give {new} only; {old} is its deprecated name")
                warnings.warn(
                    f"The config key '{old}' is renamed '{path}'; the old name is read until "
                    "the next release.",
                    FutureWarning,
                    stacklevel=2,
                )
                data[new] = data.pop(old)
        return data


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


class PreprocessingConfig(_Section):
    """``data.preprocessing``: how raw counts are transformed before tokenization."""

    renamed: ClassVar[dict[str, str]] = {"hvg": "data.preprocessing.n_top_genes"}

    normalize: Literal["library_size", "none"] = Field(
        _MODEL["normalize"],
        description=(
            "How cells are made comparable. 'library_size' scales every cell's counts to the "
            "same total (target_sum), removing differences in sequencing depth; 'none' uses "
            "the values as stored (for data that are already normalised)."
        ),
    )
    target_sum: _Float = Field(
        _MODEL["target_sum"],
        gt=0,
        description=(
            "Total count every cell is scaled to when normalize is 'library_size' "
            "(10000 gives counts per 10k, like scanpy's normalize_total). Not used otherwise."
        ),
    )
    log1p: bool = Field(
        _MODEL["log1p"],
        description="Apply log(1 + x) after normalising, compressing very highly expressed genes.",
    )
    n_top_genes: _Int | None = Field(
        _MODEL["n_top_genes"],
        ge=1,
        description=(
            "When the vocabulary is built from the data (data.gene_vocab null or 'data'), keep "
            "only this many highly variable genes, selected on the training cells; null keeps "
            "every gene. Formerly 'hvg'."
        ),
    )


class DataConfig(_Section):
    """``data``: which cells to read and how to turn them into model input."""

    source: Literal["local"] = Field(
        "local", description="Where the cells come from: 'local' reads AnnData files from disk."
    )
    paths: list[_PathValue] = Field(
        min_length=1,
        description=(
            "AnnData files (.h5ad or .zarr) with one cell per row. Relative paths are read "
            "from the directory you run scforge in."
        ),
    )
    gene_vocab: str | None = Field(
        None,
        description=(
            "The genes the model knows, in a fixed order. 'human_protein_coding' (19,814 "
            "GENCODE v22 genes), 'data' (the genes of the training files, as ScForge(vocab="
            "None)), or a path to a .json/.tsv vocabulary. null means: the pretrained model's "
            "own vocabulary, or 'data' when training from scratch. When starting from a "
            "pretrained model its vocabulary is always used and must match this value."
        ),
    )
    preprocessing: PreprocessingConfig = Field(
        default_factory=PreprocessingConfig,
        description="Normalisation applied to raw counts before tokenization.",
    )
    max_genes: _Int | None = Field(
        None,
        ge=1,
        description=(
            "Same limit as tokenizer.max_genes (kept for configs written that way): if given, "
            "it must equal tokenizer.max_genes."
        ),
    )
    num_workers: _Int = Field(
        _FIT["num_workers"],
        ge=0,
        description="Background processes that prepare batches of cells (0 = in the main process).",
    )
    layer: str | None = Field(
        None,
        description="Layer of the AnnData holding raw counts (e.g. 'counts'); null reads X.",
    )
    gene_key: str | None = Field(
        None,
        description=(
            "Column of var holding the gene identifiers matched to the vocabulary "
            "(e.g. 'gene_ids' for Ensembl IDs); null uses the var index (var_names)."
        ),
    )
    streaming: bool = Field(
        False,
        description=(
            "Read cells from disk in chunks instead of loading the files into memory, for "
            "datasets larger than RAM."
        ),
    )

    @field_validator("paths")
    @classmethod
    def _check_suffixes(cls, paths: list[Path]) -> list[Path]:
        for path in paths:
            if path.suffix.lower() not in DATA_FILE_SUFFIXES:
                raise ValueError(
                    f"'{path}' is not an AnnData file; expected a name ending in "
                    f"{' or '.join(DATA_FILE_SUFFIXES)}"
                )
        return paths

    @field_validator("gene_vocab")
    @classmethod
    def _check_gene_vocab(cls, value: str | None) -> str | None:
        if value is None or value in NAMED_GENE_VOCABS:
            return value
        if Path(value).suffix.lower() in GENE_VOCAB_FILE_SUFFIXES:
            return str(Path(value).expanduser())
        hint = difflib.get_close_matches(value, NAMED_GENE_VOCABS, n=1)
        did_you_mean = f"did you mean '{hint[0]}'? " if hint else ""
        raise ValueError(
            f"'{value}' is neither a named vocabulary nor a vocabulary file; {did_you_mean}"
            f"use one of {', '.join(NAMED_GENE_VOCABS)} or a path ending in "
            f"{' or '.join(GENE_VOCAB_FILE_SUFFIXES)}"
        )


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------


class MaskingConfig(_Section):
    """``tokenizer.masking``: masked-gene pretraining. Ignored when fine-tuning."""

    mask_ratio: _Ratio = Field(
        _MASKING.mask_ratio,
        description=(
            "Fraction of each cell's genes selected for the model to predict during pretraining "
            "(their expression is hidden). Not used for fine-tuning or embedding."
        ),
    )
    random_replace_ratio: _Ratio = Field(
        _MASKING.random_replace_ratio,
        description="Of the selected genes, the fraction shown as a random other gene.",
    )
    keep_ratio: _Ratio = Field(
        _MASKING.keep_ratio,
        description=(
            "Of the selected genes, the fraction left visible (but still predicted); the rest "
            "are replaced by the [MASK] token."
        ),
    )

    @model_validator(mode="after")
    def _check_split(self) -> MaskingConfig:
        self.to_settings()
        return self

    def to_settings(self) -> _settings.MaskingConfig:
        """The settings ``ScForge.train(masking=...)`` takes (their checks raise here)."""
        return _settings.MaskingConfig(**self.model_dump())


class TokenizerConfig(_Section):
    """``tokenizer``: how a cell's expression profile becomes a sequence of tokens."""

    strategy: Literal[tuple(TOKENIZERS)] = Field(  # type: ignore[valid-type]
        _MODEL["tokenizer"],
        description=(
            "'rank_value' orders a cell's genes from highest to lowest expression "
            "(Geneformer); 'binned_expression' pairs each gene with its expression level cut "
            "into n_bins bins (scGPT); 'continuous' pairs each gene with its expression value."
        ),
    )
    max_genes: _Int = Field(
        _MODEL["max_genes"],
        ge=1,
        description=(
            "Genes kept per cell, its most highly expressed (the [CLS] token of prepend_cls "
            "is not counted). At most model.max_seq_len."
        ),
    )
    prepend_cls: bool = Field(
        _MODEL["prepend_cls"],
        description=(
            "Start every sequence with a [CLS] token that summarises the cell; needed for "
            "model.pooling 'cls'."
        ),
    )
    n_bins: _Int = Field(
        _MODEL["n_bins"],
        ge=2,
        description="'binned_expression' only: number of expression-level bins per cell.",
    )
    masking: MaskingConfig = Field(
        default_factory=MaskingConfig,
        description="Masked-gene pretraining settings; ignored when fine-tuning.",
    )


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------


class ModelConfig(_Section):
    """``model``: the transformer backbone. Must match a pretrained checkpoint being loaded."""

    architecture: Literal["transformer_encoder"] = Field(
        "transformer_encoder", description="Model family; 'transformer_encoder' (BERT-like)."
    )
    hidden_dim: _Int = Field(
        _MODEL["hidden_dim"],
        ge=1,
        description=(
            "Width of the model: length of the vector representing each gene token and each "
            "cell embedding. Must be divisible by num_heads."
        ),
    )
    num_layers: _Int = Field(
        _MODEL["num_layers"], ge=1, description="Number of stacked transformer blocks."
    )
    num_heads: _Int = Field(
        _MODEL["num_heads"],
        ge=1,
        description="Attention heads per block (each looks at hidden_dim / num_heads).",
    )
    ffn_dim: _Int | None = Field(
        _MODEL["ffn_dim"],
        ge=1,
        description="Width of the feed-forward layer in each block; null means 4 x hidden_dim.",
    )
    dropout: _Dropout = Field(
        _MODEL["dropout"],
        description="Fraction of activations randomly zeroed while training (regularisation).",
    )
    max_seq_len: _Int | None = Field(
        _MODEL["max_seq_len"],
        ge=1,
        description=(
            "Most genes of a cell the model can read ([CLS] not counted); at least "
            "tokenizer.max_genes. null means tokenizer.max_genes."
        ),
    )
    pooling: Literal[POOLINGS] = Field(  # type: ignore[valid-type]
        _MODEL["pooling"],
        description=(
            "How the cell embedding is made from the tokens: 'cls' takes the [CLS] token "
            "(needs tokenizer.prepend_cls), 'mean' averages the gene tokens."
        ),
    )
    activation: Literal[ACTIVATIONS] = Field(  # type: ignore[valid-type]
        _MODEL["activation"], description="Non-linearity in the feed-forward layers."
    )

    @model_validator(mode="after")
    def _check_heads(self) -> ModelConfig:
        if self.hidden_dim % self.num_heads:
            lower = self.hidden_dim // self.num_heads * self.num_heads
            raise ValueError(
                f"hidden_dim ({self.hidden_dim}) must be divisible by num_heads "
                f"({self.num_heads}), e.g. hidden_dim {lower or self.num_heads} or "
                f"{lower + self.num_heads}"
            )
        return self

    def to_backbone_kwargs(self) -> dict[str, Any]:
        """The ``ScForge`` arguments of this section (every key but ``architecture``)."""
        return self.model_dump(exclude={"architecture"})


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


class OptimizerConfig(_Section):
    """``training.optimizer``."""

    name: Literal["adamw"] = Field(
        "adamw", description="Optimizer; 'adamw' (Adam with weight decay)."
    )
    lr: _Float = Field(
        _FIT["lr"],
        gt=0,
        description=(
            "Peak learning rate: how large each update step is (of the backbone and the head, "
            "unless finetune.backbone_lr / head_lr are given)."
        ),
    )
    weight_decay: _Float = Field(
        _FIT["weight_decay"],
        ge=0,
        description="Pull of weights towards zero (regularisation); 0 disables it.",
    )
    betas: tuple[_Float, _Float] = Field(
        _PLAN["betas"],
        description="AdamW's two momentum coefficients, each in [0, 1).",
    )

    @field_validator("betas")
    @classmethod
    def _check_betas(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"both values must be in [0, 1), got {list(betas)}")
        return betas


class SchedulerConfig(_Section):
    """``training.scheduler``: how the learning rate changes over training."""

    name: Literal["cosine_warmup", "constant"] = Field(
        "cosine_warmup",
        description=(
            "'cosine_warmup' rises linearly for warmup_steps, then follows a cosine down to "
            "min_lr_ratio x lr at the last step and stays there; 'constant' keeps lr after the "
            "warmup."
        ),
    )
    warmup_steps: _Int | None = Field(
        _FIT["warmup_steps"],
        ge=0,
        description=(
            "Optimizer steps over which the learning rate rises from 0 to lr; null: as "
            "ScForge.train, a share of the run's steps."
        ),
    )
    min_lr_ratio: _Ratio = Field(
        _FIT["min_lr_ratio"],
        description="'cosine_warmup' only: final learning rate as a fraction of lr.",
    )


class TrainingConfig(_Section):
    """``training``: the training loop, hardware and outputs."""

    batch_size: _Int = Field(
        _FIT["batch_size"], ge=1, description="Cells per optimizer step (per device)."
    )
    max_epochs: _Int | None = Field(
        _FIT["max_epochs"],
        ge=1,
        description=(
            "Passes over the training cells; null: as ScForge.train (10 for pretraining, "
            "about 1,000 optimizer steps for a task head)."
        ),
    )
    seed: _Int = Field(
        _FIT["seed"],
        description=(
            "Random seed for weight initialisation, train/validation/test splits, masks and "
            "benchmark splits; the same seed reproduces a run."
        ),
    )
    precision: Literal[PRECISIONS] = Field(  # type: ignore[valid-type]
        str(_FIT["precision"]),
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
    gradient_clip: _Float | None = Field(
        _FIT["gradient_clip"],
        ge=0,
        description=(
            "Largest allowed gradient norm; bigger updates are scaled down (stabilises "
            "training). null or 0 disables clipping."
        ),
    )
    checkpoint_dir: _PathValue = Field(
        Path("checkpoints"),
        description=(
            "Folder for best.ckpt (lowest validation loss), last.ckpt and the training log."
        ),
    )
    val_split: _Float = Field(
        round(1.0 - _FIT["train_size"], 6),
        ge=0,
        lt=1,
        description="Fraction of cells held out to measure validation loss and pick the best model.",
    )
    test_split: _Float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Fraction of cells held out entirely and scored once after training.",
    )
    patience: _Int | None = Field(
        None,
        ge=1,
        description=(
            "Stop early after this many epochs without a lower validation loss; null trains "
            "for max_epochs. Needs val_split > 0."
        ),
    )
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = Field(
        _FIT["accelerator"],
        description="Hardware: 'auto' picks a GPU when there is one, else the CPU.",
    )
    devices: _Int | list[_Int] | Literal["auto"] = Field(
        _FIT["devices"],
        description=("How many devices (e.g. 2), which ones (e.g. [0, 1]), -1 for all, or 'auto'."),
    )
    strategy: str = Field(
        _FIT["distributed"],
        min_length=1,
        description=(
            "How training is spread over several devices (a Lightning strategy name such as "
            "'ddp' or 'fsdp'; passed to ScForge.train(distributed=...), which needs streamed "
            "cells, data.streaming: true); 'auto' chooses."
        ),
    )
    num_nodes: _Int = Field(_FIT["num_nodes"], ge=1, description="Number of machines taking part.")

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


class HeadConfig(_Section):
    """``finetune.head``: the small network put on top of the cell embedding."""

    task: Literal["classification", "regression"] = Field(
        "classification",
        description=(
            "'classification' predicts a category per cell (e.g. cell type); 'regression' "
            "predicts a number per cell."
        ),
    )
    n_classes: _Int | None = Field(
        None,
        ge=2,
        description=(
            "Number of categories; null counts them in the label column. Classification only."
        ),
    )
    hidden_dim: _Int = Field(
        _MODEL["head_hidden_dim"], ge=1, description="Width of the head's hidden layer."
    )
    dropout: _Dropout = Field(
        _MODEL["head_dropout"], description="Dropout in the head (regularisation)."
    )

    @model_validator(mode="after")
    def _check_task(self) -> HeadConfig:
        if self.task == "regression" and self.n_classes is not None:
            raise ValueError("n_classes is for classification; set it to null for regression")
        return self


class LoraConfig(_Section):
    """``finetune.lora``: low-rank adapters (LoRA) trained on a frozen backbone."""

    enabled: bool = Field(
        False,
        description=(
            "Train small adapter matrices instead of the backbone; the backbone stays frozen."
        ),
    )
    rank: _Int = Field(
        _LORA.rank,
        ge=1,
        description="Adapter rank: higher means more capacity and more parameters.",
    )
    alpha: _Float = Field(
        _LORA.alpha,
        gt=0,
        description="Adapter scaling; updates are scaled by alpha / rank (often 2 x rank).",
    )
    dropout: _Dropout = Field(_LORA.dropout, description="Dropout on the adapters' input.")
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


class FinetuneConfig(_Section):
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
        _FIT["linear_path"],
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
    freeze_backbone_epochs: _Int = Field(
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
    backbone_lr: _Float | None = Field(
        None,
        gt=0,
        description=(
            "Learning rate of the pretrained backbone (of the adapters with LoRA); usually "
            "10-100x below head_lr. null uses training.optimizer.lr."
        ),
    )
    head_lr: _Float | None = Field(
        None,
        gt=0,
        description="Learning rate of the new head; null uses training.optimizer.lr.",
    )
    class_weights: Literal["balanced", "sqrt"] | None = Field(
        _FIT["class_weights"],
        description=(
            "Weights of the classification loss: 'balanced' (inverse class frequency of the "
            "training cells, which lifts macro-F1 on small classes), 'sqrt' (its square root) "
            "or null (plain cross-entropy)."
        ),
    )
    label_smoothing: _Float = Field(
        _PLAN["label_smoothing"],
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
            _warn(
                f"finetune.freeze_backbone_epochs ({epochs}) is ignored with LoRA: the "
                "backbone stays frozen and only the adapters and head are trained."
            )
        elif not self.lora.enabled and self.freeze_backbone and epochs == 0:
            _warn(
                "finetune.freeze_backbone is true but freeze_backbone_epochs is 0, so the "
                "backbone is never frozen (full fine-tuning). Set freeze_backbone_epochs to "
                "the number of frozen epochs, or >= training.max_epochs to keep it frozen."
            )
        elif not self.freeze_backbone and epochs > 0:
            _warn(
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


class BenchmarkSpec(_Section):
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
    train_split: _Float = Field(
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


# --------------------------------------------------------------------------------------------
# the whole file
# --------------------------------------------------------------------------------------------


class ScForgeConfig(_Section):
    """A complete scforge configuration, as read from one YAML file.

    Examples
    --------
    >>> config = ScForgeConfig.from_yaml("finetune_config.yaml", overrides=["training.max_epochs=5"])
    >>> config.finetune.strategy
    'gradual_unfreeze'
    >>> config.to_yaml("runs/cell_type/config.yaml")
    """

    data: DataConfig = Field(description="Input cells and their preprocessing.")
    tokenizer: TokenizerConfig = Field(
        default_factory=TokenizerConfig, description="How cells become token sequences."
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="The transformer backbone.")
    training: TrainingConfig = Field(
        default_factory=TrainingConfig, description="Training loop, hardware and outputs."
    )
    finetune: FinetuneConfig | None = Field(
        None, description="Fine-tuning on a labelled obs column (for 'scforge finetune')."
    )
    benchmarks: list[BenchmarkSpec] = Field(
        default_factory=list, description="Evaluations to run (for 'scforge benchmark')."
    )

    @field_validator("benchmarks", mode="before")
    @classmethod
    def _no_benchmarks(cls, value: Any) -> Any:
        return [] if value is None else value

    @model_validator(mode="after")
    def _cross_check(self) -> ScForgeConfig:
        tokenizer, model = self.tokenizer, self.model
        problems = []
        if model.max_seq_len is not None and tokenizer.max_genes > model.max_seq_len:
            problems.append(
                f"tokenizer.max_genes ({tokenizer.max_genes}) is larger than model.max_seq_len "
                f"({model.max_seq_len}): the model cannot read sequences that long. Lower "
                "tokenizer.max_genes or raise model.max_seq_len (both count genes, not [CLS])."
            )
        if model.pooling == "cls" and not tokenizer.prepend_cls:
            problems.append(
                "model.pooling is 'cls' but tokenizer.prepend_cls is false, so there is no "
                "[CLS] token to pool; set tokenizer.prepend_cls: true or model.pooling: mean."
            )
        if self.data.max_genes is not None and self.data.max_genes != tokenizer.max_genes:
            problems.append(
                f"data.max_genes ({self.data.max_genes}) differs from tokenizer.max_genes "
                f"({tokenizer.max_genes}); both name the same limit, so make them equal or "
                "drop data.max_genes."
            )
        if problems:
            raise ValueError("\n".join(problems))
        if self.finetune is not None:
            self.finetune._max_epochs = self.training.max_epochs
        return self

    # ---- reading and writing ---------------------------------------------------------------

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        overrides: Iterable[str] = (),
        *,
        source: str | os.PathLike | None = None,
    ) -> ScForgeConfig:
        """Validate a configuration given as nested dictionaries.

        Parameters
        ----------
        data
            The sections, as read from YAML.
        overrides
            ``"dotted.key=value"`` strings applied before validation (see
            :func:`~scforge_scvi.config.apply_overrides`).
        source
            File the data came from, named in error messages.

        Raises
        ------
        ConfigError
            Listing every problem found, each with its dotted key path.
        """
        from ._overrides import apply_overrides

        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(
                "a config must be a mapping of sections "
                f"({', '.join(cls.model_fields)}); got {show(data)}",
                source,
            )
        data = apply_overrides(data, overrides)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(describe_errors(exc, cls), source) from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: Iterable[str] = ()) -> ScForgeConfig:
        """Read and validate a YAML config file.

        Parameters
        ----------
        path
            The YAML file.
        overrides
            ``"dotted.key=value"`` strings applied before validation, e.g.
            ``["training.max_epochs=1", "data.paths=[small.h5ad]"]``.

        Raises
        ------
        ConfigError
            If the file is missing, is not valid YAML (the message gives the line), or
            does not validate.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file '{path}' does not exist") from None
        except IsADirectoryError:
            raise ConfigError(f"'{path}' is a directory, not a config file") from None
        try:
            data = load_yaml(text)
        except yaml.YAMLError as exc:
            raise ConfigError(describe_yaml_error(exc), path) from None
        return cls.from_dict(data, overrides, source=path)

    def to_dict(self) -> dict[str, Any]:
        """The complete configuration, defaults filled in, as plain YAML-ready values."""
        return self.model_dump(mode="json")

    def to_yaml(self, path: str | os.PathLike) -> Path:
        """Write the complete configuration to ``path`` atomically (never half-written).

        Parameters
        ----------
        path
            Destination YAML file; missing parent folders are created.

        Returns
        -------
        Path
            The file written. :meth:`from_yaml` reads it back to an equal config.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "# scforge_scvi configuration (every key, defaults filled in)\n" + yaml.safe_dump(
            self.to_dict(), sort_keys=False, default_flow_style=False, allow_unicode=True
        )
        with atomic_file(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
        return path


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=2)
