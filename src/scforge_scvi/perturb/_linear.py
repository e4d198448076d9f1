"""The linear path of :class:`~scforge_scvi.ScForgePerturb`: ridge from features to change.

A perturbation's pseudobulk change from the control mean of a cell type (log1p space) is
predicted from its feature vector by ridge regression::

    change(p, c) ≈ ((f_p - mean) / scale) W_c + b_c

``b_c`` is the mean training change of cell type ``c`` (so a very large ridge gives
cell-eval's perturbation-mean baseline), ``W_c`` is fitted in closed form, either per cell
type or shared by all cell types, and optionally kept in the top principal gene directions
of the training changes (reduced rank, as in the gene-embedding linear model of
Ahlmann-Eltze et al. 2025). ``mean`` centres the features; ``scale`` is either each feature's
own standard deviation, or one scale shared by all features, which keeps their relative sizes
(a feature table of loadings or embeddings carries information in them). The ridge, the rank,
the sharing and the scaling are chosen by cross-validation over training perturbations (a
perturbation is held out in every cell type at once, as an unseen perturbation is), on the
pseudobulk mean squared error. The out-of-fold predictions of
the chosen fit are what the network is trained on top of: a training perturbation's linear
change then comes from a fit that never saw it, as a test perturbation's does.

The network is trained on top: its basal cells are shifted by the linear change and it
learns what the linear fit leaves. After training, the weight of the network's change
(:data:`RESIDUAL_WEIGHTS`) is chosen on the validation perturbations that training never saw,
by cell-eval's normalised score against the perturbation mean, so that a screen where the
network adds nothing falls back to the linear fit (weight 0). The final linear fit is then
refitted on the training and validation perturbations. :class:`LinearPathMixin` holds these
steps of :class:`~scforge_scvi.ScForgePerturb`; the module stores the fitted arrays
(:class:`~scforge_scvi.perturb._module.LinearPath`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scforge_scvi._logging import logger

from ._metrics import (
    METRICS,
    SCORED_METRICS,
    compare_predictions,
    control_mean_baseline,
    log1p_anndata,
    perturbation_mean_baseline,
)
from ._sets import PerturbCells

#: ridge strengths tried, per fitted row (features are standardised); ``inf``: no slope
RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, np.inf)
#: gene directions kept (top principal components of the training changes); ``None``: all
RANKS = (4, 8, 16, 32, None)
#: one slope per cell type, or one for all
SHARING = ("cell_type", "shared")
#: features scaled one by one to unit variance, or all by one scale (root mean variance)
SCALINGS = ("feature", "common")
#: weights of the network's change tried on the validation perturbations (0: linear alone)
RESIDUAL_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class LinearFit:
    """A fitted linear path: arrays of :meth:`predict` and how they were chosen."""

    mean: np.ndarray  # (F,)
    scale: np.ndarray  # (F,)
    weight: np.ndarray  # (C, F, G)
    bias: np.ndarray  # (C, G)
    ridge: float
    rank: int | None
    sharing: str
    scaling: str
    cv_mse: float

    def predict(self, features: np.ndarray, cell_type: np.ndarray) -> np.ndarray:
        """``(n, G)`` changes of perturbations with ``features`` ``(n, F)`` in ``cell_type``."""
        x = (np.asarray(features, dtype=np.float64) - self.mean) / self.scale
        return np.einsum("nf,nfg->ng", x, self.weight[cell_type]) + self.bias[cell_type]


def group_changes(
    cells: PerturbCells, targets: np.ndarray, controls: np.ndarray, control_code: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pseudobulk change of every perturbed (perturbation, cell type) group.

    Parameters
    ----------
    cells
        The cells.
    targets, controls
        Boolean masks: the perturbed cells whose groups are measured, and the control
        cells whose means are subtracted (per cell type, batches pooled).
    control_code
        Perturbation code of the control.

    Returns
    -------
    ``(perturbation, cell_type, change)``: codes ``(n,)`` and changes ``(n, G)`` of the
    groups whose cell type has controls.
    """
    x = cells.log1p

    def means(rows: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        found, inverse = np.unique(keys[rows], return_inverse=True)
        indicator = sp.csr_matrix(
            (np.ones(len(inverse)), (inverse, np.flatnonzero(rows))), shape=(len(found), len(keys))
        )
        counts = np.asarray(indicator.sum(axis=1)).ravel()
        return found, np.asarray((indicator @ x).todense()) / counts[:, None]

    is_control = cells.perturbation == control_code
    types, control_means = means(controls & is_control, cells.cell_type)
    n_types = int(cells.cell_type.max()) + 1
    group_key = cells.perturbation * n_types + cells.cell_type
    keys, bulk = means(targets & ~is_control & np.isin(cells.cell_type, types), group_key)
    pert, cell_type = keys // n_types, keys % n_types
    change = bulk - control_means[np.searchsorted(types, cell_type)]
    return pert, cell_type, change


def _slopes(x: np.ndarray, y: np.ndarray, ridges: np.ndarray) -> np.ndarray:
    """Ridge slopes ``(R, F, G)`` of centred ``y`` on standardised ``x`` for each ridge."""
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    uty = u.T @ y  # (k, G)
    shrink = np.where(np.isinf(ridges)[:, None], 0.0, s / (s**2 + np.nan_to_num(ridges)[:, None]))
    return np.einsum("kf,rk,kg->rfg", vt, shrink, uty)


def _fit(
    x: np.ndarray, cell_type: np.ndarray, y: np.ndarray, n_types: int, sharing: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slopes ``(R, C, F, G)`` for every ridge of :data:`RIDGE_GRID`, biases ``(C, G)`` and
    the principal gene directions of the centred changes (rows of ``vt``)."""
    bias = np.tile(y.mean(axis=0), (n_types, 1))
    for c in np.unique(cell_type):
        bias[c] = y[cell_type == c].mean(axis=0)
    centred = y - bias[cell_type]
    ridges = np.asarray(RIDGE_GRID)
    shared = _slopes(x, centred, ridges * len(x))
    slopes = np.repeat(shared[:, None], n_types, axis=1)
    if sharing == "cell_type":
        for c in np.unique(cell_type):
            rows = cell_type == c
            if rows.sum() >= 2:
                slopes[:, c] = _slopes(x[rows], centred[rows], ridges * rows.sum())
    return slopes, bias, np.linalg.svd(centred, full_matrices=False)[2]


def _reduced(centred: np.ndarray, vt: np.ndarray, rank: int | None) -> np.ndarray:
    """``centred`` changes (``(..., G)``) kept in the top ``rank`` gene directions."""
    if rank is None or rank >= len(vt):
        return centred
    return (centred @ vt[:rank].T) @ vt[:rank]


def fit_linear_response(
    features: np.ndarray,
    perturbation: np.ndarray,
    cell_type: np.ndarray,
    change: np.ndarray,
    n_types: int,
    *,
    n_folds: int = 20,
    seed: int = 0,
) -> tuple[LinearFit, np.ndarray]:
    """Fit the linear path, choosing ridge, rank, sharing and scaling by cross-validation.

    Parameters
    ----------
    features
        ``(n, F)`` feature vector of each group's perturbation.
    perturbation, cell_type
        ``(n,)`` codes of each group (a perturbation is held out in all its cell types).
    change
        ``(n, G)`` pseudobulk change of each group (:func:`group_changes`).
    n_types
        Number of cell types of the model.
    n_folds
        Folds of the cross-validation over perturbations (leave-one-perturbation-out when
        there are fewer perturbations).
    seed
        Seeds the assignment of perturbations to folds.

    Returns
    -------
    ``(fit, out_of_fold)``: the fit on every group with the chosen ridge, rank, sharing and
    scaling, and each group's change predicted by the fold that held its perturbation out
    (``(n, G)``).
    """
    features = np.asarray(features, dtype=np.float64)
    change = np.asarray(change, dtype=np.float64)
    perts = np.unique(perturbation)
    if len(perts) < 3:
        raise ValueError(
            f"The linear path needs at least 3 training perturbations, got {len(perts)}; "
            "create the model with linear_path=False."
        )
    rng = np.random.default_rng(seed)
    fold_of = dict(zip(perts, rng.permutation(len(perts)) % min(n_folds, len(perts))))
    fold = np.array([fold_of[p] for p in perturbation])

    arms = [(scaling, sharing) for scaling in SCALINGS for sharing in SHARING]

    def folds(arms):
        """Per fold and arm (scaling, sharing): held-out rows and their centred predictions,
        every ridge."""
        for k in np.unique(fold):
            test, train = fold == k, fold != k
            for scaling, sharing in arms:
                mean, scale = _standardiser(features[train], scaling)
                x_train, x_test = (features[train] - mean) / scale, (features[test] - mean) / scale
                slopes, bias, vt = _fit(x_train, cell_type[train], change[train], n_types, sharing)
                centred = np.einsum("nf,rnfg->rng", x_test, slopes[:, cell_type[test]])
                yield test, (scaling, sharing), centred, bias[cell_type[test]], vt

    errors = {(*arm, q): np.zeros(len(RIDGE_GRID)) for arm in arms for q in RANKS}
    for test, arm, centred, bias, vt in folds(arms):
        for rank in RANKS:
            error = (_reduced(centred, vt, rank) + bias - change[test]) ** 2
            errors[(*arm, rank)] += error.sum(axis=(1, 2))
    scaling, sharing, rank, r = min(
        ((*key, i) for key, e in errors.items() for i in range(len(e))),
        key=lambda key: errors[key[:3]][key[3]],
    )
    oof = np.zeros_like(change)
    for test, _, centred, bias, vt in folds([(scaling, sharing)]):  # the chosen arm alone
        oof[test] = _reduced(centred[r], vt, rank) + bias
    mean, scale = _standardiser(features, scaling)
    slopes, bias, vt = _fit((features - mean) / scale, cell_type, change, n_types, sharing)
    weight = _reduced(slopes[r], vt, rank)
    cv_mse = float(errors[(scaling, sharing, rank)][r] / change.size)
    ridge = float(RIDGE_GRID[r])
    return LinearFit(mean, scale, weight, bias, ridge, rank, sharing, scaling, cv_mse), oof


def _standardiser(features: np.ndarray, scaling: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and scale (see :data:`SCALINGS`; ``1`` for constant features)."""
    scale = features.std(axis=0)
    if scaling == "common":
        scale = np.full_like(scale, np.sqrt((scale**2).mean()))
    return features.mean(axis=0), np.where(scale > 1e-12, scale, 1.0)


class LinearPathMixin:
    """The linear-path steps of :class:`~scforge_scvi.ScForgePerturb`'s ``train`` and its
    :meth:`evaluate`."""

    def _feature_rows(self, codes: np.ndarray) -> np.ndarray:
        return self.module.perturbation_encoder.table.cpu().numpy()[codes]

    def _fit_linear(
        self, cells: PerturbCells, targets: np.ndarray, controls: np.ndarray, seed: int
    ) -> tuple[LinearFit, np.ndarray, np.ndarray, np.ndarray]:
        pert, cell_type, change = group_changes(cells, targets, controls, self._control_code)
        fit, oof = fit_linear_response(
            self._feature_rows(pert), pert, cell_type, change, len(self.cell_types_), seed=seed
        )
        return fit, oof, pert, cell_type

    def _linear_offsets(
        self, cells: PerturbCells, split: np.ndarray, seed: int
    ) -> dict[tuple[int, int], np.ndarray]:
        """Fit the linear path on the training split; the basal shift of every group.

        Training groups get their out-of-fold change, validation groups of perturbations
        without training cells the prediction of the fit on the training split.
        """
        train = split == "train"
        fit, oof, pert, cell_type = self._fit_linear(cells, train, train, seed)
        self.module.linear_path.set_fit(fit, residual_weight=1.0)
        offsets = dict(zip(zip(pert, cell_type), oof))
        p_val, c_val, _ = group_changes(cells, split == "val", train, self._control_code)
        for key, change in zip(zip(p_val, c_val), fit.predict(self._feature_rows(p_val), c_val)):
            offsets.setdefault(key, change)
        return {k: v.astype(np.float32) for k, v in offsets.items()}

    def _finish_linear_path(self, cells: PerturbCells, split: np.ndarray, seed: int) -> None:
        """Choose the residual weight on unseen validation perturbations, refit the linear
        path on the training and validation cells, and store both in every kept weight set."""
        setup = self._setup
        names = self.adata.obs[setup["perturbation_key"]].astype(str).to_numpy()
        unseen = sorted(set(names[split == "val"]) - set(names[split == "train"]))
        scores: dict[float, float] = {}
        if unseen:
            rows = (split == "val") & np.isin(names, unseen)
            rows |= (names == self.control_label_) & (split != "test")
            table = self._compare(
                self.adata[rows].copy(),
                self.adata[split == "train"],
                {str(w): w for w in RESIDUAL_WEIGHTS},
                seed,
            )
            scores = {w: float(table.loc[str(w), "score"]) for w in RESIDUAL_WEIGHTS}
            weight = max(RESIDUAL_WEIGHTS, key=lambda w: (round(scores[w], 6), -w))
        else:
            weight = 1.0
            logger.info(
                "No validation perturbation is unseen in training: the network's change keeps "
                "weight 1. Hold whole perturbations out for validation (split_key) to let the "
                "linear path be weighed against the network."
            )
        fit, *_ = self._fit_linear(cells, split != "test", split != "test", seed)
        self.module.linear_path.set_fit(fit, residual_weight=weight)
        buffers = {
            f"linear_path.{k}": v.detach().cpu().clone()
            for k, v in self.module.linear_path.state_dict().items()
        }
        for state in self._weights.values():
            state.update(buffers)
        self.linear_path_ = {
            "ridge": fit.ridge,
            "rank": fit.rank,
            "sharing": fit.sharing,
            "scaling": fit.scaling,
            "cv_mse": fit.cv_mse,
            "residual_weight": weight,
            "validation_scores": scores,
            "validation_perturbations": len(unseen),
        }
        logger.info(
            "Linear path: ridge %g, rank %s (%s slopes, %s scaling); residual weight "
            "%.2f (validation scores %s).",
            fit.ridge,
            fit.rank or "full",
            fit.sharing,
            fit.scaling,
            weight,
            {w: round(v, 3) for w, v in scores.items()},
        )

    def _compare(
        self,
        adata: ad.AnnData,
        reference: ad.AnnData,
        weights: dict[str, float | None],
        seed: int,
        metrics: Sequence[str] = SCORED_METRICS,
    ) -> pd.DataFrame:
        """The baselines and the model's predictions of ``adata``'s perturbed cells, scored.

        ``weights`` maps a method name to the residual weight it predicts with (``None``:
        the model's own); the perturbation means come from ``reference``.
        """
        setup = self._setup
        kw = {
            "perturbation_key": setup["perturbation_key"],
            "control_label": self.control_label_,
            "cell_type_key": setup.get("cell_type_key"),
        }
        real = log1p_anndata(adata, setup.get("layer"))
        train = log1p_anndata(reference, setup.get("layer"))
        preds = {
            "control mean": control_mean_baseline(real, **kw),
            "perturbation mean": perturbation_mean_baseline(train, real, **kw),
        }
        for name, w in weights.items():
            preds[name] = self.predict(adata, residual_weight=w, seed=seed)
        return compare_predictions(real, preds, metrics=metrics, **kw)

    def evaluate(
        self,
        adata: ad.AnnData,
        *,
        reference: ad.AnnData | None = None,
        metrics: Sequence[str] = METRICS,
        seed: int = 0,
    ) -> pd.DataFrame:
        """Score predictions of held-out perturbations beside the baselines, and print them.

        Every perturbed group of ``adata`` is predicted from the controls of its cell type
        (``n_cells="controls"``). Rows: the control mean, the perturbation mean, the linear
        path alone (models with one) and the model; columns: cell-eval's metrics (means over
        the (cell type, perturbation) groups) and the normalised score against the
        perturbation mean (0: no better than it).

        Parameters
        ----------
        adata
            Raw counts of the cells to score (held-out perturbations) and of the controls of
            their cell types, with the model's genes in order.
        reference
            Cells whose perturbation means make the perturbation-mean baseline; default: the
            registered cells of the perturbations that ``adata`` does not hold.
        metrics
            Metrics to compute (:data:`~scforge_scvi.perturb._metrics.METRICS`).
        seed
            Seeds the choice of basal cells.

        Returns
        -------
        One row per method, a column per metric and ``score``.
        """
        key = self._setup["perturbation_key"]
        if reference is None:
            held_out = set(adata.obs[key].astype(str)) - {self.control_label_}
            reference = self.adata[~self.adata.obs[key].astype(str).isin(held_out).to_numpy()]
        weights: dict[str, float | None] = {}
        if self.module.linear_path is not None:
            weights["linear path"] = 0.0
        weights[type(self).__name__] = None
        table = self._compare(adata, reference, weights, seed, metrics)
        print(table.round(4).to_string())
        return table
