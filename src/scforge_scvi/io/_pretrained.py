"""Pretrained model directories: ``config.json`` + ``model.safetensors`` + ``gene_vocab.json``.

Nothing here unpickles: configuration is JSON, weights are safetensors, and a Lightning
``.ckpt`` written by scforge is read with ``torch.load(weights_only=True)``. Directories are
written into a temporary sibling and swapped into place, so an interrupted save never leaves a
half-written model where a good one was.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

from ._atomic import atomic_directory, resolve_directory

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
VOCAB_NAME = "gene_vocab.json"
FORMAT_NAME = "scforge-pretrained"
FORMAT_VERSION = 1

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
    vocab: GeneVocab
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


def _json_dump(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_pretrained(
    path: str | os.PathLike,
    config: dict[str, Any],
    vocab: GeneVocab,
    state_dict: dict[str, torch.Tensor],
    *,
    overwrite: bool = True,
) -> Path:
    """Write a pretrained directory atomically (temporary sibling, then swap)."""
    path = Path(path)
    with atomic_directory(path, overwrite=overwrite) as tmp:
        _json_dump(
            {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **config}, tmp / CONFIG_NAME
        )
        vocab.save(tmp / VOCAB_NAME)
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": FORMAT_NAME})
    return path


_EXPECTED = (
    f"pass a pretrained directory ({CONFIG_NAME} + {WEIGHTS_NAME} + {VOCAB_NAME}) or a .ckpt "
    "written by scforge training"
)


def read_pretrained(path: str | os.PathLike) -> Pretrained:
    """Read a pretrained directory or an scforge Lightning checkpoint (weights only).

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
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME, VOCAB_NAME) if not (path / n).is_file()]
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
    try:
        state_dict = load_file(str(path / WEIGHTS_NAME))
    except (SafetensorError, OSError, ValueError) as err:
        raise ScForgeValueError(
            f"{path / WEIGHTS_NAME} is truncated or corrupt and cannot be read ({one_line(err)}); "
            "no model was built. Re-export it from the training run."
        ) from None
    return Pretrained(config, GeneVocab.load(path / VOCAB_NAME), state_dict, str(path))


def _read_checkpoint(path: Path) -> Pretrained:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused an object: nothing was run
        raise ScForgeValueError(
            f"{path} holds pickled Python objects, not only tensors, and scforge never "
            f"unpickles those (nothing in it was run); {_EXPECTED}."
        ) from None
    except Exception as err:  # truncated, empty, not a zip/pickle at all
        raise ScForgeValueError(
            f"{path} could not be read as a checkpoint: it is truncated or not a PyTorch "
            f"checkpoint ({one_line(err)}); {_EXPECTED}."
        ) from None
    meta = ckpt.get("scforge") if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ScForgeValueError(
            f"{path} is not a checkpoint written by scforge (no 'scforge' metadata; a "
            f"checkpoint of another model or architecture); {_EXPECTED}."
        )
    prefix = "module."
    state_dict = {
        k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)
    }
    return Pretrained(meta["config"], GeneVocab.from_dict(meta["vocab"]), state_dict, str(path))


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
