"""Tokenisation throughput on one CPU core, in cells per second.

Tokenises PBMC 3k (2,638 cells x 32,738 genes, about 850 expressed genes per cell) in
minibatches of 256 cells, as a data loader hands them to the collate function, with each of
the three tokenizers. Two figures per tokenizer:

- ``tokenise``: the tokenizer alone, on CSR minibatches sliced beforehand;
- ``slice + tokenise``: the CSR row slicing of a shuffled minibatch included.

A third column puts the tokenizer next to the floor of its method: one ``np.sort`` of as many
int64 keys as the minibatch has stored values (``sort only``). Each figure is the best of
``--repeats`` passes over all cells. The target is 20,000 cells/s for ``rank_value`` with
``max_genes=2048``.

Falls back to scanpy's pbmc68k_reduced counts (765 genes, much sparser work) when PBMC 3k is
not found in ``<repo>/../shared/data``.

Usage::

    python benchmarks/tokenization.py [--batch-size 256] [--max-genes 2048] [--repeats 3]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy and torch are imported

import argparse  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

import anndata as ad  # noqa: E402
import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import torch  # noqa: E402

from scforge_scvi.data import GeneVocab, Tokenizer, build_tokenizer, fit_gene_medians  # noqa: E402
from scforge_scvi.data import pbmc68k_counts as load_pbmc68k_counts  # noqa: E402

PBMC3K = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "pbmc3k_raw_labeled.h5ad"
STRATEGIES = ("rank_value", "binned_expression", "continuous")
TARGET = 20_000


def load_data() -> tuple[ad.AnnData, GeneVocab, np.ndarray, str]:
    """Counts, a vocabulary with fitted medians, the gene index and a description."""
    if PBMC3K.exists():
        adata = ad.read_h5ad(PBMC3K)
        vocab = GeneVocab.from_adata(adata, gene_key="gene_ids")
        gene_index = vocab.match(adata, gene_key="gene_ids").vocab_ids
        name = "PBMC 3k"
    else:
        print(f"NOTE: {PBMC3K.name} not found; using pbmc68k_reduced counts (765 genes).")
        adata = load_pbmc68k_counts()
        vocab = GeneVocab.from_adata(adata)
        gene_index = vocab.match(adata).vocab_ids
        name = "pbmc68k_reduced counts"
    vocab = fit_gene_medians(adata.X, gene_index, vocab)
    return adata, vocab, gene_index, name


def best_of(repeats: int, run: Callable[[], None]) -> float:
    """Smallest wall time of ``repeats`` calls, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def tokenise_sliced(tokenizer: Tokenizer, sliced: list, gene_index: np.ndarray) -> None:
    for counts in sliced:
        tokenizer(counts, gene_index)


def slice_and_tokenise(
    tokenizer: Tokenizer, x: sp.csr_matrix, batches: list, gene_index: np.ndarray
) -> None:
    for idx in batches:
        tokenizer(x[idx], gene_index)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-genes", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    adata, vocab, gene_index, name = load_data()
    x = adata.X.tocsr()
    n_cells = x.shape[0]
    order = np.random.default_rng(0).permutation(n_cells)  # a shuffled epoch
    batches = [order[i : i + args.batch_size] for i in range(0, n_cells, args.batch_size)]
    sliced = [x[idx] for idx in batches]
    keys = [np.random.default_rng(1).integers(0, 2**62, size=b.nnz) for b in sliced]

    print(
        f"{name}: {n_cells:,} cells x {x.shape[1]:,} genes, {x.nnz / n_cells:.0f} stored values "
        f"per cell; batches of {args.batch_size}, max_genes={args.max_genes}, one thread, "
        f"best of {args.repeats} (numpy {np.__version__}, torch {torch.__version__})"
    )
    sort_only = n_cells / best_of(args.repeats, lambda: [np.sort(k) for k in keys])

    header = f"{'tokenizer':<20}{'tokenise':>12}{'slice + tokenise':>19}{'vs sort only':>15}"
    print(f"\n{header}\n{'':<20}{'cells/s':>12}{'cells/s':>19}{'':>15}")
    rates = {}
    for strategy in STRATEGIES:
        tokenizer = build_tokenizer(strategy, vocab, max_genes=args.max_genes)
        alone = n_cells / best_of(
            args.repeats, partial(tokenise_sliced, tokenizer, sliced, gene_index)
        )
        loader = n_cells / best_of(
            args.repeats, partial(slice_and_tokenise, tokenizer, x, batches, gene_index)
        )
        rates[strategy] = alone
        print(f"{strategy:<20}{alone:>12,.0f}{loader:>19,.0f}{alone / sort_only:>15.2f}")
    print(f"{'sort only':<20}{sort_only:>12,.0f}")

    rank = rates["rank_value"]
    verdict = "meets" if rank >= TARGET else "is below"
    print(f"\nrank_value tokenises {rank:,.0f} cells/s: {verdict} the {TARGET:,} cells/s target.")


if __name__ == "__main__":
    main()
