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
from typing import Any

import torch

from scforge_scvi._atomic import atomic_directory, resolve_directory
from scforge_scvi._errors import ScForgeFileNotFoundError, ScForgeValueError
from scforge_scvi._logging import logger
from scforge_scvi._version import __version__
from scforge_scvi.data import GeneVocab

from ._adapters import is_lora_key
from ._checkpoint import (
    module_state_dict,
    read_json,
    read_lightning_checkpoint,
    read_tensors,
    write_tensors,
)

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
        write_tensors(tmp / WEIGHTS_NAME, state_dict, format=FORMAT_NAME)
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
    config = read_json(path / CONFIG_NAME, "save_pretrained")
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
    state_dict = read_tensors(
        path / WEIGHTS_NAME, "no model was built. Re-export it from the training run."
    )
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
