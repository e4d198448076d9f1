"""Tests of the gene vocabulary on real PBMC data and the packaged GENCODE gene list."""

from __future__ import annotations

import json
import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc

from scforge_scvi.data import VocabCoverageError
from scforge_scvi.data._vocab import (
    CLS_ID,
    MASK_ID,
    N_SPECIAL,
    PAD_ID,
    SPECIAL_TOKENS,
    UNK_ID,
    GeneVocab,
)

PBMC3K = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "pbmc3k_raw_labeled.h5ad"


@pytest.fixture(scope="module")
def pbmc68k() -> ad.AnnData:
    return sc.datasets.pbmc68k_reduced()


@pytest.fixture(scope="module")
def pbmc3k():
    if not PBMC3K.exists():
        pytest.skip("pbmc3k_raw_labeled.h5ad not found in ../shared/data")
    adata = ad.read_h5ad(PBMC3K, backed="r")  # only var is needed
    yield adata
    adata.file.close()


@pytest.fixture(scope="module")
def protein_coding() -> GeneVocab:
    return GeneVocab.from_name("human_protein_coding")


def test_special_tokens_come_first(pbmc68k):
    vocab = GeneVocab.from_adata(pbmc68k)
    assert (PAD_ID, CLS_ID, MASK_ID, UNK_ID, N_SPECIAL) == (0, 1, 2, 3, 4)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert vocab.token_to_id(token) == i
        assert vocab.id_to_token(i) == token
    assert (vocab.pad_id, vocab.cls_id, vocab.mask_id, vocab.unk_id) == (0, 1, 2, 3)
    assert vocab.id_to_token(vocab.n_special) == pbmc68k.var_names[0]


def test_vocab_from_pbmc68k(pbmc68k):
    vocab = GeneVocab.from_adata(pbmc68k)
    assert len(vocab) == pbmc68k.n_vars + N_SPECIAL
    assert vocab.genes == list(pbmc68k.var_names)
    assert vocab.symbols is None
    np.testing.assert_array_equal(vocab.gene_ids, np.arange(4, 4 + pbmc68k.n_vars))
    assert vocab.token_to_id("CD3E") == 4 + pbmc68k.var_names.get_loc("CD3E")

    match = vocab.match(pbmc68k)
    assert match.matched_by == "symbol"
    assert match.coverage == match.vocab_coverage == 1.0
    np.testing.assert_array_equal(match.vocab_ids, vocab.gene_ids)


def test_vocab_from_pbmc3k_ensembl_ids(pbmc3k):
    vocab = GeneVocab.from_adata(pbmc3k, gene_key="gene_ids")
    assert vocab.n_genes == pbmc3k.n_vars == 32738
    assert vocab.genes == list(pbmc3k.var["gene_ids"])
    assert vocab.symbols == list(pbmc3k.var_names)
    cd3e = pbmc3k.var.loc["CD3E", "gene_ids"]
    assert vocab.token_to_id("CD3E") == vocab.token_to_id(cd3e) == vocab.token_to_id(cd3e + ".7")
    assert vocab.match(pbmc3k).coverage == 1.0

    # The same genes with Ensembl ids as var_names and symbols in a column.
    by_id = ad.AnnData(
        var=pd.DataFrame({"gene_symbols": pbmc3k.var_names}, index=pbmc3k.var["gene_ids"].values)
    )
    assert GeneVocab.from_adata(by_id).symbols == vocab.symbols
    assert GeneVocab.from_adata(by_id).genes == vocab.genes


