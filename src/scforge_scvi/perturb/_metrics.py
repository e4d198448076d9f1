"""Perturbation-response baselines and cell-eval-style metrics.

Everything here reads AnnData objects whose ``X`` holds log1p-normalised expression (use
:func:`log1p_anndata` on raw counts) and returns plain DataFrames, dicts or AnnData in the
layout of :meth:`~scforge_scvi.ScForgePerturb.predict`: one row per predicted cell, the real
controls included, ``obs`` holding the perturbation and the cell type.

Baselines
    :func:`control_mean_baseline` (no effect), :func:`perturbation_mean_baseline` (the
    cell-eval baseline: every perturbed cell set to the mean of the training perturbation
    means), :func:`linear_baseline` (the linear model of Ahlmann-Eltze et al. 2025: ridge
    regression on perturbation embeddings, the genes' PCA scores of the target genes or a
    given perturbation feature table, which predicts perturbations never seen in training).

Metrics, as cell-eval defines them, per cell type and perturbation
    ``mae`` / ``mse`` between the predicted and real pseudobulks (means of log1p values);
    ``pearson_delta`` between the predicted and real changes from the control pseudobulk;
    ``discrimination_score_l1``: ``1 - rank / n_perturbations`` of the true perturbation among
    all real changes, by L1 distance to the predicted change, the target gene excluded;
    ``overlap_at_N``: of the ``N`` genes called differentially expressed in the real data
    (two-sided Wilcoxon rank-sum against the controls, Benjamini-Hochberg FDR < 0.05,
    ranked by absolute log2 fold change of the expm1 of the mean log1p), the fraction found
    among the top ``N`` of the prediction's own calls.

:func:`normalized_score` turns metrics into cell-eval's baseline-normalised score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats

from scforge_scvi.data._preprocess import check_raw_counts, log_normalize

from ._data import feature_table

METRICS = ("mae", "mse", "pearson_delta", "discrimination_score_l1", "overlap_at_N")
#: metrics averaged into the normalised score (cell-eval's; ``mse`` is reported beside them)
SCORED_METRICS = ("mae", "pearson_delta", "discrimination_score_l1", "overlap_at_N")
#: metrics whose best value is 0 (all others are best at 1)
BEST_AT_ZERO = frozenset({"mae", "mse"})
_ALL_CELLS = "all"


# ------------------------------------------------------------------------------- helpers
def log1p_anndata(
    adata: ad.AnnData, layer: str | None = None, target_sum: float = 1e4
) -> ad.AnnData:
    """A new AnnData with ``X = log1p(counts / library size * target_sum)`` (CSR).

    ``obs`` and ``var`` are copied; the input is not modified.
    """
    counts = adata.X if layer is None else adata.layers[layer]
    check_raw_counts(counts, "adata.X" if layer is None else f"adata.layers[{layer!r}]")
    x = log_normalize(sp.csr_matrix(counts), target_sum=target_sum)
    return ad.AnnData(X=x, obs=adata.obs.copy(), var=adata.var.copy())


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


def _contexts(adata: ad.AnnData, cell_type_key: str | None) -> np.ndarray:
    if cell_type_key is None:
        return np.full(adata.n_obs, _ALL_CELLS, dtype=object)
    if cell_type_key not in adata.obs:
        raise KeyError(
            f"Cell-type column {cell_type_key!r} is not in adata.obs; available columns: "
            f"{list(adata.obs.columns)}."
        )
    return adata.obs[cell_type_key].astype(str).to_numpy()


def _perturbations(adata: ad.AnnData, perturbation_key: str, control_label: str) -> np.ndarray:
    if perturbation_key not in adata.obs:
        raise KeyError(
            f"Perturbation column {perturbation_key!r} is not in adata.obs; available columns: "
            f"{list(adata.obs.columns)}."
        )
    perts = adata.obs[perturbation_key].astype(str).to_numpy()
    if control_label not in set(perts):
        raise ValueError(
            f"Control label {control_label!r} is not a value of adata.obs[{perturbation_key!r}]; "
            f"available categories: {sorted(set(perts))}."
        )
    return perts


def group_means(
    adata: ad.AnnData, perturbation_key: str, cell_type_key: str | None = None
) -> tuple[pd.DataFrame, np.ndarray]:
    """Pseudobulk (mean of ``X``) of every (cell type, perturbation) group.

    Returns
    -------
    ``(groups, means)``: a DataFrame with columns ``cell_type``, ``perturbation`` and
    ``n_cells`` (one row per group, sorted) and the ``(n_groups, n_genes)`` means.
    """
    contexts = _contexts(adata, cell_type_key)
    perts = adata.obs[perturbation_key].astype(str).to_numpy()
    keys = pd.DataFrame({"cell_type": contexts, "perturbation": perts})
    grouped = keys.groupby(["cell_type", "perturbation"], sort=True)
    codes = grouped.ngroup().to_numpy()
    groups = grouped.size().reset_index(name="n_cells")
    indicator = sp.csr_matrix(
        (np.ones(adata.n_obs), (codes, np.arange(adata.n_obs))), shape=(len(groups), adata.n_obs)
    )
    x = adata.X if sp.issparse(adata.X) else np.asarray(adata.X)
    means = _dense(indicator @ x) / groups["n_cells"].to_numpy()[:, None]
    return groups, means


def _assemble_prediction(
    real: ad.AnnData,
    predicted: Mapping[tuple[str, str], np.ndarray],
    perturbation_key: str,
    control_label: str,
    cell_type_key: str | None,
) -> ad.AnnData:
    """Each real perturbed cell replaced by its group's predicted vector, controls kept."""
    contexts = _contexts(real, cell_type_key)
    perts = real.obs[perturbation_key].astype(str).to_numpy()
    is_control = perts == control_label
    x = np.empty(real.shape, dtype=np.float32)
    x[is_control] = _dense(real.X[np.flatnonzero(is_control)])
    for (context, pert), vector in predicted.items():
        rows = (contexts == context) & (perts == pert)
        x[rows] = np.clip(vector, 0.0, None)
    obs_cols = [perturbation_key] + ([cell_type_key] if cell_type_key else [])
    return ad.AnnData(X=x, obs=real.obs[obs_cols].copy(), var=real.var.copy())


