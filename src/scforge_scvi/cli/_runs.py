"""From a validated config to calls of the public API: data, model, training arguments, runs.

Every key of :class:`~scforge_scvi.config.ScForgeConfig` is either mapped to an argument of
:class:`~scforge_scvi.ScForge` / :meth:`~scforge_scvi.ScForge.train` here, or rejected by
:func:`check_supported` with a message saying why (the API lacks that feature).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from lightning.pytorch.callbacks import TQDMProgressBar

from scforge_scvi._errors import one_line
from scforge_scvi.config import ScForgeConfig, TrainingConfig
from scforge_scvi.io import run_differences

RUN_CONFIG = "config.yaml"
RUN_METRICS = "metrics.csv"
RUN_BEST = "best"
RUN_LAST_CKPT = "last.ckpt"
#: cells sampled from streamed shards to set up the model (vocabulary, medians, classes)
STREAM_SAMPLE = 10_000
# a label column registered on query data so that a fitted classifier head is kept
_QUERY_LABELS = "_scforge_query_labels"
_UNLABELLED = "_scforge_unlabelled"


class CliError(Exception):
    """A problem with the user's input, reported as one line with exit code 2."""


# -- config checks ---------------------------------------------------------------------------
def check_supported(config: ScForgeConfig) -> None:
    """Reject valid schema settings that the Python API cannot honour (never ignore them)."""
    scheduler = config.training.scheduler
    problems = []
    default_ratio = type(scheduler).model_fields["min_lr_ratio"].default
    if scheduler.name == "constant" and scheduler.min_lr_ratio != default_ratio:
        problems.append(
            "training.scheduler.min_lr_ratio is only used by 'cosine_warmup'; remove it for "
            "the 'constant' schedule"
        )
    if config.training.val_split == 0.0:
        problems.append(
            "training.val_split: 0 leaves no validation cells, but the best model is chosen by "
            "validation loss; use e.g. 0.1"
        )
    if problems:
        raise CliError("; ".join(problems))


def unused_sections(config: ScForgeConfig, used: set[str]) -> list[str]:
    """Sections written in the config that a command does not read."""
    return sorted(name for name in config.model_fields_set if name not in used)


# -- data ------------------------------------------------------------------------------------
def read_h5ad(path: str | Path) -> AnnData:
    """Read an .h5ad (or .zarr) file, turning any failure into a one-line :class:`CliError`."""
    import anndata as ad
    import h5py

    path = Path(path)
    if not path.exists():
        raise CliError(f"data file '{path}' does not exist")
    if path.suffix != ".zarr" and path.is_dir():
        raise CliError(f"'{path}' is a directory, not an .h5ad file (or a .zarr store)")
    if path.suffix != ".zarr" and not h5py.is_hdf5(path):
        raise CliError(
            f"cannot read '{path}' as AnnData: it is not an HDF5 file, as an .h5ad written by "
            "anndata is"
        )
    try:
        return ad.read_zarr(path) if path.suffix == ".zarr" else ad.read_h5ad(path)
    except Exception as err:  # h5py, zarr and anndata raise many kinds
        raise CliError(f"cannot read '{path}' as AnnData ({one_line(err)})") from None


def read_data(config: ScForgeConfig) -> AnnData:
    """All files of ``data.paths``, concatenated (genes in common) when there are several."""
    import anndata as ad

    adatas = [read_h5ad(path) for path in config.data.paths]
    if len(adatas) == 1:
        return adatas[0]
    return ad.concat(adatas, join="inner", label="source_file", index_unique="-")


def open_stream(config: ScForgeConfig):  # -> StreamedCells
    """``data.paths`` as streamed shards (``data.streaming: true``), errors as one line."""
    from scforge_scvi.data import StreamedCells

    for path in config.data.paths:
        if not Path(path).exists():
            raise CliError(f"data file '{path}' does not exist")
    try:
        return StreamedCells(config.data.paths, layer=config.data.layer)
    except (OSError, KeyError, ValueError) as err:
        raise CliError(one_line(err).strip("'\"")) from None


