"""Import a public Geneformer model directory as an scforge pretrained model.

A Geneformer release is a Hugging Face ``BertForMaskedLM`` directory (``config.json`` plus
``model.safetensors`` or ``pytorch_model.bin``) and two dictionaries: the token dictionary
(Ensembl id -> token id, with ``<pad>``, ``<mask>`` and, for V2 models, ``<cls>`` and
``<eos>``) and the gene median dictionary (Ensembl id -> non-zero median of normalised
expression, Geneformer's rank-value scale). :func:`read_geneformer` turns them into a
:class:`~scforge_scvi.io.Pretrained`: the same thing :func:`read_pretrained` returns for an
scforge directory, so that :meth:`ScForge.from_geneformer` and ``scforge import-geneformer``
share everything after it.

Nothing is executed while loading. Weights are read with safetensors, or with
``torch.load(weights_only=True)`` for ``pytorch_model.bin``; the dictionaries are JSON, or
pickles read by :class:`RestrictedUnpickler`, which builds plain dicts, strings and numbers
and refuses every other object.

Token ids. scforge vocabularies start with ``<pad>``, ``<cls>``, ``<mask>``, ``<unk>`` (ids 0
to 3), then the genes. Geneformer's genes keep their order (sorted by Geneformer token id), its
``<pad>``, ``<mask>`` and ``<cls>`` go to scforge's, and its ``<eos>`` goes to the ``<unk>``
slot (id 3), which scforge's tokenizers use as end-of-sequence (``append_eos``). Embedding
rows and masked-LM biases are permuted accordingly; :func:`geneformer_token_map` gives the
Geneformer id of every scforge id. Tokens a V1 model lacks (``<cls>``, ``<unk>``) get a zero
embedding row and a masked-LM bias of -10,000, so the predicted distribution over
Geneformer's tokens is unchanged.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scforge_scvi._logging import logger
from scforge_scvi.data import GeneVocab
from scforge_scvi.data._vocab import CLS_ID, MASK_ID, N_SPECIAL, PAD_ID, UNK_ID

from ._pretrained import Pretrained

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
TORCH_BIN_NAME = "pytorch_model.bin"
#: masked-LM bias of scforge tokens that the Geneformer model does not have
ABSENT_TOKEN_BIAS = -1e4
#: default ``min_coverage`` of imported models (see :meth:`ScForge.from_geneformer`)
IMPORT_MIN_COVERAGE = 0.25
_HIDDEN_ACTS = ("gelu", "relu")  # exact (erf) GELU: transformers' "gelu"; and ReLU
_END_TOKENS = ("<eos>", "<sep>")  # some Geneformer releases named the end token <sep>
_SPECIAL_RE = re.compile(r"^<[^<>]+>$")


class GeneformerImportError(ValueError):
    """A Geneformer directory or dictionary that cannot be imported as it is."""


class UnsafePickleError(GeneformerImportError):
    """A pickle asked for an object other than plain dicts, strings and numbers."""


# -- safe dictionaries ---------------------------------------------------------------------
def _numpy_dtype(spec: Any, align: bool = False, copy: bool = True) -> np.dtype:
    """``numpy.dtype`` as a pickle rebuilds it, for plain numeric (bool/int/float) dtypes."""
    if not isinstance(spec, str):
        raise UnsafePickleError(f"refused numpy dtype spec {spec!r} (not a type code)")
    dtype = np.dtype(spec)
    if dtype.kind not in "biuf" or dtype.fields is not None or dtype.subdtype is not None:
        raise UnsafePickleError(f"refused numpy dtype {dtype!r}: only numeric scalars")
    return np.dtype(spec, bool(align), bool(copy))


def _numpy_scalar(dtype: Any, data: Any = None) -> int | float | bool:
    """``numpy.core.multiarray.scalar``: a numeric numpy scalar, returned as a Python number."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf":
        raise UnsafePickleError(f"refused numpy scalar of dtype {dtype!r}")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise UnsafePickleError("refused numpy scalar whose data is not its raw bytes")
    return np.frombuffer(data, dtype=dtype)[0].item()


