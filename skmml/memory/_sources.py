"""What a memory is built from: items per class, read from folders and encoded.

Everything is encoded before a memory is made, so a failure leaves no
half-built memory. :mod:`skmml.memory._builders` and
:meth:`Memory.from_folder <skmml.Memory.from_folder>` make the memory.
"""

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ._text import split_document

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _flatten(items_per_class, what):
    if not isinstance(items_per_class, dict):
        raise TypeError(f"{what} must be a dict of class -> items, got "
                        f"{type(items_per_class).__name__}.")
    items, labels = [], []
    for label, items_of_class in items_per_class.items():
        if _is_single(items_of_class):
            items_of_class = [items_of_class]
        if not len(items_of_class):
            raise ValueError(f"{what}[{label!r}] is empty.")
        items.extend(items_of_class)
        labels.extend([label] * len(items_of_class))
    return items, labels


def _is_single(value):
    """A single item rather than a collection: a path, a string, or one image array."""
    if isinstance(value, np.ndarray) and value.dtype != object:
        return value.ndim == 2 or (value.ndim == 3 and value.shape[-1] in (3, 4))
    return isinstance(value, (str, Path)) or not hasattr(value, "__len__")


def _sentences(texts):
    """class -> list of sentences; a str value is a document to split into sentences."""
    if not isinstance(texts, dict):
        raise TypeError(f"texts must be a dict of class -> texts, got {type(texts).__name__}.")
    return {label: split_document(value) if isinstance(value, str) else list(value)
            for label, value in texts.items()}


def _source(item):
    return str(item) if isinstance(item, (str, Path)) else None


def encoded(images=None, texts=None, *, image_encoder=None, text_encoder=None):
    """The :class:`~skmml.Memory` arguments of images and texts per class, encoded."""
    if images is None and texts is None:
        raise ValueError("build_memory() needs images, texts or both.")
    arrays = {}
    if images is not None:
        if image_encoder is None:
            raise ValueError("images were given without an image_encoder.")
        items, labels = _flatten(images, "images")
        arrays["image"] = (image_encoder.transform(items), labels,
                           pd.DataFrame({"source": [_source(i) for i in items]}))
    if texts is not None:
        if text_encoder is None:
            raise ValueError("texts were given without a text_encoder.")
        items, labels = _flatten(_sentences(texts), "texts")
        arrays["text"] = (text_encoder.transform(items), labels, pd.DataFrame({"text": items}))
    image = arrays.get("image", (None, None, None))
    text = arrays.get("text", (None, None, None))
    return {"image_embeddings": image[0], "image_labels": _labels(image[1]),
            "text_embeddings": text[0], "text_labels": _labels(text[1]),
            "image_metadata": image[2], "text_metadata": text[2]}


def _labels(labels):
    return None if labels is None else np.asarray(labels)


def folder_items(root, with_texts=False, extensions=IMAGE_EXTENSIONS):
    """(images, texts) per class of ``root/<class>/**/<image files>`` and ``root/<class>.txt``.

    Each class folder is walked recursively (sub-folders included, sorted by
    path relative to the class folder); hidden files and folders (``.*``)
    are skipped. Image files directly in `root` belong to no class: an error
    when there are no class folders, else a warning that they are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{str(root)!r} is not a folder.")
    suffixes = tuple(e.lower() for e in extensions)

    def is_image(path):
        return path.is_file() and path.suffix.lower() in suffixes

    images = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not _hidden(p.name)):
        files = sorted((p for p in folder.rglob("*") if is_image(p)
                        and not _hidden(*p.relative_to(folder).parts)),
                       key=lambda p: p.relative_to(folder).as_posix())
        if files:
            images[folder.name] = files
    loose = [p for p in root.iterdir() if is_image(p) and not _hidden(p.name)]
    layout = f"root/<class>/*{suffixes[0]}, one sub-folder of images per class"
    if not images:
        found = f"{len(loose)} image files directly in" if loose else "No images in"
        raise ValueError(f"{found} {str(root)!r}: expected {layout}.")
    if loose:
        warnings.warn(f"{len(loose)} image files directly in {str(root)!r} are in no class "
                      f"folder and are ignored: expected {layout}.", UserWarning, stacklevel=3)
    texts = None
    if with_texts:
        texts = {p.stem: p.read_text(encoding="utf-8") for p in sorted(root.glob("*.txt"))}
        texts = {label: doc for label, doc in texts.items() if split_document(doc)} or None
    return images, texts


def _hidden(*names):
    return any(name.startswith(".") for name in names)
