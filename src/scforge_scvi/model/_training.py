"""`ScForge.train`: pretraining and fine-tuning over registered or streamed cells."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping

from scforge_scvi._allocator import tune_cpu_allocator
from scforge_scvi._errors import ScForgeValueError
from scforge_scvi._logging import logger
from scforge_scvi.data import StreamedCells
from scforge_scvi.data._bucketing import LengthGroupedDataSplitter
from scforge_scvi.data._splits import split_cells
from scforge_scvi.data._streaming import training_streams
from scforge_scvi.train import (
    BestCheckpoint,
    EpochSeed,
    LoraSettings,
    StreamEpoch,
    check_frozen_are_loaded,
    configure_strategy,
    count_parameters,
)
from scforge_scvi.train._plans import class_weights as class_weights_of
from scforge_scvi.train._schedules import default_max_epochs

from ._calibration import MIN_CELLS, fit_calibration
from ._constants import SCFORGE_REGISTRY_KEYS as KEYS
from ._linear import AnnotatedCells, fit_linear_path

#: Lightning's ``gradient_clip_val`` of ``train()`` unless given (gradient-norm clipping)
GRADIENT_CLIP_VAL = 1.0
#: epochs without improvement before ``train(early_stopping=True)`` stops
EARLY_STOPPING_PATIENCE = 5
#: the former ``train()`` keywords that are training-plan keywords now
_PLAN_KEYWORDS = (
    "lr",
    "weight_decay",
    "warmup_steps",
    "min_lr_ratio",
    "backbone_lr",
    "head_lr",
    "token_dropout",
    "masking",
)


class TrainingMixin:
    """``train()`` of :class:`~scforge_scvi.ScForge`: data splits and streams, the freezing
    strategy, the training plan and the runner."""

    def train(
        self,
        max_epochs: int | None = None,
        *,
        objective: Literal["pretrain", "classify", "regress"] | None = None,
        strategy: Literal["full", "frozen", "gradual_unfreeze", "lora"] = "full",
        batch_size: int = 32,
        class_weights: Literal["balanced", "sqrt"] | Sequence[float] | None = "balanced",
        freeze_backbone_epochs: int = 0,
        lora: LoraSettings | dict | None = None,
        train_size: float = 0.9,
        validation_size: float | None = None,
        early_stopping: bool | int = False,
        monitor: str | None = None,
        checkpoint_dir: str | None = None,
        seed: int = 0,
        group_by_length: bool = True,
        data: StreamedCells | str | Sequence[str] | None = None,
        distributed: str = "auto",
        plan_kwargs: dict[str, Any] | None = None,
        datasplitter_kwargs: dict[str, Any] | None = None,
        linear_path: bool = True,
        **trainer_kwargs: Any,
    ) -> None:
        """Pretrain (masked genes) or fine-tune (task head) the model.

        Parameters
        ----------
        max_epochs
            Number of passes over the training cells. Default: 10 for pretraining; for a
            task head, enough epochs for about 1,000 optimizer steps (between 5 and 100:
            e.g. 17 epochs for 1,900 training cells at ``batch_size=32``).
        objective
            ``"pretrain"``, ``"classify"`` or ``"regress"``. Default: ``"classify"`` when
            labels are registered, ``"regress"`` when a target is, else ``"pretrain"``.
        strategy
            Fine-tuning strategy: ``"full"``, ``"frozen"`` (head only), ``"gradual_unfreeze"``
            (head first, backbone from epoch ``freeze_backbone_epochs``) or ``"lora"``.
        batch_size
            Cells per minibatch.
        class_weights
            Per-class weights of the classification loss: ``"balanced"`` (inverse class
            frequency of the training cells, mean 1 over cells), ``"sqrt"`` (its square
            root: a milder push towards small classes), one weight per class in
            ``model.class_names_`` order, or ``None`` (plain cross-entropy). The default,
            ``"balanced"``, lifts macro-F1 on small classes (``docs/benchmarks_annotation.md``);
            cells streamed with ``data=`` have no label counts and train unweighted unless
            given one weight per class.
        freeze_backbone_epochs
            Epochs with a frozen backbone for ``strategy="gradual_unfreeze"``.
        lora
            LoRA settings for ``strategy="lora"`` (default: rank 8 on every attention
            projection and both feed-forward linears).
        train_size, validation_size
            Fractions of cells for training and validation (the rest is a test set, never
            used for training or model selection). Splits are stratified by label when
            fine-tuning a classifier.
        early_stopping
            Stop when ``monitor`` has not improved for this many epochs (``True``: 5;
            ``False``, the default: run ``max_epochs``).
        monitor
            Validation metric that picks the epoch whose weights are kept (and drives early
            stopping): ``"val_acc"`` (highest; of equal values the later epoch) when
            classifying, else ``"val_loss"`` (lowest). Any logged metric works; names ending
            in ``loss`` or ``perplexity`` are minimised, others maximised.
        checkpoint_dir
            Write resumable ``best.ckpt`` and ``last.ckpt`` there (atomically).
        seed
            Seeds the split, the initialisation of new layers' data order, and the masks.
        group_by_length
            Put cells of similar token length into the same minibatch (shuffled groups of
            16 batches, see :class:`~scforge_scvi.data.LengthGroupedSampler`), so that batches
            carry little padding; ``False`` draws plain random minibatches (as does a backed
            AnnData, whose counts are never read whole).
        data
            Train on cells streamed from disk instead of the registered AnnData: a
            :class:`~scforge_scvi.data.StreamedCells`, or one or more ``.h5ad``/``.zarr``
            paths. The registered AnnData still defines the vocabulary, the labels' classes
            and the setup; the split into training, validation and test cells is drawn over
            the streamed cells (seeded, not stratified).
        distributed
            Lightning strategy spreading training over processes: ``"ddp"``, ``"fsdp"``,
            ``"ddp_spawn"``, ...; ``"auto"`` lets Lightning choose. Multi-process training
            needs ``data=`` (each rank streams its share of every global batch), or a
            backed AnnData (``read_h5ad(path, backed="r")``): its file is then streamed as
            ``data=StreamedCells(adata.filename)`` would be (streamed split, labels read
            from the file).
        plan_kwargs
            Keywords of the training plan (:class:`~scforge_scvi.train.ScForgeTrainingPlan`):
            the optimizer and schedule (``lr``, ``weight_decay``, ``betas``, ``warmup_steps``,
            ``min_lr_ratio``, ``backbone_lr``, ``head_lr``), the pretraining ``masking``, and
            fine-tuning's ``token_dropout`` and ``label_smoothing``, e.g.
            ``plan_kwargs={"lr": 3e-4}``. Keys that ``train()`` sets itself (``objective``,
            ``seed``, ``class_weights``, ...) are refused.
        datasplitter_kwargs
            Keywords of the data loading: ``num_workers`` (data-loader worker processes, where
            tokenisation runs; also for ``data=``) and, for the registered AnnData, further
            keywords of its data splitter, e.g. ``group_batches`` (batches per length group,
            default 16) with ``group_by_length=True``. Keys that ``train()`` sets itself
            (``batch_size``, ...) are refused.
        linear_path
            After fine-tuning a classifier on the registered AnnData, fit its linear path (a
            logistic regression on log-normalised vocabulary genes, on the training cells)
            and choose its share of the default prediction on the validation cells
            (:mod:`~scforge_scvi.model._linear`). ``False``: the transformer's head alone.
        **trainer_kwargs
            Passed to the Lightning trainer, e.g. ``accelerator``, ``devices``, ``num_nodes``
            (machines taking part, with ``devices`` processes each), ``precision`` (``32``, or
            ``"bf16-mixed"`` on a GPU) and ``gradient_clip_val`` (gradient-norm clipping,
            default 1.0; ``None``: off). The former ``train()`` keywords ``lr``,
            ``weight_decay``, ``warmup_steps``, ``min_lr_ratio``, ``backbone_lr``, ``head_lr``,
            ``token_dropout``, ``masking`` (now ``plan_kwargs``), ``num_workers`` (now
            ``datasplitter_kwargs``), ``gradient_clip`` and ``patience`` are read with a
            ``FutureWarning`` until the next release.

        Notes
        -----
        The weights of the best validation epoch (see ``monitor``) are restored at the end:
        :meth:`embed` and :meth:`predict` use the best model.

        On the CPU (Linux), training first calls :func:`~scforge_scvi.tune_cpu_allocator`
        so that large activations reuse memory instead of page-faulting every step; set
        ``SCFORGE_TUNE_MALLOC=0`` to opt out.

        Under DDP, ``batch_size`` is per process: ``N`` processes train like one process with
        ``N * batch_size`` cells per step, on the same cells.
        """
        import scvi
        from lightning.pytorch import seed_everything

        objective = objective or self._default_objective()
        plan_kwargs, datasplitter_kwargs, early_stopping = _moved_keywords(
            trainer_kwargs, plan_kwargs, datasplitter_kwargs, early_stopping
        )
        num_workers = datasplitter_kwargs.pop("num_workers", 0)
        trainer_kwargs.setdefault("gradient_clip_val", GRADIENT_CLIP_VAL)
        if objective == "classify" and self._setup_arg("labels_key") is None:
            raise ValueError(
                "objective='classify' needs labels: call "
                "ScForge.setup_anndata(adata, labels_key=...) before creating the model."
            )
        scvi.settings.seed = seed
        seed_everything(seed, workers=True, verbose=False)
        if monitor is None:
            monitor = "val_acc" if objective == "classify" else "val_loss"
        mode = "min" if monitor.endswith(("loss", "perplexity")) else "max"
        best = BestCheckpoint(monitor=monitor, dirpath=checkpoint_dir, mode=mode)
        callbacks = [EpochSeed(seed), *trainer_kwargs.pop("callbacks", []), best]
        if early_stopping:
            patience = EARLY_STOPPING_PATIENCE if early_stopping is True else int(early_stopping)
            callbacks.append(EarlyStopping(monitor=monitor, patience=patience, mode=mode))
        callbacks += configure_strategy(self.module, objective, strategy, freeze_backbone_epochs)
        if strategy == "lora" and objective != "pretrain" and self.lora_ is None:
            self._apply_lora(
                lora if isinstance(lora, LoraSettings) else LoraSettings(**(lora or {}))
            )
        report, backbone = getattr(self, "load_report_", None), self.module.backbone
        if report is not None and strategy in ("frozen", "lora"):
            check_frozen_are_loaded(
                [k for k, p in backbone.named_parameters("backbone") if not p.requires_grad],
                report.initialised,
                setting=f"strategy={strategy!r}",
                remedy="load a checkpoint with these weights or use strategy='full'",
            )
        if distributed != "auto" and data is None:
            data = StreamedCells.from_backed(
                self.adata, self._setup_arg("layer"), f"distributed={distributed!r}"
            )
        if distributed != "auto" and strategy == "gradual_unfreeze" and freeze_backbone_epochs:
            raise ValueError(
                f"strategy='gradual_unfreeze' cannot be combined with distributed="
                f"{distributed!r}: parameters frozen when the processes start are never "
                "synchronised after unfreezing. Use 'full', 'frozen' or 'lora'."
            )
        if data is not None:
            if datasplitter_kwargs:
                raise ScForgeValueError(
                    f"datasplitter_kwargs={datasplitter_kwargs!r} configure the data splitter "
                    "of the registered AnnData; streamed cells (data=...) take num_workers only."
                )
            cells = data if isinstance(data, StreamedCells) else StreamedCells(data)
            splits = split_cells(cells.n_obs, train_size, validation_size, seed)
            logger.info(
                f"Streamed split: {len(splits[0])} training, {len(splits[1])} validation, "
                f"{len(splits[2])} test."
            )
            if objective == "regress":
                raise ValueError(
                    "Regression fine-tuning reads its target from the registered AnnData; "
                    "streamed data supports objective='pretrain' and 'classify'."
                )
            labels = None
            if objective == "classify":
                state = self.adata_manager.get_state_registry(KEYS.LABELS_KEY)
                labels = cells.label_codes(
                    self._setup_arg("labels_key"), self.class_names_, state.unlabeled_category
                )
            splitter = training_streams(
                cells,
                splits,
                self.tokenizer,
                self.vocab,
                self._match_kwargs(),
                batch_size=batch_size,
                seed=seed,
                num_workers=num_workers,
                labels=labels,
                labels_key=KEYS.LABELS_KEY,
                count_key=KEYS.X_KEY,
            )
            callbacks.append(StreamEpoch())
            trainer_kwargs.setdefault("use_distributed_sampler", False)
        else:
            strata = self._strata() if objective == "classify" else None
            splits = split_cells(self.adata.n_obs, train_size, validation_size, seed, strata)
            common = {
                "batch_size": batch_size,
                "external_indexing": list(splits),
                "collate_fn": self._collator(self.adata),
                "num_workers": num_workers,
            }
            if group_by_length and not self.adata.isbacked:  # lengths would read all of X
                common["lengths"] = self._token_lengths(self.adata)
                splitter_cls = LengthGroupedDataSplitter
            else:
                common["load_sparse_tensor"] = True
                splitter_cls = self._data_splitter_cls
            common = _merged(common, datasplitter_kwargs, "datasplitter_kwargs")
            splitter = splitter_cls(self.adata_manager, **common)
        if max_epochs is None:
            max_epochs = default_max_epochs(objective, len(splits[0]), batch_size)
            logger.info(f"max_epochs={max_epochs} ({objective}, {len(splits[0])} training cells).")
        weights = None
        if objective == "classify" and class_weights is not None:
            if data is not None and isinstance(class_weights, str):
                logger.info(
                    f"class_weights={class_weights!r} counts the registered training labels; "
                    "streamed cells train with plain cross-entropy (pass one weight per class "
                    "to weight them)."
                )
            else:
                codes = None
                if data is None:
                    codes = self.adata_manager.get_from_registry(KEYS.LABELS_KEY).ravel()
                    codes = codes[splits[0]]
                weights = class_weights_of(class_weights, codes, len(self.class_names_))
        plan_settings = dict(
            objective=objective,
            seed=seed,
            class_weights=weights,
            checkpoint_metadata=self.checkpoint_metadata(),
        )
        plan_settings = _merged(plan_settings, plan_kwargs, "plan_kwargs")
        plan = self._training_plan_cls(self.module, **plan_settings)
        trainable, total = count_parameters(self.module)
        logger.info(
            f"Training ({objective}, strategy={strategy}): {trainable:,} of {total:,} "
            f"parameters trainable; {len(splits[0])} training, {len(splits[1])} validation, "
            f"{len(splits[2])} held-out test cells."
        )
        runner = self._train_runner_cls(
            self,
            training_plan=plan,
            data_splitter=splitter,
            max_epochs=max_epochs,
            callbacks=callbacks,
            check_val_every_n_epoch=1,
            strategy=distributed,
            **trainer_kwargs,
        )
        if trainer_kwargs.get("accelerator") == "cpu" or not torch.cuda.is_available():
            tune_cpu_allocator()  # large activations reuse heap pages instead of faulting
        self.module.train()  # Lightning keeps a module's mode; from_pretrained leaves it eval
        runner()
        self.train_indices_, self.validation_indices_, self.test_indices_ = splits
        self.best_epoch_ = best.best_epoch
        self.module.eval()
        if self.module.linear_path is not None:
            self.module.linear_path.reset()
            self.module.calibration.reset()
            if objective == "classify" and data is None:
                self._fit_after_training(linear_path, seed, batch_size)

    def _fit_after_training(self, linear_path: bool, seed: int, batch_size: int) -> None:
        """The closed-form parts of a classifier: its linear path, then its calibration."""
        cells = AnnotatedCells.of(self, batch_size)
        held_out = None
        if linear_path:
            mix, held_out = fit_linear_path(self, cells, seed, batch_size)
            logger.info(
                "Linear path (logistic regression on log-normalised genes) fitted; its "
                f"share of the default prediction, chosen on the validation cells: {mix:.2f}."
            )
        val = cells.cells[cells.validation]
        if held_out is None and len(val) >= MIN_CELLS:
            held_out = self._probabilities(self.adata, val, head="backbone", batch_size=batch_size)
        if held_out is None:
            logger.info(
                f"Not calibrated: {len(val)} labelled validation cells, {MIN_CELLS} needed "
                "(confidence is the uncalibrated probability; no prediction sets)."
            )
            return
        labelled_train = cells.train[cells.codes[cells.train] < cells.n_classes]
        fit_calibration(
            self.module.calibration,
            held_out,
            cells.codes[cells.validation],
            cells.x[labelled_train],
            cells.codes[labelled_train],
            cells.x[cells.validation],
            seed,
        )
        logger.info(
            f"Calibrated on {len(val)} validation cells: temperature "
            f"{float(self.module.calibration.temperature):.2f}."
        )

    def _default_objective(self) -> str:
        if self._setup_arg("labels_key") is not None:
            return "classify"
        if self._has_regression_target():
            return "regress"
        return "pretrain"

    def _strata(self) -> np.ndarray:
        """Per cell, its class name, or ``"unlabelled"`` (a stratum of its own)."""
        codes = self.adata_manager.get_from_registry(KEYS.LABELS_KEY).ravel().astype(int)
        names = np.asarray([*self.class_names_, "unlabelled"])
        return names[np.minimum(codes, len(self.class_names_))]


def _merged(settings: dict[str, Any], extra: dict[str, Any] | None, name: str) -> dict[str, Any]:
    """``settings`` updated with ``extra``, refusing keys that ``train()`` already sets."""
    taken = sorted(set(settings) & set(extra or {}))
    if taken:
        raise ScForgeValueError(
            f"{name} cannot set {taken}: train() sets {sorted(settings)} itself from its own "
            "keywords (batch_size, seed, class_weights, ...)."
        )
    return {**settings, **(extra or {})}


def _moved_keywords(
    trainer_kwargs: dict[str, Any],
    plan_kwargs: dict[str, Any] | None,
    datasplitter_kwargs: dict[str, Any] | None,
    early_stopping: bool | int,
) -> tuple[dict[str, Any], dict[str, Any], bool | int]:
    """Former ``train()`` keywords found in ``trainer_kwargs``, moved where they are read now
    (each with a ``FutureWarning``): ``(plan_kwargs, datasplitter_kwargs, early_stopping)``."""
    plan, splitter = dict(plan_kwargs or {}), dict(datasplitter_kwargs or {})
    for old in [k for k in trainer_kwargs if k in (*_PLAN_KEYWORDS, "num_workers")]:
        into, name = (
            (plan, "plan_kwargs") if old in _PLAN_KEYWORDS else (splitter, "datasplitter_kwargs")
        )
        _warn_renamed(f"train({old}=...)", f"train({name}={{{old!r}: ...}})")
        into[old] = trainer_kwargs.pop(old)
    if "gradient_clip" in trainer_kwargs:
        _warn_renamed("train(gradient_clip=...)", "train(gradient_clip_val=...)")
        trainer_kwargs["gradient_clip_val"] = trainer_kwargs.pop("gradient_clip")
    if "patience" in trainer_kwargs:
        _warn_renamed("train(early_stopping=True, patience=n)", "train(early_stopping=n)")
        patience = trainer_kwargs.pop("patience")
        early_stopping = patience if early_stopping else False
    return plan, splitter, early_stopping


def _warn_renamed(old: str, new: str) -> None:
    warnings.warn(
        f"{old} is now {new}; the former keyword is read until the next release.",
        FutureWarning,
        stacklevel=4,
    )
