"""Configuration errors: one message per problem, each naming the key's dotted path.

:class:`ConfigError` collects the messages; :func:`describe_errors` turns a pydantic
``ValidationError`` into them (an unknown key with the closest valid one, a wrong YAML type, a
value outside a choice list); :func:`unknown_key_message`, :func:`field_kind` and
:func:`format_path` serve the ``key.path=value`` overrides too. The schema is passed in
(``root``), so this module knows nothing of its sections.
"""

from __future__ import annotations

import difflib
import os
import re
import types
from collections.abc import Iterator, Sequence
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from scforge_scvi._errors import ScForgeValueError


class ConfigError(ScForgeValueError):
    """An invalid configuration: one human-readable message per problem.

    Parameters
    ----------
    problems
        One message per problem, each naming the dotted path of the offending key.
    source
        The config file the problems were found in, if any.

    Attributes
    ----------
    problems
        The messages, in the order found.
    """

    def __init__(self, problems: str | Sequence[str], source: str | os.PathLike | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = None if source is None else str(source)
        super().__init__(self.problems, self.source)

    def __str__(self) -> str:
        where = f" in '{self.source}'" if self.source else ""
        if len(self.problems) == 1:
            return f"Configuration error{where}: {self.problems[0]}"
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        return f"Configuration error{where} ({len(self.problems)} problems):\n{lines}"


SECTION, SECTION_LIST, VALUE = "section", "section list", "value"


def field_kind(annotation: Any) -> tuple[str, type[BaseModel] | None]:
    """Classify a field: a section (model), a list of sections, or a plain value."""
    if get_origin(annotation) is list:
        item = _model_in(get_args(annotation)[0])
        return (SECTION_LIST, item) if item is not None else (VALUE, None)
    model = _model_in(annotation)
    return (SECTION, model) if model is not None else (VALUE, None)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    options = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else ()
    for option in (annotation, *options):
        if isinstance(option, type) and issubclass(option, BaseModel):
            return option
    return None


def is_required_section(model: type[BaseModel], key: Any) -> bool:
    """Whether ``key`` of ``model`` is a section that may not be null."""
    field = model.model_fields.get(key) if isinstance(key, str) else None
    if field is None or field_kind(field.annotation)[0] != SECTION:
        return False
    return type(None) not in get_args(field.annotation)


def format_path(parts: Sequence[str | int]) -> str:
    """``["benchmarks", 0, "label_key"]`` -> ``"benchmarks[0].label_key"``."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _all_key_paths(
    model: type[BaseModel], prefix: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    for name, field in model.model_fields.items():
        yield (*prefix, name)
        kind, child = field_kind(field.annotation)
        if child is not None:
            inner = (*prefix, name + ("[]" if kind == SECTION_LIST else ""))
            yield from _all_key_paths(child, inner)


def unknown_key_message(
    parts: Sequence[str | int], model: type[BaseModel], root: type[BaseModel]
) -> str:
    """Message for an unknown key ``parts[-1]`` inside the section ``model`` at ``parts[:-1]``.

    Suggests the closest valid key, or else the section of ``root`` (the whole schema) where
    a key of that name lives.
    """
    key, section = str(parts[-1]), format_path(parts[:-1])
    valid = list(model.model_fields)
    message = f"Unknown key '{format_path(parts)}'"
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    elsewhere = [".".join(path[:-1]) for path in _all_key_paths(root) if path[-1] == key]
    if close:
        message += f": did you mean '{close[0]}'?"
    elif elsewhere:
        message += f": '{key}' belongs in '{elsewhere[0]}'."
    else:
        message += "."
    where = f"in '{section}'" if section else "at the top level"
    return f"{message} Valid keys {where}: {', '.join(valid)}"


def _walk_loc(
    loc: Sequence[str | int], root: type[BaseModel]
) -> tuple[list[str | int], type[BaseModel], type[BaseModel] | None]:
    """Follow a pydantic error location through the schema ``root``.

    Returns the user-facing path (union tags dropped), the section holding its last key, and
    the section the location itself points to (None when it points to a value or unknown key).
    """
    parts: list[str | int] = []
    kind, model, parent = SECTION, root, root
    for item in loc:
        if kind == SECTION:
            parts.append(item)
            parent = model
            if item not in model.model_fields:  # an unknown key ends the walk
                return parts, parent, None
            kind, model = field_kind(model.model_fields[item].annotation)
        elif kind == SECTION_LIST and isinstance(item, int):
            parts.append(item)
            kind = SECTION
        elif kind == VALUE and isinstance(item, int):
            parts.append(item)  # an item of a list value; other items are union tags
    return parts, parent, (model if kind == SECTION else None)


_EXPECTED = {
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "text",
    "list_type": "a list",
    "tuple_type": "a list",
    "path_type": "a file path",
    "model_type": "a section of keys",
    "model_attributes_type": "a section of keys",
    "dict_type": "a section of keys",
}


def describe_errors(exc: ValidationError, root: type[BaseModel]) -> list[str]:
    """One message per problem of ``exc``, raised validating the schema ``root``."""
    messages: list[str] = []
    for error in exc.errors(include_url=False):
        parts, parent, _ = _walk_loc(error["loc"], root)
        path, kind, given = format_path(parts), error["type"], error.get("input")
        if kind == "extra_forbidden":
            new = [unknown_key_message(parts, parent, root)]
        elif kind == "missing":
            description = parent.model_fields[parts[-1]].description or ""
            new = [f"Missing required key '{path}': {description}"]
        elif kind in _EXPECTED:
            new = [
                f"Wrong type for '{path}': expected {_EXPECTED[kind]}, got {show(given)}"
                f" ({_yaml_type(given)})"
            ]
        elif kind == "literal_error":
            choices = re.findall(r"'([^']*)'", error["ctx"]["expected"])
            close = difflib.get_close_matches(str(given), choices, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            new = [
                f"Invalid value for '{path}': {show(given)} is not one of "
                f"{', '.join(choices)}.{hint}"
            ]
        elif kind == "value_error":
            text = error["msg"].removeprefix("Value error, ")
            new = [_place(line, error["loc"], root) for line in text.splitlines()]
        else:
            text = error["msg"].replace("Input should be", "must be")
            new = [f"Invalid value for '{path}': {text}; got {show(given)}"]
        messages += [m for m in new if m not in messages]
    return messages


def _place(line: str, loc: tuple, root: type[BaseModel]) -> str:
    """Attach a validator's message to the key path it concerns."""
    parts, _, section = _walk_loc(loc, root)
    if not parts:
        return line  # whole-config checks name their keys themselves
    path = format_path(parts)
    if section is None:
        return f"Invalid value for '{path}': {line}"
    first_word = re.match(r"\w+", line)
    if first_word and first_word.group() in section.model_fields:
        return f"{path}.{line}"  # e.g. "model.hidden_dim (500) must be divisible by ..."
    return f"In '{path}': {line}"


def show(value: Any) -> str:
    """A value as written in YAML (``null``, ``true``), cut to 80 characters."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _yaml_type(value: Any) -> str:
    for kind, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "text")):
        if isinstance(value, kind):
            return name
    return {type(None): "null", list: "list", dict: "mapping"}.get(
        type(value), type(value).__name__
    )
