"""``ScForgePerturb``: perturbation-response prediction on sets of cells.

The model predicts how a population of control cells of a cell type changes under a
perturbation, in the space that is evaluated: log1p-normalised expression of the registered
genes, computed on the fly from raw counts (:func:`~scforge_scvi.data._preprocess.log_normalize`).
The network is :class:`~scforge_scvi.perturb._module.PerturbationSetModel`; training is
:class:`~scforge_scvi.perturb._plan.PerturbTrainingPlan` on batches of cell sets drawn by
:class:`PerturbSetDataModule` (standard per-cell loaders do not fit sets).

Checkpoints: the weights with the lowest validation loss (``best``) and those at the end of
training (``final``) are kept in memory, and, with ``checkpoint_dir``, written as pretrained
directories (the versioned layout of :func:`~scforge_scvi.io.write_pretrained`) beside
Lightning's resumable ``last.ckpt`` and ``best.ckpt``. :meth:`ScForgePerturb.predict` uses
``best`` by default.
A pretrained ScForge backbone can be the basal encoder
(:class:`~scforge_scvi.ScForgeCellEncoder`).
Initialising from a checkpoint (:meth:`ScForgePerturb.from_pretrained`) loads weights only;
resuming (``train(resume_from=...)``) restores optimizer, scheduler, step and callbacks, and
only for the same configuration.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LayerField
from scvi.model.base import BaseModelClass
from scvi.train import TrainRunner
from scvi.utils import setup_anndata_dsp
from torch import nn

from scforge_scvi._logging import logger
from scforge_scvi.model._cell_encoder import basal_width
from scforge_scvi.train import count_parameters
from scforge_scvi.train._callbacks import BestCheckpoint

from ._checkpoints import _ARCHITECTURE, PerturbCheckpointMixin
from ._data import (
    check_genes,
    check_perturbation_counts,
    perturbation_inputs,
    perturbation_split,
    stored_feature_table,
)
from ._linear import LinearPathMixin
from ._module import PerturbationSetModel, PerturbConfig
from ._plan import (
    PerturbTrainingConfig,
    PerturbTrainingPlan,
    backbone_freezing,
    check_freezable,
)
from ._sets import (
    PerturbCells,
    PerturbSetDataModule,
    control_pools,
    prediction_anndata,
    prediction_jobs,
    prediction_sets,
    read_cells,
)


class _PerturbRegistryKeys(NamedTuple):
    X_KEY: str = REGISTRY_KEYS.X_KEY
    PERTURBATION_KEY: str = "perturbation"
    CELL_TYPE_KEY: str = "cell_type"
    BATCH_KEY: str = REGISTRY_KEYS.BATCH_KEY


PERTURB_REGISTRY_KEYS = _PerturbRegistryKeys()
_KEYS = PERTURB_REGISTRY_KEYS


class _PerturbModule(PerturbationSetModel):
    """The set model with the two hooks scvi-tools' model class expects of a module."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def on_load(self, model: BaseModelClass, **kwargs: Any) -> None:
        """Nothing to prepare before ``load_state_dict`` (called by ``BaseModelClass.load``)."""


