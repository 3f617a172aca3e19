"""Build a :class:`~skmml.Memory` from raw images and texts per class.

:func:`build_memory` encodes dictionaries of class -> items with the given
encoders; :func:`memory_from_folder` (also :meth:`Memory.from_folder
<skmml.Memory.from_folder>`) reads the common layout ``root/<class>/*.jpg``
(class folders walked recursively) plus an optional ``root/<class>.txt``
document per class. Everything is encoded before the memory is made, so a
failure leaves no half-built memory.
"""

from ._memory import Memory
from ._sources import IMAGE_EXTENSIONS, encoded

__all__ = ["build_memory", "memory_from_folder", "IMAGE_EXTENSIONS"]


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
        memory sentences by :func:`skmml.memory.split_document`.
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
    return Memory(**encoded(images, texts, image_encoder=image_encoder,
                            text_encoder=text_encoder))


def memory_from_folder(root, image_encoder, text_encoder=None,
                       extensions=IMAGE_EXTENSIONS):
    """A memory from ``root/<class>/<image files>`` and optional ``root/<class>.txt``.

    Parameters
    ----------
    root : str or path-like
        One sub-folder of images per class, named for the class. It is
        walked recursively: every image file below ``root/<class>/`` (e.g.
        ``root/cat/indoor/1.png``) is an item of that class, in the order of
        its path relative to the class folder; hidden files and folders
        (``.*``) are skipped. Image files directly in `root` belong to no
        class: they raise a ValueError when there is no class folder, else a
        UserWarning says they are ignored. A text file ``<class>.txt`` in
        `root` is that class's document (split into sentences), read only
        when `text_encoder` is given.
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
    return Memory.from_folder(root, image_encoder, text_encoder, extensions=extensions)
