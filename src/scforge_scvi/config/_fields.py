"""What the sections of the configuration schema share: their base class, the field types
and the defaults, read from the Python API the sections are translated into."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from scforge_scvi._settings import MaskingConfig as MaskingSettings
from scforge_scvi.model import ScForge
from scforge_scvi.model._settings import init_defaults
from scforge_scvi.train import LoraSettings

from ._errors import is_required_section


def _keyword_defaults(function: Callable) -> dict[str, Any]:
    """The default of every keyword argument of ``function``."""
    parameters = inspect.signature(function).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


# the one home of every default: the Python API the sections are translated into
MODEL_DEFAULTS = init_defaults(ScForge)  # by flat name: grouped settings give their fields
TRAIN_DEFAULTS = _keyword_defaults(ScForge.train)
PLAN_DEFAULTS = _keyword_defaults(ScForge._training_plan_cls.__init__)
MASKING_DEFAULTS = MaskingSettings()
LORA_DEFAULTS = LoraSettings()


# --------------------------------------------------------------------------------------------
# Shared field types
# --------------------------------------------------------------------------------------------


def _reject_bool(value: Any) -> Any:
    # pydantic would read `true` as 1 for a number; in a config that is always a mistake.
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {str(value).lower()}")
    return value


def _expand_user(value: Any) -> Any:
    return Path(value).expanduser() if isinstance(value, str | Path) else value


Int = Annotated[int, BeforeValidator(_reject_bool)]
Float = Annotated[float, BeforeValidator(_reject_bool)]
Ratio = Annotated[float, BeforeValidator(_reject_bool), Field(ge=0.0, le=1.0)]
DropoutRate = Annotated[float, BeforeValidator(_reject_bool), Field(ge=0.0, lt=1.0)]
PathValue = Annotated[Path, BeforeValidator(_expand_user)]


class Section(BaseModel):
    """Base of every section: unknown keys are errors; an empty sub-section means defaults.

    ``renamed`` maps an old key of the section to the dotted path of its new name; the old
    key is still read, with a ``FutureWarning``.
    """

    model_config = ConfigDict(extra="forbid")
    renamed: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _empty_sections_use_defaults(cls, data: Any) -> Any:
        # `masking:` with every line below it commented out reads as null in YAML.
        if not isinstance(data, Mapping):
            return data
        data = {
            key: value
            for key, value in data.items()
            if not (value is None and is_required_section(cls, key))
        }
        for old, path in cls.renamed.items():
            if old in data:
                new = path.rpartition(".")[2]
                if new in data:
                    raise ValueError(f"give {new} only; {old} is its deprecated name")
                warnings.warn(
                    f"The config key '{old}' is renamed '{path}'; the old name is read until "
                    "the next release.",
                    FutureWarning,
                    stacklevel=2,
                )
                data[new] = data.pop(old)
        return data


def warn_user(message: str) -> None:
    """Warn about a valid setting that has no effect (a ``UserWarning``)."""
    warnings.warn(message, UserWarning, stacklevel=2)
