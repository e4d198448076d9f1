"""Reading YAML for configs and overrides: safely, and a key written twice is an error."""

from __future__ import annotations

from typing import Any

import yaml


class _StrictLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a key written twice in one mapping.

    Plain PyYAML keeps the last value silently, which would drop a whole repeated section.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                repeated = key in first_seen
            except TypeError:  # unhashable key: let PyYAML report it
                continue
            if repeated:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key '{key}' (first given on line {first_seen[key] + 1})",
                    key_node.start_mark,
                )
            first_seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """Parse YAML text safely, refusing duplicate keys."""
    return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass


def describe_yaml_error(exc: yaml.YAMLError) -> str:
    """The parser's problem and where it is (1-based line and column)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return f"invalid YAML: {problem}"
    return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"
