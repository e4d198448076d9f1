"""`ScForge`: a single-cell transformer foundation model as an scvi-tools model class."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi.dataloaders import DataSplitter
from scvi.model.base import BaseModelClass
from scvi.train import TrainRunner

from scforge_scvi._allocator import tune_cpu_allocator
from scforge_scvi._errors import ScForgeValueError
from scforge_scvi._logging import logger
from scforge_scvi.data import (
    GeneVocab,
    Preprocessing,
    StreamedCells,
    build_tokenizer,
)
from scforge_scvi.data._bucketing import token_lengths
from scforge_scvi.data._collate import TokenCollator
from scforge_scvi.data._genes import gene_pca_loadings, match_kwargs, resolve_vocab
from scforge_scvi.data._streaming import CellStream
from scforge_scvi.nn import BackboneConfig
from scforge_scvi.train import (
    LoraSettings,
    ScForgeTrainingPlan,
    apply_lora,
)

from ._calibration import MIN_CELLS as CALIBRATION_CELLS
from ._calibration import check_fraction
from ._constants import SCFORGE_OUTPUT_KEYS as OUT
from ._constants import SCFORGE_REGISTRY_KEYS as KEYS
from ._embedding import EmbeddingMixin
from ._evaluate import evaluate_annotation
from ._fields import RegistrationMixin
from ._linear import features
from ._module import ScForgeModule
from ._pretrained import ScForgePretrainedMixin
from ._settings import Architecture, resolve_settings
from ._training import TrainingMixin

VocabLike = GeneVocab | str | dict | None
#: classifiers ``predict(head=...)`` reads
PREDICTION_HEADS = ("default", "backbone", "linear")
#: the label of cells no known type is credible for (``predict(unknown_threshold=...)``)
UNKNOWN = "unknown"


class ScForge(
    EmbeddingMixin, TrainingMixin, ScForgePretrainedMixin, RegistrationMixin, BaseModelClass
):
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
        ``preprocessing.n_top_genes`` is set), a name such as ``"human_protein_coding"``, a path to a
        vocabulary file, or a :class:`~scforge_scvi.data.GeneVocab`. Per-gene medians are
        fitted on ``adata`` when the vocabulary has none, and never refitted afterwards.
    tokenizer
        ``"binned_expression"`` (scGPT-style value bins, the default), ``"rank_value"``
        (Geneformer) or ``"continuous"``.
    max_genes
        Genes kept per cell (the highest-expressed; ``<cls>`` not counted).
    preprocessing
        How counts are normalised and how many highly variable genes the vocabulary keeps: a
        :class:`~scforge_scvi.data.Preprocessing` or a dict of some of its fields
        (``{"n_top_genes": None}`` keeps every gene); the rest keep their defaults.
    hidden_dim, num_layers, num_heads, dropout, pooling
        Transformer width, depth, attention heads and dropout. ``pooling="mean"`` averages
        the gene tokens into the cell embedding, ``"cls"`` reads ``<cls>``.
    expression_loss_weight
        Weight of the masked expression loss of the binned/continuous tokenizers.
    cell_expression_weight
        Weight of a cell-level reconstruction loss in pretraining: a linear read-out of the
        cell embedding predicts every vocabulary gene's value in the cell, masked genes
        included (for rank-value tokens: its rank, 1 for a cell's first gene and 1/T less for
        each next one, T the minibatch's padded length; 0, the default: off). It makes the
        pretrained embedding itself more informative but lowered fine-tuned annotation, so it
        is for pretraining models whose embeddings are used as they are.
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
    architecture
        Details of the tokens, the transformer and its heads (feed-forward width, LayerNorm
        placement, ``<cls>``/``<eos>`` tokens, expression bins, ...): an
        :class:`~scforge_scvi.model.Architecture` or a dict of some of its fields.
    **kwargs
        Fields of ``preprocessing`` or ``architecture`` under their former flat names (e.g.
        ``n_top_genes=None``), read with a ``FutureWarning`` until the next release.

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
        preprocessing: Preprocessing | dict | None = None,
        hidden_dim: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        dropout: float = 0.1,
        pooling: str = "mean",
        expression_loss_weight: float = 1.0,
        cell_expression_weight: float = 0.0,
        head_hidden_dim: int | None = 256,
        head_dropout: float = 0.1,
        min_coverage: float = 0.5,
        lora: dict | None = None,
        class_names: Sequence[str] | None = None,
        architecture: Architecture | dict | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(adata, registry)
        self.preprocessing, self.architecture = resolve_settings(
            preprocessing, architecture, kwargs
        )
        arch = self.architecture
        self.min_coverage = min_coverage
        self.vocab = resolve_vocab(
            vocab,
            self.adata,
            self._counts(self.adata),
            preprocessing=self.preprocessing,
            gene_key=self._setup_arg("gene_key"),
            min_coverage=min_coverage,
        )
        self.tokenizer = build_tokenizer(
            tokenizer,
            self.vocab,
            preprocessing=self.preprocessing,
            max_genes=max_genes,
            prepend_cls=arch.prepend_cls,
            append_eos=arch.append_eos,
            n_bins=arch.n_bins,
            score_dtype=arch.score_dtype,
        )
        self.backbone_config = BackboneConfig(
            vocab_size=len(self.vocab),
            hidden_dim=hidden_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            ffn_dim=arch.ffn_dim,
            dropout=dropout,
            attention_dropout=arch.attention_dropout,
            activation=arch.activation,
            # positions: the genes plus the tokenizer's <cls> / <eos>
            max_seq_len=(arch.max_seq_len or max_genes) + self.tokenizer.n_special_tokens,
            pooling=pooling,
            value_encoding=self.tokenizer.value_encoding,
            n_bins=arch.n_bins,
            use_positions=self.tokenizer.ordered,
            pad_token_id=self.vocab.pad_id,
            layer_norm_eps=arch.layer_norm_eps,
            norm_position=arch.norm_position,
            embedding_norm=arch.embedding_norm,
            scaled_gene_embedding=arch.scaled_gene_embedding,
        )
        if arch.max_seq_len is not None and arch.max_seq_len < max_genes:
            raise ValueError(
                f"max_seq_len={arch.max_seq_len} is smaller than max_genes={max_genes}: the model "
                "could not read a cell's genes (both count genes; <cls> and <eos> are added). "
                "Raise max_seq_len or lower max_genes."
            )
        if pooling == "cls" and not arch.prepend_cls:
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
            cell_expression_weight=cell_expression_weight,
            n_classes=len(self.class_names_),
            n_regression_outputs=int(self._has_regression_target()),
            head_hidden_dim=head_hidden_dim,
            head_dropout=head_dropout,
            gene_head_activation=arch.gene_head_activation,
        )
        if arch.gene_embedding_init == "pca" and self.adata is not None:
            self._init_gene_embedding_from_pca()
        self.lora_ = None
        if lora is not None:
            self._apply_lora(LoraSettings(**lora))
        self._model_summary_string = (
            f"ScForge: {tokenizer} tokens (max {max_genes}), {num_layers} layers x "
            f"{hidden_dim} dims, {len(self.vocab) - self.vocab.n_special} genes in vocabulary, "
            f"{sum(p.numel() for p in self.module.parameters()):,} parameters"
        )
        self.init_params_ = self._get_init_params(locals())
        # load() replays the vocabulary (with its fitted medians) and the resolved settings
        self.init_params_["non_kwargs"].update(
            vocab=self.vocab.to_dict(),
            preprocessing=self.preprocessing.to_dict(),
            architecture=arch.to_dict(),
        )
        self.init_params_["kwargs"] = {"kwargs": {}}

    # -- helpers -----------------------------------------------------------------------------
    def _init_gene_embedding_from_pca(self) -> None:
        """Gene embeddings from the principal-component loadings of the registered cells.

        Each gene found in the data gets its loadings on the first ``hidden_dim`` components,
        scaled to the spread of the random initialisation (standard deviation 0.02); other
        tokens keep their random vectors.
        """
        ids, loadings = gene_pca_loadings(
            self._counts(self.adata),
            self.gene_match().vocab_ids,
            self.backbone_config.hidden_dim,
            self.preprocessing,
        )
        if loadings.size == 0:
            return
        weight = self.module.backbone.gene_embedding.weight
        scaled = torch.as_tensor(loadings * (0.02 / loadings.std()), dtype=weight.dtype)
        with torch.no_grad():
            weight[torch.as_tensor(ids), : scaled.shape[1]] = scaled

    def gene_match(self, adata: AnnData | None = None):
        """How the genes of ``adata`` map onto the model's vocabulary (coverage report)."""
        adata = self._validate_anndata(adata)
        return self.vocab.match(adata, **self._match_kwargs())

    def _match_kwargs(self) -> dict[str, Any]:
        gene_key = self._setup_arg("gene_key")
        return match_kwargs(self.vocab, self.preprocessing, gene_key, self.min_coverage)

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

    # -- inference ---------------------------------------------------------------------------
    @torch.inference_mode()
    def _infer(self, adata, indices, batch_size, fn, **inference_kwargs) -> torch.Tensor:
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
            loader = CellStream.tokenized(
                adata,
                ids,
                self.tokenizer,
                self.vocab,
                self._match_kwargs(),
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
            inputs = self.module._get_inference_input(tokens)
            out = self.module.inference(**inputs, **inference_kwargs)
            outputs.append(fn(out).float().cpu())
        result = torch.cat(outputs)
        if order is not None:
            result[torch.from_numpy(order)] = result.clone()
        return result

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
        head: str = "default",
        coverage: float | None = None,
        unknown_threshold: float | None = None,
    ) -> pd.DataFrame | None:
        """Predict labels (or regression targets) and write them into ``adata``.

        Sets ``adata.obs[key_added]`` (the predicted class, categorical),
        ``adata.obs["scforge_confidence"]`` (its probability) and
        ``adata.obsm["scforge_probabilities"]`` (all class probabilities, columns in
        ``model.class_names_`` order). With a regression head, ``adata.obs[key_added]`` holds
        the predicted value. Every cell is predicted, unlabelled ones (``unlabeled_category``
        or a missing label) included. A query AnnData needs no label column; its genes may
        be in any order or a subset (mapped through the vocabulary).

        A classifier fine-tuned with at least 50 labelled validation cells is calibrated
        (:mod:`~scforge_scvi.model._calibration`): the default head's probabilities are
        temperature-scaled, and ``adata.obs["scforge_unknown_score"]`` holds the share of
        validation cells closer to a known type than the cell (near 1: unlike every type
        the model was trained on).

        Parameters
        ----------
        adata
            AnnData with the same setup (``None``: the model's).
        key_added
            Column of ``adata.obs`` for the predictions.
        batch_size
            Minibatch size (default 64).
        return_probabilities
            Also return the class probabilities.
        head
            Which classifier predicts: ``"default"``, the mixture of the transformer's head
            and the linear path with the share chosen on validation cells
            (:mod:`~scforge_scvi.model._linear`); ``"backbone"``, the transformer's head
            alone; ``"linear"``, the logistic regression on log-normalised genes alone.
            Only the default head's probabilities are calibrated.
        coverage
            In (0, 1): also write split-conformal prediction sets that hold the true class
            of a cell with this probability: ``adata.obs["scforge_prediction_set"]`` (the
            classes, joined by ``", "``) and ``adata.obs["scforge_prediction_set_size"]``
            (0: no class is credible). Needs a calibrated model.
        unknown_threshold
            In [0, 1]: label ``"unknown"`` the cells whose unknown score exceeds it (``0.99``:
            further from every known type than 99% of validation cells are from theirs).
            Needs a calibrated model.

        Returns
        -------
        The probabilities as a DataFrame when ``return_probabilities`` is True.
        """
        adata = self._validate_anndata(adata)
        calibration = self.module.calibration
        for name, value in (("coverage", coverage), ("unknown_threshold", unknown_threshold)):
            check_fraction(name, value, closed=name == "unknown_threshold")
            if value is not None and (calibration is None or not calibration.fitted):
                raise ScForgeValueError(
                    f"{name}={value!r} needs a calibrated classifier: fine-tune with at least "
                    f"{CALIBRATION_CELLS} labelled validation cells (validation_size > 0)."
                )
        if self.module.classifier is None and self.module.regressor is None:
            raise ValueError(
                "This model has no task head: register labels with "
                "setup_anndata(adata, labels_key=...) and fine-tune before predicting."
            )
        if self.module.classifier is None:
            regressor = self.module.regressor
            values = self._infer(adata, None, batch_size, lambda out: regressor(out["embedding"]))
        base = (
            key_added.removesuffix("_prediction")
            if key_added.endswith("_prediction")
            else key_added
        )
        if self.module.classifier is None:
            adata.obs[key_added] = values.squeeze(-1).numpy()
            self._record(adata, "predict", key_added=key_added)
            return None
        # read once: the linear path and the unknown score both need it
        expression = self._expression(adata, None, batch_size) if calibration.fitted else None
        probs = self._probabilities(adata, None, head, batch_size, expression)
        if head == "default" and calibration.fitted:
            probs = calibration.calibrated(probs)
        names = np.asarray(self.class_names_)
        predicted = pd.Categorical(names[probs.argmax(1)], categories=self.class_names_)
        written = [key_added, f"{base}_confidence"]
        if calibration.fitted:
            unknown = calibration.unknown_scores(expression)
            adata.obs[f"{base}_unknown_score"] = unknown
            written.append(f"{base}_unknown_score")
            if unknown_threshold is not None:
                predicted = predicted.add_categories([UNKNOWN])
                predicted[unknown > unknown_threshold] = UNKNOWN
        adata.obs[key_added] = predicted
        adata.obs[f"{base}_confidence"] = probs.max(1)
        adata.obsm[f"{base}_probabilities"] = probs
        if coverage is not None:
            members = calibration.prediction_sets(probs, coverage)
            adata.obs[f"{base}_prediction_set"] = [", ".join(names[row]) for row in members]
            adata.obs[f"{base}_prediction_set_size"] = members.sum(1)
            written += [f"{base}_prediction_set", f"{base}_prediction_set_size"]
        self._record(
            adata,
            "predict",
            key_added=key_added,
            class_names=list(self.class_names_),
            head=head,
            coverage=coverage,
            unknown_threshold=unknown_threshold,
        )
        logger.info(f"Added adata.obs{written} and adata.obsm['{base}_probabilities'].")
        if return_probabilities:
            return pd.DataFrame(probs, index=adata.obs_names, columns=self.class_names_)
        return None

    def _probabilities(
        self, adata, indices=None, head: str = "default", batch_size=None, expression=None
    ):
        """Class probabilities ``(n_cells, n_classes)`` of the cells from the chosen head
        (``expression``: the cells' :meth:`_expression`, when the caller has it)."""
        if head not in PREDICTION_HEADS:
            raise ScForgeValueError(
                f"head={head!r} is not valid; choose one of {PREDICTION_HEADS}."
            )
        path = self.module.linear_path
        mix = 0.0 if head == "backbone" else 1.0 if head == "linear" else float(path.mix)
        if mix > 0 and not path.fitted:
            raise ScForgeValueError(
                "This model's linear path is not fitted (fine-tuned without it, or saved before "
                "it existed); use head='backbone' or fine-tune again."
            )
        probs = 0.0
        if mix < 1:
            classifier = self.module.classifier
            logits = self._infer(
                adata, indices, batch_size, lambda out: classifier(out["embedding"])
            )
            probs = (1 - mix) * torch.softmax(logits, dim=-1).numpy()
        if mix > 0:
            if expression is None:
                expression = self._expression(adata, indices, batch_size)
            probs = probs + mix * path.probabilities(expression)
        return np.asarray(probs, dtype=np.float32)

    def _expression(self, adata, indices=None, batch_size=None):
        """Log-normalised expression of the cells in vocabulary columns (the linear path's and
        the unknown score's input)."""
        return features(
            self._counts(adata),
            self.gene_match(adata).vocab_ids,
            len(self.vocab),
            self.preprocessing.target_sum,
            indices=indices,
            rows=batch_size or 1024,
        )

    def evaluate(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        baseline: bool = True,
        n_top_genes: int = 2000,
        coverage: float = 0.9,
        unknown_threshold: float = 0.99,
    ) -> dict:
        """Classification metrics on held-out cells, beside a logistic-regression baseline.

        Unlabelled cells (labelled ``unlabeled_category`` or with a missing label) are left
        out of the metrics.

        Parameters
        ----------
        adata
            AnnData with the model's setup (default: the training AnnData).
        indices
            Cells to score (default: on the training AnnData, the test split of the last
            :meth:`train`, never used for training or model selection; on another AnnData,
            all of its cells).
        baseline
            Also fit a logistic regression on log-normalised expression of ``n_top_genes``
            HVGs (chosen on its training cells) and score it on the same cells. It fits on
            the model's training and validation cells, so it needs the training AnnData and
            a model trained in this session.
        n_top_genes
            HVGs of the baseline.
        coverage, unknown_threshold
            Of a calibrated model: the prediction sets and the unknown rate scored (see
            :meth:`predict`).

        Returns
        -------
        ``accuracy``, ``macro_f1``, ``weighted_f1``, ``per_class_f1`` (dict), ``support``
        (dict, cells per class), ``n_cells``, the ``confusion`` matrix (DataFrame, rows
        true, columns predicted), ``linear_path_share`` and, when the linear path is fitted,
        ``backbone_macro_f1`` and ``linear_macro_f1`` (each path alone); with ``baseline``, ``baseline_logreg`` (the same
        scores of the logistic regression) and ``relative_macro_f1`` (model / baseline); of a calibrated model, ``ece`` and
        ``ece_uncalibrated`` (expected calibration error, 15 bins), ``coverage`` and
        ``mean_set_size`` of the prediction sets, and ``unknown_rate``.
        """
        return evaluate_annotation(
            self,
            adata,
            indices,
            baseline=baseline,
            n_top_genes=n_top_genes,
            coverage=coverage,
            unknown_threshold=unknown_threshold,
        )
