"""Entry point of the ``scforge`` command line: one thin sub-command per task.

Every command is a short function over the public Python API (:class:`~scforge_scvi.ScForge`
and the annotation scores of :mod:`scforge_scvi.model`, :mod:`scforge_scvi.io`); the
translation of config keys into API arguments lives in :mod:`._runs`. Problems with the user's input (a missing file, a label
column that is not there, a checkpoint of another architecture, an output that exists) end
the command with a one-line message on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import scforge_scvi.cli._runs as runs

EXIT_USAGE = 2

SET_HELP = (
    "override config keys, e.g. --set training.max_epochs=5 model.dropout=0.2 "
    "(repeatable; one or more KEY=VALUE each). Values are read as YAML: 64 is a number, true a boolean, null clears a "
    "value, [a.h5ad, b.h5ad] is a list; benchmarks.0.label_key addresses a list entry"
)
RUN_DIR_TEXT = (
    "The run directory is training.checkpoint_dir (relative to where you run scforge). It "
    "receives config.yaml (the complete configuration used), metrics.csv (one row per epoch), "
    "best.ckpt (lowest validation loss), last.ckpt (end of the latest epoch) and best/ (the "
    "best model as a pretrained directory for embed, predict, benchmark and finetune). A run "
    "directory that is not empty is refused unless --overwrite is given."
)


# -- commands --------------------------------------------------------------------------------
def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    run_demo(Path(args.output), max_epochs=args.max_epochs, seed=args.seed)
    return 0


def _preprocess(args: argparse.Namespace) -> int:
    import numpy as np
    import scanpy as sc
    import scipy.sparse as sp

    from scforge_scvi.data import check_raw_counts, log_normalize

    config = _load_config(args, used={"data"}, data=args.input)
    output = runs.check_output(args.output, args.overwrite)
    adata = runs.read_data(config)
    layer, prep = config.data.layer, config.data.preprocessing
    if layer is not None and layer not in adata.layers:
        raise runs.CliError(f"data.layer '{layer}' is not a layer of the data")
    counts = adata.layers[layer] if layer is not None else adata.X
    check_raw_counts(counts, f"layer '{layer}'" if layer else "X")
    adata.layers["counts"] = counts.copy()
    if prep.normalize == "library_size":
        adata.X = log_normalize(counts, target_sum=prep.target_sum, log1p=prep.log1p)
    else:  # values as stored, optionally log1p
        x = counts.astype(np.float32, copy=True)
        adata.X = (x.log1p() if sp.issparse(x) else np.log1p(x)) if prep.log1p else x
    if prep.n_top_genes is not None and prep.n_top_genes < adata.n_vars:
        sc.pp.highly_variable_genes(adata, n_top_genes=prep.n_top_genes, subset=True)
    adata.uns["scforge_preprocess"] = {"params": config.data.preprocessing.model_dump()}
    runs.write_h5ad(adata, output)
    print(
        f"Wrote {output}: {adata.n_obs} cells x {adata.n_vars} genes; raw counts in "
        "layers['counts'], normalised values in X."
    )
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    config = _load_config(args, used={"data", "tokenizer", "model", "training"})
    return _train_run(args, config, objective="pretrain")


def _finetune(args: argparse.Namespace) -> int:
    config = _load_config(args, used={"data", "tokenizer", "model", "training", "finetune"})
    if config.finetune is None:
        raise runs.CliError("the config has no 'finetune' section (label_key, head, ...)")
    if args.checkpoint is None and args.resume is None:
        print("No --checkpoint given: fine-tuning a randomly initialised model.", file=sys.stderr)
    objective = "regress" if config.finetune.head.task == "regression" else "classify"
    return _train_run(args, config, objective=objective)


def _train_run(args: argparse.Namespace, config, *, objective: str) -> int:
    """Shared by pretrain and finetune: check everything, then train and write the run."""
    runs.check_supported(config)
    resume_ckpt = None
    if getattr(args, "resume", None) is not None:
        run_dir = Path(args.resume)
        resume_ckpt = runs.check_resume(run_dir, config)
    else:
        run_dir = runs.check_output(
            config.training.checkpoint_dir, args.overwrite, directory=True, what="the run directory"
        )
    checkpoint = resume_ckpt or getattr(args, "checkpoint", None)
    adata, stream = runs.read_training_data(config)
    runs.setup_data(adata, config, labels=objective != "pretrain")
    model = runs.build_model(adata, config, checkpoint)
    if objective == "classify":
        runs.check_n_classes(model, config)
    print(model)
    run_dir.mkdir(parents=True, exist_ok=True)
    config.to_yaml(run_dir / runs.RUN_CONFIG)
    kwargs = runs.train_kwargs(config, objective=objective)
    if resume_ckpt is not None:
        kwargs["ckpt_path"] = str(resume_ckpt)  # optimizer, schedule, step and callbacks
    if stream is not None:
        kwargs["data"] = stream
    model.train(checkpoint_dir=str(run_dir), **kwargs)  # ends on the best weights
    metrics = runs.write_metrics(model, run_dir / runs.RUN_METRICS)
    model.save_pretrained(str(run_dir / runs.RUN_BEST))
    if "val_loss" in metrics:
        print(f"Best validation loss {metrics['val_loss'].min():.4f} (epoch {model.best_epoch_}).")
    if objective == "classify" and config.training.test_split > 0:
        scores = model.evaluate()
        scores.pop("confusion")
        (run_dir / "test_metrics.json").write_text(json.dumps(scores, indent=2) + "\n")
        print(
            f"Held-out test cells: accuracy {scores['accuracy']:.3f}, "
            f"macro F1 {scores['macro_f1']:.3f} ({scores['n_cells']} cells)."
        )
        if "baseline_logreg" in scores:
            base = scores["baseline_logreg"]
            print(
                f"Logistic regression on {base['n_genes']} HVGs, same training and test cells: "
                f"accuracy {base['accuracy']:.3f}, macro F1 {base['macro_f1']:.3f} "
                f"(model / baseline macro F1: {scores['relative_macro_f1']:.3f})."
            )
    print(f"Run directory: {run_dir} (best model in {run_dir / runs.RUN_BEST}).")
    return 0


def _embed(args: argparse.Namespace) -> int:
    return _apply(args, "embed")


def _predict(args: argparse.Namespace) -> int:
    return _apply(args, "predict")


def _apply(args: argparse.Namespace, method: str) -> int:
    """``scforge embed`` / ``predict``: run ``model.<method>`` on the cells, write them out."""
    adata, model, output = _query(args)
    trust = {}
    if method == "predict":
        trust = {"coverage": args.coverage, "unknown_threshold": args.unknown_threshold}
    getattr(model, method)(adata, key_added=args.key_added, batch_size=args.batch_size, **trust)
    runs.drop_query_labels(adata)
    runs.write_h5ad(adata, output)
    key = args.key_added
    if method == "embed":
        print(f"Wrote {output} with obsm['{key}'] ({adata.obsm[key].shape[1]} dims).")
    else:
        print(f"Wrote {output} with obs['{key}'].")
    return 0


def _query(args: argparse.Namespace):
    """Checks, reads and registers the cells of embed/predict; loads the model."""
    from scforge_scvi import ScForge

    output = runs.check_output(args.output, args.overwrite)
    runs.check_checkpoint_path(args.model)
    adata = runs.read_h5ad(args.input)
    layer = args.layer
    if layer is None and "counts" in adata.layers:
        layer = "counts"
    if layer is not None and layer not in adata.layers:
        raise runs.CliError(f"--layer '{layer}' is not a layer of '{args.input}'")
    runs.setup_query(
        adata, args.model, layer=layer, gene_key=args.gene_key, source=f"'{args.input}'"
    )
    return adata, ScForge.from_pretrained(str(args.model), adata), output


def _benchmark(args: argparse.Namespace) -> int:
    import numpy as np

    from scforge_scvi import ScForge
    from scforge_scvi.model import (
        baseline_logreg,
        classification_scores,
        embedding_quality,
        linear_probe,
        probe_split,
    )

    config = _load_config(args, used={"data", "tokenizer", "model", "training", "benchmarks"})
    runs.check_supported(config)
    if not config.benchmarks:
        raise runs.CliError("the config has no 'benchmarks' list (e.g. - name: linear_probe)")
    output = runs.check_output(args.output, args.overwrite)
    runs.check_checkpoint_path(args.model)
    adata = runs.read_data(config)
    for spec in config.benchmarks:
        runs.require_obs(adata, spec.label_key, "benchmarks label_key")
        if spec.batch_key is not None:
            runs.require_obs(adata, spec.batch_key, "benchmarks batch_key")
    layer = config.data.layer
    runs.setup_query(
        adata, args.model, layer=layer, gene_key=config.data.gene_key,
        source=runs.data_sources(config.data.paths),
    )  # fmt: skip
    kwargs = runs.model_kwargs(config)
    kwargs.pop("preprocessing")  # always the model's own
    model = ScForge.from_pretrained(str(args.model), adata, **kwargs)
    embedding = model.get_latent_representation(adata)
    counts = adata.layers[layer] if layer is not None else adata.X
    seed, target_sum = config.training.seed, model.preprocessing.target_sum
    results = []
    for spec in config.benchmarks:
        labels = adata.obs[spec.label_key].astype(str).to_numpy()
        entry = {"name": spec.name, "label_key": spec.label_key, "train_split": spec.train_split}
        split = spec.train_split or 0.8  # the baseline always needs training cells
        if spec.name == "linear_probe" and spec.train_split == 0.0:
            if not model.class_names_:
                raise runs.CliError(
                    "linear_probe with train_split 0.0 scores a fine-tuned classifier, but the "
                    "model has none; use train_split > 0 to fit a probe on its embeddings"
                )
            probs = model.predict(adata, return_probabilities=True).to_numpy()
            predicted = np.asarray(model.class_names_)[probs.argmax(1)]
            entry["scforge"] = classification_scores(labels, predicted)
            _, test = probe_split(labels, split, seed)
            entry["scforge_on_baseline_test_cells"] = classification_scores(
                labels[test], predicted[test]
            )
        elif spec.name == "linear_probe":
            entry["scforge"] = linear_probe(embedding, labels, train_split=split, seed=seed)
        elif spec.name == "embedding_quality":
            batch = None if spec.batch_key is None else adata.obs[spec.batch_key].to_numpy()
            entry["scforge"] = embedding_quality(embedding, labels, batch=batch, seed=seed)
        if spec.name != "embedding_quality":
            entry["baseline_logreg"] = baseline_logreg(
                counts, labels, train_split=split, seed=seed, target_sum=target_sum
            )
        results.append(entry)
    output.parent.mkdir(parents=True, exist_ok=True)
    report = {"model": str(args.model), "n_cells": adata.n_obs, "benchmarks": results}
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(_results_table(results))
    for entry in results:
        ours = entry.get("scforge_on_baseline_test_cells") or entry.get("scforge")
        base = entry.get("baseline_logreg")
        if ours and base and "macro_f1" in ours:
            print(
                f"{entry['name']}: macro F1 {ours['macro_f1']:.3f} beside logistic regression "
                f"{base['macro_f1']:.3f} on the same {base['n_cells']} test cells "
                f"(ratio {ours['macro_f1'] / max(base['macro_f1'], 1e-12):.3f})."
            )
    print(f"Results: {output}")
    return 0


def _results_table(results: list[dict]) -> str:
    lines = [f"{'benchmark':<18} {'method':<32} {'cells':>6}  metrics"]
    for entry in results:
        for method, scores in entry.items():
            if not isinstance(scores, dict):
                continue
            shown = "  ".join(
                f"{key}={value:.3f}" for key, value in scores.items() if isinstance(value, float)
            )
            lines.append(f"{entry['name']:<18} {method:<32} {scores['n_cells']:>6}  {shown}")
    return "\n".join(lines)


def _export(args: argparse.Namespace) -> int:
    from scforge_scvi.io import read_pretrained, write_pretrained

    output = runs.check_output(args.output, args.overwrite, directory=True, what="the model")
    runs.check_checkpoint_path(args.model)
    pretrained = read_pretrained(args.model)
    if pretrained.has_unmerged_adapters:
        raise runs.CliError(
            f"'{args.model}' holds unmerged LoRA adapters; use the run's best/ directory, "
            "which has them merged into the weights"
        )
    write_pretrained(
        output, pretrained.config, pretrained.vocab, pretrained.state_dict, overwrite=True
    )
    print(f"Exported {args.model} to {output} (config.json, model.safetensors, gene_vocab.json).")
    return 0


def _import_geneformer(args: argparse.Namespace) -> int:
    from scforge_scvi import ScForge
    from scforge_scvi.io import read_geneformer, write_pretrained
    from scforge_scvi.model._settings import init_defaults

    output = runs.check_output(args.output, args.overwrite)
    if not Path(args.model).is_dir():
        raise runs.CliError(f"Geneformer model directory '{args.model}' does not exist")
    pretrained = read_geneformer(
        args.model,
        token_dictionary=args.token_dictionary,
        gene_median_dictionary=args.gene_median_dictionary,
        model_input_size=args.model_input_size,
        special_tokens=args.special_tokens,
        defaults=init_defaults(ScForge),
    )
    write_pretrained(output, pretrained.config, pretrained.vocab, pretrained.state_dict)
    params, source = pretrained.init_params, pretrained.config["imported_from"]
    print(
        f"Imported Geneformer {args.model} ({source['weights']}, {params['num_layers']} layers x "
        f"{params['hidden_dim']} dims, {pretrained.vocab.n_genes:,} genes, input size "
        f"{source['model_input_size']}{', <cls>/<eos>' if source['special_tokens'] else ''}) "
        f"to {output} (config.json, model.safetensors, gene_vocab.json)."
    )
    print(
        f"For 'scforge finetune --checkpoint {output}', the config's tokenizer and model "
        "sections must repeat this architecture:\n" + _architecture_yaml(params)
    )
    return 0


def _architecture_yaml(params: dict) -> str:
    """The tokenizer and model keys of a config that match the init params of a model."""
    tokenizer = {
        "strategy": params["tokenizer"],
        "max_genes": params["max_genes"],
        "prepend_cls": params["prepend_cls"],
    }
    model = {
        key: params[key]
        for key in ("hidden_dim", "num_layers", "num_heads", "ffn_dim", "max_seq_len", "pooling")
    }
    model["activation"] = params["activation"]
    lines = ["data:", "  gene_vocab: null", "tokenizer:"]
    lines += [f"  {k}: {json.dumps(v)}" for k, v in tokenizer.items()]
    lines += ["model:"] + [f"  {k}: {json.dumps(v)}" for k, v in model.items()]
    return "\n".join(lines)


# -- config ----------------------------------------------------------------------------------
def _load_config(args: argparse.Namespace, *, used: set[str], data: str | None = None):
    from scforge_scvi.config import ScForgeConfig

    overrides = list(args.set or [])
    if args.config is None:
        if data is None:
            raise runs.CliError("--config is required")
        config = ScForgeConfig.from_dict({"data": {"paths": [data]}}, overrides)
    else:
        if data is not None:
            overrides.append(f"data.paths=[{json.dumps(data)}]")
        config = ScForgeConfig.from_yaml(args.config, overrides)
    for name in runs.unused_sections(config, used):
        print(
            f"Note: the config's '{name}' section is not used by 'scforge {args.command}'.",
            file=sys.stderr,
        )
    return config


# -- parser ----------------------------------------------------------------------------------
def _add_config_options(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument(
        "--config", required=required, metavar="YAML", help="YAML configuration file"
    )
    parser.add_argument("--set", action="extend", nargs="+", metavar="KEY=VALUE", help=SET_HELP)


def _add_output(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--output", required=True, help=what)
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the output if it already exists"
    )


def _add_query(parser: argparse.ArgumentParser, key: str, what: str) -> None:
    parser.add_argument(
        "--model", required=True, help="pretrained directory (e.g. RUN_DIR/best) or a .ckpt"
    )
    parser.add_argument("--input", required=True, help=".h5ad file with raw counts")
    _add_output(parser, f"output .h5ad: the input with {what} added")
    parser.add_argument(
        "--layer",
        help="layer with the raw counts (default: 'counts' if the file has it, else X)",
    )
    parser.add_argument("--gene-key", help="var column with gene names/ids (default: var_names)")
    parser.add_argument("--key-added", default=key, help="where to write (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="cells per batch")


def _add_resume(parser) -> None:
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue an interrupted run from RUN_DIR/last.ckpt with its optimizer, schedule, "
        "step and callbacks. The configuration must equal RUN_DIR/config.yaml except "
        "training.max_epochs. A run never resumes unless asked",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scforge",
        description=(
            "Pretrain, fine-tune and apply single-cell transformer foundation models. Run "
            "'scforge COMMAND --help' for the options of one command."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, func, help: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description)
        p.set_defaults(func=func)
        return p

    p = command(
        "preprocess",
        _preprocess,
        "normalise, log-transform and select highly variable genes",
        "Write a copy of the data (data.paths of --config, or --input) with X library-size "
        "normalised and log1p-transformed as in data.preprocessing, only the data."
        "preprocessing.n_top_genes most variable genes kept (null: all), and the raw counts "
        "kept in "
        "layers['counts'] (which the models read).",
    )
    _add_config_options(p, required=False)
    p.add_argument("--input", help=".h5ad file with raw counts (instead of data.paths)")
    _add_output(p, "output .h5ad file")

    p = command(
        "pretrain",
        _pretrain,
        "train a model from scratch by masked-gene modelling",
        "Pretrain a transformer on the cells of data.paths: a fraction of each cell's genes "
        "(tokenizer.masking) is hidden and the model learns to predict them. " + RUN_DIR_TEXT,
    )
    _add_config_options(p)
    _add_resume(p)
    p.add_argument("--overwrite", action="store_true", help="reuse a non-empty run directory")

    p = command(
        "finetune",
        _finetune,
        "adapt a pretrained model to predict a label per cell (e.g. cell type)",
        "Fine-tune on the obs column finetune.label_key. The strategy follows from the "
        "finetune section: lora.enabled -> LoRA adapters; freeze_backbone with "
        "freeze_backbone_epochs < training.max_epochs -> gradual unfreezing; >= max_epochs -> "
        "head only; otherwise full fine-tuning. " + RUN_DIR_TEXT,
    )
    _add_config_options(p)
    start = p.add_mutually_exclusive_group()
    start.add_argument(
        "--checkpoint",
        help="initialise from this pretrained model: a .ckpt written by 'scforge pretrain' or a "
        "pretrained directory. Weights only: a fresh optimizer and learning-rate schedule start "
        "at step 0. The model section must match the checkpoint's architecture",
    )
    _add_resume(start)
    p.add_argument("--overwrite", action="store_true", help="reuse a non-empty run directory")

    p = command(
        "embed",
        _embed,
        "write cell embeddings into an .h5ad (obsm['X_scforge'])",
        "Embed cells with a trained model, using its own gene vocabulary and preprocessing. "
        "Then e.g. sc.pp.neighbors(adata, use_rep='X_scforge').",
    )
    _add_query(p, "X_scforge", "obsm[KEY_ADDED] (cell embeddings)")

    p = command(
        "predict",
        _predict,
        "write predicted labels into an .h5ad (obs['scforge_prediction'])",
        "Predict a label per cell with a fine-tuned model; writes obs[KEY_ADDED], "
        "obs['scforge_confidence'] and obsm['scforge_probabilities'] (calibrated on the "
        "validation cells of fine-tuning), and obs['scforge_unknown_score'].",
    )
    _add_query(p, "scforge_prediction", "obs[KEY_ADDED] (predicted labels)")
    p.add_argument(
        "--coverage",
        type=float,
        help="in (0, 1): also write prediction sets that hold the true label with this "
        "probability (obs['scforge_prediction_set'] and obs['scforge_prediction_set_size'])",
    )
    p.add_argument(
        "--unknown-threshold",
        type=float,
        help="in [0, 1]: label 'unknown' the cells whose unknown score exceeds it (e.g. 0.99)",
    )

    p = command(
        "benchmark",
        _benchmark,
        "score a model against a logistic-regression baseline",
        "Run the config's benchmarks list on the cells of data.paths. linear_probe: logistic "
        "regression on the model's embeddings (train_split of the cells, stratified, seeded by "
        "training.seed), or with train_split 0.0 the fine-tuned classifier's own predictions on "
        "every cell. embedding_quality: NMI/ARI of KMeans and Leiden clusters against the labels "
        "and the label silhouette (scib-metrics if installed, else scikit-learn). Each is shown "
        "beside baseline_logreg: logistic regression on log-normalised genes, on the same cells. "
        "The tokenizer and model sections must match the model.",
    )
    _add_config_options(p)
    p.add_argument("--model", required=True, help="pretrained directory or .ckpt to evaluate")
    _add_output(p, "results .json file")

    p = command(
        "export",
        _export,
        "turn a training checkpoint (.ckpt) into a pretrained directory",
        "Write config.json, model.safetensors and gene_vocab.json from a .ckpt written by "
        "scforge training (nothing is unpickled).",
    )
    p.add_argument("--model", required=True, help="the .ckpt file")
    _add_output(p, "output directory")

    p = command(
        "import-geneformer",
        _import_geneformer,
        "turn a public Geneformer model directory into a pretrained directory",
        "Read a Geneformer model (config.json of a BertForMaskedLM, model.safetensors or "
        "pytorch_model.bin, the token and gene median dictionaries) and write it as an "
        "scforge pretrained directory for finetune --checkpoint, embed and predict. Nothing is "
        "executed while reading: safetensors, torch.load(weights_only=True), and pickled "
        "dictionaries restricted to plain dicts, strings and numbers (JSON is accepted too).",
    )
    p.add_argument("--model", required=True, help="the Geneformer model directory")
    _add_output(p, "output pretrained directory")
    p.add_argument(
        "--token-dictionary",
        metavar="FILE",
        help="token dictionary .pkl/.json (default: the one *token_dictionary* file in --model)",
    )
    p.add_argument(
        "--gene-median-dictionary",
        metavar="FILE",
        help="gene median dictionary .pkl/.json (default: the one *median* file in --model)",
    )
    p.add_argument(
        "--model-input-size",
        type=int,
        metavar="N",
        help="longest input in tokens (default: max_position_embeddings: 2048 V1, 4096 V2)",
    )
    p.add_argument(
        "--special-tokens",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="prepend <cls> and append <eos> (default: when the token dictionary has them)",
    )

    p = command(
        "demo",
        _demo,
        "pretrain a small model on pbmc68k_reduced (ships with scanpy) and draw a UMAP",
        "Pretrain a small rank-value transformer on scanpy's pbmc68k_reduced (700 PBMCs, "
        "no download), write its embeddings into an .h5ad file and a UMAP coloured by "
        "bulk_labels, and print a kNN accuracy of the embedding.",
    )
    p.add_argument("--output", default="scforge_demo", help="output folder (default: %(default)s)")
    p.add_argument(
        "--max-epochs", type=int, default=8, help="pretraining epochs (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``scforge`` command line; returns the exit code (2 for bad input)."""
    from scforge_scvi._errors import ScForgeError
    from scforge_scvi.config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    expected = (
        runs.CliError,
        ScForgeError,  # bad input found by the library: config, data, checkpoints, outputs
        FileNotFoundError,
        FileExistsError,
        PermissionError,
        IsADirectoryError,
        NotADirectoryError,
        KeyError,
        ValueError,
    )
    try:
        return args.func(args)
    except expected as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        if isinstance(err, OSError) and not isinstance(err, ScForgeError) and err.filename:
            message = f"{err.strerror or err}: '{err.filename}'"  # e.g. permission denied
        if not isinstance(err, ConfigError):
            message = " ".join(str(message).split())
        print(f"scforge {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
