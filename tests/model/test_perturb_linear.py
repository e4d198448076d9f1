"""The linear path of ScForgePerturb: ridge from perturbation features to the change.

The closed-form fit on known linear and unrelated features, its pseudobulk changes against
the metrics' own, and the trained model on a screen with held-out perturbations: the chosen
residual weight, the linear path alone, and ``evaluate`` beside the baselines.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import CELL_TYPE, CONTROL, PERT, QUIET, split_screen
from helpers import PERTURB_TINY as TINY
from scforge_scvi.perturb import _linear
from scforge_scvi.perturb._linear import (
    RESIDUAL_WEIGHTS,
    SCALINGS,
    fit_linear_response,
    group_changes,
)
from scforge_scvi.perturb._metrics import _training_effects, log1p_anndata
from scforge_scvi.perturb._model import ScForgePerturb
from semisynthetic import perturbation_feature_table

pytestmark = pytest.mark.usefixtures("one_thread")


def _linear_groups(n_perts=40, n_features=6, n_genes=30, n_types=2, noise=0.1, seed=0):
    """Changes that are a per-cell-type linear function of the features, plus noise."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n_perts, n_features))
    weight = rng.normal(size=(n_types, n_features, n_genes))
    bias = rng.normal(size=(n_types, n_genes))
    pert = np.repeat(np.arange(n_perts), n_types)
    cell_type = np.tile(np.arange(n_types), n_perts)
    change = np.einsum("nf,nfg->ng", features[pert], weight[cell_type]) + bias[cell_type]
    change += noise * rng.normal(size=change.shape)
    return features, pert, cell_type, change, (weight, bias)


def test_the_fit_recovers_a_linear_response_and_predicts_unseen_perturbations():
    features, pert, cell_type, change, (weight, bias) = _linear_groups()
    fit, oof = fit_linear_response(features[pert], pert, cell_type, change, 2)
    assert fit.sharing == "cell_type" and np.isfinite(fit.ridge)
    new = np.random.default_rng(1).normal(size=(5, features.shape[1]))
    types = np.array([0, 1, 0, 1, 0])
    truth = np.einsum("nf,nfg->ng", new, weight[types]) + bias[types]
    error = np.abs(fit.predict(new, types) - truth).mean()
    assert error < 0.1 * np.abs(truth - bias[types]).mean()
    # out-of-fold predictions are honest: worse than the in-sample fit, better than the mean
    assert ((oof - change) ** 2).mean() > (
        (fit.predict(features[pert], cell_type) - change) ** 2
    ).mean()
    assert ((oof - change) ** 2).mean() < 0.1 * ((change - change.mean(0)) ** 2).mean()


def test_unrelated_features_fall_back_to_the_perturbation_mean():
    features, pert, cell_type, _, _ = _linear_groups(noise=0.0)
    unrelated = np.random.default_rng(5).normal(size=features.shape)
    rng = np.random.default_rng(2)
    change = rng.normal(size=(len(pert), 30))  # no relation to any feature
    fit, _ = fit_linear_response(unrelated[pert], pert, cell_type, change, 2)
    assert fit.ridge >= 10.0
    slope = np.abs(fit.predict(unrelated[:8], np.zeros(8, int)) - fit.bias[0]).mean()
    assert slope < 0.2 * np.abs(change).mean()


@pytest.mark.parametrize("signal_in_sizes", [True, False])
def test_the_feature_scaling_is_chosen_by_cross_validation(signal_in_sizes):
    """Features whose sizes rank their importance keep them; units that mean nothing don't."""
    rng = np.random.default_rng(3)
    n_perts, n_new, n_features = 30, 50, 24
    latent = rng.normal(size=(n_perts + n_new, n_features))
    features = latent * np.geomspace(1.0, 0.01, n_features)
    weight = rng.normal(size=(n_features, 40))
    # a large feature moves the genes more (as loadings on top PCs do), or all features are
    # equally informative and only their units differ
    effect = features @ weight if signal_in_sizes else 0.3 * latent @ weight
    pert = np.repeat(np.arange(n_perts), 2)
    cell_type = np.tile(np.arange(2), n_perts)
    change = effect[pert] + 0.5 * rng.normal(size=(len(pert), 40))
    new, types = np.arange(n_perts, n_perts + n_new), np.zeros(n_new, int)
    error = {}
    for scaling in SCALINGS:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(_linear, "SCALINGS", (scaling,))
            fit, _ = fit_linear_response(features[pert], pert, cell_type, change, 2)
        error[scaling] = ((fit.predict(features[new], types) - effect[new]) ** 2).mean()
    fit, _ = fit_linear_response(features[pert], pert, cell_type, change, 2)
    expected, other = ("common", "feature") if signal_in_sizes else ("feature", "common")
    assert fit.scaling == expected
    # on perturbations it never saw, the chosen scaling predicts better by a margin
    assert error[expected] < 0.7 * error[other], error


