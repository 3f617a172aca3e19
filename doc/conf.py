"""Sphinx configuration for the skmml documentation."""

import skmml

project = "skmml"
copyright = "2026, the skmml developers"
version = release = skmml.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    # MathJax served from the built site, so formulas render without a network.
    "sphinx-mathjax-offline",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]

templates_path = ["_templates"]
autosummary_generate = True
autodoc_default_options = {"members": True}
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False

sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": "/plot_",
    "reference_url": {"skmml": None},
}

html_theme = "pydata_sphinx_theme"
exclude_patterns = ["_build"]
