"""Settings shared by the layers: the masking of the pretraining objective, and settings
dataclasses read back from their ``to_dict`` output (refusing unknown keys).

This module imports no other layer, so that ``data`` and ``train`` can both depend on it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from scforge_scvi._errors import ScForgeValueError

T = TypeVar("T")


def from_known_keys(
    cls: type[T], d: Mapping[str, Any], what: str | None = None, required: tuple[str, ...] = ()
) -> T:
    """``cls(**d)`` for the dataclass ``cls``, unless ``d`` has keys that are not its fields.

    Parameters
    ----------
    cls
        A dataclass.
    d
        Field values, e.g. the output of ``cls.to_dict()``.
    what
        Name of the settings in the error message (default: the class name).
    required
        Keys ``d`` must have (fields without a default).

    Raises
    ------
    ScForgeValueError
        Naming the unknown keys and the valid ones, or the first missing required key.
    """
    what = what or cls.__name__
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ScForgeValueError(f"Unknown {what} keys {unknown}; valid keys are {sorted(known)}.")
    missing = [k for k in required if k not in d]
    if missing:
        raise ScForgeValueError(f"{what} needs the key {missing[0]!r}.")
    return cls(**d)


@dataclass(frozen=True)
class MaskingConfig:
    """Which tokens are hidden, and how.

    Parameters
    ----------
    mask_ratio
        Fraction of a cell's gene tokens selected as prediction targets.
    random_replace_ratio
        Of the selected tokens, the fraction replaced by a random gene token.
    keep_ratio
        Of the selected tokens, the fraction left unchanged. The rest become ``<mask>``.
        Whatever happens to the gene token, the expression value of every selected token is
        hidden, so the target never leaks into the input.
    """

    mask_ratio: float = 0.15
    random_replace_ratio: float = 0.1
    keep_ratio: float = 0.1

    def __post_init__(self) -> None:
        for name in ("mask_ratio", "random_replace_ratio", "keep_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"masking.{name} must be in [0, 1], got {value}.")
        if self.random_replace_ratio + self.keep_ratio > 1.0:
            raise ValueError(
                f"random_replace_ratio ({self.random_replace_ratio}) + keep_ratio "
                f"({self.keep_ratio}) is more than 1; together they are fractions of the "
                "selected genes"
            )

    def to_dict(self) -> dict[str, Any]:
        """The three ratios as a JSON-serialisable dict."""
        return asdict(self)
