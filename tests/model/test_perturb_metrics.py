"""Perturbation baselines and cell-eval-style metrics."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

from scforge_scvi.perturb._metrics import (
    aggregate_metrics,
    control_mean_baseline,
    evaluate_perturbation_predictions,
    linear_baseline,
    log1p_anndata,
    normalized_score,
    overlap_at_n,
    perturbation_mean_baseline,
    wilcoxon_de,
)

KW = {"perturbation_key": "pert", "control_label": "ctrl"}


def toy_pair() -> tuple[ad.AnnData, ad.AnnData]:
    """Two perturbations (named after genes g0, g1) and controls; 4 genes; one cell type."""
    genes = ["g0", "g1", "g2", "g3"]
    real_x = np.array(
        [
            [1.0, 1.0, 1.0, 1.0],  # ctrl
            [1.0, 1.0, 1.0, 1.0],  # ctrl
            [0.0, 1.0, 3.0, 1.0],  # g0
            [0.0, 1.0, 1.0, 1.0],  # g0
            [1.0, 0.0, 1.0, 4.0],  # g1
        ]
    )
    pred_x = np.array(
        [
            [1.0, 1.0, 1.0, 1.0],
            [1.0, 1.0, 1.0, 1.0],
            [0.5, 1.0, 2.0, 1.0],  # g0
            [1.0, 0.0, 1.0, 2.0],  # g1
        ]
    )
    obs_real = pd.DataFrame(
        {"pert": ["ctrl", "ctrl", "g0", "g0", "g1"]}, index=[f"r{i}" for i in range(5)]
    )
    obs_pred = pd.DataFrame(
        {"pert": ["ctrl", "ctrl", "g0", "g1"]}, index=[f"p{i}" for i in range(4)]
    )
    var = pd.DataFrame(index=genes)
    return ad.AnnData(real_x, obs=obs_real, var=var), ad.AnnData(pred_x, obs=obs_pred, var=var)


def test_pseudobulk_metrics_match_hand_computation():
    real, pred = toy_pair()
    table = evaluate_perturbation_predictions(
        real, pred, metrics=("mae", "mse", "pearson_delta", "discrimination_score_l1"), **KW
    ).set_index("perturbation")
    # g0: real bulk [0, 1, 2, 1], pred [0.5, 1, 2, 1]
    assert table.loc["g0", "mae"] == pytest.approx(0.5 / 4)
    assert table.loc["g0", "mse"] == pytest.approx(0.25 / 4)
    # deltas from the control bulk [1, 1, 1, 1]
    real_d, pred_d = np.array([-1.0, 0, 1, 0]), np.array([-0.5, 0, 1, 0])
    assert table.loc["g0", "pearson_delta"] == pytest.approx(stats.pearsonr(real_d, pred_d)[0])
    # g1: pred delta [0, -1, 0, 1] vs real deltas, target gene g1 (column 1) excluded:
    # to real g1 [0, ., 0, 3] -> 2 ; to real g0 [-1, ., 1, 0] -> 3 ; rank 0 -> score 1
    assert table.loc["g1", "discrimination_score_l1"] == pytest.approx(1.0)
    # g0 (g0 column excluded): to real g0 [., 0, 1, 0] -> 0 ; rank 0
    assert table.loc["g0", "discrimination_score_l1"] == pytest.approx(1.0)


def test_discrimination_score_ranks_a_swapped_prediction_last():
    real, pred = toy_pair()
    swapped = pred.copy()
    swapped.obs["pert"] = ["ctrl", "ctrl", "g1", "g0"]  # each prediction under the other name
    table = evaluate_perturbation_predictions(
        real, swapped, metrics=("discrimination_score_l1",), **KW
    ).set_index("perturbation")
    assert table["discrimination_score_l1"].tolist() == [0.5, 0.5]  # 1 - 1/2


def test_wilcoxon_de_and_overlap_at_n():
    rng = np.random.default_rng(0)
    ctrl = rng.poisson(2.0, size=(80, 6)).astype(float)
    pert = rng.poisson(2.0, size=(60, 6)).astype(float)
    pert[:, 0] = rng.poisson(12.0, 60)  # strongly up
    pert[:, 1] = rng.poisson(6.0, 60)  # up, weaker fold change
    pert[:, 5] = 0.0  # gene off
    x, ref = np.log1p(pert), np.log1p(ctrl)
    de = wilcoxon_de(x, ref)
    expected = stats.mannwhitneyu(x, ref, axis=0, method="asymptotic").pvalue
    np.testing.assert_allclose(de["p_value"], expected)
    np.testing.assert_allclose(de["fdr"], stats.false_discovery_control(expected))
    with np.errstate(divide="ignore"):
        lfc = np.log2(np.expm1(x.mean(0)) / np.expm1(ref.mean(0)))
    np.testing.assert_allclose(de["log2_fold_change"], lfc)
    assert set(np.flatnonzero(de["significant"])) == {0, 1, 5}
    # ranked by |lfc|: gene 5 (-inf), gene 0, gene 1
    pred = de.copy()
    assert overlap_at_n(de, pred) == 1.0
    pred["significant"] = [True, False, False, False, True, False]  # finds gene 0 only
    assert overlap_at_n(de, pred) == pytest.approx(1 / 3)
    none = de.assign(significant=False)
    assert overlap_at_n(none, pred) == 0.0


def test_normalized_score_formula():
    user = {"mae": 0.1, "mse": 0.04, "pearson_delta": 0.6, "overlap_at_N": 0.1}
    base = {"mae": 0.2, "mse": 0.02, "pearson_delta": 0.2, "overlap_at_N": 0.1}
    s = normalized_score(user, base)
    assert s["mae"] == pytest.approx(0.5)  # 1 - 0.1/0.2
    assert s["mse"] == 0.0  # 1 - 2 = -1, clipped at 0
    assert s["pearson_delta"] == pytest.approx(0.5)  # (0.6 - 0.2) / (1 - 0.2)
    assert s["overlap_at_N"] == 0.0
    assert s["avg_score"] == pytest.approx(0.25)
    nan = normalized_score({"pearson_delta": np.nan}, {"pearson_delta": 0.1})
    assert nan["pearson_delta"] == 0.0


def test_metrics_reject_mismatched_genes_and_perturbations():
    real, pred = toy_pair()
    with pytest.raises(ValueError, match="same genes in the same order"):
        evaluate_perturbation_predictions(real, pred[:, ["g1", "g0", "g2", "g3"]], **KW)
    with pytest.raises(ValueError, match="same genes"):
        evaluate_perturbation_predictions(real, pred[:, :3], **KW)
    missing = pred[pred.obs["pert"] != "g1"].copy()
    with pytest.raises(ValueError, match=r"without cells in the prediction \['g1'\]"):
        evaluate_perturbation_predictions(real, missing, **KW)
    with pytest.raises(ValueError, match="available categories"):
        evaluate_perturbation_predictions(real, pred, perturbation_key="pert", control_label="NT")


def _two_cell_type_data(seed: int = 0) -> ad.AnnData:
    """Counts for two cell types, each with controls and three perturbations."""
    rng = np.random.default_rng(seed)
    rows, obs = [], []
    base = {"A": rng.uniform(2, 8, 20), "B": rng.uniform(2, 8, 20)}
    effects = {"g1": 3.0, "g2": 0.3, "g3": 2.0}
    for cell_type, mean in base.items():
        for pert in ["ctrl", "g1", "g2", "g3"]:
            m = mean.copy()
            if pert != "ctrl":
                m[int(pert[1]) * 3 : int(pert[1]) * 3 + 3] *= effects[pert]
            rows.append(rng.poisson(m, size=(30, 20)))
            obs += [(pert, cell_type)] * 30
    obs = pd.DataFrame(obs, columns=["pert", "cell_type"], index=[f"c{i}" for i in range(len(obs))])
    var = pd.DataFrame(index=[f"g{i}" for i in range(20)])
    return ad.AnnData(sp.csr_matrix(np.vstack(rows).astype(np.float32)), obs=obs, var=var)


def test_baselines_predict_what_they_claim():
    logn = log1p_anndata(_two_cell_type_data())
    kw = {**KW, "cell_type_key": "cell_type"}
    is_a = (logn.obs["cell_type"] == "A").to_numpy()
    real = logn[is_a].copy()
    train = logn[~is_a | logn.obs["pert"].isin(["ctrl", "g1", "g2"]).to_numpy()].copy()
    test = logn[is_a & logn.obs["pert"].isin(["ctrl", "g3"]).to_numpy()].copy()
    x = real.X.toarray()
    ctrl_mean = x[real.obs["pert"] == "ctrl"].mean(0)

    pred = control_mean_baseline(test, **kw)
    assert np.array_equal(pred.obs_names, test.obs_names)
    np.testing.assert_allclose(
        pred.X[(pred.obs["pert"] == "g3").to_numpy()][0], ctrl_mean, rtol=1e-5
    )
    np.testing.assert_allclose(
        pred.X[(pred.obs["pert"] == "ctrl").to_numpy()], x[real.obs["pert"] == "ctrl"], rtol=1e-6
    )

    pred = perturbation_mean_baseline(train, test, **kw)
    pert_means = [x[real.obs["pert"] == p].mean(0) for p in ("g1", "g2")]  # training perts of A
    np.testing.assert_allclose(
        pred.X[(pred.obs["pert"] == "g3").to_numpy()][0], np.mean(pert_means, axis=0), rtol=1e-5
    )

    pred = linear_baseline(train, test, n_components=2, **kw)
    assert pred.shape == test.shape and (pred.X >= 0).all()
    with pytest.raises(ValueError, match="not among the genes"):
        linear_baseline(train, test, target_genes={"g3": "MISSING"}, **kw)


def test_linear_baseline_recovers_a_linear_response():
    """Effects that are linear in the target gene's embedding are predicted for unseen genes."""
    rng = np.random.default_rng(1)
    n_genes, rank = 60, 3
    a = rng.normal(size=(n_genes, rank))
    m = a @ a.T / 4  # perturbing gene j moves every gene by column j of m
    ctrl = np.full(n_genes, 3.0)
    perts = [f"g{j}" for j in range(30)]
    x = [np.tile(ctrl, (5, 1))] + [np.tile(ctrl + m[:, j], (5, 1)) for j in range(30)]
    labels = ["ctrl"] * 5 + [p for p in perts for _ in range(5)]
    obs = pd.DataFrame({"pert": labels}, index=[f"c{i}" for i in range(len(labels))])
    full = ad.AnnData(
        np.vstack(x), obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)])
    )
    held = perts[:5]
    train = full[~full.obs["pert"].isin(held).to_numpy()].copy()
    test = full[full.obs["pert"].isin([*held, "ctrl"]).to_numpy()].copy()
    pred = linear_baseline(train, test, n_components=rank, ridge=1e-6, **KW)
    mean = perturbation_mean_baseline(train, test, **KW)
    for p in held:
        rows = (test.obs["pert"] == p).to_numpy()
        truth = test.X[rows][0] - ctrl
        assert np.corrcoef(pred.X[rows][0] - ctrl, truth)[0, 1] > 0.95
        assert np.corrcoef(mean.X[rows][0] - ctrl, truth)[0, 1] < 0.5