def _training_effects(
    train: ad.AnnData, perturbation_key: str, control_label: str, cell_type_key: str | None
) -> tuple[pd.DataFrame, np.ndarray, dict[str, np.ndarray]]:
    """Training pseudobulk changes from the control mean of the same cell type."""
    groups, means, control_means = _perturbed_groups(
        train, perturbation_key, control_label, cell_type_key, "the training data"
    )
    effects = means - np.stack([control_means[c] for c in groups["cell_type"]])
    return groups, effects, control_means


def _perturbed_groups(
    data: ad.AnnData,
    perturbation_key: str,
    control_label: str,
    cell_type_key: str | None,
    what: str,
) -> tuple[pd.DataFrame, np.ndarray, dict[str, np.ndarray]]:
    """Perturbed (cell type, perturbation) groups, their means and each type's control mean."""
    _perturbations(data, perturbation_key, control_label)
    groups, means = group_means(data, perturbation_key, cell_type_key)
    control = (groups["perturbation"] == control_label).to_numpy()
    control_means = {
        c: means[i] for i, c in zip(np.flatnonzero(control), groups["cell_type"][control])
    }
    perturbed = groups[~control].reset_index(drop=True)
    missing = sorted(set(perturbed["cell_type"]) - set(control_means))
    if missing:
        raise ValueError(
            f"{what.capitalize()} has no {control_label!r} cells for cell types {missing}."
        )
    return perturbed, means[~control], control_means


# ------------------------------------------------------------------------------ baselines
def control_mean_baseline(
    real: ad.AnnData,
    *,
    perturbation_key: str,
    control_label: str,
    cell_type_key: str | None = None,
) -> ad.AnnData:
    """Predict no effect: every perturbed cell is its cell type's control mean.

    Parameters
    ----------
    real
        log1p expression of the cells to predict (their perturbation and cell type are read)
        and of the controls of the same cell types.
    perturbation_key, control_label, cell_type_key
        Columns of ``real.obs`` and the control's label.

    Returns
    -------
    The prediction, in the layout of ``real`` (same cells, genes and obs columns).
    """
    wanted, _, control_means = _perturbed_groups(
        real, perturbation_key, control_label, cell_type_key, "the data to predict"
    )
    predicted = {
        (c, p): control_means[c] for c, p in zip(wanted["cell_type"], wanted["perturbation"])
    }
    return _assemble_prediction(real, predicted, perturbation_key, control_label, cell_type_key)


