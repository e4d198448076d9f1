"""Training and embedding throughput, as cells/s and as a share of a plain fp32 matmul.

Two configurations, each on the model's own data path (scvi-tools' registered AnnData,
length-grouped minibatches, tokenisation in the collate function):

``anchor``  hidden 256, 4 layers, 8 heads, FFN 1024, 1,024 genes + CLS, batch 32, dropout 0.1,
            fp32, PBMC 3k with all 32,738 genes in the vocabulary. Phases, timed after an
            untimed warm-up step:
            (a) data only: slice + tokenise through the training loader;
            (b) pretraining step: data + masking + forward + masked-gene loss + backward +
                AdamW, with length-grouped batches, and the same with random batches;
            (c) embedding: ``model.get_latent_representation`` (inference, longest first);
            (d) LoRA fine-tuning step: rank-8 adapters on every projection and FFN linear,
                classification head on ``louvain``, forward + backward + AdamW.
``small``   hidden 128, 2 layers, 4 heads, 512 genes, batch 64, through the public
            ``model.train()`` (Lightning, validation every epoch included) and
            ``get_latent_representation()``, on PBMC 3k and on a CBMC-sized set (6,900 cells x
            500 genes: PBMC 3k's 500 genes with most counts, cells resampled with binomial
            thinning). Prints epochs per minute and a breakdown of where an epoch goes.

FLOPs are counted analytically over REAL tokens (a cell of ``l`` tokens costs, per layer and
forward, ``8 l d^2`` for the q/k/v/out projections, ``4 l^2 d`` for attention scores and
``A @ V``, ``4 l d f`` for the FFN; the masked-gene head costs ``2 M d (d + V)`` for ``M``
masked targets), so padding counts as waste. A training step counts 3 forward passes
(backward = 2 x forward); a LoRA step counts 2 (activation gradients through the frozen base,
no weight gradients; adapters are not counted); an embedding counts 1. Every rate is divided
by the FLOP/s of a square 2048^3 fp32 ``torch.matmul`` measured in the same run, and the
cells/s are restated "at 150 GFLOP/s" (cells/s x 150 / measured matmul GFLOP/s) to compare
with figures measured on other machines. The small configuration also prints the rate of a
matmul at the model's own shapes (a minibatch of median-length cells through the projections
and the FFN), the ceiling that a model of that width can reach, and its training rate as a
share of it.

Run ``python benchmarks/pretraining.py`` (about 6 minutes on 2 CPU cores);
``--config anchor`` or ``--config small`` runs one of them.
"""

from __future__ import annotations

import argparse
import logging
import resource
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from scforge_scvi import ScForge, tune_cpu_allocator
from scforge_scvi.data import MaskingConfig, pbmc68k_counts
from scforge_scvi.data._bucketing import length_grouped_loader
from scforge_scvi.train import LoraSettings, build_adamw

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
#: every gene of the data in the vocabulary (``n_top_genes=None``), as the figures were measured
ANCHOR = {
    "hidden_dim": 256,
    "num_layers": 4,
    "num_heads": 8,
    "max_genes": 1024,
    "architecture": {"ffn_dim": 1024},
    "preprocessing": {"n_top_genes": None},
}
SMALL = {"hidden_dim": 128, "num_layers": 2, "num_heads": 4, "max_genes": 512}
# scModelForge on a 2-core CPU with a 182 GFLOP/s matmul (cells/s), from its own benchmark
PEER = {"pretrain": 0.48, "embed": 2.97, "lora": 0.64}
PEER_MATMUL = 182.0
TARGETS = {"pretrain": 2.0, "embed": 10.0, "lora": 2.6}  # cells/s at 150 GFLOP/s


def load_pbmc3k():
    """PBMC 3k raw counts, or pbmc68k_reduced counts (with a note) when the file is absent."""
    import anndata as ad

    path = SHARED_DATA / "pbmc3k_raw_labeled.h5ad"
    if path.exists():
        adata = ad.read_h5ad(path)
        adata.var_names_make_unique()
        return adata, "pbmc3k", "louvain"
    print(f"NOTE: {path.name} not found; falling back to scanpy's pbmc68k_reduced counts.")
    return pbmc68k_counts(), "pbmc68k_reduced", "bulk_labels"


