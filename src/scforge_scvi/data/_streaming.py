"""Streamed cells: train and embed from backed ``.h5ad`` / ``.zarr`` shards.

The count matrix of a shard is never loaded whole. Rows are read in contiguous ranges
straight from the file's CSR arrays (``indptr``, ``indices``, ``data``), mapped through the
model's vocabulary, and tokenised a minibatch at a time, exactly as the in-memory path does.

How an epoch is laid out (all from index arithmetic, before any data is read):

1. the shards are cut into chunks of ``chunk_size`` consecutive rows; the chunk order is
   shuffled from ``(seed, epoch)``;
2. the chunk-ordered cells are cut into windows of ``buffer_size`` cells (a multiple of the
   global batch); the cells of each window are shuffled, so a minibatch mixes many chunks;
3. each window is cut into global batches of ``batch_size x world_size`` cells, and rank
   ``r`` takes the ``r``-th equal part of every global batch.

So no cell is seen twice in an epoch, every rank takes the same number of steps, and a
global batch holds the same cells whatever the number of ranks (``world_size`` ranks with
``batch_size`` each train like one process with ``batch_size * world_size``). When the cell
count is not a multiple of ``world_size``, up to ``world_size - 1`` cells sit out an epoch
(other ones each epoch). Windows are shared out among data-loader workers round-robin.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import lightning.pytorch as pl
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from scforge_scvi._errors import (
    ScForgeFileNotFoundError,
    ScForgeKeyError,
    ScForgeValueError,
)
from scforge_scvi._logging import logger

from ._collate import TokenCollator
from ._matching import VocabCoverageError
from ._tokenizers import Tokenizer
from ._vocab import GeneVocab

#: extra key of streamed batches: the global index of each cell (shard offset + row)
CELL_INDEX_KEY = "ind_x"


class CellShard:
    """One AnnData file on disk (``.h5ad`` or ``.zarr``), read a row range at a time.

    Only metadata (``var``, the matrix shape and encoding) is read on construction; the file
    is reopened lazily in every process that reads it (data-loader workers included).

    Parameters
    ----------
    path
        The ``.h5ad`` file or ``.zarr`` store.
    layer
        Layer holding raw counts; ``None`` reads ``X``.
    """

    def __init__(self, path: str | os.PathLike, layer: str | None = None) -> None:
        self.path = Path(path)
        self.layer = layer
        self._group: Any = None
        if not self.path.exists():
            raise ScForgeFileNotFoundError(f"Shard '{self.path}' does not exist.")
        if self.path.suffix != ".zarr" and self.path.is_dir():
            raise ScForgeValueError(
                f"'{self.path}' is a directory, not an .h5ad file; pass .h5ad files or .zarr "
                "stores (directories named *.zarr)."
            )
        if self.path.suffix != ".zarr" and not h5py.is_hdf5(self.path):
            raise ScForgeValueError(
                f"Cannot open shard '{self.path}': it is not an HDF5 file, as an .h5ad written "
                "by anndata is; pass .h5ad files or .zarr stores."
            )
        group = self._open()
        try:
            elem = self._matrix(group)
            encoding = str(elem.attrs.get("encoding-type", "array"))
            if encoding == "csc_matrix":
                raise ScForgeValueError(
                    f"The counts of '{self.path}' ({self._where}) are stored column by column "
                    "(CSC), so rows cannot be read in chunks; rewrite the file with "
                    "adata.X = adata.X.tocsr() (or the layer likewise)."
                )
            self.sparse = encoding == "csr_matrix"
            shape = tuple(elem.attrs["shape"]) if self.sparse else tuple(elem.shape)
            self.n_obs, self.n_vars = int(shape[0]), int(shape[1])
            self.var: pd.DataFrame = ad.io.read_elem(group["var"])
        finally:
            self.close()

    @property
    def _where(self) -> str:
        return "X" if self.layer is None else f"layers['{self.layer}']"

    def _open(self):
        if self._group is None:
            try:
                if self.path.suffix == ".zarr":
                    import zarr

                    self._group = zarr.open_group(str(self.path), mode="r")
                else:
                    self._group = h5py.File(self.path, "r")
            except Exception as err:
                raise OSError(f"Cannot open shard '{self.path}': {err}") from err
        return self._group

    def close(self) -> None:
        """Close the file handle (it reopens on the next read)."""
        if isinstance(self._group, h5py.File):
            self._group.close()
        self._group = None

    def _matrix(self, group):
        if self.layer is None:
            return group["X"]
        layers = group["layers"] if "layers" in group else {}  # noqa: SIM401 (zarr groups)
        if self.layer not in layers:
            raise ScForgeKeyError(
                f"Layer '{self.layer}' is not in '{self.path}'; its layers: "
                f"{', '.join(layers) or 'none'}."
            )
        return layers[self.layer]

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Raw counts of rows ``start:stop`` as CSR (columns in the file's gene order)."""
        try:
            elem = self._matrix(self._open())
            if not self.sparse:
                return sp.csr_matrix(np.asarray(elem[start:stop]))
            indptr = np.asarray(elem["indptr"][start : stop + 1], dtype=np.int64)
            lo, hi = int(indptr[0]), int(indptr[-1])
            indices = np.asarray(elem["indices"][lo:hi])
            data = np.asarray(elem["data"][lo:hi])
        except (OSError, KeyError, ValueError, RuntimeError) as err:
            self.close()
            raise OSError(
                f"Reading cells {start}:{stop} of '{self.path}' failed ({err}); was the file "
                "moved, truncated or overwritten while it was being read?"
            ) from err
        if len(indptr) != stop - start + 1 or len(data) != hi - lo:
            raise OSError(f"'{self.path}' ended early while reading cells {start}:{stop}.")
        return sp.csr_matrix((data, indices, indptr - lo), shape=(stop - start, self.n_vars))

    def obs_column(self, key: str) -> pd.Series:
        """One ``obs`` column (e.g. labels), read without the rest of the file."""
        group = self._open()
        try:
            obs = group["obs"]
            if key not in obs:
                columns = [c for c in obs if c != obs.attrs.get("_index", "_index")]
                raise ScForgeKeyError(
                    f"'{key}' is not an obs column of '{self.path}'; available columns: "
                    f"{', '.join(columns) or 'none'}."
                )
            return pd.Series(ad.io.read_elem(obs[key]))
        finally:
            self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_group"] = None  # handles do not cross processes
        return state

    def __repr__(self) -> str:
        return f"CellShard('{self.path}', {self.n_obs} cells x {self.n_vars} genes)"


