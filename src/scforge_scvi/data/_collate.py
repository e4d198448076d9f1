"""Turn minibatches of registered AnnData fields into model inputs."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._tokenizers import Tokenizer

GENE_IDS, VALUES, PADDING_MASK = "gene_ids", "values", "padding_mask"


class TokenCollator:
    """Collate function that tokenises the count matrix of a minibatch.

    Used as the ``collate_fn`` of scvi-tools' data loaders: the loader fetches a whole
    minibatch of registered fields with one sparse slice, and this replaces the raw counts
    (registry key ``count_key``) by ``gene_ids``, ``values`` and ``padding_mask`` tensors.
    Other fields (labels, batch) pass through as tensors. Picklable, so it works in
    data-loader worker processes.

    Parameters
    ----------
    tokenizer
        The model's tokenizer.
    gene_index
        Vocabulary id of each column of the counts (``GeneVocab.match(adata).vocab_ids``).
    count_key
        Registry key of the raw counts.
    """

    def __init__(self, tokenizer: Tokenizer, gene_index: np.ndarray, count_key: str = "X") -> None:
        self.tokenizer = tokenizer
        self.gene_index = np.asarray(gene_index, dtype=np.int64)
        self.count_key = count_key

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, value in batch.items():
            if key == self.count_key:
                tokens = self.tokenizer(value, self.gene_index)
                out[GENE_IDS] = tokens.gene_ids
                out[PADDING_MASK] = tokens.padding_mask
                if tokens.values is not None:
                    out[VALUES] = tokens.values
            else:
                out[key] = torch.as_tensor(value)
        return out
