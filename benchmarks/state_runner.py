"""Train Arc's State Transition model on a split written by ``benchmarks/perturbation.py``.

Runs with the Python of a separate virtual environment that has the ``arc-state`` package
(never ScForge's environment)::

    python -m venv /tmp/state-venv
    /tmp/state-venv/bin/pip install torch==2.13.0 && /tmp/state-venv/bin/pip install arc-state
    /tmp/state-venv/bin/python benchmarks/state_runner.py --data DIR --out DIR

``DIR`` (``--data``) holds what ``benchmarks/perturbation.py --state-python ...`` writes:

- ``screen/train.h5ad``: the training and validation cells (the held-out test perturbations
  have no cells there), log1p-normalised expression in ``X`` (CSR), the perturbation, cell
  type and a single batch column in ``obs``;
- ``features.csv``: the perturbation feature table, one row per perturbation (test ones too);
- ``split.json``: column names, control label, validation and test perturbations, cell types.

Training goes through State's own command line (``state tx train`` with Hydra overrides):
the data are read by cell-load from a TOML that puts the validation perturbations of every
cell type in its few-shot ``val`` split, the perturbations are read through
``perturbation_features_file`` (State's feature-table input, the one its zero-shot
perturbation runs use), and a small State model (the ``state_sm`` config, shrunk to fit two
shared CPU cores) predicts log1p expression directly (``embed_key=null``,
``output_space=gene``). The checkpoint with the lowest validation loss is kept, as for
ScForgePerturb.

Prediction does what ``ScForgePerturb.predict(n_cells="controls")`` does: every control cell
of a cell type is perturbed once by every test perturbation, in sets of ``cell_set_len``
cells, through the model's own ``forward``. ``pred.h5ad`` holds the predicted cells and the
real controls (log1p); metrics are computed by ``benchmarks/perturbation.py`` in ScForge's
environment, with the same code as for every other method.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch


def _toml_string(value: str) -> str:
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_toml(data: Path, split: dict, path: Path) -> None:
    """cell-load's experiment TOML: one training dataset, validation perturbations few-shot."""
    lines = ["[datasets]", f"screen = {_toml_string(data / 'screen')}", "", "[training]"]
    lines += ['screen = "train"', "", "[zeroshot]", "", "[fewshot]"]
    val = "[" + ", ".join(_toml_string(p) for p in split["val"]) + "]"
    for cell_type in split["cell_types"]:
        lines.append(f"{_toml_string('screen.' + cell_type)} = {{ val = {val}, test = [] }}")
    path.write_text("\n".join(lines) + "\n")


def train(args: argparse.Namespace, split: dict, work: Path) -> Path:
    """``state tx train`` with a small configuration; returns the run directory."""
    features = pd.read_csv(args.data / "features.csv", index_col=0)
    features.index = features.index.astype(str)
    table = {
        p: torch.tensor(row, dtype=torch.float32)
        for p, row in zip(features.index, features.to_numpy())
    }
    torch.save(table, work / "pert_features.pt")
    write_toml(args.data, split, work / "experiment.toml")
    d = args.hidden_dim
    heads = args.heads
    overrides = [
        "model=state_sm",
        f"name={args.name}",
        f"output_dir={work}",
        "overwrite=true",
        "use_wandb=false",
        f"data.kwargs.toml_config_path={work / 'experiment.toml'}",
        f"data.kwargs.pert_col={split['perturbation_key']}",
        f"data.kwargs.cell_type_key={split['cell_type_key']}",
        f"data.kwargs.batch_col={split['batch_key']}",
        f"data.kwargs.control_pert={split['control_label']}",
        f"data.kwargs.perturbation_features_file={work / 'pert_features.pt'}",
        "data.kwargs.embed_key=null",
        "data.kwargs.output_space=gene",
        "data.kwargs.num_workers=0",
        "data.kwargs.pin_memory=false",
        "data.kwargs.basal_mapping_strategy=random",
        f"model.kwargs.cell_set_len={args.cell_set_len}",
        f"model.kwargs.hidden_dim={d}",
        f"model.kwargs.n_encoder_layers={args.mlp_layers}",
        f"model.kwargs.n_decoder_layers={args.mlp_layers}",
        f"model.kwargs.transformer_backbone_kwargs.intermediate_size={4 * d}",
        f"model.kwargs.transformer_backbone_kwargs.num_hidden_layers={args.layers}",
        f"model.kwargs.transformer_backbone_kwargs.num_attention_heads={heads}",
        f"model.kwargs.transformer_backbone_kwargs.num_key_value_heads={heads}",
        f"model.kwargs.transformer_backbone_kwargs.head_dim={d // heads}",
        f"training.max_steps={args.max_steps}",
        f"training.val_freq={args.val_freq}",
        f"training.ckpt_every_n_steps={args.val_freq}",
        f"training.batch_size={args.sets_per_batch}",
        f"training.lr={args.lr}",
        f"training.train_seed={args.seed}",
        "training.devices=1",
        "~training.cumulative_flops_use_backward",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="disabled")
    command = [sys.executable, "-m", "state", "tx", "train", *overrides]
    print("Running:", " ".join(command), flush=True)
    with open(work / "train.log", "w") as log:
        done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = (work / "train.log").read_text().splitlines()[-40:]
        raise RuntimeError("state tx train failed:\n" + "\n".join(tail))
    return work / args.name


