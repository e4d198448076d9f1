"""Annotation scores of a model: its classifier on held-out cells, probes of its embedding,
and the logistic-regression baseline beside them.

Every function but :func:`evaluate_annotation` takes plain arrays (an embedding or a count
matrix and one label per cell) and returns a flat ``dict`` of metric name to value, ready for
JSON.

:func:`evaluate_annotation`
    The implementation of :meth:`~scforge_scvi.ScForge.evaluate`.
:func:`classification_scores`
    Accuracy, macro and weighted F1 (and per-class F1) of given predictions (a fine-tuned
    model's own classifier head).
:func:`logreg_on_cells`
    The logistic-regression baseline fitted on given training cells (HVGs chosen on them)
    and scored on given test cells: what :meth:`~scforge_scvi.ScForge.evaluate` prints
    beside the model.
:func:`linear_probe`
    Logistic regression trained on the :func:`probe_split` training cells' embeddings and
    scored on the rest (accuracy, macro F1).
:func:`baseline_logreg`
    The same classifier on log-normalised gene expression. With the same ``seed`` and labels
    it uses exactly the cells of :func:`linear_probe`, so the two numbers compare like for
    like.
:func:`embedding_quality`
    Agreement of unsupervised clusters (KMeans with one cluster per label, and Leiden on a
    kNN graph) with the labels (NMI, ARI), and the silhouette of the labels on the embedding.
    The silhouettes come from ``scib-metrics`` when it is installed (rescaled to [0, 1] as
    there), otherwise from scikit-learn with the same rescaling ``(s + 1) / 2``; the result
    names the backend used.

The probes and the ``scforge benchmark`` command split cells with :func:`probe_split`, which
is :func:`~scforge_scvi.data._splits.split_cells` stratified by label.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
from sklearn.metrics import (
    accuracy_score,
    adjusted_rand_score,
    f1_score,
    normalized_mutual_info_score,
)

from scforge_scvi._logging import logger
from scforge_scvi.data import log_normalize
from scforge_scvi.data._splits import split_cells

from ._calibration import expected_calibration_error


def probe_split(
    labels: Sequence, train_split: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded training and held-out cells of a probe, stratified by label.

    :func:`~scforge_scvi.data._splits.split_cells` with ``train_size=train_split`` and every
    other cell held out (its validation split; there is no test split).

    Parameters
    ----------
    labels
        One label per cell.
    train_split
        Fraction of cells to train on, in (0, 1).
    seed
        Random seed; the same labels and seed always give the same split.

    Returns
    -------
    Sorted training and held-out indices.
    """
    train, held_out, _ = split_cells(
        len(labels), train_split, seed=seed, strata=np.asarray(labels).astype(str)
    )
    return train, held_out


def classification_scores(
    truth: Sequence,
    predicted: Sequence,
    labels: Sequence[str] | None = None,
    *,
    per_class: bool = False,
) -> dict:
    """Accuracy, macro F1 and weighted F1 of predicted labels.

    Parameters
    ----------
    truth, predicted
        One true and one predicted label per cell.
    labels
        The model's classes (default: the true labels present). Macro and weighted F1
        average over those of them that occur in ``truth`` or ``predicted``: a class with
        no cell and no prediction among the scored cells is not an error, so it does not
        lower macro F1, while a class predicted but absent scores 0. ``per_class_f1``
        lists every class of ``labels``.
    per_class
        Also return ``per_class_f1`` (a dict, class to F1) and ``support`` (class to cells).

    Returns
    -------
    ``n_cells``, ``accuracy``, ``macro_f1`` and ``weighted_f1`` (and, with ``per_class``,
    ``per_class_f1`` and ``support``).
    """
    truth = np.asarray(truth).astype(str)
    predicted = np.asarray(predicted).astype(str)
    labels = np.unique(truth) if labels is None else np.asarray(labels).astype(str)
    occurring = labels[np.isin(labels, np.union1d(truth, predicted))]
    scores: dict = {
        "n_cells": len(truth),
        "accuracy": float(accuracy_score(truth, predicted)),
        "macro_f1": float(
            f1_score(truth, predicted, labels=occurring, average="macro", zero_division=0)
        ),
        "weighted_f1": float(
            f1_score(truth, predicted, labels=occurring, average="weighted", zero_division=0)
        ),
    }
    if per_class:
        values = f1_score(truth, predicted, labels=labels, average=None, zero_division=0)
        scores["per_class_f1"] = dict(zip(labels.tolist(), map(float, values)))
        scores["support"] = {c: int((truth == c).sum()) for c in labels.tolist()}
    return scores


