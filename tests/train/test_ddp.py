"""DDP on the CPU: two processes (gloo) over streamed shards train like one process with
the same global batch, each on its own half of every batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
from safetensors.numpy import load_file

SCRIPT = Path(__file__).with_name("ddp_train.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.skipif(not dist.is_gloo_available(), reason="torch was built without gloo")
def test_two_process_ddp_matches_one_process(pbmc68k_counts, tmp_path):
    adata = pbmc68k_counts
    del adata.layers["counts"]
    shards = [str(tmp_path / "a.h5ad"), str(tmp_path / "b.h5ad")]
    adata[:350].write_h5ad(shards[0])
    adata[350:].write_h5ad(shards[1])

    single, ddp = tmp_path / "single", tmp_path / "ddp"
    _run([sys.executable, str(SCRIPT), str(single), *shards, "--batch-size", "16"], tmp_path)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launcher += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    _run(
        [*launcher, str(SCRIPT), str(ddp), *shards, "--devices", "2", "--batch-size", "8"], tmp_path
    )

    train_cells = np.load(single / "train_cells.npy")
    one = np.load(single / "seen_rank0.npy")
    rank0, rank1 = np.load(ddp / "seen_rank0.npy"), np.load(ddp / "seen_rank1.npy")
    epochs = 2
    assert len(rank0) == len(rank1) == len(one) // 2  # the same number of steps
    for e in range(epochs):  # per epoch: disjoint halves that together are the whole
        part = slice(e * len(rank0) // epochs, (e + 1) * len(rank0) // epochs)
        assert not np.intersect1d(rank0[part], rank1[part]).size
        np.testing.assert_array_equal(np.sort(np.r_[rank0[part], rank1[part]]), train_cells)

    a, b = (
        load_file(str(single / "weights.safetensors")),
        load_file(str(ddp / "weights.safetensors")),
    )
    start = load_file(str(single / "initial.safetensors"))
    assert a.keys() == b.keys() == start.keys()
    for key in a:
        np.testing.assert_allclose(b[key], a[key], atol=1e-4, err_msg=key)
    moved = max(float(np.abs(a[k] - start[k]).max()) for k in a)
    assert moved > 100 * 1e-4  # training changed the weights far beyond the tolerance


@pytest.mark.skipif(not dist.is_gloo_available(), reason="torch was built without gloo")
def test_backed_anndata_trains_under_ddp_like_streamed_cells(pbmc68k_counts, tmp_path):
    """train(distributed="ddp") on a backed AnnData streams its file: two processes train
    like one process given data=StreamedCells(the file), each rank on half of every batch."""
    adata = pbmc68k_counts[:320].copy()
    del adata.layers["counts"]
    shard = str(tmp_path / "cells.h5ad")
    adata.write_h5ad(shard)
    streamed, backed = tmp_path / "streamed", tmp_path / "backed"
    # StreamedCells' default chunk and buffer sizes: what a backed AnnData is streamed with
    common = ["--epochs", "1", "--chunk-size", "256", "--buffer-size", "8192"]
    _run(
        [sys.executable, str(SCRIPT), str(streamed), shard, "--batch-size", "16", *common], tmp_path
    )
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launcher += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    _run(
        [*launcher, str(SCRIPT), str(backed), shard, "--backed", "--devices", "2",
         "--batch-size", "8", *common],
        tmp_path,
    )  # fmt: skip

    train_cells = np.load(streamed / "train_cells.npy")
    np.testing.assert_array_equal(np.load(backed / "train_cells.npy"), train_cells)
    rank0, rank1 = np.load(backed / "seen_rank0.npy"), np.load(backed / "seen_rank1.npy")
    assert len(rank0) == len(rank1) == len(train_cells) // 2
    assert not np.intersect1d(rank0, rank1).size
    np.testing.assert_array_equal(np.sort(np.r_[rank0, rank1]), train_cells)

    a = load_file(str(streamed / "weights.safetensors"))
    b = load_file(str(backed / "weights.safetensors"))
    start = load_file(str(backed / "initial.safetensors"))
    same_start = load_file(str(streamed / "initial.safetensors"))
    assert a.keys() == b.keys() == start.keys()
    for key in a:
        np.testing.assert_array_equal(start[key], same_start[key], err_msg=key)
        np.testing.assert_allclose(b[key], a[key], atol=1e-4, err_msg=key)
    assert max(float(np.abs(b[k] - start[k]).max()) for k in b) > 20 * 1e-4  # one epoch moved
