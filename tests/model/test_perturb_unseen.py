"""ScForgePerturb on perturbations never seen in training, predicted from their features.

A small semi-synthetic screen whose effects are generated from a hidden feature vector per
perturbation (``make_semisynthetic_perturbation_data(n_features=...)``); a few perturbations
are held out whole (no cells in any cell type) and the model is trained on the others with
the feature table of every perturbation.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from helpers import CELL_TYPE, CONTROL, PERT, QUIET
from helpers import PERTURB_TINY as TINY
from scforge_scvi.perturb._metrics import (
    aggregate_metrics,
    evaluate_perturbation_predictions,
    linear_baseline,
    log1p_anndata,
    normalized_score,
    perturbation_mean_baseline,
)
from scforge_scvi.perturb._model import ScForgePerturb
from semisynthetic import perturbation_feature_table

CELL_TYPES = ["CD14+ Monocyte", "CD19+ B"]
N_TEST = 4
KW = {"perturbation_key": PERT, "control_label": CONTROL, "cell_type_key": CELL_TYPE}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def screen(unseen_screen) -> ad.AnnData:
    return unseen_screen


def unseen_perts(screen: ad.AnnData) -> list[str]:
    return list(screen.uns["perturbation_truth"]["perturbations"][:N_TEST])


def training_cells(screen: ad.AnnData) -> ad.AnnData:
    """Every cell but the test perturbations', registered: those perturbations are unknown."""
    data = screen[screen.obs["split"].astype(str).to_numpy() != "test"].copy()
    data.obs[PERT] = data.obs[PERT].cat.remove_unused_categories()
    ScForgePerturb.setup_anndata(data, PERT, CONTROL, cell_type_key=CELL_TYPE)
    return data


def evaluation_cells(screen: ad.AnnData) -> ad.AnnData:
    """The test perturbations' cells and the controls (raw counts)."""
    split = screen.obs["split"].astype(str)
    keep = (split == "test") | (screen.obs[PERT] == CONTROL)
    return screen[keep.to_numpy()].copy()


@pytest.fixture(scope="module")
def trained(screen):
    """A small table model trained without the test perturbations (shared, read-only)."""
    torch.manual_seed(0)
    data = training_cells(screen)
    model = ScForgePerturb(data, **TINY, perturbation_features=perturbation_feature_table(screen))
    model.train(max_epochs=25, lr=3e-3, sets_per_batch=8, split_key="split", **QUIET)
    return model


def test_the_model_keeps_the_whole_table(screen):
    data = training_cells(screen)
    table = perturbation_feature_table(screen)
    model = ScForgePerturb(data, **TINY, perturbation_features=table)
    assert len(model.perturbations_) == len(table) - N_TEST + 1  # + the control
    assert len(model.feature_perturbations_) == len(table) + 1
    assert model.feature_perturbations_[: len(model.perturbations_)] == model.perturbations_
    stored = model.perturbation_table()
    assert set(stored.index) == set(table.index)
    np.testing.assert_allclose(stored.loc[table.index].to_numpy(), table.to_numpy(), rtol=1e-6)
    assert model.module.config.n_table_rows == len(table) + 1
    assert "known only by their features" in model._model_summary_string
    # a table that covers exactly the training perturbations keeps the old configuration
    exact = ScForgePerturb(data, **TINY, perturbation_features=table.loc[model.perturbations_[1:]])
    assert exact.module.config.n_table_rows is None


def test_predict_unseen_perturbations_from_the_stored_table(screen, trained):
    unseen = unseen_perts(screen)
    assert not set(unseen) & set(trained.perturbations_)
    held_out = evaluation_cells(screen)
    controls = held_out[(held_out.obs[PERT] == CONTROL).to_numpy()].copy()
    pred = trained.predict(controls, perturbations=unseen, n_cells=7, seed=3)
    predicted = pred.obs["scforge_predicted"].to_numpy()
    counts = pred.obs.loc[predicted, [PERT, CELL_TYPE]].astype(str).value_counts()
    assert len(counts) == len(unseen) * len(CELL_TYPES) and (counts == 7).all()
    assert list(pred.obs[PERT].cat.categories) == trained.perturbations_ + unseen
    assert (pred.X >= 0).all()
    # different perturbations, different predictions
    means = [pred.X[(pred.obs[PERT] == p).to_numpy()].mean(0) for p in unseen]
    assert np.abs(means[0] - means[1]).max() > 1e-3

    # the AnnData to predict may hold the unseen perturbations' cells: their groups are read
    observed = trained.predict(held_out, n_cells="observed")
    real = log1p_anndata(held_out)
    sizes = observed.obs[[PERT, CELL_TYPE]].astype(str).value_counts().to_dict()
    assert sizes == real.obs[[PERT, CELL_TYPE]].astype(str).value_counts().to_dict()
    evaluate_perturbation_predictions(real, observed, **KW)  # the layout cell-eval reads


