"""Sphinx configuration for the implicitdiff documentation.

Build: ``make docs`` (``python -m sphinx -n -W --keep-going -b html docs docs/_build/html``). The build is
offline: no intersphinx, MathJax served from the build itself (``sphinx-mathjax-offline``).
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(
    0, str(ROOT)
)  # import the working tree's implicitdiff even when not installed
sys.path.insert(0, str(DOCS / "_ext"))

import implicitdiff  # noqa: E402

project = "implicitdiff"
author = "implicitdiff developers"
copyright = "implicitdiff developers"
release = implicitdiff.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",
    "bench_tables",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "_generated/*.md", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]

# MyST: $...$ maths, ::: fences for admonitions, anchors on h1-h3 for [text](page.md#anchor) links.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# Autodoc: NumPy docstrings, type hints shown in the description, members in source order.
# autosummary makes the overview tables only; each object is documented by hand in api/*.md.
autosummary_generate = False
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_preserve_defaults = True
napoleon_google_docstring = False
napoleon_numpy_docstring = True
# An "Attributes" section must not create attribute entries that autodoc makes as well.
napoleon_use_ivar = True
# Parameters as one field list rendered by napoleon itself, so that a NumPy entry naming several
# parameters ("max_iter, tol, stop_mode") stays one entry instead of one copy per name.
napoleon_use_param = False
# "Return type" once, from the docstring, not a second time from the hint.
napoleon_use_rtype = True

# `make docs` builds with -n: every reference must resolve. The offline build has no intersphinx, so the
# types of other packages that hints and docstrings name are listed here; names of implicitdiff resolve
# by any public path (docs/_ext/bench_tables.py).
nitpicky = True
nitpick_ignore = [
    ("py:class", "Tensor"),
    ("py:class", "torch.Tensor"),
    ("py:class", "collections.Counter"),
    ("py:class", "pytree"),  # the docstrings' word for a nested structure of tensors
    ("py:class", "callable"),  # numpydoc's type word for a function
]

html_theme = "furo"
html_title = f"implicitdiff {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {"navigation_with_keys": True}
