"""Perturbation-response set model in the style of a State Transition model.

Read top to bottom: :class:`PerturbConfig`, :class:`MLPEncoder`, :class:`PerturbationEncoder`,
:class:`PerturbationSetModel`. The model sees *sets* of cells: a set of ``S`` control cells
(the basal state) and one perturbation. Each basal cell is encoded, the perturbation encoding
(and an optional batch embedding) is added to every cell of the set, a bidirectional
transformer mixes the cells of the set, and a decoder predicts, per cell, a change that is
added to the basal expression::

    h = basal_encoder(basal) + pert_encoder(pert) [+ batch_embedding(batch)]   # (B, S, d)
    h = transformer(h)                                                         # no positions
    prediction = relu(basal_log1p + decoder(h))                                # (B, S, G)

There is no positional encoding, so permuting the cells of a set permutes the output in the
same way. The output lives in the gene space that is evaluated (log1p-normalised expression of
the registered genes), whatever the basal encoder reads. Plain ``torch``: nothing here knows
about AnnData.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from scforge_scvi._settings import from_known_keys
from scforge_scvi.nn import _mlp
from scforge_scvi.nn._backbone import BackboneConfig, TransformerBlock, init_weights
from scforge_scvi.nn._mlp import ACTIVATIONS

PERTURBATION_FEATURES = ("one_hot", "table")


def shift_cells(basal: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
    """Move each set of cells by a change of its mean expression, keeping every value >= 0.

    An increase is added to every cell of the set. A decrease scales the set's cells by
    ``1 + change / mean`` (its own mean), so the mean moves by exactly ``change``; a decrease
    larger than the mean takes the gene to zero. (``relu(basal + change)`` moves the mean by
    less than a decrease: cells below it are clipped at zero, so the linear path's pseudobulk
    change would not be the one it fitted.)

    Parameters
    ----------
    basal
        log1p-normalised expression, ``(B, S, G)``.
    change
        Change of each set's mean, ``(B, G)``.

    Returns
    -------
    ``(B, S, G)``.
    """
    mean = basal.mean(dim=1)  # (B, G)
    scale = (1 + change / mean.clamp_min(1e-12)).clamp_min(0)  # (B, G), read where change < 0
    increase = (change >= 0)[:, None, :]
    return torch.where(increase, basal + change[:, None, :], basal * scale[:, None, :])


@dataclass
class PerturbConfig:
    """Hyper-parameters of :class:`PerturbationSetModel`.

    Parameters
    ----------
    n_genes
        Number of genes of the output (and of the log1p basal expression).
    n_perturbations
        Number of perturbation categories, the control included.
    control_index
        Index of the control among the perturbation categories.
    perturbation_features
        ``"one_hot"``: each category (the control included) has its own learned vector.
        ``"table"``: a fixed table of feature vectors (e.g. protein-language-model embeddings)
        is read through an MLP; the control row is a learned vector instead.
    perturbation_dim
        Width of the feature vectors of a ``"table"``; ignored (``n_perturbations``) for
        ``"one_hot"``.
    n_table_rows
        Rows of a ``"table"``: the ``n_perturbations`` categories first (category order),
        then perturbations that have features but no training cells, which are predicted
        from their features alone. ``None`` means ``n_perturbations``. Must be ``None`` for
        ``"one_hot"``.
    n_batches
        Number of batches; ``0`` means no batch embedding.
    linear_path, n_cell_types
        Add the :class:`LinearPath` (``"table"`` models only) for ``n_cell_types`` cell
        types: the basal cells are shifted by the linear prediction of the change before the
        network sees them, and the network's change is added on top, scaled by the residual
        weight.
    basal_dim
        Width of the basal encoder's input: ``n_genes`` (log1p expression) for the default MLP.
        For a pluggable encoder (see :class:`PerturbationSetModel`) it is that encoder's
        output width, projected to ``hidden_dim``.
    hidden_dim
        Width of the cell tokens of the set transformer.
    num_layers, num_heads, ffn_dim, activation
        Shape of the set transformer (``ffn_dim=None`` means ``4 * hidden_dim``).
    encoder_hidden_dim
        Inner width of the perturbation and basal MLP encoders and of the decoder.
    dropout
        Dropout in the encoders, the transformer and the decoder.
    cell_set_len
        Number of cells per set (training and prediction).
    """

    n_genes: int
    n_perturbations: int
    control_index: int = 0
    perturbation_features: str = "one_hot"
    perturbation_dim: int | None = None
    n_table_rows: int | None = None
    n_batches: int = 0
    basal_dim: int | None = None
    hidden_dim: int = 128
    num_layers: int = 2
    num_heads: int = 4
    ffn_dim: int | None = None
    activation: str = "gelu"
    encoder_hidden_dim: int = 256
    dropout: float = 0.1
    cell_set_len: int = 32
    linear_path: bool = False
    n_cell_types: int = 1

    def __post_init__(self) -> None:
        for name in ("n_genes", "n_perturbations", "hidden_dim", "num_layers", "num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PerturbConfig.{name} must be a positive integer, got {value!r}.")
        for name in ("encoder_hidden_dim", "cell_set_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PerturbConfig.{name} must be a positive integer, got {value!r}.")
        if not 0 <= self.control_index < self.n_perturbations:
            raise ValueError(
                f"PerturbConfig.control_index ({self.control_index}) must lie in "
                f"[0, n_perturbations={self.n_perturbations})."
            )
        if self.perturbation_features not in PERTURBATION_FEATURES:
            raise ValueError(
                f"PerturbConfig.perturbation_features must be one of {PERTURBATION_FEATURES}, "
                f"got {self.perturbation_features!r}."
            )
        if self.perturbation_features == "table" and not (
            isinstance(self.perturbation_dim, int) and self.perturbation_dim > 0
        ):
            raise ValueError(
                "PerturbConfig.perturbation_dim must be a positive integer (the width of the "
                f"feature table) when perturbation_features='table', got {self.perturbation_dim!r}."
            )
        if self.n_table_rows is not None:
            if self.perturbation_features != "table":
                raise ValueError(
                    "PerturbConfig.n_table_rows is only meaningful with "
                    f"perturbation_features='table', got {self.perturbation_features!r}."
                )
            if (
                isinstance(self.n_table_rows, bool)
                or not isinstance(self.n_table_rows, int)
                or self.n_table_rows < self.n_perturbations
            ):
                raise ValueError(
                    "PerturbConfig.n_table_rows must be an integer >= n_perturbations "
                    f"({self.n_perturbations}), got {self.n_table_rows!r}."
                )
        if self.n_batches < 0:
            raise ValueError(f"PerturbConfig.n_batches must be >= 0, got {self.n_batches}.")
        if self.hidden_dim % self.num_heads != 0:
            raise ValueError(
                f"PerturbConfig.hidden_dim ({self.hidden_dim}) must be divisible by "
                f"num_heads ({self.num_heads})."
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"PerturbConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"PerturbConfig.dropout must be in [0, 1), got {self.dropout!r}.")
        if self.linear_path and self.perturbation_features != "table":
            raise ValueError(
                "PerturbConfig.linear_path needs perturbation_features='table': the linear "
                "path predicts a perturbation's change from its feature vector."
            )

    @property
    def resolved_perturbation_dim(self) -> int:
        """Width of the perturbation feature vectors actually read."""
        if self.perturbation_features == "one_hot":
            return self.n_perturbations
        return int(self.perturbation_dim)

    @property
    def resolved_table_rows(self) -> int:
        """Rows of the perturbation feature table (``n_perturbations`` unless extended)."""
        return self.n_perturbations if self.n_table_rows is None else self.n_table_rows

    def transformer_config(self) -> BackboneConfig:
        """The :class:`BackboneConfig` of the set transformer's blocks (no positions)."""
        return BackboneConfig(
            vocab_size=1,
            hidden_dim=self.hidden_dim,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            ffn_dim=self.ffn_dim,
            dropout=self.dropout,
            activation=self.activation,
            max_seq_len=self.cell_set_len,
            use_positions=False,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dictionary of all fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PerturbConfig:
        """Build a config from :meth:`to_dict` output; unknown keys raise ``ValueError``."""
        return from_known_keys(cls, d)


@dataclass
class PerturbOutput:
    """What :meth:`PerturbationSetModel.forward` returns.

    Attributes
    ----------
    prediction
        Predicted log1p expression of the perturbed cells, ``(B, S, G)``, non-negative.
    delta
        The decoder's change added to the basal expression, ``(B, S, G)``.
    hidden
        Cell tokens after the set transformer, ``(B, S, d)``.
    """

    prediction: torch.Tensor
    delta: torch.Tensor
    hidden: torch.Tensor


class MLPEncoder(nn.Module):
    """Two-layer MLP ``linear -> activation -> dropout -> linear`` (acts on the last axis)."""

    def __init__(
        self, in_dim: int, hidden_dim: int, out_dim: int, activation: str, dropout: float
    ) -> None:
        super().__init__()
        self.linear1 = nn.Linear(in_dim, hidden_dim)
        self.activation = _mlp.activation(activation)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(hidden_dim, out_dim)
        self.output_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class PerturbationEncoder(nn.Module):
    """Perturbation id -> feature vector -> MLP -> ``hidden_dim``.

    With ``"one_hot"`` features the first linear layer of the MLP on a one-hot vector is an
    embedding lookup, which is what is computed. With a ``"table"`` the features are a fixed
    buffer (saved with the weights) and the control's row is the learned ``control_vector``.
    The buffer may have more rows than there are categories (``n_table_rows``): a row
    index past the categories is a perturbation known only by its features. Feature
    vectors can also be passed directly (``features``), e.g. for a perturbation outside the
    table.
    """

    def __init__(self, config: PerturbConfig, table: torch.Tensor | None = None) -> None:
        super().__init__()
        self.mode = config.perturbation_features
        self.control_index = config.control_index
        d_in, d_hidden = config.resolved_perturbation_dim, config.encoder_hidden_dim
        if self.mode == "one_hot":
            if table is not None:
                raise ValueError(
                    "A perturbation table was given but perturbation_features='one_hot'."
                )
            self.embedding = nn.Embedding(config.n_perturbations, d_hidden)
        else:
            expected = (config.resolved_table_rows, d_in)
            if table is None:
                table = torch.zeros(expected)  # filled by load_state_dict
            if tuple(table.shape) != expected:
                raise ValueError(
                    f"The perturbation table has shape {tuple(table.shape)}; expected {expected} "
                    "(one row per perturbation category, control included, then any "
                    "perturbations known only by their features)."
                )
            self.register_buffer("table", torch.as_tensor(table, dtype=torch.float32).clone())
            self.control_vector = nn.Parameter(torch.zeros(d_in))
            self.linear_in = nn.Linear(d_in, d_hidden)
        self.activation = _mlp.activation(config.activation)
        self.dropout = nn.Dropout(config.dropout)
        self.linear_out = nn.Linear(d_hidden, config.hidden_dim)

    def forward(
        self, perturbation: torch.Tensor, features: torch.Tensor | None = None
    ) -> torch.Tensor:  # (B,) [, (B, F)] -> (B, d)
        """Encode perturbations given as row indices, or as feature vectors.

        Parameters
        ----------
        perturbation
            Row index per set, ``(B,)``; with ``features`` only compared with the control's
            index (a control set gets the learned control vector whatever its features).
        features
            ``(B, perturbation_dim)`` feature vectors that replace the table lookup
            (``"table"`` mode only).
        """
        if self.mode == "one_hot":
            if features is not None:
                raise ValueError(
                    "Feature vectors were passed but perturbation_features='one_hot': this "
                    "model only knows its perturbation categories."
                )
            h = self.embedding(perturbation)  # (B, hidden)
        else:
            if features is None:
                features = self.table[perturbation]  # (B, F)
            elif features.shape != (perturbation.shape[0], self.table.shape[1]):
                raise ValueError(
                    f"features must have shape ({perturbation.shape[0]}, "
                    f"{self.table.shape[1]}), got {tuple(features.shape)}."
                )
            is_control = (perturbation == self.control_index)[:, None]
            features = torch.where(is_control, self.control_vector, features)
            h = self.linear_in(features)
        return self.linear_out(self.dropout(self.activation(h)))


class LinearPath(nn.Module):
    """The fitted ridge from perturbation features to change (see :mod:`.._linear`).

    Buffers only (fitted in closed form, saved with the weights): feature ``mean`` and
    ``scale`` ``(F,)``, ``weight`` ``(C, F, G)``, ``bias`` ``(C, G)`` and the
    ``residual_weight`` that scales the network's change at prediction. Untrained, it
    predicts no change.
    """

    def __init__(self, n_cell_types: int, n_features: int, n_genes: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("scale", torch.ones(n_features))
        self.register_buffer("weight", torch.zeros(n_cell_types, n_features, n_genes))
        self.register_buffer("bias", torch.zeros(n_cell_types, n_genes))
        self.register_buffer("residual_weight", torch.ones(()))

    @torch.no_grad()
    def set_fit(self, fit: Any, residual_weight: float | None = None) -> None:
        """Copy a :class:`~scforge_scvi.perturb._linear.LinearFit` (and a residual weight)."""
        for name in ("mean", "scale", "weight", "bias"):
            getattr(self, name).copy_(torch.as_tensor(getattr(fit, name)))
        if residual_weight is not None:
            self.residual_weight.fill_(residual_weight)

    def forward(self, features: torch.Tensor, cell_type: torch.Tensor) -> torch.Tensor:
        """``(B, F)`` features and ``(B,)`` cell types -> ``(B, G)`` changes."""
        x = (features - self.mean) / self.scale
        return torch.einsum("bf,bfg->bg", x, self.weight[cell_type]) + self.bias[cell_type]


class PerturbationSetModel(nn.Module):
    """Predict a perturbed cell set from a set of control cells and a perturbation.

    Parameters
    ----------
    config
        The :class:`PerturbConfig`.
    perturbation_table
        ``(n_table_rows, perturbation_dim)`` feature table for
        ``perturbation_features="table"`` (the categories' rows in category order, then
        perturbations known only by their features; the control's row is ignored and
        replaced by a learned vector).
    basal_encoder
        Optional pluggable encoder of the basal cells, e.g. a pretrained ScForge backbone
        wrapped to map a ``(N, ...)`` tensor of cells (whatever ``basal_input`` the caller
        passes to :meth:`forward`, typically raw counts) to ``(N, config.basal_dim)`` cell
        embeddings. Its output is projected to ``hidden_dim``. ``None`` uses an MLP on the
        log1p expression (``basal_dim`` must then be ``None`` or ``n_genes``). A pluggable
        encoder counts as part of the backbone (see :meth:`backbone_modules`).

    Examples
    --------
    >>> config = PerturbConfig(n_genes=50, n_perturbations=4, hidden_dim=32, num_heads=4)
    >>> model = PerturbationSetModel(config)
    >>> basal = torch.rand(2, 8, 50)
    >>> out = model(basal, torch.tensor([1, 3]))
    >>> out.prediction.shape
    torch.Size([2, 8, 50])
    """

    def __init__(
        self,
        config: PerturbConfig,
        perturbation_table: torch.Tensor | None = None,
        basal_encoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_dim
        self.perturbation_encoder = PerturbationEncoder(config, perturbation_table)
        self.external_basal_encoder = basal_encoder is not None
        if basal_encoder is None:
            if config.basal_dim not in (None, config.n_genes):
                raise ValueError(
                    f"PerturbConfig.basal_dim={config.basal_dim} needs a pluggable basal_encoder; "
                    f"the default MLP reads the {config.n_genes} log1p genes."
                )
            self.basal_encoder = MLPEncoder(
                config.n_genes, config.encoder_hidden_dim, d, config.activation, config.dropout
            )
            self.basal_projection = nn.Identity()
        else:
            if config.basal_dim is None:
                raise ValueError(
                    "A pluggable basal_encoder needs PerturbConfig.basal_dim (its output width)."
                )
            self.basal_encoder = basal_encoder
            self.basal_projection = nn.Linear(config.basal_dim, d)
        self.batch_embedding = nn.Embedding(config.n_batches, d) if config.n_batches else None
        self.linear_path = (
            LinearPath(config.n_cell_types, config.resolved_perturbation_dim, config.n_genes)
            if config.linear_path
            else None
        )
        block_config = config.transformer_config()
        self.blocks = nn.ModuleList(
            TransformerBlock(block_config) for _ in range(config.num_layers)
        )
        self.norm = nn.LayerNorm(d)
        self.decoder = MLPEncoder(
            d, config.encoder_hidden_dim, config.n_genes, config.activation, config.dropout
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise weights (normal, std 0.02); the decoder's last layer starts at zero.

        With a zero last layer the untrained model returns its basal cells unchanged, i.e. it
        starts from the control-mean baseline and learns the change.
        """
        for name, module in self.named_modules():
            if self.external_basal_encoder and name.startswith("basal_encoder"):
                continue  # a pretrained encoder keeps its weights
            init_weights(module)
        if hasattr(self.perturbation_encoder, "control_vector"):
            nn.init.normal_(self.perturbation_encoder.control_vector, std=0.02)
        nn.init.zeros_(self.decoder.linear2.weight)
        nn.init.zeros_(self.decoder.linear2.bias)

    def backbone_modules(self) -> list[nn.Module]:
        """Modules frozen by ``freeze_backbone``: the set transformer (and a pluggable encoder)."""
        modules: list[nn.Module] = [self.blocks, self.norm]
        if self.external_basal_encoder:
            modules.append(self.basal_encoder)
        return modules

    def named_axes(self) -> dict[str, tuple[int, str]]:
        """``{tensor: (axis, what)}`` for the tensors whose ``axis`` is indexed by ``what``:
        ``"genes"``, ``"perturbations"`` or ``"batches"`` (matched by name when loading)."""
        axes = {
            "decoder.linear2.weight": (0, "genes"),
            "decoder.linear2.bias": (0, "genes"),
            "perturbation_encoder.embedding.weight": (0, "perturbations"),
            "batch_embedding.weight": (0, "batches"),
            "linear_path.weight": (2, "genes"),
            "linear_path.bias": (1, "genes"),
        }
        if not self.external_basal_encoder:
            axes["basal_encoder.linear1.weight"] = (1, "genes")
        return axes

    def head_modules(self) -> list[nn.Module]:
        """Every other module: encoders, batch embedding, projection and decoder."""
        backbone = {id(p) for m in self.backbone_modules() for p in m.parameters()}
        return [m for m in self.children() if any(id(p) not in backbone for p in m.parameters())]

    def forward(
        self,
        basal: torch.Tensor,
        perturbation: torch.Tensor,
        batch: torch.Tensor | None = None,
        basal_input: torch.Tensor | None = None,
        perturbation_features: torch.Tensor | None = None,
        cell_type: torch.Tensor | None = None,
        basal_offset: torch.Tensor | None = None,
        residual_weight: float = 1.0,
    ) -> PerturbOutput:
        """Predict the perturbed expression of a batch of cell sets.

        Parameters
        ----------
        basal
            log1p-normalised expression of the control cells, ``(B, S, G)``.
        perturbation
            Perturbation per set, integer ``(B,)``: a row of the feature table (the
            categories come first), or, with ``perturbation_features``, only compared with
            the control's index.
        batch
            Batch category per set, integer ``(B,)``; required iff ``n_batches > 0``.
        basal_input
            What the basal encoder reads, ``(B, S, ...)``; ``None`` means ``basal``. A
            pluggable encoder of raw counts gets the counts here.
        perturbation_features
            ``(B, perturbation_dim)`` feature vector per set, replacing the table lookup
            (``"table"`` models only): predicts perturbations outside the table.
        cell_type
            Cell type per set, integer ``(B,)``: read by the linear path.
        basal_offset
            ``(B, G)`` change added to the basal cells in place of the linear path's
            prediction (training uses out-of-fold predictions); only with a linear path.
        residual_weight
            Scale of the network's change on top of the (shifted) basal cells: ``0`` gives
            the linear path alone.

        Returns
        -------
        :class:`PerturbOutput`.
        """
        if basal.dim() != 3 or basal.shape[-1] != self.config.n_genes:
            raise ValueError(
                f"basal must have shape (B, S, n_genes={self.config.n_genes}), "
                f"got {tuple(basal.shape)}."
            )
        n_sets, set_len, _ = basal.shape
        if perturbation.shape != (n_sets,):
            raise ValueError(
                f"perturbation must have shape ({n_sets},), got {tuple(perturbation.shape)}."
            )
        if (self.batch_embedding is None) != (batch is None):
            raise ValueError(
                f"This model has n_batches={self.config.n_batches}: pass `batch` "
                "if and only if n_batches > 0."
            )
        if self.linear_path is not None:
            change = self._linear_change(
                perturbation, perturbation_features, cell_type, basal_offset
            )
            basal = shift_cells(basal, change)
        cells = basal if basal_input is None else basal_input
        flat = cells.reshape(n_sets * set_len, *cells.shape[2:])  # (B*S, ...)
        h = self.basal_projection(self.basal_encoder(flat)).view(n_sets, set_len, -1)  # (B, S, d)
        h = h + self.perturbation_encoder(perturbation, perturbation_features)[:, None, :]
        if self.batch_embedding is not None:
            h = h + self.batch_embedding(batch)[:, None, :]
        for block in self.blocks:
            h = block(h, None)  # (B, S, d), every cell attends to every cell of its set
        h = self.norm(h)
        delta = self.decoder(h)  # (B, S, G)
        prediction = torch.relu(basal + residual_weight * delta)
        return PerturbOutput(prediction=prediction, delta=delta, hidden=h)

    def _linear_change(
        self,
        perturbation: torch.Tensor,
        features: torch.Tensor | None,
        cell_type: torch.Tensor | None,
        offset: torch.Tensor | None,
    ) -> torch.Tensor:
        """``(B, G)``: the given offset, or the linear path's change (zero for controls)."""
        if offset is not None:
            return offset
        if cell_type is None:
            raise ValueError("A model with a linear path needs `cell_type` per set.")
        if features is None:
            features = self.perturbation_encoder.table[perturbation]
        change = self.linear_path(features, cell_type)
        is_control = (perturbation == self.config.control_index)[:, None]
        return torch.where(is_control, torch.zeros_like(change), change)