class StreamedCells:
    """A collection of AnnData shards on disk, read in chunks instead of into memory.

    The shards may hold different genes: each is mapped through the model's vocabulary.

    Parameters
    ----------
    paths
        ``.h5ad`` files and/or ``.zarr`` stores (one path or a list).
    layer
        Layer holding the raw counts in every shard; ``None`` reads ``X``.
    chunk_size
        Consecutive rows read together; the unit of shuffling across the files.
    buffer_size
        Cells shuffled together in memory (rounded to a multiple of the global batch); a
        larger buffer mixes more chunks per minibatch and holds more counts in memory.

    Examples
    --------
    >>> cells = sf.data.StreamedCells(["atlas_part1.h5ad", "atlas_part2.h5ad"])
    >>> adata = cells.sample(5_000)                  # in memory: for setup and the vocabulary
    >>> sf.ScForge.setup_anndata(adata)
    >>> model = sf.ScForge(adata, vocab="human_protein_coding")
    >>> model.train(max_epochs=1, data=cells)        # streams every cell of every shard
    >>> emb = model.get_latent_representation(cells)
    """

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        layer: str | None = None,
        chunk_size: int = 256,
        buffer_size: int = 8192,
    ) -> None:
        if isinstance(paths, str | os.PathLike):
            paths = [paths]
        if not paths:
            raise ScForgeValueError("StreamedCells needs at least one .h5ad or .zarr path.")
        if chunk_size < 1 or buffer_size < 1:
            raise ScForgeValueError(
                f"chunk_size and buffer_size must be >= 1; got {chunk_size}, {buffer_size}."
            )
        self.layer, self.chunk_size, self.buffer_size = layer, int(chunk_size), int(buffer_size)
        self.shards: list[CellShard] = []
        for path in paths:
            shard = CellShard(path, layer=layer)
            if shard.n_obs == 0:
                warnings.warn(f"Shard '{shard.path}' holds no cells; skipped.", stacklevel=2)
                continue
            self.shards.append(shard)
        if not self.shards:
            raise ScForgeValueError(f"None of the {len(paths)} shards holds any cell.")
        sizes = np.array([s.n_obs for s in self.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self._check_common_genes()

    def _check_common_genes(self) -> None:
        """Refuse a shard that names none of the other shards' genes (in ``var_names`` or
        any text column of ``var``): its cells could not be related to the others'."""
        if len(self.shards) < 2:
            return
        ids = [_gene_identifiers(shard.var) for shard in self.shards]
        for i in reversed(range(len(self.shards))):
            others = set().union(*(ids[j] for j in range(len(ids)) if j != i))
            if ids[i] & others:
                continue
            shard = self.shards[i]
            other = [str(s.path) for j, s in enumerate(self.shards) if j != i]
            theirs = [str(g) for g in self.shards[0 if i else 1].var.index[:3]]
            mine = [str(g) for g in shard.var.index[:3]]
            raise ScForgeValueError(
                f"Shard '{shard.path}' shares no gene with the other shard(s) "
                f"{', '.join(repr(o) for o in other[:3])} (its genes e.g. {mine}, theirs "
                f"{theirs}); shards are joined on their gene identifiers, so every shard must "
                "name (mostly) the same genes the same way, in var_names or a var column."
            )

    @property
    def n_obs(self) -> int:
        """Cells in all shards."""
        return int(self.offsets[-1])

    def __len__(self) -> int:
        return self.n_obs

    def __repr__(self) -> str:
        return f"StreamedCells({len(self.shards)} shards, {self.n_obs} cells)"

    # -- genes -------------------------------------------------------------------------------
    def match(self, vocab: GeneVocab, **kwargs: Any) -> list[np.ndarray]:
        """Vocabulary id of every gene of every shard (``-1`` outside the vocabulary).

        ``kwargs`` go to :meth:`GeneVocab.match` (``gene_key``, ``min_coverage``, ...).

        Raises
        ------
        VocabCoverageError
            Naming the shard whose genes do not reach ``min_coverage``.
        """
        vocab_ids = []
        for shard in self.shards:
            try:
                match = vocab.match(ad.AnnData(var=shard.var), **kwargs)
            except VocabCoverageError as err:
                raise VocabCoverageError(f"Shard '{shard.path}': {err}") from None
            vocab_ids.append(match.vocab_ids)
        return vocab_ids

    # -- reading -----------------------------------------------------------------------------
    def _locate(self, cells: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.offsets, cells, side="right") - 1

    def read(
        self,
        cells: np.ndarray,
        columns: Sequence[np.ndarray] | None = None,
        n_columns: int | None = None,
    ) -> sp.csr_matrix:
        """Counts of the given global cell indices (sorted ascending), one CSR matrix.

        Reads each touched chunk once, as one contiguous row range. With ``columns`` (one
        array per shard), shard gene ``j`` is written to column ``columns[s][j]`` of a matrix
        with ``n_columns`` columns (default: the largest column + 1), so shards with different
        genes stack into one matrix; otherwise all shards must have the same number of genes.
        """
        cells = np.asarray(cells, dtype=np.int64)
        shard_of = self._locate(cells)
        blocks = []
        n_cols = n_columns
        if columns is not None and n_cols is None:
            n_cols = int(max(c.max(initial=-1) for c in columns)) + 1
        for s in np.unique(shard_of):
            shard = self.shards[s]
            local = cells[shard_of == s] - self.offsets[s]
            chunk = local // self.chunk_size
            bounds = np.flatnonzero(np.diff(chunk)) + 1
            for rows in np.split(local, bounds):
                lo, hi = int(rows[0]), int(rows[-1]) + 1
                block = shard.read_rows(lo, hi)[rows - lo]
                if columns is not None:
                    block = sp.csr_matrix(
                        (block.data, columns[s][block.indices], block.indptr),
                        shape=(block.shape[0], n_cols),
                    )
                blocks.append(block)
        if len({b.shape[1] for b in blocks}) > 1:
            raise ValueError("The shards hold different genes: pass columns= to read them.")
        return sp.vstack(blocks, format="csr")

    def sample(self, n_cells: int = 5000, *, seed: int = 0) -> ad.AnnData:
        """Random cells of all shards, in memory, for ``setup_anndata`` and the vocabulary.

        ``obs`` holds every obs column of the shards plus ``shard`` (the file name); shards
        with different genes are joined on the union of genes (absent genes count zero).
        The counts are in ``X`` and, when the shards keep them in a layer, in that layer too.
        """
        rng = np.random.default_rng(seed)
        n = min(int(n_cells), self.n_obs)
        cells = np.sort(rng.choice(self.n_obs, size=n, replace=False))
        shard_of = self._locate(cells)
        parts = []
        for s in np.unique(shard_of):
            shard = self.shards[s]
            picked = cells[shard_of == s]
            group = shard._open()
            try:
                obs = ad.io.read_elem(group["obs"])
            finally:
                shard.close()
            local = picked - self.offsets[s]
            obs = obs.iloc[local].copy()
            obs["shard"] = shard.path.name
            parts.append(ad.AnnData(X=self.read(picked), obs=obs, var=shard.var.copy()))
        if len(parts) == 1:
            joined = parts[0]
        else:
            joined = ad.concat(parts, join="outer", merge="first", index_unique="-")
            joined.X = sp.csr_matrix(joined.X)
        if self.layer is not None:
            joined.layers[self.layer] = joined.X.copy()
        return joined

    def labels(self, key: str) -> pd.Series:
        """The obs column ``key`` of every shard, concatenated in global cell order."""
        return pd.concat([s.obs_column(key) for s in self.shards], ignore_index=True)

    def label_codes(
        self, key: str, class_names: Sequence[str], unlabeled_category: str
    ) -> np.ndarray:
        """Per cell, the index of its label in ``class_names``, or ``len(class_names)`` for
        a missing or unlabelled one (left out of the loss).

        Raises
        ------
        ValueError
            If a cell holds a label that is none of ``class_names``.
        """
        names = list(class_names)
        labels = self.labels(key)
        codes = pd.Categorical(labels.astype("string"), categories=names).codes.astype(np.int64)
        unlabelled = labels.isna().to_numpy() | (labels.astype(str) == unlabeled_category)
        unknown = (codes < 0) & ~unlabelled
        if unknown.any():
            shard = self.shards[int(self._locate(np.flatnonzero(unknown)[:1])[0])]
            new = sorted(set(labels[unknown].astype(str)))[:5]
            raise ValueError(
                f"obs['{key}'] of '{shard.path}' holds labels the model does not know: {new}; "
                f"its classes are {names}."
            )
        codes[codes < 0] = len(names)
        return codes

    @classmethod
    def from_backed(cls, adata: ad.AnnData, layer: str | None, why: str) -> StreamedCells:
        """The file of a backed AnnData as streamed cells (``why`` names what needs them).

        Every process of a multi-process run reads its share of each batch from the file
        itself; an in-memory AnnData cannot be shared so and is refused.
        """
        if not (adata.isbacked and adata.filename is not None and not adata.is_view):
            raise ScForgeValueError(
                f"{why} needs streamed cells: pass "
                "data=StreamedCells(...) (or .h5ad/.zarr paths), or register a backed AnnData "
                "(anndata.read_h5ad(path, backed='r')), so that each process reads its share "
                "of every batch from disk; this AnnData is in memory."
            )
        logger.info(
            f"{why}: streaming the cells of the backed file "
            f"'{adata.filename}' ({'X' if layer is None else f'layers[{layer!r}]'})."
        )
        return cls(adata.filename, layer=layer)


def _gene_identifiers(var: pd.DataFrame) -> set[str]:
    """Every gene identifier a shard's ``var`` holds (version suffixes of Ensembl ids off)."""
    values = [var.index.astype(str)]
    for column in var.columns:
        col = var[column]
        if col.dtype == object or isinstance(col.dtype, pd.CategoricalDtype | pd.StringDtype):
            values.append(pd.Index(col.astype(str)))
    names = pd.Index(np.concatenate([v.to_numpy(dtype=object) for v in values]))
    return set(names.str.replace(r"^(ENS[A-Z]*G\d+)\.\d+$", r"\1", regex=True))


# ------------------------------------------------------------------------------ the stream
class CellStream(IterableDataset):
    """Minibatches of streamed cells for one rank, laid out as the module docstring says.

    Parameters
    ----------
    cells
        The shards.
    cell_ids
        Global indices of the cells of this stage (train, validation or inference), sorted.
    columns, n_columns
        Per shard, the column of each shard gene in the tokenizer's input, and the number
        of columns there (see :meth:`StreamedCells.read`).
    collate
        Turns ``{"X": counts, ...}`` into model inputs (a :class:`TokenCollator`).
    batch_size
        Cells per minibatch on each rank.
    shuffle
        Shuffle chunks and windows every epoch (training); off for validation/inference.
    seed
        Seeds the shuffling (with the epoch).
    labels
        Per global cell, the label code (``int64``), or ``None``.
    labels_key, count_key
        Registry keys of labels and counts in the emitted batches.
    """

    def __init__(
        self,
        cells: StreamedCells,
        cell_ids: np.ndarray,
        *,
        columns: Sequence[np.ndarray],
        n_columns: int,
        collate: Any,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        labels: np.ndarray | None = None,
        labels_key: str = "labels",
        count_key: str = "X",
    ) -> None:
        self.cells, self.cell_ids = cells, np.asarray(cell_ids, dtype=np.int64)
        self.columns, self.n_columns, self.collate = list(columns), int(n_columns), collate
        self.batch_size, self.shuffle, self.seed = int(batch_size), bool(shuffle), int(seed)
        self.labels, self.labels_key, self.count_key = labels, labels_key, count_key
        self.epoch, self.rank, self.world_size = 0, 0, 1
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")

    @classmethod
    def tokenized(
        cls,
        cells: StreamedCells,
        cell_ids: np.ndarray,
        tokenizer: Tokenizer,
        vocab: GeneVocab,
        match_kwargs: dict[str, Any],
        **kwargs: Any,
    ) -> CellStream:
        """A stream of ``cells`` tokenised by ``tokenizer`` over the model's ``vocab``.

        Each shard gene is read into the column of its vocabulary id; genes outside the
        vocabulary share one last column: they count towards the library size, as in the
        in-memory path, but are never tokens. ``match_kwargs`` go to
        :meth:`GeneVocab.match`, ``kwargs`` to the constructor.
        """
        unknown = len(vocab)
        columns = [np.where(ids >= 0, ids, unknown) for ids in cells.match(vocab, **match_kwargs)]
        gene_index = np.append(np.arange(len(vocab)), -1)
        collate = TokenCollator(tokenizer, gene_index, kwargs.get("count_key", "X"))
        return cls(
            cells, cell_ids, columns=columns, n_columns=unknown + 1, collate=collate, **kwargs
        )

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (called when each training epoch starts)."""
        self.epoch = int(epoch)

    def set_rank(self, rank: int, world_size: int) -> None:
        """This process's share of every global batch."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}.")
        self.rank, self.world_size = int(rank), int(world_size)

    # -- layout ------------------------------------------------------------------------------
    @property
    def _global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def _window(self) -> int:
        g = self._global_batch
        return max(g, self.cells.buffer_size // g * g)

    def _windows(self) -> list[tuple[int, int, int]]:
        """``(start, stop, used)`` of each window. The last one leaves out the cell count's
        remainder modulo the world size, after its shuffle (other cells each epoch)."""
        n, w = len(self.cell_ids), self._window
        windows = [(a, min(a + w, n), min(a + w, n) - a) for a in range(0, n, w)]
        if windows:
            a, z, used = windows[-1]
            windows[-1] = (a, z, used - n % self.world_size)
        return windows

    def __len__(self) -> int:
        """Minibatches per epoch on this rank (the same on every rank)."""
        g = self._global_batch
        return sum(-(-used // g) for _, _, used in self._windows())

    def _epoch_order(self) -> np.ndarray:
        """The stage's cells, chunk by chunk, in this epoch's chunk order."""
        ids = self.cell_ids
        if not self.shuffle:
            return ids
        shard_of = self.cells._locate(ids)
        chunk = (ids - self.cells.offsets[shard_of]) // self.cells.chunk_size
        key = shard_of * (1 << 40) + chunk  # one key per (shard, chunk)
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        runs = np.split(ids, starts[1:])
        rng = np.random.default_rng([self.seed, self.epoch])
        return np.concatenate([runs[i] for i in rng.permutation(len(runs))])

    # -- iteration ---------------------------------------------------------------------------
    def __iter__(self):
        if len(self.cell_ids) < self.world_size:
            raise ValueError(
                f"{len(self.cell_ids)} cells cannot be shared out among {self.world_size} ranks."
            )
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        order = self._epoch_order()
        g = self._global_batch
        for j, (a, z, used) in enumerate(self._windows()):
            if j % n_workers != worker or used == 0:
                continue
            window = order[a:z]
            if self.shuffle:
                window = window[
                    np.random.default_rng([self.seed, self.epoch, j]).permutation(z - a)
                ]
            window = window[:used]
            # this rank's part of each global batch of the window
            mine = []
            for start in range(0, len(window), g):
                batch = window[start : start + g]
                part = len(batch) // self.world_size
                mine.append(batch[self.rank * part : (self.rank + 1) * part])
            wanted = np.concatenate(mine)
            sorted_ids = np.sort(wanted)
            counts = self.cells.read(sorted_ids, self.columns, self.n_columns)
            rows = np.searchsorted(sorted_ids, wanted)
            offset = 0
            for part_ids in mine:
                sel = rows[offset : offset + len(part_ids)]
                offset += len(part_ids)
                yield self._batch(counts[sel], part_ids)

    def _batch(self, counts: sp.csr_matrix, ids: np.ndarray) -> dict[str, torch.Tensor]:
        batch: dict[str, Any] = {self.count_key: counts, CELL_INDEX_KEY: ids[:, None]}
        if self.labels is not None:
            batch[self.labels_key] = self.labels[ids][:, None]
        return self.collate(batch)


class StreamedDataModule(pl.LightningDataModule):
    """Training and validation streams for Lightning (one rank's share under DDP).

    The rank and world size are read from the trainer when the loaders are built; the
    training stream is reshuffled by :meth:`set_epoch`, which
    :class:`~scforge_scvi.train.StreamEpoch` calls at the start of every epoch.

    Parameters
    ----------
    train, validation
        The streams (``validation`` may be ``None``).
    num_workers
        Data-loader worker processes (tokenisation runs there).
    """

    def __init__(
        self, train: CellStream, validation: CellStream | None, *, num_workers: int = 0
    ) -> None:
        super().__init__()
        self.train_stream, self.val_stream = train, validation
        self.num_workers = int(num_workers)
        self.n_train = len(train.cell_ids)
        self.n_val = 0 if validation is None else len(validation.cell_ids)

    def set_epoch(self, epoch: int) -> None:
        self.train_stream.set_epoch(epoch)

    def _loader(self, stream: CellStream) -> DataLoader:
        trainer = self.trainer
        if trainer is not None:
            stream.set_rank(trainer.global_rank, trainer.world_size)
        return DataLoader(
            stream, batch_size=None, num_workers=self.num_workers, persistent_workers=False
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_stream)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_stream is None else self._loader(self.val_stream)


def training_streams(
    cells: StreamedCells,
    splits: Sequence[np.ndarray],
    tokenizer: Tokenizer,
    vocab: GeneVocab,
    match_kwargs: dict[str, Any],
    *,
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    labels: np.ndarray | None = None,
    labels_key: str = "labels",
    count_key: str = "X",
) -> StreamedDataModule:
    """Training and validation streams over the first two of ``splits`` (cell ids).

    Cells are tokenised as :meth:`CellStream.tokenized` says; the training stream is
    shuffled, the validation stream (none when it has no cells) is not.
    """
    common = {
        "batch_size": batch_size,
        "seed": seed,
        "labels": labels,
        "labels_key": labels_key,
        "count_key": count_key,
    }
    train = CellStream.tokenized(
        cells, splits[0], tokenizer, vocab, match_kwargs, shuffle=True, **common
    )
    val = None
    if len(splits[1]):
        val = CellStream.tokenized(
            cells, splits[1], tokenizer, vocab, match_kwargs, shuffle=False, **common
        )
    return StreamedDataModule(train, val, num_workers=num_workers)
