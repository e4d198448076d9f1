"""The ``scforge`` command line, run on the tutorial's own configs over real PBMC counts.

The tutorial configs are used unchanged apart from tiny-model ``--set`` overrides (for speed).
The pretrain -> finetune chain runs in subprocesses, from files only; everything else calls
``main([...])`` in-process with the working directory set to a temporary project folder that
holds ``./data/pbmc3k.h5ad`` as the tutorial expects (here: pbmc68k_reduced's raw counts).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from scforge_scvi.cli import main
from scforge_scvi.config import ScForgeConfig
from scforge_scvi.data import pbmc68k_counts

CONFIGS = Path(__file__).parents[1] / "config"
TINY = [
    "model.hidden_dim=32",
    "model.num_layers=1",
    "model.num_heads=2",
    "tokenizer.max_genes=65",
    "model.max_seq_len=65",
    "data.max_genes=65",
    "training.max_epochs=1",
    "training.batch_size=64",
    "data.num_workers=0",
]


def _scforge_subprocess(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scforge_scvi.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project folder: the tutorial's data file and configs, a pretrained and a fine-tuned run.

    ``scforge pretrain`` writes ``checkpoints/pretrain``; ``scforge finetune --checkpoint
    checkpoints/pretrain/best.ckpt`` (the tutorial's full config) writes
    ``checkpoints/cell_type``. Both run as subprocesses.
    """
    root = tmp_path_factory.mktemp("project")
    (root / "data").mkdir()
    adata = pbmc68k_counts()
    del adata.layers["counts"]  # raw counts in X, like the tutorial's file
    adata.write_h5ad(root / "data" / "pbmc3k.h5ad")
    for name in ("tutorial_finetune_full", "tutorial_finetune_lora", "tutorial_eval"):
        shutil.copy(CONFIGS / f"{name}.yaml", root / f"{name}.yaml")
    pretrain = _scforge_subprocess(
        root,
        "pretrain",
        "--config",
        "tutorial_finetune_full.yaml",
        "--set",
        *TINY,
        "training.checkpoint_dir=checkpoints/pretrain",
    )
    assert pretrain.returncode == 0, pretrain.stderr[-3000:]
    finetune = _scforge_subprocess(
        root,
        "finetune",
        "--config",
        "tutorial_finetune_full.yaml",
        "--checkpoint",
        "checkpoints/pretrain/best.ckpt",
        "--set",
        *TINY,
        "training.max_epochs=2",
        "finetune.freeze_backbone_epochs=1",
    )
    assert finetune.returncode == 0, finetune.stderr[-3000:]
    (root / "finetune_stderr.txt").write_text(finetune.stderr)
    return root


