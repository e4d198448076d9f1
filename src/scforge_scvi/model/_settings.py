"""The settings :class:`~scforge_scvi.ScForge` takes grouped in one argument each, and the
translation between the grouped arguments and the flat names a pretrained ``config.json``
(and the YAML schema's defaults) use."""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from scforge_scvi._errors import ScForgeTypeError, ScForgeValueError
from scforge_scvi._settings import from_known_keys
from scforge_scvi.data import Preprocessing

#: starting points of the gene embeddings (``Architecture.gene_embedding_init``)
GENE_EMBEDDING_INITS = ("random", "pca")


@dataclass(frozen=True)
class Architecture:
    """Details of the tokens, the transformer and its heads beyond width, depth and pooling.

    A model trained from scratch keeps the defaults; an imported model (Geneformer, BERT)
    brings its own values through :meth:`~scforge_scvi.ScForge.from_geneformer` or
    :meth:`~scforge_scvi.ScForge.from_pretrained`.

    Parameters
    ----------
    ffn_dim
        Inner width of the feed-forward layers; ``None`` means ``4 * hidden_dim``.
    max_seq_len
        Most genes the model can read in one cell (default ``max_genes``); like
        ``max_genes`` it does not count ``<cls>`` and ``<eos>``, whose positions the backbone
        adds itself.
    activation
        Non-linearity of the feed-forward layers: ``"gelu"`` or ``"relu"``.
    attention_dropout
        Dropout on attention probabilities.
    norm_position, embedding_norm, layer_norm_eps
        LayerNorm placement and epsilon, see :class:`~scforge_scvi.nn.BackboneConfig`
        (``"post"``, ``True`` and ``1e-12`` for BERT/Geneformer).
    gene_head_activation
        Non-linearity of the masked-gene head (``"relu"`` for Geneformer models).
    scaled_gene_embedding
        Add a second gene embedding scaled by each token's expression level, so that the
        mean-pooled embedding also carries a linear projection of the expression levels (see
        :class:`~scforge_scvi.nn.BackboneConfig`).
    gene_embedding_init
        ``"random"`` or ``"pca"``: start each gene's embedding from its loadings on the first
        ``hidden_dim`` principal components of the registered cells (log-normalised,
        standardised expression of the vocabulary genes; at most 5,000 cells, a seeded
        sample), so that genes that vary together start close together. Only the starting
        point changes: a saved model reloads its trained weights either way.
    prepend_cls, append_eos
        Start each cell's sequence with a ``<cls>`` token; end it with an end-of-sequence
        token (Geneformer V2 models).
    n_bins
        Expression bins of the ``binned_expression`` tokenizer (bin 0 is reserved).
    score_dtype
        Precision of the ``rank_value`` scores: ``"float32"`` or ``"float64"`` (Geneformer's
        arithmetic, see :class:`~scforge_scvi.data.RankValueTokenizer`).
    """

    ffn_dim: int | None = None
    max_seq_len: int | None = None
    activation: str = "gelu"
    attention_dropout: float = 0.0
    norm_position: str = "pre"
    embedding_norm: bool = False
    layer_norm_eps: float = 1e-5
    gene_head_activation: str = "gelu"
    scaled_gene_embedding: bool = False
    gene_embedding_init: str = "random"
    prepend_cls: bool = True
    append_eos: bool = False
    n_bins: int = 51
    score_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.gene_embedding_init not in GENE_EMBEDDING_INITS:
            raise ScForgeValueError(
                f"architecture.gene_embedding_init must be one of {GENE_EMBEDDING_INITS}, got "
                f"{self.gene_embedding_init!r}."
            )

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-serialisable dict."""
        return asdict(self)


#: ``ScForge`` arguments that hold a group of settings, and the class of each
SETTINGS_GROUPS: dict[str, type] = {"preprocessing": Preprocessing, "architecture": Architecture}
_GROUP_OF = {f.name: g for g, c in SETTINGS_GROUPS.items() for f in dataclasses.fields(c)}


def _as_dict(value: Any) -> dict[str, Any]:
    return value.to_dict() if dataclasses.is_dataclass(value) else dict(value or {})


def flattened(params: Mapping[str, Any]) -> dict[str, Any]:
    """Init arguments with each settings group replaced by its fields (the names a
    pretrained ``config.json`` stores)."""
    flat = {k: v for k, v in params.items() if k not in SETTINGS_GROUPS}
    for group in SETTINGS_GROUPS:
        flat.update(_as_dict(params.get(group)))
    return flat


def grouped(params: Mapping[str, Any]) -> dict[str, Any]:
    """Init arguments with every field of a settings group moved into that group's dict."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key in SETTINGS_GROUPS:
            out[key] = {**out.get(key, {}), **_as_dict(value)}
        elif key in _GROUP_OF:
            out.setdefault(_GROUP_OF[key], {})[key] = value
        else:
            out[key] = value
    return out


def resolve_settings(
    preprocessing: Any, architecture: Any, flat: Mapping[str, Any]
) -> tuple[Preprocessing, Architecture]:
    """The settings objects of ``ScForge(preprocessing=..., architecture=..., **flat)``.

    Each group is a settings object, a dict of some of its fields (the rest keep their
    defaults) or ``None``. ``flat`` holds the group fields given under their former names as
    ``ScForge`` keywords (read with a ``FutureWarning``); any other key is an error.
    """
    unknown = sorted(set(flat) - set(_GROUP_OF))
    if unknown:
        raise ScForgeTypeError(
            f"ScForge() got unexpected keyword arguments {unknown}; the grouped settings "
            f"are {sorted(_GROUP_OF)}."
        )
    settings = {"preprocessing": preprocessing, "architecture": architecture}
    for key, value in flat.items():
        group = _GROUP_OF[key]
        warnings.warn(
            f"ScForge({key}=...) is now ScForge({group}={{{key!r}: ...}}); the flat keyword is "
            "read until the next release.",
            FutureWarning,
            stacklevel=3,
        )
        settings[group] = {**_as_dict(settings[group]), key: value}
    return tuple(
        value if isinstance(value, cls) else from_known_keys(cls, _as_dict(value), group)
        for (group, value), cls in zip(settings.items(), SETTINGS_GROUPS.values(), strict=True)
    )


def init_defaults(model_class: type) -> dict[str, Any]:
    """The defaults of every setting of ``model_class.__init__`` by its flat name, as a
    pretrained directory records them (the AnnData, registry, vocabulary, adapters and
    classes are stored apart)."""
    skip = {"self", "adata", "registry", "vocab", "lora", "class_names"}
    defaults = {
        k: SETTINGS_GROUPS[k]() if k in SETTINGS_GROUPS else p.default
        for k, p in inspect.signature(model_class.__init__).parameters.items()
        if k not in skip and p.default is not inspect.Parameter.empty
    }
    return flattened(defaults)
