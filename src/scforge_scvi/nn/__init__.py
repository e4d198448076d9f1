"""Plain-torch building blocks: the transformer backbone and its heads (no AnnData here)."""

from ._attention import MultiHeadSelfAttention, key_padding_attention_mask
from ._backbone import (
    BackboneConfig,
    BackboneOutput,
    FeedForward,
    PostNormTransformerBlock,
    ScForgeBackbone,
    TransformerBlock,
)
from ._cross_entropy import linear_cross_entropy
from ._heads import ClassificationHead, ExpressionHead, MaskedGeneHead, RegressionHead

__all__ = [
    "BackboneConfig",
    "BackboneOutput",
    "ClassificationHead",
    "ExpressionHead",
    "FeedForward",
    "MaskedGeneHead",
    "MultiHeadSelfAttention",
    "PostNormTransformerBlock",
    "RegressionHead",
    "ScForgeBackbone",
    "TransformerBlock",
    "key_padding_attention_mask",
    "linear_cross_entropy",
]
