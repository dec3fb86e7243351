"""Sphinx configuration: the API reference from the docstrings (autodoc + napoleon) and the markdown guides
(myst-parser). Build: ``sphinx-build -W --keep-going -b html docs docs/_build/html`` (``pip install -e ".[docs]"``)."""

from __future__ import annotations

import importlib.metadata

project = "emdloss"
author = "emdloss developers"
copyright = "2026, emdloss developers"
release = importlib.metadata.version("emdloss")  # the installed distribution's version (what autodoc imports)
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # Google-style "Args:" / "Returns:" / "Raises:" sections
    "sphinx.ext.viewcode",
    "myst_parser",  # the guides in docs/*.md
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# autodoc: members in source order, signatures with their type hints in the description, private names out.
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_default_options = {"members": True, "show-inheritance": True}
autoclass_content = "both"  # a class's docstring and its __init__'s
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# No intersphinx: the build must not need the network (torch and numpy types are named, not linked).
myst_heading_anchors = 3  # "#some-heading" links between the guides
myst_enable_extensions = ["colon_fence", "dollarmath"]
# The guides link source files (tests/..., src/...) that are not pages of this site; those links stay as they are.
# results.md copies each experiment's report.md verbatim, whose tables sit under H4 headings below an H2.
suppress_warnings = ["myst.xref_missing", "myst.header"]

html_theme = "furo"
html_title = f"emdloss {release}"
html_static_path: list[str] = []