def read_training_data(config: ScForgeConfig):  # -> tuple[AnnData, StreamedCells | None]
    """The cells to register and build the model on, and the stream to train on, if any.

    With ``data.streaming: true`` the registered AnnData is a random sample of
    ``STREAM_SAMPLE`` cells of the shards (vocabulary, per-gene medians, label classes);
    training then reads every cell from disk.
    """
    if not config.data.streaming:
        return read_data(config), None
    stream = open_stream(config)
    return stream.sample(STREAM_SAMPLE, seed=config.training.seed), stream


def _setup_anndata(adata: AnnData, source: str | None, **kwargs: Any) -> None:
    """``ScForge.setup_anndata``; a problem with the cells names the file(s) they came from."""
    from scforge_scvi import ScForge
    from scforge_scvi._errors import ScForgeError

    try:
        ScForge.setup_anndata(adata, **kwargs)
    except ScForgeError as err:
        if source is None:
            raise
        raise CliError(f"{source}: {one_line(err)}") from None


def data_sources(paths) -> str:
    """The data files, named for messages."""
    names = [f"'{p}'" for p in paths]
    return names[0] if len(names) == 1 else f"data.paths [{', '.join(names)}]"


def require_obs(adata: AnnData, key: str, what: str) -> None:
    if key not in adata.obs:
        raise CliError(
            f"{what} '{key}' is not a column of the data's obs; available columns: "
            f"{', '.join(map(str, adata.obs.columns)) or 'none'}"
        )


def check_output(
    path: str | Path, overwrite: bool, *, directory: bool = False, what: str = "the output"
) -> Path:
    """Refuse an output path that exists unless ``overwrite``, or that cannot be written.

    ``directory``: the output is a directory (a run directory, an exported model) rather
    than a file. Nothing is created.
    """
    from scforge_scvi.io import check_writable

    path = Path(path)
    if path.exists() and not overwrite and (path.is_file() or any(path.iterdir())):
        raise CliError(f"output '{path}' already exists; pass --overwrite to replace it")
    if directory and path.is_file():
        raise CliError(f"output '{path}' is a file; {what} is a directory: choose another path")
    if not directory and path.is_dir():
        raise CliError(f"output '{path}' is a directory; {what} is a file: choose another path")
    check_writable(path if directory else path.parent, what)
    return path


def write_h5ad(adata: AnnData, path: Path) -> None:
    """Write ``adata`` to ``path`` atomically: an interrupted write leaves a file there intact."""
    from scforge_scvi.io import atomic_file

    with atomic_file(path) as tmp:
        adata.write_h5ad(tmp)


# -- model -----------------------------------------------------------------------------------
def model_kwargs(config: ScForgeConfig, *, set_only: bool = False) -> dict[str, Any]:
    """``ScForge`` init arguments from ``tokenizer``, ``model``, ``data`` and ``finetune.head``.

    ``set_only``: only the tokenizer, preprocessing and model keys the config sets (a model
    initialised from a checkpoint keeps the checkpoint's value of every other key).
    """
    from scforge_scvi.model._settings import grouped

    tok, prep = config.tokenizer, config.data.preprocessing
    kwargs: dict[str, Any] = {}
    for section, names in (
        (tok, {"strategy": "tokenizer", **{k: k for k in ("max_genes", "prepend_cls", "n_bins")}}),
        (prep, {k: k for k in ("normalize", "target_sum", "log1p", "n_top_genes")}),
    ):  # section field -> ScForge argument
        for field, argument in names.items():
            if not set_only or field in section.model_fields_set:
                kwargs[argument] = getattr(section, field)
    backbone = config.model.to_backbone_kwargs()
    kwargs.update(
        {k: v for k, v in backbone.items() if not set_only or k in config.model.model_fields_set}
    )
    if config.finetune is not None:
        kwargs["head_hidden_dim"] = config.finetune.head.hidden_dim
        kwargs["head_dropout"] = config.finetune.head.dropout
    return grouped(kwargs)  # the sections' flat names -> ScForge's settings groups