def logreg_on_cells(
    counts,
    labels: Sequence,
    train_indices: Sequence[int],
    test_indices: Sequence[int],
    *,
    n_top_genes: int | None = 2000,
    target_sum: float = 1e4,
    class_names: Sequence[str] | None = None,
    seed: int = 0,
) -> dict:
    """The logistic-regression baseline fitted on given cells and scored on others.

    Counts are library-size normalised and ``log1p``-ed; the ``n_top_genes`` highly variable
    genes are selected on the training cells only (Seurat flavour), standardised with the
    training cells' statistics, and an L2 logistic regression is fitted on the training
    cells. Nothing about the test cells is used before predicting them.

    Parameters
    ----------
    counts
        ``(n_cells, n_genes)`` raw counts, dense or sparse.
    labels
        One label per cell (only those of ``train_indices`` are read for fitting).
    train_indices, test_indices
        Cells to fit on and cells to score.
    n_top_genes
        HVGs to keep (``None``: every gene).
    target_sum
        Library size every cell is scaled to before ``log1p``.
    class_names
        Classes of the F1 averages (default: the true labels of the test cells).
    seed
        Seed of the solver.

    Returns
    -------
    :func:`classification_scores` of the test cells with ``per_class=True``, plus
    ``n_train`` and ``n_genes``.
    """
    import anndata as ad
    import scanpy as sc
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train_indices = np.asarray(train_indices)
    test_indices = np.asarray(test_indices)
    labels = np.asarray(labels).astype(str)
    x = sp.csr_matrix(log_normalize(counts, target_sum=target_sum, log1p=True))
    if n_top_genes is not None and n_top_genes < x.shape[1]:
        train = ad.AnnData(X=x[train_indices])
        with np.errstate(divide="ignore", invalid="ignore"):
            hvg = sc.pp.highly_variable_genes(train, n_top_genes=n_top_genes, inplace=False)
        x = x[:, hvg["highly_variable"].to_numpy()]
    x = x.toarray()
    classifier = make_pipeline(
        StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed)
    )
    classifier.fit(x[train_indices], labels[train_indices])
    scores = classification_scores(
        labels[test_indices], classifier.predict(x[test_indices]), class_names, per_class=True
    )
    return {"n_train": len(train_indices), "n_genes": int(x.shape[1]), **scores}


def _fit_and_score(x, labels: np.ndarray, train_split: float, seed: int) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train, test = probe_split(labels, train_split, seed)
    classifier = make_pipeline(
        StandardScaler(with_mean=not sp.issparse(x)), LogisticRegression(max_iter=1000)
    )
    classifier.fit(x[train], labels[train])
    scores = classification_scores(labels[test], classifier.predict(x[test]))
    return {"n_train": len(train), **scores}


def linear_probe(
    embedding: np.ndarray, labels: Sequence, *, train_split: float = 0.8, seed: int = 0
) -> dict[str, float]:
    """Logistic regression on cell embeddings, scored on held-out cells.

    Parameters
    ----------
    embedding
        ``(n_cells, dims)`` cell embeddings (e.g. ``adata.obsm["X_scforge"]``).
    labels
        One label per cell.
    train_split
        Fraction of cells (stratified by label) the classifier is trained on.
    seed
        Seed of the split.

    Returns
    -------
    ``n_train``, ``n_cells`` (scored cells), ``accuracy`` and ``macro_f1``.
    """
    return _fit_and_score(np.asarray(embedding), np.asarray(labels).astype(str), train_split, seed)


def baseline_logreg(
    counts,
    labels: Sequence,
    *,
    train_split: float = 0.8,
    seed: int = 0,
    target_sum: float = 1e4,
) -> dict[str, float]:
    """Logistic regression on log-normalised gene expression, scored on held-out cells.

    Parameters
    ----------
    counts
        ``(n_cells, n_genes)`` raw counts, dense or sparse.
    labels
        One label per cell.
    train_split, seed
        As in :func:`linear_probe` (same values give the same cells).
    target_sum
        Library size every cell is scaled to before ``log1p``.
    """
    x = log_normalize(counts, target_sum=target_sum, log1p=True)
    return _fit_and_score(x, np.asarray(labels).astype(str), train_split, seed)