def test_human_protein_coding(protein_coding):
    vocab = protein_coding
    assert vocab.n_genes == 19814
    assert vocab.name == "human_protein_coding"
    assert "GENCODE v22" in vocab.source
    assert all(re.fullmatch(r"ENSGR?\d{10,11}", g) for g in vocab.genes)  # no version suffix
    assert vocab.symbols[vocab.genes.index("ENSG00000141510")] == "TP53"
    assert GeneVocab.from_name("human_protein_coding") is vocab  # cached, immutable
    # CD99 has a copy on chrX and, as a pseudoautosomal gene, one on chrY: the first one wins.
    assert vocab.id_to_token(vocab.token_to_id("CD99")) == "ENSG00000002586"
    assert vocab.token_to_id("ENSGR0000002586") > vocab.token_to_id("CD99")


def test_match_pbmc3k_to_protein_coding(pbmc3k, protein_coding):
    by_id = protein_coding.match(pbmc3k, by="ensembl")
    by_symbol = protein_coding.match(pbmc3k, by="symbol")
    assert by_id.data_key == "var['gene_ids']"
    assert by_symbol.data_key == "var_names"
    for match in (by_id, by_symbol):
        assert match.n_genes == 32738
        # pbmc3k also holds ~13k non-coding genes; nearly all protein-coding genes are there.
        assert 0.55 < match.coverage < 0.65
        assert match.vocab_coverage > 0.95
        assert match.n_matched == (match.vocab_ids >= 0).sum()
        assert len(np.unique(match.vocab_ids[match.matched])) == match.n_matched

    genes = np.array(protein_coding.genes)
    symbols = np.array(protein_coding.symbols)
    ids = by_id.vocab_ids[by_id.matched] - N_SPECIAL
    np.testing.assert_array_equal(genes[ids], pbmc3k.var["gene_ids"].to_numpy()[by_id.matched])
    ids = by_symbol.vocab_ids[by_symbol.matched] - N_SPECIAL
    np.testing.assert_array_equal(symbols[ids], pbmc3k.var_names.to_numpy()[by_symbol.matched])
    # Where both match, symbol and Ensembl id almost always name the same gene.
    both = by_id.matched & by_symbol.matched
    assert (by_id.vocab_ids[both] == by_symbol.vocab_ids[both]).mean() > 0.98
    # Symbols shared by several GENCODE genes are reported, not hidden.
    assert "CD99" in by_symbol.ambiguous
    assert not by_id.ambiguous

    auto = protein_coding.match(pbmc3k)
    assert auto.n_matched == max(by_id.n_matched, by_symbol.n_matched)
    assert f"{auto.n_matched:,} of 32,738" in auto.summary()

    with pytest.raises(VocabCoverageError, match=r"Only 58\.\d% \(\d+ of 32738\)") as info:
        protein_coding.match(pbmc3k, by="ensembl", min_coverage=0.9)
    message = str(info.value)
    assert "'human_protein_coding' (matched by ensembl" in message
    assert "at least 90.0% required" in message
    assert "gene_key" in message


def test_match_by_ensembl_ids_in_the_index(pbmc3k, protein_coding):
    # the same genes with Ensembl ids as var_names: matched by id, gene for gene as the column
    by_column = protein_coding.match(pbmc3k, by="ensembl")
    ids = pbmc3k.var["gene_ids"].to_numpy()
    with_symbols = ad.AnnData(var=pd.DataFrame({"gene_symbols": pbmc3k.var_names}, index=ids))
    ids_only = ad.AnnData(var=pd.DataFrame(index=ids))
    for match in (protein_coding.match(with_symbols, by="ensembl"), protein_coding.match(ids_only)):
        assert match.matched_by == "ensembl"
        assert match.data_key == "var_names"
        np.testing.assert_array_equal(match.vocab_ids, by_column.vocab_ids)


def test_low_coverage_raises_at_default_threshold(pbmc68k, pbmc3k):
    small = GeneVocab.from_adata(pbmc68k)
    with pytest.raises(VocabCoverageError, match=r"Only 2\.\d% \(765 of 32738\)"):
        small.match(pbmc3k)
    assert small.match(pbmc3k, min_coverage=0.02).n_matched == 765


