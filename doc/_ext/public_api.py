"""Keep the API reference to the public API, all of it.

The public API is every class and function in the ``__all__`` of the modules
listed in ``public_api_modules`` (conf.py). The build warns (an error under
``-W``) when ``api.rst`` documents anything else, or leaves one of them out.
"""

import importlib
import inspect
import re

from sphinx.util import logging

logger = logging.getLogger(__name__)


def documented(text):
    """Full names of the objects in the autosummary tables of an rst text."""
    names, module, in_table = [], None, False
    for line in text.splitlines():
        current = re.match(r"\.\. currentmodule:: (\S+)", line.strip())
        if current:
            module = current.group(1)
        if line.startswith(".. autosummary::"):
            in_table = True
            continue
        if in_table:
            entry = line.strip()
            if not entry or entry.startswith(":"):
                continue
            if not line.startswith(" "):
                in_table = False
                continue
            names.append(entry if entry.startswith(module + ".") else f"{module}.{entry}")
    return names


def _resolve(full_name):
    module_name, _, attr = full_name.rpartition(".")
    while module_name:
        try:
            obj = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
            return obj
        except (ImportError, AttributeError):
            module_name, _, head = module_name.rpartition(".")
            attr = f"{head}.{attr}"
    return None


def public_objects(modules):
    """{id(obj): name} of the classes and functions in the modules' __all__."""
    public = {}
    for module_name in modules:
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if not name.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj)):
                public.setdefault(id(obj), f"{module_name}.{name}")
    return public


def check(app):
    api = app.srcdir / "api.rst"
    public = public_objects(app.config.public_api_modules)
    seen = set()
    for name in documented(api.read_text()):
        obj = _resolve(name)
        if any(part.startswith("_") for part in name.split(".")) or id(obj) not in public:
            logger.warning("api.rst documents %s, which is not public API "
                           "(not in the __all__ of %s)", name,
                           ", ".join(app.config.public_api_modules), location="api")
        seen.add(id(obj))
    for key, name in public.items():
        if key not in seen:
            logger.warning("%s is public API but api.rst does not document it",
                           name, location="api")


def setup(app):
    app.add_config_value("public_api_modules", [], "env")
    app.connect("builder-inited", check)
    return {"parallel_read_safe": True}