def _silhouettes(embedding, labels, batch) -> tuple[dict[str, float], str]:
    try:
        import scib_metrics
    except ImportError:
        from sklearn.metrics import silhouette_samples, silhouette_score

        result = {"silhouette_label": (float(silhouette_score(embedding, labels)) + 1) / 2}
        if batch is not None:  # 1 - |s| per cell (batch-wise), averaged over labels as scIB
            per_cell = 1 - np.abs(silhouette_samples(embedding, batch))
            result["silhouette_batch"] = float(
                np.mean([per_cell[labels == label].mean() for label in np.unique(labels)])
            )
        return result, "sklearn"
    result = {"silhouette_label": float(scib_metrics.silhouette_label(embedding, labels))}
    if batch is not None:
        result["silhouette_batch"] = float(scib_metrics.silhouette_batch(embedding, labels, batch))
    return result, "scib-metrics"


def _leiden_clusters(embedding: np.ndarray, seed: int, n_neighbors: int = 15) -> np.ndarray:
    """Leiden communities (modularity, resolution 1) of the symmetric kNN graph."""
    import random

    import igraph
    from sklearn.neighbors import NearestNeighbors

    k = min(n_neighbors, len(embedding) - 1)
    _, neighbors = NearestNeighbors(n_neighbors=k + 1).fit(embedding).kneighbors(embedding)
    edges = np.column_stack([np.repeat(np.arange(len(embedding)), k), neighbors[:, 1:].ravel()])
    graph = igraph.Graph(n=len(embedding), edges=edges, directed=False).simplify()
    igraph.set_random_number_generator(random.Random(seed))
    try:
        partition = graph.community_leiden(objective_function="modularity", n_iterations=2)
    finally:
        igraph.set_random_number_generator(random)
    return np.asarray(partition.membership)


def embedding_quality(
    embedding: np.ndarray,
    labels: Sequence,
    *,
    batch: Sequence | None = None,
    seed: int = 0,
) -> dict[str, float | str]:
    """How well an embedding separates labels, without training a classifier.

    Parameters
    ----------
    embedding
        ``(n_cells, dims)`` cell embeddings.
    labels
        One label per cell.
    batch
        One batch (donor, sample) per cell; adds ``silhouette_batch`` (1 = batches mixed).
    seed
        Seed of KMeans and Leiden.

    Returns
    -------
    ``nmi_kmeans``, ``ari_kmeans``, ``nmi_leiden``, ``ari_leiden``, ``silhouette_label``
    (and ``silhouette_batch``), each in [0, 1] (ARI can be slightly negative), higher is
    better, and ``silhouette_backend``.
    """
    from sklearn.cluster import KMeans

    embedding = np.asarray(embedding, dtype=np.float32)
    labels = np.asarray(labels).astype(str)
    n_labels = len(np.unique(labels))
    kmeans = KMeans(n_clusters=n_labels, n_init=5, random_state=seed).fit_predict(embedding)
    leiden = _leiden_clusters(embedding, seed)
    result: dict[str, float | str] = {
        "n_cells": len(labels),
        "nmi_kmeans": float(normalized_mutual_info_score(labels, kmeans)),
        "ari_kmeans": float(adjusted_rand_score(labels, kmeans)),
        "nmi_leiden": float(normalized_mutual_info_score(labels, leiden)),
        "ari_leiden": float(adjusted_rand_score(labels, leiden)),
    }
    silhouettes, backend = _silhouettes(
        embedding, labels, None if batch is None else np.asarray(batch).astype(str)
    )
    return {**result, **silhouettes, "silhouette_backend": backend}


