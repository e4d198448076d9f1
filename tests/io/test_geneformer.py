"""Importing Geneformer: exact outputs, Geneformer's token ids, safe loading, fine-tuning.

No download: a tiny ``BertForMaskedLM`` with random weights is built by ``transformers`` and
written with its dictionaries as Geneformer releases them (``tests/helpers.py``).
"""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from helpers import setup_counts, write_geneformer_dir
from scforge_scvi import ScForge
from scforge_scvi.cli import main
from scforge_scvi.data import GeneVocab
from scforge_scvi.io import (
    GeneformerImportError,
    UnsafePickleError,
    geneformer_token_map,
    load_geneformer_dictionary,
    read_geneformer,
    read_pretrained,
)

N_CELLS = 300


# -- fixtures --------------------------------------------------------------------------------
def _protein_coding_genes(n: int = 200) -> list[str]:
    return GeneVocab.from_name("human_protein_coding").genes[:n]


@pytest.fixture(scope="module")
def cells(_pbmc3k_once):
    """300 PBMC 3k cells with all 32,738 genes (Geneformer wants no feature selection)."""
    adata = _pbmc3k_once[:N_CELLS].copy()
    adata.layers["counts"] = adata.X.copy()
    return adata


def _nonzero_medians(adata, genes: np.ndarray) -> np.ndarray:
    """Each gene's median non-zero ``counts / n_counts * 10,000``: Geneformer's statistic."""
    x = sp.csr_matrix(adata.X, dtype=np.float64)
    n_counts = np.asarray(x.sum(axis=1)).ravel()
    normalised = sp.csc_matrix(sp.diags(1.0 / n_counts) @ x * 10_000)
    columns = adata.var_names.get_indexer(genes)
    return np.array([np.median(normalised[:, j].data) for j in columns])


@pytest.fixture(scope="module")
def pbmc_genes(cells):
    """400 Ensembl ids expressed in at least 5 of the cells, with their medians."""
    expressed = np.asarray((cells.X > 0).sum(axis=0)).ravel() >= 5
    rng = np.random.default_rng(1)
    columns = np.sort(rng.choice(np.flatnonzero(expressed), 400, replace=False))
    by_symbol = cells.var_names[columns]
    ensembl = cells.var["gene_ids"].to_numpy()[columns]
    return ensembl, _nonzero_medians(cells, by_symbol)


@pytest.fixture(scope="module")
def pbmc_model_dirs(pbmc_genes, tmp_path_factory):
    """Geneformer directories over the PBMC genes: V1 and V2, input sizes 64 and 512."""
    genes, medians = pbmc_genes
    dirs = {}
    for version, size in (("V1", 64), ("V2", 64), ("V2", 512)):
        path = tmp_path_factory.mktemp("geneformer") / f"{version}-{size}"
        write_geneformer_dir(path, genes, medians, version=version, max_position_embeddings=size)
        dirs[version, size] = path
    return dirs


# -- exact outputs ---------------------------------------------------------------------------
def _geneformer_batch(tokens: dict[str, int], lengths: list[int], version: str, seed: int):
    """Random Geneformer input_ids (distinct genes per cell), padded, with the attention mask."""
    rng = np.random.default_rng(seed)
    gene_ids = np.array([i for name, i in tokens.items() if not name.startswith("<")])
    longest = max(lengths) + (2 if version == "V2" else 0)
    ids = np.full((len(lengths), longest), tokens["<pad>"], dtype=np.int64)
    for row, n in enumerate(lengths):
        seq = list(rng.choice(gene_ids, n, replace=False))
        if version == "V2":
            seq = [tokens["<cls>"], *seq, tokens["<eos>"]]
        ids[row, : len(seq)] = seq
    ids = torch.from_numpy(ids)
    return ids, ids != tokens["<pad>"]


