"""Length-grouped minibatches: cells of similar token length share a batch.

A batch is padded to its longest cell, so a random batch of cells with 200 to 1,000 expressed
genes wastes a large share of its compute on padding (and attention costs ``L^2``). Grouping
cells of similar length removes most of it:

- training: the epoch's shuffled order is cut into groups of ``group_batches`` batches; each
  group is sorted by length and cut into batches, and the batches are shuffled. Every cell
  is still seen once per epoch, in an order drawn from torch's global generator (so the
  per-epoch reseeding of :class:`~scforge_scvi.train.EpochSeed` makes it reproducible);
- evaluation: cells are taken longest first, so batches pad almost nothing; the callers put
  the results back in the original cell order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from scvi.dataloaders import DataSplitter
from torch.utils.data import DataLoader, Sampler

_CHUNK_ROWS = 4096


def token_lengths(counts: Any, gene_index: np.ndarray, max_genes: int, n_extra: int) -> np.ndarray:
    """Number of tokens the tokenizer emits for each cell, without tokenising.

    Parameters
    ----------
    counts
        ``(n_cells, G)`` raw counts: scipy sparse, numpy, or a backed AnnData matrix.
    gene_index
        ``(G,)`` vocabulary id of each column, ``-1`` outside the vocabulary.
    max_genes
        Genes kept per cell.
    n_extra
        Tokens added to every cell (1 for a ``<cls>`` token, else 0).

    Returns
    -------
    ``(n_cells,)`` int64: ``min(expressed vocabulary genes, max_genes) + n_extra``, at least 1.
    """
    in_vocab = np.asarray(gene_index) >= 0
    n_cells = counts.shape[0]
    out = np.empty(n_cells, dtype=np.int64)
    csr_in_memory = sp.issparse(counts) and counts.format == "csr"
    step = n_cells if csr_in_memory else _CHUNK_ROWS  # whole in-memory CSR in one pass
    for start in range(0, n_cells, step):
        block = counts[start : start + step]
        if sp.issparse(block):
            block = block.tocsr()
            expressed = in_vocab[block.indices] & (block.data > 0)
            cum = np.concatenate([[0], np.cumsum(expressed, dtype=np.int64)])
            n = cum[block.indptr[1:]] - cum[block.indptr[:-1]]
        else:
            n = (np.asarray(block)[:, in_vocab] > 0).sum(axis=1)
        out[start : start + len(n)] = n
    np.minimum(out, max_genes, out=out)
    out += n_extra
    np.maximum(out, 1, out=out)  # an empty cell still gets one token
    return out


class LengthGroupedSampler(Sampler[np.ndarray]):
    """Minibatches of dataset positions, grouped by token length.

    Parameters
    ----------
    lengths
        Token length of each position of the dataset.
    batch_size
        Cells per minibatch (the last one may be smaller).
    shuffle
        Training order (shuffled groups, shuffled batches) or evaluation order (longest
        first, fixed).
    group_batches
        Batches per length group when shuffling: larger groups pad less, smaller groups mix
        cells of different lengths more. ``1`` is a plain shuffle.
    """

    def __init__(
        self, lengths: np.ndarray, batch_size: int, *, shuffle: bool, group_batches: int = 16
    ) -> None:
        if batch_size < 1 or group_batches < 1:
            raise ValueError(
                f"batch_size and group_batches must be >= 1, got {batch_size} and {group_batches}."
            )
        self.lengths = np.asarray(lengths)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.group_batches = int(group_batches)

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self) -> Iterator[np.ndarray]:
        n, size = len(self.lengths), self.batch_size
        if not self.shuffle:
            order = np.argsort(-self.lengths, kind="stable")
            yield from (order[i : i + size] for i in range(0, n, size))
            return
        # one draw from the global generator, as torch's RandomSampler does
        seed = int(torch.empty((), dtype=torch.int64).random_().item())
        rng = np.random.default_rng(seed)
        order = rng.permutation(n)
        group = size * self.group_batches
        for start in range(0, n, group):
            chunk = order[start : start + group]
            order[start : start + group] = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
        batches = [order[i : i + size] for i in range(0, n, size)]
        for b in rng.permutation(len(batches)):
            yield batches[b]


def length_grouped_loader(
    adata_manager,
    indices: np.ndarray,
    lengths: np.ndarray,
    *,
    batch_size: int,
    shuffle: bool,
    collate_fn,
    group_batches: int = 16,
    num_workers: int = 0,
    **kwargs: Any,
) -> DataLoader:
    """A data loader over registered cells whose minibatches are grouped by length.

    Like scvi-tools' ``AnnDataLoader``, every minibatch is one sparse slice of the registered
    fields (``dataset[positions]``) handed to ``collate_fn``; only the sampler differs.
    ``lengths[i]`` is the token length of cell ``indices[i]``.
    """
    dataset = adata_manager.create_torch_dataset(indices=indices, load_sparse_tensor=True)
    sampler = LengthGroupedSampler(
        lengths, batch_size, shuffle=shuffle, group_batches=group_batches
    )
    return DataLoader(
        dataset,
        sampler=sampler,
        batch_size=None,  # the sampler yields whole minibatches
        collate_fn=collate_fn,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        **kwargs,
    )


class LengthGroupedDataSplitter(DataSplitter):
    """scvi-tools' ``DataSplitter`` with length-grouped training and validation batches.

    Parameters
    ----------
    adata_manager
        Manager of the registered AnnData.
    lengths
        Token length of every cell of the AnnData (:func:`token_lengths`).
    external_indexing
        ``[train, validation, test]`` cell indices.
    batch_size
        Cells per minibatch.
    collate_fn
        Tokenising collate function.
    group_batches
        See :class:`LengthGroupedSampler`.
    num_workers
        Data-loader worker processes.
    """

    def __init__(
        self,
        adata_manager,
        *,
        lengths: np.ndarray,
        external_indexing: list[np.ndarray],
        batch_size: int,
        collate_fn,
        group_batches: int = 16,
        num_workers: int = 0,
    ) -> None:
        super().__init__(
            adata_manager,
            batch_size=batch_size,
            load_sparse_tensor=True,
            external_indexing=external_indexing,
        )
        self.lengths = np.asarray(lengths)
        self.loader_kwargs = {
            "batch_size": batch_size,
            "collate_fn": collate_fn,
            "group_batches": group_batches,
            "num_workers": num_workers,
        }

    def _grouped(self, indices: np.ndarray, shuffle: bool) -> DataLoader:
        indices = np.asarray(indices, dtype=np.int64)
        return length_grouped_loader(
            self.adata_manager,
            indices,
            self.lengths[indices],
            shuffle=shuffle,
            **self.loader_kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled, length-grouped training batches."""
        return self._grouped(self.train_idx, shuffle=True)

    def val_dataloader(self) -> DataLoader | None:
        """Validation batches, longest cells first (the same batches every epoch)."""
        if len(self.val_idx) == 0:
            return None
        return self._grouped(self.val_idx, shuffle=False)

    def test_dataloader(self) -> DataLoader | None:
        """Test batches, longest cells first."""
        if len(self.test_idx) == 0:
            return None
        return self._grouped(self.test_idx, shuffle=False)