def perturbation_mean_baseline(
    train: ad.AnnData,
    real: ad.AnnData,
    *,
    perturbation_key: str,
    control_label: str,
    cell_type_key: str | None = None,
) -> ad.AnnData:
    """cell-eval's baseline: every perturbed cell is the mean of the training perturbation means.

    Within a cell type that has training perturbations this is the plain mean of their
    pseudobulks; for a cell type without any (zero-shot) it is that cell type's control mean
    plus the mean change of all training perturbations. Only training data is used (cell-eval
    averages the perturbation means of the data it is handed).

    Parameters
    ----------
    train
        log1p expression of the training cells, controls included.
    real
        The cells to predict and the controls of their cell types (see
        :func:`control_mean_baseline`).
    """
    groups, effects, _ = _training_effects(train, perturbation_key, control_label, cell_type_key)
    if len(groups) == 0:
        raise ValueError("The training data has no perturbed cells.")
    wanted, _, control_means = _perturbed_groups(
        real, perturbation_key, control_label, cell_type_key, "the data to predict"
    )
    pooled = effects.mean(axis=0)
    predicted = {}
    for c, p in zip(wanted["cell_type"], wanted["perturbation"]):
        own = (groups["cell_type"] == c).to_numpy()
        predicted[(c, p)] = control_means[c] + (effects[own].mean(axis=0) if own.any() else pooled)
    return _assemble_prediction(real, predicted, perturbation_key, control_label, cell_type_key)


def _fit_linear(
    y: np.ndarray, pert_embedding: np.ndarray, gene_embedding: np.ndarray, ridge: float
) -> tuple[np.ndarray, np.ndarray]:
    """Solve ``min_W |Y - G W P^T - b|^2 + ridge |W|^2`` (Y genes x perturbations)."""
    b = y.mean(axis=1)
    g, p = gene_embedding, pert_embedding
    left = np.linalg.solve(g.T @ g + ridge * np.eye(g.shape[1]), g.T @ (y - b[:, None]) @ p)
    w = np.linalg.solve((p.T @ p + ridge * np.eye(p.shape[1])).T, left.T).T
    return w, b


def _gene_pca(y: np.ndarray, n_components: int) -> np.ndarray:
    """Gene embedding: scores of the genes (rows of ``y``) on the top principal components."""
    centred = y - y.mean(axis=0, keepdims=True)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    k = min(n_components, len(s))
    return u[:, :k] * s[:k]


