"""Cell-type annotation benchmark: the default recipe against logistic regression.

For each seed: a seeded, label-stratified split of the cells (70% train, 10% validation, 20%
test, the model's own split); masked-gene pretraining on the training + validation cells
only (labels unused; vocabulary of HVGs chosen on those cells); fine-tuning of each arm
(pretrained or random init x strategy) with the weights of the highest validation accuracy
kept (the library default);
test macro-F1 of every arm beside a logistic regression on log-normalised HVGs fitted on
the same training + validation cells (``ScForge.evaluate``). The script checks that every
arm is scored on the same test cells and prints the wall time of each phase.

Data: ``pbmc3k`` (``../shared/data/pbmc3k_raw_labeled.h5ad``, ``obs["louvain"]``) or
``pbmc68k`` (scanpy's ``pbmc68k_reduced`` counts, ``obs["bulk_labels"]``); ``--labels-key``
picks another column of ``obs``.

``--shape`` derives a shape of the data that stresses what the defaults assume (the
generalisation suite of ``docs/benchmarks_annotation.md``; each is drawn once, with a fixed
seed, so every seed of a run sees the same cells and genes):

``genes500``, ``genes1000``
    A random 500 or 1,000 of the genes detected in at least 1% of the cells (a targeted
    panel: no choice of HVGs left to the model).
``cells9k``
    Every cell three times and a random half of them a fourth time, each copy's counts
    redrawn from a Poisson of the original counts (pbmc3k: 9,233 cells). Copies of one
    source cell can fall on both sides of the split, so this shape measures time and the
    scaling rules, not generalisation to new donors.
``rare``
    The second-largest class subsampled to 1% of the cells.
``thin30``
    Every count binomially thinned to 30% of its depth.

``--label-fraction F`` is the few-label setting: pretraining on every training and
validation cell without labels, fine-tuning through the public API on the same cells with
only a stratified fraction ``F`` of them labelled (at least one cell a class; the rest
registered as the unlabelled category), and the logistic regression fitted on the same
labelled cells; both are scored on the same test cells as in the full-label setting.

Every fine-tuned arm reports three rows side by side: the default prediction, the
transformer's head alone (``backbone``) and the linear path alone (``linear``), each as a
ratio to the logistic regression, with the F1 of the rarest test class.

Run ``python benchmarks/annotation.py --dataset pbmc3k --seeds 0 1 2``; ``--json`` writes
every result; the defaults of the options are those of ``ScForge`` and ``ScForge.train``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from scforge_scvi.data._splits import split_cells
from scforge_scvi.model import ScForge, classification_scores, logreg_on_cells, probe_split
from scforge_scvi.model._settings import grouped
from scforge_scvi.train._lora import count_parameters
from scforge_scvi.train._schedules import default_max_epochs

REPO = Path(__file__).resolve().parents[1]
PBMC3K = REPO / ".." / "shared" / "data" / "pbmc3k_raw_labeled.h5ad"
TRAIN_SIZE, VALIDATION_SIZE = 0.7, 0.1
ARMS = (
    "pretrained:full",
    "random:full",
    "pretrained:frozen",
    "pretrained:gradual_unfreeze",
    "pretrained:lora",
)
SHAPES = ("none", "genes500", "genes1000", "cells9k", "rare", "thin30")
#: the unlabelled category of the few-label setting
UNLABELLED = "Unknown"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=("pbmc3k", "pbmc68k"), default="pbmc3k")
    p.add_argument(
        "--labels-key",
        default=None,
        help="obs column to annotate (default: louvain for pbmc3k, bulk_labels for pbmc68k)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument(
        "--n-cells",
        type=int,
        default=None,
        help="first keep this many cells of the dataset (label-stratified, drawn with the "
        "seed), to see how the recipe scales with the number of cells",
    )
    p.add_argument("--shape", choices=SHAPES, default="none", help="a derived shape of the data")
    p.add_argument(
        "--label-fraction",
        type=float,
        nargs="+",
        default=None,
        help="few-label setting: fine-tune with this stratified fraction of the training and "
        "validation cells labelled (the rest unlabelled); several fractions share one "
        "pretraining per seed",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--arms", nargs="+", default=list(ARMS))
    p.add_argument("--tokenizer", default="binned_expression")
    p.add_argument("--n-top-genes", type=int, default=2000)
    p.add_argument("--n-bins", type=int, default=51, help="value bins of binned_expression")
    p.add_argument("--max-genes", type=int, default=512)
    p.add_argument("--hidden-dim", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--pooling", default="mean")
    p.add_argument(
        "--scaled-gene-embedding",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a second gene embedding scaled by the expression level (default: ScForge's)",
    )
    p.add_argument(
        "--gene-embedding-init",
        choices=("random", "pca"),
        default=None,
        help="starting point of the gene embeddings (default: ScForge's)",
    )
    p.add_argument("--pretrain-epochs", type=int, default=None, help="default: ScForge.train's")
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    p.add_argument("--epochs", type=int, default=None, help="default: ScForge.train's")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--backbone-lr", type=float, default=None, help="default: --lr")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: ScForge.train's")
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--class-weights", default="balanced")
    p.add_argument("--token-dropout", type=float, default=0.0)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--cell-expression-weight", type=float, default=0.0)
    p.add_argument(
        "--head-hidden-dim", type=int, default=256, help="0: a linear classification head"
    )
    p.add_argument("--dropout", type=float, default=0.1, help="backbone and head dropout")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--monitor", default=None, help="selection metric (default: ScForge.train's)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--validation-size",
        type=float,
        default=VALIDATION_SIZE,
        help="share of the cells that chooses the kept epoch, taken from the training share "
        "(the test cells stay the same)",
    )
    p.add_argument(
        "--pretrain-extra",
        choices=("pbmc3k",),
        default=None,
        help="also pretrain on every cell of this dataset (restricted to the genes of --dataset)",
    )
    p.add_argument(
        "--members",
        type=int,
        default=1,
        help="also score an ensemble of this many models per split (each pretrained with its "
        "own seed, fine-tuned on the same cells; class probabilities averaged)",
    )
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--history", action="store_true", help="print validation metrics by epoch")
    p.add_argument(
        "--trace",
        action="store_true",
        help="also score the test cells after every epoch (analysis of selection rules only)",
    )
    return p.parse_args(argv)


class TestTrace:
    """Test macro-F1 after every validation, for analysing selection rules (``--trace``).

    Only printed and stored: model selection never sees it.
    """

    def __init__(self, model, test: np.ndarray, key: str) -> None:
        from lightning.pytorch import Callback

        cells = model.adata[test].copy()
        truth = cells.obs[key].astype(str).to_numpy()
        trace = self

        class _Hook(Callback):
            def on_validation_epoch_end(self, trainer, pl_module) -> None:
                if trainer.sanity_checking:
                    return
                was_training = pl_module.training
                probs = model.predict(cells, return_probabilities=True).to_numpy()
                pred = np.asarray(model.class_names_)[probs.argmax(1)]
                scores = classification_scores(truth, pred, list(model.class_names_))
                trace.macro_f1.append(scores["macro_f1"])
                pl_module.train(was_training)

        self.macro_f1: list[float] = []
        self.callback = _Hook()


def load(dataset: str):
    import anndata as ad
    import scipy.sparse as sp

    if dataset == "pbmc68k":
        from scforge_scvi.data import pbmc68k_counts

        adata = pbmc68k_counts()
        adata.X = sp.csr_matrix(adata.layers.pop("counts"))
        return adata, "bulk_labels"
    if not PBMC3K.exists():
        sys.exit(f"{PBMC3K.name} not found in {PBMC3K.parent}.")
    adata = ad.read_h5ad(PBMC3K)
    adata.var_names_make_unique()
    adata.X = sp.csr_matrix(adata.X)
    return adata, "louvain"


def reshape(adata, key: str, shape: str):
    """The derived shape ``shape`` of the data (see the module documentation)."""
    import anndata as ad

    if shape == "none":
        return adata
    rng = np.random.default_rng(12345)
    x = adata.X.tocsr()
    if shape.startswith("genes"):
        detected = np.flatnonzero(np.asarray((x > 0).sum(0)).ravel() >= 0.01 * adata.n_obs)
        keep = rng.choice(detected, int(shape[len("genes") :]), replace=False)
        return adata[:, np.sort(keep)].copy()
    if shape == "thin30":
        x = x.copy()
        x.data = rng.binomial(x.data.astype(np.int64), 0.3).astype(np.float32)
        x.eliminate_zeros()
        adata = adata.copy()
        adata.X = x
        return adata
    if shape == "cells9k":
        half = rng.choice(adata.n_obs, adata.n_obs // 2, replace=False)
        source = np.concatenate([np.repeat(np.arange(adata.n_obs), 3), half])
        x = x[source].copy()
        x.data = rng.poisson(x.data).astype(np.float32)
        x.eliminate_zeros()
        obs = adata.obs.iloc[source].reset_index(drop=True)
        obs.index = [f"cell{i}" for i in range(len(obs))]
        return ad.AnnData(X=x, obs=obs, var=adata.var)
    # rare: the second-largest class down to 1% of the cells
    labels = adata.obs[key].astype(str).to_numpy()
    names, counts = np.unique(labels, return_counts=True)
    members = np.flatnonzero(labels == names[np.argsort(counts)[-2]])
    kept = max(3, int(0.01 * (adata.n_obs - len(members)) / 0.99))
    dropped = rng.choice(members, len(members) - kept, replace=False)
    return adata[np.setdiff1d(np.arange(adata.n_obs), dropped)].copy()


def few_labels(cells, key: str, rest: np.ndarray, fraction: float, seed: int):
    """The training and validation cells with a stratified ``fraction`` of them labelled (at
    least one a class, drawn with ``seed``), the others set to the unlabelled category;
    and the indices (into ``cells``) of the labelled ones."""
    import pandas as pd

    truth = cells.obs[key].astype(str).to_numpy()
    rng = np.random.default_rng(seed)
    labelled = np.sort(
        np.concatenate(
            [
                rng.choice(group, max(1, round(fraction * len(group))), replace=False)
                for group in (rest[truth[rest] == c] for c in np.unique(truth[rest]))
            ]
        )
    )
    few = cells[rest].copy()
    column = np.where(np.isin(rest, labelled), truth[rest], UNLABELLED)
    few.obs[key] = pd.Categorical(column)
    ScForge.setup_anndata(few, labels_key=key, unlabeled_category=UNLABELLED)
    return few, labelled


def probe_macro_f1(model, labels: np.ndarray, fit_on: np.ndarray, test: np.ndarray) -> float:
    """Test macro-F1 of a logistic regression on the model's cell embeddings."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    z = model.get_latent_representation()
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=0))
    probe.fit(z[fit_on], labels[fit_on])
    return classification_scores(labels[test], probe.predict(z[test]))["macro_f1"]