def cbmc_like(adata, n_cells: int = 6900, n_genes: int = 500, seed: int = 0):
    """A CBMC-sized set: the ``n_genes`` genes with most counts, cells resampled and thinned."""
    import anndata as ad

    rng = np.random.default_rng(seed)
    x = sp.csr_matrix(adata.X)
    top = np.sort(np.argsort(-np.asarray(x.sum(0)).ravel())[:n_genes])
    cells = rng.integers(0, adata.n_obs, n_cells)
    sub = x[cells][:, top].tocsr()
    sub.data = rng.binomial(sub.data.astype(np.int64), 0.8).astype(np.float32)
    sub.eliminate_zeros()
    out = ad.AnnData(sub, obs=adata.obs.iloc[cells].reset_index(drop=True))
    out.obs_names = [f"cell{i}" for i in range(n_cells)]
    out.var_names = adata.var_names[top]
    return out


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_flops_per_s(
    shapes: tuple[tuple[int, int, int], ...] = ((2048, 2048, 2048),), min_time: float = 1.0
) -> float:
    """FLOP/s of fp32 ``(m, k) @ (k, n)`` products: the FLOPs of one of each ``(m, k, n)`` of
    ``shapes`` over the sum of their best timings (repeated for at least ``min_time`` s)."""
    pairs = [(torch.randn(m, k), torch.randn(k, n)) for m, k, n in shapes]
    best = [float("inf")] * len(pairs)
    total = 0.0
    for a, b in pairs:
        a @ b
    while total < min_time:
        for i, (a, b) in enumerate(pairs):
            t0 = time.perf_counter()
            a @ b
            dt = time.perf_counter() - t0
            best[i], total = min(best[i], dt), total + dt
    return sum(2 * m * k * n for m, k, n in shapes) / sum(best)


def model_matmul_flops_per_s(tokens: int, d: int, f: int) -> float:
    """:func:`matmul_flops_per_s` at a model's own linear layers over ``tokens`` rows: the
    projections ``(d, d)``, the FFN ``(d, f)`` and ``(f, d)``."""
    return matmul_flops_per_s(((tokens, d, d), (tokens, d, f), (tokens, f, d)))


# ----------------------------------------------------------------------------------- FLOPs
def forward_flops(lengths: np.ndarray, d: int, f: int, n_layers: int) -> float:
    """Forward matmul FLOPs of the transformer blocks over real tokens of cells of ``lengths``."""
    lengths = np.asarray(lengths, dtype=np.float64)
    per_layer = 8 * lengths * d * d + 4 * lengths**2 * d + 4 * lengths * d * f
    return float(n_layers * per_layer.sum())


def head_flops(n_masked: int, d: int, vocab: int) -> float:
    """Forward FLOPs of the masked-gene head (dense transform + tied decoder)."""
    return 2.0 * n_masked * d * (d + vocab)


class Figures:
    """Collects rows of ``(phase, cells/s, real GFLOP/s)`` and prints them against a matmul."""

    def __init__(self, matmul: float) -> None:
        self.matmul = matmul
        self.rows: list[tuple[str, float, float | None, str | None]] = []

    def add(self, name: str, cells_s: float, flops_s: float | None, key: str | None = None):
        self.rows.append((name, cells_s, flops_s, key))

    def print(self, title: str) -> None:
        mm = self.matmul / 1e9
        print(f"\n=== {title} (square fp32 matmul: {mm:.1f} GFLOP/s) ===")
        print(
            f"{'phase':44s} {'cells/s':>8s} {'GFLOP/s':>8s} {'/matmul':>8s} "
            f"{'@150':>7s} {'target':>7s} {'vs peer':>8s}"
        )
        for name, cps, fl, key in self.rows:
            at150 = cps * 150 / mm
            ratio = f"{fl / self.matmul:7.1%}" if fl else "      -"
            gf = f"{fl / 1e9:8.1f}" if fl else "       -"
            target = f"{TARGETS[key]:7.2f}" if key else "      -"
            peer = f"{at150 / (PEER[key] * 150 / PEER_MATMUL):7.1f}x" if key else "       -"
            print(f"{name:44s} {cps:8.2f} {gf} {ratio:>8s} {at150:7.2f} {target} {peer}")


