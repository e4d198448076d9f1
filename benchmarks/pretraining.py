"""Pretraining throughput benchmark: cells/s, data-path share and matmul efficiency.

Model: hidden 256, 4 layers, 8 heads, FFN 1024, ``max_genes`` 1024 (rank-value tokens, CLS
prepended), dropout 0.1, batch 32, fp32 on the CPU, on PBMC 3k (2,638 cells x 32,738 genes;
scanpy's pbmc68k_reduced counts when the shared file is absent). The model's own data path is
used: an scvi-tools ``AnnDataLoader`` slicing sparse rows, tokenised by the model's collator.

Timed phases (after warm-up steps that are not counted):

(a) data: iterate the loader (sparse slice + tokenisation);
(b) forward + backward on pre-fetched batches (masking, backbone, masked-gene loss, backward);
(c) full step: data + forward + backward + AdamW step (``scforge_scvi.train.build_adamw``);
(d) embedding: ``model.get_latent_representation(indices=...)`` (inference mode).

FLOPs are counted analytically from the shapes actually computed (padded length ``L`` of each
batch, ``T = B * L`` tokens, hidden ``d``, FFN width ``f``, ``n_layers`` layers, vocabulary
``V``, ``M`` masked targets), counting a multiply-add as 2 FLOPs::

    per layer, forward:  QKV + output projections   4 * 2 * T * d^2
                         attention scores + A @ V   2 * 2 * B * L^2 * d
                         FFN (two linears)          2 * 2 * T * d * f
    masked-gene head, forward:  dense transform     2 * M * d^2
                                tied vocab decoder  2 * M * d * V
    training step (forward + backward) = 3 x forward (backward = 2 x forward)
    inference (embedding)              = 1 x forward of the layers (no head)

Embeddings, LayerNorms, softmax, GELU, dropout and the optimizer are not counted (they are
memory-bound and cost no matmul FLOPs). Attention is counted over the padded ``L x L`` because
that is what ``scaled_dot_product_attention`` computes on the CPU with a boolean mask.
The achieved FLOP/s are divided by the FLOP/s of plain fp32 ``torch.matmul`` measured in the
same run with the same thread count, for a matmul shaped like the FFN input layer
``(T, d) @ (d, f)`` and for a square 2048^3 one.

Run ``python benchmarks/pretraining.py`` (about 3-5 minutes on 2 CPU cores; ``--steps`` and
``--warmup`` change the length, ``--no-profile`` skips the operator profile). With CUDA,
phases (b)-(d) are repeated on the GPU under bf16 autocast.
"""

from __future__ import annotations

import argparse
import logging
import resource
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from scforge_scvi.data import MaskingConfig, pbmc68k_counts
from scforge_scvi.model._model import ScForge
from scforge_scvi.train import build_adamw

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
ARCH = {"hidden_dim": 256, "num_layers": 4, "num_heads": 8, "ffn_dim": 1024, "max_genes": 1024}
BATCH_SIZE = 32


def load_data():
    """PBMC 3k raw counts, or pbmc68k_reduced counts (with a note) when the file is absent."""
    import anndata as ad

    path = SHARED_DATA / "pbmc3k_raw_labeled.h5ad"
    if path.exists():
        adata = ad.read_h5ad(path)
        adata.var_names_make_unique()
        return adata, "pbmc3k"
    print(f"NOTE: {path.name} not found; falling back to scanpy's pbmc68k_reduced counts.")
    return pbmc68k_counts(), "pbmc68k_reduced"


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------- FLOPs
def layer_flops(batch: int, length: int, d: int, ffn: int, n_layers: int) -> float:
    """Forward matmul FLOPs of the transformer blocks for one padded ``(batch, length)`` batch."""
    tokens = batch * length
    proj = 4 * 2 * tokens * d * d
    attn = 2 * 2 * batch * length * length * d
    ffn_ = 2 * 2 * tokens * d * ffn
    return n_layers * (proj + attn + ffn_)


def head_flops(n_masked: int, d: int, vocab: int) -> float:
    """Forward matmul FLOPs of the masked-gene head on ``n_masked`` targets."""
    return 2 * n_masked * d * d + 2 * n_masked * d * vocab


