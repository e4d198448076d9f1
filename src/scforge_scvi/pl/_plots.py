"""Training curves and confusion matrices of :class:`~scforge_scvi.ScForge` models."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


def _finish(fig: Figure, show: bool | None, save: str | Path | None) -> Figure:
    """Save and/or show like scanpy: ``show=None`` shows only in interactive backends."""
    import matplotlib
    import matplotlib.pyplot as plt

    if save is not None:
        fig.savefig(save, bbox_inches="tight")
    if show is None:
        show = matplotlib.get_backend().lower() not in {"agg", "pdf", "svg", "ps", "cairo"}
    if show:
        plt.show()
    return fig


def training_curves(
    model: Any,
    *,
    metrics: Sequence[str] = ("train_loss_epoch", "val_loss"),
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> Figure:
    """Plot per-epoch training and validation loss from ``model.history``.

    Parameters
    ----------
    model
        A trained model (anything with a ``history`` dict of per-epoch DataFrames).
    metrics
        Keys of ``model.history`` to draw; missing ones are skipped, but at least one must
        be present.
    ax
        Axes to draw into (default: a new figure).
    show
        Show the figure (default: only with an interactive matplotlib backend).
    save
        File to save the figure to.

    Returns
    -------
    The matplotlib figure.
    """
    history = getattr(model, "history", None)
    if not history:
        raise ValueError("The model has no training history; call model.train() first.")
    present = [m for m in metrics if m in history]
    if not present:
        raise KeyError(
            f"None of the metrics {list(metrics)} is in model.history; available: "
            f"{sorted(history)}."
        )
    fig, ax = _axes(ax, (5.0, 3.5))
    for name in present:
        values = pd.DataFrame(history[name]).iloc[:, 0].astype(float)
        ax.plot(np.arange(len(values)), values.to_numpy(), marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend(frameon=False)
    return _finish(fig, show, save)


def confusion_matrix(
    result: Any,
    *,
    normalize: bool = True,
    cmap: str = "Blues",
    annotate: bool = True,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> Figure:
    """Plot a confusion matrix (rows: true labels, columns: predictions).

    Parameters
    ----------
    result
        The dict returned by :meth:`~scforge_scvi.ScForge.evaluate` (its ``"confusion"``
        DataFrame is drawn), the confusion DataFrame itself, or a fine-tuned model whose
        held-out test cells are evaluated.
    normalize
        Divide each row by its number of cells (the per-class recall is on the diagonal).
    cmap
        Matplotlib colour map.
    annotate
        Write each cell's value.
    ax, show, save
        As in :func:`training_curves`.

    Returns
    -------
    The matplotlib figure.
    """
    if hasattr(result, "evaluate"):
        result = result.evaluate()
    confusion = result["confusion"] if isinstance(result, dict) else result
    if not isinstance(confusion, pd.DataFrame):
        raise TypeError(
            "Expected a model, the dict returned by model.evaluate() or a confusion DataFrame, "
            f"got {type(result).__name__}."
        )
    values = confusion.to_numpy(dtype=float)
    if normalize:
        totals = values.sum(axis=1, keepdims=True)
        values = np.divide(values, totals, out=np.zeros_like(values), where=totals > 0)
    n_rows, n_cols = values.shape
    fig, ax = _axes(ax, (1.0 + 0.45 * n_cols, 0.8 + 0.45 * n_rows))
    image = ax.imshow(values, cmap=cmap, vmin=0.0, vmax=1.0 if normalize else None)
    ax.set_xticks(range(n_cols), labels=[str(c) for c in confusion.columns], rotation=90)
    ax.set_yticks(range(n_rows), labels=[str(i) for i in confusion.index])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if annotate:
        threshold = np.nanmax(values) / 2 if values.size else 0.0
        for i, j in np.ndindex(values.shape):
            text = f"{values[i, j]:.2f}" if normalize else f"{int(values[i, j])}"
            colour = "white" if values[i, j] > threshold else "black"
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color=colour)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return _finish(fig, show, save)
