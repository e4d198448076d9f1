"""Plots of :class:`~scforge_scvi.ScForge` and :class:`~scforge_scvi.ScForgePerturb` results.

Each function draws one panel from what a model logged or returned (``model.history``,
:meth:`~scforge_scvi.ScForge.evaluate`, :meth:`~scforge_scvi.ScForgePerturb.predict`) and
returns its matplotlib Axes; ``ax`` draws into existing axes and ``show`` / ``save`` behave as
in scanpy.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import anndata as ad
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: loss keys of ``model.history`` drawn by default: the first present of each tuple
_DEFAULT_LOSSES = (("train_loss_epoch", "train_loss"), ("val_loss", "validation_loss"))


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> Axes:
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def _finish(ax: Axes, show: bool | None, save: str | Path | None, *, own: bool) -> Axes:
    """Save and/or show like scanpy. ``show=None`` shows a figure the function created (not
    axes it was given, which the caller may still be filling) in interactive backends only."""
    import matplotlib
    import matplotlib.pyplot as plt

    if save is not None:
        ax.figure.savefig(save, bbox_inches="tight")
    if show is None:
        backend = matplotlib.get_backend().lower()
        show = own and backend not in {"agg", "pdf", "svg", "ps", "cairo"}
    if show:
        plt.show()
    return ax


def _evaluated(result: Any) -> dict:
    """The dict of :meth:`~scforge_scvi.ScForge.evaluate`, computed when given the model."""
    if hasattr(result, "evaluate") and not isinstance(result, dict):
        result = result.evaluate()
    return result


def training_history(
    model: Any,
    *,
    metrics: Sequence[str] | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> Axes:
    """Plot training and validation loss per epoch from ``model.history``.

    Parameters
    ----------
    model
        A trained :class:`~scforge_scvi.ScForge` or :class:`~scforge_scvi.ScForgePerturb`
        (anything with a ``history`` dict of per-epoch DataFrames).
    metrics
        Keys of ``model.history`` to draw; missing ones are skipped, but at least one must be
        present. Default: the training loss (``train_loss_epoch`` or ``train_loss``) and the
        validation loss (``val_loss`` or ``validation_loss``) that the model logged.
    ax
        Axes to draw into (default: a new figure).
    show
        Show the figure (default: with an interactive matplotlib backend, when ``ax`` is not
        given).
    save
        File to save the figure to.

    Returns
    -------
    The matplotlib Axes, one line per metric (x: epoch, y: the logged value).
    """
    history = getattr(model, "history", None)
    if not history:
        raise ValueError(
            "The model has no training history; call model.train() first (with a logger: "
            "logger=None keeps no history)."
        )
    if metrics is None:
        metrics = [next((k for k in keys if k in history), keys[0]) for keys in _DEFAULT_LOSSES]
    present = [m for m in metrics if m in history]
    if not present:
        raise KeyError(
            f"None of the metrics {list(metrics)} is in model.history; available: "
            f"{sorted(history)}."
        )
    own = ax is None
    ax = _axes(ax, (5.0, 3.5))
    for name in present:
        values = pd.DataFrame(history[name]).iloc[:, 0].astype(float)
        ax.plot(np.arange(1, len(values) + 1), values.to_numpy(), marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss" if all("loss" in m for m in present) else "value")
    ax.legend(frameon=False)
    return _finish(ax, show, save, own=own)


def training_curves(model: Any, **kwargs: Any) -> Figure:
    """Deprecated alias of :func:`training_history` that returns the figure.

    .. deprecated:: 0.1.0
        Use :func:`training_history`, which returns the Axes (``ax.figure`` is the figure);
        ``training_curves`` will be removed in the next release.
    """
    warnings.warn(
        "scforge_scvi.pl.training_curves is deprecated; use scforge_scvi.pl.training_history, "
        "which returns the Axes (its .figure is the figure).",
        FutureWarning,
        stacklevel=2,
    )
    return training_history(model, **kwargs).figure


def confusion_matrix(
    result: Any,
    *,
    normalize: bool = True,
    cmap: str = "Blues",
    annotate: bool = True,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> Axes:
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
        As in :func:`training_history`.

    Returns
    -------
    The matplotlib Axes holding the matrix as an image.
    """
    result = _evaluated(result)
    if isinstance(result, dict) and "confusion" not in result:
        raise KeyError(
            f"The result has no 'confusion' entry (keys: {sorted(result)}); pass the dict "
            "returned by ScForge.evaluate()."
        )
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
    own = ax is None
    ax = _axes(ax, (1.0 + 0.45 * n_cols, 0.8 + 0.45 * n_rows))
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
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return _finish(ax, show, save, own=own)


