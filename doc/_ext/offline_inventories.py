"""Intersphinx inventories written from the installed packages, for offline builds.

Intersphinx links names such as ``sklearn.pipeline.Pipeline`` to other
projects' sites by reading each project's ``objects.inv``, which it normally
downloads. This site builds with no network (CI has none), so
:func:`intersphinx_mapping` writes those inventories itself: it imports the
installed packages, lists their public objects and gives each the address
that the project's own site uses for it (scikit-learn's
``modules/generated/<name>.html#<name>``, NumPy's
``reference/generated/<name>.html#<name>``, ...). The links point to the
projects' live sites; only the inventories are local.

A name listed here that the project's site does not document gives a dead
link, never a build error; a name not listed stays plain text, as any
unresolved reference does.
"""

import builtins
import importlib
import inspect
import pkgutil
import warnings
import zlib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def _public(names):
    return [n for n in names if not n.startswith("_")]


def _names(module):
    """Public names of a module: its ``__all__``, else what it defines."""
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, obj in vars(module).items()
                 if getattr(obj, "__module__", None) == module.__name__]
    return _public(names)


def _kind(obj):
    if inspect.isclass(obj):
        return "exception" if issubclass(obj, BaseException) else "class"
    if callable(obj):
        return "function"
    if inspect.ismodule(obj):
        return None
    return "data"