def test_symbols_against_ids_only_vocab_raise(pbmc68k, protein_coding):
    ids_only = GeneVocab.from_genes(protein_coding.genes, name="ids_only")
    with pytest.raises(VocabCoverageError, match=r"Only 0\.0% \(0 of 765\).*'ids_only'") as info:
        ids_only.match(pbmc68k, by="symbol")
    assert "var_names look like gene symbols" in str(info.value)
    with pytest.raises(ValueError, match=r"by='ensembl' but neither adata\.var_names"):
        ids_only.match(pbmc68k, by="ensembl")


def test_match_ignores_ensembl_versions(pbmc3k, protein_coding):
    ids = list(pbmc3k.var["gene_ids"])
    versioned = [f"{g}.{i % 20 + 1}" for i, g in enumerate(ids)]
    plain = protein_coding.match(ids, min_coverage=0.5)
    with_versions = protein_coding.match(versioned, min_coverage=0.5)
    assert with_versions.matched_by == "ensembl"
    np.testing.assert_array_equal(plain.vocab_ids, with_versions.vocab_ids)


def test_reordered_genes_map_to_permuted_ids(pbmc68k, protein_coding):
    reference = protein_coding.match(pbmc68k)
    perm = np.random.default_rng(0).permutation(pbmc68k.n_vars)
    shuffled = protein_coding.match(pbmc68k[:, perm])
    np.testing.assert_array_equal(shuffled.vocab_ids, reference.vocab_ids[perm])
    assert shuffled.n_matched == reference.n_matched


def test_duplicate_data_genes_are_reported(pbmc68k):
    vocab = GeneVocab.from_adata(pbmc68k)
    first, gene = pbmc68k.var_names[0], pbmc68k.var_names[100]
    names = [*pbmc68k.var_names[:50], gene, "NOT_A_GENE", gene, first]
    with pytest.warns(UserWarning, match=r"2 data gene\(s\) name a vocabulary gene already"):
        match = vocab.match(names)
    assert match.duplicates == [gene, first]
    np.testing.assert_array_equal(match.vocab_ids[50:], [vocab.token_to_id(gene), -1, -1, -1])
    assert match.vocab_ids[0] == vocab.token_to_id(first)
    assert match.n_matched == 51
    assert "2 repeated an already matched gene" in match.summary()


def test_duplicate_genes_when_building_raise(pbmc68k):
    with pytest.raises(ValueError, match=r"'CD3E'.*var_names_make_unique"):
        GeneVocab.from_genes(["CD3E", "MS4A1", "CD3E"])
    with pytest.raises(ValueError, match="ENSG00000141510"):
        GeneVocab.from_genes(["ENSG00000141510.16", "ENSG00000141510.17"])
    adata = pbmc68k[:, :3].copy()
    adata.var_names = ["A", "B", "A"]
    with pytest.raises(ValueError, match=r"adata\.var_names.*'A'"):
        GeneVocab.from_adata(adata)


def test_json_round_trip_with_medians(tmp_path, protein_coding):
    vocab = protein_coding
    medians = np.random.default_rng(0).uniform(0.1, 5.0, len(vocab)).astype(np.float32)
    with_medians = vocab.with_gene_medians(medians)
    assert vocab.gene_medians is None  # a copy, the original is unchanged

    path = tmp_path / "gene_vocab.json"
    with_medians.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["gene_vocab.json"]  # no temp file left
    loaded = GeneVocab.load(path)
    assert loaded == with_medians
    assert loaded != vocab
    assert loaded.gene_medians.dtype == np.float32
    np.testing.assert_array_equal(loaded.gene_medians, medians)
    assert GeneVocab.from_file(path) == with_medians
    on_disk = json.loads(path.read_text())
    assert on_disk["format"] == "scforge-gene-vocab" and on_disk["format_version"] == 1
    assert on_disk["special_tokens"] == list(SPECIAL_TOKENS)