def test_a_table_passed_to_predict(screen, trained):
    held_out = evaluation_cells(screen)
    unseen = unseen_perts(screen)
    table = perturbation_feature_table(screen)
    stored = trained.predict(held_out, perturbations=unseen[:1], n_cells=5, seed=1)
    # the same vector under a new name predicts the same cells
    new = {"NEWGENE": table.loc[unseen[0]].to_numpy()}
    passed = trained.predict(
        held_out, perturbations=["NEWGENE"], perturbation_features=new, n_cells=5, seed=1
    )
    assert set(passed.obs[PERT]) == {"NEWGENE", CONTROL}
    np.testing.assert_allclose(passed.X, stored.X, rtol=1e-5, atol=1e-6)
    # a passed row takes precedence over the stored one
    shifted = pd.DataFrame([table.loc[unseen[0]].to_numpy() + 2.0], index=[unseen[0]])
    other = trained.predict(
        held_out, perturbations=unseen[:1], perturbation_features=shifted, n_cells=5, seed=1
    )
    assert not np.allclose(other.X, stored.X)
    with pytest.raises(ValueError, match=r"has 3 columns; the model reads vectors of width 8"):
        trained.predict(held_out, perturbations=["X"], perturbation_features={"X": [1, 2, 3]})
    with pytest.raises(ValueError, match=r"NaN or infinite.*\['X'\]"):
        trained.predict(held_out, perturbations=["X"], perturbation_features={"X": [np.nan] * 8})


def test_a_perturbation_without_features_is_an_error_naming_it(screen, trained):
    held_out = evaluation_cells(screen)
    with pytest.raises(
        ValueError, match=r"No perturbation features for \['GHOST'\].*perturbation_features=table"
    ):
        trained.predict(held_out, perturbations=["GHOST", unseen_perts(screen)[0]])
    # cells of a perturbation outside the table, predicted by default, are named too
    ghost = held_out.copy()
    ghost.obs[PERT] = ghost.obs[PERT].cat.rename_categories({unseen_perts(screen)[0]: "GHOST"})
    with pytest.raises(ValueError, match=r"No perturbation features for \['GHOST'\]"):
        trained.predict(ghost)


def test_a_one_hot_model_keeps_its_error(screen):
    model = ScForgePerturb(training_cells(screen), **TINY)
    held_out = evaluation_cells(screen)
    unseen = unseen_perts(screen)
    with pytest.raises(
        ValueError, match=rf"Unknown perturbations \['{unseen[0]}'\]; the model knows"
    ):
        model.predict(held_out, perturbations=unseen[:1])
    with pytest.raises(ValueError, match=r"Unknown perturbations"):
        model.predict(held_out)  # its cells hold the unseen perturbations
    with pytest.raises(ValueError, match=r"one-hot.*cannot read feature vectors"):
        model.predict(held_out, perturbations=["X"], perturbation_features={"X": [0.0] * 8})


def test_save_and_load_keep_the_table_and_the_predictions(screen, trained, tmp_path):
    held_out = evaluation_cells(screen)
    unseen = unseen_perts(screen)
    expected = trained.predict(held_out, perturbations=unseen, n_cells=9, seed=2)
    table = trained.perturbation_table()
    data = trained.adata

    trained.save_pretrained(tmp_path / "pretrained")
    assert not list((tmp_path / "pretrained").glob("*.pkl"))
    loaded = ScForgePerturb.from_pretrained(tmp_path / "pretrained", data)
    assert loaded.feature_perturbations_ == trained.feature_perturbations_
    pd.testing.assert_frame_equal(loaded.perturbation_table(), table)
    assert not loaded.init_report_["skipped_shape"] and not loaded.init_report_["initialised"]
    np.testing.assert_array_equal(
        loaded.predict(held_out, perturbations=unseen, n_cells=9, seed=2).X, expected.X
    )

    trained.save(tmp_path / "scvi", overwrite=True)
    reloaded = ScForgePerturb.load(tmp_path / "scvi", adata=data)
    pd.testing.assert_frame_equal(reloaded.perturbation_table(), table)
    np.testing.assert_array_equal(
        reloaded.predict(held_out, perturbations=unseen, n_cells=9, seed=2).X, expected.X
    )


def test_unseen_predictions_beat_the_perturbation_mean(screen, trained):
    """Features are informative here: predictions from them beat the training mean."""
    held_out = evaluation_cells(screen)
    real = log1p_anndata(held_out)
    split = screen.obs["split"].astype(str).to_numpy()
    train = log1p_anndata(screen[split == "train"].copy())
    ours = aggregate_metrics(
        evaluate_perturbation_predictions(real, trained.predict(held_out), **KW)
    )
    mean = aggregate_metrics(
        evaluate_perturbation_predictions(real, perturbation_mean_baseline(train, real, **KW), **KW)
    )
    assert ours["mse"] < 0.9 * mean["mse"]
    assert ours["pearson_delta"] > mean["pearson_delta"] + 0.05
    scored = ["mae", "pearson_delta", "discrimination_score_l1", "overlap_at_N"]
    assert normalized_score(ours[scored], mean[scored])["avg_score"] > 0.08  # 0.16 when written
    # the linear baseline reads the same features
    linear = linear_baseline(
        train, real, perturbation_features=perturbation_feature_table(screen), ridge=10.0, **KW
    )
    lin = aggregate_metrics(evaluate_perturbation_predictions(real, linear, **KW))
    assert lin["mse"] < mean["mse"]
