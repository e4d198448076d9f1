"""The plots of ``scforge_scvi.pl`` drawn on real results: tiny models trained a few steps on
pbmc68k_reduced and on a semi-synthetic screen built from its cells."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.axes import Axes

from helpers import CONTROL, PERT, split_screen
from helpers import PERTURB_TINY as PERTURB
from scforge_scvi import ScForge, ScForgePerturb, pl
from scforge_scvi.perturb._metrics import group_means, log1p_anndata

TINY = {"hidden_dim": 32, "num_layers": 1, "num_heads": 2, "max_genes": 64, "dropout": 0.0}
QUIET = {"enable_progress_bar": False, "enable_model_summary": False}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def classifier(_pbmc68k_counts_once):
    """Fine-tuned 3 epochs on 700 cells with a 20 % test split, and its evaluate() result."""
    torch.manual_seed(0)
    adata = _pbmc68k_counts_once.copy()
    ScForge.setup_anndata(adata, layer="counts", labels_key="bulk_labels")
    model = ScForge(adata, **TINY)
    model.train(
        max_epochs=3,
        train_size=0.7,
        validation_size=0.1,
        batch_size=64,
        **QUIET,
        plan_kwargs={"lr": 3e-3},
    )
    return model, model.evaluate()


@pytest.fixture(scope="module")
def perturb(unseen_screen):
    """A table model trained 3 epochs without the screen's test perturbations."""
    screen = unseen_screen
    data, held_out, split = split_screen(screen)
    ScForgePerturb.setup_anndata(data, PERT, CONTROL, cell_type_key="bulk_labels")
    torch.manual_seed(0)
    model = ScForgePerturb(data, **PERTURB)
    model.train(max_epochs=3, sets_per_batch=8, split_key="split", **QUIET)
    held_out = screen[held_out].copy()
    # the validation perturbations: trained on no cell of them, known to the one-hot model
    val = screen[(split == "val") | (screen.obs[PERT] == CONTROL).to_numpy()].copy()
    return model, held_out, val


def test_training_history_draws_the_logged_losses(classifier):
    model, _ = classifier
    ax = pl.training_history(model)
    assert isinstance(ax, Axes)
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"train_loss_epoch", "val_loss"}
    for name, line in lines.items():
        np.testing.assert_allclose(line.get_ydata(), model.history[name].to_numpy(float).ravel())
        np.testing.assert_array_equal(line.get_xdata(), [1, 2, 3])
    assert ax.get_xlabel() == "epoch" and ax.get_ylabel() == "loss"


def test_training_history_of_a_perturbation_model_and_into_given_axes(perturb):
    model, _, _ = perturb
    _, ax = plt.subplots()
    assert pl.training_history(model, ax=ax) is ax
    assert {line.get_label() for line in ax.get_lines()} == {"train_loss", "validation_loss"}


def test_training_history_names_the_available_metrics(classifier):
    with pytest.raises(KeyError, match=r"available: .*val_loss"):
        pl.training_history(classifier[0], metrics=["no_such_metric"])


def test_training_curves_is_a_deprecated_alias_returning_the_figure(classifier):
    with pytest.warns(FutureWarning, match="training_history"):
        fig = pl.training_curves(classifier[0])
    assert len(fig.axes[0].get_lines()) == 2


def test_confusion_matrix_rows_sum_to_one(classifier, tmp_path):
    _, result = classifier
    ax = pl.confusion_matrix(result, save=tmp_path / "cm.png")
    assert isinstance(ax, Axes) and (tmp_path / "cm.png").stat().st_size > 0
    image = np.asarray(ax.images[0].get_array())
    assert image.shape == result["confusion"].shape
    np.testing.assert_allclose(image.sum(1)[result["confusion"].sum(1) > 0], 1.0)
    assert [t.get_text() for t in ax.get_yticklabels()] == list(result["confusion"].index)


def test_per_class_f1_bars_beside_logistic_regression(classifier):
    _, result = classifier
    ax = pl.per_class_f1(result)
    classes = list(result["per_class_f1"])
    bars = ax.patches
    assert len(bars) == 2 * len(classes)  # ScForge and logistic regression, every class
    widths = np.array([bar.get_width() for bar in bars])
    np.testing.assert_allclose(widths[: len(classes)], list(result["per_class_f1"].values()))
    np.testing.assert_allclose(
        widths[len(classes) :], list(result["baseline_logreg"]["per_class_f1"].values())
    )
    assert [t.get_text() for t in ax.get_yticklabels()] == classes
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[0].startswith("ScForge") and legend[1].startswith("logistic regression")
    assert len(pl.per_class_f1(result, baseline=False).patches) == len(classes)


def test_per_class_f1_names_what_it_needs():
    with pytest.raises(KeyError, match="per_class_f1"):
        pl.per_class_f1({"accuracy": 1.0})


def test_perturbation_deltas_one_point_per_group_and_gene(perturb):
    model, _, cells = perturb
    prediction = model.predict(cells)
    ax = pl.perturbation_deltas(model, cells, prediction, n_genes=10)
    offsets = ax.collections[0].get_offsets()
    groups, means = group_means(log1p_anndata(cells), PERT, "bulk_labels")
    n_groups = int((groups["perturbation"] != CONTROL).sum())
    assert offsets.shape == (n_groups * 10, 2)
    # the x values are the observed changes of the largest-change genes of each group
    first = groups.index[groups["perturbation"] != CONTROL][0]
    control = groups.index[
        (groups["perturbation"] == CONTROL)
        & (groups["cell_type"] == groups.loc[first, "cell_type"])
    ][0]
    change = means[first] - means[control]
    expected = change[np.argsort(-np.abs(change))[:10]]
    np.testing.assert_allclose(np.asarray(offsets[:10, 0]), expected, rtol=1e-6, atol=1e-9)
    assert ax.get_xlabel().startswith("observed") and ax.get_ylabel().startswith("predicted")
    assert "Pearson r" in ax.get_title()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == sorted(set(groups["perturbation"]) - {CONTROL})


def test_perturbation_deltas_names_unknown_perturbations(perturb):
    model, _, cells = perturb
    with pytest.raises(ValueError, match=r"NOT_A_GENE.*available"):
        pl.perturbation_deltas(model, cells, perturbations=["NOT_A_GENE"])
