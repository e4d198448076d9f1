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
    or the settings class it is handed to (:class:`~scforge_scvi.train.LoraSettings`,
    :class:`~scforge_scvi._settings.MaskingConfig`), read from there: a config that names only ``data.paths`` builds the model and recipe of
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
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from scforge_scvi._atomic import atomic_file
from scforge_scvi._settings import MaskingConfig as MaskingSettings
from scforge_scvi.data import TOKENIZERS
from scforge_scvi.nn._backbone import ACTIVATIONS, POOLINGS

from ._errors import ConfigError, describe_errors, show
from ._fields import (
    MASKING_DEFAULTS,
    MODEL_DEFAULTS,
    DropoutRate,
    Float,
    Int,
    PathValue,
    Ratio,
    Section,
)
from ._overrides import apply_overrides
from ._training import BenchmarkSpec, FinetuneConfig, TrainingConfig
from ._yaml import describe_yaml_error, load_yaml

NAMED_GENE_VOCABS = ("human_protein_coding", "data")
"""Vocabulary names accepted by ``data.gene_vocab`` besides a file path."""

GENE_VOCAB_FILE_SUFFIXES = (".json", ".tsv")
DATA_FILE_SUFFIXES = (".h5ad", ".zarr")


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


class PreprocessingConfig(Section):
    """``data.preprocessing``: how raw counts are transformed before tokenization."""

    renamed: ClassVar[dict[str, str]] = {"hvg": "data.preprocessing.n_top_genes"}

    normalize: Literal["library_size", "none"] = Field(
        MODEL_DEFAULTS["normalize"],
        description=(
            "How cells are made comparable. 'library_size' scales every cell's counts to the "
            "same total (target_sum), removing differences in sequencing depth; 'none' uses "
            "the values as stored (for data that are already normalised)."
        ),
    )
    target_sum: Float = Field(
        MODEL_DEFAULTS["target_sum"],
        gt=0,
        description=(
            "Total count every cell is scaled to when normalize is 'library_size' "
            "(10000 gives counts per 10k, like scanpy's normalize_total). Not used otherwise."
        ),
    )
    log1p: bool = Field(
        MODEL_DEFAULTS["log1p"],
        description="Apply log(1 + x) after normalising, compressing very highly expressed genes.",
    )
    n_top_genes: Int | None = Field(
        MODEL_DEFAULTS["n_top_genes"],
        ge=1,
        description=(
            "When the vocabulary is built from the data (data.gene_vocab null or 'data'), keep "
            "only this many highly variable genes, selected on the training cells; null keeps "
            "every gene. Formerly 'hvg'."
        ),
    )


class DataConfig(Section):
    """``data``: which cells to read and how to turn them into model input."""

    source: Literal["local"] = Field(
        "local", description="Where the cells come from: 'local' reads AnnData files from disk."
    )
    paths: list[PathValue] = Field(
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
    max_genes: Int | None = Field(
        None,
        ge=1,
        description=(
            "Same limit as tokenizer.max_genes (kept for configs written that way): if given, "
            "it must equal tokenizer.max_genes."
        ),
    )
    num_workers: Int = Field(
        0,
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


class MaskingConfig(Section):
    """``tokenizer.masking``: masked-gene pretraining. Ignored when fine-tuning."""

    mask_ratio: Ratio = Field(
        MASKING_DEFAULTS.mask_ratio,
        description=(
            "Fraction of each cell's genes selected for the model to predict during pretraining "
            "(their expression is hidden). Not used for fine-tuning or embedding."
        ),
    )
    random_replace_ratio: Ratio = Field(
        MASKING_DEFAULTS.random_replace_ratio,
        description="Of the selected genes, the fraction shown as a random other gene.",
    )
    keep_ratio: Ratio = Field(
        MASKING_DEFAULTS.keep_ratio,
        description=(
            "Of the selected genes, the fraction left visible (but still predicted); the rest "
            "are replaced by the [MASK] token."
        ),
    )

    @model_validator(mode="after")
    def _check_split(self) -> MaskingConfig:
        self.to_settings()
        return self

    def to_settings(self) -> MaskingSettings:
        """The settings ``ScForge.train(masking=...)`` takes (their checks raise here)."""
        return MaskingSettings(**self.model_dump())


class TokenizerConfig(Section):
    """``tokenizer``: how a cell's expression profile becomes a sequence of tokens."""

    strategy: Literal[tuple(TOKENIZERS)] = Field(  # type: ignore[valid-type]
        MODEL_DEFAULTS["tokenizer"],
        description=(
            "'rank_value' orders a cell's genes from highest to lowest expression "
            "(Geneformer); 'binned_expression' pairs each gene with its expression level cut "
            "into n_bins bins (scGPT); 'continuous' pairs each gene with its expression value."
        ),
    )
    max_genes: Int = Field(
        MODEL_DEFAULTS["max_genes"],
        ge=1,
        description=(
            "Genes kept per cell, its most highly expressed (the [CLS] token of prepend_cls "
            "is not counted). At most model.max_seq_len."
        ),
    )
    prepend_cls: bool = Field(
        MODEL_DEFAULTS["prepend_cls"],
        description=(
            "Start every sequence with a [CLS] token that summarises the cell; needed for "
            "model.pooling 'cls'."
        ),
    )
    n_bins: Int = Field(
        MODEL_DEFAULTS["n_bins"],
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


class ModelConfig(Section):
    """``model``: the transformer backbone. Must match a pretrained checkpoint being loaded."""

    architecture: Literal["transformer_encoder"] = Field(
        "transformer_encoder", description="Model family; 'transformer_encoder' (BERT-like)."
    )
    hidden_dim: Int = Field(
        MODEL_DEFAULTS["hidden_dim"],
        ge=1,
        description=(
            "Width of the model: length of the vector representing each gene token and each "
            "cell embedding. Must be divisible by num_heads."
        ),
    )
    num_layers: Int = Field(
        MODEL_DEFAULTS["num_layers"], ge=1, description="Number of stacked transformer blocks."
    )
    num_heads: Int = Field(
        MODEL_DEFAULTS["num_heads"],
        ge=1,
        description="Attention heads per block (each looks at hidden_dim / num_heads).",
    )
    ffn_dim: Int | None = Field(
        MODEL_DEFAULTS["ffn_dim"],
        ge=1,
        description="Width of the feed-forward layer in each block; null means 4 x hidden_dim.",
    )
    dropout: DropoutRate = Field(
        MODEL_DEFAULTS["dropout"],
        description="Fraction of activations randomly zeroed while training (regularisation).",
    )
    max_seq_len: Int | None = Field(
        MODEL_DEFAULTS["max_seq_len"],
        ge=1,
        description=(
            "Most genes of a cell the model can read ([CLS] not counted); at least "
            "tokenizer.max_genes. null means tokenizer.max_genes."
        ),
    )
    pooling: Literal[POOLINGS] = Field(  # type: ignore[valid-type]
        MODEL_DEFAULTS["pooling"],
        description=(
            "How the cell embedding is made from the tokens: 'cls' takes the [CLS] token "
            "(needs tokenizer.prepend_cls), 'mean' averages the gene tokens."
        ),
    )
    activation: Literal[ACTIVATIONS] = Field(  # type: ignore[valid-type]
        MODEL_DEFAULTS["activation"], description="Non-linearity in the feed-forward layers."
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
# the whole file
# --------------------------------------------------------------------------------------------


class ScForgeConfig(Section):
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
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(
                "a config must be a mapping of sections "
                f"({', '.join(cls.model_fields)}); got {show(data)}",
                source,
            )
        data = apply_overrides(data, overrides, cls)
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