def evaluate_annotation(
    model,
    adata,
    indices=None,
    *,
    baseline: bool = True,
    n_top_genes: int = 2000,
    coverage: float = 0.9,
    unknown_threshold: float = 0.99,
) -> dict:
    """Classification metrics of a fine-tuned :class:`~scforge_scvi.ScForge` on held-out cells.

    The implementation of :meth:`scforge_scvi.ScForge.evaluate` (see there for the
    arguments and the returned scores).
    """
    import pandas as pd
    from sklearn.metrics import confusion_matrix

    own_data = adata is None or adata is model.adata
    adata = model._validate_anndata(adata)
    if indices is None and not own_data:
        indices = np.arange(adata.n_obs)
    if indices is None:
        indices = getattr(model, "test_indices_", None)
        if indices is None or len(indices) == 0:
            raise ValueError(
                "No held-out test cells: train with train_size + validation_size < 1, or "
                "pass indices=..."
            )
    indices = np.asarray(indices)
    labels_key = model._setup_arg("labels_key")
    if labels_key is None or labels_key not in adata.obs:
        raise ValueError(
            "evaluate() compares predictions with labels: register them with "
            "setup_anndata(adata, labels_key=...)."
        )
    labels = list(model.class_names_)
    column = adata.obs[labels_key]
    all_truth = column.astype(str).to_numpy()
    # unlabelled cells (the unlabelled category or a missing label) are not scored
    labelled = column.notna().to_numpy() & np.isin(all_truth, labels)
    scored = indices[labelled[indices]]
    sub = adata[scored]
    sub = sub.to_memory() if sub.isbacked else sub.copy()
    calibration = model.module.calibration
    trust = {"coverage": coverage, "unknown_threshold": unknown_threshold}
    trust = trust if calibration is not None and calibration.fitted else {}
    probs = model.predict(sub, return_probabilities=True, **trust).to_numpy()
    pred = np.asarray(labels)[probs.argmax(1)]
    truth = all_truth[scored]
    result = classification_scores(truth, pred, labels, per_class=True)
    if trust:
        codes = pd.Series(range(len(labels)), index=labels)[truth].to_numpy()
        sets = sub.obs["scforge_prediction_set"].astype(str).str.split(", ")
        result.update(
            ece=expected_calibration_error(probs, codes),
            ece_uncalibrated=expected_calibration_error(model._probabilities(sub), codes),
            coverage=float(np.mean([t in s for t, s in zip(truth, sets)])),
            mean_set_size=float(sub.obs["scforge_prediction_set_size"].mean()),
            unknown_rate=float((sub.obs["scforge_unknown_score"] > unknown_threshold).mean()),
        )
        logger.info(
            f"Calibration on {len(scored)} cells: ECE {result['ece']:.3f} (uncalibrated "
            f"{result['ece_uncalibrated']:.3f}); prediction sets at coverage {coverage}: "
            f"{result['coverage']:.3f} covered, {result['mean_set_size']:.2f} classes a cell; "
            f"unknown score above {unknown_threshold}: {result['unknown_rate']:.3f} of cells."
        )
    result["confusion"] = pd.DataFrame(
        confusion_matrix(truth, pred, labels=labels), index=labels, columns=labels
    )
    path = model.module.linear_path
    result["linear_path_share"] = float(path.mix) if path is not None else 0.0
    if path is not None and path.fitted:  # each path alone, so that what each adds stays visible
        for head in ("backbone", "linear"):
            alone = np.asarray(labels)[model._probabilities(sub, head=head).argmax(1)]
            result[f"{head}_macro_f1"] = classification_scores(truth, alone, labels)["macro_f1"]
    fitted = np.concatenate(
        [getattr(model, "train_indices_", []), getattr(model, "validation_indices_", [])]
    ).astype(int)
    if baseline and own_data and len(fitted):
        fitted = fitted[labelled[fitted] & ~np.isin(fitted, scored)]
        counts, truth_of, fit_at, score_at = model._counts(adata), all_truth, fitted, scored
        if adata.isbacked:  # read only the rows the baseline uses
            rows = np.union1d(fitted, scored)
            counts, truth_of = counts[rows], all_truth[rows]
            fit_at, score_at = np.searchsorted(rows, fitted), np.searchsorted(rows, scored)
        reference = logreg_on_cells(
            counts,
            truth_of,
            fit_at,
            score_at,
            n_top_genes=n_top_genes,
            target_sum=model.preprocessing.target_sum,
            class_names=labels,
        )
        result["baseline_logreg"] = reference
        result["relative_macro_f1"] = (
            result["macro_f1"] / reference["macro_f1"] if reference["macro_f1"] else np.nan
        )
        paths = ""
        if "backbone_macro_f1" in result:
            paths = (
                f" (transformer head alone {result['backbone_macro_f1']:.3f}, linear path alone "
                f"{result['linear_macro_f1']:.3f}, share of the linear path "
                f"{result['linear_path_share']:.2f})"
            )
        logger.info(
            f"Test macro-F1 {result['macro_f1']:.3f}{paths} (accuracy {result['accuracy']:.3f}) on "
            f"{len(scored)} cells; logistic regression on {reference['n_genes']} HVGs, "
            f"fitted on the same training cells: {reference['macro_f1']:.3f} "
            f"(accuracy {reference['accuracy']:.3f}); ratio "
            f"{result['relative_macro_f1']:.3f}."
        )
    elif baseline:
        logger.info(
            f"Test macro-F1 {result['macro_f1']:.3f} on {len(scored)} cells (no "
            "logistic-regression baseline: it needs the training AnnData of this session)."
        )
    return result
