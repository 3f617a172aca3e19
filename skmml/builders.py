"""Build a :class:`~skmml.Memory` from raw images and texts per class.

:func:`build_memory` encodes dictionaries of class -> items with the given
encoders; :func:`memory_from_folder` (also :meth:`Memory.from_folder
<skmml.Memory.from_folder>`) reads the common layout ``root/<class>/*.jpg``
plus an optional ``root/<class>.txt`` document per class. Everything is
encoded before the memory is made, so a failure leaves no half-built memory.
"""

from pathlib import Path

import numpy as np
import pandas as pd

from .memory import Memory
from .text import split_document

__all__ = ["build_memory", "memory_from_folder", "IMAGE_EXTENSIONS"]

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


def build_memory(images=None, texts=None, *, image_encoder=None, text_encoder=None):
    """Encode images and texts per class into a memory.

    Parameters
    ----------
    images : dict of class -> list of images, default=None
        Images as :class:`~skmml.CLIPImageEncoder` takes them (file paths,
        PIL images, uint8 arrays); a single image (one path, one PIL image,
        one array of shape (H, W) or (H, W, 3)) is one item.
    texts : dict of class -> list of str or str, default=None
        Text items per class; a single string is a document, split into
        memory sentences by :func:`skmml.text.split_document`.
    image_encoder, text_encoder : transformer
        Fitted or stateless transformers with a ``transform`` method that
        maps a list of items to embeddings of one shared dimension, e.g.
        :class:`~skmml.CLIPImageEncoder` and :class:`~skmml.CLIPTextEncoder`.
        Required with `images` and `texts` respectively.

    Returns
    -------
    memory : Memory
        Image items with a ``source`` metadata column (the file path, or
        None for in-memory images) and text items with a ``text`` column.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.preprocessing import FunctionTransformer
    >>> from skmml import build_memory
    >>> flatten = FunctionTransformer(lambda images: np.reshape(images, (len(images), -1)))
    >>> grey = np.full((2, 5, 5), 20, dtype=np.uint8)
    >>> memory = build_memory({"dark": grey, "light": grey + 200}, image_encoder=flatten)
    >>> memory
    Memory(n_images=4, n_texts=0, n_features=25, n_classes=2)
    """
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
    return Memory(image[0], _labels(image[1]), text_embeddings=text[0],
                  text_labels=_labels(text[1]), image_metadata=image[2], text_metadata=text[2])


def _labels(labels):
    return None if labels is None else np.asarray(labels)


def memory_from_folder(root, image_encoder, text_encoder=None,
                       extensions=IMAGE_EXTENSIONS):
    """A memory from ``root/<class>/<image files>`` and optional ``root/<class>.txt``.

    Parameters
    ----------
    root : str or path-like
        One sub-folder of images per class, named for the class; a text file
        ``<class>.txt`` beside it is that class's document (split into
        sentences) and is read only when `text_encoder` is given.
    image_encoder : transformer
        Encodes the image files, e.g. :class:`~skmml.CLIPImageEncoder`.
    text_encoder : transformer, default=None
        Encodes the sentences, e.g. :class:`~skmml.CLIPTextEncoder`.
    extensions : tuple of str
        File name endings (case-insensitive) read as images.

    Returns
    -------
    memory : Memory
        Classes are the folder names (str); image metadata ``source`` holds
        each file's path, text metadata ``text`` each sentence.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{str(root)!r} is not a folder.")
    suffixes = tuple(e.lower() for e in extensions)
    images = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes)
        if files:
            images[folder.name] = files
    if not images:
        raise ValueError(f"No images in {str(root)!r}: expected root/<class>/*{suffixes[0]}.")
    texts = None
    if text_encoder is not None:
        texts = {p.stem: p.read_text(encoding="utf-8") for p in sorted(root.glob("*.txt"))}
        texts = {label: doc for label, doc in texts.items() if split_document(doc)} or None
    return build_memory(images, texts, image_encoder=image_encoder, text_encoder=text_encoder)