def fine_tune(
    pretrained, torch_seed, args, arch, fit, traced=None, *, labelled, arm, seed, n_train
):
    """One arm fine-tuned from a pretrained directory: ``(model, test trace or None)``.

    ``torch_seed`` draws the new head (and a random init); ``seed`` the split, the data order
    and the dropout. ``traced``: ``(test cells, label key)`` to score after every epoch.
    """
    init, strategy = arm.split(":")
    torch.manual_seed(torch_seed)
    model = ScForge.from_pretrained(str(pretrained), labelled)
    if init == "random":
        # nothing learned from cells, and no statistic of the test cells: random embeddings
        model = ScForge(
            labelled, vocab=model.vocab, **grouped({**arch, "gene_embedding_init": "random"})
        )
    epochs = args.epochs or default_max_epochs("classify", n_train, args.batch_size)
    trace = TestTrace(model, *traced) if traced else None
    model.train(
        max_epochs=args.epochs,
        strategy=strategy,
        seed=seed,
        freeze_backbone_epochs=max(1, epochs // 3) if strategy == "gradual_unfreeze" else 0,
        callbacks=[trace.callback] if trace else [],
        **fit,
    )
    return model, trace


def main(argv=None) -> None:
    args = parse_args(argv)
    for name in ("lightning", "lightning.pytorch", "scforge_scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    adata, key = load(args.dataset)
    if args.labels_key is not None:
        if args.labels_key not in adata.obs:
            sys.exit(
                f"--labels-key {args.labels_key!r} is not a column of {args.dataset}'s obs; "
                f"choose one of {list(adata.obs.columns)}."
            )
        key = args.labels_key
    if args.threads:
        torch.set_num_threads(args.threads)
    fractions = args.label_fraction or [None]
    if any(f is not None and not 0 < f < 1 for f in fractions):
        sys.exit(f"--label-fraction must be in (0, 1), got {args.label_fraction}.")
    adata = reshape(adata, key, args.shape)
    print(
        f"{args.dataset} (shape {args.shape}): {adata.n_obs} cells x {adata.n_vars} genes, "
        f"labels {key!r} "
        f"(load {time.perf_counter() - start:.1f} s)",
        flush=True,
    )
    arch = dict(
        tokenizer=args.tokenizer,
        n_top_genes=args.n_top_genes,
        n_bins=args.n_bins,
        max_genes=args.max_genes,
        hidden_dim=args.hidden_dim,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        pooling=args.pooling,
        dropout=args.dropout,
        head_dropout=args.dropout,
        cell_expression_weight=args.cell_expression_weight,
        head_hidden_dim=args.head_hidden_dim or None,
    )
    if args.scaled_gene_embedding is not None:
        arch["scaled_gene_embedding"] = args.scaled_gene_embedding
    if args.gene_embedding_init is not None:
        arch["gene_embedding_init"] = args.gene_embedding_init
    plan_kwargs = dict(
        lr=args.lr,
        backbone_lr=args.backbone_lr,
        warmup_steps=args.warmup_steps,
        min_lr_ratio=args.min_lr_ratio,
        token_dropout=args.token_dropout,
        weight_decay=args.weight_decay,
    )
    if args.label_smoothing:
        plan_kwargs["label_smoothing"] = args.label_smoothing
    fit = dict(
        class_weights=None if args.class_weights == "none" else args.class_weights,
        plan_kwargs=plan_kwargs,
        monitor=args.monitor,
        batch_size=args.batch_size,
        train_size=TRAIN_SIZE + VALIDATION_SIZE - args.validation_size,
        validation_size=args.validation_size,
        enable_progress_bar=False,
    )
    extra = None
    if args.pretrain_extra:
        extra, _ = load(args.pretrain_extra)
        extra = extra[:, extra.var_names.isin(adata.var_names)].copy()
        extra.obs = extra.obs[[]]
        print(
            f"pretraining also on {args.pretrain_extra}: {extra.n_obs} cells x {extra.n_vars} genes"
        )
    results = []
    if args.n_cells is not None and not 0 < args.n_cells < adata.n_obs:
        sys.exit(f"--n-cells must be between 1 and {adata.n_obs - 1}, got {args.n_cells}.")
    for seed in args.seeds:
        cells = adata
        if args.n_cells is not None:
            kept, _ = probe_split(adata.obs[key], args.n_cells / adata.n_obs, seed)
            cells = adata[kept].copy()
            print(f"seed {seed}: {cells.n_obs} of {adata.n_obs} cells kept", flush=True)
        labelled = cells.copy()
        ScForge.setup_anndata(labelled, labels_key=key)
        # the model's own split (the same function ScForge.train calls, stratified by label)
        train, val, test = split_cells(
            labelled.n_obs,
            fit["train_size"],
            fit["validation_size"],
            seed,
            labelled.obs[key].astype(str),
        )
        rest = np.union1d(train, val)
        with tempfile.TemporaryDirectory() as tmp:
            pre = cells[rest].copy()
            pre.obs = pre.obs[[]]
            if extra is not None:
                import anndata as ad

                pre = ad.concat([pre, extra], join="outer", index_unique="-")
            ScForge.setup_anndata(pre)
            member_seeds = [seed + 1000 * m for m in range(args.members)]
            for member, member_seed in enumerate(member_seeds):
                t0 = time.perf_counter()
                torch.manual_seed(member_seed)  # the initial weights: a seed names one whole run
                model = ScForge(pre, **grouped(arch))
                model.train(
                    max_epochs=args.pretrain_epochs,
                    objective="pretrain",
                    batch_size=args.batch_size,
                    train_size=0.9,
                    validation_size=0.1,
                    seed=member_seed,
                    enable_progress_bar=False,
                    plan_kwargs={
                        "lr": args.pretrain_lr,
                        "warmup_steps": args.warmup_steps,
                        "min_lr_ratio": args.min_lr_ratio,
                    },
                )
                model.save_pretrained(str(Path(tmp) / f"pre{member}"))
                t_member = time.perf_counter() - t0
                if member == 0:
                    t_pre = t_member
                print(
                    f"seed {seed}: pretraining {len(model.history['train_loss_epoch'])} epochs "
                    f"on {pre.n_obs} cells (member seed {member_seed}): {t_member:.0f} s",
                    flush=True,
                )
            for arm, fraction in ((a, f) for a in args.arms for f in fractions):
                init, strategy = arm.split(":")
                t0 = time.perf_counter()
                truth = labelled.obs[key].astype(str).to_numpy()
                if fraction is None:
                    target, fit_arm, fitted_on = labelled, fit, rest
                else:
                    target, fitted_on = few_labels(cells, key, rest, fraction, seed)
                    fit_arm = fit | {"train_size": 0.8, "validation_size": 0.2}
                run = dict(labelled=target, arm=arm, seed=seed, n_train=len(train))
                traced = (test, key) if args.trace else None
                model, trace = fine_tune(
                    Path(tmp) / "pre0", seed, args, arch, fit_arm, traced, **run
                )
                t_fit = time.perf_counter() - t0
                t0 = time.perf_counter()
                if fraction is None:
                    if not np.array_equal(model.test_indices_, test):
                        sys.exit("The model's test cells differ from the benchmark's split.")
                    scores = model.evaluate()
                    base = scores["baseline_logreg"]
                    probe = probe_macro_f1(model, truth, rest, test)
                else:  # the same test cells, and the baseline on the same labelled cells
                    scores = model.evaluate(cells[test].copy(), baseline=False)
                    base = logreg_on_cells(
                        labelled.X,
                        truth,
                        fitted_on,
                        test,
                        target_sum=model.preprocessing.target_sum,
                        class_names=model.class_names_,
                    )
                    scores["relative_macro_f1"] = scores["macro_f1"] / base["macro_f1"]
                    probe = float("nan")
                t_eval = time.perf_counter() - t0
                rarest = min(scores["support"], key=lambda c: scores["support"][c] or np.inf)
                row = {
                    "dataset": args.dataset,
                    "labels_key": key,
                    "shape": args.shape,
                    "label_fraction": fraction,
                    "n_labelled": len(fitted_on),
                    "seed": seed,
                    "init": init,
                    "strategy": strategy,
                    "trainable": count_parameters(model.module)[0],
                    "best_epoch": int(model.best_epoch_ or -1),
                    "pretrain_s": t_pre,
                    "finetune_s": t_fit,
                    "evaluate_s": t_eval,
                    "recipe_s": t_pre + t_fit,
                    "macro_f1": scores["macro_f1"],
                    "accuracy": scores["accuracy"],
                    "backbone_macro_f1": scores.get("backbone_macro_f1", scores["macro_f1"]),
                    "linear_macro_f1": scores.get("linear_macro_f1", float("nan")),
                    "linear_path_share": scores["linear_path_share"],
                    "logreg_macro_f1": base["macro_f1"],
                    "logreg_accuracy": base["accuracy"],
                    "ratio": scores["relative_macro_f1"],
                    "rarest_class": rarest,
                    "rarest_f1": scores["per_class_f1"][rarest],
                    "logreg_rarest_f1": base["per_class_f1"][rarest],
                    "embedding_probe_macro_f1": probe,
                    "per_class_f1": scores["per_class_f1"],
                    "support": scores["support"],
                    "logreg_per_class_f1": base["per_class_f1"],
                }
                if args.members > 1:
                    t0 = time.perf_counter()
                    probs = [model.predict(labelled, return_probabilities=True).to_numpy()[test]]
                    for member in range(1, args.members):
                        member_model, _ = fine_tune(
                            Path(tmp) / f"pre{member}", member_seeds[member], args, arch, fit, **run
                        )
                        probs.append(
                            member_model.predict(labelled, return_probabilities=True).to_numpy()[
                                test
                            ]
                        )
                    names = np.asarray(model.class_names_)
                    single = classification_scores(truth[test], names[probs[0].argmax(1)])
                    together = classification_scores(
                        truth[test], names[np.mean(probs, axis=0).argmax(1)]
                    )
                    if not np.isclose(single["macro_f1"], row["macro_f1"]):
                        sys.exit("The ensemble's scoring differs from ScForge.evaluate's.")
                    row["ensemble_macro_f1"] = together["macro_f1"]
                    row["ensemble_ratio"] = together["macro_f1"] / row["logreg_macro_f1"]
                    row["ensemble_extra_s"] = time.perf_counter() - t0
                    print(
                        f"    ensemble of {args.members}: macro-F1 {together['macro_f1']:.3f} "
                        f"(ratio {row['ensemble_ratio']:.3f}), {row['ensemble_extra_s']:.0f} s "
                        "more fine-tuning",
                        flush=True,
                    )
                results.append(row)
                lr = row["logreg_macro_f1"]
                print(
                    f"  {init:10s} {strategy:16s} macro-F1 {row['macro_f1']:.3f} "
                    f"(logreg {lr:.3f}, ratio {row['ratio']:.3f}; backbone alone "
                    f"{row['backbone_macro_f1'] / lr:.3f}, linear path alone "
                    f"{row['linear_macro_f1'] / lr:.3f}, share {row['linear_path_share']:.2f}) "
                    f"acc {row['accuracy']:.3f}, probe of its embedding {probe:.3f}  "
                    f"fine-tune {t_fit:.0f} s, evaluate {t_eval:.0f} s, "
                    f"best epoch {row['best_epoch']}",
                    flush=True,
                )
                if args.history:
                    history = {k: v.iloc[:, 0].to_numpy() for k, v in model.history.items()}
                    if trace:
                        history["test_macro_f1 (analysis only)"] = trace.macro_f1
                        row["test_macro_f1_by_epoch"] = trace.macro_f1
                    for name, values in history.items():
                        if name.startswith(("val_", "test_")):
                            values = " ".join(f"{x:.3f}" for x in values)
                            print(f"    {name} by epoch: {values}", flush=True)
                small = sorted(row["support"], key=row["support"].get)[:2]
                print(
                    "    smallest classes: "
                    + ", ".join(
                        f"{c} (n={row['support'][c]}) F1 {row['per_class_f1'][c]:.2f} vs "
                        f"{row['logreg_per_class_f1'][c]:.2f}"
                        for c in small
                    ),
                    flush=True,
                )
    print("\nmean +- sd over seeds:")
    for arm, fraction in ((a, f) for a in args.arms for f in fractions):
        init, strategy = arm.split(":")
        rows = [
            r
            for r in results
            if (r["init"], r["strategy"], r["label_fraction"]) == (init, strategy, fraction)
        ]
        f1 = np.array([r["macro_f1"] for r in rows])
        wall = np.array([r["recipe_s"] for r in rows])
        lr = np.array([r["logreg_macro_f1"] for r in rows])
        ratios = {
            name: np.array([r[column] for r in rows]) / lr
            for name, column in (
                ("default", "macro_f1"),
                ("backbone", "backbone_macro_f1"),
                ("linear", "linear_macro_f1"),
            )
        }
        rare = np.array([r["rarest_f1"] for r in rows])
        rare_lr = np.array([r["logreg_rarest_f1"] for r in rows])
        labels = f" {fraction:.0%} labels" if fraction is not None else ""
        print(
            f"  {arm + labels:28s} macro-F1 {f1.mean():.3f} +- {f1.std():.3f} (logreg "
            f"{lr.mean():.3f})  ratio "
            + ", ".join(f"{k} {v.mean():.3f} +- {v.std():.3f}" for k, v in ratios.items())
            + f"; rarest class F1 {rare.mean():.2f} (logreg {rare_lr.mean():.2f}); "
            f"pretrain+fine-tune {wall.mean():.0f} s"
        )
    print(f"total wall {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": vars(args) | {"json": str(args.json)}, "results": results}, indent=1
            )
        )


if __name__ == "__main__":
    main()
