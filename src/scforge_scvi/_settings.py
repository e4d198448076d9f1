"""Settings dataclasses read back from their ``to_dict`` output, refusing unknown keys."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
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
