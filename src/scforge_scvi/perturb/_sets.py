"""Cell sets for the perturbation model: sampling, batches, and the Lightning data module.

A *set* is ``set_len`` cells of one (perturbation, cell type, batch) group: the ``target``
cells, and as many ``basal`` control cells of the same cell type and batch. Training draws
new sets every epoch (:class:`CellSetBatches`, :class:`PerturbSetDataModule`); prediction
perturbs chosen control cells (:func:`prediction_sets`). Both are read through
:class:`CellSets`, one batch of sets per item, with the keys of
:meth:`~scforge_scvi.perturb._module.PerturbationSetModel.forward`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import anndata as ad
import lightning.pytorch as pl
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from scforge_scvi._errors import ScForgeValueError
from scforge_scvi.data._preprocess import log_normalize


class PerturbCells(NamedTuple):
    """Everything the set loaders read, one row per cell."""

    log1p: sp.csr_matrix
    counts: sp.csr_matrix | None
    perturbation: np.ndarray
    cell_type: np.ndarray
    batch: np.ndarray


def read_cells(manager: Any, keys: Any, *, with_counts: bool) -> PerturbCells:
    """The registered cells of an ``AnnDataManager``: log1p expression, codes, and the raw
    counts when ``with_counts``. ``keys`` has the registry's ``X_KEY``,
    ``PERTURBATION_KEY``, ``CELL_TYPE_KEY`` and ``BATCH_KEY``."""
    counts = sp.csr_matrix(manager.get_from_registry(keys.X_KEY), dtype=np.float32)

    def codes(key: str) -> np.ndarray:
        return np.asarray(manager.get_from_registry(key)).ravel().astype(np.int64)

    return PerturbCells(
        log1p=log_normalize(counts),
        counts=counts if with_counts else None,
        perturbation=codes(keys.PERTURBATION_KEY),
        cell_type=codes(keys.CELL_TYPE_KEY),
        batch=codes(keys.BATCH_KEY),
    )


def control_pools(
    cells: PerturbCells, control_code: int, rows: np.ndarray | None = None
) -> dict[tuple[int, int], np.ndarray]:
    """Row indices of the control cells of each (cell type, batch), ascending.

    Parameters
    ----------
    cells
        The cells.
    control_code
        Perturbation code of the control.
    rows
        Optional boolean mask of the cells that may serve (e.g. the training split).
    """
    keep = cells.perturbation == control_code
    if rows is not None:
        keep &= rows
    frame = pd.DataFrame(
        {"c": cells.cell_type[keep], "b": cells.batch[keep], "row": np.flatnonzero(keep)}
    )
    return {key: group.to_numpy() for key, group in frame.groupby(["c", "b"])["row"]}


def sample_cell_sets(
    groups: Sequence[np.ndarray],
    basal_pools: Sequence[np.ndarray],
    set_len: int,
    rng: np.random.Generator,
    *,
    shuffle: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut groups of target cells into sets of ``set_len`` and pair each with basal cells.

    Each group's cells are shuffled and cut into ``ceil(n / set_len)`` sets; the last set is
    filled up with cells of the same group drawn at random. Each set gets ``set_len`` basal
    cells drawn from its group's pool, without replacement when the pool is large enough.

    Parameters
    ----------
    groups
        Row indices of the target cells of each group (one perturbation in one cell type).
    basal_pools
        Row indices of the control cells that may serve as basal cells, one pool per group.
    set_len
        Cells per set.
    rng
        Source of randomness (seed it for reproducible validation sets).
    shuffle
        Shuffle the order of the sets.

    Returns
    -------
    ``(target, basal, group)``: ``(n_sets, set_len)`` target and basal row indices and the
    group of each set ``(n_sets,)``.
    """
    targets, basals, owner = [], [], []
    for g, (cells, pool) in enumerate(zip(groups, basal_pools, strict=True)):
        if len(cells) == 0:
            continue
        if len(pool) == 0:
            raise ScForgeValueError(f"Group {g} has target cells but an empty basal pool.")
        n_sets = -(-len(cells) // set_len)
        fill = rng.choice(cells, size=n_sets * set_len - len(cells), replace=True)
        target = np.concatenate([rng.permutation(cells), fill]).reshape(n_sets, set_len)
        if len(pool) >= set_len:
            basal = np.stack([rng.choice(pool, size=set_len, replace=False) for _ in range(n_sets)])
        else:
            basal = rng.choice(pool, size=(n_sets, set_len), replace=True)
        targets.append(target)
        basals.append(basal)
        owner.append(np.full(n_sets, g))
    if not targets:
        empty = np.empty((0, set_len), dtype=np.int64)
        return empty, empty.copy(), np.empty(0, dtype=np.int64)
    target, basal, group = np.concatenate(targets), np.concatenate(basals), np.concatenate(owner)
    if shuffle:
        order = rng.permutation(len(group))
        target, basal, group = target[order], basal[order], group[order]
    return target.astype(np.int64), basal.astype(np.int64), group.astype(np.int64)


def prediction_jobs(
    perturbation: np.ndarray,
    labels: dict[str, np.ndarray | None],
    pools: dict[tuple[int, int], np.ndarray],
    *,
    control_label: str,
    categories: Sequence[str],
    perturbations: Sequence[str] | None,
    n_cells: int | str,
    names: dict[str, Sequence[str]],
) -> tuple[list[str], list[tuple[str, int, int, int]]]:
    """What the perturbation model predicts from an AnnData: perturbations and groups.

    Parameters
    ----------
    perturbation
        The perturbation of each cell of the AnnData.
    labels
        ``{"cell_type": [...], "batch": [...]}``: each cell's label (``None``: not registered).
    pools
        :func:`control_pools` of the cells.
    control_label
        The control's name.
    categories
        The model's perturbations; they come first in the output, the others follow in the
        order asked for.
    perturbations, n_cells
        See :meth:`~scforge_scvi.ScForgePerturb.predict`.
    names
        ``{"cell_type": [...], "batch": [...]}``: the model's categories.

    Returns
    -------
    ``(wanted, jobs)``: the perturbations to predict and, in output order, one
    ``(perturbation, cell type, batch, number of cells)`` per group.
    """
    is_perturbed = perturbation != control_label
    cells = pd.DataFrame({"p": perturbation})
    for what, col, key in (("cell types", "c", "cell_type"), ("batches", "b", "batch")):
        cells[col] = 0 if labels[key] is None else pd.Index(names[key]).get_indexer(labels[key])
        bad = is_perturbed & (cells[col].to_numpy() < 0)
        if bad.any():
            unknown = sorted(set(labels[key][bad]))
            raise ValueError(
                f"The AnnData to predict has {what} {unknown} that the model does not know."
            )
    observed = cells[is_perturbed].groupby(["p", "c", "b"], sort=False).size()
    missing = sorted({(c, b) for (_, c, b) in observed.index} - set(pools))
    if missing:
        where = [f"{names['cell_type'][c]} / {names['batch'][b]}" for c, b in missing]
        raise ValueError(
            f"No {control_label!r} control cells for cell type / batch {where} in the "
            "AnnData to predict; its controls are the basal cells."
        )
    if isinstance(n_cells, str) and n_cells not in ("controls", "observed"):
        raise ValueError(f"n_cells must be 'controls', 'observed' or an integer, got {n_cells!r}.")
    if not isinstance(n_cells, str) and int(n_cells) < 1:
        raise ValueError(f"n_cells must be positive, got {n_cells}.")
    if perturbations is None:
        wanted = list(dict.fromkeys(p for p, _, _ in observed.index))
    else:
        wanted = list(dict.fromkeys(str(p) for p in perturbations if str(p) != control_label))
    if not wanted:
        raise ValueError(
            "Nothing to predict: the AnnData has no perturbed cells and no "
            "`perturbations` were requested."
        )
    order = {p: i for i, p in enumerate(categories)}
    rank = {p: order.get(p, len(order) + i) for i, p in enumerate(wanted)}
    if perturbations is None:
        groups = sorted(observed.index, key=lambda g: (rank[g[0]], g[1], g[2]))
    else:
        groups = [(p, c, b) for (c, b) in sorted(pools) for p in wanted]

    def size(p: str, c: int, b: int) -> int:
        if n_cells == "controls":
            return len(pools[(c, b)])
        if n_cells == "observed":
            return int(observed.get((p, c, b), 0)) or len(pools[(c, b)])
        return int(n_cells)

    jobs = [(p, c, b, size(p, c, b)) for p, c, b in groups]
    if not jobs:
        raise ValueError(
            f"No {control_label!r} control cells in the AnnData to predict; its controls "
            "are the basal cells."
        )
    return wanted, jobs


def prediction_sets(
    cells: PerturbCells,
    pools: dict[tuple[int, int], np.ndarray],
    jobs: Sequence[tuple[str, int, int, int]],
    codes: dict[str, int],
    vectors: dict[str, np.ndarray] | None,
    *,
    set_len: int,
    sets_per_batch: int,
    with_batch: bool,
    rng: np.random.Generator,
) -> tuple[CellSets, np.ndarray]:
    """The basal sets of :func:`prediction_jobs`' jobs, ready for the set model.

    A job ``(perturbation, cell type, batch, n)`` perturbs ``n`` control cells of its cell
    type and batch, drawn without replacement while the pool lasts; its last set is padded
    with cells drawn at random.

    Parameters
    ----------
    cells, pools
        The cells and their :func:`control_pools`.
    jobs
        See :func:`prediction_jobs`.
    codes, vectors
        Row index and (for a feature-table model) feature vector of each perturbation.
    set_len, sets_per_batch, with_batch
        Cells per set, sets per batch, and whether the model reads batches.
    rng
        Draws the basal cells.

    Returns
    -------
    ``(sets, keep)``: the :class:`CellSets`, and the positions of the predicted cells (the
    first ``n`` of each job, in job order) in the flattened ``(n_sets * set_len)`` output.
    """
    basal, job, keep, offset = [], [], [], 0
    for j, (_, c, b, n) in enumerate(jobs):
        pool = pools[(c, b)]
        n_sets = -(-n // set_len)
        draw = rng.choice(pool, size=n, replace=len(pool) < n)
        pad = rng.choice(pool, size=n_sets * set_len - n, replace=True)
        basal.append(np.concatenate([draw, pad]).reshape(n_sets, set_len))
        job.append(np.full(n_sets, j))
        keep.append(np.arange(offset, offset + n))
        offset += n_sets * set_len
    job = np.concatenate(job)
    sets = CellSets(
        cells,
        np.concatenate(basal),
        np.array([codes[p] for p, *_ in jobs], dtype=np.int64)[job],
        np.array([b for _, _, b, _ in jobs])[job] if with_batch else None,
        sets_per_batch=sets_per_batch,
        with_counts=cells.counts is not None,
        features=None if vectors is None else np.stack([vectors[p] for p, *_ in jobs])[job],
        cell_type=np.array([c for _, c, _, _ in jobs], dtype=np.int64)[job],
    )
    return sets, np.concatenate(keep)


def prediction_anndata(
    adata: ad.AnnData,
    cells: PerturbCells,
    jobs: Sequence[tuple[str, int, int, int]],
    prediction: np.ndarray,
    *,
    control_code: int,
    perturbation_key: str,
    perturbation_categories: Sequence[str],
    keys: dict[str, str | None],
    names: dict[str, Sequence[str]],
) -> ad.AnnData:
    """The predicted cells of every job followed by the real controls of ``adata`` (log1p).

    ``keys`` and ``names`` map ``"cell_type"`` and ``"batch"`` to their ``obs`` column
    (``None``: not registered) and to the model's categories.
    """
    columns = {
        keys[kind]: (names[kind], axis)
        for kind, axis in (("cell_type", 1), ("batch", 2))
        if keys[kind]
    }
    sizes = [job[3] for job in jobs]
    obs_pred = pd.DataFrame(
        {perturbation_key: np.repeat([job[0] for job in jobs], sizes)},
        index=[f"predicted_{i}" for i in range(sum(sizes))],
    )
    for key, (names, axis) in columns.items():
        obs_pred[key] = np.repeat(np.asarray(names)[[job[axis] for job in jobs]], sizes)
    obs_pred["scforge_predicted"] = True
    is_control = cells.perturbation == control_code
    obs_ctrl = adata.obs.loc[is_control, [perturbation_key, *columns]].astype(str)
    obs_ctrl["scforge_predicted"] = False
    obs = pd.concat([obs_pred, obs_ctrl])
    obs[perturbation_key] = pd.Categorical(
        obs[perturbation_key], categories=perturbation_categories
    )
    for key, (names, _) in columns.items():
        obs[key] = pd.Categorical(obs[key], categories=names)
    control_x = cells.log1p[np.flatnonzero(is_control)].toarray()
    x = np.vstack([prediction.astype(np.float32), control_x])
    return ad.AnnData(X=x, obs=obs, var=adata.var.copy())


def _dense(matrix: sp.csr_matrix, rows: np.ndarray) -> torch.Tensor:
    x = matrix[rows.ravel()].toarray().astype(np.float32, copy=False)
    return torch.from_numpy(x).view(*rows.shape, -1)  # (B, S, G)


class CellSets(Dataset):
    """Fixed cell sets in batches: item ``i`` holds sets ``i * sets_per_batch`` onwards.

    Parameters
    ----------
    cells
        The cells.
    basal
        ``(n_sets, set_len)`` rows of the basal cells of each set.
    perturbation
        Perturbation code of each set.
    batch
        Batch code of each set, or ``None`` for a model without batches.
    sets_per_batch
        Sets per item.
    with_counts
        Also emit the basal raw counts (``basal_input``, for a counts-reading encoder).
    target
        ``(n_sets, set_len)`` rows of the observed cells of each set (training).
    features
        ``(n_sets, F)`` perturbation feature vector of each set (prediction).
    cell_type
        Cell-type code of each set (read by a model's linear path).
    offset
        ``(n_sets, G)`` change added to each set's basal cells in place of the linear
        path's own prediction (training).
    """

    def __init__(
        self,
        cells: PerturbCells,
        basal: np.ndarray,
        perturbation: np.ndarray,
        batch: np.ndarray | None,
        *,
        sets_per_batch: int,
        with_counts: bool,
        target: np.ndarray | None = None,
        features: np.ndarray | None = None,
        cell_type: np.ndarray | None = None,
        offset: np.ndarray | None = None,
    ) -> None:
        self.cells, self.sets_per_batch, self.with_counts = cells, sets_per_batch, with_counts
        self.basal, self.perturbation, self.batch = basal, perturbation, batch
        self.target, self.features = target, features
        self.cell_type, self.offset = cell_type, offset

    @property
    def n_sets(self) -> int:
        return len(self.basal)

    def __len__(self) -> int:
        return -(-self.n_sets // self.sets_per_batch)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        sl = slice(i * self.sets_per_batch, (i + 1) * self.sets_per_batch)
        basal = self.basal[sl]
        out = {
            "basal": _dense(self.cells.log1p, basal),
            "perturbation": torch.as_tensor(self.perturbation[sl], dtype=torch.long),
        }
        if self.target is not None:
            out["target"] = _dense(self.cells.log1p, self.target[sl])
        if self.batch is not None:
            out["batch"] = torch.as_tensor(self.batch[sl], dtype=torch.long)
        if self.with_counts:
            out["basal_input"] = _dense(self.cells.counts, basal)
        if self.features is not None:
            out["perturbation_features"] = torch.from_numpy(self.features[sl])
        if self.cell_type is not None:
            out["cell_type"] = torch.as_tensor(self.cell_type[sl], dtype=torch.long)
        if self.offset is not None:
            out["basal_offset"] = torch.from_numpy(self.offset[sl])
        return out


class CellSetBatches(CellSets):
    """Training or validation sets, drawn per epoch by :func:`sample_cell_sets`.

    Parameters
    ----------
    cells
        The cells.
    groups, pools
        Target cells and basal pool of each group.
    group_perturbation, group_batch, group_cell_type
        Perturbation, batch and cell-type code of each group.
    group_offset
        ``(n_groups, G)`` change added to each group's basal cells (a linear path's
        out-of-fold prediction), or ``None``.
    set_len, sets_per_batch
        Cells per set and sets per batch.
    seed
        Seed; the sets of epoch ``e`` are drawn from ``(seed, e)``.
    resample
        Draw new sets every epoch (training). ``False`` keeps the sets of epoch 0, so that
        the validation loss is measured on the same sets every epoch.
    with_batch, with_counts
        Emit the batch code per set / the basal raw counts.
    """

    def __init__(
        self,
        cells: PerturbCells,
        groups: list[np.ndarray],
        pools: list[np.ndarray],
        group_perturbation: np.ndarray,
        group_batch: np.ndarray,
        group_cell_type: np.ndarray,
        group_offset: np.ndarray | None,
        *,
        set_len: int,
        sets_per_batch: int,
        seed: int,
        resample: bool,
        with_batch: bool,
        with_counts: bool,
    ) -> None:
        super().__init__(
            cells, None, None, None, sets_per_batch=sets_per_batch, with_counts=with_counts
        )
        self.groups, self.pools = groups, pools
        self.group_perturbation, self.group_batch = group_perturbation, group_batch
        self.group_cell_type, self.group_offset = group_cell_type, group_offset
        self.set_len, self.seed, self.resample = set_len, seed, resample
        self.with_batch = with_batch
        self.epoch: int | None = None
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw the sets of ``epoch`` (once only when not resampling)."""
        if self.epoch is not None and (not self.resample or epoch == self.epoch):
            return
        rng = np.random.default_rng([self.seed, epoch if self.resample else 0])
        self.target, self.basal, self.group = sample_cell_sets(
            self.groups, self.pools, self.set_len, rng, shuffle=self.resample
        )
        self.perturbation = self.group_perturbation[self.group]
        self.batch = self.group_batch[self.group] if self.with_batch else None
        self.cell_type = self.group_cell_type[self.group]
        if self.group_offset is not None:
            self.offset = self.group_offset[self.group]
        self.epoch = epoch


class _EpochSampler(Sampler[int]):
    """Yields batch indices in order and passes Lightning's ``set_epoch`` to the dataset."""

    def __init__(self, dataset: CellSetBatches) -> None:
        self.dataset = dataset

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __iter__(self):
        return iter(range(len(self.dataset)))

    def __len__(self) -> int:
        return len(self.dataset)


class PerturbSetDataModule(pl.LightningDataModule):
    """Training and validation cell sets drawn from one registered AnnData.

    Groups are (perturbation, cell type, batch); the target cells of a group are those of the
    stage's split. Basal cells are controls of the same cell type and batch: for training,
    training-split controls only; for validation, every control of the group (few-shot
    held-out perturbations keep their controls in training). Control groups are trained too
    (their target is other control cells).

    Parameters
    ----------
    cells
        The cells.
    split
        ``"train" / "val" / "test"`` per cell.
    control_code
        Perturbation code of the control.
    set_len, sets_per_batch, seed, with_batch, with_counts
        See :class:`CellSetBatches`.
    names
        ``{"cell_type": [...], "batch": [...]}``: category names for messages.
    offsets
        ``{(perturbation code, cell-type code): (G,) change}`` added to the basal cells of
        the groups listed (a linear path's predictions); other groups get none.
    """

    def __init__(
        self,
        cells: PerturbCells,
        split: np.ndarray,
        control_code: int,
        *,
        set_len: int,
        sets_per_batch: int,
        seed: int,
        with_batch: bool,
        with_counts: bool,
        names: dict[str, Sequence[str]],
        offsets: dict[tuple[int, int], np.ndarray] | None = None,
    ) -> None:
        super().__init__()
        self.cells, self.split, self.control_code = cells, split, control_code
        self.names, self.offsets = names, offsets
        self.kwargs = {
            "set_len": set_len,
            "sets_per_batch": sets_per_batch,
            "seed": seed,
            "with_batch": with_batch,
            "with_counts": with_counts,
        }
        self.train_sets = self._build("train")
        self.val_sets = self._build("val")
        if self.train_sets is None:
            raise ValueError("There are no training cells: every cell is in the val/test split.")

    def _build(self, stage: str) -> CellSetBatches | None:
        cells = self.cells
        in_stage = self.split == stage
        if not in_stage.any():
            return None
        pools = control_pools(
            cells, self.control_code, self.split == "train" if stage == "train" else None
        )
        keys = pd.DataFrame(
            {
                "p": cells.perturbation,
                "c": cells.cell_type,
                "b": cells.batch,
                "row": np.arange(len(self.split)),
            }
        )
        groups, group_pools, perts, batches, types = [], [], [], [], []
        for (p, c, b), rows in keys[in_stage].groupby(["p", "c", "b"])["row"]:
            pool = pools.get((c, b))
            if pool is None:
                where = (
                    f"cell type {self.names['cell_type'][c]!r}, batch {self.names['batch'][b]!r}"
                )
                raise ValueError(
                    f"Cells of the {stage} split ({where}) have no training-split control cells "
                    "to use as basal cells; keep the controls of cell types that have training "
                    "cells in the training split (cell-load's few-shot layout)."
                )
            groups.append(rows.to_numpy())
            group_pools.append(pool)
            perts.append(p)
            batches.append(b)
            types.append(c)
        offset = None
        if self.offsets is not None:
            zero = np.zeros(cells.log1p.shape[1], dtype=np.float32)
            offset = np.stack([self.offsets.get(k, zero) for k in zip(perts, types)])
        return CellSetBatches(
            cells,
            groups,
            group_pools,
            np.asarray(perts),
            np.asarray(batches),
            np.asarray(types),
            None if offset is None else offset.astype(np.float32),
            resample=stage == "train",
            **self.kwargs,
        )

    def _loader(self, dataset: CellSetBatches | None) -> DataLoader | list:
        if dataset is None:
            return []
        return DataLoader(dataset, batch_size=None, sampler=_EpochSampler(dataset))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_sets)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_sets)