def setup_data(adata: AnnData, config: ScForgeConfig, *, labels: bool) -> None:
    """``ScForge.setup_anndata`` with ``data.layer``, ``data.gene_key`` and the label column."""

    layer, gene_key = config.data.layer, config.data.gene_key
    if layer is not None and layer not in adata.layers:
        raise CliError(
            f"data.layer '{layer}' is not a layer of the data; available layers: "
            f"{', '.join(adata.layers) or 'none (use data.layer: null for X)'}"
        )
    kwargs: dict[str, Any] = {"layer": layer, "gene_key": gene_key}
    finetune = config.finetune
    if labels and finetune is not None:
        require_obs(adata, finetune.label_key, "finetune.label_key")
        if finetune.head.task == "regression":
            kwargs["target_key"] = finetune.label_key
        else:
            kwargs["labels_key"] = finetune.label_key
            kwargs["unlabeled_category"] = finetune.unlabeled_category
    source = "the cells sampled from " if config.data.streaming else ""
    _setup_anndata(adata, source + data_sources(config.data.paths), **kwargs)


def setup_query(
    adata: AnnData,
    checkpoint: str | Path,
    *,
    layer: str | None,
    gene_key: str | None,
    source: str | None = None,
) -> None:
    """Register query cells so that a checkpoint's fitted head (if any) is kept.

    The checkpoint's class names are registered as the categories of a temporary, all
    unlabelled column; the cells' own labels (if present) are not needed.
    """
    from scforge_scvi.io import read_pretrained

    pretrained = read_pretrained(checkpoint)
    kwargs: dict[str, Any] = {"layer": layer, "gene_key": gene_key}
    if pretrained.class_names:
        adata.obs[_QUERY_LABELS] = pd.Categorical(
            [_UNLABELLED] * adata.n_obs, categories=[*pretrained.class_names, _UNLABELLED]
        )
        kwargs.update(labels_key=_QUERY_LABELS, unlabeled_category=_UNLABELLED)
    elif pretrained.has_regression_head:
        adata.obs[_QUERY_LABELS] = np.zeros(adata.n_obs, dtype=np.float32)
        kwargs["target_key"] = _QUERY_LABELS
    _setup_anndata(adata, source, **kwargs)


def drop_query_labels(adata: AnnData) -> None:
    if _QUERY_LABELS in adata.obs:
        del adata.obs[_QUERY_LABELS]


def build_model(adata: AnnData, config: ScForgeConfig, checkpoint: str | Path | None):  # -> ScForge
    """A new model from the config, or one initialised from ``checkpoint`` (weights only)."""
    from scforge_scvi import ScForge

    vocab = config.data.gene_vocab
    if checkpoint is None:
        return ScForge(adata, vocab=None if vocab == "data" else vocab, **model_kwargs(config))
    check_checkpoint_path(checkpoint)
    model = ScForge.from_pretrained(str(checkpoint), adata, **model_kwargs(config, set_only=True))
    own = model.vocab.name or "data"
    if vocab is not None and vocab != own and Path(vocab).stem != own:
        raise CliError(
            f"data.gene_vocab is {vocab!r} but the checkpoint's vocabulary is {own!r}; the "
            "pretrained vocabulary is always used, so set data.gene_vocab to null or to it"
        )
    return model


def check_checkpoint_path(path: str | Path) -> None:
    path = Path(path)
    if not path.exists():
        raise CliError(f"checkpoint '{path}' does not exist")


