"""Sphinx configuration of the scforge_scvi documentation (cookiecutter-scverse layout).

Build: ``pip install -e ".[docs]" && sphinx-build -W docs docs/_build/html``. Notebooks under
``tutorials/`` are rendered with their stored outputs (never executed here); re-execute them
with ``python docs/execute_notebooks.py``.
"""

from __future__ import annotations

from datetime import datetime
from importlib.metadata import metadata

info = metadata("scforge-scvi")
project = "scforge_scvi"
author = info.get("Author", "scforge_scvi developers") or "scforge_scvi developers"
copyright = f"{datetime.now():%Y}, {author}"
version = release = info["Version"]

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx.ext.mathjax",
    "sphinx_copybutton",
    "sphinxarg.ext",
]

templates_path = ["_templates"]
html_static_path = ["_static"]
exclude_patterns = [
    "_build",
    "tutorials/runs",
    "generated/**.ipynb",
    "**.ipynb_checkpoints",
    "execute_notebooks.py",
]
source_suffix = {
    ".rst": "restructuredtext",
    ".md": "myst-nb",
    ".ipynb": "myst-nb",
}  # .rst first: autosummary stubs
master_doc = "index"

# -- MyST and notebooks ---------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "deflist", "dollarmath"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # render the stored outputs; docs/execute_notebooks.py re-runs them
nb_merge_streams = True
nb_output_stderr = "show"

# -- API reference ----------------------------------------------------------------------------------
autosummary_generate = True
autodoc_member_order = "groupwise"
autodoc_default_options = {"members": True, "inherited-members": False, "show-inheritance": True}
autodoc_typehints = "signature"
autoclass_content = "class"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
napoleon_use_param = True
napoleon_custom_sections = [("Params", "Parameters")]

# -- HTML ---------------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "scforge_scvi"
html_theme_options = {"show_toc_level": 2, "use_download_button": True}
