"""Sphinx configuration for the plated documentation."""

import os
import sys

# Import the packages from this checkout (the repository root is one level up).
sys.path.insert(0, os.path.abspath(".."))

project = "plated"
author = "The plated authors"
copyright = "2026, The plated authors"
release = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build"]

html_theme = "alabaster"

nitpicky = False
autodoc_typehints = "description"
autodoc_member_order = "bysource"

# The doctest builder runs `.. doctest::` blocks in the tutorials and every `>>>` example that
# autodoc pulls in from docstrings. Each runs with only `torch` and `plated` in scope, so a
# docstring example imports (or fully qualifies) what else it uses. Numerics match the tests.
doctest_global_setup = """
import torch
import plated
torch.set_default_dtype(torch.float64)
torch.manual_seed(0)
"""
