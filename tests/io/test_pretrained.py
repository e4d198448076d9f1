"""Pretrained directories: clear errors on bad input, complete directories on every save."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

from helpers import setup_counts
from scforge_scvi import ScForge
from scforge_scvi.data import VocabCoverageError
from scforge_scvi.io import CheckpointMismatchError, read_pretrained, write_pretrained

TINY = {"hidden_dim": 32, "num_layers": 1, "num_heads": 2, "max_genes": 64}
FILES = ["config.json", "gene_vocab.json", "model.safetensors"]


@pytest.fixture(scope="module")
def counts(_pbmc68k_counts_once):
    return setup_counts(_pbmc68k_counts_once.copy())


@pytest.fixture(scope="module")
def saved(counts, tmp_path_factory):
    """An untrained tiny model saved as a pretrained directory (weights are what matter)."""
    torch.manual_seed(0)
    model = ScForge(counts, **TINY)
    path = tmp_path_factory.mktemp("pretrained") / "tiny"
    model.save_pretrained(str(path))
    return path


def test_other_architecture_names_every_differing_field(saved, counts):
    with pytest.raises(CheckpointMismatchError) as err:
        ScForge.from_pretrained(str(saved), counts, hidden_dim=64, num_layers=2, num_heads=2)
    message = str(err.value)
    assert message.startswith("Checkpoint dimension mismatch")
    assert re.search(r"hidden_dim\D+32\D+64", message)
    assert re.search(r"num_layers\D+1\D+2", message)
    assert "num_heads" not in message  # equal to the checkpoint's: not a difference


@pytest.mark.parametrize("keep", [0.5, 0.001])
def test_truncated_weights_raise_and_build_no_model(saved, counts, tmp_path, monkeypatch, keep):
    path = tmp_path / "truncated"
    shutil.copytree(saved, path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: max(1, int(len(data) * keep))])

    def no_model(*args, **kwargs):
        raise AssertionError("no model may be built from a corrupt checkpoint")

    monkeypatch.setattr(ScForge, "__init__", no_model)
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated or corrupt"):
        ScForge.from_pretrained(str(path), counts)


def test_low_vocabulary_coverage_is_rejected_with_the_coverage(saved, counts):
    query = counts.copy()
    n_renamed = int(0.8 * query.n_vars)
    names = query.var_names.to_numpy().astype(object)
    names[:n_renamed] = [f"NOT_A_GENE_{i}" for i in range(n_renamed)]
    query.var_names = names
    setup_counts(query)
    coverage = (query.n_vars - n_renamed) / query.n_vars
    with pytest.raises(VocabCoverageError, match=re.escape(f"{coverage:.1%}")):
        ScForge.from_pretrained(str(saved), query)


def test_saving_over_a_directory_leaves_a_complete_one(saved, counts, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(saved, path)
    torch.manual_seed(1)
    other = ScForge(counts, **TINY)
    other.save_pretrained(str(path))
    assert sorted(p.name for p in path.iterdir()) == FILES
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary leftovers
    reread = read_pretrained(path).state_dict
    for key, value in other.module.state_dict().items():
        torch.testing.assert_close(reread[key], value, rtol=0, atol=0)
    before = read_pretrained(saved).state_dict
    assert any(not torch.equal(before[k], reread[k]) for k in reread)
    loaded = ScForge.from_pretrained(str(path), counts)
    np.testing.assert_array_equal(
        loaded.get_latent_representation(indices=np.arange(64)),
        other.get_latent_representation(indices=np.arange(64)),
    )


def test_no_overwrite_refuses_an_existing_path(saved, counts):
    pretrained = read_pretrained(saved)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_pretrained(
            saved, pretrained.config, pretrained.vocab, pretrained.state_dict, overwrite=False
        )
    assert sorted(p.name for p in saved.iterdir()) == FILES


def test_freezing_a_newly_initialised_parameter_is_an_error(saved, counts, tmp_path):
    """A backbone tensor missing from the checkpoint is reported and may not stay frozen."""
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    shutil.copytree(saved, partial)
    tensors = load_file(str(partial / "model.safetensors"))
    missing = "backbone.blocks.0.attn.q_proj.weight"
    del tensors[missing]
    save_file(
        tensors, str(partial / "model.safetensors"), metadata={"format": "scforge-pretrained"}
    )

    labelled = counts.copy()
    for key in ("_scvi_uuid", "_scvi_manager_uuid"):
        labelled.uns.pop(key, None)
    ScForge.setup_anndata(labelled, layer="counts", labels_key="louvain")
    model = ScForge.from_pretrained(str(partial), labelled)
    assert missing in model.load_report_.initialised
    with pytest.raises(ValueError, match="still random"):
        model.train(max_epochs=1, strategy="frozen", enable_progress_bar=False)


def test_max_seq_len_counts_genes_and_old_directories_load(counts, tmp_path):
    """``max_seq_len`` counts genes like ``max_genes``; version-1 directories counted <cls>."""
    torch.manual_seed(0)
    ranked = {**TINY, "tokenizer": "rank_value", "architecture": {"max_seq_len": 80}}
    model = ScForge(counts, **ranked)  # rank values: position embeddings
    assert model.backbone_config.max_seq_len == 81  # 80 genes + <cls>
    with pytest.raises(ValueError, match="max_seq_len=63 is smaller than max_genes=64"):
        ScForge(counts, **{**ranked, "architecture": {"max_seq_len": 63}})
    expected = model.get_latent_representation(counts)

    path = tmp_path / "v1"
    model.save_pretrained(str(path))
    config = json.loads((path / "config.json").read_text())
    assert config["format_version"] == 2 and config["init_params"]["max_seq_len"] == 80
    config["format_version"] = 1  # as version 1 wrote it: positions, <cls> counted
    config["init_params"]["max_seq_len"] = 81
    (path / "config.json").write_text(json.dumps(config))

    assert read_pretrained(path).init_params["max_seq_len"] == 80
    loaded = ScForge.from_pretrained(str(path), counts)
    assert loaded.backbone_config.max_seq_len == 81
    np.testing.assert_allclose(loaded.get_latent_representation(counts), expected, atol=1e-5)
