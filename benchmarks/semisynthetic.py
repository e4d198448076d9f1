"""A semi-synthetic Perturb-seq screen built from real cells, for benchmarks and tests.

No real Perturb-seq data ships offline, so :func:`make_semisynthetic_perturbation_data` builds a
benchmark from real cells: control cells are resampled from real PBMCs, and perturbed cells
are the same kind of real cells with known perturbation programs applied to their expected
counts before the counts are drawn again. :func:`perturbation_feature_table` hands out the
perturbations' (noisy) feature vectors. :func:`make_screen` builds a suite of such screens
that differ in how perturbations act (``"latent"``, ``"correlation"``, ``"pathway"``,
``"small"``), and :func:`backbone_gene_features` a feature table from a small pretrained
backbone's gene embeddings. Not part of the package: ``benchmarks/`` scripts import
it directly, the tests through ``tests/conftest.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scforge_scvi._errors import ScForgeFileNotFoundError, ScForgeValueError
from scforge_scvi.data._preprocess import check_raw_counts, library_size, log_normalize
from scforge_scvi.perturb._data import _check_names, _obs_column


# ----------------------------------------------------------------------- real source cells
def _shared_data_dir() -> Path:
    return Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def load_pbmc3k_counts(path: str | Path | None = None) -> ad.AnnData:
    """The 10x PBMC 3k cells with raw counts and ``obs["louvain"]`` cell types.

    Parameters
    ----------
    path
        The ``pbmc3k_raw_labeled.h5ad`` file; defaults to the project's shared data directory.
    """
    path = _shared_data_dir() / "pbmc3k_raw_labeled.h5ad" if path is None else Path(path)
    if not path.exists():
        raise ScForgeFileNotFoundError(f"pbmc3k counts not found at {path}.")
    adata = ad.read_h5ad(path)
    adata.var_names_make_unique()
    return adata


# -------------------------------------------------------------- semi-synthetic benchmark
def _select_genes(counts: sp.csr_matrix, n_genes: int, min_fraction: float) -> np.ndarray:
    """Highly variable genes (normalised dispersion of log1p CP10k) among expressed genes."""
    expressed = np.asarray((counts > 0).mean(axis=0)).ravel() >= min_fraction
    logn = log_normalize(counts)
    mean = np.asarray(logn.mean(axis=0)).ravel()
    sq = logn.copy()
    sq.data **= 2
    var = np.asarray(sq.mean(axis=0)).ravel() - mean**2
    dispersion = np.log(np.maximum(var, 1e-12) / np.maximum(mean, 1e-12))
    # normalise the dispersion within 20 bins of mean expression (Seurat's recipe)
    bins = pd.qcut(mean[expressed], q=20, duplicates="drop", labels=False)
    disp = pd.Series(dispersion[expressed])
    z = (disp - disp.groupby(bins).transform("mean")) / disp.groupby(bins).transform("std")
    score = np.full(counts.shape[1], -np.inf)
    score[expressed] = z.fillna(-np.inf).to_numpy()
    n_available = int(expressed.sum())
    if n_available < n_genes:
        raise ScForgeValueError(
            f"Only {n_available} genes are detected in >= {min_fraction:.0%} of the cells; "
            f"asked for n_genes={n_genes}."
        )
    return np.sort(np.argsort(-score, kind="stable")[:n_genes])


def _gene_programs(logn: np.ndarray, n_programs: int, seed: int) -> np.ndarray:
    """Cluster genes into co-expression programs (k-means on standardised gene loadings)."""
    from sklearn.cluster import KMeans

    z = (logn - logn.mean(0)) / (logn.std(0) + 1e-6)  # cells x genes
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    loadings = (vt[:20] * s[:20, None]).T  # genes x 20
    loadings /= np.linalg.norm(loadings, axis=1, keepdims=True) + 1e-9
    km = KMeans(n_clusters=n_programs, n_init=4, random_state=seed)
    return km.fit_predict(loadings)


def _soft_threshold(u: np.ndarray, t: float) -> np.ndarray:
    """``sign(u) * max(|u| - t, 0)``: zero for small inputs, linear beyond ``t``."""
    return np.sign(u) * np.maximum(np.abs(u) - t, 0.0)


def _source_cells(
    source: ad.AnnData,
    cell_type_key: str,
    cell_types: Sequence[str] | None,
    n_genes: int,
    min_cell_fraction: float,
) -> tuple[sp.csr_matrix, np.ndarray, list[str], pd.Index]:
    """The kept cell types' counts on ``n_genes`` highly variable genes, labels and gene names.

    ``cell_types=None`` keeps every cell type with at least 20 cells.
    """
    check_raw_counts(source.X, "source.X")
    labels = _obs_column(source, cell_type_key, "Cell-type").astype(str)
    if cell_types is None:
        sizes = labels.value_counts()
        cell_types = sorted(sizes.index[sizes >= 20])
    cell_types = _check_names(cell_types, pd.Index(labels.unique()), "cell_types")
    keep = labels.isin(cell_types).to_numpy()
    counts = sp.csr_matrix(source.X[keep], dtype=np.float32)
    labels = labels[keep].to_numpy()
    genes = _select_genes(counts, n_genes, min_fraction=min_cell_fraction)
    return counts[:, genes], labels, list(cell_types), source.var_names[genes].astype(str)


def _pick_targets(
    counts: sp.csr_matrix, n_perturbations: int, rng: np.random.Generator
) -> np.ndarray:
    """Target genes (sorted column indices), drawn among the ``3 n`` best-expressed genes.

    Well-expressed targets make a knockdown measurable.
    """
    mean_count = np.asarray(counts.mean(axis=0)).ravel()
    candidates = np.argsort(-mean_count)[: 3 * n_perturbations]
    if len(candidates) < n_perturbations:
        raise ScForgeValueError(
            f"n_perturbations={n_perturbations} exceeds n_genes={counts.shape[1]}."
        )
    return np.sort(rng.choice(candidates, size=n_perturbations, replace=False))


def _perturbation_names(gene_names: pd.Index, targets: np.ndarray, control_label: str) -> list:
    """Perturbations are named after their target gene, as in CRISPR screens."""
    pert_names = list(gene_names[targets])
    if control_label in pert_names:
        raise ScForgeValueError(f"The control label {control_label!r} is also a gene name.")
    return pert_names


def _draw_screen(
    counts: sp.csr_matrix,
    labels: np.ndarray,
    cell_types: Sequence[str],
    gene_names: pd.Index,
    targets: np.ndarray,
    pert_names: Sequence[str],
    lfc: dict[str, np.ndarray],
    rng: np.random.Generator,
    *,
    n_controls_per_cell_type: int,
    n_cells_per_perturbation: int,
    escape_rate: float,
    smoothing: float,
    perturbation_key: str,
    cell_type_key: str,
    control_label: str,
) -> ad.AnnData:
    """Draw the cells of a screen with the log fold changes ``lfc[cell_type]`` applied.

    Every cell (controls included) is a real cell of its cell type, drawn with replacement,
    whose counts are drawn again: ``Poisson(((1 - smoothing) x + smoothing * L * profile_c) *
    exp(r * lfc))`` with the cell's library size ``L``, its cell type's mean profile and a
    per-cell response ``r``: 0 for a fraction ``escape_rate`` of cells (guides that failed),
    else uniform in [0.6, 1]. Returns the screen with ``var["is_target"]`` and
    ``uns["perturbation_truth"]`` (``targets``, ``perturbations``, ``lfc``).
    """
    n_genes = counts.shape[1]
    obs_perts, obs_types, rows_lfc, sources = [], [], [], []
    for cell_type in cell_types:
        pool = np.flatnonzero(labels == cell_type)
        n_total = n_controls_per_cell_type + len(pert_names) * n_cells_per_perturbation
        sources.append(rng.choice(pool, size=n_total, replace=True))
        obs_types += [cell_type] * n_total
        obs_perts += [control_label] * n_controls_per_cell_type
        rows_lfc.append(np.zeros((n_controls_per_cell_type, n_genes)))
        for p, name in enumerate(pert_names):
            obs_perts += [name] * n_cells_per_perturbation
            response = np.where(
                rng.random(n_cells_per_perturbation) < escape_rate,
                0.0,
                rng.uniform(0.6, 1.0, n_cells_per_perturbation),
            )
            rows_lfc.append(response[:, None] * lfc[cell_type][p][None, :])
    src = np.concatenate(sources)
    cell_lfc = np.concatenate(rows_lfc)

    # mean expression profile (fractions of the library) of each cell type
    fractions = sp.diags(1.0 / np.maximum(library_size(counts), 1.0)) @ counts
    profiles = np.stack(
        [np.asarray(fractions[labels == t].mean(axis=0)).ravel() for t in cell_types]
    )
    type_index = pd.Index(cell_types).get_indexer(labels[src])
    x = np.asarray(counts[src].todense(), dtype=np.float64)
    size = library_size(counts[src])
    rate = (1 - smoothing) * x + smoothing * size[:, None] * profiles[type_index]
    rate *= np.exp(cell_lfc)
    new_counts = rng.poisson(rate).astype(np.float32)

    obs = pd.DataFrame(
        {
            perturbation_key: pd.Categorical(obs_perts, categories=[control_label, *pert_names]),
            cell_type_key: pd.Categorical(obs_types, categories=list(cell_types)),
        },
        index=[f"cell{i}" for i in range(len(obs_perts))],
    )
    var = pd.DataFrame(index=pd.Index(gene_names, name=None))
    var["is_target"] = np.isin(np.arange(n_genes), targets)
    out = ad.AnnData(X=sp.csr_matrix(new_counts), obs=obs, var=var)
    out.uns["perturbation_truth"] = {
        "targets": dict(zip(pert_names, gene_names[targets], strict=True)),
        "perturbations": np.asarray(pert_names),
        "lfc": {cell_type: lfc[cell_type].astype(np.float32) for cell_type in cell_types},
    }
    return out


def make_semisynthetic_perturbation_data(
    source: ad.AnnData,
    cell_type_key: str,
    *,
    cell_types: Sequence[str] | None = None,
    n_genes: int = 500,
    n_perturbations: int = 24,
    n_cells_per_perturbation: int = 40,
    n_controls_per_cell_type: int = 200,
    n_programs: int = 8,
    knockdown: float = 0.15,
    program_effect: float = 1.2,
    escape_rate: float = 0.1,
    smoothing: float = 0.2,
    min_cell_fraction: float = 0.1,
    n_features: int = 0,
    feature_noise: float = 0.3,
    perturbation_key: str = "target_gene",
    control_label: str = "non-targeting",
    seed: int = 0,
) -> ad.AnnData:
    """Build a Perturb-seq-like benchmark from real cells with known perturbation programs.

    Recipe:

    1. Keep the requested cell types and ``n_genes`` highly variable genes among those
       detected in at least ``min_cell_fraction`` of their cells.
    2. Cluster the genes into ``n_programs`` co-expression programs; each program gets a
       fixed signed effect per member gene (log fold change, scale ``program_effect``).
    3. Each perturbation knocks down one well-expressed target gene (expected counts times
       ``knockdown``) and moves its target's own program (down) plus, for some
       perturbations, a second program, and a handful of perturbation-specific genes.
       The strength of each program differs between cell types, so a response seen in one
       cell type predicts, but does not equal, the response in another.
    3b. With ``n_features > 0`` the effects come from a hidden feature vector instead, so
       that perturbations never seen in training can be predicted from features: each
       perturbation gets a latent ``z ~ N(0, I_n_features)``. With ``soft(u, t) = sign(u)
       max(|u| - t, 0)`` and Gaussian maps ``A`` (``n_features x n_programs``) and ``B``
       (``n_features x n_genes``), both with standard deviation ``1 / sqrt(n_features)``
       (so ``z A`` and ``z B`` have unit variance), its program weights are
       ``tanh(2 soft(z A, 1))`` (about a third of the programs move, none linearly in ``z``)
       and its gene-specific effects are ``program_effect * soft(z B, 2)`` (about 5% of the
       genes). Only the target's knockdown is tied to the target gene, not to ``z``. The
       features handed to a model are ``z + feature_noise * N(0, I)``
       (``uns["perturbation_truth"]["features"]``; the noiseless ``z`` is ``["latent"]``), so
       they are informative but not exact, as an embedding of the target gene would be.
       The cells drawn are the same as with ``n_features=0`` (the latent part has a random
       stream of its own).
    4. Every cell of the benchmark (controls included) is a real cell of its cell type,
       drawn with replacement, whose counts are drawn again:
       ``Poisson(((1 - smoothing) x + smoothing * L * profile_c) * exp(r * lfc))`` with the
       cell's library size ``L``, its cell type's mean profile, and a per-cell response
       ``r``: 0 for a fraction ``escape_rate`` of cells (guides that failed), else
       uniform in [0.6, 1].

    Parameters
    ----------
    source
        Real cells with raw counts in ``X`` (e.g. :func:`load_pbmc3k_counts` or
        :func:`scforge_scvi.data._datasets.pbmc68k_counts`).
    cell_type_key
        ``source.obs`` column with cell types; written under the same name.
    cell_types
        Cell types to keep (default: all with at least 20 cells).
    n_genes, n_perturbations, n_cells_per_perturbation, n_controls_per_cell_type
        Size of the benchmark (cells per perturbation are per cell type).
    n_programs, knockdown, program_effect, escape_rate, smoothing
        The perturbation model (see above).
    min_cell_fraction
        Genes detected in fewer cells are never kept (effects on genes that are almost never
        detected cannot be measured).
    n_features, feature_noise
        Width of the hidden perturbation feature vectors (``0``: effects are not generated
        from features, the original recipe) and the standard deviation of the noise added to
        them in the feature table handed out (see 3b).
    perturbation_key, control_label
        Name of the perturbation column and of the control (perturbations are named after
        their target gene, as in CRISPR screens).
    seed
        Seeds everything.

    Returns
    -------
    AnnData with raw counts in ``X``, ``obs[perturbation_key]``, ``obs[cell_type_key]``,
    ``var["program"]``, ``var["is_target"]``, and the ground truth in
    ``uns["perturbation_truth"]``: ``targets`` (perturbation -> gene) and, per cell type,
    the applied log fold changes ``lfc[cell_type]`` (perturbations x genes); with
    ``n_features > 0`` also ``features`` (the noisy table, perturbations x n_features, rows in
    the order of ``perturbations``) and ``latent`` (the noiseless vectors).
    """
    if n_features < 0 or feature_noise < 0:
        raise ValueError(
            f"n_features and feature_noise must be >= 0, got {n_features} and {feature_noise}."
        )
    rng = np.random.default_rng(seed)
    counts, labels, cell_types, gene_names = _source_cells(
        source, cell_type_key, cell_types, n_genes, min_cell_fraction
    )
    logn = np.asarray(log_normalize(counts).todense())
    programs = _gene_programs(logn, n_programs, seed)

    # signed effect of each program on its member genes
    program_lfc = np.zeros((n_programs, n_genes))
    for k in range(n_programs):
        members = np.flatnonzero(programs == k)
        signs = np.where(rng.random(members.size) < 0.75, 1.0, -1.0)
        program_lfc[k, members] = signs * rng.uniform(0.5, 1.5, members.size) * program_effect
    # strength of each program in each cell type
    strength = rng.uniform(0.3, 1.3, size=(len(cell_types), n_programs))

    # targets: drawn among the best-expressed genes, so that a knockdown is measurable
    targets = _pick_targets(counts, n_perturbations, rng)
    pert_names = _perturbation_names(gene_names, targets, control_label)

    weights = np.zeros((n_perturbations, n_programs))
    weights[np.arange(n_perturbations), programs[targets]] = -rng.uniform(0.7, 1.2, n_perturbations)
    second = rng.random(n_perturbations) < 0.4
    other = (programs[targets] + rng.integers(1, n_programs, n_perturbations)) % n_programs
    weights[second, other[second]] += rng.choice([-1.0, 1.0], second.sum()) * rng.uniform(
        0.4, 0.8, second.sum()
    )
    specific = np.zeros((n_perturbations, n_genes))
    for p in range(n_perturbations):
        genes_p = rng.choice(n_genes, size=8, replace=False)
        specific[p, genes_p] = rng.normal(0.0, 0.6, size=8) * program_effect
    latent = features = None
    if n_features > 0:
        # effects generated from a hidden feature vector per perturbation (recipe step 3b);
        # a random stream of its own keeps the cells identical to the n_features=0 screen
        frng = np.random.default_rng([seed, 1])
        latent = frng.normal(size=(n_perturbations, n_features))
        to_programs = frng.normal(size=(n_features, n_programs)) / np.sqrt(n_features)
        strength_p = 1.0 / (
            1.0 + np.exp(-2.0 * latent @ (frng.normal(size=n_features) / np.sqrt(n_features)))
        )
        weights = strength_p[:, None] * np.tanh(latent @ to_programs)
        to_genes = frng.normal(size=(n_features, n_genes)) / np.sqrt(n_features)
        specific = _soft_threshold(latent @ to_genes, 2.0) * program_effect
        features = latent + feature_noise * frng.normal(size=latent.shape)

    lfc = {}
    for c, cell_type in enumerate(cell_types):
        effect = (weights * strength[c]) @ program_lfc + specific  # perts x genes
        effect[np.arange(n_perturbations), targets] = np.log(knockdown)
        lfc[cell_type] = effect

    out = _draw_screen(
        counts,
        labels,
        cell_types,
        gene_names,
        targets,
        pert_names,
        lfc,
        rng,
        n_controls_per_cell_type=n_controls_per_cell_type,
        n_cells_per_perturbation=n_cells_per_perturbation,
        escape_rate=escape_rate,
        smoothing=smoothing,
        perturbation_key=perturbation_key,
        cell_type_key=cell_type_key,
        control_label=control_label,
    )
    out.uns["perturbation_truth"]["seed"] = seed
    out.var.insert(0, "program", programs)
    if features is not None:
        out.uns["perturbation_truth"]["features"] = features.astype(np.float32)
        out.uns["perturbation_truth"]["latent"] = latent.astype(np.float32)
    return out


# ------------------------------------------------------------------ a suite of screens
#: cell types of the pbmc3k screens (``load_pbmc3k_counts()``, ``obs["louvain"]``)
PBMC3K_CELL_TYPES = ("CD4 T cells", "CD14+ Monocytes", "B cells", "CD8 T cells")
#: default sizes of :func:`make_screen` (the unseen-perturbation benchmark on pbmc3k)
SCREEN_SIZES = {
    "n_genes": 500,
    "n_perturbations": 96,
    "n_cells_per_perturbation": 25,
    "n_controls_per_cell_type": 200,
}
#: the "small" screen: 40 perturbations, 3 cell types, at most 60 cells a group
SMALL_SIZES = {**SCREEN_SIZES, "n_perturbations": 40, "n_cells_per_perturbation": 60}
#: width of the feature table of the "correlation", "pathway" and "small" screens
N_LOADINGS = 16
#: settings of the drawing shared by every kind (the rest go to the effect generator)
_DRAW_SETTINGS = ("knockdown", "escape_rate", "smoothing", "min_cell_fraction")


def _target_correlations(logn: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Pearson correlations (targets x genes) of the columns of ``logn`` (cells x genes)."""
    z = (logn - logn.mean(0)) / (logn.std(0) + 1e-9)
    return (z[:, targets].T @ z) / len(z)