# ---------------------------------------------------------------------------------- anchor
def pretrain_step(module, batch, step: int, optimizer) -> int:
    """Masking + forward + masked-gene loss + backward + AdamW; returns the masked count."""
    out = module.inference(
        **module._get_inference_input(batch),
        masking=MaskingConfig(),
        generator=torch.Generator().manual_seed(step),
    )
    module.loss(batch, out, {}, "pretrain").loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return int(out["masked"].target_mask.sum())


def classify_step(module, batch, optimizer) -> None:
    out = module.inference(**module._get_inference_input(batch))
    module.loss(batch, out, {}, "classify").loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def grouped_batches(model, adata, idx, batch_size, group_batches=16, shuffle=True):
    """Batches of ``idx`` as training (``shuffle``, length-grouped unless ``group_batches ==
    1``) or validation (longest first) draws them."""
    torch.manual_seed(0)
    return length_grouped_loader(
        model.adata_manager,
        idx,
        model._token_lengths(adata, idx),
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=model._collator(adata),
        group_batches=group_batches,
    )


def time_steps(batches, n_warmup: int, step) -> tuple[float, list]:
    """Run ``step(i, batch)`` over the batches (data loading included); time all but warm-up."""
    it = iter(batches)
    for i in range(n_warmup):
        step(i, next(it))
    t0, seen = time.perf_counter(), []
    for i, batch in enumerate(it):
        seen.append((batch, step(n_warmup + i, batch)))
    return time.perf_counter() - t0, seen


def run_anchor(args, fig: Figures) -> None:
    adata, source, labels_key = load_pbmc3k()
    ScForge.setup_anndata(adata, labels_key=labels_key)
    torch.manual_seed(0)
    model = ScForge(adata, dropout=0.1, **ANCHOR)
    cfg = model.backbone_config
    d, f, nl, vocab = cfg.hidden_dim, cfg.resolved_ffn_dim, cfg.num_layers, cfg.vocab_size
    batch = 32
    print(
        f"anchor: {source}, {adata.n_obs} cells x {adata.n_vars} genes, vocabulary {vocab}; "
        f"{ANCHOR}, batch {batch}, dropout 0.1, fp32, {torch.get_num_threads()} threads; "
        f"{args.steps} timed steps per phase after 1 warm-up"
    )
    order = np.random.default_rng(0).permutation(adata.n_obs)
    idx = np.sort(order[: (args.steps + 1) * batch * 4])  # a pool to draw the batches from

    # (a) data only
    t0 = time.perf_counter()
    n_cells = sum(b["gene_ids"].shape[0] for b in grouped_batches(model, adata, idx, batch, 16))
    fig.add("(a) data only (slice + tokenise)", n_cells / (time.perf_counter() - t0), None)

    # (b) pretraining step, grouped and random batches
    module = model.module.train()
    for name, group in (("grouped", 16), ("random", 1)):
        optimizer = build_adamw({"model": (module, 1e-4)}, weight_decay=0.01)
        batches = list(grouped_batches(model, adata, idx, batch, group))[: args.steps + 1]
        dt, seen = time_steps(batches, 1, lambda i, b, o=optimizer: pretrain_step(module, b, i, o))
        lengths = np.concatenate([b["padding_mask"].sum(1).numpy() for b, _ in seen])
        padded = sum(b["gene_ids"].numel() for b, _ in seen)
        flops = 3 * (
            forward_flops(lengths, d, f, nl) + sum(head_flops(m, d, vocab) for _, m in seen)
        )
        fig.add(
            f"(b) pretrain step, {name} batches ({lengths.sum() / padded:.0%} real)",
            len(lengths) / dt,
            flops / dt,
            "pretrain" if name == "grouped" else None,
        )
        del optimizer
    rss_train = peak_rss_mib()

    # (c) embedding
    emb_idx = order[: args.steps * batch * 4]
    model.get_latent_representation(indices=emb_idx[:batch], batch_size=batch)  # warm-up
    t0 = time.perf_counter()
    model.get_latent_representation(indices=emb_idx, batch_size=batch)
    dt = time.perf_counter() - t0
    flops = forward_flops(model._token_lengths(adata, emb_idx), d, f, nl)
    fig.add("(c) embedding (get_latent_representation)", len(emb_idx) / dt, flops / dt, "embed")

    # (d) LoRA fine-tuning step
    model._apply_lora(LoraSettings())
    model.module.backbone.train()
    model.module.gene_head.requires_grad_(False)
    model.module.classifier.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for p in model.module.parameters() if p.requires_grad])
    batches = list(grouped_batches(model, adata, idx, batch, 16))[: args.steps + 1]
    dt, seen = time_steps(batches, 1, lambda i, b: classify_step(model.module, b, optimizer))
    lengths = np.concatenate([b["padding_mask"].sum(1).numpy() for b, _ in seen])
    flops = 2 * forward_flops(lengths, d, f, nl)
    fig.add("(d) LoRA fine-tuning step (rank 8)", len(lengths) / dt, flops / dt, "lora")
    fig.print(f"anchor configuration on CPU ({torch.get_num_threads()} threads)")
    print(
        f"peak RSS: {rss_train:.0f} MiB after pretraining steps (target <= 4096), "
        f"{peak_rss_mib():.0f} MiB at the end"
    )


