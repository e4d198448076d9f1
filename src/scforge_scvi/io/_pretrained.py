"""Pretrained model directories: ``config.json`` + ``model.safetensors`` + ``gene_vocab.json``.

Nothing here unpickles: configuration is JSON, weights are safetensors, and a Lightning
``.ckpt`` written by scforge is read with ``torch.load(weights_only=True)``. Directories are
written into a temporary sibling and swapped into place, so an interrupted save never leaves a
half-written model where a good one was.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scforge_scvi._errors import (
    ScForgeFileNotFoundError,
    ScForgeValueError,
    one_line,
)
from scforge_scvi._logging import logger
from scforge_scvi.data import GeneVocab

if TYPE_CHECKING:
    from anndata import AnnData

from scforge_scvi._atomic import atomic_directory, resolve_directory

from ._checkpoint import module_state_dict, read_lightning_checkpoint

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
VOCAB_NAME = "gene_vocab.json"
FORMAT_NAME = "scforge-pretrained"
# 2: ScForge's ``max_seq_len`` counts genes (version 1 counted the <cls> / <eos> tokens too)
FORMAT_VERSION = 2

# init arguments that fix tensor shapes (or which tensors exist and how they are used): they
# must match between checkpoint and model
ARCHITECTURE_KEYS = (
    "tokenizer",
    "hidden_dim",
    "num_layers",
    "num_heads",
    "ffn_dim",
    "max_seq_len",
    "n_bins",
    "activation",
    "pooling",
    "prepend_cls",
    "max_genes",
    "append_eos",
    "norm_position",
    "embedding_norm",
)


class CheckpointMismatchError(ScForgeValueError):
    """A checkpoint's architecture differs from the requested one."""


