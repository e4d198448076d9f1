"""The linear path of the annotation head: a logistic regression on log-normalised genes.

A fine-tuned :class:`~scforge_scvi.ScForge` classifies with two predictors side by side: the
transformer's head on the cell embedding, and an L2 logistic regression on the standardised,
library-size-normalised ``log1p`` expression of the vocabulary genes (the baseline that
``evaluate`` prints, fitted on the same cells). The default prediction is the mixture

    p = mix * p_linear + (1 - mix) * p_backbone

with ``mix`` chosen on the validation cells (see :func:`choose_mix`), so that on data where
the transformer adds nothing the model falls back to the linear fit. ``mix = 0`` is the
transformer alone: the value of a model fine-tuned before the linear path existed, or with
``train(linear_path=False)``. Both paths stay
readable on their own: ``predict(head="backbone")`` and ``predict(head="linear")``.

When the registered AnnData holds unlabelled cells (``setup_anndata(...,
unlabeled_category=...)``), the linear path is fitted on every training cell: the labelled
cells keep their labels, and the others get labels spread from them over a nearest-neighbour
graph of the cells' principal components (:func:`spread_labels`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from scforge_scvi.data._preprocess import log_normalize

#: mixing weights tried on the validation cells
MIX_GRID = np.round(np.linspace(0.0, 1.0, 11), 2)
#: fewer labelled validation cells than this: the linear path alone
MIN_VALIDATION_CELLS = 50
#: share of its validation-optimal weight the backbone keeps (see :func:`choose_mix`)
BACKBONE_SHRINK = 0.5
#: inverse L2 strength of the logistic regression (scikit-learn's default, as the baseline's)
C = 1.0
#: label spreading (:func:`spread_labels`): highly variable genes, principal components,
#: nearest neighbours and the share of its label a cell takes from its neighbours per step
SPREAD_GENES = 2000
SPREAD_COMPONENTS = 20
SPREAD_NEIGHBOURS = 15
SPREAD_ALPHA = 0.2


class LinearPath(nn.Module):
    """A fitted linear path: ``logits = x @ weight.T + bias`` on log-normalised expression
    indexed by token id, and its share ``mix`` of the default prediction.

    The standardisation of the fit is folded into ``weight`` and ``bias``, so that a sparse
    row of expression is scored without densifying it. Everything is a buffer: saved with the
    model's weights, never trained by gradient descent. An unfitted path has ``mix == 0``.

    Parameters
    ----------
    n_tokens
        Size of the model's vocabulary (the columns of the expression it reads).
    n_classes
        Number of classes of the classification head.
    """

    def __init__(self, n_tokens: int, n_classes: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(n_classes, n_tokens))
        self.register_buffer("bias", torch.zeros(n_classes))
        self.register_buffer("mix", torch.zeros(()))

    @property
    def fitted(self) -> bool:
        """Whether :meth:`set` has stored a fit (a zero weight matrix is an unfitted path)."""
        return bool(self.weight.abs().sum() > 0)

    def reset(self) -> None:
        """Back to an unfitted path (the transformer's head alone)."""
        self.weight.zero_()
        self.bias.zero_()
        self.mix.zero_()

    def set(self, weight: np.ndarray, bias: np.ndarray, mix: float) -> None:
        """Store a fit (``weight`` ``(n_classes, n_tokens)``) and its mixing weight."""
        self.weight.copy_(torch.as_tensor(weight, dtype=self.weight.dtype))
        self.bias.copy_(torch.as_tensor(bias, dtype=self.bias.dtype))
        self.mix.fill_(float(mix))

    def logits(self, x: sp.csr_matrix) -> np.ndarray:
        """Class logits of the cells ``x`` (``(n_cells, n_tokens)``, from :func:`features`)."""
        weight = self.weight.detach().cpu().numpy().astype(np.float64)
        return np.asarray(x @ weight.T) + self.bias.detach().cpu().numpy()

    def probabilities(self, x: sp.csr_matrix) -> np.ndarray:
        """Softmax of :meth:`logits`."""
        return softmax(self.logits(x))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax."""
    z = np.exp(logits - logits.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def features(
    counts,
    vocab_ids: np.ndarray,
    n_tokens: int,
    target_sum: float,
    indices: Sequence[int] | None = None,
    rows: int = 1024,
) -> sp.csr_matrix:
    """Log-normalised expression of the cells, one column per vocabulary token.

    The library size is the sum over all of the cell's registered genes, as for the
    tokenizers; genes outside the vocabulary are dropped after normalising. Counts are read
    ``rows`` cells at a time, so a backed file is never read whole.

    Parameters
    ----------
    counts
        ``(n_cells, n_genes)`` raw counts: dense, sparse or backed.
    vocab_ids
        Token id of each data gene, ``-1`` where it is not in the vocabulary
        (:attr:`~scforge_scvi.data.GeneMatch.vocab_ids`).
    n_tokens
        Size of the vocabulary.
    target_sum
        Library size every cell is scaled to before ``log1p``.
    indices
        Cells to read, in the order wanted (default: all).
    rows
        Cells read at a time.
    """
    vocab_ids = np.asarray(vocab_ids)
    kept = np.flatnonzero(vocab_ids >= 0)
    to_token = sp.csr_matrix(
        (np.ones(len(kept), np.float32), (kept, vocab_ids[kept])), shape=(len(vocab_ids), n_tokens)
    )
    indices = np.arange(counts.shape[0]) if indices is None else np.asarray(indices, dtype=int)
    blocks = []
    for start in range(0, len(indices), rows):
        chunk = indices[start : start + rows]
        order = np.argsort(chunk, kind="stable")  # backed files read rows in increasing order
        block = sp.csr_matrix(counts[chunk[order]])[np.argsort(order)]
        blocks.append(sp.csr_matrix(log_normalize(block, target_sum=target_sum)) @ to_token)
    if not blocks:
        return sp.csr_matrix((0, n_tokens), dtype=np.float32)
    return sp.vstack(blocks, format="csr")


def variable_genes(x: sp.csr_matrix, n_top_genes: int) -> np.ndarray:
    """Columns of the ``n_top_genes`` most variable detected genes of ``x``.

    Scanpy's ``seurat`` flavour on log-normalised expression; every detected gene when fewer
    are detected.
    """
    import anndata as ad
    import scanpy as sc

    columns = np.flatnonzero(x.getnnz(axis=0) > 0)
    if len(columns) > n_top_genes:
        hvg = sc.pp.highly_variable_genes(
            ad.AnnData(X=x[:, columns].astype(np.float32)), n_top_genes=n_top_genes, inplace=False
        )
        columns = columns[hvg["highly_variable"].to_numpy()]
    return columns


def standardiser(dense: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column means and standard deviations of ``dense`` (a constant column gets scale 1)."""
    scale = dense.std(0)
    scale[scale == 0] = 1.0
    return dense.mean(0), scale


def fit_logreg(
    x: sp.csr_matrix, codes: np.ndarray, n_classes: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """L2 logistic regression on standardised columns, returned on the unstandardised scale.

    Parameters
    ----------
    x
        ``(n_cells, n_tokens)`` features of the training cells.
    codes
        Class code of each cell (``0 <= code < n_classes``).
    n_classes
        Classes of the model; a class without a training cell keeps a logit of ``-inf``
        (a large negative bias), so it is never predicted by this path.
    seed
        Seed of the solver.

    Returns
    -------
    ``(weight, bias)`` with ``weight`` ``(n_classes, n_tokens)``.
    """
    from sklearn.linear_model import LogisticRegression

    columns = np.flatnonzero(x.getnnz(axis=0) > 0)
    dense = x[:, columns].toarray().astype(np.float64)
    mean, scale = standardiser(dense)
    weight = np.zeros((n_classes, x.shape[1]))
    bias = np.full(n_classes, -1e4)
    present = np.unique(codes)
    if len(present) == 1:  # one class: it is always predicted
        bias[present[0]] = 0.0
        return weight, bias
    clf = LogisticRegression(C=C, max_iter=2000, random_state=seed)
    clf.fit((dense - mean) / scale, codes)
    coef = clf.coef_ if len(present) > 2 else np.vstack([-clf.coef_[0], clf.coef_[0]]) / 2
    intercept = (
        clf.intercept_
        if len(present) > 2
        else np.array([-clf.intercept_[0], clf.intercept_[0]]) / 2
    )
    weight[np.ix_(clf.classes_, columns)] = coef / scale
    bias[clf.classes_] = intercept - (coef / scale) @ mean
    return weight, bias


def spread_labels(x: sp.csr_matrix, codes: np.ndarray, n_classes: int, seed: int = 0) -> np.ndarray:
    """Labels for the unlabelled cells, spread from the labelled ones over a cell graph.

    The cells are embedded as for a scanpy workflow: the :data:`SPREAD_GENES` most variable
    genes (scanpy's ``seurat`` flavour, on all cells), standardised and clipped at 10,
    reduced to :data:`SPREAD_COMPONENTS` principal components. scikit-learn's
    ``LabelSpreading`` then propagates the labels over the :data:`SPREAD_NEIGHBOURS`-nearest
    neighbour graph, each cell keeping ``1 - SPREAD_ALPHA`` of its own label distribution per
    step. Labelled cells keep their label.

    Parameters
    ----------
    x
        ``(n_cells, n_tokens)`` log-normalised expression (from :func:`features`).
    codes
        Class code of each cell; ``codes >= n_classes`` marks an unlabelled cell.
    n_classes
        Number of classes.
    seed
        Seed of the principal component analysis.

    Returns
    -------
    A class code for every cell.
    """
    from sklearn.decomposition import PCA
    from sklearn.semi_supervised import LabelSpreading

    labelled = codes < n_classes
    if labelled.all() or not labelled.any():
        return codes
    dense = x[:, variable_genes(x, SPREAD_GENES)].toarray().astype(np.float32)
    mean, scale = standardiser(dense)
    dense = np.clip((dense - mean) / scale, -10, 10)
    n_components = min(SPREAD_COMPONENTS, *dense.shape)
    embedding = PCA(n_components, random_state=seed).fit_transform(dense)
    spreading = LabelSpreading(
        kernel="knn",
        n_neighbors=min(SPREAD_NEIGHBOURS, len(codes) - 1),
        alpha=SPREAD_ALPHA,
        max_iter=100,
    )
    spreading.fit(embedding, np.where(labelled, codes, -1))
    return np.where(labelled, codes, spreading.transduction_).astype(int)


def choose_mix(
    linear: np.ndarray, backbone: np.ndarray, codes: np.ndarray, grid: Sequence[float] = MIX_GRID
) -> float:
    """The share of the linear path: the validation optimum, moved halfway towards it.

    The share with the lowest validation log-loss is found on ``grid`` (log-loss rather than
    macro-F1: on a few hundred validation cells macro-F1 moves in steps of one cell of a
    small class, while the log-loss of the mixture is smooth in the share; ties go to the
    larger share). The backbone keeps :data:`BACKBONE_SHRINK` of its optimal share, because
    the optimum fitted on a few hundred cells overstates it: over the pbmc3k shapes of the
    annotation benchmark this rule gave the best worst case (``docs/benchmarks_annotation.md``).
    With fewer than :data:`MIN_VALIDATION_CELLS` labelled validation cells the paths cannot be
    told apart and the linear path alone is used (share 1).

    Parameters
    ----------
    linear, backbone
        ``(n_cells, n_classes)`` probabilities of the validation cells from each path.
    codes
        True class codes of the validation cells.
    grid
        Shares to try.
    """
    if len(codes) < MIN_VALIDATION_CELLS:
        return 1.0
    rows = np.arange(len(codes))
    losses = [
        -np.log(np.clip((w * linear + (1 - w) * backbone)[rows, codes], 1e-12, 1.0)).mean()
        for w in grid
    ]
    best = min(losses)
    optimum = max(w for w, loss in zip(grid, losses) if loss <= best + 1e-12)
    return float(1.0 - BACKBONE_SHRINK * (1.0 - optimum))


@dataclass
class AnnotatedCells:
    """The training and validation cells of a fine-tuned classifier, read once for the fits
    that follow fine-tuning (the linear path, then the calibration).

    Attributes
    ----------
    cells
        Sorted indices of the training and validation cells in the registered AnnData.
    x
        Their log-normalised expression (:func:`features`), one row per entry of ``cells``.
    codes
        Their class codes; ``n_classes`` for an unlabelled cell.
    n_classes
        Number of classes.
    train
        Rows (into ``cells``) of the training cells, unlabelled ones included.
    validation
        Rows of the labelled validation cells.
    """

    cells: np.ndarray
    x: sp.csr_matrix
    codes: np.ndarray
    n_classes: int
    train: np.ndarray
    validation: np.ndarray

    @classmethod
    def of(cls, model, batch_size: int = 1024) -> AnnotatedCells:
        """Read the cells of the last :meth:`~scforge_scvi.ScForge.train` of ``model``."""
        from ._constants import SCFORGE_REGISTRY_KEYS as KEYS

        n_classes = len(model.class_names_)
        codes = model.adata_manager.get_from_registry(KEYS.LABELS_KEY).ravel().astype(int)
        train = np.asarray(model.train_indices_, dtype=int)
        val = np.asarray(model.validation_indices_, dtype=int)
        cells = np.union1d(train, val)
        x = features(
            model._counts(model.adata),
            model.gene_match().vocab_ids,
            len(model.vocab),
            model.preprocessing.target_sum,
            indices=cells,
            rows=batch_size,
        )
        val = val[codes[val] < n_classes]
        return cls(
            cells=cells,
            x=x,
            codes=np.minimum(codes[cells], n_classes),
            n_classes=n_classes,
            train=np.searchsorted(cells, train),
            validation=np.searchsorted(cells, val),
        )


def fit_linear_path(
    model, cells: AnnotatedCells, seed: int = 0, batch_size: int = 1024
) -> tuple[float, np.ndarray | None]:
    """Fit ``model.module.linear_path`` after fine-tuning, and choose its share.

    The logistic regression is fitted on the labelled training cells (and on the unlabelled
    ones, with labels from :func:`spread_labels`); its share ``mix`` is chosen on the labelled
    validation cells against the backbone head (:func:`choose_mix`); then it is refitted on
    training and validation cells together, as the baseline of ``evaluate`` is.

    Parameters
    ----------
    model
        A :class:`~scforge_scvi.ScForge` just fine-tuned for classification.
    cells
        Its training and validation cells.
    seed
        Seed of the solver and of the label spreading.
    batch_size
        Cells the backbone reads at a time.

    Returns
    -------
    The chosen share of the linear path, and the default probabilities of the validation
    cells before the refit (``None`` with fewer than :data:`MIN_VALIDATION_CELLS` of them).
    """
    path, n_classes, x = model.module.linear_path, cells.n_classes, cells.x
    mix, held_out = 1.0, None
    if len(cells.validation) >= MIN_VALIDATION_CELLS:
        # validation labels hidden from the fit (and from the spreading) that scores it
        in_train = np.isin(np.arange(len(cells.cells)), cells.train)
        spread = spread_labels(x, np.where(in_train, cells.codes, n_classes), n_classes, seed)
        fit_rows = np.flatnonzero(in_train & (spread < n_classes))
        path.set(*fit_logreg(x[fit_rows], spread[fit_rows], n_classes, seed), 1.0)
        val, truth = cells.cells[cells.validation], cells.codes[cells.validation]
        backbone = model._probabilities(model.adata, val, head="backbone", batch_size=batch_size)
        linear = path.probabilities(x[cells.validation])
        mix = choose_mix(linear, backbone, truth)
        held_out = mix * linear + (1 - mix) * backbone
    spread = spread_labels(x, cells.codes, n_classes, seed)
    fit_rows = np.flatnonzero(spread < n_classes)
    path.set(*fit_logreg(x[fit_rows], spread[fit_rows], n_classes, seed), mix)
    return mix, held_out