# ----------------------------------------------------------------------------------- small
def epoch_breakdown(model, adata, train_idx, val_idx, batch: int, n_steps: int) -> dict:
    """Seconds per training cell of each part of an epoch, measured on ``n_steps`` batches."""
    from torch.profiler import ProfilerActivity, profile

    from scforge_scvi.data import mask_tokens

    module = model.module.train()
    optimizer = build_adamw({"model": (module, 1e-4)}, weight_decay=0.01)
    masking = MaskingConfig()
    batches_iter = iter(grouped_batches(model, adata, train_idx, batch, 16))
    t = dict.fromkeys(("data", "masking", "forward", "backward", "optimizer"), 0.0)
    cells, prof_batches = 0, []
    for step in range(n_steps + 1):
        t0 = time.perf_counter()
        b = next(batches_iter)
        t1 = time.perf_counter()
        tokens = module._get_inference_input(b)["tokens"]
        gen = torch.Generator().manual_seed(step)
        mask_tokens(
            tokens,
            masking,
            vocab_size=module.config.vocab_size,
            n_special=module.n_special,
            mask_id=module.mask_id,
            generator=gen,
        )
        t2 = time.perf_counter()
        # inference masks again (it takes unmasked tokens): its masking time is subtracted
        out = module.inference(
            tokens=tokens, masking=masking, generator=torch.Generator().manual_seed(step)
        )
        loss = module.loss(b, out, {}, "pretrain").loss
        t3 = time.perf_counter()
        loss.backward()
        t4 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        if step == 0:
            prof_batches.append(b)
            continue
        cells += b["gene_ids"].shape[0]
        for k, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2 - (t2 - t1), t4 - t3, t5 - t4)):
            t[k] += dt
    # attention's share of forward + backward, from the operator profile of one step
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        pretrain_step(module, prof_batches[0], 0, optimizer)
    total = attention = 0.0
    for ev in prof.key_averages():
        total += ev.self_cpu_time_total
        if "scaled_dot_product" in ev.key or "flash_attention" in ev.key:
            attention += ev.self_cpu_time_total
    # validation: a forward pass with masks over the validation cells
    module.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for i, b in enumerate(grouped_batches(model, adata, val_idx, batch, shuffle=False)):
            out = module.inference(
                **module._get_inference_input(b),
                masking=masking,
                generator=torch.Generator().manual_seed(i),
            )
            module.loss(b, out, {}, "pretrain")
    val_per_train_cell = (time.perf_counter() - t0) / len(train_idx)
    module.train()
    per_cell = {k: v / cells for k, v in t.items()}
    per_cell["attention share of fwd+bwd"] = attention / total
    per_cell["validation"] = val_per_train_cell
    return per_cell