class ScForgePerturb(LinearPathMixin, PerturbCheckpointMixin, BaseModelClass):
    """Predict perturbation responses of cell populations (a State-Transition-style model).

    A set of ``cell_set_len`` control cells of one cell type (and batch) and a perturbation
    go in; the same number of perturbed cells come out, as log1p-normalised expression of the
    registered genes. See :class:`~scforge_scvi.perturb._module.PerturbationSetModel`.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    registry
        Used by :meth:`load`; leave ``None``.
    hidden_dim, num_layers, num_heads, ffn_dim, activation
        Shape of the set transformer.
    encoder_hidden_dim
        Inner width of the perturbation / basal encoders and of the decoder.
    dropout
        Dropout everywhere in the network.
    cell_set_len
        Cells per set.
    perturbation_features
        ``None`` for one-hot perturbations, or a table ``perturbation name -> vector``
        (DataFrame indexed by name, or a mapping), e.g. gene or protein-language-model
        embeddings of the targets. Every perturbation with cells in ``adata`` except the
        control needs a row; the control has its own learned vector. The table may cover
        more perturbations than ``adata`` has cells for (e.g. every perturbation of a
        screen): the model keeps the whole table (:meth:`perturbation_table`; it is saved with
        the weights) and :meth:`predict` accepts any perturbation in it, predicted from its
        features alone.
    basal_encoder
        A pretrained cell encoder as the basal encoder, e.g. a ScForge backbone wrapped by
        :meth:`~scforge_scvi.ScForgeCellEncoder.from_scforge` (with
        ``basal_input="counts"``), or any module mapping ``(N, n_genes)`` tensors (see
        ``basal_input``) to ``(N, basal_dim)`` cell embeddings, differentiable so that it can
        be fine-tuned. ``None`` uses an MLP on the log1p expression. The output stays in gene
        space either way. A pluggable encoder belongs to the backbone (frozen by
        ``freeze_backbone``).
    basal_dim
        Output width of ``basal_encoder``; read from a
        :class:`~scforge_scvi.ScForgeCellEncoder` when ``None``.
    basal_input
        What ``basal_encoder`` reads: ``"log1p"`` expression or raw ``"counts"``.
    linear_path
        Predict each perturbation's change by ridge regression from its features first and
        let the network learn what that leaves (see :mod:`scforge_scvi.perturb._linear`);
        the weight of the network's change is chosen on validation perturbations unseen in
        training, so that the model falls back to the linear fit where the network adds
        nothing. ``None`` (default): on for models with ``perturbation_features``; one-hot
        models cannot have it.

    Examples
    --------
    >>> ScForgePerturb.setup_anndata(adata, "target_gene", "non-targeting", cell_type_key="cell_type")
    >>> model = ScForgePerturb(adata, cell_set_len=32)
    >>> model.train(max_epochs=20, split_key="split", checkpoint_dir="runs/perturb")
    >>> pred = model.predict(adata[adata.obs["split"] == "test"])   # uses the best checkpoint
    """

    _module_cls = _PerturbModule
    _training_plan_cls = PerturbTrainingPlan
    _data_module_cls = PerturbSetDataModule
    _train_runner_cls = TrainRunner

    def __init__(
        self,
        adata: ad.AnnData | None = None,
        registry: dict | None = None,
        *,
        hidden_dim: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        ffn_dim: int | None = None,
        encoder_hidden_dim: int = 256,
        dropout: float = 0.1,
        activation: str = "gelu",
        cell_set_len: int = 32,
        perturbation_features: pd.DataFrame | Mapping[str, Sequence[float]] | None = None,
        basal_encoder: nn.Module | None = None,
        basal_dim: int | None = None,
        basal_input: str = "log1p",
        linear_path: bool | None = None,
    ) -> None:
        super().__init__(adata, registry)
        given = locals()
        basal_dim = basal_width(basal_encoder, basal_input, basal_dim)
        setup = self.registry_["setup_args"]
        self.control_label_ = str(setup["control_label"])
        self.perturbations_ = [str(x) for x in self._categories(_KEYS.PERTURBATION_KEY)]
        self.cell_types_ = [str(x) for x in self._categories(_KEYS.CELL_TYPE_KEY)]
        self.batches_ = [str(x) for x in self._categories(_KEYS.BATCH_KEY)]
        self.genes_ = [str(g) for g in self.adata.var_names] if self.adata is not None else []
        table, self.feature_perturbations_ = None, []
        if perturbation_features is not None:
            self.feature_perturbations_, table = stored_feature_table(
                perturbation_features, self.perturbations_, self.control_label_
            )
            table = torch.from_numpy(table)
        n_extra = len(self.feature_perturbations_) - len(self.perturbations_)
        config = PerturbConfig(
            n_genes=int(self.summary_stats.n_vars),
            n_perturbations=len(self.perturbations_),
            control_index=self.perturbations_.index(self.control_label_),
            perturbation_features="one_hot" if table is None else "table",
            perturbation_dim=None if table is None else int(table.shape[1]),
            n_table_rows=len(self.feature_perturbations_) if n_extra > 0 else None,
            n_batches=len(self.batches_) if setup.get("batch_key") else 0,
            basal_dim=basal_dim,
            linear_path=table is not None if linear_path is None else bool(linear_path),
            n_cell_types=max(len(self.cell_types_), 1),
            **{k: given[k] for k in _ARCHITECTURE},
        )
        self.module = self._module_cls(config, table, basal_encoder)
        self.basal_input_ = basal_input
        self.checkpoint_paths_: dict[str, str] = {}
        self.best_epoch_: int | None = None
        self.best_validation_loss_: float | None = None
        self.linear_path_: dict[str, Any] | None = None
        self.training_time_s_: float | None = None
        self._weights: dict[str, dict[str, torch.Tensor]] = {}
        # parameters that were never trained or loaded: freezing them is an error
        self._fresh_parameters = {n for n, _ in self.module.named_parameters()}
        if basal_encoder is not None:  # a pretrained encoder comes with its weights
            self._fresh_parameters -= {
                f"basal_encoder.{n}" for n, _ in basal_encoder.named_parameters()
            }
        self.init_report_: dict[str, list[str]] = {}
        self.active_checkpoint_: str | None = None  # which kept weights the module holds
        extra = f" + {n_extra} known only by their features" if n_extra > 0 else ""
        self._model_summary_string = (
            f"ScForgePerturb: {config.n_perturbations} perturbations{extra} "
            f"({config.perturbation_features}), {config.n_genes} genes, set of "
            f"{config.cell_set_len} cells, {count_parameters(self.module)[1]:,} parameters"
        )
        self.init_params_ = self._get_init_params(locals())

    # -- registration ------------------------------------------------------------------------
    @classmethod
    @setup_anndata_dsp.dedent
    def setup_anndata(
        cls,
        adata: ad.AnnData,
        perturbation_key: str,
        control_label: str,
        cell_type_key: str | None = None,
        batch_key: str | None = None,
        layer: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Register an AnnData of raw counts with its perturbations.

        Parameters
        ----------
        adata
            Cells x genes with raw counts in ``X`` or ``layer``.
        perturbation_key
            ``adata.obs`` column with each cell's perturbation (controls included).
        control_label
            The value of that column for control cells, e.g. ``"non-targeting"``.
        cell_type_key
            ``adata.obs`` column with cell types; basal cells are sampled within a cell type.
        batch_key
            ``adata.obs`` column with batches; adds a batch embedding, and basal cells are
            sampled within a cell type and batch.
        layer
            Layer with raw counts; ``None`` reads ``X``. The model's target is the
            log1p-normalised expression computed from these counts.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        check_perturbation_counts(
            adata, layer, perturbation_key, control_label, cell_type_key, batch_key
        )
        fields = [
            LayerField(_KEYS.X_KEY, layer, is_count_data=True),
            CategoricalObsField(_KEYS.PERTURBATION_KEY, perturbation_key),
            CategoricalObsField(_KEYS.CELL_TYPE_KEY, cell_type_key),
            CategoricalObsField(_KEYS.BATCH_KEY, batch_key),
        ]
        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        manager.register_fields(adata, **kwargs)
        cls.register_manager(manager)

    def _categories(self, key: str) -> np.ndarray:
        return np.asarray(
            self.registry_["field_registries"][key]["state_registry"]["categorical_mapping"]
        )

    def _read_cells(self, adata: ad.AnnData) -> PerturbCells:
        manager = self.get_anndata_manager(adata, required=True)
        return read_cells(manager, _KEYS, with_counts=self.basal_input_ == "counts")

    def perturbation_table(self) -> pd.DataFrame | None:
        """The stored perturbation feature table (``None`` for a one-hot model).

        One row per perturbation the model can predict, the control excluded: the
        perturbations with training cells first (category order), then those known only by
        their features.
        """
        if self.module.config.perturbation_features != "table":
            return None
        values = self.module.perturbation_encoder.table.detach().cpu().numpy()
        frame = pd.DataFrame(values, index=pd.Index(self.feature_perturbations_))
        return frame.drop(index=self.control_label_)

    @property
    def _setup(self) -> dict[str, Any]:
        return self.registry_["setup_args"]

    @property
    def _control_code(self) -> int:
        return self.perturbations_.index(self.control_label_)

    def train(
        self,
        max_epochs: int = 20,
        *,
        lr: float = 1e-3,
        backbone_lr: float | None = None,
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        energy_weight: float = 1.0,
        mean_mse_weight: float = 1.0,
        freeze_backbone: bool = False,
        freeze_backbone_epochs: int | None = None,
        unfreeze_warmup_steps: int | None = None,
        gradient_clip_val: float | None = 1.0,
        sets_per_batch: int = 16,
        split_key: str | None = None,
        validation_size: float = 0.1,
        checkpoint_dir: str | Path | None = None,
        resume_from: str | Path | None = None,
        seed: int = 0,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        **trainer_kwargs: Any,
    ) -> None:
        """Train on cell sets, keeping the weights with the lowest validation loss.

        Parameters
        ----------
        max_epochs
            Passes over the training cells (each cell is a target once per epoch).
        lr, backbone_lr, weight_decay, warmup_steps, min_lr_ratio
            AdamW and its per-step warmup + cosine schedule (``backbone_lr=None``: ``lr``).
        energy_weight, mean_mse_weight
            Weights of the per-set energy distance and of the set-mean MSE; both terms are
            logged on their own (``{train,validation}_energy``, ``..._mean_mse``) beside the
            total (``..._loss``).
        freeze_backbone, freeze_backbone_epochs, unfreeze_warmup_steps
            Freeze the set transformer (and a pluggable basal encoder) for
            ``freeze_backbone_epochs`` epochs (``None``: the whole run), then unfreeze it with
            a warmup + cosine of its own. Freezing parameters that were never trained or
            loaded is an error.
        gradient_clip_val
            Gradient-norm clipping (``None``: off).
        sets_per_batch
            Cell sets per optimizer step.
        split_key
            ``adata.obs`` column with ``train`` / ``val`` / ``test`` per cell (see
            :func:`~scforge_scvi.perturb.assign_perturbation_split`); test cells
            are never read. ``None``: a random ``validation_size`` of each perturbation's
            cells validates.
        validation_size
            See ``split_key``.
        checkpoint_dir
            Write ``best.ckpt`` and ``last.ckpt`` (resumable) and the pretrained directories
            ``best/`` and ``final/`` here.
        resume_from
            A ``last.ckpt`` to resume: optimizer, scheduler, step and callbacks are restored.
            Only a run with the same configuration can be resumed. To start a new fine-tuning
            run from trained weights, use :meth:`from_pretrained` instead.
        seed
            Seeds the split (without ``split_key``) and the cell sets.
        accelerator, devices, **trainer_kwargs
            Passed to :class:`scvi.train.Trainer` (e.g. ``callbacks``, ``enable_progress_bar``).
        """
        given = locals()
        config = PerturbTrainingConfig(
            **{f.name: given[f.name] for f in dataclasses.fields(PerturbTrainingConfig)}
        )
        if freeze_backbone:
            check_freezable(self.module, self._fresh_parameters)
        run = {
            "training": config.to_dict(),
            "data": {
                "split_key": split_key,
                "validation_size": validation_size,
                "sets_per_batch": sets_per_batch,
                "seed": seed,
                "max_epochs": max_epochs,
            },
        }
        if resume_from is not None:
            self._check_resumable(resume_from, run)
        setup = self._setup
        split = perturbation_split(
            self.adata,
            split_key,
            validation_size,
            seed,
            setup["perturbation_key"],
            self.control_label_,
        )
        cells = self._read_cells(self.adata)
        linear = self.module.linear_path is not None
        datamodule = self._data_module_cls(
            cells,
            split,
            self._control_code,
            set_len=self.module.config.cell_set_len,
            sets_per_batch=sets_per_batch,
            seed=seed,
            with_batch=self.module.config.n_batches > 0,
            with_counts=self.basal_input_ == "counts",
            names={"cell_type": self.cell_types_, "batch": self.batches_},
            offsets=self._linear_offsets(cells, split, seed) if linear else None,
        )
        metadata = self.checkpoint_metadata(run=run)
        plan = self._training_plan_cls(self.module, config, checkpoint_metadata=metadata)
        checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        # minimum validation loss (gene space): weights kept in memory; with a directory,
        # resumable best.ckpt and last.ckpt written after every validation
        best = BestCheckpoint("validation_loss", dirpath=checkpoint_dir, restore_best=False)
        callbacks = [backbone_freezing(config), best, *trainer_kwargs.pop("callbacks", [])]
        has_val = datamodule.val_sets is not None
        trainer_kwargs.setdefault("enable_progress_bar", False)
        trainer_kwargs.setdefault("log_every_n_steps", 1)  # losses are logged per epoch
        if has_val:
            trainer_kwargs.setdefault("check_val_every_n_epoch", 1)
        runner = self._train_runner_cls(
            self,
            training_plan=plan,
            data_splitter=datamodule,
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            gradient_clip_val=gradient_clip_val,
            callbacks=callbacks,
            ckpt_path=None if resume_from is None else str(resume_from),
            **trainer_kwargs,
        )
        start = time.perf_counter()
        runner()
        self.training_time_s_ = time.perf_counter() - start
        finish = (lambda: self._finish_linear_path(cells, split, seed)) if linear else None
        self._after_training(best, checkpoint_dir, has_val, finish)

    # -- prediction --------------------------------------------------------------------------
    @torch.inference_mode()
    def predict(
        self,
        adata: ad.AnnData | None = None,
        *,
        perturbations: Sequence[str] | None = None,
        perturbation_features: pd.DataFrame | Mapping[str, Sequence[float]] | None = None,
        n_cells: int | str = "controls",
        checkpoint: str = "best",
        sets_per_batch: int = 64,
        residual_weight: float | None = None,
        seed: int = 0,
    ) -> ad.AnnData:
        """Predict perturbed cells from the control cells of ``adata``.

        For every cell type (and batch) of ``adata`` and every perturbation to predict, control
        cells of that group are drawn as basal cells (without replacement while they last),
        cut into sets of ``cell_set_len`` and passed through the model.

        Parameters
        ----------
        adata
            Cells with the model's genes, in the same order; its controls are the basal cells
            and are copied, unchanged, into the result. Default: the registered AnnData. It
            may hold cells of perturbations the model was not trained on (a table model
            predicts them from their features; their cells only fix which groups, and with
            ``n_cells="observed"`` how many cells, are predicted).
        perturbations
            Perturbations to predict in every cell type; default: the perturbed groups present
            in ``adata`` (each cell type with its own perturbations). A model created with
            ``perturbation_features`` predicts any perturbation of its stored table or of
            ``perturbation_features`` here, trained on or not; a one-hot model only the
            perturbations it was trained on.
        perturbation_features
            Feature vectors for perturbations to predict (DataFrame indexed by name, or a
            mapping name -> vector, of the model's feature width); its rows take precedence
            over the stored table. Only for models created with ``perturbation_features``.
        n_cells
            Cells to predict per (perturbation, cell type, batch) group: ``"controls"``
            (default) perturbs every control cell of the group once, i.e. predicts the whole
            control population under the perturbation (the most cells, hence the least
            sampling noise in pseudobulks); ``"observed"`` predicts as many cells as ``adata``
            has for the group (the controls' number when it has none); an integer fixes it.
        checkpoint
            ``"best"`` (lowest validation loss; default), ``"final"`` or ``"last"``. A model
            that was loaded rather than trained here predicts with its loaded
            weights when ``"best"`` is asked for.
        sets_per_batch
            Sets per forward pass.
        residual_weight
            Weight of the network's change on top of the linear path: ``None`` (default) uses
            the weight chosen in training (``linear_path_["residual_weight"]``; 1 for a model
            without a linear path), ``0`` predicts with the linear path alone.
        seed
            Seeds the choice of basal cells.

        Returns
        -------
        AnnData with the genes of ``adata`` in the same order; ``obs`` holds the perturbation
        and cell type (and batch) columns under their registered names and
        ``obs["scforge_predicted"]`` (``False`` for the real controls); ``X`` holds
        non-negative log1p-normalised values. The perturbation column's categories are the
        model's categories followed by any other perturbation predicted.
        """
        adata = self.adata if adata is None else adata
        check_genes(adata, self.genes_)
        path = self.module.linear_path
        if residual_weight is None:
            residual_weight = 1.0 if path is None else float(path.residual_weight)
        elif not 0.0 <= residual_weight <= 1.0:
            raise ValueError(f"residual_weight must be in [0, 1], got {residual_weight!r}.")
        setup = self._setup
        names = adata.obs[setup["perturbation_key"]].astype(str).to_numpy()
        keys = {"cell_type": setup.get("cell_type_key"), "batch": setup.get("batch_key")}
        categories = {"cell_type": self.cell_types_, "batch": self.batches_}
        # cells of perturbations outside the registry cannot be registered; only their
        # groups are read (the basal cells are controls)
        registered = np.isin(names, self.perturbations_)
        known = self._validate_anndata(adata if registered.all() else adata[registered].copy())
        if checkpoint != self.active_checkpoint_:
            if checkpoint == "best" and self.active_checkpoint_ is None:
                logger.info("Predicting with the loaded weights (this model was not trained here).")
            else:
                self.use_checkpoint(checkpoint)
        self.module.eval()
        cells = self._read_cells(known)
        pools = control_pools(cells, self._control_code)
        wanted, jobs = prediction_jobs(
            names,
            {
                k: None if c is None else adata.obs[c].astype(str).to_numpy()
                for k, c in keys.items()
            },
            pools,
            control_label=self.control_label_,
            categories=self.perturbations_,
            perturbations=perturbations,
            n_cells=n_cells,
            names=categories,
        )
        table = self.perturbation_table()
        codes, vectors = perturbation_inputs(
            wanted,
            perturbation_features,
            self.perturbations_,
            None if table is None else self.module.perturbation_encoder.table.cpu().numpy(),
            self.feature_perturbations_,
        )
        sets, keep = prediction_sets(
            cells,
            pools,
            jobs,
            dict(zip(wanted, codes)),
            None if vectors is None else dict(zip(wanted, vectors)),
            set_len=self.module.config.cell_set_len,
            sets_per_batch=sets_per_batch,
            with_batch=self.module.config.n_batches > 0,
            rng=np.random.default_rng(seed),
        )
        device = self.module.device
        outputs = [
            self.module(
                **{k: v.to(device) for k, v in sets[i].items()}, residual_weight=residual_weight
            )
            .prediction.cpu()
            .numpy()
            for i in range(len(sets))
        ]
        pred = np.concatenate(outputs).reshape(-1, len(self.genes_))[keep]
        return prediction_anndata(
            known,
            cells,
            jobs,
            pred,
            control_code=self._control_code,
            perturbation_key=setup["perturbation_key"],
            perturbation_categories=self.perturbations_
            + [p for p in wanted if p not in self.perturbations_],
            keys=keys,
            names=categories,
        )
