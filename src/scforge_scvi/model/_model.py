"""`ScForge`: a single-cell transformer foundation model as an scvi-tools model class."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from lightning.pytorch.callbacks import EarlyStopping
from scvi.data import AnnDataManager
from scvi.data.fields import (
    CategoricalObsField,
    LayerField,
    MuDataCategoricalObsField,
    MuDataLayerField,
    NumericalObsField,
)
from scvi.dataloaders import DataSplitter
from scvi.model.base import BaseModelClass
from scvi.train import TrainRunner
from scvi.utils import setup_anndata_dsp

from scforge_scvi._allocator import tune_cpu_allocator
from scforge_scvi._errors import (
    ScForgeFileNotFoundError,
    ScForgeKeyError,
    ScForgeTypeError,
    ScForgeValueError,
    one_line,
)
from scforge_scvi._logging import logger
from scforge_scvi.data import (
    GeneVocab,
    MaskingConfig,
    Preprocessing,
    build_tokenizer,
    check_raw_counts,
    fit_gene_medians,
)
from scforge_scvi.data._bucketing import LengthGroupedDataSplitter, token_lengths
from scforge_scvi.data._collate import TokenCollator
from scforge_scvi.data._preprocess import backed_source, is_backed, read_row_sample
from scforge_scvi.data._streaming import CellStream, StreamedCells, StreamedDataModule, split_cells
from scforge_scvi.nn import BackboneConfig
from scforge_scvi.train._callbacks import (
    BestCheckpoint,
    EpochSeed,
    GradualUnfreezing,
    StreamEpoch,
)
from scforge_scvi.train._lora import LoraSettings, apply_lora, count_parameters
from scforge_scvi.train._plans import STRATEGIES, ScForgeTrainingPlan
from scforge_scvi.train._schedules import default_max_epochs

from ._constants import SCFORGE_OUTPUT_KEYS as OUT
from ._constants import SCFORGE_REGISTRY_KEYS as KEYS
from ._fields import LabelsWithMissingObsField, MuDataLabelsWithMissingObsField
from ._module import ScForgeModule

if TYPE_CHECKING:
    from mudata import MuData

VocabLike = GeneVocab | str | dict | None
#: cells of a backed AnnData read to fit per-gene medians and select highly variable genes
BACKED_FIT_CELLS = 10_000
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


def _check_counts(counts, where: str) -> None:
    """Reject anything but raw counts; warn about cells without any count.

    A backed matrix (``X`` of ``read_h5ad(..., backed="r")``) is read a block of rows at a
    time, never loaded whole.
    """
    n_obs, n_vars = counts.shape
    if n_obs == 0 or n_vars == 0:
        raise ScForgeValueError(
            f"{where} is empty ({n_obs} cells x {n_vars} genes); scforge needs at least one "
            "cell and one gene of raw counts."
        )
    sums = check_raw_counts(counts, where)
    n_empty = int((sums == 0).sum())
    if n_empty:
        warnings.warn(
            f"{n_empty} cells have zero counts in {where}; they are kept and tokenised to "
            "the <cls> token alone (their embedding carries no expression information).",
            UserWarning,
            stacklevel=3,
        )


def _check_adata(adata) -> None:
    """Refuse what scvi-tools would fail on obscurely: a non-AnnData, a backed subset."""
    if not isinstance(adata, AnnData):
        raise ScForgeTypeError(
            f"setup_anndata needs an AnnData, got {type(adata).__name__}; for cells on disk "
            "read them with anndata.read_h5ad(path, backed='r') or stream them with "
            "StreamedCells(paths)."
        )
    if adata.isbacked and adata.is_view:
        raise ScForgeValueError(
            f"This AnnData is a subset (view) of the backed file '{adata.filename}', which "
            "cannot be registered without copying it; register the whole backed AnnData, or "
            "load the subset into memory with adata[...].to_memory()."
        )


def _check_labels_column(column: pd.Series, key: str) -> None:
    """A labels column holds class names: floats (a measurement) are a mistake."""
    from pandas.api.types import is_float_dtype

    if is_float_dtype(column.dtype):
        raise ScForgeTypeError(
            f"labels_key={key!r} is a column of floating-point numbers ({column.nunique()} "
            "distinct values), not class labels; pass a column of class names (strings or "
            "categories, e.g. adata.obs[key].astype(str)), or target_key= to regress a number."
        )


def _check_target_column(column: pd.Series, key: str) -> None:
    from pandas.api.types import is_bool_dtype, is_numeric_dtype

    if not is_numeric_dtype(column.dtype) or is_bool_dtype(column.dtype):
        raise ScForgeTypeError(
            f"target_key={key!r} is a column of {column.dtype} values, not numbers; a "
            "regression target must be numeric (for classes use labels_key=)."
        )
    if not np.isfinite(column.to_numpy(dtype=np.float64, na_value=np.nan)).all():
        raise ScForgeValueError(
            f"target_key={key!r} holds NaN or infinite values; every cell needs a finite target."
        )


class ScForge(BaseModelClass):
    """Transformer foundation model over gene tokens, trained on raw counts.

    Pretrains with masked-gene modelling, fine-tunes a classification or regression head on
    registered labels, and writes embeddings and predictions back into the AnnData.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    registry
        Used by :meth:`load`; leave ``None``.
    vocab
        Gene vocabulary: ``None`` builds it from ``adata``'s genes (after HVG selection when
        ``n_top_genes`` is set), a name such as ``"human_protein_coding"``, a path to a
        vocabulary file, or a :class:`~scforge_scvi.data.GeneVocab`. Per-gene medians are
        fitted on ``adata`` when the vocabulary has none, and never refitted afterwards.
    tokenizer
        ``"binned_expression"`` (scGPT-style value bins, the default), ``"rank_value"``
        (Geneformer) or ``"continuous"``.
    max_genes
        Genes kept per cell (the highest-expressed; ``<cls>`` not counted).
    prepend_cls
        Start each cell's sequence with a ``<cls>`` token.
    n_bins
        Expression bins of the ``binned_expression`` tokenizer (bin 0 is reserved).
    normalize, target_sum, log1p, n_top_genes
        Preprocessing, see :class:`~scforge_scvi.data.Preprocessing`.
    hidden_dim, num_layers, num_heads, ffn_dim, dropout, activation, pooling, max_seq_len
        Transformer architecture; ``max_seq_len`` defaults to ``max_genes`` (+1 for CLS).
        ``pooling="mean"`` averages the gene tokens, ``"cls"`` reads ``<cls>``.

    expression_loss_weight
        Weight of the masked expression loss of the binned/continuous tokenizers.
    head_hidden_dim, head_dropout
        Shape of the task head used when labels (or a regression target) are registered.
    min_coverage
        Smallest fraction of a dataset's genes that must be found in the vocabulary.
    lora
        LoRA settings (a dict of :class:`~scforge_scvi.train.LoraSettings` fields) when the
        model carries adapters; set by ``train(strategy="lora")``.
    class_names
        Classes of the classification head when ``adata`` has no labels registered (a query
        loaded with :meth:`from_pretrained` keeps the fine-tuned classifier this way).
    append_eos
        End each cell's sequence with an end-of-sequence token (Geneformer V2 models).
    score_dtype
        Precision of the ``rank_value`` scores: ``"float32"`` (default) or ``"float64"``
        (Geneformer's arithmetic, see :class:`~scforge_scvi.data.RankValueTokenizer`).
    attention_dropout
        Dropout on attention probabilities.
    norm_position, embedding_norm, layer_norm_eps
        LayerNorm placement and epsilon, see :class:`~scforge_scvi.nn.BackboneConfig`
        (``"post"``, ``True`` and ``1e-12`` for BERT/Geneformer).
    gene_head_activation
        Non-linearity of the masked-gene head (``"relu"`` for Geneformer models).

    Notes
    -----
    The defaults are the recipe measured on pbmc3k and pbmc68k_reduced
    (``docs/benchmarks_annotation.md``): binned values of the 2,000 most variable genes,
    512 genes a cell, a 2-layer, 64-wide transformer with mean pooling. An imported or
    pretrained model brings its own architecture through :meth:`from_pretrained`.

    Writes ``adata.obsm["X_scforge"]`` (:meth:`embed`) and ``adata.obs["scforge_prediction"]``,
    ``adata.obs["scforge_confidence"]``, ``adata.obsm["scforge_probabilities"]``
    (:meth:`predict`); each key can be moved with ``key_added``. Parameters of each call are
    recorded in ``adata.uns["scforge"]``.

    Examples
    --------
    >>> import scanpy as sc
    >>> import scforge_scvi as sf
    >>> adata = sc.read_h5ad("pbmc.h5ad")
    >>> sf.ScForge.setup_anndata(adata, layer="counts")
    >>> model = sf.ScForge(adata)  # the measured annotation recipe: 2,000 HVGs, 64 wide
    >>> model.train()
    >>> model.embed()
    >>> sc.pp.neighbors(adata, use_rep="X_scforge")
    """

    _module_cls = ScForgeModule
    _training_plan_cls = ScForgeTrainingPlan
    _data_splitter_cls = DataSplitter
    _train_runner_cls = TrainRunner

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
        vocab: VocabLike = None,
        tokenizer: str = "binned_expression",
        max_genes: int = 512,
        prepend_cls: bool = True,
        n_bins: int = 51,
        normalize: str = "library_size",
        target_sum: float = 1e4,
        log1p: bool = True,
        n_top_genes: int | None = 2000,
        hidden_dim: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        ffn_dim: int | None = None,
        dropout: float = 0.1,
        activation: str = "gelu",
        pooling: str = "mean",
        max_seq_len: int | None = None,
        expression_loss_weight: float = 1.0,
        head_hidden_dim: int | None = 256,
        head_dropout: float = 0.1,
        min_coverage: float = 0.5,
        lora: dict | None = None,
        class_names: Sequence[str] | None = None,
        append_eos: bool = False,
        score_dtype: str = "float32",
        attention_dropout: float = 0.0,
        norm_position: str = "pre",
        embedding_norm: bool = False,
        layer_norm_eps: float = 1e-5,
        gene_head_activation: str = "gelu",
    ) -> None:
        super().__init__(adata, registry)
        self.preprocessing = Preprocessing(normalize, target_sum, log1p, n_top_genes)
        self.min_coverage = min_coverage
        self.vocab = self._resolve_vocab(vocab)
        self.tokenizer = build_tokenizer(
            tokenizer,
            self.vocab,
            preprocessing=self.preprocessing,
            max_genes=max_genes,
            prepend_cls=prepend_cls,
            append_eos=append_eos,
            n_bins=n_bins,
            score_dtype=score_dtype,
        )
        self.backbone_config = BackboneConfig(
            vocab_size=len(self.vocab),
            hidden_dim=hidden_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            ffn_dim=ffn_dim,
            dropout=dropout,
            attention_dropout=attention_dropout,
            activation=activation,
            max_seq_len=max_seq_len or self.tokenizer.max_length,
            pooling=pooling,
            value_encoding=self.tokenizer.value_encoding,
            n_bins=n_bins,
            use_positions=self.tokenizer.ordered,
            pad_token_id=self.vocab.pad_id,
            layer_norm_eps=layer_norm_eps,
            norm_position=norm_position,
            embedding_norm=embedding_norm,
        )
        if self.backbone_config.max_seq_len < self.tokenizer.max_length:
            raise ValueError(
                f"max_seq_len={self.backbone_config.max_seq_len} is shorter than the "
                f"tokenizer's longest sequence ({self.tokenizer.max_length} = max_genes "
                f"{max_genes} + CLS {int(prepend_cls)} + EOS {int(append_eos)}); raise "
                "max_seq_len or lower max_genes."
            )
        if pooling == "cls" and not prepend_cls:
            raise ValueError("pooling='cls' needs prepend_cls=True; use pooling='mean' instead.")
        self.class_names_ = self._registered_class_names() or list(class_names or [])
        if len(self.class_names_) == 1:
            raise ScForgeValueError(
                f"labels_key={self._setup_arg('labels_key')!r} has a single class "
                f"({self.class_names_[0]!r}) among its labelled cells; a classifier needs at "
                "least two: register a column with two or more classes, or no labels_key to "
                "pretrain."
            )
        self.module = self._module_cls(
            self.backbone_config,
            n_special=self.vocab.n_special,
            mask_id=self.vocab.mask_id,
            expression_loss_weight=expression_loss_weight,
            n_classes=len(self.class_names_),
            n_regression_outputs=int(self._has_regression_target()),
            head_hidden_dim=head_hidden_dim,
            head_dropout=head_dropout,
            gene_head_activation=gene_head_activation,
        )
        self.lora_ = None
        if lora is not None:
            self._apply_lora(LoraSettings(**lora))
        self._model_summary_string = (
            f"ScForge: {tokenizer} tokens (max {max_genes}), {num_layers} layers x "
            f"{hidden_dim} dims, {len(self.vocab) - self.vocab.n_special} genes in vocabulary, "
            f"{sum(p.numel() for p in self.module.parameters()):,} parameters"
        )
        self.init_params_ = self._get_init_params(locals())
        # the vocabulary (with its fitted medians) is part of the model: load() replays it
        self.init_params_["non_kwargs"]["vocab"] = self.vocab.to_dict()

    # -- registration ------------------------------------------------------------------------
    @classmethod
    @setup_anndata_dsp.dedent
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = None,
        labels_key: str | None = None,
        batch_key: str | None = None,
        target_key: str | None = None,
        unlabeled_category: str = "Unknown",
        gene_key: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Register an AnnData holding raw counts.

        Parameters
        ----------
        %(param_adata)s
        layer
            Layer holding the raw counts (``None``: ``adata.X``). Counts must be non-negative
            integers; normalised or log-transformed values are rejected.
        labels_key
            ``adata.obs`` column of cell-type (or other class) labels for fine-tuning. Cells
            labelled ``unlabeled_category`` and cells whose label is missing (NaN, ``None``)
            are unlabelled: they are left out of the loss and of the evaluation, form their
            own stratum in the train/validation/test split, and are still predicted. The
            column itself is never modified (the codes live in ``obs["_scvi_labels"]``).
        %(param_batch_key)s
        target_key
            Numeric ``adata.obs`` column to regress (fine-tuning a regression head).
        unlabeled_category
            Label value marking unlabelled cells.
        gene_key
            ``adata.var`` column with gene identifiers to match against the vocabulary
            (``None``: ``adata.var_names``, or a column of Ensembl ids when one is found).
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        _check_adata(adata)
        where = f"adata.layers[{layer!r}]" if layer is not None else "adata.X"
        where += backed_source(adata) if layer is None else ""
        if layer is not None and layer not in adata.layers:
            raise ScForgeKeyError(
                f"Layer {layer!r} not found; available layers: {sorted(adata.layers)} "
                "(use layer=None for adata.X)."
            )
        for key, name in (
            (labels_key, "labels_key"),
            (batch_key, "batch_key"),
            (target_key, "target_key"),
        ):
            if key is not None and key not in adata.obs:
                raise ScForgeKeyError(
                    f"{name}={key!r} is not a column of adata.obs; available columns: "
                    f"{list(adata.obs.columns)}."
                )
        if gene_key is not None and gene_key not in adata.var:
            raise ScForgeKeyError(
                f"gene_key={gene_key!r} is not a column of adata.var; available columns: "
                f"{list(adata.var.columns)}."
            )
        if labels_key is not None:
            _check_labels_column(adata.obs[labels_key], labels_key)
        if target_key is not None:
            _check_target_column(adata.obs[target_key], target_key)
        counts = adata.layers[layer] if layer is not None else adata.X
        _check_counts(counts, where)
        fields = [
            LayerField(KEYS.X_KEY, layer, is_count_data=True),
            CategoricalObsField(KEYS.BATCH_KEY, batch_key),
        ]
        if labels_key is None:
            fields.append(CategoricalObsField(KEYS.LABELS_KEY, None))
        else:
            fields.append(
                LabelsWithMissingObsField(KEYS.LABELS_KEY, labels_key, unlabeled_category)
            )
        if target_key is not None:
            fields.append(NumericalObsField(KEYS.TARGET_KEY, target_key))
        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        manager.register_fields(adata, **kwargs)
        cls.register_manager(manager)

    @classmethod
    @setup_anndata_dsp.dedent
    def setup_mudata(
        cls,
        mdata: MuData,
        rna_layer: str | None = None,
        labels_key: str | None = None,
        batch_key: str | None = None,
        unlabeled_category: str = "Unknown",
        modalities: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        """%(summary_mdata)s.

        The raw counts are read from one modality (``modalities["rna_layer"]``); labels and
        batches from that modality's ``obs`` or, when no modality is given for them, from
        ``mdata.obs``.

        Parameters
        ----------
        %(param_mdata)s
        rna_layer
            Layer of the RNA modality holding the raw counts (``None``: its ``.X``). Counts
            must be non-negative integers; normalised or log-transformed values are rejected.
        labels_key
            ``obs`` column of cell-type (or other class) labels for fine-tuning. Cells whose
            label is ``unlabeled_category`` or missing (NaN) are left out of the loss and of
            the evaluation but still predicted; the column itself is never modified.
        %(param_batch_key)s
        unlabeled_category
            Label value marking unlabelled cells.
        %(param_modalities)s
            ``"rna_layer"`` is required, e.g. ``{"rna_layer": "rna", "labels_key": "rna"}``.

        Examples
        --------
        >>> sf.ScForge.setup_mudata(mdata, rna_layer="counts", modalities={"rna_layer": "rna"})
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        available = list(mdata.mod)
        if not modalities or "rna_layer" not in modalities:
            raise ValueError(
                "setup_mudata needs modalities={'rna_layer': <modality with the counts>}; "
                f"available modalities: {available}."
            )
        modalities = cls._create_modalities_attr_dict(modalities, setup_method_args)
        for arg, mod in modalities.items():
            if mod is not None and mod not in mdata.mod:
                raise KeyError(
                    f"modalities[{arg!r}]={mod!r} is not a modality of the MuData; available "
                    f"modalities: {available}."
                )
        rna = mdata.mod[modalities.rna_layer]
        where = f"mdata.mod[{modalities.rna_layer!r}]"
        if rna_layer is not None and rna_layer not in rna.layers:
            raise KeyError(
                f"Layer {rna_layer!r} not found in {where}; available layers: "
                f"{sorted(rna.layers)} (use rna_layer=None for its .X)."
            )
        for key, name in ((labels_key, "labels_key"), (batch_key, "batch_key")):
            mod = modalities[name]
            obs = mdata.obs if mod is None else mdata.mod[mod].obs
            obs_where = "mdata.obs" if mod is None else f"mdata.mod[{mod!r}].obs"
            if key is not None and key not in obs:
                raise KeyError(
                    f"{name}={key!r} is not a column of {obs_where}; available columns: "
                    f"{list(obs.columns)}."
                )
        counts = rna.layers[rna_layer] if rna_layer is not None else rna.X
        _check_counts(counts, f"{where}.layers[{rna_layer!r}]" if rna_layer else f"{where}.X")
        fields = [
            MuDataLayerField(
                KEYS.X_KEY,
                rna_layer,
                mod_key=modalities.rna_layer,
                is_count_data=True,
                mod_required=True,
            ),
            MuDataCategoricalObsField(KEYS.BATCH_KEY, batch_key, mod_key=modalities.batch_key),
        ]
        if labels_key is None:
            fields.append(MuDataCategoricalObsField(KEYS.LABELS_KEY, None))
        else:
            fields.append(
                MuDataLabelsWithMissingObsField(
                    KEYS.LABELS_KEY, labels_key, unlabeled_category, mod_key=modalities.labels_key
                )
            )
        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        manager.register_fields(mdata, **kwargs)
        cls.register_manager(manager)

    # -- helpers -----------------------------------------------------------------------------
    def _validate_anndata(self, adata: AnnData | None = None, copy_if_view: bool = True):
        """Like scvi-tools', but a query keeps its own registration and needs no labels.

        Genes are matched through the vocabulary, so a query registered with
        :meth:`setup_anndata` may hold its genes in another order or a subset of them (the
        transfer of the training setup by scvi-tools would reject a different gene count). A
        query without the label (or regression target) column is registered label-free:
        scvi-tools would otherwise fail on the missing column; a query only needs counts to
        be embedded or predicted. Missing labels (NaN) of a query are read as unlabelled.
        """
        keys = [self._setup_arg("labels_key"), self._setup_arg("target_key")]
        if adata is not None and self.get_anndata_manager(adata) is None:
            if adata.is_view and copy_if_view:
                adata = adata.copy()
            manager = self._get_most_recent_anndata_manager(adata)
            absent = [k for k in keys if k is not None and k not in adata.obs]
            if manager is None and absent:
                # not set up by the user: use the model's setup minus labels and target
                skip = {"labels_key", "unlabeled_category", "target_key"}
                args = self.adata_manager.registry["setup_args"]
                type(self).setup_anndata(adata, **{k: v for k, v in args.items() if k not in skip})
                manager = self._get_most_recent_anndata_manager(adata, required=True)
                logger.info(f"Registered the query AnnData without labels ({absent[0]!r} absent).")
            if manager is not None:
                self._register_manager_for_instance(manager)
        return super()._validate_anndata(adata, copy_if_view=copy_if_view)

    def _setup_arg(self, name: str) -> Any:
        return self.adata_manager.registry["setup_args"].get(name)

    def _registered_class_names(self) -> list[str]:
        if self._setup_arg("labels_key") is None:
            return []
        state = self.adata_manager.get_state_registry(KEYS.LABELS_KEY)
        unlabeled = state.unlabeled_category
        return [str(c) for c in state.categorical_mapping if c != unlabeled]

    def _has_regression_target(self) -> bool:
        return self._setup_arg("target_key") is not None

    def _counts(self, adata: AnnData):
        layer = self._setup_arg("layer")
        return adata.layers[layer] if layer is not None else adata.X

    def _fitting_counts(self, adata: AnnData, what: str):
        """The registered counts in memory, for fitting the vocabulary's statistics.

        A backed matrix is not loaded whole: up to :data:`BACKED_FIT_CELLS` cells (a seeded
        sample, all of them when there are no more) are read from the file a block at a time.
        """
        counts = self._counts(adata)
        if not is_backed(counts):
            return counts
        rows, sample = read_row_sample(counts, BACKED_FIT_CELLS, seed=0)
        if len(rows) < adata.n_obs:
            logger.info(
                f"{what} on {len(rows):,} of the {adata.n_obs:,} cells of the backed file "
                f"'{adata.filename}' (a seeded sample)."
            )
        return sample

    def _resolve_vocab(self, vocab: VocabLike) -> GeneVocab:
        if isinstance(vocab, dict):
            return GeneVocab.from_dict(vocab)
        if isinstance(vocab, GeneVocab):
            resolved = vocab
        elif vocab is None:
            resolved = self._vocab_from_data()
        elif vocab in GeneVocab.available_names():
            resolved = GeneVocab.from_name(vocab)
        else:
            resolved = GeneVocab.from_file(vocab)
        # checked for every vocabulary, pretrained ones included: too few matching genes fail here
        match = resolved.match(self.adata, **self._match_kwargs(resolved))
        if resolved.gene_medians is None:
            logger.info(f"Fitting per-gene medians on {self.adata.n_obs} cells.")
            resolved = fit_gene_medians(
                self._fitting_counts(self.adata, "Per-gene medians are fitted"),
                match.vocab_ids,
                resolved,
                target_sum=self.preprocessing.target_sum,
            )
        return resolved

    def _vocab_from_data(self) -> GeneVocab:
        adata = self.adata
        gene_key = self._setup_arg("gene_key")
        n_top = self.preprocessing.n_top_genes
        if n_top is not None and n_top < adata.n_vars:
            import scanpy as sc

            counts = self._fitting_counts(adata, "Highly variable genes are selected")
            view = AnnData(X=counts.copy(), var=adata.var[[]].copy())
            view.var_names = adata.var_names
            sc.pp.normalize_total(view, target_sum=self.preprocessing.target_sum)
            sc.pp.log1p(view)
            hvg = sc.pp.highly_variable_genes(view, n_top_genes=n_top, inplace=False)
            adata = adata[:, hvg["highly_variable"].to_numpy()]
        return GeneVocab.from_adata(adata, gene_key=gene_key)

    def gene_match(self, adata: AnnData | None = None):
        """How the genes of ``adata`` map onto the model's vocabulary (coverage report)."""
        adata = self._validate_anndata(adata)
        return self.vocab.match(adata, **self._match_kwargs())

    def _match_kwargs(self, vocab: GeneVocab | None = None) -> dict[str, Any]:
        """How data genes are matched: a vocabulary of selected (HVG) genes, exactly
        ``n_top_genes`` of them, is checked by the share of its genes found in the data; any
        other (a named one, or all genes of a dataset with fewer than ``n_top_genes``) by the
        share of the data's genes."""
        vocab = self.vocab if vocab is None else vocab
        n_top = self.preprocessing.n_top_genes
        selected = bool(n_top) and len(vocab) - vocab.n_special == n_top
        return {
            "gene_key": self._setup_arg("gene_key"),
            "min_coverage": self.min_coverage,
            "coverage_of": "vocab" if selected else "data",
        }

    def _collator(self, adata: AnnData) -> TokenCollator:
        return TokenCollator(self.tokenizer, self.gene_match(adata).vocab_ids, KEYS.X_KEY)

    def _token_lengths(self, adata: AnnData, indices=None) -> np.ndarray:
        """Tokens per cell (``<cls>`` included) that the tokenizer will emit."""
        counts = self._counts(adata)
        if indices is not None:
            counts = counts[np.asarray(indices)]
        return token_lengths(
            counts,
            self.gene_match(adata).vocab_ids,
            self.tokenizer.max_genes,
            int(self.tokenizer.prepend_cls),
        )

    def _loader(self, adata: AnnData, indices=None, batch_size: int | None = None):
        return self._make_data_loader(
            adata=adata,
            indices=indices,
            batch_size=batch_size or 64,
            shuffle=False,
            load_sparse_tensor=True,
            collate_fn=self._collator(adata),
        )

    def _apply_lora(self, settings: LoraSettings) -> None:
        apply_lora(self.module.backbone, settings)
        self.lora_ = settings.to_dict() if hasattr(settings, "to_dict") else vars(settings)
        self.init_params_ = getattr(self, "init_params_", None)
        if self.init_params_ is not None:
            self.init_params_["non_kwargs"]["lora"] = dict(self.lora_)

    # -- training ----------------------------------------------------------------------------
    def train(
        self,
        max_epochs: int | None = None,
        *,
        objective: Literal["pretrain", "classify", "regress"] | None = None,
        strategy: Literal["full", "frozen", "gradual_unfreeze", "lora"] = "full",
        batch_size: int = 32,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        backbone_lr: float | None = None,
        head_lr: float | None = None,
        class_weights: Literal["balanced", "sqrt"] | Sequence[float] | None = "balanced",
        token_dropout: float = 0.0,
        freeze_backbone_epochs: int = 0,
        lora: LoraSettings | dict | None = None,
        masking: MaskingConfig | dict | None = None,
        train_size: float = 0.9,
        validation_size: float | None = None,
        precision: str | int = 32,
        gradient_clip: float | None = 1.0,
        early_stopping: bool = False,
        patience: int = 5,
        monitor: str | None = None,
        checkpoint_dir: str | None = None,
        seed: int = 0,
        accelerator: str = "auto",
        devices: int | str = "auto",
        num_workers: int = 0,
        group_by_length: bool = True,
        data: StreamedCells | str | Sequence[str] | None = None,
        distributed: str = "auto",
        num_nodes: int = 1,
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
        lr
            Peak learning rate (pretraining; default for ``backbone_lr`` and ``head_lr``).
        weight_decay
            AdamW weight decay on >= 2-D weights (not biases, norms or embeddings).
        warmup_steps, min_lr_ratio
            Linear warmup, then cosine decay to ``min_lr_ratio * lr`` at the last step.
            ``warmup_steps=None``: 50 steps, or a tenth of the run when that is shorter.
        backbone_lr, head_lr
            Discriminative learning rates for fine-tuning.
        class_weights
            Per-class weights of the classification loss: ``"balanced"`` (inverse class
            frequency of the training cells, mean 1 over cells), ``"sqrt"`` (its square
            root: a milder push towards small classes), one weight per class in
            ``model.class_names_`` order, or ``None`` (plain cross-entropy). The default,
            ``"balanced"``, lifts macro-F1 on small classes (``docs/benchmarks_annotation.md``);
            cells streamed with ``data=`` have no label counts and train unweighted unless
            given one weight per class.
        token_dropout
            Fine-tuning augmentation: the fraction of each training cell's gene tokens hidden
            at random in every step (never in validation or inference; ignored when
            pretraining, whose masking plays that part).
        freeze_backbone_epochs
            Epochs with a frozen backbone for ``strategy="gradual_unfreeze"``.
        lora
            LoRA settings for ``strategy="lora"`` (default: rank 8 on every attention
            projection and both feed-forward linears).
        masking
            Masking of the pretraining objective.
        train_size, validation_size
            Fractions of cells for training and validation (the rest is a test set, never
            used for training or model selection). Splits are stratified by label when
            fine-tuning a classifier.
        precision
            Lightning precision, e.g. ``32`` or ``"bf16-mixed"`` on a GPU.
        gradient_clip
            Gradient-norm clipping value (``None``: off).
        early_stopping, patience
            Stop when ``monitor`` has not improved for ``patience`` epochs.
        monitor
            Validation metric that picks the epoch whose weights are kept (and drives early
            stopping): ``"val_acc"`` (highest; of equal values the later epoch) when
            classifying, else ``"val_loss"`` (lowest). Any logged metric works; names ending
            in ``loss`` or ``perplexity`` are minimised, others maximised.
        checkpoint_dir
            Write resumable ``best.ckpt`` and ``last.ckpt`` there (atomically).
        seed
            Seeds the split, the initialisation of new layers' data order, and the masks.
        accelerator, devices
            Lightning hardware selection.
        num_workers
            Data-loader worker processes (tokenisation runs there).
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
        num_nodes
            Machines taking part (with ``devices`` processes each).
        **trainer_kwargs
            Passed to the Lightning trainer.

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
        if strategy not in STRATEGIES:
            raise ValueError(f"Unknown strategy {strategy!r}; choose one of {STRATEGIES}.")
        if not 0.0 <= token_dropout < 1.0:
            raise ScForgeValueError(
                f"token_dropout={token_dropout!r} must lie in [0, 1): it is the fraction of a "
                "cell's gene tokens hidden in each fine-tuning step."
            )
        if objective == "classify" and self._setup_arg("labels_key") is None:
            raise ValueError(
                "objective='classify' needs labels: call "
                "ScForge.setup_anndata(adata, labels_key=...) before creating the model."
            )
        scvi.settings.seed = seed
        seed_everything(seed, workers=True, verbose=False)
        callbacks = [EpochSeed(seed), *trainer_kwargs.pop("callbacks", [])]
        if monitor is None:
            monitor = "val_acc" if objective == "classify" else "val_loss"
        mode = "min" if monitor.endswith(("loss", "perplexity")) else "max"
        best = BestCheckpoint(monitor=monitor, dirpath=checkpoint_dir, mode=mode)
        callbacks.append(best)
        if early_stopping:
            callbacks.append(EarlyStopping(monitor=monitor, patience=patience, mode=mode))
        self._configure_strategy(objective, strategy, freeze_backbone_epochs, lora, callbacks)
        if distributed != "auto" and data is None:
            data = self._backed_cells(distributed)  # a backed AnnData's file, or an error
        if distributed != "auto" and strategy == "gradual_unfreeze" and freeze_backbone_epochs:
            raise ValueError(
                f"strategy='gradual_unfreeze' cannot be combined with distributed="
                f"{distributed!r}: parameters frozen when the processes start are never "
                "synchronised after unfreezing. Use 'full', 'frozen' or 'lora'."
            )

        if data is not None:
            splitter, (train_idx, val_idx, test_idx) = self._streamed_data(
                data, objective, train_size, validation_size, seed, batch_size, num_workers
            )
            callbacks.append(StreamEpoch())
            trainer_kwargs.setdefault("use_distributed_sampler", False)
        else:
            train_idx, val_idx, test_idx = self._split(train_size, validation_size, seed, objective)
            common = {
                "batch_size": batch_size,
                "external_indexing": [train_idx, val_idx, test_idx],
                "collate_fn": self._collator(self.adata),
                "num_workers": num_workers,
            }
            if group_by_length and not self.adata.isbacked:  # lengths would read all of X
                lengths = self._token_lengths(self.adata)
                splitter = LengthGroupedDataSplitter(self.adata_manager, lengths=lengths, **common)
            else:
                splitter = self._data_splitter_cls(
                    self.adata_manager, load_sparse_tensor=True, **common
                )
        if max_epochs is None:
            max_epochs = default_max_epochs(objective, len(train_idx), batch_size)
            logger.info(f"max_epochs={max_epochs} ({objective}, {len(train_idx)} training cells).")
        if isinstance(masking, dict):
            masking = MaskingConfig(**masking)
        weights = None
        if objective == "classify" and class_weights is not None:
            if data is not None and isinstance(class_weights, str):
                logger.info(
                    f"class_weights={class_weights!r} counts the registered training labels; "
                    "streamed cells train with plain cross-entropy (pass one weight per class "
                    "to weight them)."
                )
            else:
                weights = self._class_weights(class_weights, train_idx)
        plan = self._training_plan_cls(
            self.module,
            objective=objective,
            lr=lr,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            min_lr_ratio=min_lr_ratio,
            masking=masking,
            backbone_lr=backbone_lr,
            head_lr=head_lr,
            seed=seed,
            class_weights=weights,
            token_dropout=token_dropout,
            checkpoint_metadata={"config": self.pretrained_config(), "vocab": self.vocab.to_dict()},
        )
        trainable, total = count_parameters(self.module)
        logger.info(
            f"Training ({objective}, strategy={strategy}): {trainable:,} of {total:,} "
            f"parameters trainable; {len(train_idx)} training, {len(val_idx)} validation, "
            f"{len(test_idx)} held-out test cells."
        )
        runner = self._train_runner_cls(
            self,
            training_plan=plan,
            data_splitter=splitter,
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            callbacks=callbacks,
            check_val_every_n_epoch=1,
            gradient_clip_val=gradient_clip,
            precision=precision,
            strategy=distributed,
            num_nodes=num_nodes,
            **trainer_kwargs,
        )
        if accelerator == "cpu" or not torch.cuda.is_available():
            tune_cpu_allocator()  # large activations reuse heap pages instead of faulting
        self.module.train()  # Lightning keeps a module's mode; from_pretrained leaves it eval
        runner()
        self.train_indices_, self.validation_indices_, self.test_indices_ = (
            train_idx,
            val_idx,
            test_idx,
        )
        self.best_epoch_ = best.best_epoch
        self.module.eval()

    def _class_weights(self, how, train_idx) -> torch.Tensor:
        """Loss weight of each class (``model.class_names_`` order)."""
        n_classes = len(self.class_names_)
        if not isinstance(how, str):
            weights = torch.as_tensor(np.asarray(how, dtype=np.float32))
            if weights.shape != (n_classes,):
                raise ValueError(
                    f"class_weights needs {n_classes} values (one per class of "
                    f"model.class_names_), got shape {tuple(weights.shape)}."
                )
            return weights
        if how not in ("balanced", "sqrt"):
            raise ValueError(
                f"class_weights={how!r}: use 'balanced', 'sqrt', a list of weights or None."
            )
        codes = self.adata_manager.get_from_registry(KEYS.LABELS_KEY).ravel()[train_idx]
        counts = np.bincount(codes[codes < n_classes].astype(int), minlength=n_classes)
        freq = np.maximum(counts, 1).astype(np.float64)
        weights = freq.sum() / (n_classes * freq)
        if how == "sqrt":
            weights = np.sqrt(weights)
        weights = weights / (weights * counts).sum() * counts.sum()  # mean 1 over cells
        return torch.as_tensor(weights, dtype=torch.float32)

    def _default_objective(self) -> str:
        if self._setup_arg("labels_key") is not None:
            return "classify"
        if self._has_regression_target():
            return "regress"
        return "pretrain"

    def _configure_strategy(self, objective, strategy, freeze_epochs, lora, callbacks) -> None:
        backbone = self.module.backbone
        if objective == "pretrain" or strategy == "full":
            backbone.requires_grad_(True)
        elif strategy == "frozen":
            backbone.requires_grad_(False)
        elif strategy == "gradual_unfreeze":
            if freeze_epochs <= 0:
                warnings.warn(
                    "strategy='gradual_unfreeze' with freeze_backbone_epochs=0 trains the "
                    "backbone from the start (same as 'full').",
                    UserWarning,
                    stacklevel=3,
                )
            backbone.requires_grad_(freeze_epochs <= 0)
            callbacks.append(GradualUnfreezing(freeze_epochs))
        elif strategy == "lora":
            if freeze_epochs:
                warnings.warn(
                    "freeze_backbone_epochs is ignored with strategy='lora': the backbone "
                    "stays frozen and only the adapters and the head train.",
                    UserWarning,
                    stacklevel=3,
                )
            if self.lora_ is None:
                settings = lora if isinstance(lora, LoraSettings) else LoraSettings(**(lora or {}))
                self._apply_lora(settings)
        # heads of the objective train; the others are frozen, so that no parameter that
        # requires a gradient goes without one (DDP refuses that)
        pretraining = [m for m in (self.module.gene_head, self.module.expression_head) if m]
        for head in pretraining:
            head.requires_grad_(objective == "pretrain")
        for head in self.module.heads:
            head.requires_grad_(objective != "pretrain")
        self._check_no_frozen_new_parameters(strategy)

    def _check_no_frozen_new_parameters(self, strategy: str) -> None:
        """A parameter that was newly initialised (not loaded) must not stay frozen."""
        report = getattr(self, "load_report_", None)
        if report is None or strategy in ("full", "gradual_unfreeze"):
            return
        params = dict(self.module.backbone.named_parameters(prefix="backbone"))
        frozen_new = [k for k in report.initialised if k in params and not params[k].requires_grad]
        if frozen_new:
            raise ValueError(
                f"strategy={strategy!r} would freeze {len(frozen_new)} parameters that were not "
                f"in the checkpoint and are still random (e.g. {frozen_new[:3]}); load a "
                "checkpoint with these weights or use strategy='full'."
            )

    def _split(self, train_size, validation_size, seed, objective):
        """Seeded train/validation/test split, stratified by label for classification."""
        from sklearn.model_selection import train_test_split

        n = self.adata.n_obs
        validation_size = 1.0 - train_size if validation_size is None else validation_size
        if (
            not 0 < train_size < 1
            or validation_size <= 0
            or train_size + validation_size > 1 + 1e-9
        ):
            raise ValueError(
                f"Need 0 < train_size < 1, validation_size > 0 and train_size + validation_size "
                f"<= 1; got train_size={train_size}, validation_size={validation_size}."
            )
        idx = np.arange(n)
        strata = None
        if objective == "classify":
            strata = self._labels_for_split()
        test_size = 1.0 - train_size - validation_size
        rest, test = (idx, np.array([], dtype=int))
        if test_size > 1e-9:
            rest, test = train_test_split(
                idx,
                test_size=test_size,
                random_state=seed,
                stratify=None if strata is None else strata,
            )
        val_frac = validation_size / (train_size + validation_size)
        sub_strata = None if strata is None else strata[rest]
        train, val = train_test_split(
            rest, test_size=val_frac, random_state=seed + 1, stratify=sub_strata
        )
        return np.sort(train), np.sort(val), np.sort(test)

    def _streamed_data(
        self, data, objective, train_size, validation_size, seed, batch_size, num_workers
    ) -> tuple[StreamedDataModule, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Training/validation streams over ``data``, tokenised like the in-memory path."""
        cells = data if isinstance(data, StreamedCells) else StreamedCells(data)
        if objective == "regress":
            raise ValueError(
                "Regression fine-tuning reads its target from the registered AnnData; "
                "streamed data supports objective='pretrain' and 'classify'."
            )
        validation_size = 1.0 - train_size if validation_size is None else validation_size
        split = split_cells(cells.n_obs, train_size, validation_size, seed)
        labels = self._streamed_labels(cells) if objective == "classify" else None
        common = {
            "columns": self._streamed_columns(cells),
            "n_columns": len(self.vocab) + 1,
            "collate": self._streamed_collator(),
            "batch_size": batch_size,
            "seed": seed,
            "labels": labels,
            "labels_key": KEYS.LABELS_KEY,
            "count_key": KEYS.X_KEY,
        }
        train = CellStream(cells, split[0], shuffle=True, **common)
        val = CellStream(cells, split[1], shuffle=False, **common) if len(split[1]) else None
        return StreamedDataModule(train, val, num_workers=num_workers), split

    def _backed_cells(self, distributed: str) -> StreamedCells:
        """The file of a backed AnnData as streamed cells, for multi-process training.

        Every process reads its share of each batch from the file itself, exactly as with
        ``data=StreamedCells(adata.filename)``. An in-memory AnnData cannot be shared so.
        """
        adata = self.adata
        if not (adata.isbacked and adata.filename is not None and not adata.is_view):
            raise ScForgeValueError(
                f"distributed={distributed!r} needs streamed cells: pass "
                "data=StreamedCells(...) (or .h5ad/.zarr paths), or register a backed AnnData "
                "(anndata.read_h5ad(path, backed='r')), so that each process reads its share "
                "of every batch from disk; this AnnData is in memory."
            )
        layer = self._setup_arg("layer")
        logger.info(
            f"distributed={distributed!r}: streaming the cells of the backed file "
            f"'{adata.filename}' ({'X' if layer is None else f'layers[{layer!r}]'})."
        )
        return StreamedCells(adata.filename, layer=layer)

    def _streamed_columns(self, cells: StreamedCells) -> list[np.ndarray]:
        """Per shard, each gene's vocabulary id; genes outside it share the last column."""
        unknown = len(self.vocab)
        return [
            np.where(ids >= 0, ids, unknown)
            for ids in cells.match(self.vocab, **self._match_kwargs())
        ]

    def _streamed_collator(self) -> TokenCollator:
        # columns are vocabulary ids, plus one for genes outside the vocabulary: they count
        # towards the library size, as in the in-memory path, but are never tokens
        gene_index = np.append(np.arange(len(self.vocab)), -1)
        return TokenCollator(self.tokenizer, gene_index, KEYS.X_KEY)

    def _streamed_labels(self, cells: StreamedCells) -> np.ndarray:
        """Label codes of every streamed cell; missing or unlabelled ones are left out."""
        key = self._setup_arg("labels_key")
        names = self._registered_class_names()
        labels = cells.labels(key)
        codes = pd.Categorical(labels.astype("string"), categories=names).codes.astype(np.int64)
        state = self.adata_manager.get_state_registry(KEYS.LABELS_KEY)
        unlabelled = labels.isna().to_numpy() | (labels.astype(str) == state.unlabeled_category)
        unknown = (codes < 0) & ~unlabelled
        if unknown.any():
            shard = cells.shards[int(cells._locate(np.flatnonzero(unknown)[:1])[0])]
            new = sorted(set(labels[unknown].astype(str)))[:5]
            raise ValueError(
                f"obs['{key}'] of '{shard.path}' holds labels the model does not know: {new}; "
                f"its classes are {names}."
            )
        codes[codes < 0] = len(names)  # excluded from the loss, like unlabelled cells
        return codes

    def _labels_for_split(self) -> np.ndarray | None:
        """Strata of the split: one per class, and one of the unlabelled cells.

        Unlabelled cells (the unlabelled category or a missing label) share the code after
        the last class, so they spread over the splits in proportion like any class.
        """
        codes = self.adata_manager.get_from_registry(KEYS.LABELS_KEY).ravel()
        strata = pd.Series(codes).astype(str).to_numpy()
        counts = pd.Series(strata).value_counts()
        rare = counts[counts < 3].index
        names = [self._label_name(int(c)) for c in rare if int(c) < len(self.class_names_)]
        if names:
            warnings.warn(
                f"Classes with fewer than 3 cells are kept out of stratification: {names}.",
                UserWarning,
                stacklevel=4,
            )
        if len(rare):
            strata = np.where(np.isin(strata, rare), "__rare__", strata)
            if (strata == "__rare__").sum() < 3:
                strata[strata == "__rare__"] = counts.index[0]
        return strata

    def _label_name(self, code: int) -> str:
        return self.class_names_[code] if code < len(self.class_names_) else "unlabelled"

    # -- inference ---------------------------------------------------------------------------
    @torch.inference_mode()
    def _infer(self, adata, indices, batch_size, fn) -> torch.Tensor:
        """``fn(inference outputs)`` of every requested cell, stacked in the cells' order.

        In-memory cells are run longest first, so that minibatches carry almost no padding,
        and put back in order afterwards; streamed cells come in shard order.
        """
        self.module.eval()
        if self.device.type == "cpu":
            tune_cpu_allocator()
        batch_size = batch_size or 64
        order = None
        if isinstance(adata, StreamedCells):
            ids = np.arange(adata.n_obs) if indices is None else np.sort(np.asarray(indices))
            loader = CellStream(
                adata,
                ids,
                columns=self._streamed_columns(adata),
                n_columns=len(self.vocab) + 1,
                collate=self._streamed_collator(),
                batch_size=batch_size,
                shuffle=False,
                count_key=KEYS.X_KEY,
            )
        else:
            ids = np.arange(adata.n_obs) if indices is None else np.asarray(indices)
            if adata.isbacked:  # scvi-tools reads the rows of a backed file in ascending order
                order = np.argsort(ids, kind="stable")
            else:
                # all cells: no copy of the counts; a subset: only its rows are read
                lengths = self._token_lengths(adata, None if indices is None else ids)
                order = np.argsort(-lengths, kind="stable")
            ids = ids[order]
            loader = self._loader(adata, ids, batch_size)
        outputs = []
        for tensors in loader:
            tokens = {k: v.to(self.device) for k, v in tensors.items()}
            out = self.module.inference(**self.module._get_inference_input(tokens))
            outputs.append(fn(out).float().cpu())
        result = torch.cat(outputs)
        if order is not None:
            result[torch.from_numpy(order)] = result.clone()
        return result

    def get_latent_representation(
        self,
        adata: AnnData | StreamedCells | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Cell embeddings (pooled backbone output), ``(n_cells, hidden_dim)``.

        Parameters
        ----------
        adata
            AnnData with the same setup (``None``: the model's). Its genes may be in any order
            or a subset: they are mapped through the model's vocabulary. A
            :class:`~scforge_scvi.data.StreamedCells` is read from disk in chunks; rows come
            back in shard order.
        indices
            Cells to embed (default all).
        batch_size
            Minibatch size (default 64).
        """
        if not isinstance(adata, StreamedCells):
            adata = self._validate_anndata(adata)
        return self._infer(adata, indices, batch_size, lambda out: out["embedding"]).numpy()

    def embed(
        self,
        adata: AnnData | None = None,
        *,
        key_added: str = OUT.EMBEDDING,
        batch_size: int | None = None,
    ) -> None:
        """Write cell embeddings into ``adata.obsm[key_added]`` (default ``"X_scforge"``).

        Then ``sc.pp.neighbors(adata, use_rep="X_scforge")`` and ``sc.tl.umap(adata)`` work
        as usual. Parameters are recorded in ``adata.uns["scforge"]["embed"]``.
        """
        adata = self._validate_anndata(adata)
        adata.obsm[key_added] = self.get_latent_representation(adata, batch_size=batch_size)
        self._record(adata, "embed", key_added=key_added)
        logger.info(f"Added adata.obsm[{key_added!r}] ({adata.obsm[key_added].shape[1]} dims).")

    def _record(self, adata: AnnData, what: str, **params: Any) -> None:
        uns = adata.uns.setdefault(OUT.UNS, {})
        uns[what] = {"params": {**params, "tokenizer": self.tokenizer.strategy}}

    # -- prediction --------------------------------------------------------------------------
    def predict(
        self,
        adata: AnnData | None = None,
        *,
        key_added: str = OUT.PREDICTION,
        batch_size: int | None = None,
        return_probabilities: bool = False,
    ) -> pd.DataFrame | None:
        """Predict labels (or regression targets) and write them into ``adata``.

        Sets ``adata.obs[key_added]`` (the predicted class, categorical),
        ``adata.obs["scforge_confidence"]`` (its probability) and
        ``adata.obsm["scforge_probabilities"]`` (all class probabilities, columns in
        ``model.class_names_`` order). With a regression head, ``adata.obs[key_added]`` holds
        the predicted value. Every cell is predicted, unlabelled ones (``unlabeled_category``
        or a missing label) included. A query AnnData needs no label column; its genes may
        be in any order or a subset (mapped through the vocabulary).

        Returns
        -------
        The probabilities as a DataFrame when ``return_probabilities`` is True.
        """
        adata = self._validate_anndata(adata)
        if self.module.classifier is None and self.module.regressor is None:
            raise ValueError(
                "This model has no task head: register labels with "
                "setup_anndata(adata, labels_key=...) and fine-tune before predicting."
            )
        head = self.module.classifier or self.module.regressor
        values = self._infer(adata, None, batch_size, lambda out: head(out["embedding"]))
        base = (
            key_added.removesuffix("_prediction")
            if key_added.endswith("_prediction")
            else key_added
        )
        if self.module.classifier is None:
            adata.obs[key_added] = values.squeeze(-1).numpy()
            self._record(adata, "predict", key_added=key_added)
            return None
        probs = torch.softmax(values, dim=-1).numpy()
        best = probs.argmax(1)
        names = np.asarray(self.class_names_)
        adata.obs[key_added] = pd.Categorical(names[best], categories=self.class_names_)
        adata.obs[f"{base}_confidence"] = probs.max(1)
        adata.obsm[f"{base}_probabilities"] = probs
        self._record(adata, "predict", key_added=key_added, class_names=list(self.class_names_))
        logger.info(
            f"Added adata.obs[{key_added!r}], adata.obs['{base}_confidence'] and "
            f"adata.obsm['{base}_probabilities']."
        )
        if return_probabilities:
            return pd.DataFrame(probs, index=adata.obs_names, columns=self.class_names_)
        return None

    def evaluate(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        baseline: bool = True,
        n_top_genes: int = 2000,
    ) -> dict:
        """Classification metrics on held-out cells, beside a logistic-regression baseline.

        Unlabelled cells (labelled ``unlabeled_category`` or with a missing label) are left
        out of the metrics.

        Parameters
        ----------
        adata
            AnnData with the model's setup (default: the training AnnData).
        indices
            Cells to score (default: the test split of the last :meth:`train`, never used
            for training or model selection).
        baseline
            Also fit a logistic regression on log-normalised expression of ``n_top_genes``
            HVGs (chosen on its training cells) and score it on the same cells. It fits on
            the model's training and validation cells, so it needs the training AnnData and
            a model trained in this session.
        n_top_genes
            HVGs of the baseline.

        Returns
        -------
        ``accuracy``, ``macro_f1``, ``weighted_f1``, ``per_class_f1`` (dict), ``support``
        (dict, cells per class), ``n_cells``, the ``confusion`` matrix (DataFrame, rows
        true, columns predicted) and, with ``baseline``, ``baseline_logreg`` (the same
        scores of the logistic regression) and ``relative_macro_f1`` (model / baseline).
        """
        from sklearn.metrics import confusion_matrix

        from scforge_scvi.bench import classification_scores, logreg_on_cells

        own_data = adata is None or adata is self.adata
        adata = self._validate_anndata(adata)
        if indices is None:
            indices = getattr(self, "test_indices_", None)
            if indices is None or len(indices) == 0:
                raise ValueError(
                    "No held-out test cells: train with train_size + validation_size < 1, or "
                    "pass indices=..."
                )
        indices = np.asarray(indices)
        labels_key = self._setup_arg("labels_key")
        if labels_key is None or labels_key not in adata.obs:
            raise ValueError(
                "evaluate() compares predictions with labels: register them with "
                "setup_anndata(adata, labels_key=...)."
            )
        column = adata.obs[labels_key]
        all_truth = column.astype(str).to_numpy()
        labelled = column.notna().to_numpy() & np.isin(all_truth, self.class_names_)
        # unlabelled cells (the unlabelled category or a missing label) are not scored
        keep = labelled[indices]
        scored = indices[keep]
        sub = adata[scored]
        sub = sub.to_memory() if sub.isbacked else sub.copy()
        probs = self.predict(sub, return_probabilities=True)
        pred = np.asarray(self.class_names_)[probs.to_numpy().argmax(1)]
        truth = all_truth[scored]
        labels = list(self.class_names_)
        result = classification_scores(truth, pred, labels, per_class=True)
        result["confusion"] = pd.DataFrame(
            confusion_matrix(truth, pred, labels=labels), index=labels, columns=labels
        )
        fitted = np.concatenate(
            [getattr(self, "train_indices_", []), getattr(self, "validation_indices_", [])]
        ).astype(int)
        if baseline and own_data and len(fitted):
            fitted = fitted[labelled[fitted] & ~np.isin(fitted, scored)]
            counts, truth_of, fit_at, score_at = self._counts(adata), all_truth, fitted, scored
            if adata.isbacked:  # read only the rows the baseline uses
                rows = np.union1d(fitted, scored)
                counts, truth_of = counts[rows], all_truth[rows]
                fit_at, score_at = np.searchsorted(rows, fitted), np.searchsorted(rows, scored)
            reference = logreg_on_cells(
                counts,
                truth_of,
                fit_at,
                score_at,
                n_top_genes=n_top_genes,
                target_sum=self.preprocessing.target_sum,
                class_names=labels,
            )
            result["baseline_logreg"] = reference
            result["relative_macro_f1"] = (
                result["macro_f1"] / reference["macro_f1"] if reference["macro_f1"] else np.nan
            )
            logger.info(
                f"Test macro-F1 {result['macro_f1']:.3f} (accuracy {result['accuracy']:.3f}) on "
                f"{len(scored)} cells; logistic regression on {reference['n_genes']} HVGs, "
                f"fitted on the same training cells: {reference['macro_f1']:.3f} "
                f"(accuracy {reference['accuracy']:.3f}); ratio "
                f"{result['relative_macro_f1']:.3f}."
            )
        elif baseline:
            logger.info(
                f"Test macro-F1 {result['macro_f1']:.3f} on {len(scored)} cells (no "
                "logistic-regression baseline: it needs the training AnnData of this session)."
            )
        return result

    # -- pretrained directories --------------------------------------------------------------
    def pretrained_config(self) -> dict[str, Any]:
        """The JSON-serialisable description of this model (``config.json``)."""
        from scforge_scvi import __version__

        params = dict(self.init_params_["non_kwargs"])
        for key in ("vocab", "lora", "class_names"):  # stored on their own below
            params.pop(key, None)
        return {
            "model_class": type(self).__name__,
            "scforge_version": __version__,
            "init_params": params,
            "backbone": self.backbone_config.to_dict(),
            "tokenizer": self.tokenizer.to_dict(),
            "preprocessing": self.preprocessing.to_dict(),
            "class_names": list(self.class_names_),
            "labels_key": self._setup_arg("labels_key"),
        }

    def save_pretrained(self, path: str, *, overwrite: bool = True) -> None:
        """Save ``config.json``, ``model.safetensors`` and ``gene_vocab.json`` to ``path``.

        LoRA adapters, if any, are merged into the saved weights, so the directory loads as
        a plain model. The write is atomic: an interrupted save leaves a previous model at
        ``path`` intact.
        """
        from scforge_scvi.io import write_pretrained

        write_pretrained(
            path,
            self.pretrained_config(),
            self.vocab,
            self._merged_state_dict(),
            overwrite=overwrite,
        )
        logger.info(f"Saved pretrained model to {path}.")

    def _merged_state_dict(self) -> dict[str, torch.Tensor]:
        if self.lora_ is None:
            return self.module.state_dict()
        import copy

        from scforge_scvi.train import merge_lora

        module = copy.deepcopy(self.module)
        merge_lora(module.backbone)
        return module.state_dict()

    # -- LoRA adapters -----------------------------------------------------------------------
    def _adapter_state_dict(self) -> dict[str, torch.Tensor]:
        from scforge_scvi.train import lora_state_dict

        state = {f"backbone.{k}": v for k, v in lora_state_dict(self.module.backbone).items()}
        for name in ("classifier", "regressor"):
            head = getattr(self.module, name)
            if head is not None:
                state.update({f"{name}.{k}": v.detach() for k, v in head.state_dict().items()})
        return state

    def save_adapter(self, path: str, *, overwrite: bool = True) -> int:
        """Save the LoRA adapters and the task head to the directory ``path``.

        Writes ``adapter_config.json`` (LoRA settings, class names, labels key) and
        ``adapter_model.safetensors`` (adapter and head weights only: a small fraction of
        the full model). The base model is not saved; load it with :meth:`from_pretrained`,
        then call :meth:`load_adapter`. The write is atomic.

        Returns
        -------
        Size of ``adapter_model.safetensors`` in bytes.
        """
        import json
        from pathlib import Path

        from safetensors.torch import save_file

        from scforge_scvi.io._pretrained import atomic_directory

        if self.lora_ is None:
            raise ScForgeValueError(
                "This model has no LoRA adapters; train with strategy='lora' first "
                "(or use save_pretrained for the full model)."
            )
        path = Path(path)
        config = {
            "lora": dict(self.lora_),
            "class_names": list(self.class_names_),
            "labels_key": self._setup_arg("labels_key"),
            "backbone": self.backbone_config.to_dict(),
        }
        with atomic_directory(path, overwrite=overwrite) as tmp:
            (tmp / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2))
            tensors = {k: v.cpu().contiguous() for k, v in self._adapter_state_dict().items()}
            save_file(tensors, str(tmp / ADAPTER_WEIGHTS_NAME))
        size = (path / ADAPTER_WEIGHTS_NAME).stat().st_size
        logger.info(f"Saved LoRA adapters and task head to {path} ({size / 1e6:.2f} MB).")
        return size

    def load_adapter(self, path: str) -> None:
        """Load adapters and task head saved by :meth:`save_adapter` onto this (base) model.

        The model must have been built on the same base weights (e.g. with
        :meth:`from_pretrained` of the base directory) and for the same class names.
        """
        import json

        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from scforge_scvi.io._pretrained import resolve_directory
        from scforge_scvi.train import load_lora_state_dict

        path = resolve_directory(path)
        config_file = path / ADAPTER_CONFIG_NAME
        if not config_file.is_file() or not (path / ADAPTER_WEIGHTS_NAME).is_file():
            raise ScForgeFileNotFoundError(
                f"'{path}' is not an adapter directory: it needs {ADAPTER_CONFIG_NAME} and "
                f"{ADAPTER_WEIGHTS_NAME} (written by save_adapter)."
            )
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ScForgeValueError(
                f"{config_file} is not valid JSON ({one_line(err)}); the directory is "
                "truncated or was not written by save_adapter."
            ) from None
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
        try:
            state = load_file(str(path / ADAPTER_WEIGHTS_NAME))
        except (SafetensorError, OSError, ValueError) as err:
            raise ScForgeValueError(
                f"{path / ADAPTER_WEIGHTS_NAME} is truncated or corrupt and cannot be read "
                f"({one_line(err)}); nothing was loaded."
            ) from None
        prefix = "backbone."
        load_lora_state_dict(
            self.module.backbone,
            {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)},
        )
        heads = {k: v for k, v in state.items() if not k.startswith(prefix)}
        expected = {
            k for k in self.module.state_dict() if k.startswith(("classifier.", "regressor."))
        }
        if set(heads) != expected:
            raise KeyError(
                f"Adapter head weights do not match the model: missing "
                f"{sorted(expected - set(heads))}, unexpected {sorted(set(heads) - expected)}."
            )
        self.module.load_state_dict(heads, strict=False)  # key sets were compared above
        self.module.eval()
        logger.info(f"Loaded LoRA adapters and task head from {path}.")

    @classmethod
    def from_pretrained(cls, path: str, adata: AnnData, **kwargs: Any) -> ScForge:
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
        from scforge_scvi.io import read_pretrained

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
    ) -> ScForge:
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
        from scforge_scvi.io import read_geneformer

        pretrained = read_geneformer(
            path,
            token_dictionary=token_dictionary,
            gene_median_dictionary=gene_median_dictionary,
            model_input_size=model_input_size,
            special_tokens=special_tokens,
        )
        return cls._from_pretrained_object(pretrained, adata, kwargs)

    @classmethod
    def _from_pretrained_object(cls, pretrained, adata: AnnData, kwargs: dict) -> ScForge:
        from scforge_scvi.io import check_architecture, load_weights

        params = pretrained.init_params
        saved = dict(params)  # a None that was saved stands for the value it implied
        backbone = pretrained.config.get("backbone", {})
        if saved.get("max_seq_len") is None:
            saved["max_seq_len"] = backbone.get("max_seq_len")
        if saved.get("ffn_dim") is None and backbone.get("hidden_dim"):
            saved["ffn_dim"] = backbone.get("ffn_dim") or 4 * backbone["hidden_dim"]
        check_architecture(saved, kwargs, source=f"the requested {cls.__name__} arguments")
        params.update(kwargs)
        manager = cls._get_most_recent_anndata_manager(adata, required=True)
        if manager.registry["setup_args"].get("labels_key") is None and pretrained.class_names:
            # a query without labels keeps the fine-tuned classifier and its classes
            params["class_names"] = pretrained.class_names
        model = cls(adata, vocab=pretrained.vocab, **params)
        same_labels = pretrained.class_names == model.class_names_
        skip = () if same_labels else ("classifier.", "regressor.")
        if not same_labels and pretrained.class_names and model.class_names_:
            logger.info(
                f"The checkpoint's classifier was fitted for labels {pretrained.class_names}; "
                f"this data has {model.class_names_}: a new classification head is initialised."
            )
        model.load_report_ = load_weights(model.module, pretrained.state_dict, skip_prefixes=skip)
        model.module.eval()
        return model