def run_small(args, fig_factory) -> None:
    pbmc, source, _ = load_pbmc3k()
    sets = [(source, pbmc), ("CBMC-like (pbmc3k top 500 genes, 6,900 cells)", cbmc_like(pbmc))]
    batch = 64
    for name, adata in sets:
        ScForge.setup_anndata(adata)
        torch.manual_seed(0)
        model = ScForge(adata, dropout=0.1, **SMALL)
        cfg = model.backbone_config
        d, f, nl, vocab = cfg.hidden_dim, cfg.resolved_ffn_dim, cfg.num_layers, cfg.vocab_size
        lengths = model._token_lengths(adata)
        print(
            f"\nsmall: {name}, {adata.n_obs} cells x {adata.n_vars} genes, vocabulary {vocab}; "
            f"{SMALL}, batch {batch}; median tokens per cell {int(np.median(lengths))}"
        )
        t0 = time.perf_counter()
        model.train(max_epochs=args.small_epochs, batch_size=batch, enable_progress_bar=False)
        fit = time.perf_counter() - t0
        tr, va = model.train_indices_, model.validation_indices_
        n_masked = 0.15 * (lengths[tr] - 1).sum()  # expected masked gene tokens per epoch
        epoch_flops = 3 * (forward_flops(lengths[tr], d, f, nl) + head_flops(n_masked, d, vocab))
        epoch_flops += forward_flops(lengths[va], d, f, nl) + head_flops(
            0.15 * (lengths[va] - 1).sum(), d, vocab
        )
        fig = fig_factory()
        fig.add(
            f"model.train(): {args.small_epochs} epochs in {fit:.0f} s "
            f"= {60 * args.small_epochs / fit:.1f} epochs/min",
            args.small_epochs * len(tr) / fit,
            args.small_epochs * epoch_flops / fit,
        )
        t0 = time.perf_counter()
        model.get_latent_representation(batch_size=batch)
        dt = time.perf_counter() - t0
        fig.add(
            "get_latent_representation()",
            adata.n_obs / dt,
            forward_flops(lengths, d, f, nl) / dt,
        )
        fig.print(f"small configuration, {name}")
        tokens = batch * int(np.median(lengths))
        own = model_matmul_flops_per_s(tokens, d, f)
        print(
            f"matmul at the model's own shapes ({tokens} x {d} by {d}x{d}, {d}x{f}, {f}x{d}): "
            f"{own / 1e9:.1f} GFLOP/s; model.train() runs at "
            f"{args.small_epochs * epoch_flops / fit / own:.1%} of it"
        )
        parts = epoch_breakdown(model, adata, tr, va, batch, args.steps)
        fit_per_cell = fit / (args.small_epochs * len(tr))
        accounted = sum(v for k, v in parts.items() if not k.startswith("attention"))
        print("where a training epoch goes (seconds per 1,000 training cells):")
        for k, v in parts.items():
            if k.startswith("attention"):
                print(f"  {'  of which attention kernels':34s} {v:6.1%} of forward+backward")
            else:
                print(f"  {k:34s} {1000 * v:6.2f} s  ({v / fit_per_cell:5.1%} of the epoch)")
        rest = fit_per_cell - accounted
        print(
            f"  {'Lightning / scvi-tools and rest':34s} {1000 * rest:6.2f} s  "
            f"({rest / fit_per_cell:5.1%} of the epoch)"
        )
        print(f"peak RSS so far: {peak_rss_mib():.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("anchor", "small", "all"), default="all")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per anchor phase")
    parser.add_argument("--small-epochs", type=int, default=2, help="epochs of model.train()")
    parser.add_argument(
        "--no-tune-malloc", action="store_true", help="leave glibc's allocator alone"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    for name in ("scvi", "scforge_scvi", "lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.no_tune_malloc:
        import os

        os.environ["SCFORGE_TUNE_MALLOC"] = "0"
    print(f"allocator tuned: {tune_cpu_allocator()}; torch {torch.__version__}")
    matmul = matmul_flops_per_s()
    if args.config in ("anchor", "all"):
        run_anchor(args, Figures(matmul))
    if args.config in ("small", "all"):
        run_small(args, lambda: Figures(matmul))
    print(f"\nsquare fp32 matmul re-measured at the end: {matmul_flops_per_s() / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