def per_class_f1(
    result: Any,
    *,
    baseline: bool = True,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> Axes:
    """Plot the F1 score of every class, beside the logistic-regression baseline's.

    Parameters
    ----------
    result
        The dict returned by :meth:`~scforge_scvi.ScForge.evaluate` (its ``per_class_f1``,
        and ``baseline_logreg["per_class_f1"]`` when present), or a fine-tuned model whose
        held-out test cells are evaluated.
    baseline
        Draw the logistic regression's bar beside the model's when ``result`` holds it.
    ax, show, save
        As in :func:`training_history`.

    Returns
    -------
    The matplotlib Axes, with one horizontal bar per class and method, labelled ``ScForge`` and
    ``logistic regression``; the legend gives each method's macro F1.
    """
    result = _evaluated(result)
    if not isinstance(result, dict) or "per_class_f1" not in result:
        keys = sorted(result) if isinstance(result, dict) else type(result).__name__
        raise KeyError(
            f"Expected the dict returned by ScForge.evaluate() with 'per_class_f1'; got {keys}."
        )
    methods = {"ScForge": result}
    if baseline and "baseline_logreg" in result:
        methods["logistic regression"] = result["baseline_logreg"]
    classes = list(result["per_class_f1"])
    height = 0.8 / len(methods)
    own = ax is None
    ax = _axes(ax, (5.5, 0.6 + 0.35 * len(classes) * len(methods) ** 0.5))
    y = np.arange(len(classes))
    for i, (name, scores) in enumerate(methods.items()):
        f1 = [scores["per_class_f1"].get(c, np.nan) for c in classes]
        label = f"{name} (macro F1 {scores['macro_f1']:.3f})"
        ax.barh(y + (i - (len(methods) - 1) / 2) * height, f1, height=height, label=label)
    ax.set_yticks(y, labels=classes)
    ax.invert_yaxis()  # first class on top
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("F1 on the test cells")
    ax.legend(frameon=False, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=1)
    return _finish(ax, show, save, own=own)


def perturbation_deltas(
    model: Any,
    adata: ad.AnnData,
    prediction: ad.AnnData | None = None,
    *,
    n_genes: int = 20,
    perturbations: Sequence[str] | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | Path | None = None,
) -> Axes:
    """Scatter predicted against observed pseudobulk changes of perturbed cells.

    For every (cell type, perturbation) group of ``adata``, the change is the mean log1p
    expression of its cells minus that of the controls of its cell type, in the real cells
    and in the prediction; the ``n_genes`` genes with the largest observed change of each
    group are drawn, one point per group and gene, coloured by perturbation (with a legend
    for up to 20 perturbations).

    Parameters
    ----------
    model
        A trained :class:`~scforge_scvi.ScForgePerturb` (its registered perturbation,
        control, cell-type columns and counts layer are used).
    adata
        Raw counts of the perturbed cells to compare and of the controls of their cell types
        (the AnnData given to :meth:`~scforge_scvi.ScForgePerturb.evaluate`).
    prediction
        ``model.predict(adata)`` (computed when not given).
    n_genes
        Genes drawn per group: those of the largest absolute observed change.
    perturbations
        Perturbations to draw (default: every perturbation of ``adata`` but the control).
    ax, show, save
        As in :func:`training_history`.

    Returns
    -------
    The matplotlib Axes, with a scatter of ``n_groups x n_genes`` points (x: observed change,
    y: predicted change), the diagonal, and the Pearson correlation in the title.
    """
    from scforge_scvi.perturb._metrics import group_means, log1p_anndata

    setup = model._setup
    key, control = setup["perturbation_key"], model.control_label_
    cell_type_key = setup.get("cell_type_key")
    if prediction is None:
        prediction = model.predict(adata)
    real = log1p_anndata(adata, setup.get("layer"))
    observed, predicted = (
        _changes(group_means(data, key, cell_type_key), control) for data in (real, prediction)
    )
    available = sorted(set(observed.index.get_level_values("perturbation")))
    if perturbations is not None:
        missing = sorted(set(perturbations) - set(available))
        if missing:
            raise ValueError(
                f"Perturbations {missing} have no cells in adata.obs[{key!r}]; available: "
                f"{available}."
            )
        observed = observed[observed.index.get_level_values("perturbation").isin(perturbations)]
    missing = observed.index.difference(predicted.index)
    if len(missing):
        raise ValueError(
            f"The prediction has no cells of the groups {list(missing)}; predict them with "
            "model.predict(adata)."
        )
    predicted = predicted.loc[observed.index]
    n_genes = min(int(n_genes), observed.shape[1])
    if n_genes < 1:
        raise ValueError(f"n_genes must be at least 1, got {n_genes}.")
    top = np.argsort(-np.abs(observed.to_numpy()), axis=1)[:, :n_genes]
    x = np.take_along_axis(observed.to_numpy(), top, axis=1)
    y = np.take_along_axis(predicted.to_numpy(), top, axis=1)
    own = ax is None
    ax = _axes(ax, (4.5, 4.5))
    names = observed.index.get_level_values("perturbation").to_numpy()
    perts = pd.Series(names).astype("category")
    points = ax.scatter(
        x.ravel(),
        y.ravel(),
        c=np.repeat(perts.cat.codes.to_numpy(), n_genes),
        cmap="tab20",
        vmin=0,
        vmax=max(len(perts.cat.categories) - 1, 1),
        s=12,
        alpha=0.8,
    )
    if len(perts.cat.categories) <= 20:  # one colour per perturbation
        handles, _ = points.legend_elements()
        ax.legend(handles, list(perts.cat.categories), frameon=False, fontsize=7, title=key)
    lim = float(np.nanmax(np.abs(np.concatenate([x.ravel(), y.ravel()])))) * 1.05 or 1.0
    ax.plot([-lim, lim], [-lim, lim], color="0.5", lw=1, ls="--")
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    r = np.corrcoef(x.ravel(), y.ravel())[0, 1] if x.size > 1 else np.nan
    ax.set_title(f"{len(names)} groups x {n_genes} genes, Pearson r = {r:.2f}")
    ax.set_xlabel("observed change (log1p)")
    ax.set_ylabel("predicted change (log1p)")
    return _finish(ax, show, save, own=own)


def _changes(grouped: tuple[pd.DataFrame, np.ndarray], control: str) -> pd.DataFrame:
    """Mean of each perturbed group minus the control mean of its cell type."""
    groups, means = grouped
    frame = pd.DataFrame(
        means, index=pd.MultiIndex.from_frame(groups[["cell_type", "perturbation"]])
    )
    is_control = groups["perturbation"].to_numpy() == control
    base = frame[is_control].droplevel("perturbation")
    perturbed = frame[~is_control]
    types = perturbed.index.get_level_values("cell_type")
    return perturbed[types.isin(base.index)] - base.loc[types[types.isin(base.index)]].to_numpy()