def linear_baseline(
    train: ad.AnnData,
    real: ad.AnnData,
    *,
    perturbation_key: str,
    control_label: str,
    cell_type_key: str | None = None,
    n_components: int = 10,
    ridge: float = 0.1,
    target_genes: Mapping[str, str] | None = None,
    perturbation_features: pd.DataFrame | Mapping[str, Sequence[float]] | None = None,
) -> ad.AnnData:
    """The linear model of Ahlmann-Eltze et al. (2025): ridge on perturbation embeddings.

    ``Y ≈ G W Pᵀ + b``: ``Y`` holds the training changes from the control mean (genes x
    perturbations), ``G`` the genes' scores on the top ``n_components`` principal components of
    ``Y``, ``P`` the embedding of each perturbation, ``b`` the mean change, and ``W`` is the
    ridge solution. ``P`` is the row of ``G`` of each perturbation's target gene, or, with
    ``perturbation_features``, the perturbation's row of that table (the paper's variant with
    external embeddings); a held-out perturbation is predicted from its own embedding, so
    with a feature table it need not have been seen in training. The model is fitted on the
    training perturbations of the same cell type when there are at least two, else on all
    training cell types pooled.

    Parameters
    ----------
    train, real
        See :func:`perturbation_mean_baseline`.
    n_components
        ``K``, the embedding width.
    ridge
        ``λ`` of both ridge solves.
    target_genes
        Perturbation -> target gene name; default: the perturbation's own name (as in
        CRISPR screens). A target missing from the genes is an error. Not read with
        ``perturbation_features``.
    perturbation_features
        Perturbation feature table (DataFrame indexed by name, or a mapping name -> vector)
        with a row for every training and predicted perturbation; replaces the target genes'
        PCA scores as ``P``.
    """
    groups, effects, _ = _training_effects(train, perturbation_key, control_label, cell_type_key)
    wanted, _, control_means = _perturbed_groups(
        real, perturbation_key, control_label, cell_type_key, "the data to predict"
    )
    gene_index = pd.Index(real.var_names.astype(str))
    if not gene_index.equals(pd.Index(train.var_names.astype(str))):
        raise ValueError("train and real must have the same genes in the same order.")
    names = set(groups["perturbation"]) | set(wanted["perturbation"])
    if perturbation_features is not None:
        table = feature_table(perturbation_features)
        missing = sorted(names - set(table.index))
        if missing:
            raise ValueError(
                f"Perturbations {missing} have no row in perturbation_features, so the linear "
                "baseline cannot embed them."
            )
        features = {p: table.loc[p].to_numpy(dtype=np.float64) for p in names}
    else:
        targets = dict(target_genes or {})
        target_of = {p: targets.get(p, p) for p in names}
        missing = sorted(p for p, g in target_of.items() if g not in gene_index)
        if missing:
            raise ValueError(
                f"The target genes of perturbations {missing} are not among the genes, so the "
                "linear baseline cannot embed them; pass `target_genes` mapping each "
                "perturbation to a measured gene, or `perturbation_features`."
            )
        column = {p: gene_index.get_loc(g) for p, g in target_of.items()}

    def embed(g: np.ndarray, perts: Sequence[str]) -> np.ndarray:
        """``P``: feature rows, or the target genes' rows of ``G``."""
        if perturbation_features is not None:
            return np.stack([features[x] for x in perts])
        return g[[column[x] for x in perts]]

    fits: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def fit(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        y = effects[rows].T  # genes x perturbations
        g = _gene_pca(y, n_components)
        w, b = _fit_linear(y, embed(g, groups["perturbation"].to_numpy()[rows]), g, ridge)
        return g, w, b

    pooled = None
    predicted = {}
    for c, pert in zip(wanted["cell_type"], wanted["perturbation"]):
        own = np.flatnonzero((groups["cell_type"] == c).to_numpy())
        if len(own) >= 2:
            if c not in fits:
                fits[c] = fit(own)
            g, w, b = fits[c]
        else:
            pooled = pooled or fit(np.arange(len(groups)))
            g, w, b = pooled
        predicted[(c, pert)] = control_means[c] + g @ w @ embed(g, [pert])[0] + b
    return _assemble_prediction(real, predicted, perturbation_key, control_label, cell_type_key)


# -------------------------------------------------------------------------------- metrics
def wilcoxon_de(x: np.ndarray, reference: np.ndarray, fdr_threshold: float = 0.05) -> pd.DataFrame:
    """Differential expression of ``x`` against ``reference`` cells, as cell-eval calls it.

    Parameters
    ----------
    x, reference
        ``(n, G)`` and ``(m, G)`` log1p expression.
    fdr_threshold
        Genes with Benjamini-Hochberg FDR below it are flagged ``significant``.

    Returns
    -------
    One row per gene: ``log2_fold_change`` (of ``expm1(mean log1p)``, 0 where both are 0),
    ``p_value`` (two-sided Mann-Whitney U, normal approximation with tie and continuity
    corrections), ``fdr`` and ``significant``.
    """
    res = stats.mannwhitneyu(x, reference, axis=0, method="asymptotic", use_continuity=True)
    p = np.nan_to_num(np.asarray(res.pvalue, dtype=np.float64), nan=1.0).clip(0.0, 1.0)
    fdr = stats.false_discovery_control(p) if p.size else p
    with np.errstate(divide="ignore", invalid="ignore"):
        lfc = np.log2(np.expm1(x.mean(axis=0)) / np.expm1(reference.mean(axis=0)))
    lfc[np.isnan(lfc)] = 0.0
    return pd.DataFrame(
        {"log2_fold_change": lfc, "p_value": p, "fdr": fdr, "significant": fdr < fdr_threshold}
    )


def _ranked_de_genes(de: pd.DataFrame) -> np.ndarray:
    """Significant genes, largest absolute log2 fold change first (ties in gene order)."""
    sig = np.flatnonzero(de["significant"].to_numpy())
    score = np.abs(de["log2_fold_change"].to_numpy()[sig]).astype(np.float32)
    return sig[np.argsort(-score, kind="stable")]


def overlap_at_n(real_de: pd.DataFrame, pred_de: pd.DataFrame) -> float:
    """Fraction of the ``N`` real DE genes among the prediction's top ``N`` DE genes.

    ``N`` is the number of real significant genes; ``0`` when there are none.
    """
    real_genes, pred_genes = _ranked_de_genes(real_de), _ranked_de_genes(pred_de)
    n = len(real_genes)
    if n == 0:
        return 0.0
    return len(np.intersect1d(real_genes, pred_genes[:n])) / n


def _discrimination_l1(
    real_effects: np.ndarray, pred_effects: np.ndarray, perts: np.ndarray, genes: pd.Index
) -> np.ndarray:
    """``1 - rank / n`` of each true perturbation by L1 distance (target gene excluded)."""
    n = len(perts)
    scores = np.empty(n)
    for i, pert in enumerate(perts):
        keep = genes != pert
        distances = np.abs(real_effects[:, keep] - pred_effects[i, keep]).sum(axis=1)
        order = np.argsort(distances, kind="stable")
        scores[i] = 1.0 - np.flatnonzero(order == i)[0] / n
    return scores


def _check_pair(
    real: ad.AnnData, pred: ad.AnnData, perturbation_key: str, control_label: str
) -> None:
    if real.n_vars != pred.n_vars or not np.array_equal(
        real.var_names.astype(str), pred.var_names.astype(str)
    ):
        first = next(
            (i for i, (a, b) in enumerate(zip(real.var_names, pred.var_names)) if a != b),
            min(real.n_vars, pred.n_vars),
        )
        raise ValueError(
            f"Real ({real.n_vars} genes) and predicted ({pred.n_vars} genes) data must have the "
            f"same genes in the same order; they first differ at position {first}. Reorder the "
            "prediction with pred[:, real.var_names]."
        )
    _perturbations(real, perturbation_key, control_label)
    _perturbations(pred, perturbation_key, control_label)


def evaluate_perturbation_predictions(
    real: ad.AnnData,
    pred: ad.AnnData,
    *,
    perturbation_key: str,
    control_label: str,
    cell_type_key: str | None = None,
    metrics: Sequence[str] = METRICS,
    fdr_threshold: float = 0.05,
) -> pd.DataFrame:
    """cell-eval's metrics for every (cell type, perturbation) of a prediction.

    Parameters
    ----------
    real, pred
        log1p expression with the same genes in the same order. Both hold the controls of
        every evaluated cell type (a prediction keeps the real controls) and cells of the same
        perturbations in each cell type.
    perturbation_key, control_label, cell_type_key
        Columns of ``obs`` and the control's label; each cell type is evaluated on its own,
        as cell-eval evaluates one context at a time.
    metrics
        Any of :data:`METRICS`.
    fdr_threshold
        FDR cut-off of the differential-expression calls of ``overlap_at_N``.

    Returns
    -------
    One row per (cell type, perturbation) with a column per metric.
    """
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"Unknown metrics {unknown}; valid metrics: {list(METRICS)}.")
    _check_pair(real, pred, perturbation_key, control_label)
    genes = pd.Index(real.var_names.astype(str))
    real_ctx, pred_ctx = _contexts(real, cell_type_key), _contexts(pred, cell_type_key)
    real_pert = real.obs[perturbation_key].astype(str).to_numpy()
    pred_pert = pred.obs[perturbation_key].astype(str).to_numpy()
    rows = []
    for context in sorted(set(real_ctx)):
        r_in, p_in = real_ctx == context, pred_ctx == context
        perts_real = set(real_pert[r_in]) - {control_label}
        perts_pred = set(pred_pert[p_in]) - {control_label}
        if perts_real != perts_pred:
            raise ValueError(
                f"Cell type {context!r}: perturbations without cells in the prediction "
                f"{sorted(perts_real - perts_pred)}, without cells in the real data "
                f"{sorted(perts_pred - perts_real)}; both must hold the same perturbations."
            )
        for name, present in (
            ("real", control_label in set(real_pert[r_in])),
            ("predicted", control_label in set(pred_pert[p_in])),
        ):
            if not present:
                raise ValueError(
                    f"Cell type {context!r} has no {control_label!r} cells in the {name} data."
                )
        perts = np.array(sorted(perts_real))
        if len(perts) == 0:
            continue
        real_x = _dense(real.X[np.flatnonzero(r_in)])
        pred_x = _dense(pred.X[np.flatnonzero(p_in)])
        rp, pp = real_pert[r_in], pred_pert[p_in]
        real_bulk = np.stack([real_x[rp == p].mean(axis=0) for p in perts])
        pred_bulk = np.stack([pred_x[pp == p].mean(axis=0) for p in perts])
        real_effect = real_bulk - real_x[rp == control_label].mean(axis=0)
        pred_effect = pred_bulk - pred_x[pp == control_label].mean(axis=0)
        table = pd.DataFrame({"cell_type": context, "perturbation": perts})
        if "mae" in metrics:
            table["mae"] = np.abs(pred_bulk - real_bulk).mean(axis=1)
        if "mse" in metrics:
            table["mse"] = ((pred_bulk - real_bulk) ** 2).mean(axis=1)
        if "pearson_delta" in metrics:
            # a change below float32 resolution is no change: the correlation is undefined
            table["pearson_delta"] = [
                stats.pearsonr(a, b).statistic if min(np.std(a), np.std(b)) > 1e-6 else np.nan
                for a, b in zip(pred_effect, real_effect)
            ]
        if "discrimination_score_l1" in metrics:
            table["discrimination_score_l1"] = _discrimination_l1(
                real_effect, pred_effect, perts, genes
            )
        if "overlap_at_N" in metrics:
            real_ctrl, pred_ctrl = real_x[rp == control_label], pred_x[pp == control_label]
            table["overlap_at_N"] = [
                overlap_at_n(
                    wilcoxon_de(real_x[rp == p], real_ctrl, fdr_threshold),
                    wilcoxon_de(pred_x[pp == p], pred_ctrl, fdr_threshold),
                )
                for p in perts
            ]
        rows.append(table)
    if not rows:
        raise ValueError("No perturbed cells to evaluate.")
    return pd.concat(rows, ignore_index=True)