def test_gene_medians_are_validated(pbmc68k):
    vocab = GeneVocab.from_adata(pbmc68k)
    with pytest.raises(ValueError, match=r"769 values .*prepend 4 entries"):
        vocab.with_gene_medians(np.ones(pbmc68k.n_vars))
    bad = np.ones(len(vocab))
    bad[10] = 0.0
    with pytest.raises(ValueError, match=rf"positive.*{pbmc68k.var_names[6]!r}"):
        vocab.with_gene_medians(bad)
    bad[10] = np.nan
    with pytest.raises(ValueError, match="finite"):
        vocab.with_gene_medians(bad)
    medians = vocab.with_gene_medians(np.ones(len(vocab))).gene_medians
    with pytest.raises(ValueError, match="read-only"):
        medians[5] = 2.0


def test_corrupt_or_foreign_json_raises_clear_error(tmp_path, pbmc68k):
    path = tmp_path / "gene_vocab.json"
    GeneVocab.from_adata(pbmc68k).save(path)
    path.write_text(path.read_text()[:500])  # truncated
    with pytest.raises(ValueError, match=r"not valid JSON .*truncated"):
        GeneVocab.load(path)
    path.write_text(json.dumps({"model_type": "bert", "vocab_size": 30522}))
    with pytest.raises(ValueError, match="not a scforge gene vocabulary"):
        GeneVocab.from_file(path)
    content = GeneVocab.from_adata(pbmc68k).to_dict()
    content["format_version"] = 99
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match="format_version 99"):
        GeneVocab.load(path)


def test_text_files(tmp_path, protein_coding):
    tsv = tmp_path / "genes.tsv"
    rows = [f"{g}\t{s}" for g, s in zip(protein_coding.genes, protein_coding.symbols)]
    tsv.write_text("# my genes\nensembl_id\tsymbol\n" + "\n".join(rows) + "\n")
    vocab = GeneVocab.from_file(tsv)
    assert vocab.genes == protein_coding.genes
    assert vocab.symbols == protein_coding.symbols

    txt = tmp_path / "genes.txt"
    txt.write_text("CD3E\nMS4A1\n\nLYZ\n")
    vocab = GeneVocab.from_file(txt)
    assert vocab.genes == ["CD3E", "MS4A1", "LYZ"] and vocab.symbols is None
    assert vocab.token_to_id("LYZ") == 6


def test_unknown_names(protein_coding):
    with pytest.raises(
        ValueError, match=r"Unknown gene vocabulary 'mouse'.*'human_protein_coding'"
    ):
        GeneVocab.from_name("mouse")
    with pytest.raises(KeyError, match="NOT_A_GENE"):
        protein_coding.token_to_id("NOT_A_GENE")
    assert "TP53" in protein_coding and "NOT_A_GENE" not in protein_coding


def test_float64_medians_round_trip_exactly(tmp_path, protein_coding):
    medians = np.random.default_rng(0).uniform(0.1, 5.0, len(protein_coding))  # float64
    vocab = GeneVocab(protein_coding.genes, gene_medians=medians, gene_medians_dtype="float64")
    assert vocab.gene_medians.dtype == np.float64 and vocab.gene_medians_dtype == "float64"
    vocab.save(tmp_path / "v.json")
    assert json.loads((tmp_path / "v.json").read_text())["gene_medians_dtype"] == "float64"
    loaded = GeneVocab.load(tmp_path / "v.json")
    assert loaded == vocab
    np.testing.assert_array_equal(loaded.gene_medians, medians)  # bit for bit
    assert loaded.with_gene_medians(medians).gene_medians_dtype == "float64"
    # float32, the default, is neither written nor equal to float64 medians
    vocab32 = protein_coding.with_gene_medians(medians)
    assert "gene_medians_dtype" not in vocab32.to_dict()
    assert vocab32 != vocab
    with pytest.raises(ValueError, match="gene_medians_dtype"):
        GeneVocab(protein_coding.genes, gene_medians_dtype="float16")
