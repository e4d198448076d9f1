"""``ScForgePerturb``: perturbation-response prediction on sets of cells.

The model predicts how a population of control cells of a cell type changes under a
perturbation, in the space that is evaluated: log1p-normalised expression of the registered
genes, computed on the fly from raw counts (:func:`~scforge_scvi.data._preprocess.log_normalize`).
The network is :class:`~scforge_scvi.nn._perturb.PerturbationSetModel`; training is
:class:`~scforge_scvi.train._perturb_plan.PerturbTrainingPlan` on batches of cell sets drawn by
:class:`PerturbSetDataModule` (standard per-cell loaders do not fit sets).

Checkpoints: the weights with the lowest validation loss (``best``) and those at the end of
training (``final``) are kept in memory, and, with ``checkpoint_dir``, written as pretrained
directories (the versioned layout of :func:`~scforge_scvi.io.write_pretrained`) beside
Lightning's resumable ``last.ckpt`` and ``best.ckpt``. :meth:`ScForgePerturb.predict` uses ``best`` by default.
A pretrained ScForge backbone can be the basal encoder (:class:`ScForgeCellEncoder`).
Initialising from a checkpoint (:meth:`ScForgePerturb.from_pretrained`) loads weights only;
resuming (``train(resume_from=...)``) restores optimizer, scheduler, step and callbacks, and
only for the same configuration.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LayerField
from scvi.model.base import BaseModelClass
from scvi.train import TrainRunner
from scvi.utils import setup_anndata_dsp
from torch import nn

from scforge_scvi._errors import ScForgeKeyError, ScForgeValueError
from scforge_scvi._logging import logger
from scforge_scvi.data._perturb_data import (
    feature_table,
    normalize_split_labels,
    validate_perturbation_adata,
)
from scforge_scvi.data._perturb_sets import (
    CellSets,
    PerturbCells,
    PerturbSetDataModule,
    control_pools,
    prediction_sets,
)
from scforge_scvi.data._preprocess import check_raw_counts, log_normalize
from scforge_scvi.data._vocab import GeneVocab
from scforge_scvi.io._pretrained import Pretrained, read_pretrained, write_pretrained
from scforge_scvi.nn._perturb import PerturbationSetModel, PerturbConfig
from scforge_scvi.train._callbacks import BestCheckpoint
from scforge_scvi.train._perturb_plan import (
    BackboneFreezing,
    PerturbTrainingConfig,
    PerturbTrainingPlan,
)

from ._cell_encoder import ScForgeCellEncoder


class _PerturbRegistryKeys(NamedTuple):
    X_KEY: str = REGISTRY_KEYS.X_KEY
    PERTURBATION_KEY: str = "perturbation"
    CELL_TYPE_KEY: str = "cell_type"
    BATCH_KEY: str = REGISTRY_KEYS.BATCH_KEY


PERTURB_REGISTRY_KEYS = _PerturbRegistryKeys()
CHECKPOINT_NAMES = ("best", "final", "last")
BASAL_INPUTS = ("log1p", "counts")
_KEYS = PERTURB_REGISTRY_KEYS


class _PerturbModule(PerturbationSetModel):
    """The set model with the two hooks scvi-tools' model class expects of a module."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def on_load(self, model: BaseModelClass, **kwargs: Any) -> None:
        """Nothing to prepare before ``load_state_dict`` (called by ``BaseModelClass.load``)."""


# --------------------------------------------------------------------------- model class
def _perturbation_table(
    features: pd.DataFrame | Mapping[str, Sequence[float]], categories: Sequence[str], control: str
) -> tuple[list[str], torch.Tensor]:
    """The feature table as the model stores it: ``(names, rows)``.

    The categories come first, in category order (the control's row is a placeholder: the
    control has a learned vector), then every other perturbation of the user's table in its
    order: those have no training cells and are predicted from their features alone.
    """
    table = feature_table(features)
    missing = [c for c in categories if c != control and c not in table.index]
    if missing:
        raise ValueError(
            f"Perturbations {missing[:10]}{' ...' if len(missing) > 10 else ''} "
            f"({len(missing)} in all) are missing from the perturbation feature table; every "
            "perturbation with cells needs a row (a missing one is never replaced by zeros). "
            "The control needs none: it has its own learned vector."
        )
    known = set(categories)
    names = list(categories) + [n for n in table.index if n not in known and n != control]
    values = np.zeros((len(names), table.shape[1]), dtype=np.float32)
    rows = [i for i, n in enumerate(names) if n != control]
    values[rows] = table.loc[[names[i] for i in rows]].to_numpy(dtype=np.float32)
    return names, torch.from_numpy(values)


