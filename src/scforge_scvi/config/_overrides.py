"""Command-line overrides: ``key.path=value`` strings applied to a config before validation.

This is what ``scforge ... --set training.max_epochs=1`` uses. Values are read as YAML, so
``64`` is a number, ``true`` a boolean, ``null`` removes a value, ``[a.h5ad, b.h5ad]`` is a
list and ``{lr: 1e-3}`` a whole section (which replaces the section rather than merging into
it). A list of sections is indexed by position: ``benchmarks.0.label_key=cell_type`` (or
``benchmarks[0].label_key``).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from typing import Any

import yaml
from pydantic import BaseModel

from ._errors import SECTION_LIST, ConfigError, field_kind, format_path, unknown_key_message
from ._yaml import load_yaml

_SEGMENT = re.compile(r"^(?P<name>[^.\[\]]+)(?P<index>(\[\d+\])*)$")


def apply_overrides(
    config: Mapping[str, Any], overrides: Iterable[str], schema: type[BaseModel]
) -> dict[str, Any]:
    """Return a copy of ``config`` with each ``"dotted.key=value"`` override applied.

    Parameters
    ----------
    config
        The configuration as nested dictionaries (e.g. read from YAML); left unchanged.
    overrides
        Strings such as ``"model.hidden_dim=64"``, ``"training.max_epochs=1"`` or
        ``"data.paths=[a.h5ad]"``. Values are parsed like YAML values. Missing sections
        on the way are created.
    schema
        The model the keys are checked against, e.g.
        :class:`~scforge_scvi.config.ScForgeConfig`.

    Returns
    -------
    dict
        The updated configuration, not yet validated.

    Raises
    ------
    ConfigError
        For every override that is malformed or names a key the schema does not have (with
        the closest valid key).
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    result = copy.deepcopy(dict(config))
    problems = []
    for override in overrides:
        try:
            keys, value = _parse(override)
            _assign(result, keys, value, schema)
        except _OverrideProblem as problem:
            problems.append(f"In override '{override}': {problem}")
    if problems:
        raise ConfigError(problems)
    return result


class _OverrideProblem(Exception):
    pass


def _parse(override: str) -> tuple[list[str | int], Any]:
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise _OverrideProblem("expected key=value, e.g. training.max_epochs=5")
    keys: list[str | int] = []
    for segment in key.split("."):
        match = _SEGMENT.match(segment)
        if segment.isdigit():
            keys.append(int(segment))
        elif match:
            keys.append(match["name"])
            keys += [int(i) for i in re.findall(r"\d+", match["index"])]
        else:
            raise _OverrideProblem(f"'{key}' is not a dotted key such as training.optimizer.lr")
    try:
        value = load_yaml(raw)
    except yaml.YAMLError as exc:
        raise _OverrideProblem(f"the value '{raw}' is not valid YAML ({exc})") from None
    return keys, value


def _assign(
    root: dict[str, Any], keys: list[str | int], value: Any, root_schema: type[BaseModel]
) -> None:
    """Set ``value`` at ``keys`` in ``root``, checking every key against ``root_schema``."""
    schema = root_schema
    in_list = False  # True while ``node`` is a list of sections waiting for an index
    node: Any = root
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        where = format_path(keys[:depth])
        if in_list:
            if not isinstance(key, int):
                raise _OverrideProblem(f"'{where}' is a list; give a position, e.g. {where}.0")
            if not 0 <= key < len(node):
                raise _OverrideProblem(
                    f"'{where}' has {len(node)} entries, so there is no entry {key}"
                )
            in_list = False
        else:
            # an old name stays in the data: validation reads it with a warning
            name = schema.renamed.get(key, "").rpartition(".")[2] or key
            if not isinstance(key, str) or name not in schema.model_fields:
                raise _OverrideProblem(unknown_key_message(keys[: depth + 1], schema, root_schema))
            kind, child = field_kind(schema.model_fields[name].annotation)
            if child is None and not last:
                raise _OverrideProblem(
                    f"'{format_path(keys[: depth + 1])}' is a single value and has no key "
                    f"'{keys[depth + 1]}'"
                )
            if child is not None:
                schema, in_list = child, kind == SECTION_LIST
        if last:
            node[key] = value
            return
        empty: Any = [] if in_list else {}
        container_type = list if in_list else dict
        existing = node[key] if isinstance(key, int) else node.get(key)
        if not isinstance(existing, container_type):
            node[key] = empty
        node = node[key]