def flop_breakdown(
    batch: int, length: int, n_masked: int, d: int, ffn: int, n_layers: int, vocab: int
) -> dict[str, float]:
    """Forward FLOPs by component for one batch (multiply by 3 for a training step)."""
    tokens = batch * length
    return {
        "qkv+out proj": n_layers * 8 * tokens * d * d,
        "attention": n_layers * 4 * batch * length * length * d,
        "ffn": n_layers * 4 * tokens * d * ffn,
        "gene head": head_flops(n_masked, d, vocab),
    }


def matmul_flops_per_s(
    m: int, k: int, n: int, device: torch.device, dtype: torch.dtype, min_time: float = 1.0
) -> float:
    """FLOP/s of ``(m, k) @ (k, n)`` (best of repeated timings, at least ``min_time`` s)."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    best, total = float("inf"), 0.0
    while total < min_time:
        t0 = time.perf_counter()
        a @ b
        sync(device)
        dt = time.perf_counter() - t0
        best, total = min(best, dt), total + dt
    return 2 * m * k * n / best


# ---------------------------------------------------------------------------------- phases
def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_step(module, batch, step: int, optimizer=None, autocast_dtype=None):
    """Masking + forward + masked-gene loss + backward (+ optimizer step); returns M."""
    device = batch["gene_ids"].device
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = module.inference(
            **module._get_inference_input(batch),
            masking=MaskingConfig(),
            generator=torch.Generator().manual_seed(step),
        )
        loss = module.loss(batch, out, {}, "pretrain").loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    else:
        module.zero_grad(set_to_none=True)
    return int(out["masked"].target_mask.sum())


def batch_shape(batch) -> tuple[int, int, int]:
    """(B, padded L, real tokens) of a tokenised batch."""
    b, length = batch["gene_ids"].shape
    return b, length, int(batch["padding_mask"].sum())


def run_suite(model, adata, order, device, n_warmup, n_steps, autocast_dtype, label):
    """Phases (a)-(d) on ``device``; returns a dict of figures."""
    module = model.module
    cfg = model.backbone_config
    d, ffn, n_layers, vocab = cfg.hidden_dim, cfg.resolved_ffn_dim, cfg.num_layers, cfg.vocab_size
    n_batches = n_warmup + n_steps
    idx = order[: n_batches * BATCH_SIZE]
    res: dict[str, float] = {}

    # (a) data only: sparse slice + tokenisation through the model's loader
    loader = model._loader(adata, idx, batch_size=BATCH_SIZE)  # built once, not timed
    t0 = time.perf_counter()
    batches = list(loader)
    res["data_s_per_batch"] = (time.perf_counter() - t0) / len(batches)
    shapes = [batch_shape(b) for b in batches]
    res["mean_L"] = float(np.mean([s[1] for s in shapes]))
    res["real_token_frac"] = sum(s[2] for s in shapes) / sum(s[0] * s[1] for s in shapes)

    # (b) forward + backward on pre-fetched batches
    module.to(device).train()
    dev_batches = [to_device(b, device) for b in batches]
    flops, masked = 0.0, []
    for i, batch in enumerate(dev_batches[:n_warmup]):
        train_step(module, batch, i, autocast_dtype=autocast_dtype)
    sync(device)
    t0 = time.perf_counter()
    for i, batch in enumerate(dev_batches[n_warmup:]):
        m = train_step(module, batch, 1000 + i, autocast_dtype=autocast_dtype)
        b, length, _ = batch_shape(batch)
        flops += 3 * (layer_flops(b, length, d, ffn, n_layers) + head_flops(m, d, vocab))
        masked.append(m)
    sync(device)
    dt = time.perf_counter() - t0
    res["fwd_bwd_s_per_batch"] = dt / n_steps
    res["fwd_bwd_cells_s"] = n_steps * BATCH_SIZE / dt
    res["fwd_bwd_flops"] = flops / dt
    res["mean_M"] = float(np.mean(masked))
    del dev_batches

    # (c) full step: loader (tokenisation) + transfer + fwd + bwd + AdamW
    optimizer = build_adamw({"model": (module, 1e-4)}, weight_decay=0.01)
    data_time, flops = 0.0, 0.0
    loader = iter(model._loader(adata, idx, batch_size=BATCH_SIZE))
    for i in range(n_batches):
        if i == n_warmup:
            sync(device)
            t_start, data_time, flops = time.perf_counter(), 0.0, 0.0
        t0 = time.perf_counter()
        batch = to_device(next(loader), device)
        data_time += time.perf_counter() - t0
        m = train_step(module, batch, 2000 + i, optimizer, autocast_dtype)
        b, length, _ = batch_shape(batch)
        flops += 3 * (layer_flops(b, length, d, ffn, n_layers) + head_flops(m, d, vocab))
    sync(device)
    dt = time.perf_counter() - t_start
    res["step_s_per_batch"] = dt / n_steps
    res["step_cells_s"] = n_steps * BATCH_SIZE / dt
    res["step_flops"] = flops / dt
    res["data_share_in_step"] = data_time / dt
    del optimizer
    module.zero_grad(set_to_none=True)

    # (d) embedding (inference mode, no masking, no head), batch size 32
    emb_idx = order[: max(n_steps, 2) * BATCH_SIZE]
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        model.get_latent_representation(indices=order[:BATCH_SIZE], batch_size=BATCH_SIZE)
        sync(device)
        t0 = time.perf_counter()
        emb = model.get_latent_representation(indices=emb_idx, batch_size=BATCH_SIZE)
        sync(device)
    dt = time.perf_counter() - t0
    emb_flops = sum(
        layer_flops(*batch_shape(b)[:2], d, ffn, n_layers)
        for b in model._loader(adata, emb_idx, batch_size=BATCH_SIZE)
    )
    res["embed_cells_s"] = emb.shape[0] / dt
    res["embed_flops"] = emb_flops / dt
    res["peak_rss_mib"] = peak_rss_mib()
    res["label"] = label
    res["breakdown"] = flop_breakdown(
        BATCH_SIZE, round(res["mean_L"]), round(res["mean_M"]), d, ffn, n_layers, vocab
    )
    return res


def profile_step(model, adata, order, n_rows: int = 18) -> None:
    """Operator-level CPU profile of one forward + backward + AdamW step."""
    from torch.profiler import ProfilerActivity, profile

    module = model.module.cpu().train()
    batch = next(iter(model._loader(adata, order[:BATCH_SIZE], batch_size=BATCH_SIZE)))
    optimizer = build_adamw({"model": (module, 1e-4)}, weight_decay=0.01)
    train_step(module, batch, 0, optimizer)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_step(module, batch, 1, optimizer)
    print("\nOperator profile of one CPU training step (self CPU time, top ops):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=n_rows))


# ---------------------------------------------------------------------------------- report
def print_report(res: dict, mm_ffn: float, mm_sq: float, device_name: str) -> None:
    g = 1e9
    print(f"\n=== {res['label']} on {device_name} ===")
    print(
        f"mean padded length L = {res['mean_L']:.0f} tokens, real tokens "
        f"{100 * res['real_token_frac']:.1f}% of B*L, mean masked targets M = "
        f"{res['mean_M']:.0f}/batch"
    )
    rows = [
        (
            "(a) data only (slice + tokenise)",
            BATCH_SIZE / res["data_s_per_batch"],
            res["data_s_per_batch"],
            None,
        ),
        (
            "(b) forward + backward",
            res["fwd_bwd_cells_s"],
            res["fwd_bwd_s_per_batch"],
            res["fwd_bwd_flops"],
        ),
        (
            "(c) full step (data+fwd+bwd+AdamW)",
            res["step_cells_s"],
            res["step_s_per_batch"],
            res["step_flops"],
        ),
        (
            "(d) embedding (inference)",
            res["embed_cells_s"],
            BATCH_SIZE / res["embed_cells_s"],
            res["embed_flops"],
        ),
    ]
    print(
        f"{'phase':38s} {'cells/s':>9s} {'s/batch':>9s} {'GFLOP/s':>9s} "
        f"{'/mm(T,d,f)':>11s} {'/mm 2048^3':>11s}"
    )
    for name, cps, spb, fl in rows:
        if fl is None:
            print(f"{name:38s} {cps:9.1f} {spb:9.3f} {'-':>9s} {'-':>11s} {'-':>11s}")
        else:
            print(
                f"{name:38s} {cps:9.1f} {spb:9.3f} {fl / g:9.1f} "
                f"{100 * fl / mm_ffn:10.1f}% {100 * fl / mm_sq:10.1f}%"
            )
    print(f"matmul reference: (T,d)@(d,f) {mm_ffn / g:.1f} GFLOP/s, 2048^3 {mm_sq / g:.1f} GFLOP/s")
    print(
        f"data share of the full step: {100 * res['data_share_in_step']:.1f}% "
        f"(target < 10%); standalone data time / step time: "
        f"{100 * res['data_s_per_batch'] / res['step_s_per_batch']:.1f}%"
    )
    fwd_bwd_ratio = res["fwd_bwd_flops"] / mm_ffn
    print(
        f"forward+backward efficiency vs (T,d)@(d,f) matmul: {100 * fwd_bwd_ratio:.1f}% "
        f"(target >= 50%)"
    )
    total = sum(res["breakdown"].values())
    parts = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in res["breakdown"].items())
    print(f"counted FLOPs per training step: {3 * total / 1e12:.3f} TFLOP ({parts})")
    print(f"peak RSS so far: {res['peak_rss_mib']:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per phase")
    parser.add_argument("--gpu-steps", type=int, default=20, help="timed steps on the GPU")
    parser.add_argument("--no-profile", action="store_true", help="skip the operator profile")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("scvi").setLevel(logging.ERROR)
    logging.getLogger("scforge_scvi").setLevel(logging.ERROR)
    torch.manual_seed(args.seed)

    t_load = time.perf_counter()
    adata, source = load_data()
    ScForge.setup_anndata(adata)
    model = ScForge(adata, dropout=0.1, **ARCH)
    n_params = sum(p.numel() for p in model.module.parameters())
    print(
        f"data: {source}, {adata.n_obs} cells x {adata.n_vars} genes; vocabulary "
        f"{model.backbone_config.vocab_size} tokens; {n_params / 1e6:.2f} M parameters; "
        f"setup {time.perf_counter() - t_load:.1f} s; peak RSS after setup "
        f"{peak_rss_mib():.0f} MiB"
    )
    print(
        f"architecture: {ARCH}, batch {BATCH_SIZE}, dropout 0.1, fp32; torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; warm-up {args.warmup}, "
        f"timed steps {args.steps}"
    )
    order = np.random.default_rng(args.seed).permutation(adata.n_obs)

    cpu = torch.device("cpu")
    # reference matmuls first, with the same thread count the model uses
    probe = next(iter(model._loader(adata, order[:BATCH_SIZE], batch_size=BATCH_SIZE)))
    tokens = probe["gene_ids"].numel()
    cfg = model.backbone_config
    mm_ffn = matmul_flops_per_s(tokens, cfg.hidden_dim, cfg.resolved_ffn_dim, cpu, torch.float32)
    mm_sq = matmul_flops_per_s(2048, 2048, 2048, cpu, torch.float32)
    res = run_suite(model, adata, order, cpu, args.warmup, args.steps, None, "fp32 CPU")
    print_report(res, mm_ffn, mm_sq, f"CPU ({torch.get_num_threads()} threads)")
    if not args.no_profile:
        profile_step(model, adata, order)

    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        n_gpu = min(args.gpu_steps, adata.n_obs // BATCH_SIZE - 3)
        mm_ffn = matmul_flops_per_s(
            tokens, cfg.hidden_dim, cfg.resolved_ffn_dim, gpu, torch.bfloat16
        )
        mm_sq = matmul_flops_per_s(2048, 2048, 2048, gpu, torch.bfloat16)
        res = run_suite(model, adata, order, gpu, 3, n_gpu, torch.bfloat16, "bf16 autocast GPU")
        res["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        print_report(res, mm_ffn, mm_sq, torch.cuda.get_device_name())
        print(
            f"peak GPU memory allocated: {res['peak_gpu_mib']:.0f} MiB (matmul references in bf16)"
        )
    else:
        print("\nNo CUDA device: bf16 GPU figures skipped.")


if __name__ == "__main__":
    main()