def _cell_eval_pair(seed: int = 0) -> tuple[ad.AnnData, ad.AnnData]:
    rng = np.random.default_rng(seed)
    n_genes = 40
    genes = [f"G{i}" for i in range(n_genes)]
    base = rng.uniform(0.5, 6.0, n_genes)
    perts = {"ctrl": 1.0, "G1": 2.5, "G2": 0.3, "G3": 1.8, "G4": 0.6}

    def sample(scale_by: dict[str, float], n: int, noise: float) -> ad.AnnData:
        rows, labels = [], []
        for pert, fold in scale_by.items():
            mean = base.copy()
            if pert != "ctrl":
                k = int(pert[1:])
                mean[k * 5 : k * 5 + 5] *= fold
                mean[k] *= 0.2
            mean = mean * rng.uniform(1 - noise, 1 + noise, n_genes)
            rows.append(rng.poisson(mean, size=(n, n_genes)))
            labels += [pert] * n
        obs = pd.DataFrame({"pert": labels}, index=[f"c{seed}_{n}_{i}" for i in range(len(labels))])
        counts = ad.AnnData(
            sp.csr_matrix(np.vstack(rows).astype(np.float32)),
            obs=obs,
            var=pd.DataFrame(index=genes),
        )
        logn = log1p_anndata(counts)
        logn.X = logn.X.toarray()
        return logn

    real = sample(perts, 40, 0.0)
    pred = sample({"ctrl": 1.0, "G1": 2.0, "G2": 0.5, "G3": 1.0, "G4": 1.2}, 30, 0.1)
    pred = ad.concat([real[real.obs["pert"] == "ctrl"], pred[pred.obs["pert"] != "ctrl"]])
    return real, pred


