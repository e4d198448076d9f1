"""Perturbation-response benchmarks: ScForgePerturb against baselines and Arc's State.

A semi-synthetic Perturb-seq screen is built from real PBMC 3k cells (known perturbation
programs applied to real cells, counts drawn again; see
``make_semisynthetic_perturbation_data`` in ``benchmarks/semisynthetic.py``). Two splits:

``--split unseen`` (default)
    Whole perturbations are held out in every cell type: their cells are in no training
    data, and every method predicts them from the control cells and the perturbation's
    feature vector alone (State's zero-shot-perturbation setting; the Virtual Cell
    Challenge). The screen is built with ``n_features=10``: each perturbation's effect is
    generated from a hidden latent vector, and the feature table handed to the methods is
    that vector plus noise. ScForgePerturb is trained on the other perturbations' cells with
    the feature table of every perturbation. Baselines: the control mean, the perturbation
    mean (cell-eval's) and the linear model of Ahlmann-Eltze et al. 2025 on the same
    features (ridge and width chosen on the validation perturbations). With
    ``--state-python`` (a virtual environment with ``arc-state``), State's Transition model
    is trained on the same cells and features by ``benchmarks/state_runner.py`` and scored
    with the same code. Several seeds (``--seeds``), mean +- standard deviation.
``--screen``
    Which screen of the suite the unseen split runs on (``SCREENS``): ``latent`` (above),
    ``correlation`` (a knock-down moves the genes co-expressed with its target; features:
    the target gene's loadings on 16 principal components of the control cells),
    ``pathway`` (a knock-down moves its target's gene module and sometimes one other; same
    features), ``small`` (the correlation mechanism, 40 perturbations, 3 cell types, at most
    32 training perturbations) and ``backbone`` (the correlation screen with the target
    genes' token embeddings of a ScForge pretrained on the source cells as features). Every
    screen reports the linear path alone (the default model at residual weight 0), the network
    trained without it (``network alone``) and the default model. ``--from-json`` over the
    files of several screens prints the suite table.
``--split fewshot``
    The earlier benchmark: in two cell types some perturbations are held out (cell-load's
    few-shot layout), the other cell types see every perturbation; one seed.

Metrics are cell-eval's, per (cell type, perturbation) and averaged per cell type and over
all groups; the normalised score is cell-eval's, against the perturbation mean.

Run under ``nice`` on a shared machine::

    nice -n 15 python benchmarks/perturbation.py --state-python /tmp/state-venv/bin/python
    nice -n 15 python benchmarks/perturbation.py --split fewshot
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import scvi
import torch

from scforge_scvi.data._datasets import pbmc68k_counts
from scforge_scvi.perturb._data import assign_perturbation_split
from scforge_scvi.perturb._metrics import (
    aggregate_metrics,
    control_mean_baseline,
    evaluate_perturbation_predictions,
    linear_baseline,
    log1p_anndata,
    normalized_score,
    perturbation_mean_baseline,
)
from scforge_scvi.perturb._model import ScForgePerturb
from semisynthetic import (
    backbone_gene_features,
    load_pbmc3k_counts,
    make_screen,
    make_semisynthetic_perturbation_data,
    perturbation_feature_table,
)

PERT, CONTROL, BATCH = "target_gene", "non-targeting", "gem_group"
#: metrics in the normalised score (those the task names; mse is reported beside them)
SCORED = ("mae", "pearson_delta", "discrimination_score_l1", "overlap_at_N")
SHOWN = ("mae", "mse", "pearson_delta", "discrimination_score_l1", "overlap_at_N")
MODEL = {
    "hidden_dim": 128,
    "num_layers": 2,
    "num_heads": 4,
    "encoder_hidden_dim": 512,
    "dropout": 0.1,
    "cell_set_len": 32,
}
TRAIN = {"lr": 1e-3, "weight_decay": 0.01, "warmup_steps": 50, "min_lr_ratio": 0.05}
SETS_PER_BATCH = 16
#: the screen suite (``--screen``): four generators and one feature kind a user brings
SCREENS = ("latent", "correlation", "pathway", "small", "backbone")
#: methods in the order of the tables
ORDER = (
    "control mean",
    "perturbation mean",
    "linear (Ahlmann-Eltze)",
    "linear path",
    "network alone",
    "ScForgePerturb",
    "State (arc-state)",
)


def source_cells(quick: bool) -> tuple[ad.AnnData, str, list[str]]:
    """Real cells to build the screen from, their cell-type column and the cell types kept."""
    if not quick:
        try:
            cell_types = ["CD4 T cells", "CD14+ Monocytes", "B cells", "CD8 T cells"]
            return load_pbmc3k_counts(), "louvain", cell_types
        except FileNotFoundError:
            logging.warning("pbmc3k not found in ../shared/data; running the quick benchmark.")
    cell_types = ["CD14+ Monocyte", "Dendritic", "CD19+ B", "CD4+/CD25 T Reg"]
    return pbmc68k_counts(), "bulk_labels", cell_types


def quiet() -> None:
    logging.basicConfig(level=logging.WARNING)
    for name in ("lightning", "lightning.pytorch", "scvi", "scforge_scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    # One intra-op thread: for a model this small, two threads on two shared cores spend
    # most of their time waiting on each other (an epoch took 18x longer under load).
    torch.set_num_threads(1)


# ----------------------------------------------------------------------- unseen split
def build_unseen(
    quick: bool, seed: int, screen: str = "latent"
) -> tuple[ad.AnnData, str, list[str], list[str], pd.DataFrame]:
    """A screen of the suite, its split (whole perturbations held out) and its features.

    ``latent`` is the screen of ``make_semisynthetic_perturbation_data(n_features=10)``; the
    other kinds come from ``make_screen``; ``backbone`` is the ``correlation`` screen with
    features from a pretrained ScForge's gene token embeddings instead.
    """
    source, cell_type_key, cell_types = source_cells(quick)
    if screen == "latent":
        if cell_type_key == "bulk_labels":
            sizes = {"n_genes": 300, "n_perturbations": 48, "n_cells_per_perturbation": 20}
            sizes["n_controls_per_cell_type"] = 120
        else:
            sizes = {"n_genes": 500, "n_perturbations": 96, "n_cells_per_perturbation": 25}
            sizes["n_controls_per_cell_type"] = 200
        adata = make_semisynthetic_perturbation_data(
            source,
            cell_type_key,
            cell_types=cell_types,
            n_features=10,
            feature_noise=0.3,
            perturbation_key=PERT,
            control_label=CONTROL,
            seed=seed,
            **sizes,
        )
    else:
        kind = "correlation" if screen == "backbone" else screen
        types = cell_types[:3] if kind == "small" else cell_types
        adata = make_screen(
            kind,
            source,
            cell_type_key,
            cell_types=types,
            seed=seed,
            perturbation_key=PERT,
            control_label=CONTROL,
        )
    if screen == "backbone":
        features = backbone_gene_features(adata, source, seed=seed)
    else:
        features = perturbation_feature_table(adata)
    perts = list(
        np.random.default_rng(seed).permutation(adata.uns["perturbation_truth"]["perturbations"])
    )
    n_test, n_val = len(perts) // 4, len(perts) // 12
    test, val = perts[:n_test], perts[n_test : n_test + n_val]
    # held out in every cell type (fewshot_cell_types defaults to all of them)
    assign_perturbation_split(
        adata, PERT, CONTROL, cell_type_key, test_perturbations=test, val_perturbations=val
    )
    return adata, cell_type_key, test, val, features


def select_linear(
    train: ad.AnnData, val: ad.AnnData, features: pd.DataFrame, kw: dict
) -> dict[str, float]:
    """Ridge and width of the linear baseline with the lowest pseudobulk MSE on validation."""
    best = None
    for ridge in (0.1, 1.0, 10.0, 100.0):
        for n_components in (5, 10, 20, 40):
            pred = linear_baseline(
                train,
                val,
                perturbation_features=features,
                ridge=ridge,
                n_components=n_components,
                **kw,
            )
            metrics = evaluate_perturbation_predictions(val, pred, metrics=["mse"], **kw)
            mse = float(metrics["mse"].mean())
            if best is None or mse < best[0]:
                best = (mse, {"ridge": ridge, "n_components": n_components})
    return best[1]


def export_for_state(
    adata: ad.AnnData,
    cell_type_key: str,
    test: list[str],
    val: list[str],
    features: pd.DataFrame,
    out: Path,
) -> None:
    """The training cells (log1p), the feature table and the split, for state_runner.py."""
    (out / "screen").mkdir(parents=True, exist_ok=True)
    split = adata.obs["split"].astype(str).to_numpy()
    cells = log1p_anndata(adata[split != "test"].copy())
    obs = cells.obs[[PERT, cell_type_key]].copy()
    obs[PERT] = obs[PERT].cat.remove_unused_categories()
    obs[BATCH] = pd.Categorical(["batch0"] * cells.n_obs)
    var = pd.DataFrame(index=cells.var_names.astype(str))
    var["gene_name"] = pd.Categorical(var.index)  # cell-load reads the gene names here
    ad.AnnData(X=sp.csr_matrix(cells.X, dtype=np.float32), obs=obs, var=var).write_h5ad(
        out / "screen" / "train.h5ad"
    )
    features.to_csv(out / "features.csv")
    split_info = {
        "perturbation_key": PERT,
        "control_label": CONTROL,
        "cell_type_key": cell_type_key,
        "batch_key": BATCH,
        "val": list(val),
        "test": list(test),
        "cell_types": list(adata.obs[cell_type_key].cat.categories),
    }
    (out / "split.json").write_text(json.dumps(split_info, indent=2))


def run_state(args: argparse.Namespace, data: Path, seed: int, steps: int, val_freq: int) -> dict:
    """Train and predict with State in its own environment; returns its info (or the error)."""
    out = data / "state"
    # no ``nice`` here: State inherits this process's priority, as the other methods run
    # at it (a nested ``nice`` starved State on a shared machine and inflated its time)
    command = [
        args.state_python,
        str(Path(__file__).with_name("state_runner.py")),
        "--data",
        str(data),
        "--out",
        str(out),
        "--seed",
        str(seed),
        "--max-steps",
        str(steps),
        "--val-freq",
        str(val_freq),
        "--sets-per-batch",
        str(SETS_PER_BATCH),
        "--lr",
        str(TRAIN["lr"]),
        "--cell-set-len",
        str(MODEL["cell_set_len"]),
        "--hidden-dim",
        str(MODEL["hidden_dim"]),
        "--layers",
        str(MODEL["num_layers"]),
        "--heads",
        str(MODEL["num_heads"]),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    (data / "state_runner.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        return {"error": (done.stdout + done.stderr).strip().splitlines()[-20:]}
    return json.loads((out / "state_info.json").read_text())


def run_unseen_seed(args: argparse.Namespace, seed: int) -> tuple[pd.DataFrame, dict]:
    """Every method on one seed's screen: per-group metrics and run facts."""
    scvi.settings.seed = seed
    t0 = time.perf_counter()
    adata, cell_type_key, test, val, features = build_unseen(args.quick, seed, args.screen)
    split = adata.obs["split"].astype(str).to_numpy()
    is_control = (adata.obs[PERT] == CONTROL).to_numpy()
    logn = log1p_anndata(adata)
    train = logn[split == "train"]
    real = logn[(split == "test") | is_control].copy()
    real_val = logn[(split == "val") | is_control].copy()
    kw = {"perturbation_key": PERT, "control_label": CONTROL, "cell_type_key": cell_type_key}
    facts: dict = {
        "screen": args.screen,
        "seed": seed,
        "cells": adata.n_obs,
        "genes": adata.n_vars,
        "perturbations": len(features),
        "test": len(test),
        "val": len(val),
        "data_s": time.perf_counter() - t0,
    }

    predictions, seconds = {}, {}
    start = time.perf_counter()
    predictions["control mean"] = control_mean_baseline(real, **kw)
    seconds["control mean"] = time.perf_counter() - start
    start = time.perf_counter()
    predictions["perturbation mean"] = perturbation_mean_baseline(train, real, **kw)
    seconds["perturbation mean"] = time.perf_counter() - start
    start = time.perf_counter()
    chosen = select_linear(train, real_val, features, kw)
    predictions["linear (Ahlmann-Eltze)"] = linear_baseline(
        train, real, perturbation_features=features, **chosen, **kw
    )
    seconds["linear (Ahlmann-Eltze)"] = time.perf_counter() - start
    facts["linear"] = chosen

    # the models never see a test perturbation's cells, only its row of the feature table
    fit = adata[split != "test"].copy()
    fit.obs[PERT] = fit.obs[PERT].cat.remove_unused_categories()
    ScForgePerturb.setup_anndata(fit, PERT, CONTROL, cell_type_key=cell_type_key)
    epochs = args.epochs or (30 if args.quick else 50)
    # every control cell of each cell type is perturbed once (n_cells="controls")
    to_predict = adata[(split == "test") | is_control].copy()
    arms = {} if args.no_network_alone else {"network alone": False}
    arms["ScForgePerturb"] = True  # the default, last: its linear path is scored below
    for name, linear_path in arms.items():
        model = ScForgePerturb(
            fit, perturbation_features=features, linear_path=linear_path, **MODEL
        )
        model.train(
            max_epochs=epochs,
            sets_per_batch=SETS_PER_BATCH,
            split_key="split",
            seed=seed,
            enable_model_summary=False,
            logger=None,
            **TRAIN,
        )
        seconds[name] = model.training_time_s_
        predictions[name] = model.predict(to_predict, n_cells="controls", seed=seed)
    # the default model's own linear path, alone (residual weight 0)
    predictions["linear path"] = model.predict(
        to_predict, n_cells="controls", residual_weight=0.0, seed=seed
    )
    seconds["linear path"] = 0.0
    steps = epochs * _steps_per_epoch(model, fit)  # State gets as many optimizer steps
    facts.update(
        epochs=epochs, best_epoch=model.best_epoch_, steps=steps, linear_path=model.linear_path_
    )

    if args.state_python:
        data = Path(args.workdir) / f"seed{seed}"
        export_for_state(adata, cell_type_key, test, val, features, data)
        # State's validation loss falls more slowly (energy distance alone): it gets
        # --state-steps-factor times ScForgePerturb's optimizer steps
        state_steps = round(args.state_steps_factor * steps)
        info = run_state(args, data, seed, state_steps, max(steps // epochs, 1))
        facts["state"] = info
        if "error" in info:
            logging.warning("State failed on seed %d:\n%s", seed, "\n".join(info["error"]))
        else:
            predictions["State (arc-state)"] = ad.read_h5ad(data / "state" / "pred.h5ad")
            seconds["State (arc-state)"] = info["train_s"]

    rows = []
    for name, pred in predictions.items():
        table = evaluate_perturbation_predictions(real, pred, **kw)
        table.insert(0, "method", name)
        rows.append(table)
    facts["seconds"] = seconds
    return pd.concat(rows, ignore_index=True), facts


def _steps_per_epoch(model: ScForgePerturb, fit: ad.AnnData) -> int:
    """Optimizer steps of one epoch (cell sets of the training split / sets per step)."""
    set_len = model.module.config.cell_set_len
    obs = fit.obs[fit.obs["split"].astype(str) == "train"]
    sizes = obs.groupby([PERT, model._setup["cell_type_key"]], observed=True).size()
    n_sets = int(sum(-(-int(n) // set_len) for n in sizes))
    return -(-n_sets // SETS_PER_BATCH)


def summarise(per_group: pd.DataFrame) -> pd.DataFrame:
    """Per seed, method and cell type (and ``all``): mean metrics and the normalised score."""
    out = []
    for (seed, method), frame in per_group.groupby(["seed", "method"], sort=False):
        for cell_type, part in [("all", frame), *frame.groupby("cell_type", sort=True)]:
            row = aggregate_metrics(part).to_dict()
            row.update(seed=seed, method=method, cell_type=cell_type)
            out.append(row)
    table = pd.DataFrame(out)
    base = table[table["method"] == "perturbation mean"].set_index(["seed", "cell_type"])
    table["score"] = [
        normalized_score(
            pd.Series({m: r[m] for m in SCORED}),
            base.loc[(r["seed"], r["cell_type"]), list(SCORED)],
        )["avg_score"]
        for _, r in table.iterrows()
    ]
    return table


def mean_sd(values: pd.Series, digits: int = 3) -> str:
    values = values.astype(float)
    if len(values) < 2:
        return f"{values.mean():.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def markdown(summary: pd.DataFrame, seconds: pd.DataFrame, methods: list[str]) -> str:
    columns = [*SHOWN, "score"]
    lines = []
    for cell_type in ["all", *sorted(set(summary["cell_type"]) - {"all"})]:
        part = summary[summary["cell_type"] == cell_type]
        head = (
            "| method | " + " | ".join(columns) + (" | train s |" if cell_type == "all" else " |")
        )
        lines += [f"\n**{cell_type if cell_type != 'all' else 'All cell types'}**\n", head]
        lines.append("|---|" + "---:|" * (len(columns) + (cell_type == "all")))
        for method in methods:
            rows = part[part["method"] == method]
            if rows.empty:
                continue
            cells = [mean_sd(rows[c]) for c in columns]
            if cell_type == "all":
                cells.append(mean_sd(seconds[method].dropna(), 1))
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main_unseen(args: argparse.Namespace) -> None:
    groups, facts = [], []
    for seed in args.seeds:
        start = time.perf_counter()
        per_group, info = run_unseen_seed(args, seed)
        per_group.insert(0, "seed", seed)
        groups.append(per_group)
        info["wall_s"] = time.perf_counter() - start
        facts.append(info)
        print(
            f"seed {seed}: {info['cells']} cells x {info['genes']} genes, {info['perturbations']} "
            f"perturbations ({info['test']} test, {info['val']} val held out whole), "
            f"best epoch {info['best_epoch']} of {info['epochs']} ({info['steps']} steps), "
            f"linear {info['linear']}, linear path {info['linear_path']}, "
            f"wall {info['wall_s']:.0f} s",
            flush=True,
        )
        summary = summarise(pd.concat(groups, ignore_index=True))
        summary.insert(0, "screen", args.screen)
        if args.json:  # after every seed, so that a stopped run keeps its finished seeds
            Path(args.json).write_text(
                json.dumps(
                    {"facts": facts, "summary": summary.to_dict(orient="records")},
                    indent=2,
                    default=str,
                )
            )
    report(summary, facts)


def report(summary: pd.DataFrame, facts: list[dict]) -> None:
    """The tables per cell type (mean +- sd over seeds) and the overall score per seed."""
    seconds = pd.DataFrame([f["seconds"] for f in facts])
    present = set(summary["method"])
    methods = [m for m in ORDER if m in present] + sorted(present - set(ORDER))
    print(markdown(summary, seconds, methods))
    overall = summary[summary["cell_type"] == "all"].pivot(
        index="seed", columns="method", values="score"
    )
    print("\nNormalised score vs the perturbation mean, per seed:")
    print(overall[methods].round(3).to_string())


def main_from_json(paths: list[str]) -> None:
    """Merge the ``--json`` files of separate runs (one seed or one screen each) into one
    report per screen, and the suite table when there are several screens."""
    summaries, facts = [], []
    for path in paths:
        data = json.loads(Path(path).read_text())
        summaries.append(pd.DataFrame(data["summary"]))
        facts += data["facts"]
    summary = pd.concat(summaries, ignore_index=True)
    if "screen" not in summary:
        summary["screen"] = "latent"
    if summary.duplicated(["screen", "seed", "method", "cell_type"]).any():
        raise SystemExit("The --from-json files share a screen and seed.")
    for screen, part in summary.groupby("screen", sort=False):
        print(f"\n## Screen: {screen}")
        report(part, [f for f in facts if f.get("screen", "latent") == screen])
    if summary["screen"].nunique() > 1:
        print(suite_table(summary))


def suite_table(summary: pd.DataFrame) -> str:
    """Normalised score (all cell types) per screen and method, mean +- sd over seeds."""
    overall = summary[summary["cell_type"] == "all"]
    methods = [m for m in ORDER if m in set(overall["method"])]
    lines = [
        "\n| screen | seeds | " + " | ".join(methods) + " |",
        "|---|---:|" + "---:|" * len(methods),
    ]
    means = {m: [] for m in methods}
    for screen, part in overall.groupby("screen", sort=False):
        cells = []
        for m in methods:
            values = part.loc[part["method"] == m, "score"]
            cells.append(mean_sd(values) if len(values) else "")
            means[m].append(values.mean())
        lines.append(f"| {screen} | {part['seed'].nunique()} | " + " | ".join(cells) + " |")
    lines.append(
        "| **mean of screens** | | "
        + " | ".join(f"{np.nanmean(means[m]):.3f}" for m in methods)
        + " |"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------- few-shot split
def build_fewshot(quick: bool, seed: int):
    """The screen, its few-shot split and the cell-type column name."""
    source, cell_type_key, cell_types = source_cells(quick)
    if cell_type_key == "bulk_labels":
        fewshot = ["CD14+ Monocyte", "CD19+ B"]
        sizes = {"n_genes": 300, "n_perturbations": 20, "n_cells_per_perturbation": 40}
        sizes["n_controls_per_cell_type"] = 200
    else:
        fewshot = ["CD14+ Monocytes", "B cells"]
        sizes = {"n_genes": 1000, "n_perturbations": 40, "n_cells_per_perturbation": 50}
        sizes["n_controls_per_cell_type"] = 300
    adata = make_semisynthetic_perturbation_data(
        source,
        cell_type_key,
        cell_types=cell_types,
        perturbation_key=PERT,
        control_label=CONTROL,
        seed=seed,
        **sizes,
    )
    perts = np.random.default_rng(seed).permutation(
        adata.uns["perturbation_truth"]["perturbations"]
    )
    n_test = len(perts) // 4
    assign_perturbation_split(
        adata,
        PERT,
        CONTROL,
        cell_type_key,
        test_perturbations=perts[:n_test],
        val_perturbations=perts[n_test : n_test + max(2, len(perts) // 10)],
        fewshot_cell_types=fewshot,
    )
    return adata, cell_type_key, fewshot


def main_fewshot(args: argparse.Namespace) -> None:
    seed = args.seeds[0]
    scvi.settings.seed = seed
    t0 = time.perf_counter()
    adata, cell_type_key, fewshot = build_fewshot(args.quick, seed)
    data_s = time.perf_counter() - t0
    split = adata.obs["split"].astype(str)
    logn = log1p_anndata(adata)
    train = logn[split.to_numpy() == "train"]
    held_out = (split == "test") | (
        adata.obs[cell_type_key].isin(fewshot) & (adata.obs[PERT] == CONTROL)
    )
    real = logn[held_out.to_numpy()].copy()
    kw = {"perturbation_key": PERT, "control_label": CONTROL, "cell_type_key": cell_type_key}

    predictions, seconds = {}, {}
    for name, baseline in (
        ("control mean", lambda: control_mean_baseline(real, **kw)),
        ("perturbation mean", lambda: perturbation_mean_baseline(train, real, **kw)),
        ("linear (Ahlmann-Eltze)", lambda: linear_baseline(train, real, **kw)),
    ):
        start = time.perf_counter()
        predictions[name] = baseline()
        seconds[name] = time.perf_counter() - start

    ScForgePerturb.setup_anndata(adata, PERT, CONTROL, cell_type_key=cell_type_key)
    model = ScForgePerturb(adata, **MODEL)
    epochs = args.epochs or (20 if args.quick else 40)
    model.train(
        max_epochs=epochs, sets_per_batch=SETS_PER_BATCH, split_key="split", seed=seed, **TRAIN
    )
    seconds["ScForgePerturb"] = model.training_time_s_
    # every control cell of the cell type is perturbed once (n_cells="controls"): the
    # model's pseudobulk then carries little sampling noise, like the baselines' means
    pred = model.predict(adata[held_out.to_numpy()].copy(), n_cells="controls", seed=seed)
    predictions["ScForgePerturb"] = pred

    rows = {}
    for name, p in predictions.items():
        rows[name] = aggregate_metrics(evaluate_perturbation_predictions(real, p, **kw))
    table = pd.DataFrame(rows).T
    for base in ("perturbation mean", "control mean"):
        table[f"score vs {base}"] = [
            normalized_score(rows[name], rows[base])["avg_score"] for name in table.index
        ]
    table["train s"] = pd.Series(seconds)
    n_test = real.obs.loc[real.obs[PERT] != CONTROL, PERT].nunique()
    print(
        f"\nSemi-synthetic screen: {adata.n_obs} cells x {adata.n_vars} genes, "
        f"{adata.obs[PERT].nunique() - 1} perturbations, {adata.obs[cell_type_key].nunique()} "
        f"cell types (built in {data_s:.1f} s). Held out (few-shot): {n_test} perturbations in "
        f"{len(fewshot)} cell types; best epoch {model.best_epoch_} of {epochs}.\n"
    )
    with pd.option_context(
        "display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4f}".format
    ):
        print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", choices=("unseen", "fewshot"), default="unseen")
    parser.add_argument(
        "--screen",
        choices=SCREENS,
        default="latent",
        help="which screen of the suite (unseen split)",
    )
    parser.add_argument(
        "--no-network-alone",
        action="store_true",
        help="skip the network trained without the linear path",
    )
    parser.add_argument("--quick", action="store_true", help="small run on pbmc68k_reduced")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument(
        "--state-python",
        default=None,
        help="python of a virtual environment with arc-state: also run State (unseen split)",
    )
    parser.add_argument(
        "--state-steps-factor",
        type=float,
        default=2.0,
        help="State's optimizer steps as a multiple of ScForgePerturb's",
    )
    parser.add_argument("--workdir", default="/tmp/scforge_perturbation_benchmark")
    parser.add_argument("--json", default=None, help="write the facts and summary here")
    parser.add_argument(
        "--from-json",
        nargs="+",
        default=None,
        help="report on the --json files of earlier runs (e.g. one seed each) instead",
    )
    args = parser.parse_args()
    args.seeds = args.seeds or ([0, 1, 2] if args.split == "unseen" else [0])
    quiet()
    if args.from_json:
        main_from_json(args.from_json)
    elif args.split == "unseen":
        main_unseen(args)
    else:
        main_fewshot(args)


if __name__ == "__main__":
    main()
