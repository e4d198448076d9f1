"""The documentation site's sources: the API reference lists every public name, and the
tutorials are stored executed, with their figures and without errors (the site renders the
stored outputs; ``docs/execute_notebooks.py`` re-runs them)."""

from __future__ import annotations

import json
import re
import types
from pathlib import Path

import pytest

import scforge_scvi
import scforge_scvi.io
import scforge_scvi.pl

DOCS = Path(__file__).resolve().parents[1] / "docs"
NOTEBOOKS = sorted((DOCS / "tutorials").glob("*.ipynb"))


@pytest.mark.parametrize(
    ("module", "prefix"),
    [(scforge_scvi, ""), (scforge_scvi.pl, "pl."), (scforge_scvi.io, "io.")],
    ids=["scforge_scvi", "pl", "io"],
)
def test_api_reference_lists_every_public_name(module, prefix):
    listed = set(re.findall(r"^   (\S+)$", (DOCS / "api.md").read_text(), flags=re.MULTILINE))
    public = {
        prefix + name
        for name in module.__all__
        if not isinstance(getattr(module, name), types.ModuleType)
    }
    assert public - listed == set()


def test_cli_reference_is_generated_from_the_parser():
    from scforge_scvi.cli._main import build_parser

    assert ":func: build_parser" in (DOCS / "cli.md").read_text()
    assert build_parser().prog == "scforge"


def test_every_tutorial_is_in_the_toctree():
    toctree = (DOCS / "tutorials" / "index.md").read_text()
    assert len(NOTEBOOKS) == 5
    assert all(f"\n{path.stem}\n" in toctree for path in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_tutorials_are_stored_executed_with_figures(path):
    notebook = json.loads(path.read_text())
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert all(cell["execution_count"] is not None for cell in code), "not executed"
    outputs = [out for cell in code for out in cell["outputs"]]
    assert not [out for out in outputs if out["output_type"] == "error"]
    if path.stem != "yaml_and_cli":
        assert any("image/png" in out.get("data", {}) for out in outputs)
    intro = "".join(notebook["cells"][0]["source"])
    assert re.search(r"ran\s+in\s+about\s+[0-9.]+\s+(s|minutes)\s+on", intro), "no wall time"
    assert path.stat().st_size < 1_000_000