def _methods(cls):
    """Public methods of a class, inherited ones included."""
    methods = []
    for name in _public(dir(cls)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                member = getattr(cls, name)
        except Exception:
            continue
        if callable(member) and not inspect.isclass(member):
            methods.append(name)
    return methods


def _module_objects(modname, page, member_page=None):
    """Entries for a module's public objects and their classes' methods.

    ``page(full_name)`` gives an object's address; ``member_page(class_name,
    full_name)`` a method's (default: an anchor on its class's page).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = importlib.import_module(modname)
    except Exception:
        return []
    entries = []
    for name in _names(module):
        try:
            obj = getattr(module, name)
        except Exception:  # e.g. scikit-learn's experimental names
            continue
        kind = _kind(obj)
        if kind is None:
            continue
        full = f"{modname}.{name}"
        uri = page(full)
        entries.append((full, f"py:{kind}", uri))
        if inspect.isclass(obj):
            for method in _methods(obj):
                member = f"{full}.{method}"
                member_uri = (member_page(full, member) if member_page
                              else uri.split("#")[0] + "#" + member)
                entries.append((member, "py:method", member_uri))
    return entries


def _submodules(package, skip=()):
    """Public submodules of an installed package, itself included."""
    module = importlib.import_module(package)
    names = [package]
    for info in pkgutil.walk_packages(module.__path__, package + "."):
        parts = info.name.split(".")
        if any(p.startswith("_") or p in ("tests", "test") for p in parts) \
                or any(info.name.startswith(s) for s in skip):
            continue
        names.append(info.name)
    return names


def _sklearn():
    def page(full):
        return f"modules/generated/{full}.html#{full}"
    entries = []
    for modname in _submodules("sklearn", skip=("sklearn.experimental", "sklearn.externals")):
        entries += _module_objects(modname, page)
    glossary = {"array-like": "array-like", "estimator": "estimator",
                "estimators": "estimators", "transformer": "transformer",
                "random_state": "random_state", "n_jobs": "n_jobs"}
    entries += [(term, "std:term", f"glossary.html#term-{anchor}")
                for term, anchor in glossary.items()]
    return entries


def _numpy():
    import numpy

    def page(full):
        name = full.split(".", 1)[1]
        obj = getattr(numpy, name, None)
        if isinstance(obj, type) and issubclass(obj, numpy.generic):
            return f"reference/arrays.scalars.html#{full}"
        if name in ("nan", "inf", "pi", "e", "newaxis"):
            return f"reference/constants.html#{full}"
        return f"reference/generated/{full}.html#{full}"

    def generated(full):
        return f"reference/generated/{full}.html#{full}"

    def random_page(full):
        if full.endswith(".RandomState"):
            return f"reference/random/legacy.html#{full}"
        if full.endswith((".Generator", ".default_rng")):
            return f"reference/random/generator.html#{full}"
        return f"reference/random/generated/{full}.html#{full}"

    def random_member(cls, member):
        return f"reference/random/generated/{member}.html#{member}"

    entries = _module_objects("numpy", page, lambda cls, member: generated(member))
    entries += _module_objects("numpy.linalg", generated)
    entries += _module_objects("numpy.fft", generated)
    entries += _module_objects("numpy.random", random_page, random_member)
    entries += [("numpy.random.Generator", "py:class", random_page("numpy.random.Generator")),
                ("array_like", "std:term", "glossary.html#term-array_like"),
                ("arrays.scalars", "std:label", "reference/arrays.scalars.html")]
    return entries


def _pandas():
    import pandas

    def page(full):
        return f"reference/api/{full}.html#{full}"
    entries = [e for e in _module_objects("pandas", page, lambda cls, member: page(member))
               if e[0].count(".") == 1 or e[0].split(".")[1] in ("DataFrame", "Series", "Index")]
    entries += _module_objects("pandas.api.types", page)
    return entries


def _torch():
    def page(full):
        special = {"torch.device": "tensor_attributes.html",
                   "torch.dtype": "tensor_attributes.html"}
        if full in special:
            return f"{special[full]}#{full}"
        return f"generated/{full}.html#{full}"

    def data_page(full):
        return f"data.html#{full}"

    entries = [e for e in _module_objects("torch", page, lambda cls, member: page(member))
               if e[0].count(".") == 1 or e[0].startswith("torch.Tensor.")]
    entries += _module_objects("torch.nn", page)
    entries += _module_objects("torch.nn.functional", page)
    entries += _module_objects("torch.cuda", page)
    entries += _module_objects("torch.utils.data", data_page)
    entries += [("torch.device", "py:class", page("torch.device")),
                ("torch.dtype", "py:class", page("torch.dtype"))]
    return entries


def _matplotlib():
    def gen(full):
        return f"api/_as_gen/{full}.html#{full}"
    entries = _module_objects("matplotlib.pyplot", gen)
    for cls in ("matplotlib.figure.Figure", "matplotlib.axes.Axes"):
        module, name = cls.rsplit(".", 1)
        obj = getattr(importlib.import_module(module), name)
        entries.append((cls, "py:class", gen(cls)))
        member_page = (gen if name == "Axes"
                       else lambda member, cls=cls: gen(cls).split("#")[0] + "#" + member)
        entries += [(f"{cls}.{m}", "py:method", member_page(f"{cls}.{m}"))
                    for m in _methods(obj)]
    return entries


def _joblib():
    def page(full):
        return f"generated/{full}.html#{full}"
    return _module_objects("joblib", page)


def _dask_ml():
    def page(full):
        return f"modules/generated/{full}.html#{full}"
    return _module_objects("dask_ml.wrappers", page)


_PYTHON_MODULES = (
    "collections", "concurrent.futures", "contextlib", "copy", "dataclasses", "functools",
    "io", "itertools", "json", "logging", "math", "multiprocessing", "os", "os.path",
    "pathlib", "pickle", "random", "re", "shutil", "tempfile", "threading", "time",
    "typing", "warnings")


def _python():
    def page(full):
        module = next(m for m in sorted(_PYTHON_MODULES, key=len, reverse=True)
                      if full.startswith(m + "."))
        return f"library/{module}.html#{full}"
    entries = []
    for modname in _PYTHON_MODULES:
        entries += _module_objects(modname, page)
    types = ("list", "tuple", "dict", "set", "frozenset", "str", "bytes", "range")
    for name in _public(dir(builtins)):
        obj = getattr(builtins, name)
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            entries.append((name, "py:exception", f"library/exceptions.html#{name}"))
        elif name in types:
            entries.append((name, "py:class", f"library/stdtypes.html#{name}"))
        elif inspect.isclass(obj):
            entries.append((name, "py:class", f"library/functions.html#{name}"))
        elif callable(obj):
            entries.append((name, "py:function", f"library/functions.html#{name}"))
    entries += [(name, "py:data", f"library/constants.html#{name}")
                for name in ("None", "True", "False", "Ellipsis", "NotImplemented")]
    terms = ("iterable", "sequence", "generator", "path-like object", "file object",
             "mapping", "hashable")
    entries += [(term, "std:term", "glossary.html#term-" + term.replace(" ", "-"))
                for term in terms]
    entries.append(("bltin-boolean-values", "std:label", "library/stdtypes.html#boolean-type-bool"))
    return entries


# name: (distribution, site, entries)
PROJECTS = {
    "python": (None, "https://docs.python.org/3/", _python),
    "sklearn": ("scikit-learn", "https://scikit-learn.org/stable/", _sklearn),
    "numpy": ("numpy", "https://numpy.org/doc/stable/", _numpy),
    "pandas": ("pandas", "https://pandas.pydata.org/docs/", _pandas),
    "torch": ("torch", "https://docs.pytorch.org/docs/stable/", _torch),
    "matplotlib": ("matplotlib", "https://matplotlib.org/stable/", _matplotlib),
    "joblib": ("joblib", "https://joblib.readthedocs.io/en/stable/", _joblib),
    "dask_ml": ("dask-ml", "https://ml.dask.org/", _dask_ml),
}


def write_inventory(path, project, release, entries):
    """Write a Sphinx objects.inv (version 2, zlib-compressed body)."""
    seen, lines = set(), []
    for name, role, uri in entries:
        if (name, role) in seen:
            continue
        seen.add((name, role))
        if uri.endswith("#" + name):
            uri = uri[:-len(name)] + "$"
        display = name if role == "std:label" else "-"
        lines.append(f"{name} {role} {-1 if role.startswith('std:') else 1} {uri} {display}")
    header = ("# Sphinx inventory version 2\n"
              f"# Project: {project}\n"
              f"# Version: {release}\n"
              "# The remainder of this file is compressed using zlib.\n")
    path.write_bytes(header.encode() + zlib.compress("\n".join(lines).encode() + b"\n"))


def intersphinx_mapping(cache_dir, projects=tuple(PROJECTS)):
    """``intersphinx_mapping`` over inventories written into ``cache_dir``.

    One inventory per installed project, named after its version, written
    once and reused while that version stays installed; projects that are
    not installed are left out.
    """
    import sys

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    mapping = {}
    for name in projects:
        distribution, site, entries = PROJECTS[name]
        try:
            release = (version(distribution) if distribution
                       else "%d.%d" % sys.version_info[:2])
        except PackageNotFoundError:
            continue
        path = cache_dir / f"{name}-{release}.inv"
        if not path.exists():
            write_inventory(path, name, release, entries())
        mapping[name] = (site, str(path))
    return mapping
