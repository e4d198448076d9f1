"""Multi-head self-attention with a key-padding mask.

The four projections are separate ``nn.Linear`` modules that ``forward`` calls as modules, so
that adapter libraries which wrap ``nn.Linear`` children (LoRA through peft) sit on the path
that the data actually takes. ``torch.nn.MultiheadAttention`` is deliberately not used: it
reads ``out_proj.weight`` directly, which bypasses such wrappers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def key_padding_attention_mask(padding_mask: torch.Tensor) -> torch.Tensor:
    """Turn a key-padding mask into a boolean mask for ``scaled_dot_product_attention``.

    Parameters
    ----------
    padding_mask
        Boolean tensor of shape ``(B, L)``, ``True`` where the token is real.

    Returns
    -------
    Boolean tensor of shape ``(B, 1, 1, L)``: ``True`` where a query may attend to the key.
    A sequence without any real token (which no real cell produces) is allowed to attend to
    all of its keys, so that the softmax never runs over an empty set and returns NaN.
    """
    if padding_mask.dtype != torch.bool:
        padding_mask = padding_mask != 0
    has_real_token = padding_mask.any(dim=-1, keepdim=True)  # (B, 1)
    allowed = padding_mask | ~has_real_token  # (B, L)
    return allowed[:, None, None, :]  # (B, 1, 1, L)


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention over a padded batch of token sequences.

    Parameters
    ----------
    hidden_dim
        Width of the hidden states (``BackboneConfig.hidden_dim``); a multiple of
        ``num_heads``.
    num_heads
        Number of attention heads.
    dropout
        Attention-probability dropout, applied only in training mode
        (``BackboneConfig.attention_dropout``).

    Notes
    -----
    Every query attends to every real key of its own sequence. Padded keys are masked out, so
    the result at a real position does not depend on how much padding follows it. Padded query
    rows still attend to the real keys and therefore stay finite.
    """

    def __init__(self, hidden_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_dim // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(hidden_dim, hidden_dim)
        self.k_proj = nn.Linear(hidden_dim, hidden_dim)
        self.v_proj = nn.Linear(hidden_dim, hidden_dim)
        self.out_proj = nn.Linear(hidden_dim, hidden_dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        x = x.view(batch, length, self.num_heads, self.head_dim)  # (B, L, H, D)
        return x.transpose(1, 2)  # (B, H, L, D)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend over the sequence.

        Parameters
        ----------
        x
            Hidden states, shape ``(B, L, d)``.
        padding_mask
            Boolean ``(B, L)``, ``True`` for real tokens; ``None`` means no padding.

        Returns
        -------
        Tensor of shape ``(B, L, d)``.
        """
        batch, length, hidden_dim = x.shape
        q = self._split_heads(self.q_proj(x))  # (B, H, L, D)
        k = self._split_heads(self.k_proj(x))  # (B, H, L, D)
        v = self._split_heads(self.v_proj(x))  # (B, H, L, D)
        attn_mask = None if padding_mask is None else key_padding_attention_mask(padding_mask)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,  # (B, 1, 1, L) broadcast over heads and queries
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, H, L, D)
        y = y.transpose(1, 2).reshape(batch, length, hidden_dim)  # (B, L, d)
        return self.out_proj(y)