def _latin1_bytes(text: Any, encoding: Any = "latin1") -> bytes:
    """``_codecs.encode(str, "latin1")``: how pickle protocols 0-2 spell a numpy scalar's bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError("refused _codecs.encode other than of a str to latin1 bytes")
    return text.encode("latin1")


# numpy scalars are pickled as scalar(dtype(...), raw bytes); numpy >= 2 writes the
# numpy._core path, numpy 1.x numpy.core; protocols 0-2 build the bytes with _codecs.encode.
# Nothing else is ever looked up.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _numpy_dtype,
    ("_codecs", "encode"): _latin1_bytes,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds plain data only.

    Dicts, lists, tuples, strings, bytes, numbers, booleans and ``None`` come from pickle
    opcodes and need no lookup. The only globals resolved are ``numpy.dtype`` and numpy's
    scalar constructor, restricted to numeric dtypes (numpy ``float64`` and ``int64``
    values, which dictionaries written with numpy hold), and ``_codecs.encode`` of a string
    to latin-1 bytes (how pickle protocols 0 to 2 write a scalar's raw bytes); such a scalar
    is returned as the equal Python number. Any other global (a class, a function such as ``os.system``) and
    any persistent id raise :class:`UnsafePickleError` before anything is called.
    """

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise UnsafePickleError(
                f"refused to load the global {module}.{name}: only plain dicts, strings and "
                "numbers are read from Geneformer dictionaries"
            )
        return allowed

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refused a pickle persistent id")


def _safe_unpickle(data: bytes) -> Any:
    return RestrictedUnpickler(io.BytesIO(data)).load()