def test_too_few_perturbations_is_a_clear_error():
    features, pert, cell_type, change, _ = _linear_groups(n_perts=2)
    with pytest.raises(ValueError, match=r"at least 3 training perturbations.*linear_path=False"):
        fit_linear_response(features[pert], pert, cell_type, change, 2)


@pytest.fixture(scope="module")
def fitted(unseen_screen):
    screen = unseen_screen
    data, held_out, _ = split_screen(screen)
    ScForgePerturb.setup_anndata(data, PERT, CONTROL, cell_type_key=CELL_TYPE)
    torch.manual_seed(0)
    model = ScForgePerturb(data, **TINY, perturbation_features=perturbation_feature_table(screen))
    model.train(max_epochs=20, lr=3e-3, sets_per_batch=8, split_key="split", **QUIET)
    return model, data, screen[held_out].copy()


def test_group_changes_match_the_metrics_pseudobulks(fitted):
    model, data, _ = fitted
    cells = model._read_cells(data)
    train = data.obs["split"].astype(str).to_numpy() == "train"
    pert, cell_type, change = group_changes(cells, train, train, model._control_code)
    groups, effects, _ = _training_effects(log1p_anndata(data[train]), PERT, CONTROL, CELL_TYPE)
    names = {
        (model.cell_types_[c], model.perturbations_[p]): row
        for p, c, row in zip(pert, cell_type, change)
    }
    assert len(names) == len(groups)
    for (c, p), effect in zip(zip(groups["cell_type"], groups["perturbation"]), effects):
        np.testing.assert_allclose(names[(c, p)], effect, atol=1e-5)


def test_the_residual_weight_is_chosen_on_unseen_validation_perturbations(fitted):
    model, _, _ = fitted
    report = model.linear_path_
    assert report["validation_perturbations"] == 3
    assert report["residual_weight"] in RESIDUAL_WEIGHTS
    best = max(report["validation_scores"].values())
    assert report["validation_scores"][report["residual_weight"]] == pytest.approx(best, abs=1e-6)
    assert float(model.module.linear_path.residual_weight) == report["residual_weight"]


def test_weight_zero_is_the_linear_path_alone(fitted):
    model, _, held_out = fitted
    pred = model.predict(held_out, residual_weight=0.0)
    predicted = pred.obs["scforge_predicted"].to_numpy()
    first = pred.obs[PERT].astype(str).to_numpy()[predicted][0]
    rows = predicted & (pred.obs[PERT].astype(str).to_numpy() == first)
    cell_type = pred.obs[CELL_TYPE].astype(str).to_numpy()[rows][0]
    rows &= pred.obs[CELL_TYPE].astype(str).to_numpy() == cell_type
    c = model.cell_types_.index(cell_type)
    row = model.feature_perturbations_.index(first)
    change = model.module.linear_path(
        model.module.perturbation_encoder.table[[row]], torch.tensor([c])
    )[0].numpy()
    controls = log1p_anndata(held_out)
    is_ctrl = (held_out.obs[PERT] == CONTROL).to_numpy() & (
        held_out.obs[CELL_TYPE].astype(str).to_numpy() == cell_type
    )
    basal = np.asarray(controls.X[np.flatnonzero(is_ctrl)].todense())
    # every control of the cell type is perturbed once, so the group's mean is moved by the
    # fitted change: exactly for increases, and for decreases down to zero at most
    predicted_mean = np.asarray(pred.X[rows].mean(axis=0)).ravel()
    target = np.maximum(basal.mean(axis=0) + change, 0.0)
    up = change >= 0
    np.testing.assert_allclose(predicted_mean[up], target[up], atol=1e-5)
    assert (pred.X[rows] >= 0).all()
    # adding the change and clipping at zero would miss decreases by far more
    clipped = np.maximum(basal + change, 0.0).mean(axis=0)
    miss = np.abs(predicted_mean - target)[~up].mean()
    assert miss < 0.5 * np.abs(clipped - target)[~up].mean(), (
        miss,
        np.abs(clipped - target)[~up].mean(),
    )
    with pytest.raises(ValueError, match="residual_weight must be in \\[0, 1\\]"):
        model.predict(held_out, residual_weight=1.5)


def test_evaluate_prints_the_model_beside_the_baselines(fitted, capsys):
    model, _, held_out = fitted
    table = model.evaluate(held_out)
    assert list(table.index) == [
        "control mean",
        "perturbation mean",
        "linear path",
        "ScForgePerturb",
    ]
    assert table.loc["perturbation mean", "score"] == 0.0
    assert table.loc["linear path", "score"] > 0.05
    assert table.loc["ScForgePerturb", "score"] > 0.05
    assert "linear path" in capsys.readouterr().out


def test_a_one_hot_model_has_no_linear_path(fitted):
    _, data, _ = fitted
    model = ScForgePerturb(data, **TINY)
    assert model.module.linear_path is None
    with pytest.raises(ValueError, match="linear_path needs perturbation_features='table'"):
        ScForgePerturb(data, **TINY, linear_path=True)