def aggregate_metrics(per_perturbation: pd.DataFrame) -> pd.Series:
    """Mean of each metric over all (cell type, perturbation) rows."""
    cols = [c for c in per_perturbation.columns if c in METRICS]
    return per_perturbation[cols].mean(axis=0)


def normalized_score(user: Mapping[str, float], baseline: Mapping[str, float]) -> pd.Series:
    """cell-eval's baseline-normalised score, per metric and averaged (``avg_score``).

    ``1 - user / base`` for metrics best at 0 (``mae``, ``mse``), ``(user - base) /
    (1 - base)`` for metrics best at 1; NaN counts as 0 and every score is clipped below at 0
    (so 0 means "no better than the baseline"). Metrics missing from either side are skipped.

    Parameters
    ----------
    user, baseline
        Aggregated metrics (e.g. :func:`aggregate_metrics`) of the model and the baseline.
    """
    user, baseline = pd.Series(user, dtype=float), pd.Series(baseline, dtype=float)
    names = [m for m in user.index if m in baseline.index]
    scores = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for m in names:
            u, b = float(user[m]), float(baseline[m])
            value = 1.0 - u / b if m in BEST_AT_ZERO else (u - b) / (1.0 - b)
            scores[m] = 0.0 if np.isnan(value) else max(float(value), 0.0)
    out = pd.Series(scores, dtype=float)
    out["avg_score"] = float(out.mean()) if len(out) else np.nan
    return out