def _remap(
    source: torch.Tensor, target: torch.Tensor, old: list[str], new: list[str], axis: int
) -> tuple[torch.Tensor, int] | None:
    """Copy the entries of ``source`` whose names (along ``axis``) recur in ``new``.

    Returns the merged tensor (``target``'s values for new names) and the number of matched
    names, or ``None`` when the other axes do not fit.
    """
    other = [d for d in range(source.dim()) if d != axis]
    if source.dim() != target.dim() or any(source.shape[d] != target.shape[d] for d in other):
        return None
    position = {name: i for i, name in enumerate(old)}
    pairs = [(j, position[name]) for j, name in enumerate(new) if name in position]
    out = target.detach().clone()
    if pairs:
        dst, src = (torch.tensor(x, dtype=torch.long) for x in zip(*pairs))
        out.index_copy_(axis, dst, source.index_select(axis, src).to(out.dtype))
    return out, len(pairs)


class ScForgePerturb(BaseModelClass):
    """Predict perturbation responses of cell populations (a State-Transition-style model).

    A set of ``cell_set_len`` control cells of one cell type (and batch) and a perturbation
    go in; the same number of perturbed cells come out, as log1p-normalised expression of the
    registered genes. See :class:`~scforge_scvi.nn._perturb.PerturbationSetModel`.

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
        :meth:`ScForgeCellEncoder.from_scforge` (with ``basal_input="counts"``), or any
        module mapping ``(N, n_genes)`` tensors (see ``basal_input``) to ``(N, basal_dim)``
        cell embeddings, differentiable so that it can be fine-tuned. ``None`` uses an MLP on
        the log1p expression. The output stays in gene space either way. A pluggable encoder
        belongs to the backbone (frozen by ``freeze_backbone``).
    basal_dim
        Output width of ``basal_encoder``; read from a :class:`ScForgeCellEncoder` when
        ``None``.
    basal_input
        What ``basal_encoder`` reads: ``"log1p"`` expression or raw ``"counts"``.

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
    ) -> None:
        super().__init__(adata, registry)
        if isinstance(basal_encoder, ScForgeCellEncoder):
            if basal_input != basal_encoder.basal_input:
                raise ValueError(
                    "A ScForgeCellEncoder reads raw counts: pass basal_input='counts', got "
                    f"{basal_input!r}."
                )
            if basal_dim is None:
                basal_dim = basal_encoder.output_dim
        if basal_input not in BASAL_INPUTS:
            raise ValueError(f"basal_input must be one of {BASAL_INPUTS}, got {basal_input!r}.")
        if basal_input == "counts" and basal_encoder is None:
            raise ValueError("basal_input='counts' needs a basal_encoder that reads counts.")
        setup = self.registry_["setup_args"]
        self.control_label_ = str(setup["control_label"])
        self.perturbations_ = [str(x) for x in self._categories(_KEYS.PERTURBATION_KEY)]
        self.cell_types_ = [str(x) for x in self._categories(_KEYS.CELL_TYPE_KEY)]
        self.batches_ = [str(x) for x in self._categories(_KEYS.BATCH_KEY)]
        self.genes_ = [str(g) for g in self.adata.var_names] if self.adata is not None else []
        table, self.feature_perturbations_ = None, []
        if perturbation_features is not None:
            self.feature_perturbations_, table = _perturbation_table(
                perturbation_features, self.perturbations_, self.control_label_
            )
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
            hidden_dim=hidden_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            ffn_dim=ffn_dim,
            activation=activation,
            encoder_hidden_dim=encoder_hidden_dim,
            dropout=dropout,
            cell_set_len=cell_set_len,
        )
        self.module = self._module_cls(config, table, basal_encoder)
        self.basal_input_ = basal_input
        self.checkpoint_paths_: dict[str, str] = {}
        self.best_epoch_: int | None = None
        self.best_validation_loss_: float | None = None
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
            f"{config.cell_set_len} cells, {self.module.num_parameters():,} parameters"
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
        if layer is not None and layer not in adata.layers:
            raise ScForgeKeyError(
                f"Layer {layer!r} not found; available layers: {sorted(adata.layers)} "
                "(use layer=None for adata.X)."
            )
        counts = adata.X if layer is None else adata.layers[layer]
        check_raw_counts(counts, "adata.X" if layer is None else f"adata.layers[{layer!r}]")
        validate_perturbation_adata(
            adata, perturbation_key, control_label, cell_type_key, batch_key
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
        counts = sp.csr_matrix(manager.get_from_registry(_KEYS.X_KEY), dtype=np.float32)

        def codes(key: str) -> np.ndarray:
            return np.asarray(manager.get_from_registry(key)).ravel().astype(np.int64)

        return PerturbCells(
            log1p=log_normalize(counts),
            counts=counts if self.basal_input_ == "counts" else None,
            perturbation=codes(_KEYS.PERTURBATION_KEY),
            cell_type=codes(_KEYS.CELL_TYPE_KEY),
            batch=codes(_KEYS.BATCH_KEY),
        )

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

    def _check_genes(self, adata: ad.AnnData) -> None:
        names = [str(g) for g in adata.var_names]
        if names != self.genes_:
            first = next(
                (i for i, (a, b) in enumerate(zip(names, self.genes_)) if a != b),
                min(len(names), len(self.genes_)),
            )
            raise ValueError(
                f"The AnnData's genes ({len(names)}) differ from the model's genes "
                f"({len(self.genes_)}) in name or order, first at position {first}; subset and "
                "reorder it with adata[:, model.genes_]."
            )

    # -- training ----------------------------------------------------------------------------
    def _split(self, split_key: str | None, validation_size: float, seed: int) -> np.ndarray:
        adata = self.adata
        if split_key is not None:
            if split_key not in adata.obs:
                raise KeyError(
                    f"Split column {split_key!r} is not in adata.obs; available columns: "
                    f"{list(adata.obs.columns)}. Write one with assign_perturbation_split."
                )
            return normalize_split_labels(adata.obs[split_key], split_key)
        if not 0.0 <= validation_size < 1.0:
            raise ValueError(f"validation_size must be in [0, 1), got {validation_size}.")
        # random held-out cells of every perturbed group (in-distribution validation)
        rng = np.random.default_rng(seed)
        split = np.full(adata.n_obs, "train", dtype=object)
        is_val = rng.random(adata.n_obs) < validation_size
        perts = adata.obs[self._setup["perturbation_key"]].astype(str).to_numpy()
        split[is_val & (perts != self.control_label_)] = "val"
        return split

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
            :func:`~scforge_scvi.data._perturb_data.assign_perturbation_split`); test cells
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
        config = PerturbTrainingConfig(
            lr=lr,
            backbone_lr=backbone_lr,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            min_lr_ratio=min_lr_ratio,
            energy_weight=energy_weight,
            mean_mse_weight=mean_mse_weight,
            freeze_backbone=freeze_backbone,
            freeze_backbone_epochs=freeze_backbone_epochs,
            unfreeze_warmup_steps=unfreeze_warmup_steps,
        )
        if freeze_backbone:
            self._check_freezable()
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
        split = self._split(split_key, validation_size, seed)
        datamodule = self._data_module_cls(
            self._read_cells(self.adata),
            split,
            self._control_code,
            set_len=self.module.config.cell_set_len,
            sets_per_batch=sets_per_batch,
            seed=seed,
            with_batch=self.module.config.n_batches > 0,
            with_counts=self.basal_input_ == "counts",
            names={"cell_type": self.cell_types_, "batch": self.batches_},
        )
        metadata = {"config": {**self._config_dict(), "run": run}, "vocab": self._vocab().to_dict()}
        plan = self._training_plan_cls(self.module, config, checkpoint_metadata=metadata)
        checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        # minimum validation loss (gene space): weights kept in memory; with a directory,
        # resumable best.ckpt and last.ckpt written after every validation
        best = BestCheckpoint("validation_loss", dirpath=checkpoint_dir, restore_best=False)
        callbacks = [BackboneFreezing(), best, *trainer_kwargs.pop("callbacks", [])]
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
        self._after_training(best, checkpoint_dir, has_val)

    def _after_training(
        self, best: BestCheckpoint, checkpoint_dir: Path | None, has_val: bool
    ) -> None:
        final = {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}
        best_state = best.best_state  # kept by BestCheckpoint; restore_best=False above
        if best_state is None and best.best_score is not None and checkpoint_dir is not None:
            # resumed run whose best epoch came before the resume: read it back
            best_state = read_pretrained(checkpoint_dir / "best.ckpt").state_dict
        if best_state is None:
            if has_val:
                logger.warning("No validation loss was recorded; 'best' is the final weights.")
            else:
                logger.warning(
                    "No validation cells (no 'val' split): 'best' is the final weights. Declare "
                    "held-out perturbations to select the checkpoint by validation loss."
                )
            best_state = final
        self._weights = {"best": best_state, "final": final}
        self.best_epoch_ = best.best_epoch
        self.best_validation_loss_ = best.best_score
        self._fresh_parameters = set()
        self.module.load_state_dict(best_state)
        self.active_checkpoint_ = "best"
        self.module.eval()
        for p in self.module.parameters():  # freezing is a training-time policy
            p.requires_grad_(True)
        if best.best_epoch is not None:
            logger.info(
                "Best validation loss %.4f at epoch %d; predict() uses these weights.",
                best.best_score,
                best.best_epoch,
            )
        if checkpoint_dir is not None:
            self.checkpoint_paths_ = {"last": str(checkpoint_dir / "last.ckpt")}
            if self.module.external_basal_encoder:
                logger.warning(
                    "A pluggable basal encoder cannot be written as a pretrained directory: "
                    "only best.ckpt and last.ckpt are in %s; the 'best' and 'final' weights "
                    "stay in memory.",
                    checkpoint_dir,
                )
                return
            for name in ("best", "final"):
                path = checkpoint_dir / name
                self.save_pretrained(path, checkpoint=name, overwrite=True)
                self.checkpoint_paths_[name] = str(path)

    def _check_freezable(self) -> None:
        backbone = {
            name
            for name, p in self.module.named_parameters()
            if any(p is q for m in self.module.backbone_modules() for q in m.parameters())
        }
        fresh = sorted(backbone & self._fresh_parameters)
        if fresh:
            raise ValueError(
                f"freeze_backbone=True would freeze {len(fresh)} newly initialised backbone "
                f"parameter tensors (e.g. {fresh[:3]}): they were never trained or loaded. "
                "Initialise the backbone with ScForgePerturb.from_pretrained (checking the load "
                "report), or train without freezing."
            )

    def _check_resumable(self, path: str | Path, run: dict[str, Any]) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No checkpoint to resume at {path}.")
        saved = self._read(path, ".train; it cannot be resumed").config
        saved = {"model": saved, **saved.pop("run", {})}
        expected = {"model": self._config_dict(), **run}
        differences = []
        for section in ("training", "model", "data"):
            old, new = saved.get(section, {}), expected.get(section, {})
            for key in sorted(set(old) | set(new)):
                if old.get(key) != new.get(key):
                    differences.append(f"{section}.{key}: {old.get(key)!r} -> {new.get(key)!r}")
        if differences:
            raise ValueError(
                "Cannot resume: the configuration differs from the checkpoint's "
                f"({'; '.join(differences)}). Resuming restores optimizer and scheduler state and "
                "is only valid for the same run; to fine-tune with new settings, start a new run "
                "with ScForgePerturb.from_pretrained(checkpoint, adata) (weights only, fresh "
                "optimizer and schedule)."
            )

    # -- checkpoints -------------------------------------------------------------------------
    @staticmethod
    def _read(path: str | Path, written_by: str = "") -> Pretrained:
        """A pretrained directory or ``.ckpt`` of this model class."""
        pretrained = read_pretrained(path)
        if pretrained.config.get("model_class") != "ScForgePerturb":
            raise ScForgeValueError(f"{path} was not written by ScForgePerturb{written_by}.")
        return pretrained

    def use_checkpoint(self, checkpoint: str) -> None:
        """Load the ``best``, ``final`` or ``last`` weights into the module.

        ``best`` and ``final`` are kept in memory after :meth:`train` (and on disk with
        ``checkpoint_dir``); ``last`` reads Lightning's ``last.ckpt``.
        """
        if checkpoint not in CHECKPOINT_NAMES:
            raise ValueError(f"checkpoint must be one of {CHECKPOINT_NAMES}, got {checkpoint!r}.")
        if checkpoint in self._weights:
            state = self._weights[checkpoint]
        elif checkpoint in self.checkpoint_paths_:
            state = read_pretrained(self.checkpoint_paths_[checkpoint]).state_dict
        else:
            raise ValueError(
                f"The {checkpoint!r} weights are not available: they exist after train() in "
                "this Python process, or on disk when training had a checkpoint_dir."
            )
        self.module.load_state_dict(state)
        self.active_checkpoint_ = checkpoint

    def _config_dict(self) -> dict[str, Any]:
        setup = self._setup
        return {
            "model_class": type(self).__name__,
            "perturb_config": self.module.config.to_dict(),
            "basal_input": self.basal_input_,
            "genes": list(self.genes_),
            "perturbations": list(self.perturbations_),
            "feature_perturbations": list(self.feature_perturbations_),
            "batches": list(self.batches_),
            "control_label": self.control_label_,
            "setup": {
                k: setup.get(k) for k in ("perturbation_key", "cell_type_key", "batch_key", "layer")
            },
        }

    def _vocab(self) -> GeneVocab:
        """The model's genes, in order, as the ``gene_vocab.json`` of its pretrained layout."""
        return GeneVocab.from_genes(self.genes_, source="ScForgePerturb genes")

    def save_pretrained(
        self, path: str | Path, *, checkpoint: str | None = None, overwrite: bool = False
    ) -> Path:
        """Write a pretrained directory (:func:`~scforge_scvi.io.write_pretrained`).

        ``config.json`` (versioned), ``model.safetensors`` and ``gene_vocab.json`` (the
        model's genes), no pickle; the write is atomic, so an interrupted save leaves a
        previous directory at ``path`` intact.

        Parameters
        ----------
        path
            Directory to create.
        checkpoint
            ``"best"`` or ``"final"`` weights kept after training; ``None``: the weights in the
            module now.
        overwrite
            Replace an existing directory (an empty one is always replaced).
        """
        path = Path(path)
        overwrite = overwrite or (path.is_dir() and not any(path.iterdir()))
        if checkpoint is None:
            state = self.module.state_dict()
        elif checkpoint in self._weights:
            state = self._weights[checkpoint]
        else:
            raise ValueError(
                f"No {checkpoint!r} weights in memory; available: {sorted(self._weights)} "
                "(or pass checkpoint=None for the current weights)."
            )
        if self.module.external_basal_encoder:
            raise NotImplementedError(
                "save_pretrained does not yet write a pluggable basal encoder's definition; "
                "use model.save() for such models."
            )
        return write_pretrained(
            path, self._config_dict(), self._vocab(), state, overwrite=overwrite
        )

    @classmethod
    def load(cls, dir_path: str, adata: ad.AnnData | None = None, **kwargs: Any) -> ScForgePerturb:
        """Load a model written by :meth:`save` (scvi-tools' format; see its caveats on pickle).

        Takes the arguments of :meth:`scvi.model.base.BaseModelClass.load`.
        """
        model = super().load(dir_path, adata=adata, **kwargs)
        model._fresh_parameters = set()  # saved weights count as trained
        return model

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | Path,
        adata: ad.AnnData,
        **overrides: Any,
    ) -> ScForgePerturb:
        """Initialise a new model from trained weights: weights only, never training state.

        The optimizer, schedule and step of the next :meth:`train` start fresh. Tensors indexed
        by genes, perturbations or batches are matched by name (a new gene or perturbation gets
        a fresh row); tensors whose shape does not fit are skipped. Everything is reported in
        ``model.init_report_`` and the log; freezing a newly initialised backbone parameter
        later is an error. The new model counts as untrained (``is_trained_`` is ``False``)
        until :meth:`train` runs; :meth:`predict` uses the loaded weights.

        Parameters
        ----------
        pretrained
            A pretrained directory written by :meth:`save_pretrained`, e.g.
            ``checkpoint_dir/best``, or a Lightning ``.ckpt`` written by :meth:`train` (only
            its weights are read).
        adata
            AnnData registered with :meth:`setup_anndata`.
        **overrides
            Constructor arguments that replace the saved ones (e.g. ``dropout``).
        """
        loaded = cls._read(pretrained)
        saved, state = loaded.config, loaded.state_dict
        arch = saved["perturb_config"]
        kwargs = {
            k: arch[k]
            for k in (
                "hidden_dim",
                "num_layers",
                "num_heads",
                "ffn_dim",
                "encoder_hidden_dim",
                "dropout",
                "activation",
                "cell_set_len",
            )
        }
        kwargs.update(overrides)
        if arch["perturbation_features"] == "table" and kwargs.get("perturbation_features") is None:
            # the whole stored table, perturbations without training cells included
            table = state["perturbation_encoder.table"].numpy()
            names = saved.get("feature_perturbations") or saved["perturbations"]
            frame = pd.DataFrame(table, index=pd.Index(names))
            kwargs["perturbation_features"] = frame.drop(index=saved["control_label"])
        model = cls(adata, **kwargs)
        model.init_report_ = model._load_matching(state, saved)
        return model

    def _load_matching(
        self, state: dict[str, torch.Tensor], saved: dict[str, Any]
    ) -> dict[str, list[str]]:
        """Load what fits; return and log what was loaded, remapped, skipped and initialised."""
        axes = {
            "decoder.linear2.weight": (0, "genes"),
            "decoder.linear2.bias": (0, "genes"),
            "perturbation_encoder.embedding.weight": (0, "perturbations"),
            "batch_embedding.weight": (0, "batches"),
        }
        if not self.module.external_basal_encoder:
            axes["basal_encoder.linear1.weight"] = (1, "genes")
        new_names = {
            "genes": self.genes_,
            "perturbations": self.perturbations_,
            "batches": self.batches_,
        }
        current = self.module.state_dict()
        merged = dict(current)
        report: dict[str, list[str]] = {
            "loaded": [],
            "remapped": [],
            "skipped_shape": [],
            "initialised": [],
            "unexpected": [],
        }
        for key, target in current.items():
            if key not in state:
                report["initialised"].append(key)
                continue
            source = state[key]
            if key == "perturbation_encoder.table":
                # rebuilt by the constructor from the feature table (the saved one unless
                # another was passed), whatever perturbations the new AnnData has
                report["loaded"].append(key)
                continue
            if key in axes:
                axis, what = axes[key]
                old, new = list(saved.get(what, [])), new_names[what]
                if old != new:
                    remapped = _remap(source, target, old, new, axis)
                    if remapped is not None:
                        merged[key], n_shared = remapped
                        report["remapped"].append(f"{key} ({n_shared}/{len(new)} {what} matched)")
                        continue
            if tuple(source.shape) != tuple(target.shape):
                report["skipped_shape"].append(
                    f"{key} (checkpoint {tuple(source.shape)}, model {tuple(target.shape)})"
                )
                continue
            merged[key] = source
            report["loaded"].append(key)
        report["unexpected"] = sorted(set(state) - set(current))
        self.module.load_state_dict(merged)
        fresh = {k.split(" ")[0] for k in report["initialised"] + report["skipped_shape"]}
        self._fresh_parameters = {n for n, _ in self.module.named_parameters() if n in fresh}
        logger.info(
            "Loaded %d tensors, remapped %d by name, skipped %d for shape, initialised %d, "
            "ignored %d unexpected.",
            *(
                len(report[k])
                for k in ("loaded", "remapped", "skipped_shape", "initialised", "unexpected")
            ),
        )
        for kind in ("remapped", "skipped_shape", "initialised", "unexpected"):
            if report[kind]:
                logger.warning("%s: %s", kind, ", ".join(report[kind]))
        return report

    # -- prediction --------------------------------------------------------------------------
    def _perturbation_inputs(
        self,
        names: Sequence[str],
        features: pd.DataFrame | Mapping[str, Sequence[float]] | None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Row index (or ``-1``) and, for a table model, feature vector of each perturbation.

        A one-hot model knows its categories only. A table model reads a perturbation's
        features from ``features`` (rows there take precedence), else from its stored table.
        """
        names = [str(n) for n in names]
        config = self.module.config
        if config.perturbation_features == "one_hot":
            if features is not None:
                raise ValueError(
                    "perturbation_features= was passed to predict, but this model is one-hot "
                    "(created without perturbation_features): it cannot read feature vectors "
                    "and only predicts the perturbations it was trained on."
                )
            unknown = sorted(set(names) - set(self.perturbations_))
            if unknown:
                raise ValueError(
                    f"Unknown perturbations {unknown}; the model knows {len(self.perturbations_)}: "
                    f"{self.perturbations_[:20]}{' ...' if len(self.perturbations_) > 20 else ''}. "
                    "A one-hot model only predicts perturbations it was trained on; to predict "
                    "new ones, create the model with perturbation_features= (a feature vector per "
                    "perturbation, e.g. an embedding of the target gene)."
                )
            codes = np.array([self.perturbations_.index(n) for n in names], dtype=np.int64)
            return codes, None
        table = self.module.perturbation_encoder.table.detach().cpu().numpy()
        width = table.shape[1]
        given = None
        if features is not None:
            given = feature_table(features, "perturbation feature table passed to predict")
            if given.shape[1] != width:
                raise ValueError(
                    f"The perturbation feature table passed to predict has {given.shape[1]} "
                    f"columns; the model reads vectors of width {width}."
                )
        row = {n: i for i, n in enumerate(self.feature_perturbations_)}
        missing = sorted(
            n for n in set(names) if n not in row and (given is None or n not in given.index)
        )
        if missing:
            raise ValueError(
                f"No perturbation features for {missing[:20]}{' ...' if len(missing) > 20 else ''} "
                f"({len(missing)} in all): they are not in the model's perturbation table "
                f"({len(self.feature_perturbations_) - 1} perturbations) nor in a table passed to "
                "predict. Pass their feature vectors as predict(..., perturbation_features=table) "
                f"(a DataFrame indexed by perturbation name, or a mapping name -> vector of width "
                f"{width}), or include them in the perturbation_features= given when creating "
                "the model."
            )
        codes = np.array([row.get(n, -1) for n in names], dtype=np.int64)
        vectors = np.stack(
            [
                given.loc[n].to_numpy() if given is not None and n in given.index else table[row[n]]
                for n in names
            ]
        ).astype(np.float32)
        return codes, vectors

    def _group_codes(self, adata: ad.AnnData, key: str, categories: Sequence[str]) -> np.ndarray:
        """Codes of ``adata.obs[setup[key]]`` among the model's categories (``-1``: unknown)."""
        column = self._setup.get(key)
        if column is None:
            return np.zeros(adata.n_obs, dtype=np.int64)
        values = adata.obs[column].astype(str)
        return pd.Index(categories).get_indexer(values).astype(np.int64)

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
        self._check_genes(adata)
        setup = self._setup
        control_label = self.control_label_
        names = adata.obs[setup["perturbation_key"]].astype(str).to_numpy()
        cell_type = self._group_codes(adata, "cell_type_key", self.cell_types_)
        batch = self._group_codes(adata, "batch_key", self.batches_)
        # cells of perturbations outside the registry cannot be registered; only their
        # groups are read (the basal cells are controls)
        registered = np.isin(names, self.perturbations_)
        known = adata if registered.all() else adata[registered].copy()
        known = self._validate_anndata(known)
        if checkpoint != self.active_checkpoint_:
            if checkpoint == "best" and self.active_checkpoint_ is None:
                logger.info("Predicting with the loaded weights (this model was not trained here).")
            else:
                self.use_checkpoint(checkpoint)
        self.module.eval()
        cells = self._read_cells(known)
        pools = control_pools(cells, self._control_code)
        is_perturbed = names != control_label
        observed = (
            pd.DataFrame({"p": names, "c": cell_type, "b": batch})[is_perturbed]
            .groupby(["p", "c", "b"], sort=False)
            .size()
        )
        for what, codes, key in (
            ("cell types", cell_type, "cell_type_key"),
            ("batches", batch, "batch_key"),
        ):
            if (codes[is_perturbed] < 0).any():
                column = adata.obs[setup[key]].astype(str).to_numpy()
                unknown = sorted(set(column[is_perturbed & (codes < 0)]))
                raise ValueError(
                    f"The AnnData to predict has {what} {unknown} that the model does not know."
                )
        missing = sorted({(c, b) for (_, c, b) in observed.index} - set(pools))
        if missing:
            labels = [f"{self.cell_types_[c]} / {self.batches_[b]}" for c, b in missing]
            raise ValueError(
                f"No {control_label!r} control cells for cell type / batch {labels} in the "
                "AnnData to predict; its controls are the basal cells."
            )
        if isinstance(n_cells, str) and n_cells not in ("controls", "observed"):
            raise ValueError(
                f"n_cells must be 'controls', 'observed' or an integer, got {n_cells!r}."
            )
        if not isinstance(n_cells, str) and int(n_cells) < 1:
            raise ValueError(f"n_cells must be positive, got {n_cells}.")

        if perturbations is None:
            wanted = list(dict.fromkeys(p for p, _, _ in observed.index))
        else:
            wanted = list(dict.fromkeys(str(p) for p in perturbations if str(p) != control_label))
        if not wanted:
            raise ValueError(
                "Nothing to predict: the AnnData has no perturbed cells and no "
                "`perturbations` were requested."
            )
        codes, vectors = self._perturbation_inputs(wanted, perturbation_features)
        # output order: the model's categories first, then the others as asked for
        order = {p: i for i, p in enumerate(self.perturbations_)}
        rank = {p: order.get(p, len(order) + i) for i, p in enumerate(wanted)}
        index = {p: i for i, p in enumerate(wanted)}
        if perturbations is None:
            groups = sorted(observed.index, key=lambda g: (rank[g[0]], g[1], g[2]))
        else:
            groups = [(p, c, b) for (c, b) in sorted(pools) for p in wanted]

        def size(p: str, c: int, b: int) -> int:
            if n_cells == "controls":
                return len(pools[(c, b)])
            if n_cells == "observed":
                return int(observed.get((p, c, b), 0)) or len(pools[(c, b)])
            return int(n_cells)

        jobs = [(p, c, b, size(p, c, b)) for p, c, b in groups]
        if not jobs:
            raise ValueError(
                f"No {control_label!r} control cells in the AnnData to predict; its controls "
                "are the basal cells."
            )
        basal, job, keep = prediction_sets(
            [pools[(c, b)] for _, c, b, _ in jobs],
            [n for *_, n in jobs],
            self.module.config.cell_set_len,
            np.random.default_rng(seed),
        )
        which = np.array([index[p] for p, *_ in jobs])[job]
        sets = CellSets(
            cells,
            basal,
            codes[which],
            np.array([b for _, _, b, _ in jobs])[job] if self.module.config.n_batches else None,
            sets_per_batch=sets_per_batch,
            with_counts=cells.counts is not None,
            features=None if vectors is None else vectors[which],
        )
        device = self.module.device
        outputs = [
            self.module(**{k: v.to(device) for k, v in sets[i].items()}).prediction.cpu().numpy()
            for i in range(len(sets))
        ]
        pred = np.concatenate(outputs).reshape(-1, len(self.genes_))[keep]
        categories = list(self.perturbations_) + [p for p in wanted if p not in order]
        return self._prediction_anndata(known, cells, jobs, pred, categories)

    def _prediction_anndata(
        self,
        adata: ad.AnnData,
        cells: PerturbCells,
        jobs: list[tuple[str, int, int, int]],
        pred: np.ndarray,
        perturbation_categories: list[str],
    ) -> ad.AnnData:
        setup = self._setup
        pert_key = setup["perturbation_key"]
        columns: dict[str, tuple[list[str], int]] = {}
        if setup.get("cell_type_key"):
            columns[setup["cell_type_key"]] = (self.cell_types_, 1)
        if setup.get("batch_key"):
            columns[setup["batch_key"]] = (self.batches_, 2)
        sizes = [job[3] for job in jobs]
        obs_pred = pd.DataFrame(
            {pert_key: np.repeat([job[0] for job in jobs], sizes)},
            index=[f"predicted_{i}" for i in range(sum(sizes))],
        )
        for key, (names, axis) in columns.items():
            obs_pred[key] = np.repeat(np.asarray(names)[[job[axis] for job in jobs]], sizes)
        obs_pred["scforge_predicted"] = True
        is_control = cells.perturbation == self._control_code
        obs_ctrl = adata.obs.loc[is_control, [pert_key, *columns]].astype(str)
        obs_ctrl["scforge_predicted"] = False
        obs = pd.concat([obs_pred, obs_ctrl])
        obs[pert_key] = pd.Categorical(obs[pert_key], categories=perturbation_categories)
        for key, (names, _) in columns.items():
            obs[key] = pd.Categorical(obs[key], categories=names)
        x = np.vstack([pred.astype(np.float32), cells.log1p[np.flatnonzero(is_control)].toarray()])
        return ad.AnnData(X=x, obs=obs, var=adata.var.copy())
