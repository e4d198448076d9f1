"""Predictions a user can trust: calibration, prediction sets and unknown cell types.

Fine-tunes the default ``ScForge(adata).train()`` recipe (no pretraining) on a stratified
split (70% training, 10% validation, 20% test cells, seeded) and scores on the test cells:

* the expected calibration error (15 bins) of the default prediction before and after
  temperature scaling, beside its floor: the error that a perfectly calibrated prediction
  with the same confidences shows on as many cells (labels drawn from the calibrated
  probabilities, :func:`ece_floor`), and the error of every seed's test cells pooled;
* the empirical coverage and the mean size of the split-conformal prediction sets at
  coverages 0.8, 0.9 and 0.95;
* with ``--holdout``: each cell type in turn left out of the training data entirely; the
  AUROC of the unknown score (``obs["scforge_unknown_score"]``) for the left-out type's
  cells against the known types' test cells, beside the max-softmax baseline
  (``1 - confidence``); the share of left-out cells labelled ``"unknown"`` and the macro-F1
  of the known types' test cells with and without ``unknown_threshold`` (cells labelled
  ``"unknown"`` count as errors).

Run ``python benchmarks/trust.py --dataset pbmc3k --seeds 0 1 2 3 4 --threads 1``;
``--holdout`` adds the left-out-type rows (one seed); ``--json`` writes every row.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from annotation import load
from scforge_scvi.model import ScForge, classification_scores
from scforge_scvi.model._calibration import expected_calibration_error

COVERAGES = (0.8, 0.9, 0.95)
SPLIT = {"train_size": 0.7, "validation_size": 0.1}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("pbmc3k", "pbmc68k"), default="pbmc3k")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--holdout", action="store_true", help="leave each type out in turn")
    parser.add_argument("--unknown-threshold", type=float, default=0.99)
    parser.add_argument("--max-epochs", type=int, default=None, help="default: train()'s rule")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


def fine_tune(adata, key: str, seed: int, max_epochs: int | None) -> ScForge:
    ScForge.setup_anndata(adata, labels_key=key)
    torch.manual_seed(seed)
    model = ScForge(adata)
    model.train(max_epochs=max_epochs, seed=seed, enable_progress_bar=False, **SPLIT)
    return model


def ece_floor(probabilities: np.ndarray, draws: int = 200, seed: int = 0) -> float:
    """Mean calibration error of ``probabilities`` against labels drawn from themselves.

    Such labels make the probabilities calibrated by construction, so what remains is the
    error of measuring on ``len(probabilities)`` cells: a measured error near this floor is
    as calibrated as these cells can show.
    """
    rng = np.random.default_rng(seed)
    cumulative = probabilities.cumsum(1)
    errors = []
    for _ in range(draws):
        u = rng.random((len(probabilities), 1)) * cumulative[:, -1:]
        errors.append(expected_calibration_error(probabilities, (cumulative < u).sum(1)))
    return float(np.mean(errors))


def calibration_row(model, key: str) -> tuple[dict, np.ndarray, np.ndarray]:
    """Calibration error and prediction-set coverage on the model's test cells.

    Returns the row, and the probabilities before and after calibration and the true codes
    of the test cells.
    """
    test = model.adata[model.test_indices_].copy()
    names = list(model.class_names_)
    truth = test.obs[key].astype(str).to_numpy()
    codes = np.array([names.index(t) for t in truth])
    raw = model._probabilities(test)
    calibrated = model.module.calibration.calibrated(raw)
    row = {
        "n_test": len(truth),
        "n_validation": int(model.module.calibration.n_cells),
        "temperature": float(model.module.calibration.temperature),
        "ece_uncalibrated": expected_calibration_error(raw, codes),
        "ece": expected_calibration_error(calibrated, codes),
        "ece_floor": ece_floor(calibrated),
    }
    for coverage in COVERAGES:
        model.predict(test, coverage=coverage)
        sets = test.obs["scforge_prediction_set"].astype(str).str.split(", ")
        row[f"coverage_{coverage}"] = float(np.mean([t in s for t, s in zip(truth, sets)]))
        row[f"set_size_{coverage}"] = float(test.obs["scforge_prediction_set_size"].mean())
    row["macro_f1"] = classification_scores(truth, predicted(test.obs), names)["macro_f1"]
    return row, raw, calibrated, codes


def holdout_row(adata, key: str, held_out: str, seed: int, args) -> dict:
    """One type left out of training entirely; scored on all its cells and the test cells."""
    truth = adata.obs[key].astype(str).to_numpy()
    known = adata[truth != held_out].copy()
    model = fine_tune(known, key, seed, args.max_epochs)
    query = adata[truth == held_out].copy()
    del query.obs[key]  # a query holds no labels
    test = adata[np.flatnonzero(truth != held_out)[model.test_indices_]].copy()
    known_truth = test.obs[key].astype(str).to_numpy()
    del test.obs[key]
    scores = {}
    for name, cells in (("test", test), ("held_out", query)):
        model.predict(cells, unknown_threshold=args.unknown_threshold)
        scores[name] = cells.obs
    outside = np.r_[np.zeros(len(test)), np.ones(len(query))]
    unknown = np.r_[
        scores["test"]["scforge_unknown_score"], scores["held_out"]["scforge_unknown_score"]
    ]
    softmax = (
        1 - np.r_[scores["test"]["scforge_confidence"], scores["held_out"]["scforge_confidence"]]
    )
    names = list(model.class_names_)
    plain = np.asarray(names)[model.predict(test, return_probabilities=True).to_numpy().argmax(1)]
    return {
        "held_out": held_out,
        "n_held_out": len(query),
        "auroc_unknown_score": float(roc_auc_score(outside, unknown)),
        "auroc_max_softmax": float(roc_auc_score(outside, softmax)),
        "held_out_labelled_unknown": float((predicted(scores["held_out"]) == "unknown").mean()),
        "known_labelled_unknown": float((predicted(scores["test"]) == "unknown").mean()),
        "known_macro_f1": classification_scores(known_truth, plain, names)["macro_f1"],
        "known_macro_f1_with_threshold": classification_scores(
            known_truth, predicted(scores["test"]), names
        )["macro_f1"],
    }


def predicted(obs) -> np.ndarray:
    """The predicted labels of ``obs``."""
    return obs["scforge_prediction"].astype(str).to_numpy()


def main(argv=None) -> None:
    args = parse_args(argv)
    for name in ("lightning", "lightning.pytorch", "scforge_scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    adata, key = load(args.dataset)
    rows, pooled = [], []
    start = time.perf_counter()
    for seed in args.seeds:
        t0 = time.perf_counter()
        model = fine_tune(adata.copy(), key, seed, args.max_epochs)
        row, *test_cells = calibration_row(model, key)
        row = {"dataset": args.dataset, "seed": seed, **row}
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        pooled.append(test_cells)
        print(
            f"seed {seed}: ECE {row['ece_uncalibrated']:.3f} -> {row['ece']:.3f} "
            f"(floor {row['ece_floor']:.3f}) "
            f"(T {row['temperature']:.2f}, {row['n_validation']} validation cells); coverage "
            + ", ".join(
                f"{c}: {row[f'coverage_{c}']:.3f} (size {row[f'set_size_{c}']:.2f})"
                for c in COVERAGES
            )
            + f"; macro-F1 {row['macro_f1']:.3f}; {row['wall_s']:.0f} s",
            flush=True,
        )
    if args.holdout:
        for held_out in np.unique(adata.obs[key].astype(str)):
            t0 = time.perf_counter()
            row = holdout_row(adata, key, held_out, args.seeds[0], args)
            row.update(dataset=args.dataset, seed=args.seeds[0], wall_s=time.perf_counter() - t0)
            rows.append(row)
            print(
                f"left out {held_out} ({row['n_held_out']} cells): AUROC unknown score "
                f"{row['auroc_unknown_score']:.3f}, max-softmax {row['auroc_max_softmax']:.3f}; "
                f"labelled unknown: {row['held_out_labelled_unknown']:.2f} of them, "
                f"{row['known_labelled_unknown']:.3f} of known test cells; known macro-F1 "
                f"{row['known_macro_f1']:.3f} -> {row['known_macro_f1_with_threshold']:.3f}; "
                f"{row['wall_s']:.0f} s",
                flush=True,
            )
    summary = {}
    fields = ["ece_uncalibrated", "ece", "ece_floor", *(f"coverage_{c}" for c in COVERAGES)]
    fields += [f"set_size_{c}" for c in COVERAGES]
    fields += ["auroc_unknown_score", "auroc_max_softmax", "known_macro_f1"]
    for field in [*fields, "known_macro_f1_with_threshold"]:
        values = [r[field] for r in rows if field in r]
        if values:
            summary[field] = (float(np.mean(values)), float(np.std(values)))
            print(f"{field}: {np.mean(values):.3f} +- {np.std(values):.3f} over {len(values)}")
    if len(pooled) > 1:
        raw, probabilities, codes = (np.concatenate(part) for part in zip(*pooled))
        summary["ece_uncalibrated_pooled"] = expected_calibration_error(raw, codes)
        summary["ece_pooled"] = expected_calibration_error(probabilities, codes)
        summary["ece_floor_pooled"] = ece_floor(probabilities)
        print(
            f"ECE of the {len(codes)} test cells of every seed pooled: "
            f"{summary['ece_uncalibrated_pooled']:.3f} -> {summary['ece_pooled']:.3f} "
            f"(floor {summary['ece_floor_pooled']:.3f})"
        )
    print(f"wall {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
