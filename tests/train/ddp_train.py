"""Fine-tune on streamed shards, in one process or under ``torchrun`` (DDP over gloo).

Used by ``test_ddp.py``; also a minimal example of a multi-process launch::

    torchrun --nproc_per_node 2 tests/train/ddp_train.py OUT SHARD [SHARD ...] --devices 2

With ``--backed`` the model is registered on ``anndata.read_h5ad(SHARD, backed="r")`` and
trained without ``data=``: under DDP the backed file is streamed like ``StreamedCells(SHARD)``.

Every rank writes the global indices of the training cells it saw to ``OUT/seen_rank{r}.npy``;
rank 0 writes the initial and final weights to ``OUT/initial.safetensors`` and
``OUT/weights.safetensors``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import anndata as ad
import numpy as np
import torch
from lightning.pytorch import Callback
from safetensors.torch import save_file

import scforge_scvi as sf
from scforge_scvi.data import StreamedCells
from scforge_scvi.data._streaming import CELL_INDEX_KEY


class SeenCells(Callback):
    """Record the cells of every training batch on this rank."""

    def __init__(self) -> None:
        self.seen: list[np.ndarray] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append(batch[CELL_INDEX_KEY].view(-1).cpu().numpy())


def _state(model) -> dict:
    return {k: v.detach().clone().contiguous() for k, v in model.module.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("shards", nargs="+")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8, help="cells per step per process")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--buffer-size", type=int, default=64)
    parser.add_argument(
        "--backed", action="store_true", help="register the backed file, train without data="
    )
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.backed:
        (shard,) = args.shards
        cells = None
        adata = ad.read_h5ad(shard, backed="r")
    else:
        cells = StreamedCells(args.shards, chunk_size=args.chunk_size, buffer_size=args.buffer_size)
        adata = cells.sample(cells.n_obs, seed=0)
    sf.ScForge.setup_anndata(adata, labels_key="louvain")
    model = sf.ScForge(
        adata,
        hidden_dim=16,
        num_layers=1,
        num_heads=2,
        max_genes=32,
        dropout=0.0,
        head_dropout=0.0,
        architecture={"ffn_dim": 32},
    )
    rank = int(os.environ.get("RANK", 0))
    args.out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        save_file(_state(model), str(args.out / "initial.safetensors"))
    seen = SeenCells()
    model.train(
        max_epochs=args.epochs,
        data=cells,
        batch_size=args.batch_size,
        train_size=0.8,
        validation_size=0.2,
        accelerator="cpu",
        devices=args.devices,
        distributed="ddp" if args.devices > 1 else "auto",
        callbacks=[seen],
        enable_progress_bar=False,
        logger=False,
        plan_kwargs={"lr": 1e-3},
    )
    np.save(args.out / f"seen_rank{rank}.npy", np.concatenate(seen.seen))
    if rank == 0:
        np.save(args.out / "train_cells.npy", model.train_indices_)
        save_file(_state(model), str(args.out / "weights.safetensors"))


if __name__ == "__main__":
    main()