def load_geneformer_dictionary(path: str | Path, kind: str = "token") -> dict[str, Any]:
    """Read a Geneformer dictionary without running code.

    Parameters
    ----------
    path
        A ``.json`` file, or a pickle (``.pkl``) read by :class:`RestrictedUnpickler`.
    kind
        ``"token"`` (values must be integer token ids) or ``"median"`` (values must be finite
        positive numbers).

    Returns
    -------
    A dict with string keys and Python ``int`` (tokens) or ``float`` (medians) values.

    Raises
    ------
    UnsafePickleError
        If the pickle asks for anything other than plain data.
    GeneformerImportError
        If the file is not a dictionary of the expected kind.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No Geneformer {kind} dictionary at '{path}'.")
    raw = path.read_bytes()
    if path.suffix.lower() == ".json":
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise GeneformerImportError(f"'{path}' is not valid JSON ({err}).") from None
    else:
        try:
            obj = _safe_unpickle(raw)
        except UnsafePickleError as err:
            raise UnsafePickleError(f"'{path}': {err}.") from None
        except Exception as err:  # truncated or not a pickle at all
            raise GeneformerImportError(
                f"'{path}' could not be read as a pickled dictionary ({type(err).__name__}: {err})."
            ) from None
    return _check_dictionary(obj, path, kind)


def _check_dictionary(obj: Any, path: Path, kind: str) -> dict[str, Any]:
    if not isinstance(obj, dict) or not obj:
        raise GeneformerImportError(
            f"'{path}' holds {type(obj).__name__}, not a non-empty dictionary of "
            f"{'gene -> token id' if kind == 'token' else 'gene -> median'}."
        )
    bad_keys = [k for k in obj if not isinstance(k, str)]
    if bad_keys:
        raise GeneformerImportError(
            f"'{path}' has keys that are not strings, e.g. {bad_keys[0]!r}."
        )
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise GeneformerImportError(
                f"'{path}': the value of {key!r} is {type(value).__name__}, not a number."
            )
        if kind == "token":
            if not float(value).is_integer() or value < 0:
                raise GeneformerImportError(
                    f"'{path}': token id of {key!r} is {value!r}, not a non-negative integer."
                )
            out[key] = int(value)
        else:
            if not (math.isfinite(value) and value > 0):
                raise GeneformerImportError(
                    f"'{path}': the median of {key!r} is {value!r}; medians must be finite "
                    "and positive."
                )
            out[key] = float(value)
    return out


# -- the directory -------------------------------------------------------------------------
def _find_dictionary(
    directory: Path, given: str | Path | None, patterns: tuple[str, ...], what: str, option: str
) -> Path:
    if given is not None:
        return Path(given)
    found = sorted(
        {
            p
            for pattern in patterns
            for p in directory.iterdir()
            if p.is_file()
            and pattern in p.name.lower()
            and p.suffix.lower() in (".pkl", ".pickle", ".json")
        }
    )
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(
            f"No {what} in '{directory}' (a .pkl or .json file whose name contains "
            f"'{patterns[0]}'); pass its path with {option}. Geneformer ships it in the "
            "geneformer/ package folder of its repository, next to the model folders."
        )
    raise GeneformerImportError(
        f"Several {what} files in '{directory}' ({', '.join(p.name for p in found)}); pass the "
        f"one that belongs to this model with {option}."
    )


def _read_config(directory: Path) -> dict[str, Any]:
    file = directory / "config.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"'{directory}' is not a Geneformer model directory: no config.json."
        )
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise GeneformerImportError(f"{file} is not valid JSON ({err}).") from None
    if config.get("model_type") != "bert":
        raise GeneformerImportError(
            f"{file} describes a {config.get('model_type')!r} model; Geneformer models are "
            "'bert' (BertForMaskedLM)."
        )
    problems = []
    if config.get("position_embedding_type", "absolute") != "absolute":
        problems.append(f"position_embedding_type {config['position_embedding_type']!r}")
    if config.get("is_decoder", False) or config.get("add_cross_attention", False):
        problems.append("a decoder (is_decoder / add_cross_attention)")
    if config.get("hidden_act", "gelu") not in _HIDDEN_ACTS:
        problems.append(f"hidden_act {config['hidden_act']!r}")
    if problems:
        raise GeneformerImportError(
            f"{file}: {', '.join(problems)} is not supported; scforge imports BERT encoders with "
            f"absolute positions and hidden_act in {_HIDDEN_ACTS}."
        )
    missing = [
        k
        for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
        if k not in config
    ]
    if missing:
        raise GeneformerImportError(f"{file} lacks the BERT key(s) {missing}.")
    return config


def _read_weights(directory: Path) -> tuple[dict[str, torch.Tensor], str]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if (directory / SAFETENSORS_NAME).is_file():
            return load_file(str(directory / SAFETENSORS_NAME)), SAFETENSORS_NAME
        if (directory / SAFETENSORS_INDEX_NAME).is_file():
            index = json.loads((directory / SAFETENSORS_INDEX_NAME).read_text())
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(index["weight_map"].values())):
                state.update(load_file(str(directory / shard)))
            return state, SAFETENSORS_INDEX_NAME
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        raise GeneformerImportError(
            f"The safetensors weights in '{directory}' are truncated or corrupt ({err})."
        ) from None
    if (directory / TORCH_BIN_NAME).is_file():
        try:
            state = torch.load(directory / TORCH_BIN_NAME, map_location="cpu", weights_only=True)
        except Exception as err:  # weights_only refuses anything but tensors and plain data
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise GeneformerImportError(
                f"{directory / TORCH_BIN_NAME} could not be read with torch.load(weights_only="
                f"True) ({reason}); nothing else is tried, since a full unpickling could run "
                "code."
            ) from None
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise GeneformerImportError(f"{directory / TORCH_BIN_NAME} is not a state dict.")
        return state, TORCH_BIN_NAME
    raise FileNotFoundError(
        f"No weights in '{directory}': expected {SAFETENSORS_NAME} (or {TORCH_BIN_NAME})."
    )


# -- vocabulary ------------------------------------------------------------------------------
def _specials(tokens: dict[str, int], path: Path) -> dict[str, str]:
    """scforge special token -> Geneformer token name, for those the dictionary has."""
    specials = {name for name in tokens if _SPECIAL_RE.match(name)}
    end = next((name for name in _END_TOKENS if name in specials), None)
    known = {"<pad>", "<mask>", "<cls>", *([end] if end else [])}
    unknown = sorted(specials - known)
    if unknown:
        raise GeneformerImportError(
            f"'{path}' has special token(s) {unknown} that scforge cannot place; it knows "
            "<pad>, <mask>, <cls> and <eos>."
        )
    missing = [name for name in ("<pad>", "<mask>") if name not in tokens]
    if missing:
        raise GeneformerImportError(f"'{path}' lacks the special token(s) {missing}.")
    mapping = {"<pad>": "<pad>", "<mask>": "<mask>"}
    if "<cls>" in tokens:
        mapping["<cls>"] = "<cls>"
    if end is not None:
        mapping["<unk>"] = end  # the end-of-sequence slot, see the module notes
    return mapping


_SCFORGE_SPECIAL_IDS = {"<pad>": PAD_ID, "<cls>": CLS_ID, "<mask>": MASK_ID, "<unk>": UNK_ID}


def _build_vocab(
    tokens: dict[str, int],
    medians: dict[str, float],
    specials: dict[str, str],
    token_file: Path,
    median_file: Path,
) -> tuple[GeneVocab, np.ndarray]:
    special_names = set(specials.values())
    ids = list(tokens.values())
    if len(set(ids)) != len(ids):
        raise GeneformerImportError(f"'{token_file}' gives the same token id to several genes.")
    genes = sorted((name for name in tokens if name not in special_names), key=tokens.__getitem__)
    no_median = [g for g in genes if g not in medians]
    if no_median:
        raise GeneformerImportError(
            f"{len(no_median)} gene(s) of '{token_file.name}' have no median in "
            f"'{median_file.name}' (e.g. {no_median[:3]}); the two dictionaries must belong to "
            "the same Geneformer model."
        )
    gene_medians = np.ones(N_SPECIAL + len(genes), dtype=np.float64)
    gene_medians[N_SPECIAL:] = [medians[g] for g in genes]
    vocab = GeneVocab(
        genes,
        gene_medians=gene_medians,
        gene_medians_dtype="float64",
        source=f"Geneformer {token_file.name} + {median_file.name}",
        name="geneformer",
    )
    gf_ids = np.full(len(vocab), -1, dtype=np.int64)
    for ours, theirs in specials.items():
        gf_ids[_SCFORGE_SPECIAL_IDS[ours]] = tokens[theirs]
    gf_ids[N_SPECIAL:] = [tokens[g] for g in genes]
    return vocab, gf_ids


def geneformer_token_map(vocab: GeneVocab, token_dictionary: dict[str, int]) -> np.ndarray:
    """Geneformer token id of every scforge token id of an imported vocabulary.

    Parameters
    ----------
    vocab
        The vocabulary of a model imported with :func:`read_geneformer`.
    token_dictionary
        Geneformer's token dictionary (e.g. from :func:`load_geneformer_dictionary`).

    Returns
    -------
    int64 array of length ``len(vocab)``: ``map[scforge_id]`` is the Geneformer id, ``-1``
    for a token the Geneformer model does not have (``<cls>`` and ``<unk>`` of V1 models).
    Index it with tokenised ``gene_ids`` to compare with Geneformer's ``input_ids``.
    """
    specials = _specials(token_dictionary, Path("token dictionary"))
    out = np.full(len(vocab), -1, dtype=np.int64)
    for ours, theirs in specials.items():
        out[_SCFORGE_SPECIAL_IDS[ours]] = token_dictionary[theirs]
    out[N_SPECIAL:] = [token_dictionary.get(g, -1) for g in vocab.genes]
    return out


# -- weights -------------------------------------------------------------------------------
def _convert_state_dict(
    state: dict[str, torch.Tensor],
    config: dict[str, Any],
    gf_ids: np.ndarray,
    source: str,
) -> dict[str, torch.Tensor]:
    """Map BERT tensor names (and Geneformer token ids) onto the scforge module's."""
    if any(k.startswith("bert.") for k in state):
        encoder = {k[len("bert.") :]: v for k, v in state.items() if k.startswith("bert.")}
    else:  # a BertModel directory: no prefix, no masked-LM head
        encoder = {k: v for k, v in state.items() if k.startswith(("embeddings.", "encoder."))}
    used: set[str] = set()

    def take(name: str, where: dict[str, torch.Tensor] = encoder) -> torch.Tensor:
        for candidate in (name, name.replace(".weight", ".gamma").replace(".bias", ".beta")):
            if candidate in where:
                used.add(candidate)
                return where[candidate].detach().to(torch.float32)
        raise GeneformerImportError(f"{source} lacks the weight '{name}'.")

    rows = torch.from_numpy(gf_ids)
    present = rows >= 0

    def permute(table: torch.Tensor, fill: float) -> torch.Tensor:
        if int(gf_ids.max()) >= table.shape[0]:
            raise GeneformerImportError(
                f"The token dictionary has token id {int(gf_ids.max())}, but the model has only "
                f"{table.shape[0]} embedding rows (config vocab_size {config['vocab_size']})."
            )
        out = torch.full((len(gf_ids), *table.shape[1:]), fill, dtype=table.dtype)
        out[present] = table[rows[present]]
        return out

    word = take("embeddings.word_embeddings.weight")
    out: dict[str, torch.Tensor] = {"backbone.gene_embedding.weight": permute(word, 0.0)}
    position = take("embeddings.position_embeddings.weight")
    if "embeddings.token_type_embeddings.weight" in encoder:
        # token_type_ids are all 0 in Geneformer: fold that row into every position
        position = position + take("embeddings.token_type_embeddings.weight")[0]
    out["backbone.position_embedding.weight"] = position
    for suffix in ("weight", "bias"):
        out[f"backbone.embedding_norm.{suffix}"] = take(f"embeddings.LayerNorm.{suffix}")
    names = {
        "attn.q_proj": "attention.self.query",
        "attn.k_proj": "attention.self.key",
        "attn.v_proj": "attention.self.value",
        "attn.out_proj": "attention.output.dense",
        "norm1": "attention.output.LayerNorm",
        "ffn.linear1": "intermediate.dense",
        "ffn.linear2": "output.dense",
        "norm2": "output.LayerNorm",
    }
    for i in range(config["num_hidden_layers"]):
        for ours, theirs in names.items():
            for suffix in ("weight", "bias"):
                out[f"backbone.blocks.{i}.{ours}.{suffix}"] = take(
                    f"encoder.layer.{i}.{theirs}.{suffix}"
                )

    head = {
        k[len("cls.predictions.") :]: v
        for k, v in state.items()
        if k.startswith("cls.predictions.")
    }
    if head:
        for ours, theirs in (
            ("transform.dense", "transform.dense"),
            ("transform.norm", "transform.LayerNorm"),
        ):
            for suffix in ("weight", "bias"):
                out[f"gene_head.{ours}.{suffix}"] = take(f"{theirs}.{suffix}", head)
        bias = head.get("bias", head.get("decoder.bias"))
        if bias is None:
            raise GeneformerImportError(f"{source} lacks the masked-LM output bias.")
        used.update(k for k in ("bias", "decoder.bias") if k in head)
        out["gene_head.bias"] = permute(bias.detach().to(torch.float32), ABSENT_TOKEN_BIAS)
        decoder = head.get("decoder.weight")
        if decoder is not None:
            used.add("decoder.weight")
            if not torch.equal(decoder.to(torch.float32), word):
                raise GeneformerImportError(
                    f"{source} has a masked-LM decoder not tied to the word embeddings; scforge "
                    "ties them, as Geneformer does."
                )
    else:
        logger.warning(
            f"{source} has no masked-LM head (cls.predictions.*): the gene head is newly "
            "initialised. Fine-tuning a task head is unaffected."
        )
    ignored = sorted(
        {k for k in encoder if k not in used}
        | {f"cls.predictions.{k}" for k in head if k not in used}
    )
    unexpected = [
        k for k in ignored if k.startswith(("embeddings.", "encoder.")) and "position_ids" not in k
    ]
    if unexpected:
        raise GeneformerImportError(
            f"{source} has encoder weights scforge does not know how to place: {unexpected[:5]}."
        )
    others = [
        k
        for k in state
        if not k.startswith(("bert.", "cls.predictions.", "embeddings.", "encoder."))
    ]
    if ignored or others:
        logger.info(
            f"Not imported (not part of the encoder or its masked-LM head): {sorted(set(ignored) | set(others))[:8]}."
        )
    return out