def load_model(run: Path):
    from state.tx.models.state_transition import StateTransitionPerturbationModel

    checkpoints = run / "checkpoints"
    path = checkpoints / "best.ckpt"
    if not path.exists():
        path = checkpoints / "last.ckpt"
    model = StateTransitionPerturbationModel.load_from_checkpoint(
        str(path), map_location="cpu", weights_only=False
    )
    model.eval()
    return model, path


@torch.no_grad()
def predict(model, cells: ad.AnnData, split: dict, features: pd.DataFrame, seed: int) -> ad.AnnData:
    """Perturb every control cell of every cell type once by every test perturbation."""
    pert_key, ct_key, control = (
        split["perturbation_key"],
        split["cell_type_key"],
        split["control_label"],
    )
    set_len = int(model.cell_sentence_len)
    rng = np.random.default_rng(seed)
    x = cells.X.toarray() if sp.issparse(cells.X) else np.asarray(cells.X)
    x = x.astype(np.float32)
    is_control = (cells.obs[pert_key].astype(str) == control).to_numpy()
    types = cells.obs[ct_key].astype(str).to_numpy()
    blocks, obs = [], []
    for cell_type in split["cell_types"]:
        pool = np.flatnonzero(is_control & (types == cell_type))
        for pert in split["test"]:
            order = rng.permutation(pool)
            n_sets = -(-len(order) // set_len)
            pad = rng.choice(pool, size=n_sets * set_len - len(order), replace=True)
            rows = np.concatenate([order, pad])
            basal = torch.from_numpy(x[rows])
            vector = torch.tensor(features.loc[pert].to_numpy(), dtype=torch.float32)
            out = []
            for start in range(0, n_sets, 64):
                chunk = basal[start * set_len : (start + 64) * set_len]
                batch = {"ctrl_cell_emb": chunk, "pert_emb": vector.expand(len(chunk), -1).clone()}
                result = model.forward(batch, padded=True)
                result = result[0] if isinstance(result, tuple) else result
                out.append(result.reshape(len(chunk), -1).cpu().numpy())
            blocks.append(np.concatenate(out)[: len(order)])
            obs += [(pert, cell_type)] * len(order)
    controls = np.flatnonzero(is_control)
    blocks.append(x[controls])
    obs += list(zip([control] * len(controls), types[controls]))
    frame = pd.DataFrame(
        obs, columns=[pert_key, ct_key], index=[f"cell{i}" for i in range(len(obs))]
    )
    return ad.AnnData(
        X=np.clip(np.concatenate(blocks), 0.0, None).astype(np.float32),
        obs=frame,
        var=cells.var.copy(),
    )


def validation_curve(run: Path) -> dict:
    """The step with the lowest validation loss and that loss (from Lightning's CSV log)."""
    frames = [pd.read_csv(path) for path in sorted(run.glob("version_*/metrics.csv"))]
    if not frames or "val_loss" not in frames[-1]:
        return {}
    val = frames[-1].dropna(subset=["val_loss"])
    if val.empty:
        return {}
    best = val.loc[val["val_loss"].idxmin()]
    return {
        "best_step": int(best["step"]) + 1,
        "best_val_loss": float(best["val_loss"]),
        "n_validations": len(val),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--name", default="state_run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--val-freq", type=int, default=50)
    parser.add_argument("--sets-per-batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--cell-set-len", type=int, default=32)
    parser.add_argument("--hidden-dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--mlp-layers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.data, args.out = args.data.resolve(), args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    split = json.loads((args.data / "split.json").read_text())
    start = time.perf_counter()
    run = train(args, split, args.out)
    train_s = time.perf_counter() - start
    model, checkpoint = load_model(run)
    features = pd.read_csv(args.data / "features.csv", index_col=0)
    features.index = features.index.astype(str)
    cells = ad.read_h5ad(args.data / "screen" / "train.h5ad")
    pred = predict(model, cells, split, features, args.seed)
    pred.write_h5ad(args.out / "pred.h5ad")
    info = {
        "train_s": train_s,
        "checkpoint": checkpoint.name,
        **validation_curve(run),
        "versions": {
            p: metadata.version(p) for p in ("arc-state", "cell-load", "torch", "lightning")
        },
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "n_parameters": int(sum(p.numel() for p in model.parameters())),
    }
    (args.out / "state_info.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