@dataclass
class Pretrained:
    """What a pretrained directory or scforge ``.ckpt`` holds."""

    config: dict[str, Any]
    vocab: GeneVocab | None
    state_dict: dict[str, torch.Tensor]
    source: str = ""

    @property
    def init_params(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~scforge_scvi.ScForge` that rebuild the architecture."""
        return dict(self.config["init_params"])

    @property
    def class_names(self) -> list[str]:
        """Classes of the fine-tuned classification head (empty when there is none)."""
        return list(self.config.get("class_names", []))

    @property
    def has_regression_head(self) -> bool:
        """Whether the weights hold a fine-tuned regression head."""
        return any(key.startswith("regressor.") for key in self.state_dict)

    @property
    def has_unmerged_adapters(self) -> bool:
        """Whether the weights hold LoRA adapters not merged into the base weights."""
        from scforge_scvi.train import is_lora_key

        return any(is_lora_key(key) for key in self.state_dict)


@dataclass
class LoadReport:
    """Which parameters were loaded, skipped and newly initialised."""

    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line with the counts of loaded, skipped and newly initialised tensors."""
        text = (
            f"{len(self.loaded)} tensors loaded, {len(self.skipped)} skipped, "
            f"{len(self.initialised)} newly initialised"
        )
        if self.initialised:
            text += f" ({_preview(self.initialised)})"
        if self.skipped:
            text += f"; skipped: {_preview(self.skipped)}"
        return text


def _preview(keys: list[str], k: int = 4) -> str:
    heads = sorted({key.split(".")[0] for key in keys})
    return ", ".join(heads[:k]) + (", ..." if len(heads) > k else "")


def _upgrade(config: dict[str, Any], version: int) -> dict[str, Any]:
    """A ``config.json`` of an older format version, read as the current version means it."""
    params = config.get("init_params")
    old_length = params and params.get("max_seq_len") is not None
    if version < 2 and config.get("model_class") == "ScForge" and old_length:
        # it counted the <cls> / <eos> tokens too (ScForge's defaults: <cls> only)
        params["max_seq_len"] -= int(params.get("prepend_cls", True))
        params["max_seq_len"] -= int(params.get("append_eos", False))
    return config


def _json_dump(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_pretrained(
    path: str | os.PathLike,
    config: dict[str, Any],
    vocab: GeneVocab | None,
    state_dict: dict[str, torch.Tensor],
    *,
    overwrite: bool = True,
) -> Path:
    """Write a pretrained directory atomically (temporary sibling, then swap).

    Parameters
    ----------
    path
        The directory.
    config
        JSON-serialisable description of the model, written to ``config.json`` after the
        format name, its version and the scforge version; ``"model_class"`` names the class
        that reads it back.
    vocab
        Written to ``gene_vocab.json``; ``None`` for a model without a gene vocabulary.
    state_dict
        Written to ``model.safetensors``.
    overwrite
        Replace a directory at ``path``.
    """
    from scforge_scvi import __version__

    path = Path(path)
    header = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "scforge_version": __version__,
    }
    with atomic_directory(path, overwrite=overwrite) as tmp:
        _json_dump(
            {**header, **{k: v for k, v in config.items() if k not in header}}, tmp / CONFIG_NAME
        )
        if vocab is not None:
            vocab.save(tmp / VOCAB_NAME)
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": FORMAT_NAME})
    return path


_EXPECTED = (
    f"pass a pretrained directory ({CONFIG_NAME} + {WEIGHTS_NAME} + {VOCAB_NAME}) or a .ckpt "
    "written by scforge training"
)


def read_pretrained(path: str | os.PathLike, *, vocab: bool = True) -> Pretrained:
    """Read a pretrained directory or an scforge Lightning checkpoint (weights only).

    ``vocab=False`` reads a directory of a model without a gene vocabulary
    (``Pretrained.vocab`` is then ``None``).

    Raises
    ------
    ScForgeFileNotFoundError
        If nothing is at ``path`` or a directory lacks one of the three files.
    ScForgeValueError
        If a file is truncated, corrupt, not JSON / safetensors / a PyTorch checkpoint, holds
        pickled objects other than tensors (never unpickled), or was not written by scforge.
    """
    path = resolve_directory(path)
    if not path.exists():
        raise ScForgeFileNotFoundError(f"No pretrained model at '{path}'; {_EXPECTED}.")
    if path.is_file():
        return _read_checkpoint(path)
    needed = (CONFIG_NAME, WEIGHTS_NAME, VOCAB_NAME) if vocab else (CONFIG_NAME, WEIGHTS_NAME)
    missing = [n for n in needed if not (path / n).is_file()]
    if missing:
        raise ScForgeFileNotFoundError(
            f"'{path}' is not a pretrained scforge directory: missing {missing} "
            f"(expected {CONFIG_NAME}, {WEIGHTS_NAME} and {VOCAB_NAME})."
        )
    try:
        config = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ScForgeValueError(
            f"{path / CONFIG_NAME} is not valid JSON ({one_line(err)}); the directory is "
            "truncated or was not written by save_pretrained."
        ) from None
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        raise ScForgeValueError(
            f"{path / CONFIG_NAME} is not an scforge config (no format {FORMAT_NAME!r}); "
            f"{_EXPECTED}."
        )
    if config.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise ScForgeValueError(
            f"{path} was written by scforge {config.get('scforge_version')} in format version "
            f"{config['format_version']}; this scforge reads versions up to {FORMAT_VERSION}: "
            "upgrade scforge_scvi."
        )
    try:
        state_dict = load_file(str(path / WEIGHTS_NAME))
    except (SafetensorError, OSError, ValueError) as err:
        raise ScForgeValueError(
            f"{path / WEIGHTS_NAME} is truncated or corrupt and cannot be read ({one_line(err)}); "
            "no model was built. Re-export it from the training run."
        ) from None
    genes = GeneVocab.load(path / VOCAB_NAME) if vocab else None
    config = _upgrade(config, config.get("format_version", FORMAT_VERSION))
    return Pretrained(config, genes, state_dict, str(path))


def _read_checkpoint(path: Path) -> Pretrained:
    ckpt = read_lightning_checkpoint(path, key="scforge", expected=_EXPECTED)
    meta = ckpt["scforge"]
    config = _upgrade(meta["config"], meta["config"].get("format_version", 1))
    return Pretrained(
        config, GeneVocab.from_dict(meta["vocab"]), module_state_dict(ckpt), str(path)
    )


def check_architecture(saved: dict[str, Any], requested: dict[str, Any], source: str) -> None:
    """Raise ``CheckpointMismatchError`` naming every architecture field that differs."""
    diffs = [
        f"{key}: checkpoint {saved.get(key)!r}, requested {requested[key]!r}"
        for key in ARCHITECTURE_KEYS
        if key in requested and requested[key] is not None and requested[key] != saved.get(key)
    ]
    if diffs:
        raise CheckpointMismatchError(
            f"Checkpoint dimension mismatch with {source}: "
            + "; ".join(diffs)
            + ". Use the checkpoint's architecture (see its config.json)."
        )


def load_weights(
    module: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    *,
    skip_prefixes: tuple[str, ...] = (),
) -> LoadReport:
    """Load matching tensors into ``module`` and report what was loaded, skipped, initialised.

    Tensors under ``skip_prefixes`` (e.g. a classifier fitted for other labels) are skipped.
    Any other tensor of a different shape is an architecture mismatch: an error.
    """
    own = module.state_dict()
    report = LoadReport()
    to_load = {}
    for key, value in state_dict.items():
        if key.startswith(skip_prefixes) or key not in own:
            report.skipped.append(key)
        elif own[key].shape != value.shape:
            raise CheckpointMismatchError(
                f"Checkpoint dimension mismatch for {key}: checkpoint {tuple(value.shape)}, "
                f"model {tuple(own[key].shape)}."
            )
        else:
            to_load[key] = value
            report.loaded.append(key)
    report.initialised = [k for k in own if k not in to_load]
    module.load_state_dict(to_load, strict=False)  # missing keys: reported as initialised
    logger.info(f"Loaded pretrained weights: {report.summary()}.")
    return report


def init_defaults(model_class: type) -> dict[str, Any]:
    """The keyword defaults of ``model_class.__init__`` that a pretrained directory records
    (the AnnData, registry, vocabulary, adapters and classes are stored apart)."""
    import inspect

    skip = {"self", "adata", "registry", "vocab", "lora", "class_names"}
    signature = inspect.signature(model_class.__init__).parameters
    return {
        k: p.default
        for k, p in signature.items()
        if k not in skip and p.default is not inspect.Parameter.empty
    }


class PretrainedMixin:
    """Pretrained directories, LoRA adapter directories and Geneformer import of a model.

    For :class:`~scforge_scvi.ScForge`: the model has ``module`` (with
    ``merged_state_dict``, ``adapter_state_dict`` and ``load_adapter_state_dict``),
    ``vocab``, ``backbone_config``, ``class_names_``, ``lora_`` and ``init_params_``.
    """

    def pretrained_config(self) -> dict[str, Any]:
        """The JSON-serialisable description of this model (``config.json``)."""
        params = dict(self.init_params_["non_kwargs"])
        for key in ("vocab", "lora", "class_names"):  # stored on their own
            params.pop(key, None)
        return {
            "model_class": type(self).__name__,
            "format_version": FORMAT_VERSION,  # also in a Lightning checkpoint's metadata
            "init_params": params,
            "backbone": self.backbone_config.to_dict(),
            "class_names": list(self.class_names_),
        }

    def save_pretrained(self, path: str, *, overwrite: bool = True) -> None:
        """Save ``config.json``, ``model.safetensors`` and ``gene_vocab.json`` to ``path``.

        LoRA adapters, if any, are merged into the saved weights, so the directory loads as
        a plain model. The write is atomic: an interrupted save leaves a previous model at
        ``path`` intact.
        """
        write_pretrained(
            path,
            self.pretrained_config(),
            self.vocab,
            self.module.merged_state_dict(),
            overwrite=overwrite,
        )
        logger.info(f"Saved pretrained model to {path}.")

    def save_adapter(self, path: str, *, overwrite: bool = True) -> int:
        """Save the LoRA adapters and the task head to the directory ``path``.

        Writes ``adapter_config.json`` (LoRA settings and class names) and
        ``adapter_model.safetensors`` (adapter and head weights only: a small fraction of
        the full model). The base model is not saved; load it with :meth:`from_pretrained`,
        then call :meth:`load_adapter`. The write is atomic.

        Returns
        -------
        Size of ``adapter_model.safetensors`` in bytes.
        """
        from ._adapters import write_adapter

        if self.lora_ is None:
            raise ScForgeValueError(
                "This model has no LoRA adapters; train with strategy='lora' first "
                "(or use save_pretrained for the full model)."
            )
        config = {"lora": dict(self.lora_), "class_names": list(self.class_names_)}
        size = write_adapter(path, config, self.module.adapter_state_dict(), overwrite=overwrite)
        logger.info(f"Saved LoRA adapters and task head to {path} ({size / 1e6:.2f} MB).")
        return size

    def load_adapter(self, path: str) -> None:
        """Load adapters and task head saved by :meth:`save_adapter` onto this (base) model.

        The model must have been built on the same base weights (e.g. with
        :meth:`from_pretrained` of the base directory) and for the same class names.
        """
        from scforge_scvi.train import LoraSettings

        from ._adapters import read_adapter

        config, state = read_adapter(path)
        if config["class_names"] != list(self.class_names_):
            raise ScForgeValueError(
                f"The adapter's head was fitted for labels {config['class_names']}; this model "
                f"has {list(self.class_names_)}."
            )
        settings = LoraSettings.from_dict(config["lora"])
        if self.lora_ is None:
            self._apply_lora(settings)
        elif self.lora_ != settings.to_dict():
            raise ValueError(
                f"This model already carries LoRA adapters {self.lora_}, not {settings.to_dict()}."
            )
        self.module.load_adapter_state_dict(state)
        self.module.eval()
        logger.info(f"Loaded LoRA adapters and task head from {path}.")

    @classmethod
    def from_pretrained(cls, path: str, adata: AnnData, **kwargs: Any) -> PretrainedMixin:
        """Build a model on ``adata`` from a pretrained directory or scforge ``.ckpt``.

        Loads weights only (a later :meth:`train` starts a fresh optimizer and schedule).
        The saved vocabulary and per-gene statistics are used, never refitted, so genes of
        ``adata`` in another order or a subset map correctly. A classification head fitted
        for the same labels is kept; otherwise a new head is initialised for the labels
        registered on ``adata``.

        Parameters
        ----------
        path
            Pretrained directory (``config.json`` + ``model.safetensors`` +
            ``gene_vocab.json``) or a Lightning ``.ckpt`` written during scforge training.
        adata
            AnnData registered with :meth:`setup_anndata`.
        **kwargs
            Init arguments to override (e.g. ``dropout``). Architecture arguments that differ
            from the checkpoint raise an error starting "Checkpoint dimension mismatch".
        """
        return cls._from_pretrained_object(read_pretrained(path), adata, kwargs)

    @classmethod
    def from_geneformer(
        cls,
        path: str,
        adata: AnnData,
        *,
        token_dictionary: str | None = None,
        gene_median_dictionary: str | None = None,
        model_input_size: int | None = None,
        special_tokens: bool | None = None,
        **kwargs: Any,
    ) -> PretrainedMixin:
        """Build a model on ``adata`` from a Geneformer model directory (public weights).

        The backbone, gene head, vocabulary, per-gene medians and tokenizer reproduce
        Geneformer: BERT post-LayerNorm blocks with its embedding LayerNorm, absolute positions
        (the token-type embedding folded in), its activation and masked-LM head; genes ranked
        by ``counts / n_counts * 10,000 / median`` in float64, truncated to the model's input
        size, with ``<cls>`` and ``<eos>`` for V2 models. Nothing is executed while loading
        (see :func:`scforge_scvi.io.read_geneformer`). Fine-tune it like any model:
        :meth:`train` with any strategy, then :meth:`save_pretrained`.

        Parameters
        ----------
        path
            Geneformer model directory: ``config.json`` (``BertForMaskedLM``) and
            ``model.safetensors`` or ``pytorch_model.bin``.
        adata
            AnnData registered with :meth:`setup_anndata`: raw counts of all genes (no
            feature selection), Ensembl ids in ``var_names`` or in a ``var`` column such as
            ``gene_ids``.
        token_dictionary, gene_median_dictionary
            Geneformer's token dictionary (Ensembl id -> token id) and gene median dictionary
            (``.pkl`` or ``.json``); default: the one file in ``path`` whose name contains
            ``token_dictionary`` / ``gene_median``.
        model_input_size
            Longest input in tokens (special tokens included); default the model's
            ``max_position_embeddings`` (2048 for V1, 4096 for V2 models).
        special_tokens
            Prepend ``<cls>`` and append ``<eos>``; default: when the token dictionary has them.
        **kwargs
            Init arguments to override, e.g. ``dropout`` or ``min_coverage`` (default 0.25
            for imported models: Geneformer's vocabulary holds protein-coding and miRNA genes
            only, a minority of a full 10x gene list on some annotations).
        """
        from ._geneformer import read_geneformer

        pretrained = read_geneformer(
            path,
            token_dictionary=token_dictionary,
            gene_median_dictionary=gene_median_dictionary,
            model_input_size=model_input_size,
            special_tokens=special_tokens,
            defaults=init_defaults(cls),
        )
        return cls._from_pretrained_object(pretrained, adata, kwargs)

    @classmethod
    def _from_pretrained_object(cls, pretrained, adata: AnnData, kwargs: dict) -> PretrainedMixin:
        model_class = pretrained.config.get("model_class", cls.__name__)
        if model_class != cls.__name__:
            raise ScForgeValueError(
                f"{pretrained.source} holds a {model_class} model, not a {cls.__name__}; load "
                f"it with {model_class}.from_pretrained."
            )
        params = pretrained.init_params
        saved = dict(params)  # a None that was saved stands for the value it implied
        backbone = pretrained.config.get("backbone", {})
        if saved.get("max_seq_len") is None:
            saved["max_seq_len"] = saved.get("max_genes")  # None meant "as many as max_genes"
        if saved.get("ffn_dim") is None and backbone.get("hidden_dim"):
            saved["ffn_dim"] = backbone.get("ffn_dim") or 4 * backbone["hidden_dim"]
        check_architecture(saved, kwargs, source=f"the requested {cls.__name__} arguments")
        params.update(kwargs)
        manager = cls._get_most_recent_anndata_manager(adata, required=True)
        if manager.registry["setup_args"].get("labels_key") is None and pretrained.class_names:
            # a query without labels keeps the fine-tuned classifier and its classes
            params["class_names"] = pretrained.class_names
        # the checkpoint's weights replace any computed starting point: skip computing one
        starting_point = params.pop("gene_embedding_init", None)
        model = cls(adata, vocab=pretrained.vocab, **params)
        if starting_point is not None:  # still recorded as the model's own setting
            model.init_params_["non_kwargs"]["gene_embedding_init"] = starting_point
        same_labels = pretrained.class_names == model.class_names_
        skip = () if same_labels else model.module._HEAD_PREFIXES
        if not same_labels and pretrained.class_names and model.class_names_:
            logger.info(
                f"The checkpoint's classifier was fitted for labels {pretrained.class_names}; "
                f"this data has {model.class_names_}: a new classification head is initialised."
            )
        model.load_report_ = load_weights(model.module, pretrained.state_dict, skip_prefixes=skip)
        model.module.eval()
        return model
