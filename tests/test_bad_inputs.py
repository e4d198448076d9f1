"""Bad input through every entry point: a clear, one-line error and nothing written.

Each case feeds one bad input (a file, key, column, layer or value) to the command line or
to the Python API and checks that

* the command line exits with code 2 and prints a single ``scforge COMMAND: error: ...``
  line, without a traceback; the Python API raises one of the package's own errors
  (:class:`~scforge_scvi._errors.ScForgeError`, a ``ValueError`` or ``TypeError``);
* the message is one line that names the offending thing and says what would be valid
  (each case's pattern);
* no file was written or changed, in the project or in the case's own folder.

Set ``SCFORGE_BAD_INPUT_REPORT=FILE`` to append one JSON line per case (what was raised or
printed) to ``FILE``: the counts of clear errors and tracebacks in the changelog come from it.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import stat
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scforge_scvi import ScForge, ScForgePerturb, StreamedCells
from scforge_scvi._errors import ScForgeError
from scforge_scvi.cli import main
from scforge_scvi.config import ScForgeConfig
from scforge_scvi.data import GeneVocab
from scforge_scvi.data import pbmc68k_counts as load_pbmc68k

TINY = {  # the architecture of CONFIG below
    "tokenizer": "rank_value",
    "pooling": "cls",
    "hidden_dim": 16,
    "num_layers": 1,
    "num_heads": 2,
    "architecture": {"ffn_dim": 64},
    "max_genes": 32,
    "head_hidden_dim": 16,
}
CONFIG = """\
data:
  paths: [{data}]
  gene_vocab: data
  max_genes: 32
  num_workers: 0
tokenizer:
  strategy: rank_value
  max_genes: 32
model:
  hidden_dim: 16
  num_layers: 1
  num_heads: 2
  max_seq_len: 32
training:
  batch_size: 64
  max_epochs: 1
  precision: "32"
  accelerator: cpu
  checkpoint_dir: run
  val_split: 0.2
finetune:
  label_key: louvain
  head: {{hidden_dim: 16}}
"""
N_CELLS = 160


# -- the project: a data file, a model directory, a training checkpoint, a config ------------
@dataclass
class Project:
    root: Path
    data: Path  # raw counts in X, obs: louvain, bulk_labels, library (float), one_class
    model: Path  # pretrained directory (classifier over louvain)
    ckpt: Path  # best.ckpt of a short training run
    config: Path  # tiny YAML config reading `data`
    adata: ad.AnnData  # what `data` holds

    def cells(self) -> ad.AnnData:
        """A fresh in-memory copy of the data, not registered."""
        adata = self.adata.copy()
        for key in ("_scvi_uuid", "_scvi_manager_uuid"):
            adata.uns.pop(key, None)
        return adata


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    root = tmp_path_factory.mktemp("bad_inputs")
    adata = load_pbmc68k()[:N_CELLS].copy()
    del adata.layers["counts"]
    adata.obs["library"] = np.asarray(adata.X.sum(1)).ravel().astype(np.float64)
    adata.obs["one_class"] = "T cell"
    data = root / "cells.h5ad"
    adata.write_h5ad(data)
    labelled = adata.copy()
    ScForge.setup_anndata(labelled, labels_key="louvain")
    torch.manual_seed(0)
    model = ScForge(labelled, **TINY)
    model.train(
        max_epochs=1,
        batch_size=64,
        checkpoint_dir=str(root / "run"),
        accelerator="cpu",
        enable_progress_bar=False,
        logger=False,
    )
    model.save_pretrained(str(root / "model"))
    config = root / "tiny.yaml"
    config.write_text(CONFIG.format(data=data))
    return Project(root, data, root / "model", root / "run" / "best.ckpt", config, adata)


@dataclass
class Ctx:
    """What a case sees: the project and a folder of its own (the working directory)."""

    project: Project
    tmp: Path

    def h5ad(self, name: str, change: Callable[[ad.AnnData], ad.AnnData | None]) -> Path:
        """Write the project's cells, changed by ``change``, to ``tmp/name``."""
        adata = self.project.cells()
        changed = change(adata)
        path = self.tmp / name
        (adata if changed is None else changed).write_h5ad(path)
        return path

    def copy_model(self, name: str = "model") -> Path:
        import shutil

        return Path(shutil.copytree(self.project.model, self.tmp / name))

    def readonly_dir(self, monkeypatch) -> Path:
        """A folder no file can be created in (as the kernel tells a non-root user)."""
        path = self.tmp / "readonly"
        path.mkdir()
        path.chmod(stat.S_IRUSR | stat.S_IXUSR)
        if os.geteuid() == 0:  # root may write anywhere: answer like for any other user
            real = os.access

            def access(p, mode, *args, **kwargs):
                inside = Path(p).absolute() == path or path in Path(p).absolute().parents
                if inside and mode & os.W_OK:
                    return False
                return real(p, mode, *args, **kwargs)

            monkeypatch.setattr(os, "access", access)
        return path


