"""Wall time of the default annotation recipe, where it goes, and the same on another tree.

The recipe is what a new user runs: ``ScForge`` with its defaults, masked-gene pretraining
(``train(objective="pretrain")``) on 80% of pbmc3k (the training + validation cells of
``benchmarks/annotation.py``'s seeded split), ``save_pretrained``, ``from_pretrained`` with
``louvain`` labels and ``train()`` (full fine-tuning), then ``evaluate()`` on the 20% test
cells. Every argument is the library default, so a change of defaults is measured too.

Each training run is split by a Lightning callback into:

``setup``       from ``train()`` to the first batch: vocabulary, token lengths, data module,
                training plan, Trainer;
``forward``     training step to the start of ``backward`` (masking, forward, loss);
``backward``    ``loss.backward()``;
``optimizer``   end of backward to the end of the batch (AdamW, scheduler, logging);
``data``        end of one batch to the start of the next (slicing and tokenising the next
                minibatch, Lightning's loop);
``validation``  the validation loops;
``epoch ends``  the rest of the fit (epoch-end callbacks: best weights, history);
``after fit``   end of the fit to the return of ``train()`` (restoring the best weights, the
                linear path and calibration of a classifier).

``--trees A B`` runs the same measurement on the package of each tree (a checkout or
``git worktree``: its ``src/`` on ``PYTHONPATH``), alternating tree by tree within every
repeat so that a noisy machine slows all of them alike, and prints each tree's wall time
as a ratio to the first tree's. The peak RSS of each run and the fp32 matmul rate measured
in the same process at 2048^3 are printed beside it.

Run ``python benchmarks/recipe_speed.py --threads 2`` (about 6 minutes on 2 CPU cores), or
``python benchmarks/recipe_speed.py --trees ../before . --repeats 2``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PHASES = (
    "setup",
    "forward",
    "backward",
    "optimizer",
    "data",
    "validation",
    "epoch ends",
    "after fit",
)


def phase_timer():
    """A Lightning callback that adds the seconds of each phase of a fit into ``.seconds``."""
    from lightning.pytorch import Callback

    class PhaseTimer(Callback):
        def __init__(self) -> None:
            self.seconds = dict.fromkeys(PHASES, 0.0)
            self.steps = 0
            self.fit_start = self.fit_end = self.last = self.val_start = None
            self.in_epoch = False

        def _add(self, phase: str) -> None:
            now = time.perf_counter()
            self.seconds[phase] += now - self.last
            self.last = now

        def on_train_start(self, trainer, pl_module) -> None:
            self.fit_start = self.last = time.perf_counter()

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.in_epoch = False

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            now = time.perf_counter()
            if self.in_epoch:
                self.seconds["data"] += now - self.last
            self.last, self.in_epoch = now, True

        def on_before_backward(self, trainer, pl_module, loss) -> None:
            self._add("forward")

        def on_after_backward(self, trainer, pl_module) -> None:
            self._add("backward")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self._add("optimizer")
            self.steps += 1

        def on_validation_start(self, trainer, pl_module) -> None:
            self.val_start = time.perf_counter()

        def on_validation_end(self, trainer, pl_module) -> None:
            if self.fit_start is not None:  # not the sanity check before the fit
                self.seconds["validation"] += time.perf_counter() - self.val_start

        def on_train_end(self, trainer, pl_module) -> None:
            self.fit_end = time.perf_counter()

    return PhaseTimer()


def timed_train(model, **kwargs) -> dict:
    """``model.train(**kwargs)`` with its phases, steps, epochs and wall time."""
    timer = phase_timer()
    t0 = time.perf_counter()
    model.train(callbacks=[timer], enable_progress_bar=False, **kwargs)
    end = time.perf_counter()
    seconds = timer.seconds
    seconds["setup"] = timer.fit_start - t0
    seconds["after fit"] = end - timer.fit_end
    fit = timer.fit_end - timer.fit_start
    inside = ("forward", "backward", "optimizer", "data", "validation")
    seconds["epoch ends"] = fit - sum(seconds[k] for k in inside)
    return {
        "wall_s": end - t0,
        "steps": timer.steps,
        "epochs": len(model.history["train_loss_epoch"]),
        "phases": seconds,
    }


def worker(args) -> dict:
    """One run of the recipe in this process (the package on ``sys.path`` is the tree's)."""
    import torch

    sys.path.insert(0, str(HERE))
    import scforge_scvi
    from annotation import TRAIN_SIZE, VALIDATION_SIZE, load
    from pretraining import matmul_flops_per_s
    from scforge_scvi import ScForge
    from scforge_scvi.data._splits import split_cells

    for name in ("lightning", "lightning.pytorch", "scforge_scvi", "scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    matmul = matmul_flops_per_s()
    adata, key = load("pbmc3k")
    labelled = adata.copy()
    ScForge.setup_anndata(labelled, labels_key=key)
    train, val, _ = split_cells(
        labelled.n_obs, TRAIN_SIZE, VALIDATION_SIZE, args.seed, labelled.obs[key].astype(str)
    )
    pre = adata[np.union1d(train, val)].copy()
    pre.obs = pre.obs[[]]
    ScForge.setup_anndata(pre)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    model = ScForge(pre)
    pretrain = timed_train(model, objective="pretrain", seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        model = ScForge.from_pretrained(tmp, labelled)
    finetune = timed_train(
        model, seed=args.seed, train_size=TRAIN_SIZE, validation_size=VALIDATION_SIZE
    )
    recipe = time.perf_counter() - t0
    scores = model.evaluate()
    return {
        "package": str(Path(scforge_scvi.__file__).resolve().parents[2]),
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "matmul_gflops": matmul / 1e9,
        "recipe_s": recipe,
        "pretrain": pretrain,
        "finetune": finetune,
        "cells": {"pretrain": pre.n_obs, "finetune": len(train)},
        "macro_f1": scores["macro_f1"],
        "logreg_macro_f1": scores["baseline_logreg"]["macro_f1"],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_tree(tree: Path, args) -> dict:
    """The worker in a fresh process whose ``scforge_scvi`` is ``tree``'s."""
    env = os.environ | {"PYTHONPATH": str(tree.resolve() / "src")}
    cmd = [sys.executable, __file__, "--worker", "--seed", str(args.seed)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"the run on {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(tree: str, runs: list[dict], first: float | None) -> None:
    walls = np.array([r["recipe_s"] for r in runs])
    f1 = np.array([r["macro_f1"] for r in runs])
    ratio = "" if first is None else f", {walls.mean() / first:.2f} x the first tree"
    print(
        f"\n{tree}: recipe {walls.mean():.0f} s (runs {', '.join(f'{w:.0f}' for w in walls)})"
        f"{ratio}; test macro-F1 {f1.mean():.3f} (logreg {runs[0]['logreg_macro_f1']:.3f}); "
        f"peak RSS {max(r['peak_rss_mib'] for r in runs):.0f} MiB; matmul "
        f"{np.mean([r['matmul_gflops'] for r in runs]):.0f} GFLOP/s, {runs[0]['threads']} threads"
    )
    for part in ("pretrain", "finetune"):
        first_run = runs[0][part]
        cells = runs[0]["cells"][part]
        wall = np.mean([r[part]["wall_s"] for r in runs])
        print(
            f"  {part}: {wall:.0f} s, {first_run['epochs']} epochs, {first_run['steps']} steps, "
            f"{cells * first_run['epochs'] / wall:.0f} training cells/s"
        )
        for phase in PHASES:
            s = np.mean([r[part]["phases"][phase] for r in runs])
            print(f"    {phase:11s} {s:7.1f} s {s / wall:6.1%}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trees", type=Path, nargs="+", default=[HERE.parent])
    p.add_argument("--repeats", type=int, default=1, help="runs per tree, alternating")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None, help="write every run here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    runs: dict[str, list[dict]] = {str(t): [] for t in args.trees}
    for repeat in range(args.repeats):
        for tree in args.trees:
            run = run_tree(tree, args)
            runs[str(tree)].append(run)
            print(f"repeat {repeat}, {tree}: recipe {run['recipe_s']:.0f} s", flush=True)
            if args.json:
                args.json.write_text(json.dumps(runs, indent=1))
    first = None
    for tree, tree_runs in runs.items():
        report(tree, tree_runs, first)
        first = first or np.mean([r["recipe_s"] for r in tree_runs])


if __name__ == "__main__":
    main()
