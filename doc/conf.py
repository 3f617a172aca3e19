"""Sphinx configuration for the skmml documentation."""

import sys
from pathlib import Path

import skmml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))

import offline_inventories  # noqa: E402

project = "skmml"
copyright = "2026, the skmml developers"
version = release = skmml.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    # MathJax served from the built site, so formulas render without a network.
    "sphinx-mathjax-offline",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
    # Figures drawn while the site builds (the gallery's examples do not run
    # in CI, which builds with plot_gallery=0).
    "matplotlib.sphinxext.plot_directive",
    "public_api",
]

templates_path = ["_templates"]
autosummary_generate = True
autodoc_default_options = {"members": True}
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
# Types in docstrings ("ndarray of shape (n, d)", "pandas.DataFrame") link to
# their projects' pages through intersphinx.
numpydoc_xref_param_type = True
numpydoc_xref_aliases = {
    "array-like": ":term:`sklearn:array-like`",
    "estimator": ":term:`sklearn:estimator`",
    "transformer": ":term:`sklearn:transformer`",
    "DataFrame": "pandas.DataFrame",
    "Series": "pandas.Series",
    "Tensor": "torch.Tensor",
    "Axes": "matplotlib.axes.Axes",
    "Figure": "matplotlib.figure.Figure",
    "path-like": ":term:`python:path-like object`",
    "Memory": "skmml.Memory",
    "MemoryBank": "skmml.MemoryBank",
    "MilvusMemory": "skmml.MilvusMemory",
    "KNNVoteClassifier": "skmml.KNNVoteClassifier",
    "MemoryModularClassifier": "skmml.MemoryModularClassifier",
    "ExplanationDisplay": "skmml.ExplanationDisplay",
    "NeighborIndex": "skmml.NeighborIndex",
}
numpydoc_xref_ignore = {
    "of", "shape", "or", "and", "default", "optional", "with", "for", "the", "a",
    "an", "to", "in", "is", "one", "two", "per", "rows", "unit", "objects", "like",
    "length", "n", "d", "k", "ignored", "output", "matplotlib", "float32", "float64",
    "int64", "etc", "same", "as", "its", "each", "none",
}

# Intersphinx normally downloads each project's objects.inv. This site builds
# with no network (CI has none), so the inventories are written at build time
# from the installed packages (doc/_ext/offline_inventories.py: their public
# objects, at the addresses the projects' own sites use) into _build/, once per
# installed version; the links still go to the projects' live sites.
intersphinx_mapping = offline_inventories.intersphinx_mapping(HERE / "_build" / "inventories")

sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": "/plot_",
    "reference_url": {"skmml": None},
}

# The API pages document these modules' __all__ (classes and functions), and
# nothing else (doc/_ext/public_api.py warns otherwise); of skmml.backends only
# MilvusMemory, which skmml exports.
public_api_modules = ["skmml", "skmml.pipeline", "skmml.memory", "skmml.retrieval",
                      "skmml.encoders"]

plot_include_source = False
plot_html_show_source_link = False
plot_html_show_formats = False
plot_formats = [("png", 110)]

html_theme = "pydata_sphinx_theme"
html_title = "skmml"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
# Pages with no sub-pages get the whole width, not an empty navigation column.
html_sidebars = {"index": [], "getting_started": [], "benchmarks": []}
html_theme_options = {
    "logo": {"text": "skmml"},
    "navbar_align": "left",
    "header_links_before_dropdown": 6,
}
exclude_patterns = ["_build"]
