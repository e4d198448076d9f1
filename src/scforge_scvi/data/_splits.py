"""Cell splits: one seeded train/validation/test split for in-memory and streamed cells."""

from __future__ import annotations

import warnings

import numpy as np

#: strata with fewer cells are pooled, as one stratum cannot be spread over three splits
MIN_STRATUM = 3


def split_cells(
    n_obs: int,
    train_size: float,
    validation_size: float | None = None,
    seed: int = 0,
    strata: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded train/validation/test split of ``n_obs`` cells, optionally stratified.

    Parameters
    ----------
    n_obs
        Number of cells.
    train_size, validation_size
        Fractions of the cells for training and validation (``None``: all but the training
        cells); the rest is a test set. Sizes are rounded to whole cells.
    seed
        The same arguments always give the same split.
    strata
        One stratum per cell (e.g. its label; unlabelled cells share one): each split
        holds every stratum in proportion. Strata of fewer than :data:`MIN_STRATUM` cells are
        pooled (with a warning naming them).

    Returns
    -------
    Sorted training, validation and test indices.
    """
    validation_size = 1.0 - train_size if validation_size is None else validation_size
    if not 0 < train_size < 1 or validation_size <= 0 or train_size + validation_size > 1 + 1e-9:
        raise ValueError(
            f"Need 0 < train_size < 1, validation_size > 0 and train_size + validation_size "
            f"<= 1; got train_size={train_size}, validation_size={validation_size}."
        )
    n_val = round(n_obs * validation_size)
    n_test = max(n_obs - n_val - round(n_obs * train_size), 0)
    if strata is None:
        order = np.random.default_rng(seed).permutation(n_obs)
        val, test, train = np.split(order, [n_val, n_val + n_test])
        return np.sort(train), np.sort(val), np.sort(test)
    from sklearn.model_selection import train_test_split

    strata = _pool_rare(np.asarray(strata).astype(str))
    rest, test = np.arange(n_obs), np.array([], dtype=int)
    if n_test:
        rest, test = train_test_split(rest, test_size=n_test, random_state=seed, stratify=strata)
    train, val = train_test_split(
        rest, test_size=n_val, random_state=seed + 1, stratify=strata[rest]
    )
    return np.sort(train), np.sort(val), np.sort(test)


def _pool_rare(strata: np.ndarray) -> np.ndarray:
    values, counts = np.unique(strata, return_counts=True)
    rare = values[counts < MIN_STRATUM]
    if not len(rare):
        return strata
    warnings.warn(
        f"Classes with fewer than {MIN_STRATUM} cells are kept out of stratification: "
        f"{sorted(rare)}.",
        UserWarning,
        stacklevel=4,
    )
    pooled = np.where(np.isin(strata, rare), "__rare__", strata)
    if (pooled == "__rare__").sum() < MIN_STRATUM:  # too few even together: join the largest
        pooled[pooled == "__rare__"] = values[counts.argmax()]
    return pooled