# -- training --------------------------------------------------------------------------------
def train_kwargs(config: ScForgeConfig, *, objective: str) -> dict[str, Any]:
    """``ScForge.train`` arguments from ``training``, ``tokenizer.masking`` and ``finetune``."""
    training: TrainingConfig = config.training
    scheduler = training.scheduler
    plan = {
        "lr": training.optimizer.lr,
        "weight_decay": training.optimizer.weight_decay,
        "betas": tuple(training.optimizer.betas),
        "warmup_steps": scheduler.warmup_steps,
        # a cosine that ends at the peak is the constant schedule
        "min_lr_ratio": 1.0 if scheduler.name == "constant" else scheduler.min_lr_ratio,
    }
    kwargs: dict[str, Any] = {
        "max_epochs": training.max_epochs,
        "objective": objective,
        "batch_size": training.batch_size,
        "train_size": 1.0 - training.val_split - training.test_split,
        "validation_size": training.val_split,
        "precision": training.precision,
        "gradient_clip_val": training.gradient_clip or None,
        "early_stopping": False if training.patience is None else max(training.patience, 1),
        "seed": training.seed,
        "accelerator": training.accelerator,
        "devices": training.devices,
        "num_nodes": training.num_nodes,
        "distributed": training.strategy,
        "plan_kwargs": plan,
        "datasplitter_kwargs": {"num_workers": config.data.num_workers},
        # Lightning's per-batch bar: "Epoch 0: 100%|####| 22/22 [...] val_loss=..., val_acc=..."
        "simple_progress_bar": False,
        "callbacks": [TQDMProgressBar()],
    }
    if objective == "pretrain":
        plan["masking"] = config.tokenizer.masking.to_settings()
        return kwargs
    finetune = config.finetune
    kwargs["strategy"] = finetune.strategy_for(training.max_epochs)
    plan["backbone_lr"], plan["head_lr"] = finetune.learning_rates(training.optimizer.lr)
    plan["label_smoothing"] = finetune.label_smoothing
    kwargs["freeze_backbone_epochs"] = finetune.freeze_backbone_epochs
    kwargs["class_weights"] = finetune.class_weights  # train() decides for streamed cells
    kwargs["linear_path"] = finetune.linear_path
    if kwargs["strategy"] != "gradual_unfreeze":
        kwargs["freeze_backbone_epochs"] = 0
    if finetune.lora.enabled:
        kwargs["lora"] = finetune.lora.to_settings()
    return kwargs


def check_n_classes(model, config: ScForgeConfig) -> None:
    head = config.finetune.head
    if head.task == "classification" and head.n_classes is not None:
        found = len(model.class_names_)
        if found != head.n_classes:
            raise CliError(
                f"finetune.head.n_classes is {head.n_classes} but the label column "
                f"'{config.finetune.label_key}' has {found} classes; set it to null to count them"
            )


def check_resume(run_dir: Path, config: ScForgeConfig) -> Path:
    """The run's ``last.ckpt``, if ``config`` equals the run's own apart from max_epochs."""
    last = run_dir / RUN_LAST_CKPT
    saved_file = run_dir / RUN_CONFIG
    if not last.exists() or not saved_file.exists():
        raise CliError(
            f"cannot resume from '{run_dir}': it needs {RUN_LAST_CKPT} and {RUN_CONFIG} "
            "written by an earlier scforge run"
        )
    saved = ScForgeConfig.from_yaml(saved_file).to_dict()
    diffs = run_differences(saved, config.to_dict(), ignore=("training.max_epochs",))
    if diffs:
        raise CliError(
            f"cannot resume: the configuration differs from {saved_file} in {', '.join(diffs)} "
            "(only training.max_epochs may change); start a new run with --checkpoint "
            f"{last} to initialise from its weights instead"
        )
    return last


def write_metrics(model, path: Path) -> pd.DataFrame:
    """``model.history`` (one DataFrame per metric) as one CSV with a row per epoch."""
    frames = [
        frame for key, frame in model.history.items() if not key.endswith("_step") and len(frame)
    ]
    table = pd.concat(frames, axis=1) if frames else pd.DataFrame()
    table.index.name = "epoch"
    table.to_csv(path)
    return table