# -- entry point -----------------------------------------------------------------------------
def read_geneformer(
    path: str | Path,
    *,
    token_dictionary: str | Path | None = None,
    gene_median_dictionary: str | Path | None = None,
    model_input_size: int | None = None,
    special_tokens: bool | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> Pretrained:
    """Read a Geneformer model directory as an scforge :class:`Pretrained` model.

    Parameters
    ----------
    path
        Directory with ``config.json`` (BERT) and ``model.safetensors`` (or
        ``model.safetensors.index.json`` and its shards, or ``pytorch_model.bin``).
    token_dictionary, gene_median_dictionary
        The model's dictionaries (``.pkl`` or ``.json``); default: the only file in ``path``
        whose name contains ``token_dictionary`` / ``gene_median`` (``median``).
    model_input_size
        Longest input in tokens, special tokens included (Geneformer's ``model_input_size``);
        default ``max_position_embeddings``.
    special_tokens
        Prepend ``<cls>`` and append ``<eos>`` (V2 models); default: when the token
        dictionary has both.
    defaults
        Init arguments of the model class the directory is read for (``ScForge``'s
        keyword defaults), stored under the imported settings so that the directory pins
        every setting; default: the imported settings only.

    Returns
    -------
    The pretrained model: ``config["init_params"]`` rebuild it with
    :class:`~scforge_scvi.ScForge`, ``config["imported_from"]`` records the source.
    """
    from scforge_scvi.nn import BackboneConfig

    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"No Geneformer model directory at '{directory}'.")
    config = _read_config(directory)
    token_file = _find_dictionary(
        directory,
        token_dictionary,
        ("token_dictionary", "token_dict"),
        "token dictionary",
        "token_dictionary= (--token-dictionary)",
    )
    median_file = _find_dictionary(
        directory,
        gene_median_dictionary,
        ("gene_median", "median"),
        "gene median dictionary",
        "gene_median_dictionary= (--gene-median-dictionary)",
    )
    tokens = load_geneformer_dictionary(token_file, "token")
    medians = load_geneformer_dictionary(median_file, "median")
    specials = _specials(tokens, token_file)
    has_special = "<cls>" in specials and "<unk>" in specials
    if special_tokens is None:
        special_tokens = has_special
    if special_tokens and not has_special:
        raise GeneformerImportError(
            f"special_tokens=True needs <cls> and <eos> in '{token_file.name}'; it lacks at "
            "least one of them (a V1 dictionary?)."
        )
    vocab, gf_ids = _build_vocab(tokens, medians, specials, token_file, median_file)

    max_positions = int(config.get("max_position_embeddings", 512))
    input_size = max_positions if model_input_size is None else int(model_input_size)
    n_special = 2 * int(special_tokens)
    if not n_special < input_size <= max_positions:
        raise GeneformerImportError(
            f"model_input_size={input_size} must exceed the {n_special} special tokens and be at "
            f"most the model's max_position_embeddings={max_positions}."
        )
    if int(config.get("pad_token_id", 0) or 0) != tokens["<pad>"]:
        logger.warning(
            f"config.json has pad_token_id {config.get('pad_token_id')} but the token dictionary "
            f"puts <pad> at {tokens['<pad>']}; the dictionary is used."
        )
    activation = config.get("hidden_act", "gelu")
    overrides = {
        "tokenizer": "rank_value",
        "max_genes": input_size - n_special,
        "prepend_cls": bool(special_tokens),
        "append_eos": bool(special_tokens),
        "score_dtype": "float64",
        "normalize": "library_size",
        "target_sum": 10_000.0,
        "n_top_genes": None,
        "hidden_dim": int(config["hidden_size"]),
        "num_layers": int(config["num_hidden_layers"]),
        "num_heads": int(config["num_attention_heads"]),
        "ffn_dim": int(config.get("intermediate_size", 4 * config["hidden_size"])),
        "dropout": float(config.get("hidden_dropout_prob", 0.1)),
        "attention_dropout": float(config.get("attention_probs_dropout_prob", 0.1)),
        "activation": activation,
        "gene_head_activation": activation,
        "pooling": "cls" if special_tokens else "mean",
        "max_seq_len": max_positions - n_special,  # genes; the backbone adds <cls> / <eos>
        "norm_position": "post",
        "embedding_norm": True,
        "layer_norm_eps": float(config.get("layer_norm_eps", 1e-12)),
        "min_coverage": IMPORT_MIN_COVERAGE,
    }
    init_params = {**(defaults or {}), **overrides}

    weights, weights_name = _read_weights(directory)
    source = f"'{directory / weights_name}'"
    state_dict = _convert_state_dict(weights, config, gf_ids, source)

    backbone = BackboneConfig(
        vocab_size=len(vocab),
        hidden_dim=init_params["hidden_dim"],
        num_layers=init_params["num_layers"],
        num_heads=init_params["num_heads"],
        ffn_dim=init_params["ffn_dim"],
        dropout=init_params["dropout"],
        attention_dropout=init_params["attention_dropout"],
        activation=activation,
        max_seq_len=max_positions,
        pooling=init_params["pooling"],
        use_positions=True,
        pad_token_id=vocab.pad_id,
        layer_norm_eps=init_params["layer_norm_eps"],
        norm_position="post",
        embedding_norm=True,
    )
    pretrained_config = {
        "model_class": "ScForge",
        "init_params": init_params,
        "backbone": backbone.to_dict(),
        "class_names": [],
        "imported_from": {
            "format": "geneformer",
            "path": str(directory),
            "architectures": config.get("architectures"),
            "weights": weights_name,
            "token_dictionary": token_file.name,
            "gene_median_dictionary": median_file.name,
            "model_input_size": input_size,
            "special_tokens": bool(special_tokens),
        },
    }
    logger.info(
        f"Read Geneformer model {directory.name}: {init_params['num_layers']} layers x "
        f"{init_params['hidden_dim']} dims, {vocab.n_genes:,} genes, input size {input_size}"
        f"{' with <cls>/<eos>' if special_tokens else ''}."
    )
    return Pretrained(pretrained_config, vocab, state_dict, str(directory))