def compare_predictions(
    real: ad.AnnData,
    predictions: Mapping[str, ad.AnnData],
    *,
    baseline: str = "perturbation mean",
    perturbation_key: str,
    control_label: str,
    cell_type_key: str | None = None,
    metrics: Sequence[str] = METRICS,
) -> pd.DataFrame:
    """Aggregated metrics of several predictions and their score against one of them.

    Parameters
    ----------
    real
        The real cells (log1p), controls included.
    predictions
        Method name -> prediction (same layout as ``real``); must include ``baseline``.
    baseline
        The method the normalised score is taken against (it scores 0).
    perturbation_key, control_label, cell_type_key, metrics
        See :func:`evaluate_perturbation_predictions`; the score averages the
        :data:`SCORED_METRICS` among ``metrics``.

    Returns
    -------
    One row per method (in the order given): the mean of each metric over the (cell type,
    perturbation) groups and ``score``.
    """
    if baseline not in predictions:
        raise ValueError(f"baseline {baseline!r} is not among the predictions {list(predictions)}.")
    kw = {"perturbation_key": perturbation_key, "control_label": control_label}
    rows = {
        name: aggregate_metrics(
            evaluate_perturbation_predictions(
                real, pred, cell_type_key=cell_type_key, metrics=metrics, **kw
            )
        )
        for name, pred in predictions.items()
    }
    table = pd.DataFrame(rows).T
    scored = [m for m in SCORED_METRICS if m in table.columns]
    base = table.loc[baseline, scored]
    table["score"] = [
        normalized_score(row[scored], base)["avg_score"] for _, row in table.iterrows()
    ]
    return table
