"""The torch module behind :class:`~scforge_scvi.ScForge`: backbone + heads.

It follows scvi-tools' module protocol (``inference`` -> ``generative`` -> ``loss``) so that
scvi-tools' training loop and data loaders drive it, but it is not a VAE: the data loader
tokenises the raw counts (:class:`~scforge_scvi.data.TokenCollator`); ``inference``
optionally masks the tokens and runs the transformer;
``generative`` is empty; ``loss`` is the objective being trained.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data

from scforge_scvi.data._collate import GENE_IDS, PADDING_MASK, VALUES
from scforge_scvi.data._masking import MaskingConfig, mask_tokens
from scforge_scvi.data._tokenizers import TokenizedBatch
from scforge_scvi.nn import (
    BackboneConfig,
    ClassificationHead,
    ExpressionHead,
    MaskedGeneHead,
    RegressionHead,
    ScForgeBackbone,
)

from ._calibration import Calibration
from ._constants import SCFORGE_REGISTRY_KEYS as KEYS
from ._linear import LinearPath

OBJECTIVES = ("pretrain", "classify", "regress")


class ScForgeModule(BaseModuleClass):
    """Transformer backbone, masked-gene heads and an optional task head.

    Parameters
    ----------
    backbone_config
        Architecture of the transformer.
    n_special
        Number of special tokens at the start of the vocabulary.
    mask_id
        Vocabulary id of ``<mask>``.
    expression_loss_weight
        Weight of the masked expression loss (bin cross-entropy for binned values, MSE for
        continuous values) added to the masked-gene cross-entropy.
    cell_expression_weight
        Weight of a cell-level reconstruction added to the masked-gene loss: a linear read-out
        of the cell embedding predicts the value of every vocabulary gene in the cell (0 where
        not detected), masked genes included; for rank-value tokens the value is the gene's
        rank: 1 for a cell's first gene, 1/T less for each next one, T the minibatch's padded
        length (a cell's own gene count instead measured lower, docs/benchmarks_embedding.md).
        0 (default): no such head.
    n_classes
        Size of the classification head (0: no classification head). A classifier comes
        with its linear path (:class:`~scforge_scvi.model._linear.LinearPath`) and its
        calibration (:class:`~scforge_scvi.model._calibration.Calibration`), both fitted after
        fine-tuning.
    n_regression_outputs
        Size of the regression head (0: no regression head).
    head_hidden_dim, head_dropout
        Task head shape.
    gene_head_activation
        Non-linearity of the masked-gene head's transform (``"gelu"``; ``"relu"`` for imported
        Geneformer models, whose masked-LM head uses the encoder's activation).
    """

    def __init__(
        self,
        backbone_config: BackboneConfig,
        *,
        n_special: int,
        mask_id: int,
        expression_loss_weight: float = 1.0,
        cell_expression_weight: float = 0.0,
        n_classes: int = 0,
        n_regression_outputs: int = 0,
        head_hidden_dim: int | None = 256,
        head_dropout: float = 0.1,
        gene_head_activation: str = "gelu",
    ) -> None:
        super().__init__()
        self.config = backbone_config
        self.n_special = n_special
        self.mask_id = mask_id
        self.expression_loss_weight = expression_loss_weight
        self.backbone = ScForgeBackbone(backbone_config)
        d = backbone_config.hidden_dim
        self.gene_head = MaskedGeneHead(
            d,
            backbone_config.vocab_size,
            self.backbone.gene_embedding,
            layer_norm_eps=backbone_config.layer_norm_eps,
            activation=gene_head_activation,
        )
        self.expression_head = None
        if backbone_config.value_encoding == "binned":
            self.expression_head = ExpressionHead(d, backbone_config.n_bins)
        elif backbone_config.value_encoding == "continuous":
            self.expression_head = ExpressionHead(d, 1)
        if cell_expression_weight < 0:
            raise ValueError(f"cell_expression_weight={cell_expression_weight!r}: use >= 0.")
        self.cell_expression_weight = float(cell_expression_weight)
        self.cell_expression_head = (
            torch.nn.Linear(d, backbone_config.vocab_size) if cell_expression_weight > 0 else None
        )
        self.classifier = (
            ClassificationHead(d, n_classes, hidden_dim=head_hidden_dim, dropout=head_dropout)
            if n_classes
            else None
        )
        self.linear_path = LinearPath(backbone_config.vocab_size, n_classes) if n_classes else None
        self.calibration = Calibration(backbone_config.vocab_size, n_classes) if n_classes else None
        self.regressor = (
            RegressionHead(
                d, n_regression_outputs, hidden_dim=head_hidden_dim, dropout=head_dropout
            )
            if n_regression_outputs
            else None
        )

    @property
    def heads(self) -> list[torch.nn.Module]:
        """Modules that are not the backbone (trained with the head learning rate)."""
        return [m for m in (self.classifier, self.regressor) if m is not None]

    @property
    def pretraining_heads(self) -> list[torch.nn.Module]:
        """Heads of the masked-gene objective (trained with the backbone in pretraining)."""
        heads = (self.gene_head, self.expression_head, self.cell_expression_head)
        return [m for m in heads if m is not None]

    # -- adapters ----------------------------------------------------------------------------
    _HEAD_PREFIXES = ("classifier.", "linear_path.", "calibration.", "regressor.")

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone's LoRA adapters and the task head: what fine-tuning with LoRA changed."""
        from scforge_scvi.train import lora_state_dict

        state = {f"backbone.{k}": v for k, v in lora_state_dict(self.backbone).items()}
        state.update(
            {
                k: v.detach()
                for k, v in self.state_dict().items()
                if k.startswith(self._HEAD_PREFIXES)
            }
        )
        return state

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`adapter_state_dict` returned into a module with the same adapters.

        Raises
        ------
        KeyError
            If the adapter or head keys differ from this module's.
        """
        from scforge_scvi.train import load_lora_state_dict

        prefix = "backbone."
        load_lora_state_dict(
            self.backbone, {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        )
        heads = {k: v for k, v in state.items() if not k.startswith(prefix)}
        expected = {k for k in self.state_dict() if k.startswith(self._HEAD_PREFIXES)}
        if self.calibration is not None and not any(k.startswith("calibration.") for k in heads):
            # adapters saved before calibration existed: the model is left uncalibrated
            self.calibration.reset()
            expected = {k for k in expected if not k.startswith("calibration.")}
        if set(heads) != expected:
            raise KeyError(
                f"Adapter head weights do not match the model: missing "
                f"{sorted(expected - set(heads))}, unexpected {sorted(set(heads) - expected)}."
            )
        self.load_state_dict(heads, strict=False)  # key sets were compared above

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict with any LoRA adapters folded into the base weights."""
        from scforge_scvi.train import lora_layer_names, merge_lora

        if not lora_layer_names(self.backbone):
            return self.state_dict()
        import copy

        module = copy.deepcopy(self)
        merge_lora(module.backbone)
        return module.state_dict()

    # -- scvi-tools module protocol ----------------------------------------------------------
    def _get_inference_input(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {
            "tokens": TokenizedBatch(
                gene_ids=tensors[GENE_IDS],
                values=tensors.get(VALUES),
                padding_mask=tensors[PADDING_MASK],
            )
        }

    def _get_generative_input(self, tensors, inference_outputs) -> dict[str, Any]:
        return {}

    @auto_move_data
    def inference(
        self,
        tokens: TokenizedBatch,
        masking: MaskingConfig | None = None,
        generator: torch.Generator | None = None,
        token_dropout: float = 0.0,
        output_layer_states: bool = False,
    ) -> dict[str, Any]:
        """Mask (when ``masking`` is given) and encode a tokenised minibatch.

        ``token_dropout`` hides that fraction of each cell's gene tokens (never special
        tokens such as CLS) from attention and pooling: an augmentation for fine-tuning.
        ``output_layer_states`` adds ``"layer_states"`` (the token states entering the first
        block and leaving each block) and ``"padding_mask"`` to the outputs.
        """
        masked = None
        gene_ids, value_mask = tokens.gene_ids, None
        padding_mask = tokens.padding_mask
        if token_dropout > 0:
            keep = torch.rand(gene_ids.shape, generator=generator).to(gene_ids.device)
            keep = (keep >= token_dropout) | (gene_ids < self.n_special)
            padding_mask = padding_mask & keep
        if masking is not None:
            masked = mask_tokens(
                tokens,
                masking,
                vocab_size=self.config.vocab_size,
                n_special=self.n_special,
                mask_id=self.mask_id,
                generator=generator,
            )
            gene_ids = masked.gene_ids
            if tokens.values is not None:  # hide the value wherever the gene is a target
                value_mask = masked.target_mask
        out = self.backbone(gene_ids, padding_mask, tokens.values, value_mask, output_layer_states)
        outputs = {
            "tokens": tokens,
            "masked": masked,
            "hidden": out.hidden,
            "embedding": out.cell_embedding,
        }
        if output_layer_states:
            outputs["layer_states"] = out.layer_states
            outputs["padding_mask"] = padding_mask
        return outputs

    def generative(self, **kwargs: Any) -> dict[str, Any]:
        return {}

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict[str, Any],
        generative_outputs: dict[str, Any],
        objective: str = "pretrain",
        class_weights: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> LossOutput:
        """Objective of the current training stage, as an scvi-tools ``LossOutput``."""
        if objective == "pretrain":
            return self._masked_gene_loss(inference_outputs)
        if objective == "classify":
            return self._classification_loss(
                tensors, inference_outputs, class_weights, label_smoothing
            )
        if objective == "regress":
            return self._regression_loss(tensors, inference_outputs)
        raise ValueError(f"Unknown objective {objective!r}; choose one of {OBJECTIVES}.")

    # -- objectives --------------------------------------------------------------------------
    def _masked_gene_loss(self, outputs: dict[str, Any]) -> LossOutput:
        masked = outputs["masked"]
        if masked is None:
            raise ValueError("The pretraining objective needs masked inputs (masking=None).")
        h = outputs["hidden"][masked.target_mask]  # (M, d): logits only at masked positions
        n_cells = outputs["hidden"].shape[0]
        gene_loss = self.gene_head.loss(h, masked.target_ids)
        extra = {"gene_loss": gene_loss.detach()}
        loss = gene_loss
        if self.expression_head is not None and self.expression_loss_weight > 0:
            pred = self.expression_head(h)
            if self.config.value_encoding == "binned":
                expr_loss = F.cross_entropy(pred, masked.target_values)
            else:
                expr_loss = F.mse_loss(pred.squeeze(-1), masked.target_values)
            loss = loss + self.expression_loss_weight * expr_loss
            extra["expression_loss"] = expr_loss.detach()
        if self.cell_expression_head is not None:
            cell_loss = self._cell_expression_loss(outputs)
            loss = loss + self.cell_expression_weight * cell_loss
            extra["cell_expression_loss"] = cell_loss.detach()
        return LossOutput(loss=loss, n_obs_minibatch=n_cells, extra_metrics=extra)

    def _cell_expression_loss(self, outputs: dict[str, Any]) -> torch.Tensor:
        """MSE of the cell embedding's read-out against the cell's unmasked gene values.

        Divided by the variance of the targets in the batch, so that the loss is scale-free:
        1 for predicting the batch's mean value for every gene.
        """
        tokens: TokenizedBatch = outputs["tokens"]
        genes = tokens.padding_mask & (tokens.gene_ids >= self.n_special)
        if tokens.values is None:  # rank tokens: 1 for the first gene, 1/T less for each next
            rank = genes.cumsum(dim=1) - 1
            values = (1.0 - rank.float() / genes.shape[1]) * genes
        elif self.config.value_encoding == "binned":
            values = tokens.values.float() / (self.config.n_bins - 1)
        else:
            values = tokens.values.float()
        target = torch.zeros(
            genes.shape[0], self.config.vocab_size, device=values.device, dtype=values.dtype
        )
        target.scatter_(1, tokens.gene_ids * genes, values * genes)  # padding lands on id 0
        pred = self.cell_expression_head(outputs["embedding"])[:, self.n_special :].float()
        target = target[:, self.n_special :]
        return F.mse_loss(pred, target) / target.var().clamp_min(1e-8)

    def _classification_loss(
        self, tensors, outputs, class_weights, label_smoothing=0.0
    ) -> LossOutput:
        if self.classifier is None:
            raise ValueError("This model has no classification head.")
        logits = self.classifier(outputs["embedding"])
        labels = tensors[KEYS.LABELS_KEY].view(-1).long()
        # codes past the last class mark unlabelled cells: predicted, never in the loss
        labelled = labels < logits.shape[-1]
        if labelled.any():
            logits_l, labels_l = logits[labelled], labels[labelled]
            # each cell weighted by its own class: torch's `weight=` with label smoothing also
            # weights every cell's smoothing term by each class's weight, pulling all cells
            # towards the rarest classes
            per_cell = F.cross_entropy(
                logits_l, labels_l, reduction="none", label_smoothing=label_smoothing
            )
            if class_weights is None:
                loss = per_cell.mean()
            else:
                w = class_weights[labels_l]
                loss = (w * per_cell).sum() / w.sum()
            acc = (logits_l.argmax(-1) == labels_l).float().mean()
        else:
            loss = logits.sum() * 0.0
            acc = torch.zeros((), device=logits.device)
        return LossOutput(
            loss=loss,
            n_obs_minibatch=int(labelled.sum()),
            extra_metrics={"accuracy": acc.detach()},
        )

    def _regression_loss(self, tensors, outputs) -> LossOutput:
        if self.regressor is None:
            raise ValueError("This model has no regression head.")
        pred = self.regressor(outputs["embedding"])
        target = tensors[KEYS.TARGET_KEY].view(pred.shape[0], -1).float()
        observed = torch.isfinite(target).all(-1)
        loss = F.mse_loss(pred[observed], target[observed]) if observed.any() else pred.sum() * 0
        return LossOutput(loss=loss, n_obs_minibatch=int(observed.sum()))
