"""Confidence a user can trust: calibrated probabilities, prediction sets and unknown cells.

Fitted after fine-tuning a classifier, on the labelled validation cells, and stored with the
model's weights:

**Temperature.** The default prediction ``p`` is sharpened or softened to
``softmax(log p / T)``, with ``T`` minimising the validation log-loss (temperature scaling,
Guo et al. 2017). The argmax does not change.

**Prediction sets.** Split-conformal sets (Sadinle et al. 2019): a cell's score for class
``k`` is ``1 - p_k``; the set at coverage ``c`` holds the classes whose score is at most the
``ceil((n + 1) c)``-th smallest of the ``n`` validation cells' scores for their true class.
On cells drawn like the validation cells, the set holds the true class with probability at
least ``c``. A set may be empty: no class is credible.

**Unknown cells.** A cell of a type the model never saw is often predicted with confidence,
so the unknown score does not read the classifier: it is the Mahalanobis distance (shared
covariance) from the cell to the nearest class mean of the labelled training cells, in
:data:`N_COMPONENTS` principal components of the standardised log-normalised expression of
their :data:`N_GENES` most variable genes (Lee et al. 2018 use the same distance on network
features). The score is the share of validation cells that lie closer: a cell scoring above
``0.99`` is further from every known type than 99% of validation cells are from theirs.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from scforge_scvi._errors import ScForgeValueError
from scforge_scvi.model._linear import standardiser, variable_genes

#: validation cells needed to calibrate (as to choose the share of the linear path)
MIN_CELLS = 50
#: levels at which the quantiles of the validation scores are stored
N_LEVELS = 1001
_LEVELS = np.linspace(0.0, 1.0, N_LEVELS)
#: most variable genes and principal components of the unknown score
N_GENES = 2000
N_COMPONENTS = 20


class Calibration(nn.Module):
    """The fitted calibration of a classifier: buffers saved with the model's weights.

    An unfitted calibration (``n_cells == 0``) leaves probabilities as they are and has no
    prediction sets or unknown scores.

    Parameters
    ----------
    n_tokens
        Size of the model's vocabulary (the columns of the expression it reads).
    n_classes
        Number of classes of the classifier.
    """

    def __init__(self, n_tokens: int, n_classes: int) -> None:
        super().__init__()
        self.register_buffer("temperature", torch.ones(()))
        self.register_buffer("n_cells", torch.zeros((), dtype=torch.long))
        self.register_buffer("score_quantiles", torch.ones(N_LEVELS))
        self.register_buffer("projection", torch.zeros(n_tokens, N_COMPONENTS))
        self.register_buffer("offset", torch.zeros(N_COMPONENTS))
        self.register_buffer("class_means", torch.zeros(n_classes, N_COMPONENTS))
        self.register_buffer("precision", torch.zeros(N_COMPONENTS, N_COMPONENTS))
        self.register_buffer("distance_quantiles", torch.zeros(N_LEVELS))

    @property
    def fitted(self) -> bool:
        """Whether :func:`fit_calibration` has stored a fit."""
        return int(self.n_cells) > 0

    def reset(self) -> None:
        """Back to an unfitted calibration."""
        for name, value in self.named_buffers():
            value.fill_(1 if name in ("temperature", "score_quantiles") else 0)

    def calibrated(self, probabilities: np.ndarray) -> np.ndarray:
        """``softmax(log p / T)`` of the rows of ``probabilities``."""
        return tempered(probabilities, float(self.temperature))

    def threshold(self, coverage: float) -> float:
        """The largest score ``1 - p_k`` a class may have to enter a set at ``coverage``.

        The ``k``-th smallest of the ``n`` validation scores, ``k = ceil((n + 1) coverage)``
        (the largest for ``k > n``): exact for ``n`` up to ``N_LEVELS``; beyond, the first
        stored quantile at or above it.
        """
        n = int(self.n_cells)
        k = min(n, int(np.ceil((n + 1) * coverage - 1e-9)))
        # the stored quantile j is the order statistic ceil(level_j (n - 1)) (0-based)
        held = np.ceil(_LEVELS * (n - 1))
        return float(self.score_quantiles[int(np.searchsorted(held, k - 1))])

    def prediction_sets(self, probabilities: np.ndarray, coverage: float) -> np.ndarray:
        """``(n_cells, n_classes)`` membership of the split-conformal sets at ``coverage``,
        from calibrated ``probabilities``."""
        return 1.0 - probabilities <= self.threshold(coverage) + 1e-7

    def unknown_scores(self, x: sp.csr_matrix) -> np.ndarray:
        """Share of validation cells closer to a known class than each cell of ``x``
        (``(n_cells, n_tokens)`` log-normalised expression, from
        :func:`~scforge_scvi.model._linear.features`)."""
        distances = self._distances(x)
        quantiles = self.distance_quantiles.numpy().astype(np.float64)
        return np.searchsorted(quantiles, distances, side="right") / N_LEVELS

    def _distances(self, x: sp.csr_matrix) -> np.ndarray:
        z = np.asarray(x @ self.projection.numpy().astype(np.float64)) + self.offset.numpy()
        diff = z[:, None, :] - self.class_means.numpy()[None]
        squared = np.einsum("nkd,de,nke->nk", diff, self.precision.numpy(), diff)
        return np.sqrt(np.clip(squared.min(1), 0, None))


def check_fraction(name: str, value, *, closed: bool) -> None:
    """Refuse ``value`` unless it is ``None`` or a number in ``[0, 1]`` (``closed``) or
    ``(0, 1)``, naming the argument ``name``."""
    if value is None:
        return
    number = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
    if not (number and (0 <= value <= 1 if closed else 0 < value < 1)):
        interval = "[0, 1]" if closed else "(0, 1)"
        raise ScForgeValueError(f"{name}={value!r} is not valid: use a number in {interval}.")


def tempered(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """Row-wise ``softmax(log p / temperature)``."""
    logits = np.log(np.clip(probabilities, 1e-12, 1.0)) / temperature
    z = np.exp(logits - logits.max(1, keepdims=True))
    return (z / z.sum(1, keepdims=True)).astype(np.float32)


def fit_temperature(probabilities: np.ndarray, codes: np.ndarray) -> float:
    """The temperature in ``[0.05, 20]`` with the lowest log-loss of the labelled cells."""
    from scipy.optimize import minimize_scalar

    rows = np.arange(len(codes))

    def loss(log_t: float) -> float:
        return -np.log(
            np.clip(tempered(probabilities, np.exp(log_t))[rows, codes], 1e-12, 1)
        ).mean()

    return float(
        np.exp(minimize_scalar(loss, bounds=(np.log(0.05), np.log(20)), method="bounded").x)
    )


def fit_calibration(
    calibration: Calibration,
    probabilities: np.ndarray,
    codes: np.ndarray,
    x_train: sp.csr_matrix,
    codes_train: np.ndarray,
    x_validation: sp.csr_matrix,
    seed: int = 0,
) -> None:
    """Fit ``calibration`` on labelled validation cells.

    Parameters
    ----------
    calibration
        The model's :class:`Calibration`, overwritten.
    probabilities
        ``(n_cells, n_classes)`` default probabilities of the validation cells, from a model
        that was not fitted on them.
    codes
        True class codes of the validation cells.
    x_train, codes_train
        Log-normalised expression and class codes of the labelled training cells: the
        reference of the unknown score.
    x_validation
        Log-normalised expression of the validation cells.
    seed
        Seed of the principal component analysis.
    """
    from sklearn.decomposition import PCA

    calibration.reset()
    temperature = fit_temperature(probabilities, codes)
    calibrated = tempered(probabilities, temperature)
    scores = 1.0 - calibrated[np.arange(len(codes)), codes]

    columns = variable_genes(x_train, N_GENES)
    dense = x_train[:, columns].toarray().astype(np.float64)
    mean, scale = standardiser(dense)
    n_components = min(N_COMPONENTS, *dense.shape)
    pca = PCA(n_components, random_state=seed).fit((dense - mean) / scale)
    projection = np.zeros((x_train.shape[1], N_COMPONENTS))
    projection[columns, :n_components] = pca.components_.T / scale[:, None]
    offset = np.zeros(N_COMPONENTS)
    offset[:n_components] = -(mean / scale) @ pca.components_.T - pca.mean_ @ pca.components_.T
    z = np.asarray(x_train @ projection) + offset
    present = np.unique(codes_train)
    means = np.full((calibration.class_means.shape[0], N_COMPONENTS), 1e6)  # absent: far away
    means[present] = [z[codes_train == k].mean(0) for k in present]
    residuals = z - means[codes_train]
    precision = np.linalg.pinv(np.cov(residuals.T) + 1e-6 * np.eye(N_COMPONENTS))

    with torch.no_grad():
        calibration.temperature.fill_(temperature)
        calibration.n_cells.fill_(len(codes))
        calibration.score_quantiles.copy_(
            torch.as_tensor(np.quantile(scores, _LEVELS, method="higher"))
        )
        calibration.projection.copy_(torch.as_tensor(projection))
        calibration.offset.copy_(torch.as_tensor(offset))
        calibration.class_means.copy_(torch.as_tensor(means))
        calibration.precision.copy_(torch.as_tensor(precision))
        calibration.distance_quantiles.copy_(
            torch.as_tensor(np.quantile(calibration._distances(x_validation), _LEVELS))
        )


def expected_calibration_error(
    probabilities: np.ndarray, truth: np.ndarray, bins: int = 15
) -> float:
    """Expected calibration error of the top-class confidence over ``bins`` equal-width bins.

    Parameters
    ----------
    probabilities
        ``(n_cells, n_classes)`` class probabilities.
    truth
        True class code of each cell.
    bins
        Number of confidence bins on ``[0, 1]``.
    """
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == np.asarray(truth)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    # a bin's share of cells times its |accuracy - confidence| is |sum(correct - confidence)| / n
    gap = np.bincount(which, weights=correct - confidence, minlength=bins)
    return float(np.abs(gap).sum() / len(confidence))
