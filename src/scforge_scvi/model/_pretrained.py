"""Pretrained directories of the model classes: what is saved, and building a model from it.

One path for :class:`~scforge_scvi.ScForge` and :class:`~scforge_scvi.ScForgePerturb`:
:class:`PretrainedMixin` writes and reads :mod:`scforge_scvi.io`'s format (a directory, or the
same description inside every Lightning ``.ckpt`` of training); each model class says what
its description holds and how a model is built from it. :class:`ScForgePretrainedMixin` adds
``ScForge``'s LoRA adapter directories and Geneformer import.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import torch

from scforge_scvi._errors import ScForgeValueError
from scforge_scvi._logging import logger
from scforge_scvi.io import (
    Pretrained,
    check_architecture,
    load_weights,
    read_pretrained,
    write_pretrained,
)
from scforge_scvi.io._adapters import read_adapter, write_adapter
from scforge_scvi.io._geneformer import read_geneformer
from scforge_scvi.io._pretrained import FORMAT_VERSION
from scforge_scvi.train import LoraSettings

from ._settings import flattened, grouped, init_defaults

if TYPE_CHECKING:
    from anndata import AnnData

    from scforge_scvi.data import GeneVocab


class PretrainedMixin:
    """Pretrained directories and checkpoints of a model class.

    The class defines ``pretrained_config()`` (the JSON description written to
    ``config.json``, with ``"model_class"``), ``_pretrained_vocab()`` (the genes written to
    ``gene_vocab.json``) and the classmethod ``_from_pretrained_object(pretrained, adata,
    kwargs)``, which builds a model on ``adata`` from a :class:`~scforge_scvi.io.Pretrained`
    and loads its weights.
    """

    def checkpoint_metadata(self, **extra: Any) -> dict[str, Any]:
        """What the training plan stores under ``"scforge"`` in every ``.ckpt``.

        The model's description (with ``extra`` added, e.g. the run of a resumable
        checkpoint) and its vocabulary, so that :func:`~scforge_scvi.io.read_pretrained`
        reads a checkpoint like a pretrained directory.
        """
        return {
            "config": {**self.pretrained_config(), **extra},
            "vocab": self._pretrained_vocab().to_dict(),
        }

    def _write_pretrained(
        self, path: str | Path, state_dict: dict[str, torch.Tensor], overwrite: bool
    ) -> Path:
        config, vocab = self.pretrained_config(), self._pretrained_vocab()
        path = write_pretrained(path, config, vocab, state_dict, overwrite=overwrite)
        logger.info(f"Saved pretrained model to {path}.")
        return path

    @classmethod
    def _read_pretrained(cls, path: str | Path) -> Pretrained:
        """A pretrained directory or ``.ckpt`` written by this model class."""
        pretrained = read_pretrained(path)
        # a description without a model class predates ScForgePerturb
        model_class = pretrained.config.get("model_class", "ScForge")
        if model_class != cls.__name__:
            raise ScForgeValueError(
                f"{pretrained.source} holds a {model_class} model, not a {cls.__name__}; load "
                f"it with {model_class}.from_pretrained."
            )
        return pretrained

    @classmethod
    def from_pretrained(cls, path: str | Path, adata: AnnData, **kwargs: Any) -> Self:
        """Build a model on ``adata`` from a pretrained directory or an scforge ``.ckpt``.

        Loads weights only: the optimizer, schedule and step of a later :meth:`train` start
        fresh. :class:`~scforge_scvi.ScForge` uses the saved vocabulary and per-gene
        statistics (never refitted, so genes of ``adata`` in another order or a subset map
        correctly) and keeps a classification head fitted for the same labels (otherwise a
        new head is initialised for the labels registered on ``adata``); what was loaded is in
        ``model.load_report_``. :class:`~scforge_scvi.ScForgePerturb` matches tensors indexed
        by genes, perturbations or batches by name (a new gene or perturbation gets a fresh
        row) and skips tensors whose shape does not fit; what was loaded is in
        ``model.init_report_``; freezing a newly initialised backbone parameter is an error,
        and the model counts as untrained until :meth:`train` runs (:meth:`predict` uses the
        loaded weights).

        Parameters
        ----------
        path
            Pretrained directory (``config.json`` + ``model.safetensors`` +
            ``gene_vocab.json``) written by :meth:`save_pretrained`, or a Lightning ``.ckpt``
            written by :meth:`train` (only its weights are read).
        adata
            AnnData registered with :meth:`setup_anndata`.
        **kwargs
            Init arguments that replace the saved ones (e.g. ``dropout``). For ``ScForge``,
            architecture arguments that differ from the checkpoint raise an error starting
            "Checkpoint dimension mismatch".
        """
        return cls._from_pretrained_object(cls._read_pretrained(path), adata, kwargs)


class ScForgePretrainedMixin(PretrainedMixin):
    """:class:`PretrainedMixin` of :class:`~scforge_scvi.ScForge`, with LoRA adapter
    directories and Geneformer import.

    The model has ``module`` (with ``merged_state_dict``, ``adapter_state_dict`` and
    ``load_adapter_state_dict``), ``vocab``, ``backbone_config``, ``class_names_``, ``lora_``
    and ``init_params_``.
    """

    def pretrained_config(self) -> dict[str, Any]:
        """The JSON-serialisable description of this model (``config.json``)."""
        params = flattened(self.init_params_["non_kwargs"])  # config.json keeps flat names
        for key in ("vocab", "lora", "class_names"):  # stored on their own
            params.pop(key, None)
        return {
            "model_class": type(self).__name__,
            "format_version": FORMAT_VERSION,  # also in a Lightning checkpoint's metadata
            "init_params": params,
            "backbone": self.backbone_config.to_dict(),
            "class_names": list(self.class_names_),
        }

    def _pretrained_vocab(self) -> GeneVocab:
        return self.vocab

    def save_pretrained(self, path: str | Path, *, overwrite: bool = True) -> Path:
        """Save ``config.json``, ``model.safetensors`` and ``gene_vocab.json`` to ``path``.

        LoRA adapters, if any, are merged into the saved weights, so the directory loads as
        a plain model. The write is atomic: an interrupted save leaves a previous model at
        ``path`` intact.
        """
        return self._write_pretrained(path, self.module.merged_state_dict(), overwrite)

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
    ) -> Self:
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
    def _from_pretrained_object(
        cls, pretrained: Pretrained, adata: AnnData, kwargs: dict[str, Any]
    ) -> Self:
        params, kwargs = pretrained.init_params, flattened(kwargs)  # both by flat names
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
        model = cls(adata, vocab=pretrained.vocab, **grouped(params))
        if starting_point is not None:  # still recorded as the model's own setting
            model.architecture = replace(model.architecture, gene_embedding_init=starting_point)
            model.init_params_["non_kwargs"]["architecture"] = model.architecture.to_dict()
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