@pytest.fixture
def in_project(project: Path, monkeypatch) -> Path:
    monkeypatch.chdir(project)
    return project


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("scforge ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# -- runs from files -------------------------------------------------------------------------
def test_pretrain_then_finetune_writes_run_directories(project: Path):
    for run in ("pretrain", "cell_type"):
        run_dir = project / "checkpoints" / run
        for name in ("config.yaml", "metrics.csv", "best.ckpt", "last.ckpt", "best/config.json"):
            assert (run_dir / name).exists(), f"{run}/{name} missing"
    metrics = pd.read_csv(project / "checkpoints/cell_type/metrics.csv", index_col="epoch")
    assert list(metrics.index) == [0, 1]
    assert {"val_loss", "val_acc", "train_loss_epoch"} <= set(metrics.columns)
    saved = ScForgeConfig.from_yaml(project / "checkpoints/cell_type/config.yaml")
    assert saved.finetune.strategy == "gradual_unfreeze"
    assert saved.model.hidden_dim == 32 and saved.training.max_epochs == 2
    assert "Unfreezing backbone at epoch 1" in (project / "finetune_stderr.txt").read_text()


def test_checkpoint_initialises_weights_only(project: Path):
    """--checkpoint starts a fresh optimizer and schedule: steps count from 0 in the new run."""
    pre = torch.load(project / "checkpoints/pretrain/last.ckpt", weights_only=True)
    fine = torch.load(project / "checkpoints/cell_type/last.ckpt", weights_only=True)
    steps_per_epoch = pre["global_step"]  # pretraining ran one epoch on the same cells
    assert fine["global_step"] == 2 * steps_per_epoch
    assert fine["lr_schedulers"][0]["last_epoch"] == 2 * steps_per_epoch
    # the tutorial's 500 warm-up steps outlast the fresh run: the head never reaches its peak
    assert fine["lr_schedulers"][0]["_last_lr"][-1] < 1e-3


def test_finetune_lora_tutorial_config(in_project: Path, capsys):
    code, _, err = _run(
        capsys,
        "finetune",
        "--config",
        "tutorial_finetune_lora.yaml",
        "--checkpoint",
        "checkpoints/pretrain/best",
        "--set",
        *TINY,
        "training.checkpoint_dir=checkpoints/lora",
    )
    assert code == 0, err
    assert (in_project / "checkpoints/lora/best/model.safetensors").exists()
    assert ScForgeConfig.from_yaml("checkpoints/lora/config.yaml").finetune.strategy == "lora"


def test_resume_continues_the_same_run(in_project: Path, capsys):
    args = ["pretrain", "--config", "tutorial_finetune_full.yaml", "--set", *TINY]
    run = "training.checkpoint_dir=checkpoints/resumable"
    assert _run(capsys, *args, run)[0] == 0
    first = torch.load("checkpoints/resumable/last.ckpt", weights_only=True)["global_step"]
    # a different learning rate is a different run: refused
    code, _, err = _run(
        capsys, *args, run, "training.optimizer.lr=1e-3", "--resume", "checkpoints/resumable"
    )
    assert code == 2 and "training.optimizer.lr" in _error_line(err)
    code, _, err = _run(
        capsys, *args, run, "training.max_epochs=2", "--resume", "checkpoints/resumable"
    )
    assert code == 0, err
    last = torch.load("checkpoints/resumable/last.ckpt", weights_only=True)
    assert last["global_step"] == 2 * first and last["epoch"] == 1
    metrics = pd.read_csv("checkpoints/resumable/metrics.csv")
    assert len(metrics) >= 1


# -- applying a model ------------------------------------------------------------------------
def test_embed_and_predict_write_anndata(in_project: Path, capsys):
    model = "checkpoints/cell_type/best"
    code, _, err = _run(
        capsys, "embed", "--model", model, "--input", "data/pbmc3k.h5ad", "--output", "emb.h5ad"
    )
    assert code == 0, err
    embedded = ad.read_h5ad("emb.h5ad")
    assert embedded.obsm["X_scforge"].shape == (700, 32)
    assert np.isfinite(embedded.obsm["X_scforge"]).all()
    code, _, err = _run(
        capsys, "predict", "--model", model, "--input", "data/pbmc3k.h5ad", "--output", "pred.h5ad"
    )
    assert code == 0, err
    predicted = ad.read_h5ad("pred.h5ad")
    classes = set(predicted.obs["louvain"].astype(str))
    assert set(predicted.obs["scforge_prediction"].astype(str)) <= classes
    assert predicted.obsm["scforge_probabilities"].shape == (700, len(classes))
    assert "_scforge_query_labels" not in predicted.obs
    assert predicted.obs["scforge_unknown_score"].between(0, 1).all()


def test_predict_writes_prediction_sets_and_unknown_cells(in_project: Path, capsys):
    args = ["predict", "--model", "checkpoints/cell_type/best", "--input", "data/pbmc3k.h5ad"]
    code, _, err = _run(
        capsys, *args, "--output", "sets.h5ad", "--coverage", "0.9", "--unknown-threshold", "0.99"
    )
    assert code == 0, err
    predicted = ad.read_h5ad("sets.h5ad")
    sizes = predicted.obs["scforge_prediction_set_size"]
    assert (sizes >= 0).all() and sizes.mean() >= 1
    unknown = predicted.obs["scforge_prediction"].astype(str) == "unknown"
    assert unknown.mean() < 0.1  # the cells of fine-tuning: known types
    code, _, err = _run(capsys, *args, "--output", "bad.h5ad", "--coverage", "1.5")
    assert code != 0 and "coverage=1.5 is not valid" in _error_line(err)
    assert not Path("bad.h5ad").exists()


def test_interrupted_write_keeps_the_previous_output(in_project: Path, capsys, monkeypatch):
    model = "checkpoints/cell_type/best"
    args = ("embed", "--model", model, "--input", "data/pbmc3k.h5ad", "--output", "kept.h5ad")
    assert _run(capsys, *args)[0] == 0
    before = Path("kept.h5ad").read_bytes()

    def half_then_fail(self, path, *a, **k):
        Path(path).write_bytes(before[: len(before) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        main([*args, "--overwrite", "--key-added", "X_other"])
    assert Path("kept.h5ad").read_bytes() == before
    assert [p.name for p in Path().iterdir() if p.name.startswith(".kept")] == []


def test_benchmark_reports_model_and_baseline(in_project: Path, capsys):
    code, out, err = _run(
        capsys,
        "benchmark",
        "--config",
        "tutorial_eval.yaml",
        "--model",
        "checkpoints/cell_type/best.ckpt",
        "--output",
        "results.json",
        "--set",
        "data.paths=[data/pbmc3k.h5ad]",
        *[s for s in TINY if s.startswith(("model.", "tokenizer."))],
        "benchmarks=[{name: linear_probe, label_key: louvain, train_split: 0.0}, "
        "{name: linear_probe, label_key: louvain}, "
        "{name: embedding_quality, label_key: louvain}]",
    )
    assert code == 0, err
    results = json.loads(Path("results.json").read_text())["benchmarks"]
    head, probe, quality = results
    assert head["scforge"]["n_cells"] == 700 and 0 <= head["scforge"]["accuracy"] <= 1
    # the honest baseline: logistic regression on log-normalised genes separates PBMCs well
    assert probe["baseline_logreg"]["accuracy"] > 0.8
    assert probe["scforge"]["n_cells"] == probe["baseline_logreg"]["n_cells"] == 140
    assert {"nmi_kmeans", "ari_leiden", "silhouette_label"} <= set(quality["scforge"])
    assert "baseline_logreg" in out and "linear_probe" in out


def test_export_turns_checkpoint_into_pretrained_directory(in_project: Path, capsys):
    from scforge_scvi.io import read_pretrained

    code, _, err = _run(
        capsys, "export", "--model", "checkpoints/pretrain/last.ckpt", "--output", "exported"
    )
    assert code == 0, err
    exported = read_pretrained("exported")
    original = read_pretrained("checkpoints/pretrain/last.ckpt")
    assert exported.state_dict.keys() == original.state_dict.keys()
    assert all(torch.equal(exported.state_dict[k], v) for k, v in original.state_dict.items())


def test_preprocess_keeps_counts_and_selects_genes(in_project: Path, capsys):
    code, _, err = _run(
        capsys,
        "preprocess",
        "--input",
        "data/pbmc3k.h5ad",
        "--output",
        "pre.h5ad",
        "--set",
        "data.preprocessing.n_top_genes=200",
    )
    assert code == 0, err
    pre = ad.read_h5ad("pre.h5ad")
    assert pre.n_vars == 200
    counts = pre.layers["counts"]
    assert np.array_equal(counts.data, np.round(counts.data))
    assert pre.X.max() < 15  # log1p of counts per 10k


# -- bad input: one line on stderr, exit code 2, nothing written -------------------------------
@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--set", "data.paths=[data/absent.h5ad]"], "does not exist"),
        (["--set", "data.paths=[data/broken.h5ad]"], "cannot read"),
        (["--set", "finetune.label_key=cell_type"], "'cell_type' is not a column"),
        (["--set", "model.hidden_dim=64"], r"Checkpoint dimension mismatch.*hidden_dim\D+32\D+64"),
        (["--set", "data.streaming=true", "data.layer=spliced"], "Layer 'spliced' is not in"),
    ],
)
def test_finetune_bad_input(in_project: Path, capsys, extra, expected):
    Path("data/broken.h5ad").write_bytes(b"not an hdf5 file")
    code, _, err = _run(
        capsys,
        "finetune",
        "--config",
        "tutorial_finetune_full.yaml",
        "--checkpoint",
        "checkpoints/pretrain/best.ckpt",
        "--set",
        *TINY,
        "training.checkpoint_dir=checkpoints/never",
        *extra,
    )
    assert code == 2
    assert re.search(expected, _error_line(err))
    assert not Path("checkpoints/never").exists()


def test_finetune_streams_from_disk(in_project: Path, capsys, caplog, monkeypatch):
    """data.streaming: true trains on every cell read from the file in chunks."""
    monkeypatch.setattr(logging.getLogger("scforge_scvi"), "propagate", True)
    code, _, err = _run(
        capsys,
        "finetune",
        "--config",
        "tutorial_finetune_full.yaml",
        "--checkpoint",
        "checkpoints/pretrain/best.ckpt",
        "--set",
        *TINY,
        "training.checkpoint_dir=checkpoints/streamed",
        "data.streaming=true",
    )
    assert code == 0, err
    assert re.search(r"Streamed split: \d+ training, \d+ validation", caplog.text)
    assert (in_project / "checkpoints/streamed/best/model.safetensors").exists()
    metrics = pd.read_csv(in_project / "checkpoints/streamed/metrics.csv")
    assert {"val_loss", "val_acc"} <= set(metrics.columns)


def test_finetune_with_few_labels_leaves_unlabelled_cells_out(in_project: Path, capsys):
    """A label column that is mostly the unlabelled category fine-tunes on the labelled
    cells only; the unlabelled category never becomes a class."""
    from scforge_scvi.io import read_pretrained

    adata = ad.read_h5ad("data/pbmc3k.h5ad")
    rng = np.random.default_rng(0)
    labels = adata.obs["louvain"].astype(str).to_numpy()
    keep = np.concatenate([rng.choice(np.flatnonzero(labels == c), 3) for c in set(labels)])
    adata.obs["louvain"] = np.where(np.isin(np.arange(adata.n_obs), keep), labels, "unlabelled")
    adata.write_h5ad("data/few.h5ad")
    code, _, err = _run(
        capsys,
        "finetune",
        "--config",
        "tutorial_finetune_full.yaml",
        "--checkpoint",
        "checkpoints/pretrain/best.ckpt",
        "--set",
        *TINY,
        "training.checkpoint_dir=checkpoints/few",
        "data.paths=[./data/few.h5ad]",
        "finetune.unlabeled_category=unlabelled",
    )
    assert code == 0, err
    classes = read_pretrained(in_project / "checkpoints/few/best").class_names
    assert sorted(classes) == sorted(set(labels))


def test_existing_outputs_are_refused(in_project: Path, capsys):
    Path("taken.h5ad").write_text("keep me")
    code, _, err = _run(
        capsys,
        "embed",
        "--model",
        "checkpoints/cell_type/best",
        "--input",
        "data/pbmc3k.h5ad",
        "--output",
        "taken.h5ad",
    )
    assert code == 2 and "--overwrite" in _error_line(err)
    assert Path("taken.h5ad").read_text() == "keep me"
    before = Path("checkpoints/cell_type/metrics.csv").read_text()
    code, _, err = _run(
        capsys, "pretrain", "--config", "tutorial_finetune_full.yaml", "--set", *TINY,
        "training.checkpoint_dir=checkpoints/cell_type",
    )  # fmt: skip
    assert code == 2 and "already exists" in _error_line(err)
    assert Path("checkpoints/cell_type/metrics.csv").read_text() == before


@pytest.mark.parametrize(
    "command", ["preprocess", "pretrain", "finetune", "embed", "predict", "benchmark", "export"]
)
def test_every_command_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--output" in capsys.readouterr().out or command in ("pretrain", "finetune")
