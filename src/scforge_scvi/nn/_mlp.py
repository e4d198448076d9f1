"""Activations by name and the small MLP used by every head."""

from __future__ import annotations

from torch import nn

_MODULES = {"gelu": nn.GELU, "relu": nn.ReLU}
#: non-linearities a config may name
ACTIVATIONS = tuple(_MODULES)


def activation(name: str) -> nn.Module:
    """A new activation module: ``"gelu"`` or ``"relu"``."""
    if name not in _MODULES:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}.")
    return _MODULES[name]()


def mlp(
    in_dim: int,
    out_dim: int,
    hidden_dim: int | None,
    dropout: float = 0.0,
) -> nn.Sequential:
    """``Linear -> GELU -> Dropout -> Linear``, or one ``Linear`` if ``hidden_dim`` is falsy.

    Parameters
    ----------
    in_dim, out_dim
        Input and output widths (the last axis).
    hidden_dim
        Width of the hidden layer; ``None`` or ``0`` gives a linear map.
    dropout
        Dropout after the activation.
    """
    if not hidden_dim:
        return nn.Sequential(nn.Linear(in_dim, out_dim))
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(hidden_dim, out_dim),
    )