def _x(adata: ad.AnnData) -> sp.csr_matrix:
    return sp.csr_matrix(adata.X, dtype=np.float32, copy=True)


def _set_x(adata: ad.AnnData, value: float, where: int = -1) -> None:
    x = _x(adata)
    x.data[where] = value
    adata.X = x


def _normalised(adata: ad.AnnData) -> None:
    x = _x(adata)
    x.data = np.log1p(x.data / 3.0)
    adata.X = x


def _layer_with_fractions(adata: ad.AnnData) -> None:
    x = _x(adata)
    x.data[5] = 0.5
    adata.layers["counts"] = x


def _rename_genes(adata: ad.AnnData, prefix: str = "NOT_A_GENE") -> None:
    adata.var_names = [f"{prefix}_{i}" for i in range(adata.n_vars)]


def _duplicate_genes(adata: ad.AnnData) -> None:
    names = adata.var_names.to_numpy().astype(object)
    names[1] = names[0]
    adata.var_names = names


def _registered(adata: ad.AnnData, **kwargs) -> ad.AnnData:
    ScForge.setup_anndata(adata, **kwargs)
    return adata


def _model(ctx: Ctx) -> ScForge:
    return ScForge.from_pretrained(str(ctx.project.model), _registered(ctx.project.cells()))


def _corrupt_weights(ctx: Ctx, keep: float | None) -> Path:
    model = ctx.copy_model()
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    if keep is None:  # same size, garbage inside
        weights.write_bytes(b"\x07" * 8 + os.urandom(len(data) - 8))
    else:
        weights.write_bytes(data[: int(len(data) * keep)])
    return model


def _foreign_ckpt(ctx: Ctx) -> Path:
    """A Lightning checkpoint of some other model (no scforge metadata)."""
    path = ctx.tmp / "other_model.ckpt"
    torch.save(
        {
            "epoch": 3,
            "global_step": 120,
            "state_dict": {"encoder.weight": torch.zeros(8, 4), "decoder.bias": torch.zeros(8)},
        },
        path,
    )
    return path