def _correlation_effects(
    logn: np.ndarray,
    labels: np.ndarray,
    cell_types: Sequence[str],
    targets: np.ndarray,
    rng: np.random.Generator,
    *,
    top_fraction: float = 0.08,
    strength: tuple[float, float] = (0.8, 1.5),
    reference: float = 0.99,
    within_weight: float = 0.4,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Correlation propagation: a knockdown moves the genes co-expressed with its target.

    ``r_c(t, g)`` is the Pearson correlation of the log-normalised expression of target
    ``t`` and gene ``g``, ``within_weight`` times that in cell type ``c``'s real cells plus
    ``1 - within_weight`` times that in all the kept real cells (the within-cell-type part
    alone is mostly sampling noise that no feature of the target predicts; the pooled part is
    what co-expression statistics of the controls reveal). On the ``top_fraction`` of genes
    with the largest ``|r_c|`` (per target and cell type) the log fold change is
    ``-s sign(r) min((r / r_ref)^2, 1)``, with ``r_ref`` the ``reference`` quantile of
    ``|r_c|`` and ``s ~ U(strength)`` per perturbation: the per-cell-type correlations, the
    selection and the squares keep a linear model from being exact.
    """
    n_perturbations, n_genes = len(targets), logn.shape[1]
    size = rng.uniform(*strength, n_perturbations)
    n_moved = max(1, round(top_fraction * n_genes))
    rows = np.arange(n_perturbations)
    pooled = _target_correlations(logn, targets)
    lfc = {}
    for cell_type in cell_types:
        within = _target_correlations(logn[labels == cell_type], targets)
        r = (1.0 - within_weight) * pooled + within_weight * within
        r[rows, targets] = 0.0
        cutoff = -np.sort(-np.abs(r), axis=1)[:, n_moved - 1 : n_moved]
        u = np.where(np.abs(r) >= cutoff, r, 0.0) / np.quantile(np.abs(r), reference)
        lfc[cell_type] = -size[:, None] * np.sign(u) * np.minimum(u**2, 1.0)
    return lfc


def _pathway_effects(
    logn: np.ndarray,
    labels: np.ndarray,
    cell_types: Sequence[str],
    targets: np.ndarray,
    rng: np.random.Generator,
    *,
    n_programs: int = 12,
    effect: tuple[float, float] = (1.2, 2.0),
    second_rate: float = 0.3,
    cell_type_scale: tuple[float, float] = (0.5, 1.0),
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """A sparse pathway screen: a knockdown moves its target's gene module.

    Genes are clustered into ``n_programs`` modules (:func:`_gene_programs`); each module
    has a fixed signed log fold change per member gene, ``|lfc| ~ U(effect)`` (70% down).
    A perturbation moves its target's module fully and, with probability ``second_rate``,
    one other module (weight ``+-U(0.5, 1)``); no gene-level effects. Each cell type scales
    each module by ``U(cell_type_scale)``.
    """
    n_perturbations, n_genes = len(targets), logn.shape[1]
    programs = _gene_programs(logn, n_programs, seed)
    module_lfc = np.zeros((n_programs, n_genes))
    for k in range(n_programs):
        members = np.flatnonzero(programs == k)
        signs = np.where(rng.random(members.size) < 0.7, -1.0, 1.0)
        module_lfc[k, members] = signs * rng.uniform(*effect, members.size)
    weights = np.zeros((n_perturbations, n_programs))
    weights[np.arange(n_perturbations), programs[targets]] = 1.0
    second = np.flatnonzero(rng.random(n_perturbations) < second_rate)
    other = (programs[targets[second]] + rng.integers(1, n_programs, second.size)) % n_programs
    weights[second, other] = rng.choice([-1.0, 1.0], second.size) * rng.uniform(
        0.5, 1.0, second.size
    )
    scale = rng.uniform(*cell_type_scale, size=(len(cell_types), n_programs))
    return {cell_type: (weights * scale[c]) @ module_lfc for c, cell_type in enumerate(cell_types)}


#: kind -> (effect generator, default sizes, number of cell types kept or None for all)
_SCREENS = {
    "correlation": (_correlation_effects, SCREEN_SIZES, None),
    "pathway": (_pathway_effects, SCREEN_SIZES, None),
    "small": (_correlation_effects, SMALL_SIZES, 3),
}
SCREEN_KINDS = ("latent", *_SCREENS)


def control_gene_loadings(
    adata: ad.AnnData,
    perturbation_key: str,
    control_label: str,
    n_components: int = N_LOADINGS,
) -> pd.DataFrame:
    """Each gene's loadings on the principal components of a screen's control cells.

    The control cells' counts are log-normalised (log1p of counts per 10,000), pooled over
    cell types and standardised per gene; a gene's loading on a component is its right
    singular vector entry times the singular value over ``sqrt(n_cells)`` (its correlation
    with the component's scores). Signs are fixed so that each component's largest entry is
    positive. Only statistics of the observed controls are used, as any user has them.

    Returns
    -------
    DataFrame indexed by gene, ``n_components`` columns.
    """
    is_control = (adata.obs[perturbation_key] == control_label).to_numpy()
    x = np.asarray(log_normalize(sp.csr_matrix(adata.X[is_control])).todense(), np.float64)
    z = (x - x.mean(0)) / (x.std(0) + 1e-9)
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    loadings = (vt[:n_components] * (s[:n_components, None] / np.sqrt(len(z)))).T
    flip = np.sign(loadings[np.abs(loadings).argmax(0), np.arange(loadings.shape[1])])
    return pd.DataFrame(
        loadings * flip,
        index=adata.var_names.astype(str),
        columns=[f"pc{i}" for i in range(loadings.shape[1])],
    )


def make_screen(
    kind: str,
    source: ad.AnnData,
    cell_type_key: str,
    *,
    cell_types: Sequence[str] | None = None,
    seed: int = 0,
    perturbation_key: str = "target_gene",
    control_label: str = "non-targeting",
    **sizes,
) -> ad.AnnData:
    """One screen of a suite that differ in how perturbations act, for held-out benchmarks.

    Kinds:

    ``"latent"``
        :func:`make_semisynthetic_perturbation_data` with ``n_features=10`` and
        ``feature_noise=0.3``: effects generated from a hidden latent per perturbation,
        features = latent + noise.
    ``"correlation"``
        Correlation propagation (:func:`_correlation_effects`): each knockdown moves the genes
        co-expressed with its target in each cell type's real cells.
    ``"pathway"``
        A sparse pathway screen (:func:`_pathway_effects`): each knockdown moves its
        target's gene module, sometimes a second one.
    ``"small"``
        The correlation mechanism on a small screen: 40 perturbations, 60 cells per
        (perturbation, cell type), the first three of ``cell_types`` (default: the three
        largest cell types), so that a 12 test + 4 validation split leaves 24 training
        perturbations.

    In every kind but ``"latent"`` the target gene is knocked down (expected counts times
    ``knockdown``, default 0.15) and the feature table is the target gene's loadings on
    ``N_LOADINGS`` principal components of the screen's control cells
    (:func:`control_gene_loadings`): statistics any user has, no hidden shortcut.

    Parameters
    ----------
    kind
        One of ``SCREEN_KINDS``.
    source
        Real cells with raw counts in ``X`` (e.g. :func:`load_pbmc3k_counts`).
    cell_type_key
        ``source.obs`` column with cell types; written under the same name.
    cell_types
        Cell types to keep (default: all with at least 20 cells; ``PBMC3K_CELL_TYPES`` for
        the pbmc3k benchmark).
    seed
        Seeds everything.
    perturbation_key, control_label
        Name of the perturbation column and of the control.
    **sizes
        Override the defaults (``SCREEN_SIZES``, ``SMALL_SIZES`` for ``"small"``):
        ``n_genes``, ``n_perturbations``, ``n_cells_per_perturbation``,
        ``n_controls_per_cell_type``; also ``knockdown``, ``escape_rate``, ``smoothing``,
        ``min_cell_fraction`` and the effect generator's settings (``"latent"``: any argument
        of :func:`make_semisynthetic_perturbation_data`).

    Returns
    -------
    AnnData in the layout of :func:`make_semisynthetic_perturbation_data`: raw counts in
    ``X``, ``obs[perturbation_key]`` (categorical, the control first), ``obs[cell_type_key]``,
    ``var["is_target"]``, and ``uns["perturbation_truth"]`` with ``targets``,
    ``perturbations``, ``lfc[cell_type]``, ``features`` (perturbations x F, rows in the order
    of ``perturbations``; read with :func:`perturbation_feature_table`), ``kind`` and ``seed``.
    """
    names = {"perturbation_key": perturbation_key, "control_label": control_label}
    if kind == "latent":
        settings = {**SCREEN_SIZES, "n_features": 10, "feature_noise": 0.3, **sizes}
        out = make_semisynthetic_perturbation_data(
            source, cell_type_key, cell_types=cell_types, seed=seed, **names, **settings
        )
        out.uns["perturbation_truth"]["kind"] = kind
        return out
    if kind not in _SCREENS:
        raise ScForgeValueError(f"kind must be one of {SCREEN_KINDS}, got {kind!r}.")
    generate, defaults, n_cell_types = _SCREENS[kind]
    settings = {**defaults, **sizes}
    size = {key: settings.pop(key) for key in SCREEN_SIZES}
    draw = {"knockdown": 0.15, "escape_rate": 0.1, "smoothing": 0.2, "min_cell_fraction": 0.1}
    draw.update({key: settings.pop(key) for key in _DRAW_SETTINGS if key in settings})
    if n_cell_types is not None:
        if cell_types is None:
            labels = _obs_column(source, cell_type_key, "Cell-type").astype(str)
            cell_types = list(labels.value_counts().index)
        cell_types = list(cell_types)[:n_cell_types]

    rng = np.random.default_rng([seed, len(kind)])
    counts, labels, cell_types, gene_names = _source_cells(
        source, cell_type_key, cell_types, size["n_genes"], draw["min_cell_fraction"]
    )
    logn = np.asarray(log_normalize(counts).todense())
    targets = _pick_targets(counts, size["n_perturbations"], rng)
    pert_names = _perturbation_names(gene_names, targets, control_label)
    lfc = generate(logn, labels, cell_types, targets, rng, seed=seed, **settings)
    for effect in lfc.values():
        effect[np.arange(len(targets)), targets] = np.log(draw["knockdown"])
    out = _draw_screen(
        counts,
        labels,
        cell_types,
        gene_names,
        targets,
        pert_names,
        lfc,
        rng,
        n_controls_per_cell_type=size["n_controls_per_cell_type"],
        n_cells_per_perturbation=size["n_cells_per_perturbation"],
        escape_rate=draw["escape_rate"],
        smoothing=draw["smoothing"],
        cell_type_key=cell_type_key,
        **names,
    )
    loadings = control_gene_loadings(out, perturbation_key, control_label)
    truth = out.uns["perturbation_truth"]
    truth.update(kind=kind, seed=seed)
    truth["features"] = loadings.to_numpy()[targets].astype(np.float32)
    return out


def perturbation_feature_table(adata: ad.AnnData, *, latent: bool = False) -> pd.DataFrame:
    """The perturbation feature table of a screen built with ``n_features > 0``.

    Parameters
    ----------
    adata
        Output of :func:`make_semisynthetic_perturbation_data`.
    latent
        Return the noiseless latent vectors instead of the noisy features.

    Returns
    -------
    DataFrame indexed by perturbation name, one column per feature (the format of
    ``ScForgePerturb(perturbation_features=...)``).
    """
    truth = adata.uns.get("perturbation_truth", {})
    key = "latent" if latent else "features"
    if key not in truth:
        raise KeyError(
            "This screen has no perturbation features: build it with "
            "make_semisynthetic_perturbation_data(..., n_features=16)."
        )
    values = np.asarray(truth[key], dtype=np.float32)
    names = [str(p) for p in truth["perturbations"]]
    return pd.DataFrame(
        values, index=pd.Index(names), columns=[f"f{i}" for i in range(values.shape[1])]
    )


def backbone_gene_features(
    adata: ad.AnnData,
    source: ad.AnnData,
    *,
    seed: int = 0,
    n_epochs: int = 6,
    hidden_dim: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    max_genes: int = 256,
    batch_size: int = 64,
) -> pd.DataFrame:
    """Perturbation features a user would bring: the target genes' embeddings in a backbone.

    A small :class:`scforge_scvi.ScForge` (the library's default recipe: binned expression
    tokens, masked-gene pretraining) is pretrained for ``n_epochs`` on ``source``'s raw counts
    restricted to the screen's genes, and each perturbation gets the gene token embedding of
    its target gene (:meth:`scforge_scvi.ScForge.gene_embeddings`).

    Parameters
    ----------
    adata
        A screen (e.g. :func:`make_screen`), with ``uns["perturbation_truth"]``.
    source
        The real cells it was built from (raw counts in ``X``).
    seed
        Seeds the initialisation and the training.
    n_epochs, hidden_dim, num_layers, num_heads, max_genes, batch_size
        Size of the backbone and of its pretraining (the defaults take about a minute on one
        CPU core for pbmc3k).

    Returns
    -------
    DataFrame indexed by perturbation (in the order of ``perturbations``), ``hidden_dim``
    columns (the format of :func:`perturbation_feature_table`).
    """
    import torch

    from scforge_scvi import ScForge

    truth = adata.uns["perturbation_truth"]
    genes = adata.var_names.astype(str)
    cells = source[:, source.var_names.get_indexer(genes)].copy()
    cells.var_names = genes
    cells.X = sp.csr_matrix(cells.X, dtype=np.float32)
    check_raw_counts(cells.X, "source.X")
    cells.obs = cells.obs[[]]
    ScForge.setup_anndata(cells)
    torch.manual_seed(seed)
    model = ScForge(
        cells,
        max_genes=max_genes,
        hidden_dim=hidden_dim,
        num_layers=num_layers,
        num_heads=num_heads,
        preprocessing={"n_top_genes": None},
    )
    model.train(
        max_epochs=n_epochs,
        batch_size=batch_size,
        seed=seed,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
    )
    perturbations = [str(p) for p in truth["perturbations"]]
    table = model.gene_embeddings([str(truth["targets"][p]) for p in perturbations])
    table.index = pd.Index(perturbations)
    table.columns = [f"f{i}" for i in range(table.shape[1])]
    return table