def test_metrics_match_cell_eval(tmp_path):
    cell_eval = pytest.importorskip("cell_eval")
    real, pred = _cell_eval_pair()
    ours = evaluate_perturbation_predictions(real, pred, **KW).set_index("perturbation")
    evaluator = cell_eval.MetricsEvaluator(
        adata_pred=pred.copy(),
        adata_real=real.copy(),
        control_pert="ctrl",
        pert_col="pert",
        num_threads=1,
        outdir=str(tmp_path),
    )
    results, agg = evaluator.compute(profile="minimal", write_csv=False)
    theirs = results.to_pandas().set_index("perturbation")
    for metric in ("mae", "mse", "pearson_delta", "discrimination_score_l1", "overlap_at_N"):
        np.testing.assert_allclose(
            ours[metric].to_numpy(),
            theirs.loc[ours.index, metric].to_numpy(),
            rtol=1e-4,
            atol=1e-6,
            err_msg=metric,
        )
    assert ours["overlap_at_N"].between(0.01, 0.99).any(), "the check needs partial overlaps"

    # baseline-normalised score against cell-eval's score_agg_metrics
    # (the control-mean baseline would make a poor check: its log fold changes are 0 up to
    # float noise, so its DE ranking is arbitrary in both implementations)
    base = perturbation_mean_baseline(real, real, **KW)
    _, agg_base = cell_eval.MetricsEvaluator(
        adata_pred=base.copy(),
        adata_real=real.copy(),
        control_pert="ctrl",
        pert_col="pert",
        num_threads=1,
        outdir=str(tmp_path / "base"),
    ).compute(profile="minimal", write_csv=False)
    metrics = ["mae", "mse", "pearson_delta", "discrimination_score_l1", "overlap_at_N"]
    keep = ["statistic", *metrics]
    scored = cell_eval.score_agg_metrics(agg.select(keep), agg_base.select(keep)).to_pandas()
    ours_base = evaluate_perturbation_predictions(real, base, **KW)
    score = normalized_score(aggregate_metrics(ours), aggregate_metrics(ours_base))
    for metric, value in zip(scored["metric"], scored["from_baseline"]):
        assert score[metric] == pytest.approx(value, abs=1e-5), metric