class _Exploit:
    """Unpickling this would create a file: the proof that nothing was unpickled."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def _pickle_ckpt(ctx: Ctx) -> Path:
    path = ctx.tmp / "model.ckpt"
    with path.open("wb") as f:
        pickle.dump({"state_dict": _Exploit(ctx.tmp / "PWNED")}, f)
    return path


def _yaml(ctx: Ctx, name: str, text: str) -> Path:
    path = ctx.tmp / name
    path.write_text(text)
    return path


def _shards_without_common_genes(ctx: Ctx) -> list[Path]:
    a = ctx.h5ad("a.h5ad", lambda x: x[:80].copy())
    b = ctx.h5ad("b.h5ad", lambda x: _renamed_copy(x[80:].copy()))
    return [a, b]


def _renamed_copy(adata: ad.AnnData) -> ad.AnnData:
    _rename_genes(adata, "OTHER")
    return adata


def _perturbation_cells(ctx: Ctx) -> ad.AnnData:
    adata = ctx.project.cells()
    adata.obs["guide"] = np.where(np.arange(adata.n_obs) % 2, "KO_CD3E", "KO_MS4A1")
    return adata


# -- the cases -------------------------------------------------------------------------------
@dataclass
class Case:
    """``run(ctx, monkeypatch)`` writes the case's bad files and returns the CLI arguments
    (command line) or the call that must raise (API)."""

    id: str
    kind: str  # "cli" or "api"
    run: Callable
    pattern: str


def cli(id: str, pattern: str):
    def wrap(run):
        CASES.append(Case(id, "cli", run, pattern))
        return run

    return wrap


def api(id: str, pattern: str):
    def wrap(run):
        CASES.append(Case(id, "api", run, pattern))
        return run

    return wrap


CASES: list[Case] = []


def _embed(ctx: Ctx, *, model=None, input=None, output=None, extra=()) -> list[str]:
    return [
        "embed",
        "--model",
        str(model or ctx.project.model),
        "--input",
        str(input or ctx.project.data),
        "--output",
        str(output or ctx.tmp / "out.h5ad"),
        *extra,
    ]


def _train(ctx: Ctx, command: str = "pretrain", *sets: str, config=None, extra=()) -> list[str]:
    argv = [command, "--config", str(config or ctx.project.config)]
    if command == "finetune" and not any(a in extra for a in ("--checkpoint", "--resume")):
        argv += ["--checkpoint", str(ctx.project.ckpt)]
    return [*argv, *extra, "--set", f"training.checkpoint_dir={ctx.tmp / 'run'}", *sets]


# counts ---------------------------------------------------------------------------------------
@cli("cli-normalised-counts", r"X contains non-integer values .*layer='counts'")
def _(ctx, mp):
    return _embed(ctx, input=ctx.h5ad("norm.h5ad", _normalised))


@api("api-normalised-counts", r"adata\.X contains non-integer values .*layer='counts'")
def _(ctx, mp):
    adata = ctx.project.cells()
    _normalised(adata)
    return lambda: ScForge.setup_anndata(adata)


@cli("cli-negative-counts", r"X contains negative values \(min -3\).*raw counts")
def _(ctx, mp):
    return _embed(ctx, input=ctx.h5ad("neg.h5ad", lambda a: _set_x(a, -3.0)))


@api("api-negative-counts", r"adata\.X contains negative values \(min -3\).*raw counts")
def _(ctx, mp):
    adata = ctx.project.cells()
    _set_x(adata, -3.0)
    return lambda: ScForge.setup_anndata(adata)


@cli("cli-nan-counts", r"X contains NaN or infinite values \(1 of .*raw UMI")
def _(ctx, mp):
    return _embed(ctx, input=ctx.h5ad("nan.h5ad", lambda a: _set_x(a, np.nan)))


@api("api-inf-counts", r"adata\.X contains NaN or infinite values \(1 of .*raw UMI")
def _(ctx, mp):
    adata = ctx.project.cells()
    _set_x(adata, np.inf, where=3)
    return lambda: ScForge.setup_anndata(adata)


@cli("cli-float-counts-in-layer", r"layers\['counts'\] contains non-integer values \(e\.g\. 0\.5\)")
def _(ctx, mp):
    return _embed(
        ctx, input=ctx.h5ad("frac.h5ad", _layer_with_fractions), extra=["--layer", "counts"]
    )


@api(
    "api-float-counts-in-layer",
    r"adata\.layers\['counts'\] contains non-integer values \(e\.g\. 0\.5\)",
)
def _(ctx, mp):
    adata = ctx.project.cells()
    _layer_with_fractions(adata)
    return lambda: ScForge.setup_anndata(adata, layer="counts")


@cli("cli-preprocess-negative-counts", r"X contains negative values.*raw counts")
def _(ctx, mp):
    bad = ctx.h5ad("neg.h5ad", lambda a: _set_x(a, -1.0))
    return ["preprocess", "--input", str(bad), "--output", str(ctx.tmp / "pre.h5ad")]


@api("api-backed-nan-counts", r"adata\.X \(backed by '.*nan\.h5ad'\) contains NaN")
def _(ctx, mp):
    path = ctx.h5ad("nan.h5ad", lambda a: _set_x(a, np.nan))
    return lambda: ScForge.setup_anndata(ad.read_h5ad(path, backed="r"))


@api("api-backed-subset", r"subset \(view\) of the backed file '.*cells\.h5ad'.*to_memory\(\)")
def _(ctx, mp):
    return lambda: ScForge.setup_anndata(ad.read_h5ad(ctx.project.data, backed="r")[:10])


# empty data and genes -------------------------------------------------------------------------
@cli("cli-empty-anndata", r"X is empty \(0 cells x \d+ genes\).*at least one cell")
def _(ctx, mp):
    return _embed(ctx, input=ctx.h5ad("empty.h5ad", lambda a: a[:0].copy()))


@api("api-empty-anndata", r"adata\.X is empty \(0 cells x \d+ genes\).*at least one cell")
def _(ctx, mp):
    return lambda: ScForge.setup_anndata(ctx.project.cells()[:0].copy())


@api("api-no-genes", r"adata\.X is empty \(\d+ cells x 0 genes\).*one gene")
def _(ctx, mp):
    return lambda: ScForge.setup_anndata(ctx.project.cells()[:, :0].copy())


@api(
    "api-no-gene-in-vocabulary",
    r"Only 0\.0% \(0 of \d+\) of the data's genes are in the vocabulary 'human_protein_coding'.*gene_key",
)
def _(ctx, mp):
    adata = ctx.project.cells()
    _rename_genes(adata)
    return lambda: ScForge(_registered(adata), vocab="human_protein_coding", **TINY)


@cli(
    "cli-no-gene-in-vocabulary",
    r"Only 0\.0% \(0 of \d+\) of the data's genes are in the vocabulary 'human_protein_coding'",
)
def _(ctx, mp):
    bad = ctx.h5ad("renamed.h5ad", _rename_genes)
    return _train(ctx, "pretrain", f"data.paths=[{bad}]", "data.gene_vocab=human_protein_coding")


@api("api-empty-vocabulary-file", r"'.*empty_vocab\.txt'.*no gene")
def _(ctx, mp):
    path = ctx.tmp / "empty_vocab.txt"
    path.write_text("\n")
    return lambda: GeneVocab.from_file(path)


@api("api-duplicated-var-names", r"adata\.var_names must be unique.*'HES4'.*var_names_make_unique")
def _(ctx, mp):
    adata = ctx.project.cells()
    _duplicate_genes(adata)
    return lambda: ScForge(_registered(adata), **TINY)


@cli("cli-duplicated-var-names", r"var_names must be unique.*'HES4'.*var_names_make_unique")
def _(ctx, mp):
    bad = ctx.h5ad("dup.h5ad", _duplicate_genes)
    return _train(ctx, "pretrain", f"data.paths=[{bad}]")


# labels ---------------------------------------------------------------------------------------
@api(
    "api-labels-one-class", r"labels_key='one_class' has a single class \('T cell'\).*at least two"
)
def _(ctx, mp):
    adata = _registered(ctx.project.cells(), labels_key="one_class")
    return lambda: ScForge(adata, **TINY).train(
        max_epochs=1, accelerator="cpu", enable_progress_bar=False
    )


@cli("cli-labels-one-class", r"'one_class' has a single class \('T cell'\).*at least two")
def _(ctx, mp):
    return _train(ctx, "finetune", "finetune.label_key=one_class")


@api("api-labels-of-floats", r"labels_key='library' is a column of floating-point.*target_key")
def _(ctx, mp):
    return lambda: ScForge.setup_anndata(ctx.project.cells(), labels_key="library")


@cli("cli-labels-of-floats", r"labels_key='library' is a column of floating-point.*target_key")
def _(ctx, mp):
    return _train(ctx, "finetune", "finetune.label_key=library")


@api(
    "api-missing-labels-column",
    r"labels_key='cell_type' is not a column of adata\.obs; available columns: \[.*'louvain'",
)
def _(ctx, mp):
    return lambda: ScForge.setup_anndata(ctx.project.cells(), labels_key="cell_type")


@api("api-missing-layer", r"Layer 'spliced' not found; available layers: \[\].*layer=None")
def _(ctx, mp):
    return lambda: ScForge.setup_anndata(ctx.project.cells(), layer="spliced")


@cli("cli-missing-layer", r"--layer 'spliced' is not a layer of '.*cells\.h5ad'")
def _(ctx, mp):
    return _embed(ctx, extra=["--layer", "spliced"])


@api("api-target-of-strings", r"target_key='louvain' is a column of category values, not numbers")
def _(ctx, mp):
    return lambda: ScForge.setup_anndata(ctx.project.cells(), target_key="louvain")


@api("api-not-an-anndata", r"setup_anndata needs an AnnData, got ndarray.*StreamedCells")
def _(ctx, mp):
    return lambda: ScForge.setup_anndata(np.zeros((3, 3)))


# queries --------------------------------------------------------------------------------------
@api(
    "api-query-with-other-genes",
    r"Only 0\.0% \(0 of \d+\) of the data's genes are in the vocabulary.*gene_key",
)
def _(ctx, mp):
    model = _model(ctx)
    query = ctx.project.cells()
    _rename_genes(query)
    return lambda: model.get_latent_representation(_registered(query))


@cli(
    "cli-query-with-other-genes",
    r"Only 0\.0% \(0 of \d+\) of the data's genes are in the vocabulary.*gene_key",
)
def _(ctx, mp):
    return _embed(ctx, input=ctx.h5ad("renamed.h5ad", _rename_genes))


# checkpoints and model directories ------------------------------------------------------------
@api("api-corrupt-safetensors", r"model\.safetensors is truncated or corrupt.*Re-export")
def _(ctx, mp):
    model = _corrupt_weights(ctx, None)
    return lambda: ScForge.from_pretrained(str(model), _registered(ctx.project.cells()))


@cli("cli-truncated-safetensors", r"model\.safetensors is truncated or corrupt.*Re-export")
def _(ctx, mp):
    return _embed(ctx, model=_corrupt_weights(ctx, 0.5))


@api("api-truncated-safetensors", r"model\.safetensors is truncated or corrupt.*Re-export")
def _(ctx, mp):
    model = _corrupt_weights(ctx, 0.01)
    return lambda: ScForge.from_pretrained(str(model), _registered(ctx.project.cells()))


@api(
    "api-ckpt-of-another-architecture",
    r"Checkpoint dimension mismatch.*hidden_dim: checkpoint 16, requested 64",
)
def _(ctx, mp):
    adata = _registered(ctx.project.cells())
    return lambda: ScForge.from_pretrained(str(ctx.project.ckpt), adata, hidden_dim=64)


@cli(
    "cli-ckpt-of-another-architecture",
    r"Checkpoint dimension mismatch.*hidden_dim: checkpoint 16, requested 64",
)
def _(ctx, mp):
    return _train(ctx, "finetune", "model.hidden_dim=64")


@api(
    "api-ckpt-of-another-model",
    r"other_model\.ckpt is not a checkpoint written by scforge.*pretrained directory",
)
def _(ctx, mp):
    ckpt = _foreign_ckpt(ctx)
    return lambda: ScForge.from_pretrained(str(ckpt), _registered(ctx.project.cells()))


@cli("cli-ckpt-of-another-model", r"other_model\.ckpt is not a checkpoint written by scforge")
def _(ctx, mp):
    return _embed(ctx, model=_foreign_ckpt(ctx))


@api("api-pickle-as-checkpoint", r"model\.ckpt holds pickled Python objects.*nothing in it was run")
def _(ctx, mp):
    ckpt = _pickle_ckpt(ctx)
    return lambda: ScForge.from_pretrained(str(ckpt), _registered(ctx.project.cells()))


@cli("cli-pickle-as-checkpoint", r"model\.ckpt holds pickled Python objects.*nothing in it was run")
def _(ctx, mp):
    return _train(ctx, "finetune", extra=["--checkpoint", str(_pickle_ckpt(ctx))])


@cli("cli-empty-ckpt", r"empty\.ckpt could not be read as a checkpoint.*truncated")
def _(ctx, mp):
    path = ctx.tmp / "empty.ckpt"
    path.write_bytes(b"")
    return _embed(ctx, model=path)


@api(
    "api-model-directory-missing-weights",
    r"is not a pretrained scforge directory: missing \['model\.safetensors'\]",
)
def _(ctx, mp):
    model = ctx.copy_model()
    (model / "model.safetensors").unlink()
    return lambda: ScForge.from_pretrained(str(model), _registered(ctx.project.cells()))


@cli("cli-config-json-not-json", r"config\.json is not valid JSON.*save_pretrained")
def _(ctx, mp):
    model = ctx.copy_model()
    (model / "config.json").write_text('{"format": "scforge-pre')
    return _embed(ctx, model=model)


@api("api-adapter-directory-missing", r"'.*no_adapter' is not an adapter directory.*save_adapter")
def _(ctx, mp):
    (ctx.tmp / "no_adapter").mkdir()
    return lambda: _model(ctx).load_adapter(str(ctx.tmp / "no_adapter"))


# outputs --------------------------------------------------------------------------------------
@api("api-existing-output", r"model exists; pass overwrite=True")
def _(ctx, mp):
    existing = ctx.copy_model()
    return lambda: _model(ctx).save_pretrained(str(existing), overwrite=False)


@cli("cli-existing-output", r"output '.*taken\.h5ad' already exists; pass --overwrite")
def _(ctx, mp):
    (ctx.tmp / "taken.h5ad").write_text("keep me")
    return _embed(ctx, output=ctx.tmp / "taken.h5ad")


@cli("cli-existing-run-directory", r"output '.*run' already exists; pass --overwrite")
def _(ctx, mp):
    (ctx.tmp / "run").mkdir()
    (ctx.tmp / "run" / "metrics.csv").write_text("epoch\n0\n")
    return _train(ctx, "pretrain")


@api("api-read-only-output-directory", r"Cannot write 'model' to '.*readonly'.*read-only.*writable")
def _(ctx, mp):
    readonly = ctx.readonly_dir(mp)
    return lambda: _model(ctx).save_pretrained(str(readonly / "model"))


@cli("cli-read-only-output-directory", r"Cannot write the output to '.*readonly'.*read-only")
def _(ctx, mp):
    return _embed(ctx, output=ctx.readonly_dir(mp) / "out.h5ad")


@cli(
    "cli-read-only-run-directory", r"Cannot write the run directory to '.*readonly.*run'.*read-only"
)
def _(ctx, mp):
    return _train(ctx, "pretrain", f"training.checkpoint_dir={ctx.readonly_dir(mp) / 'run'}")


@api("api-read-only-checkpoint-dir", r"Cannot write checkpoints to '.*readonly.*ckpts'.*read-only")
def _(ctx, mp):
    model = _model(ctx)
    readonly = ctx.readonly_dir(mp)
    return lambda: model.train(
        max_epochs=1, checkpoint_dir=str(readonly / "ckpts"), accelerator="cpu"
    )


@api("api-output-is-a-file", r"adapter exists and is a file, not a model directory")
def _(ctx, mp):
    from scforge_scvi.train import LoraSettings

    (ctx.tmp / "adapter").write_text("a file")
    model = _model(ctx)
    model._apply_lora(LoraSettings(rank=2))
    return lambda: model.save_adapter(str(ctx.tmp / "adapter"))


# configs --------------------------------------------------------------------------------------
@cli("cli-yaml-not-a-mapping", r"list\.yaml.*mapping")
def _(ctx, mp):
    return _train(ctx, "pretrain", config=_yaml(ctx, "list.yaml", "- data\n- model\n"))


@api("api-yaml-not-a-mapping", r"scalar\.yaml.*mapping")
def _(ctx, mp):
    path = _yaml(ctx, "scalar.yaml", "just a sentence\n")
    return lambda: ScForgeConfig.from_yaml(path)


@cli("cli-yaml-syntax-error", r"broken\.yaml.*line \d+")
def _(ctx, mp):
    return _train(ctx, "pretrain", config=_yaml(ctx, "broken.yaml", "data:\n  paths: [a.h5ad\n"))


WRONG_TYPES = [  # one per kind of config value: (id, override, what the message must say)
    ("int", "training.max_epochs=abc", r"'training\.max_epochs': expected a whole number"),
    ("int-given-bool", "training.max_epochs=true", r"'training\.max_epochs'.*got true"),
    ("float", "training.optimizer.lr=fast", r"'training\.optimizer\.lr': expected a number"),
    ("bool", "data.streaming=maybe", r"'data\.streaming': expected true or false"),
    ("choice", "tokenizer.strategy=42", r"'tokenizer\.strategy': 42 is not one of rank_value"),
    ("choice-given-list", "training.precision=[32]", r"'training\.precision': \[32\] is not one"),
    ("list", "data.paths=5", r"'data\.paths': expected a list, got 5"),
    ("section", "training.optimizer=3", r"'training\.optimizer': expected a section of keys"),
    ("optional-int", "training.patience=[1]", r"'training\.patience': expected a whole number"),
    ("list-of-str", "finetune.lora.target_modules=7", r"'finetune\.lora\.target_modules'"),
    ("range", "model.dropout=2.0", r"'model\.dropout': must be less than 1; got 2\.0"),
]
for _kind, _override, _says in WRONG_TYPES:

    def _wrong(ctx, mp, override=_override):
        return _train(ctx, "finetune", override)

    cli(f"cli-wrong-type-{_kind}", _says)(_wrong)


@api("api-wrong-type-in-config", r"training\.batch_size': expected a whole number, got 'big'")
def _(ctx, mp):
    return lambda: ScForgeConfig.from_dict(
        {"data": {"paths": ["x.h5ad"]}, "training": {"batch_size": "big"}}
    )


@cli("cli-set-unknown-key", r"training\.max_epoch.*max_epochs")
def _(ctx, mp):
    return _train(ctx, "pretrain", "training.max_epoch=3")


@cli("cli-set-without-value", r"training\.max_epochs.*KEY=VALUE|training\.max_epochs.*=")
def _(ctx, mp):
    return _train(ctx, "pretrain", "training.max_epochs")


# files of the wrong kind ----------------------------------------------------------------------
@cli("cli-directory-as-input", r"'.*a_folder' is a directory, not an \.h5ad file")
def _(ctx, mp):
    (ctx.tmp / "a_folder").mkdir()
    return _embed(ctx, input=ctx.tmp / "a_folder")


@cli("cli-directory-as-config", r"'.*a_folder' is a directory, not a config file")
def _(ctx, mp):
    (ctx.tmp / "a_folder").mkdir()
    return _train(ctx, "pretrain", config=ctx.tmp / "a_folder")


@api("api-directory-as-shard", r"'.*a_folder' is a directory, not an \.h5ad file")
def _(ctx, mp):
    (ctx.tmp / "a_folder").mkdir()
    return lambda: StreamedCells(ctx.tmp / "a_folder")


@cli(
    "cli-empty-directory-as-model",
    r"'.*empty_model' is not a pretrained scforge directory: missing",
)
def _(ctx, mp):
    (ctx.tmp / "empty_model").mkdir()
    return _embed(ctx, model=ctx.tmp / "empty_model")


@cli("cli-h5ad-not-hdf5", r"cannot read '.*broken\.h5ad' as AnnData: it is not an HDF5 file")
def _(ctx, mp):
    (ctx.tmp / "broken.h5ad").write_text("cell,gene\n1,2\n")
    return _embed(ctx, input=ctx.tmp / "broken.h5ad")


@api("api-h5ad-not-hdf5", r"Cannot open shard '.*broken\.h5ad': it is not an HDF5 file")
def _(ctx, mp):
    (ctx.tmp / "broken.h5ad").write_text("cell,gene\n1,2\n")
    return lambda: StreamedCells(ctx.tmp / "broken.h5ad")


@cli("cli-missing-input", r"data file '.*absent\.h5ad' does not exist")
def _(ctx, mp):
    return _embed(ctx, input=ctx.tmp / "absent.h5ad")


# perturbation, streaming ----------------------------------------------------------------------
@api(
    "api-perturbation-without-controls",
    r"Control label 'non-targeting' is not a value of adata\.obs\['guide'\]; available categories: \['KO_CD3E', 'KO_MS4A1'\]",
)
def _(ctx, mp):
    return lambda: ScForgePerturb.setup_anndata(
        _perturbation_cells(ctx), perturbation_key="guide", control_label="non-targeting"
    )


@api(
    "api-perturbation-key-missing",
    r"Perturbation column 'guides' is not in adata\.obs; available columns: \[.*'guide'\]",
)
def _(ctx, mp):
    return lambda: ScForgePerturb.setup_anndata(
        _perturbation_cells(ctx), perturbation_key="guides", control_label="non-targeting"
    )


@api("api-shards-without-common-genes", r"Shard '.*b\.h5ad' shares no gene with .*a\.h5ad")
def _(ctx, mp):
    shards = _shards_without_common_genes(ctx)
    return lambda: StreamedCells(shards)


@cli("cli-shards-without-common-genes", r"Shard '.*b\.h5ad' shares no gene with .*a\.h5ad")
def _(ctx, mp):
    a, b = _shards_without_common_genes(ctx)
    return _train(ctx, "finetune", "data.streaming=true", f"data.paths=[{a}, {b}]")


@api(
    "api-streamed-shard-outside-vocabulary",
    r"Shard '.*b\.h5ad': Only 0\.0% \(0 of \d+\) of the data's genes",
)
def _(ctx, mp):
    _, b = _shards_without_common_genes(ctx)
    model = _model(ctx)
    return lambda: model.get_latent_representation(StreamedCells([b]))


@api("api-ddp-on-in-memory-anndata", r"distributed='ddp' needs streamed cells.*backed='r'")
def _(ctx, mp):
    return lambda: _model(ctx).train(max_epochs=1, distributed="ddp", devices=2, accelerator="cpu")


# -- the test --------------------------------------------------------------------------------
def _snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    files = {}
    for root in roots:
        for path in root.rglob("*"):
            info = path.lstat()
            files[str(path)] = (info.st_size, info.st_mtime_ns) if path.is_file() else (0, 0)
    return files


def _writable_again(path: Path) -> None:
    if path.exists():
        path.chmod(0o755)


def _report(case: Case, record: dict) -> None:
    target = os.environ.get("SCFORGE_BAD_INPUT_REPORT")
    if target:
        with open(target, "a") as f:
            f.write(json.dumps({"id": case.id, "kind": case.kind, **record}) + "\n")


def _outcome(case: Case, prepared, capsys) -> dict:
    """Run the case; what the user sees: an exit code and a message, or an exception."""
    capsys.readouterr()
    if case.kind == "cli":
        try:
            code = main(prepared)
        except BaseException as exc:  # escaped main(): the user sees a traceback
            return {"traceback": "".join(traceback.format_exception_only(exc)).strip()}
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("scforge ")]
        return {
            "exit": code,
            "n_error_lines": len(lines),
            "traceback": "Traceback" in err,
            "message": lines[-1].split(": error: ", 1)[-1] if lines else err.strip()[-500:],
        }
    try:
        prepared()
    except Exception as exc:
        return {
            "type": type(exc).__name__,
            "ours": isinstance(exc, ScForgeError) and isinstance(exc, ValueError | TypeError),
            "message": str(exc),
        }
    return {"type": None, "ours": False, "message": "no error raised"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_clear_line_and_writes_nothing(
    case: Case, project: Project, tmp_path, monkeypatch, capsys, request
):
    monkeypatch.chdir(tmp_path)
    request.addfinalizer(lambda: _writable_again(tmp_path / "readonly"))
    prepared = case.run(Ctx(project, tmp_path), monkeypatch)  # bad files, before the snapshot
    before = _snapshot(project.root, tmp_path)
    out = _outcome(case, prepared, capsys)
    after = _snapshot(project.root, tmp_path)
    changed = sorted(set(after) ^ set(before) | {p for p in after if after[p] != before.get(p)})
    message = str(out.get("message", "")).strip()
    checks = {
        "error": (out.get("exit") == 2 and out.get("n_error_lines") == 1 and not out["traceback"])
        if case.kind == "cli"
        else out.get("ours", False),
        "one_line": bool(message) and "\n" not in message,
        "names_it": bool(re.search(case.pattern, message)),
        "nothing_written": not changed,
        "nothing_unpickled": not (tmp_path / "PWNED").exists(),
    }
    _report(case, {**out, **checks, "clear": all(checks.values()), "changed": changed[:5]})
    escaped = out.get("traceback")
    assert not isinstance(escaped, str), f"an exception escaped the command line: {escaped}"
    assert checks["error"], out
    assert checks["one_line"], f"not one line: {message!r}"
    assert checks["names_it"], f"{message!r} does not match {case.pattern!r}"
    assert checks["nothing_written"], f"files were written or changed: {changed}"
    assert checks["nothing_unpickled"], "a pickle was executed"


def test_there_are_enough_distinct_cases():
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)
    assert {c.kind for c in CASES} == {"cli", "api"}
