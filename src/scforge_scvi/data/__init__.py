"""Data layer: gene vocabulary, preprocessing, tokenizers and masking."""

from ._bucketing import LengthGroupedDataSplitter, LengthGroupedSampler, token_lengths
from ._collate import TokenCollator
from ._datasets import pbmc68k_counts
from ._masking import MaskedBatch, MaskingConfig, mask_tokens
from ._matching import GeneMatch, VocabCoverageError
from ._preprocess import (
    Preprocessing,
    check_raw_counts,
    fit_gene_medians,
    library_size,
    log_normalize,
    nonzero_column_medians,
)
from ._streaming import CellShard, CellStream, StreamedCells, StreamedDataModule
from ._tokenizers import (
    TOKENIZERS,
    BinnedExpressionTokenizer,
    ContinuousTokenizer,
    RankValueTokenizer,
    TokenizedBatch,
    Tokenizer,
    build_tokenizer,
)
from ._vocab import SPECIAL_TOKENS, GeneVocab

__all__ = [
    "SPECIAL_TOKENS",
    "TOKENIZERS",
    "BinnedExpressionTokenizer",
    "CellShard",
    "CellStream",
    "ContinuousTokenizer",
    "GeneMatch",
    "GeneVocab",
    "LengthGroupedDataSplitter",
    "LengthGroupedSampler",
    "MaskedBatch",
    "MaskingConfig",
    "Preprocessing",
    "RankValueTokenizer",
    "StreamedCells",
    "StreamedDataModule",
    "TokenCollator",
    "TokenizedBatch",
    "Tokenizer",
    "VocabCoverageError",
    "build_tokenizer",
    "check_raw_counts",
    "fit_gene_medians",
    "library_size",
    "log_normalize",
    "mask_tokens",
    "nonzero_column_medians",
    "pbmc68k_counts",
    "token_lengths",
]
