"""Output heads that sit on top of :class:`~scforge_scvi.nn.ScForgeBackbone`.

Pretraining heads (:class:`MaskedGeneHead`, :class:`ExpressionHead`) take hidden states
already gathered at the masked positions, shape ``(M, d)``, so the cost is ``M x vocab``
rather than ``batch x seq x vocab``. Fine-tuning heads (:class:`ClassificationHead`,
:class:`RegressionHead`) take cell embeddings ``(B, d)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._cross_entropy import linear_cross_entropy
from ._mlp import activation as make_activation
from ._mlp import mlp


class _Transform(nn.Module):
    """``dense -> GELU (or ReLU) -> LayerNorm``, the usual transform before a prediction layer."""

    def __init__(
        self, hidden_dim: int, layer_norm_eps: float = 1e-5, activation: str = "gelu"
    ) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_dim, hidden_dim)
        self.activation = make_activation(activation)
        self.norm = nn.LayerNorm(hidden_dim, eps=layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (M, d) -> (M, d)
        return self.norm(self.activation(self.dense(x)))


class MaskedGeneHead(nn.Module):
    """Predict the gene identity at masked positions.

    Parameters
    ----------
    hidden_dim
        Width of the backbone hidden states.
    vocab_size
        Number of gene tokens.
    embedding
        The backbone's gene embedding to tie the output weights to, or ``None`` for an
        untied output matrix owned by the head. A tied embedding is referenced, not
        registered: its weight appears once in ``state_dict()`` and ``parameters()`` (under
        the backbone), and the head owns only its transform and the output bias.
    layer_norm_eps
        Epsilon of the transform's LayerNorm.
    activation
        Non-linearity of the transform: ``"gelu"`` (default) or ``"relu"`` (BERT's masked-LM
        head uses the encoder's activation; Geneformer's is ReLU).

    Notes
    -----
    Call it only on hidden states gathered at the masked positions, e.g.
    ``head(out.hidden[mask])``: the output is ``(M, vocab_size)``.
    """

    def __init__(
        self,
        hidden_dim: int,
        vocab_size: int,
        embedding: nn.Embedding | None = None,
        layer_norm_eps: float = 1e-5,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        self.transform = _Transform(hidden_dim, layer_norm_eps, activation)
        if embedding is not None:
            if tuple(embedding.weight.shape) != (vocab_size, hidden_dim):
                raise ValueError(
                    f"Tied embedding has shape {tuple(embedding.weight.shape)}, expected "
                    f"(vocab_size={vocab_size}, hidden_dim={hidden_dim})."
                )
            self.decoder = None
            # Bypass nn.Module.__setattr__ so the embedding is not registered a second time.
            object.__setattr__(self, "_tied_embedding", embedding)
        else:
            self.decoder = nn.Linear(hidden_dim, vocab_size, bias=False)
            object.__setattr__(self, "_tied_embedding", None)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    @property
    def tied(self) -> bool:
        """Whether the output weights are the backbone's gene embedding."""
        return self._tied_embedding is not None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over genes, ``(M, d) -> (M, vocab_size)``."""
        h = self.transform(hidden)  # (M, d)
        if self._tied_embedding is not None:
            return F.linear(h, self._tied_embedding.weight, self.bias)  # (M, V)
        return self.decoder(h) + self.bias  # (M, V)

    def loss(self, hidden: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the logits of ``hidden`` against ``target_ids``.

        The same value as ``F.cross_entropy(head(hidden), target_ids)``, computed without
        materialising the ``(M, vocab_size)`` logits (see
        :func:`~scforge_scvi.nn.linear_cross_entropy`).
        """
        h = self.transform(hidden)  # (M, d)
        weight = (
            self.decoder.weight if self._tied_embedding is None else self._tied_embedding.weight
        )
        return linear_cross_entropy(h, weight, self.bias, target_ids)


class ExpressionHead(nn.Module):
    """Predict the expression value at masked positions.

    Parameters
    ----------
    hidden_dim
        Width of the backbone hidden states.
    n_outputs
        ``n_bins`` for a bin cross-entropy objective, ``1`` for a mean-squared-error one.
    layer_norm_eps
        Epsilon of the transform's LayerNorm.

    Notes
    -----
    ``(M, d) -> (M, n_outputs)``; with ``n_outputs=1`` the caller squeezes the last axis.
    """

    def __init__(self, hidden_dim: int, n_outputs: int, layer_norm_eps: float = 1e-5) -> None:
        super().__init__()
        if n_outputs < 1:
            raise ValueError(f"ExpressionHead needs n_outputs >= 1, got {n_outputs}.")
        self.transform = _Transform(hidden_dim, layer_norm_eps)
        self.output = nn.Linear(hidden_dim, n_outputs)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (M, d) -> (M, n_outputs)
        return self.output(self.transform(hidden))


class ClassificationHead(nn.Module):
    """Cell-type (or any label) classifier on cell embeddings.

    Parameters
    ----------
    in_dim
        Width of the cell embedding.
    n_classes
        Number of classes; the head returns unnormalised logits ``(B, n_classes)``.
    hidden_dim
        Width of the hidden layer; ``None`` or ``0`` gives a single linear layer (a probe).
    dropout
        Dropout after the hidden activation.
    """

    def __init__(
        self, in_dim: int, n_classes: int, hidden_dim: int | None = 256, dropout: float = 0.1
    ) -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"ClassificationHead needs n_classes >= 2, got {n_classes}.")
        self.net = mlp(in_dim, n_classes, hidden_dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in_dim) -> (B, n_classes)
        return self.net(x)


class RegressionHead(nn.Module):
    """Regression on cell embeddings (e.g. a perturbation response per gene).

    Parameters
    ----------
    in_dim
        Width of the cell embedding.
    n_outputs
        Number of predicted values per cell; output ``(B, n_outputs)``.
    hidden_dim
        Width of the hidden layer; ``None`` or ``0`` gives a single linear layer.
    dropout
        Dropout after the hidden activation.
    """

    def __init__(
        self, in_dim: int, n_outputs: int = 1, hidden_dim: int | None = 256, dropout: float = 0.1
    ) -> None:
        super().__init__()
        if n_outputs < 1:
            raise ValueError(f"RegressionHead needs n_outputs >= 1, got {n_outputs}.")
        self.net = mlp(in_dim, n_outputs, hidden_dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in_dim) -> (B, n_outputs)
        return self.net(x)
