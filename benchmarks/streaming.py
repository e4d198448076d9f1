"""Streamed vs in-memory training: peak RSS and cells/s as the backed file grows.

Builds backed ``.h5ad`` files of 20k, 100k and 500k cells once, by resampling the counts of
PBMC 3k (a random real cell per new cell, Poisson counts around its own, its library size
scaled by 0.8-1.2), under ``benchmarks/_data/`` (git-ignored). Then, each in a fresh process
so that peak RSS belongs to that run alone, it pretrains the same small model for the same
number of steps:

- ``streamed``: ``model.train(data=StreamedCells([file]))``, setup on a 2,000-cell sample;
- ``in-memory``: the file read whole (``anndata.read_h5ad``), registered and trained as usual.

Printed: cells/s of the training steps (data + forward + backward + optimizer; setup
excluded), peak RSS of the process, and the ratios asked for (peak RSS 500k / 20k streamed,
streamed / in-memory throughput at 20k).

Usage::

    python benchmarks/streaming.py                 # 20k, 100k, 500k
    python benchmarks/streaming.py --sizes 20000 100000 --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
DATA = ROOT / "_data"
PBMC3K = ROOT.parent / ".." / "shared" / "data" / "pbmc3k_raw_labeled.h5ad"
MODEL = {"hidden_dim": 64, "num_layers": 2, "num_heads": 4, "max_genes": 256}
MODEL["architecture"] = {"ffn_dim": 128}


def make_file(n_cells: int, path: Path, seed: int = 0, chunk: int = 20_000) -> None:
    """Resample PBMC 3k into a backed ``.h5ad`` of ``n_cells`` cells, written chunk by chunk."""
    import anndata as ad
    import h5py
    import pandas as pd
    import scipy.sparse as sp

    source = ad.read_h5ad(PBMC3K)
    keep = np.asarray((source.X > 0).sum(axis=0)).ravel() >= 3  # genes detected in >= 3 cells
    counts = sp.csr_matrix(source.X[:, keep], dtype=np.float32)
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp.h5ad")
    with h5py.File(tmp, "w") as f:
        for start in range(0, n_cells, chunk):
            n = min(chunk, n_cells - start)
            rows = counts[rng.integers(0, counts.shape[0], n)]
            scale = np.repeat(rng.uniform(0.8, 1.2, n), np.diff(rows.indptr))
            rows.data = rng.poisson(rows.data * scale).astype(np.float32)
            rows.eliminate_zeros()
            if start == 0:
                ad.io.write_elem(f, "X", rows)  # resizable: rows are appended below
            else:
                ad.io.sparse_dataset(f["X"]).append(rows)
        obs = pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)])
        ad.io.write_elem(f, "obs", obs)
        ad.io.write_elem(f, "var", source.var[keep].copy())
        for name in ("obsm", "varm", "layers", "obsp", "varp", "uns"):
            ad.io.write_elem(f, name, {})
    os.replace(tmp, path)


def run_one(mode: str, path: Path, steps: int, batch_size: int) -> dict:
    """One measurement, in this process (called by the parent in a subprocess)."""
    import logging
    import warnings

    import anndata as ad
    import torch
    from lightning.pytorch import Callback

    import scforge_scvi as sf

    warnings.filterwarnings("ignore")
    for name in ("scforge_scvi", "lightning", "lightning.pytorch", "scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.manual_seed(0)

    class Clock(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 1:  # the first step pays for warm-up
                self.start = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            self.seconds = time.perf_counter() - self.start

    if mode == "streamed":
        cells = sf.data.StreamedCells([path])
        adata = cells.sample(2000, seed=0)
        data = cells
    else:
        adata = ad.read_h5ad(path)
        data = None
    sf.ScForge.setup_anndata(adata)
    model = sf.ScForge(adata, **MODEL)
    clock = Clock()
    model.train(
        max_epochs=1,
        data=data,
        batch_size=batch_size,
        train_size=0.99,
        validation_size=0.01,
        accelerator="cpu",
        callbacks=[clock],
        limit_train_batches=steps + 1,
        limit_val_batches=0,
        enable_progress_bar=False,
        logger=False,
        enable_model_summary=False,
    )
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"cells_per_s": steps * batch_size / clock.seconds, "peak_rss_mib": peak_mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000, 500_000])
    parser.add_argument("--steps", type=int, default=40, help="timed training steps per run")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--in-memory-sizes", type=int, nargs="*", default=[20_000, 100_000])
    parser.add_argument("--_run", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._run:  # child process: one measurement, printed as JSON
        mode, path = args._run
        print(json.dumps(run_one(mode, Path(path), args.steps, args.batch_size)))
        return

    if not PBMC3K.exists():
        sys.exit(f"{PBMC3K.name} not found in <repo>/../shared/data")
    DATA.mkdir(exist_ok=True)
    results = []
    for n in args.sizes:
        path = DATA / f"pbmc3k_resampled_{n}.h5ad"
        if not path.exists():
            t0 = time.perf_counter()
            make_file(n, path)
            print(
                f"wrote {path.name} ({path.stat().st_size / 2**20:,.0f} MiB) in "
                f"{time.perf_counter() - t0:.0f} s",
                flush=True,
            )
        modes = ["streamed"] + (["in-memory"] if n in args.in_memory_sizes else [])
        for mode in modes:
            cmd = [sys.executable, __file__, "--_run", mode, str(path)]
            cmd += ["--steps", str(args.steps), "--batch-size", str(args.batch_size)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:
                sys.exit(f"{mode} {n}: failed\n{done.stderr[-3000:]}")
            row = {"cells": n, "mode": mode, **json.loads(done.stdout.strip().splitlines()[-1])}
            results.append(row)
            print(
                f"{n:>8,} cells  {mode:<9}  {row['cells_per_s']:8.0f} cells/s  "
                f"peak RSS {row['peak_rss_mib']:7.0f} MiB",
                flush=True,
            )

    def pick(n, mode, key):
        return next((r[key] for r in results if r["cells"] == n and r["mode"] == mode), None)

    lo, hi = min(args.sizes), max(args.sizes)
    print()
    print(
        f"model: {MODEL}, batch {args.batch_size}, {args.steps} timed steps, fp32 on the CPU, "
        f"{os.cpu_count()} cores"
    )
    rss_lo, rss_hi = pick(lo, "streamed", "peak_rss_mib"), pick(hi, "streamed", "peak_rss_mib")
    print(f"streamed peak RSS {hi:,} / {lo:,} cells: {rss_hi / rss_lo:.2f}x (target <= 1.5x)")
    for n in args.in_memory_sizes:
        s, m = pick(n, "streamed", "cells_per_s"), pick(n, "in-memory", "cells_per_s")
        if s and m:
            print(
                f"{n:,} cells: streamed / in-memory throughput {s / m:.2f} (target >= 0.70); "
                f"peak RSS {pick(n, 'streamed', 'peak_rss_mib'):.0f} vs "
                f"{pick(n, 'in-memory', 'peak_rss_mib'):.0f} MiB"
            )


if __name__ == "__main__":
    main()
