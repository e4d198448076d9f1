"""The scForge backbone: a pre-LayerNorm transformer encoder over gene tokens.

Read top to bottom: :class:`BackboneConfig`, :class:`FeedForward`, :class:`TransformerBlock`
(and its BERT-style post-LayerNorm variant :class:`PostNormTransformerBlock`, used by imported
Geneformer models), :class:`ScForgeBackbone`. Plain ``torch``: the inputs are token ids, a
padding mask and (optionally) expression values; nothing here knows about AnnData.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scforge_scvi._settings import from_known_keys

from ._attention import MultiHeadSelfAttention
from ._dropout import Dropout
from ._mlp import ACTIVATIONS, activation

POOLINGS = ("cls", "mean")
VALUE_ENCODINGS = ("none", "binned", "continuous")
NORM_POSITIONS = ("pre", "post")


@dataclass
class BackboneConfig:
    """Hyper-parameters of :class:`ScForgeBackbone`.

    Parameters
    ----------
    vocab_size
        Number of gene tokens, special tokens (pad, CLS, mask) included.
    hidden_dim
        Width of the hidden states; must be divisible by ``num_heads``.
    num_layers
        Number of transformer blocks.
    num_heads
        Number of attention heads.
    ffn_dim
        Inner width of the feed-forward network; ``None`` means ``4 * hidden_dim``.
    dropout
        Dropout on embeddings, feed-forward and residual branches.
    attention_dropout
        Dropout on attention probabilities. Off by default: it costs a random draw per
        (head, query, key) triple, the dominant cost of a CPU training step, for little gain.
    activation
        Feed-forward non-linearity: ``"gelu"`` or ``"relu"``.
    max_seq_len
        Longest accepted sequence (tokens, CLS included); size of the position table.
    pooling
        Cell embedding from the hidden states: ``"cls"`` (position 0) or ``"mean"``.
    value_encoding
        How expression values enter: ``"none"`` (gene identity and order only), ``"binned"``
        (integer bin ids ``0..n_bins-1`` through an embedding table) or ``"continuous"``
        (a float per token through a small MLP).
    n_bins
        Number of expression bins for ``"binned"``; bin 0 means zero expression or padding.
    use_positions
        Add a learned position embedding (for tokenizers whose order carries meaning, such as
        rank-value tokenization).
    pad_token_id
        Token id used for padding; its gene embedding row is kept at zero.
    layer_norm_eps
        Epsilon of every LayerNorm.
    norm_position
        ``"pre"`` (default): pre-LayerNorm blocks and a final LayerNorm after the last block.
        ``"post"``: BERT's post-LayerNorm blocks, ``h = norm(h + branch(h))``, and no final
        LayerNorm (the last block's output is the hidden state), as in Geneformer.
    embedding_norm
        Apply a LayerNorm to the summed input embeddings, before the embedding dropout (BERT's
        embedding LayerNorm). Off by default.
    scaled_gene_embedding
        Add to each token a second gene embedding multiplied by the token's expression level
        (``bin / (n_bins - 1)`` for ``"binned"``, the value for ``"continuous"``; 0 where the
        value is masked). The value encodings above are added to the gene embedding, so the
        mean of a cell's input embeddings only says which genes are detected; this term makes
        it a learned linear projection of the cell's expression levels as well. Needs a value
        encoding. Off by default (models saved without it load unchanged).
    """

    vocab_size: int
    hidden_dim: int = 512
    num_layers: int = 6
    num_heads: int = 8
    ffn_dim: int | None = None
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation: str = "gelu"
    max_seq_len: int = 2048
    pooling: str = "cls"
    value_encoding: str = "none"
    n_bins: int = 51
    use_positions: bool = True
    pad_token_id: int = 0
    layer_norm_eps: float = 1e-5
    norm_position: str = "pre"
    embedding_norm: bool = False
    scaled_gene_embedding: bool = False

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"BackboneConfig.{name} must be a positive integer, got {value!r}."
                )

        for name in ("vocab_size", "hidden_dim", "num_layers", "num_heads", "max_seq_len"):
            positive(name)
        if self.ffn_dim is not None:
            positive("ffn_dim")
        if self.hidden_dim % self.num_heads != 0:
            raise ValueError(
                f"BackboneConfig.hidden_dim ({self.hidden_dim}) must be divisible by "
                f"num_heads ({self.num_heads})."
            )
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"BackboneConfig.{name} must be in [0, 1), got {value!r}.")
        for name, choices in (
            ("activation", ACTIVATIONS),
            ("pooling", POOLINGS),
            ("value_encoding", VALUE_ENCODINGS),
            ("norm_position", NORM_POSITIONS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"BackboneConfig.{name} must be one of {choices}, got {getattr(self, name)!r}."
                )
        if isinstance(self.n_bins, bool) or not isinstance(self.n_bins, int) or self.n_bins < 2:
            raise ValueError(f"BackboneConfig.n_bins must be an integer >= 2, got {self.n_bins!r}.")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"BackboneConfig.pad_token_id ({self.pad_token_id}) must be a valid token id "
                f"in [0, vocab_size={self.vocab_size})."
            )
        for name in ("embedding_norm", "scaled_gene_embedding"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"BackboneConfig.{name} must be a bool, got {getattr(self, name)!r}."
                )
        if self.scaled_gene_embedding and self.value_encoding == "none":
            raise ValueError(
                "BackboneConfig.scaled_gene_embedding scales by expression values: it needs "
                "value_encoding='binned' or 'continuous', not 'none'."
            )
        if not self.layer_norm_eps > 0:
            raise ValueError(
                f"BackboneConfig.layer_norm_eps must be positive, got {self.layer_norm_eps!r}."
            )

    @property
    def resolved_ffn_dim(self) -> int:
        """Feed-forward inner width actually used (``4 * hidden_dim`` when ``ffn_dim`` is None)."""
        return 4 * self.hidden_dim if self.ffn_dim is None else self.ffn_dim

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dictionary of all fields (``ffn_dim`` stays ``None`` if unset)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BackboneConfig:
        """Build a config from :meth:`to_dict` output; unknown keys raise ``ValueError``."""
        return from_known_keys(cls, d, required=("vocab_size",))


@dataclass
class BackboneOutput:
    """What :meth:`ScForgeBackbone.forward` returns.

    Attributes
    ----------
    hidden
        Token hidden states after the final LayerNorm (after the last block for
        ``norm_position="post"``), shape ``(B, L, d)``; zero at padding.
    cell_embedding
        One vector per cell from :meth:`ScForgeBackbone.pool`, shape ``(B, d)``.
    layer_states
        With ``output_layer_states=True``: the token states entering the first block (the
        summed input embeddings) and leaving each block, ``num_layers + 1`` tensors of shape
        ``(B, L, d)``, before the final LayerNorm; otherwise ``None``.
    """

    hidden: torch.Tensor
    cell_embedding: torch.Tensor
    layer_states: tuple[torch.Tensor, ...] | None = None


def _ffn_hidden(pre, keep, scale: float, relu: bool) -> torch.Tensor:
    """``dropout(act(pre))`` with a given keep mask."""
    hidden = torch.relu(pre) if relu else F.gelu(pre)
    return hidden if keep is None else hidden.mul_(keep).mul_(scale)


class _RecomputedFeedForward(torch.autograd.Function):
    """``linear2(dropout(act(linear1(x))))`` that keeps ``linear1``'s output for the backward
    pass, not the activation's: the activation and dropout are recomputed there, one
    ``(B, L, ffn_dim)`` tensor less per block to hold between forward and backward."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, keep, scale, relu):
        pre = F.linear(x, w1, b1)
        ctx.save_for_backward(x, w1, w2, pre, keep)
        ctx.scale, ctx.relu = scale, relu
        return F.linear(_ffn_hidden(pre, keep, scale, relu), w2, b2)

    @staticmethod
    def backward(ctx, grad):
        x, w1, w2, pre, keep = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_w1 = grad_b1 = grad_w2 = grad_b2 = None
        rows = grad.reshape(-1, grad.shape[-1])
        if need[3]:
            hidden = _ffn_hidden(pre, keep, ctx.scale, ctx.relu)
            grad_w2 = rows.T @ hidden.reshape(-1, hidden.shape[-1])
            del hidden
        grad_b2 = rows.sum(0) if need[4] else None
        grad_pre = grad @ w2
        if keep is not None:
            grad_pre.mul_(keep).mul_(ctx.scale)
        if ctx.relu:
            grad_pre = torch.ops.aten.threshold_backward(grad_pre, pre, 0)
        else:
            grad_pre = torch.ops.aten.gelu_backward(grad_pre, pre)
        rows = grad_pre.reshape(-1, grad_pre.shape[-1])
        if need[1]:
            grad_w1 = rows.T @ x.reshape(-1, x.shape[-1])
        grad_b1 = rows.sum(0) if need[2] else None
        grad_x = grad_pre @ w1 if need[0] else None
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None, None, None


class FeedForward(nn.Module):
    """Position-wise feed-forward network: ``linear1 -> activation -> dropout -> linear2``.

    In training with plain linear layers (no LoRA adapters) and no autocast, the activation
    and dropout are recomputed in the backward pass instead of kept (same values, same
    random draws): one ``(batch, length, ffn_dim)`` tensor less per block between forward and
    backward. Frozen layers (``requires_grad=False``) get no weight gradients computed.
    """

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.linear1 = nn.Linear(config.hidden_dim, config.resolved_ffn_dim)
        self.activation = activation(config.activation)
        self.dropout = Dropout(config.dropout)
        self.linear2 = nn.Linear(config.resolved_ffn_dim, config.hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, d) -> (B, L, d)
        if self._recompute(x):
            shape = torch.Size((*x.shape[:-1], self.linear1.out_features))
            keep = self.dropout.draw(shape, x.device)
            l1, l2 = self.linear1, self.linear2
            relu = isinstance(self.activation, nn.ReLU)  # else GELU (nn._mlp.ACTIVATIONS)
            return _RecomputedFeedForward.apply(
                x, l1.weight, l1.bias, l2.weight, l2.bias, keep, self.dropout.scale, relu
            )
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def _recompute(self, x: torch.Tensor) -> bool:
        return (
            torch.is_grad_enabled()
            and type(self.linear1) is nn.Linear  # LoRA wraps them: the plain path
            and type(self.linear2) is nn.Linear
            and not torch.is_autocast_enabled(x.device.type)
        )


class TransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block.

    ``h = h + drop(attn(norm1(h)))`` then ``h = h + drop(ffn(norm2(h)))``.
    """

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_dim, eps=config.layer_norm_eps)
        self.attn = MultiHeadSelfAttention(
            config.hidden_dim, config.num_heads, config.attention_dropout
        )
        self.norm2 = nn.LayerNorm(config.hidden_dim, eps=config.layer_norm_eps)
        self.ffn = FeedForward(config)
        self.dropout = Dropout(config.dropout)

    def forward(self, h: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        h = h + self.dropout(self.attn(self.norm1(h), padding_mask))  # (B, L, d)
        h = h + self.dropout(self.ffn(self.norm2(h)))  # (B, L, d)
        return h


class PostNormTransformerBlock(TransformerBlock):
    """Post-LayerNorm (BERT) transformer block, for ``norm_position="post"``.

    ``h = norm1(h + drop(attn(h)))`` then ``h = norm2(h + drop(ffn(h)))``: the same modules
    (and state-dict keys) as :class:`TransformerBlock`, applied in BERT's order.
    """

    def forward(self, h: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        h = self.norm1(h + self.dropout(self.attn(h, padding_mask)))  # (B, L, d)
        h = self.norm2(h + self.dropout(self.ffn(h)))  # (B, L, d)
        return h


@torch.no_grad()
def init_weights(module: nn.Module) -> None:
    """Initialise one module's own weights: linear and embedding weights normal (std 0.02),
    biases and padding embeddings zero, layer norms the identity."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
        if module.padding_idx is not None:
            module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class ScForgeBackbone(nn.Module):
    """Transformer encoder over gene tokens, optionally with expression values.

    The input embedding of a token is the sum of its gene embedding, its value encoding (if
    ``value_encoding != "none"``) and its position embedding (if ``use_positions``), followed by
    a LayerNorm if ``embedding_norm``.

    Parameters
    ----------
    config
        The :class:`BackboneConfig`.

    Examples
    --------
    >>> config = BackboneConfig(vocab_size=100, hidden_dim=32, num_layers=2, num_heads=4)
    >>> backbone = ScForgeBackbone(config)
    >>> gene_ids = torch.randint(1, 100, (3, 10))
    >>> out = backbone(gene_ids, torch.ones(3, 10, dtype=torch.bool))
    >>> out.hidden.shape, out.cell_embedding.shape
    (torch.Size([3, 10, 32]), torch.Size([3, 32]))
    """

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_dim
        self.gene_embedding = nn.Embedding(config.vocab_size, d, padding_idx=config.pad_token_id)
        if config.value_encoding == "binned":
            # Bins 0..n_bins-1 are expression levels; index n_bins is the learned MASK bin.
            self.value_embedding = nn.Embedding(config.n_bins + 1, d)
        elif config.value_encoding == "continuous":
            self.value_encoder = nn.Sequential(
                nn.Linear(1, d), activation(config.activation), nn.Linear(d, d)
            )
            self.value_mask_embedding = nn.Parameter(torch.zeros(d))
        if config.scaled_gene_embedding:
            self.scaled_gene_embedding = nn.Embedding(
                config.vocab_size, d, padding_idx=config.pad_token_id
            )
        if config.use_positions:
            self.position_embedding = nn.Embedding(config.max_seq_len, d)
        # BERT-style options (imported Geneformer models). The defaults add no module and no
        # per-layer work: the block class is chosen here, not branched on in forward.
        self._embedding_norm = config.embedding_norm
        if config.embedding_norm:
            self.embedding_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.embedding_dropout = Dropout(config.dropout)
        post = config.norm_position == "post"
        block = PostNormTransformerBlock if post else TransformerBlock
        self.blocks = nn.ModuleList(block(config) for _ in range(config.num_layers))
        # post-LN blocks end in a LayerNorm already: no final norm (and no `norm.*` weights)
        self.norm = nn.Identity() if post else nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.reset_parameters()

    # ----------------------------------------------------------------------------- init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise all weights (normal, std 0.02; residual projections scaled down)."""
        self.apply(init_weights)
        if self.config.value_encoding == "continuous":
            nn.init.normal_(self.value_mask_embedding, std=0.02)
        # Residual projections add into the stream once per layer and branch: scale them so
        # that the variance of the residual stream does not grow with depth.
        residual_std = 0.02 / math.sqrt(2 * self.config.num_layers)
        for name, param in self.named_parameters():
            if name.endswith(("out_proj.weight", "linear2.weight")):
                nn.init.normal_(param, std=residual_std)

    # -------------------------------------------------------------------------- forward
    def forward(
        self,
        gene_ids: torch.Tensor,
        padding_mask: torch.Tensor,
        values: torch.Tensor | None = None,
        value_mask: torch.Tensor | None = None,
        output_layer_states: bool = False,
    ) -> BackboneOutput:
        """Encode a padded batch of cells.

        Parameters
        ----------
        gene_ids
            Token ids, integer ``(B, L)``.
        padding_mask
            Boolean ``(B, L)``, ``True`` for real tokens (non-bool masks are read as ``!= 0``).
        values
            Expression per token, ``(B, L)``: integer bin ids in ``[0, n_bins)`` for
            ``value_encoding="binned"``, floats for ``"continuous"``. Must be ``None`` for
            ``"none"``.
        value_mask
            Boolean ``(B, L)``, ``True`` where the expression value is hidden from the model
            (masked-gene pretraining): the MASK bin (binned) or the learned mask embedding
            (continuous) replaces the value. Not accepted with ``value_encoding="none"``.
        output_layer_states
            Also return the token states of every layer (``BackboneOutput.layer_states``).

        Returns
        -------
        :class:`BackboneOutput` with ``hidden`` ``(B, L, d)`` and ``cell_embedding`` ``(B, d)``.
        """
        padding_mask = self._check_inputs(gene_ids, padding_mask, values, value_mask)
        length = gene_ids.shape[1]
        h = self.gene_embedding(gene_ids)  # (B, L, d)
        if self.config.value_encoding != "none":
            h = h + self._encode_values(values, value_mask)  # (B, L, d)
        if self.config.scaled_gene_embedding:
            level = self._value_levels(values, value_mask)  # (B, L)
            h = h + self.scaled_gene_embedding(gene_ids) * level[..., None]  # (B, L, d)
        if self.config.use_positions:
            positions = torch.arange(length, device=gene_ids.device)  # (L,)
            h = h + self.position_embedding(positions)  # (L, d) broadcast over B
        if self._embedding_norm:
            h = self.embedding_norm(h)
        h = self.embedding_dropout(h)
        states = [h] if output_layer_states else None
        for block in self.blocks:
            h = block(h, padding_mask)  # (B, L, d)
            if states is not None:
                states.append(h)
        h = self.norm(h)
        # Padded rows carry finite but meaningless values; zero them so nothing downstream
        # can pick them up by accident.
        h = h.masked_fill(~padding_mask[..., None], 0.0)  # (B, L, d)
        return BackboneOutput(
            hidden=h,
            cell_embedding=self.pool(h, padding_mask),
            layer_states=None if states is None else tuple(states),
        )

    def _encode_values(
        self, values: torch.Tensor, value_mask: torch.Tensor | None
    ) -> torch.Tensor:  # (B, L) -> (B, L, d)
        if self.config.value_encoding == "binned":
            bins = values.long()
            if value_mask is not None:
                bins = bins.masked_fill(value_mask, self.config.n_bins)  # MASK bin
            return self.value_embedding(bins)
        encoded = self.value_encoder(values.to(self.value_mask_embedding.dtype)[..., None])
        if value_mask is not None:
            encoded = torch.where(value_mask[..., None], self.value_mask_embedding, encoded)
        return encoded

    def _value_levels(
        self, values: torch.Tensor, value_mask: torch.Tensor | None
    ) -> torch.Tensor:  # (B, L) -> (B, L) floats, 0 where the value is hidden
        dtype = self.scaled_gene_embedding.weight.dtype
        if self.config.value_encoding == "binned":
            level = values.to(dtype) / (self.config.n_bins - 1)
        else:
            level = values.to(dtype)
        return level if value_mask is None else level.masked_fill(value_mask, 0.0)

    def _check_inputs(
        self,
        gene_ids: torch.Tensor,
        padding_mask: torch.Tensor,
        values: torch.Tensor | None,
        value_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Validate shapes and value arguments; return the padding mask as bool."""
        if gene_ids.dim() != 2:
            raise ValueError(f"gene_ids must have shape (B, L), got {tuple(gene_ids.shape)}.")
        if gene_ids.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"Sequence length {gene_ids.shape[1]} exceeds max_seq_len="
                f"{self.config.max_seq_len}; tokenize with a smaller max_length or build the "
                "backbone with a larger max_seq_len."
            )
        same_shape = {"padding_mask": padding_mask, "values": values, "value_mask": value_mask}
        for name, tensor in same_shape.items():
            if tensor is not None and tensor.shape != gene_ids.shape:
                raise ValueError(
                    f"{name} must have the shape of gene_ids {tuple(gene_ids.shape)}, "
                    f"got {tuple(tensor.shape)}."
                )
        encoding = self.config.value_encoding
        if encoding == "none" and (values is not None or value_mask is not None):
            raise ValueError(
                "This backbone has value_encoding='none': pass neither values nor value_mask "
                "(mask genes through their token ids instead)."
            )
        if encoding != "none" and values is None:
            raise ValueError(f"value_encoding={encoding!r} needs `values` of shape (B, L).")
        if value_mask is not None and value_mask.dtype != torch.bool:
            raise TypeError(f"value_mask must be a bool tensor, got {value_mask.dtype}.")
        if encoding == "binned":
            if values.is_floating_point():
                raise TypeError(f"Binned values must be integer bin ids, got {values.dtype}.")
            if ((values < 0) | (values >= self.config.n_bins)).any():
                raise ValueError(
                    f"Binned values must lie in [0, n_bins={self.config.n_bins}), got range "
                    f"[{int(values.min())}, {int(values.max())}]."
                )
        return padding_mask if padding_mask.dtype == torch.bool else padding_mask != 0

    # ---------------------------------------------------------------------------- pooling
    def pool(
        self, hidden: torch.Tensor, padding_mask: torch.Tensor, pooling: str | None = None
    ) -> torch.Tensor:
        """Reduce token states to one vector per cell.

        Parameters
        ----------
        hidden
            ``(B, L, d)`` hidden states.
        padding_mask
            Boolean ``(B, L)``, ``True`` for real tokens.
        pooling
            ``"cls"`` or ``"mean"``; ``None``: the configured ``BackboneConfig.pooling``.

        Returns
        -------
        ``(B, d)``. ``"cls"``: the state at position 0 (the tokenizer must put a CLS token
        there). ``"mean"``: the mean over all real tokens, excluding padding; a CLS token at
        position 0 counts as a real token and is included.
        """
        pooling = self.config.pooling if pooling is None else pooling
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
        if pooling == "cls":
            return hidden[:, 0]  # (B, d)
        weights = padding_mask.to(hidden.dtype)[..., None]  # (B, L, 1)
        total = (hidden * weights).sum(dim=1)  # (B, d)
        count = weights.sum(dim=1).clamp(min=1.0)  # (B, 1)
        return total / count

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (only those with ``requires_grad`` if ``trainable_only``)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