@pytest.mark.parametrize("hidden_act", ["gelu", "relu"])
@pytest.mark.parametrize("version", ["V1", "V2"])
def test_hidden_states_and_masked_lm_logits_equal_transformers(tmp_path, version, hidden_act):
    genes = _protein_coding_genes()
    medians = np.random.default_rng(0).uniform(0.5, 5.0, len(genes))
    hf, tokens = write_geneformer_dir(
        tmp_path / "gf", genes, medians, version=version, hidden_act=hidden_act
    )
    pretrained = read_geneformer(tmp_path / "gf")
    params = pretrained.init_params
    assert params["norm_position"] == "post" and params["embedding_norm"]
    assert params["prepend_cls"] == params["append_eos"] == (version == "V2")

    from scforge_scvi.model._module import ScForgeModule
    from scforge_scvi.nn import BackboneConfig

    module = ScForgeModule(
        BackboneConfig.from_dict(pretrained.config["backbone"]),
        n_special=4,
        mask_id=2,
        gene_head_activation=params["gene_head_activation"],
    ).eval()
    missing, unexpected = module.load_state_dict(pretrained.state_dict, strict=True)
    assert not missing and not unexpected

    gf_ids, mask = _geneformer_batch(tokens, [60, 17, 3, 41], version, seed=2)
    to_geneformer = geneformer_token_map(pretrained.vocab, tokens)
    to_scforge = np.full(len(tokens), -1)
    to_scforge[to_geneformer[to_geneformer >= 0]] = np.flatnonzero(to_geneformer >= 0)
    ids = torch.from_numpy(to_scforge[gf_ids.numpy()])

    layers = []
    module.backbone.embedding_dropout.register_forward_hook(lambda m, i, o: layers.append(o))
    for block in module.backbone.blocks:
        block.register_forward_hook(lambda m, i, o: layers.append(o))
    with torch.no_grad():
        expected = hf(input_ids=gf_ids, attention_mask=mask.long(), output_hidden_states=True)
        out = module.backbone(ids, mask)
        logits = module.gene_head(out.hidden[mask])  # (M, scforge vocab)
    assert len(layers) == len(expected.hidden_states) == 3
    for ours, theirs in zip(layers, expected.hidden_states):  # embeddings, then each block
        torch.testing.assert_close(ours[mask], theirs[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(
        out.hidden[mask], expected.hidden_states[-1][mask], atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        logits[:, torch.from_numpy(to_scforge)], expected.logits[mask], atol=1e-5, rtol=0
    )
    # tokens the Geneformer model lacks are never predicted
    absent = torch.from_numpy(to_geneformer < 0)
    assert int(absent.sum()) == (2 if version == "V1" else 0)
    assert (torch.softmax(logits, -1)[:, absent] == 0).all()


def test_pytorch_model_bin_is_read_weights_only(tmp_path):
    genes = _protein_coding_genes(50)
    medians = np.linspace(0.5, 3.0, len(genes))
    write_geneformer_dir(tmp_path / "st", genes, medians)
    write_geneformer_dir(tmp_path / "bin", genes, medians, weights="bin")
    assert not (tmp_path / "bin" / "model.safetensors").exists()
    a, b = read_geneformer(tmp_path / "st"), read_geneformer(tmp_path / "bin")
    assert a.state_dict.keys() == b.state_dict.keys()
    for key in a.state_dict:
        torch.testing.assert_close(a.state_dict[key], b.state_dict[key], atol=0, rtol=0)
    assert b.config["imported_from"]["weights"] == "pytorch_model.bin"


class _Payload:
    """Runs ``touch`` on the marker path when unpickled by a full unpickler."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pytorch_model_bin_with_code_is_refused(tmp_path):
    genes = _protein_coding_genes(50)
    write_geneformer_dir(tmp_path / "gf", genes, np.ones(len(genes)), weights="bin")
    marker = tmp_path / "pwned"
    torch.save({"weights": _Payload(marker)}, tmp_path / "gf" / "pytorch_model.bin")
    with pytest.raises(GeneformerImportError, match=r"weights_only=True"):
        read_geneformer(tmp_path / "gf")
    assert not marker.exists()


# -- safe dictionaries -----------------------------------------------------------------------
def test_dictionaries_accept_plain_data_numpy_scalars_and_json(tmp_path):
    values = {"ENSG00000000003": np.float64(1.25), "ENSG00000000005": 2, "ENSG0000000419": 0.5}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"medians{protocol}.pkl"
        path.write_bytes(pickle.dumps(values, protocol=protocol))
        loaded = load_geneformer_dictionary(path, "median")
        assert loaded == {k: float(v) for k, v in values.items()}
        assert all(type(v) is float for v in loaded.values())
    tokens = {"<pad>": np.int64(0), "<mask>": 1, "ENSG00000000003": np.int32(2)}
    (tmp_path / "tokens.pkl").write_bytes(pickle.dumps(tokens))
    assert load_geneformer_dictionary(tmp_path / "tokens.pkl") == {
        "<pad>": 0,
        "<mask>": 1,
        "ENSG00000000003": 2,
    }
    (tmp_path / "tokens.json").write_text(json.dumps({"<pad>": 0, "<mask>": 1, "ENSG1": 2}))
    assert load_geneformer_dictionary(tmp_path / "tokens.json")["ENSG1"] == 2


@pytest.mark.parametrize(
    "payload",
    [
        lambda marker: {"ENSG00000000003": _Payload(marker)},
        lambda marker: {"ENSG00000000003": np.array([1.0, 2.0])},
        lambda marker: {"ENSG00000000003": np.float64(1.0), "x": pickle.PickleBuffer(b"ab")},
        lambda marker: {"ENSG00000000003": np.datetime64("2020-01-01")},
        lambda marker: {"ENSG00000000003": torch.ones(1)},
    ],
    ids=["os.system", "ndarray", "picklebuffer", "datetime-scalar", "tensor"],
)
def test_dictionaries_refuse_anything_else_before_running_it(tmp_path, payload):
    marker = tmp_path / "pwned"
    path = tmp_path / "medians.pkl"
    try:
        path.write_bytes(pickle.dumps(payload(marker), protocol=5))
    except pickle.PicklingError:
        pytest.skip("not picklable here")
    with pytest.raises((UnsafePickleError, GeneformerImportError)) as err:
        load_geneformer_dictionary(path, "median")
    assert not marker.exists()
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("content", "kind", "match"),
    [
        (["ENSG1"], "token", "not a non-empty dictionary"),
        ({"ENSG1": 1.5}, "token", "not a non-negative integer"),
        ({"ENSG1": True}, "median", "not a number"),
        ({"ENSG1": -1.0}, "median", "finite and positive"),
        ({1: 1.0}, "median", "not strings"),
    ],
)
def test_dictionaries_of_the_wrong_shape_are_refused(tmp_path, content, kind, match):
    path = tmp_path / "d.pkl"
    path.write_bytes(pickle.dumps(content))
    with pytest.raises(GeneformerImportError, match=match):
        load_geneformer_dictionary(path, kind)


def test_directory_errors_are_clear(tmp_path):
    genes = _protein_coding_genes(20)
    write_geneformer_dir(tmp_path / "gf", genes, np.ones(len(genes)))
    with pytest.raises(FileNotFoundError, match="No Geneformer model directory"):
        read_geneformer(tmp_path / "absent")
    (tmp_path / "gf" / "gene_median_dictionary_other.pkl").write_bytes(pickle.dumps({"a": 1.0}))
    with pytest.raises(GeneformerImportError, match="Several gene median dictionary"):
        read_geneformer(tmp_path / "gf")
    (tmp_path / "gf" / "gene_median_dictionary_other.pkl").unlink()
    medians = {g: 1.0 for g in genes[1:]}
    (tmp_path / "m.json").write_text(json.dumps(medians))
    with pytest.raises(GeneformerImportError, match=r"1 gene.* have no median"):
        read_geneformer(tmp_path / "gf", gene_median_dictionary=tmp_path / "m.json")
    with pytest.raises(GeneformerImportError, match="model_input_size=500"):
        read_geneformer(tmp_path / "gf", model_input_size=500)


# -- Geneformer's token ids ------------------------------------------------------------------
def _geneformer_tokens(adata, tokens, medians, input_size, special):
    """Geneformer's ``tokenize_anndata`` rule, one cell at a time (the reference).

    The normalisation is Geneformer's own expression on the sparse matrix, with ``n_counts``
    the total counts over all genes. Genes are ranked by descending score; exact ties are
    broken by ascending Geneformer token id (Geneformer's ``np.argsort(-score)`` leaves them
    in quicksort order: the rule both sides can state). Truncation to ``input_size``, with
    ``<cls>`` and ``<eos>`` around ``input_size - 2`` genes for V2.
    """
    ensembl = adata.var["gene_ids"].to_numpy()
    loc = np.flatnonzero([g in medians for g in ensembl])
    norm_factor_vector = np.array([medians[g] for g in ensembl[loc]])
    gene_tokens = np.array([tokens[g] for g in ensembl[loc]])
    n_counts = np.asarray(adata.X.sum(axis=1), dtype=np.float64)  # obs["n_counts"], (k, 1)
    x_norm = sp.csr_matrix(adata.X[:, loc] / n_counts * 10_000 / norm_factor_vector)
    cells, n_tied = [], 0
    for i in range(x_norm.shape[0]):
        row = x_norm[i]
        score, genes = row.data, gene_tokens[row.indices]
        order = np.lexsort((genes, -score))
        # the only freedom is among exact ties: Geneformer's own order has the same scores
        np.testing.assert_array_equal(score[order], score[np.argsort(-score)])
        n_tied += len(score) - len(np.unique(score))
        ranked = genes[order]
        if special:
            ranked = [tokens["<cls>"], *ranked[: input_size - 2], tokens["<eos>"]]
        else:
            ranked = list(ranked[:input_size])
        cells.append(np.asarray(ranked, dtype=np.int64))
    return cells, n_tied


@pytest.mark.parametrize(("version", "size"), [("V1", 64), ("V2", 64), ("V2", 512)])
def test_tokenizer_gives_geneformer_token_ids_on_pbmc3k(cells, pbmc_model_dirs, version, size):
    path = pbmc_model_dirs[version, size]
    tokens = load_geneformer_dictionary(next(path.glob("token_dictionary*")))
    medians = load_geneformer_dictionary(next(path.glob("gene_median*")), "median")
    adata = setup_counts(cells.copy())
    model = ScForge.from_geneformer(str(path), adata, min_coverage=0.0)
    assert model.tokenizer.max_length == size
    expected, n_tied = _geneformer_tokens(adata, tokens, medians, size, version == "V2")
    assert n_tied > 0  # the tie rule is exercised

    batch = model.tokenizer(adata.X, model.gene_match(adata).vocab_ids)
    to_geneformer = geneformer_token_map(model.vocab, tokens)
    truncated = 0
    for i, reference in enumerate(expected):
        ours = to_geneformer[batch.gene_ids[i][batch.padding_mask[i]].numpy()]
        np.testing.assert_array_equal(ours, reference, err_msg=f"cell {i}")
        truncated += len(reference) == size
    assert truncated > 0 if size == 64 else truncated == 0


# -- fine-tuning and saving ------------------------------------------------------------------
@pytest.fixture(scope="module")
def labelled(cells):
    adata = cells.copy()
    for key in ("_scvi_uuid", "_scvi_manager_uuid"):
        adata.uns.pop(key, None)
    ScForge.setup_anndata(adata, layer="counts", labels_key="louvain")
    return adata


def _backbone_weights(model) -> dict[str, torch.Tensor]:
    """Base weights of the backbone (LoRA-wrapped layers keep theirs under ``base_layer``)."""
    return {
        k.replace(".base_layer", ""): v.detach().clone()
        for k, v in model.module.backbone.state_dict().items()
        if "lora_" not in k
    }


@pytest.mark.parametrize("strategy", ["full", "frozen", "gradual_unfreeze", "lora"])
def test_imported_model_fine_tunes_with_every_strategy(
    labelled, pbmc_model_dirs, tmp_path, strategy
):
    path = pbmc_model_dirs["V2", 64]
    model = ScForge.from_geneformer(str(path), labelled, min_coverage=0.0, head_hidden_dim=16)
    assert model.load_report_.initialised  # the new classifier, nothing of the backbone
    # the new classifier, its linear path and its calibration, nothing of the backbone
    assert all(
        k.startswith(("classifier.", "linear_path.", "calibration."))
        for k in model.load_report_.initialised
    )
    before = _backbone_weights(model)
    epochs = 2 if strategy == "gradual_unfreeze" else 1
    model.train(
        max_epochs=epochs,
        strategy=strategy,
        freeze_backbone_epochs=1 if strategy == "gradual_unfreeze" else 0,
        batch_size=64,
        train_size=0.8,
        accelerator="cpu",
        enable_progress_bar=False,
        plan_kwargs={"lr": 1e-3},
    )
    after = _backbone_weights(model)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    if strategy in ("frozen", "lora"):
        assert changed == []
    else:
        assert "blocks.0.attn.q_proj.weight" in changed
    if strategy == "lora":
        lora = {n: p for n, p in model.module.backbone.named_parameters() if "lora_" in n}
        assert lora and all(p.requires_grad for p in lora.values())
        # the adapters got gradients: every lora_B left its zero initialisation
        assert all(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)
        batch = next(iter(model._loader(labelled, np.arange(16))))
        model.module.train()
        out = model.module.inference(**model.module._get_inference_input(batch))
        model.module.classifier(out["embedding"]).sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
        model.module.zero_grad()
        model.module.eval()

    model.predict(labelled)
    assert set(labelled.obs["scforge_prediction"].unique()) <= set(model.class_names_)
    model.save_pretrained(str(tmp_path / "tuned"))
    assert sorted(p.name for p in (tmp_path / "tuned").iterdir()) == [
        "config.json",
        "gene_vocab.json",
        "model.safetensors",
    ]
    reloaded = ScForge.from_pretrained(str(tmp_path / "tuned"), labelled)
    assert reloaded.tokenizer.to_dict() == model.tokenizer.to_dict()
    assert reloaded.vocab == model.vocab and reloaded.vocab.gene_medians_dtype == "float64"
    np.testing.assert_allclose(
        reloaded.get_latent_representation(labelled),
        model.get_latent_representation(labelled),
        atol=1e-5,
    )


def test_cli_import_writes_a_pretrained_directory(cells, pbmc_model_dirs, tmp_path, capsys):
    source = pbmc_model_dirs["V1", 64]
    output = tmp_path / "imported"
    assert main(["import-geneformer", "--model", str(source), "--output", str(output)]) == 0
    assert "Imported Geneformer" in capsys.readouterr().out
    pretrained = read_pretrained(output)
    assert pretrained.config["imported_from"]["format"] == "geneformer"

    adata = setup_counts(cells.copy())
    direct = ScForge.from_geneformer(str(source), adata, min_coverage=0.0)
    loaded = ScForge.from_pretrained(str(output), adata, min_coverage=0.0)
    assert loaded.init_params_["non_kwargs"] == direct.init_params_["non_kwargs"]
    np.testing.assert_array_equal(
        loaded.get_latent_representation(adata), direct.get_latent_representation(adata)
    )

    # one-line errors, exit code 2
    for argv, message in (
        (["--model", str(source), "--output", str(output)], "already exists"),
        (["--model", str(tmp_path / "nope"), "--output", str(tmp_path / "o")], "does not exist"),
    ):
        assert main(["import-geneformer", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("scforge import-geneformer: error:")
        assert message in err[0]
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in source.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "pwned"
    token_file = next(bad.glob("token_dictionary*"))
    token_file.write_bytes(pickle.dumps({"<pad>": _Payload(marker)}))
    assert main(["import-geneformer", "--model", str(bad), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refused to load the global" in err[0] and "system" in err[0]
    assert not marker.exists()


def test_architecture_overrides_are_refused(cells, pbmc_model_dirs):
    from scforge_scvi.io import CheckpointMismatchError

    adata = setup_counts(cells.copy())
    with pytest.raises(CheckpointMismatchError, match=r"norm_position: checkpoint 'post'"):
        ScForge.from_geneformer(
            str(pbmc_model_dirs["V2", 64]),
            adata,
            min_coverage=0.0,
            architecture={"norm_position": "pre"},
        )
    with pytest.raises(GeneformerImportError, match="needs <cls> and <eos>"):
        read_geneformer(pbmc_model_dirs["V1", 64], special_tokens=True)
    without = read_geneformer(pbmc_model_dirs["V2", 64], special_tokens=False)
    assert without.init_params["max_genes"] == 64 and without.init_params["pooling"] == "mean"
