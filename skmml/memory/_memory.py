"""The memory: what a memory-modular classifier knows, held outside its weights."""

import os

import numpy as np
import pandas as pd

from .._validation import (check_embeddings, check_ids, check_item_ids, check_labels,
                          l2_normalize, warn_zero_rows)
from ._bank import MODALITIES, MemoryBank, empty_bank
from ._herding import herding_order
from ._io import load_banks, remove_stale_tmp, save_banks
from ._sources import IMAGE_EXTENSIONS, encoded, folder_items



def _label_kind(labels):
    return "number" if labels.dtype.kind in "biuf" else "string"


def _check_metadata(metadata, n, name):
    if metadata is None:
        return pd.DataFrame(index=pd.RangeIndex(n))
    if not isinstance(metadata, pd.DataFrame):
        metadata = pd.DataFrame(metadata)
    if len(metadata) != n:
        raise ValueError(f"{name} has {len(metadata)} rows but there are {n} embeddings.")
    return metadata.reset_index(drop=True)


class Memory:
    """An image memory and a text memory of labelled, L2-normalised embeddings.

    The memory is the single home of what skmml's classifiers know. Swapping it
    changes what a fitted classifier recognises, with no retraining. Each item
    has a stable unique int64 id (unique across both modalities) that every
    neighbor-reporting API returns. Items given without ids get consecutive
    ids from :attr:`next_id`, a high-water mark that never goes back: it is
    one above every id this memory, or any memory it was derived from, ever
    held, so a forgotten id is never given to another item (also across
    :meth:`save` / :meth:`load` and pickling). A memory built from ``n``
    images has ids ``0 .. n-1``.

    A ``Memory`` is immutable: :meth:`add`, :meth:`remove`,
    :meth:`keep_classes`, :meth:`drop_classes` and :meth:`expand` return a new
    memory that shares every unchanged array with this one, and a call that
    fails leaves this memory as it was. Copying (``copy.deepcopy``, hence
    :func:`sklearn.base.clone` of an estimator holding it) returns the same
    object, so a large memory is never duplicated per estimator or per
    grid-search candidate.

    Embeddings are L2-normalised once, on the way in. An array that is
    already float32, C-contiguous and of unit-norm rows is kept by reference
    without a copy (as scikit-learn's neighbor estimators keep their
    training data): do not modify it afterwards.

    Parameters
    ----------
    image_embeddings : array-like of shape (n_images, n_features), default=None
        Image embeddings. None for an empty image memory.
    image_labels : array-like of shape (n_images,), default=None
        Class of each image item; required with `image_embeddings`.
    text_embeddings : array-like of shape (n_texts, n_features), default=None
        Text embeddings in the same space as the images.
    text_labels : array-like of shape (n_texts,), default=None
        Class of each text item; required with `text_embeddings`.
    image_ids, text_ids : array-like of int, default=None
        Item ids; by default consecutive from 0, images first.
    image_metadata, text_metadata : pandas.DataFrame or dict, default=None
        Per-item metadata, one row per item.

    Attributes
    ----------
    image, text : MemoryBank
        The items of each modality.

    Examples
    --------
    >>> import numpy as np
    >>> from skmml import Memory
    >>> rng = np.random.default_rng(0)
    >>> memory = Memory(rng.normal(size=(6, 4)), ["cat", "cat", "dog", "dog", "owl", "owl"])
    >>> memory
    Memory(n_images=6, n_texts=0, n_features=4, n_classes=3)
    >>> memory.image.ids
    array([0, 1, 2, 3, 4, 5])
    >>> memory.remove([0, 1]).add(rng.normal(size=(1, 4)), ["emu"]).image.ids
    array([2, 3, 4, 5, 6])
    >>> memory.remove([5]).add(rng.normal(size=(1, 4)), ["emu"]).image.ids  # 5 is not reused
    array([0, 1, 2, 3, 4, 6])
    >>> memory.drop_classes(["owl"]).classes
    array(['cat', 'dog'], dtype='<U3')
    """

    def __init__(
        self,
        image_embeddings=None,
        image_labels=None,
        *,
        text_embeddings=None,
        text_labels=None,
        image_ids=None,
        text_ids=None,
        image_metadata=None,
        text_metadata=None,
    ):
        banks = {}
        given = {
            "image": (image_embeddings, image_labels, image_ids, image_metadata),
            "text": (text_embeddings, text_labels, text_ids, text_metadata),
        }
        next_id = max(
            (int(np.max(ids)) + 1 for *_, ids, _ in given.values()
             if ids is not None and len(ids)),
            default=0,
        )
        dim = None
        for modality, (emb, labels, ids, metadata) in given.items():
            if emb is None:
                if labels is not None or ids is not None or metadata is not None:
                    raise ValueError(f"{modality}_embeddings are missing.")
                continue
            bank = _new_bank(emb, labels, ids, metadata, modality, dim, next_id)
            if ids is None:
                next_id += len(bank)
            dim = bank.dim
            banks[modality] = bank
        self._set_banks(banks.get("image"), banks.get("text"), check=True)

    def _set_banks(self, image, text, check=False, next_id=None):
        """Install the banks; `check` their compatibility unless the caller has.

        `next_id` is the high-water mark (at least one above every id of the
        banks); None computes it from the banks.
        """
        filled = [b for b in (image, text) if b is not None and len(b)]
        if check and len(filled) == 2:
            _check_compatible(image, text, "text items")
        dim = filled[0].dim if filled else 0
        dtype = filled[0].slot_labels.dtype if filled else np.int64
        self.image, self.text = (_filled_or_empty(b, dim, dtype) for b in (image, text))
        above = max((b.max_id + 1 for b in filled), default=0) if next_id is None or check else 0
        self._next_id = max(above, next_id or 0)

    @classmethod
    def from_folder(cls, root, image_encoder, text_encoder=None, extensions=IMAGE_EXTENSIONS):
        """A memory from ``root/<class>/**/*.jpg`` and optional ``root/<class>.txt`` documents.

        Every image file below ``root/<class>/``, sub-folders included, is an
        item of that class. See :func:`skmml.memory.memory_from_folder` for
        the parameters and the layout.
        """
        images, texts = folder_items(root, text_encoder is not None, extensions)
        return cls(**encoded(images, texts, image_encoder=image_encoder,
                             text_encoder=text_encoder))

    @classmethod
    def _from_banks(cls, image, text, check=False, next_id=None):
        memory = cls.__new__(cls)
        memory._set_banks(image, text, check, next_id)
        return memory

    # -- what the memory holds ---------------------------------------------------

    def bank(self, modality):
        """Return the :class:`MemoryBank` of `modality` ("image" or "text")."""
        if modality not in MODALITIES:
            raise ValueError(f"modality must be 'image' or 'text', got {modality!r}.")
        return getattr(self, modality)

    @property
    def n_features(self):
        """Embedding dimension, or None while the memory is empty."""
        return self.image.dim or self.text.dim

    @property
    def classes(self):
        """Sorted unique labels over both modalities."""
        labels = [b.labels for b in (self.image, self.text) if len(b)]
        if not labels:
            return np.empty(0, dtype=self.image.labels.dtype)
        return np.unique(np.concatenate(labels) if len(labels) > 1 else labels[0])

    @property
    def next_id(self):
        """The id that the next item added without an id gets (a high-water mark).

        One above every id this memory, or any memory it was derived from,
        ever held: removing items never lowers it, so an id is never reused.
        ``memory.add(X, y)`` gives its items ``next_id .. next_id + len(X) - 1``.
        """
        return self._next_id

    def n_items(self, modality="image"):
        """Number of items of `modality` (as :meth:`MilvusMemory.n_items`)."""
        return len(self.bank(modality))

    @property
    def ids(self):
        """Ids of all items, images first."""
        return np.concatenate([self.image.ids, self.text.ids])

    def __len__(self):
        return len(self.image) + len(self.text)

    def counts(self):
        """Number of image and text items per class, as a DataFrame."""
        counts = {}
        for modality in MODALITIES:
            labels, n = np.unique(self.bank(modality).labels, return_counts=True)
            counts[modality] = pd.Series(n, index=labels, dtype=np.int64)
        table = pd.DataFrame(counts).fillna(0).astype(np.int64)
        table.index.name = "class"
        return table

    def __repr__(self):
        return (
            f"Memory(n_images={len(self.image)}, n_texts={len(self.text)}, "
            f"n_features={self.n_features}, n_classes={len(self.classes)})"
        )

    # -- immutability: copies are the same object ---------------------------------

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    # -- changes (each returns a new Memory) -----------------------------------------

    def add(self, embeddings, labels, *, ids=None, metadata=None, modality="image"):
        """Return a memory with items added to the `modality` bank.

        Without `ids`, the new items get consecutive ids from
        :attr:`next_id`; given `ids` must be unique and not in the memory, and
        :attr:`next_id` moves above them. The ids of the new items are
        ``new_memory.bank(modality).ids[-len(embeddings):]``.
        """
        old = self.bank(modality)
        new = _new_bank(embeddings, labels, ids, metadata, modality, self.n_features,
                        self.next_id)
        clash = new.ids[self.image.contains(new.ids) | self.text.contains(new.ids)]
        if clash.size:
            raise ValueError(f"ids already in the memory: {clash[:10].tolist()}.")
        for bank in (self.image, self.text):
            if len(bank):
                _check_compatible(bank, new, f"new {modality} items", check_ids=False)
        next_id = max(self.next_id, int(new.ids.max()) + 1)
        if modality == "image":
            return Memory._from_banks(old.append(new), self.text, next_id=next_id)
        return Memory._from_banks(self.image, old.append(new), next_id=next_id)

    def remove(self, ids):
        """Return a memory without the items whose id is in `ids`.

        Ids are integers (a TypeError for floats, strings or bools); a
        ValueError names any id that is not in the memory. :attr:`next_id`
        stays: the removed ids are never given to new items.
        """
        ids = check_item_ids(ids)
        in_image, in_text = self.image.contains(ids), self.text.contains(ids)
        unknown = ids[~(in_image | in_text)]
        if unknown.size:
            raise ValueError(f"Unknown memory ids: {unknown[:10].tolist()}.")
        return Memory._from_banks(*(bank.without(ids[mask]) if mask.any() else bank
                                    for bank, mask in ((self.image, in_image),
                                                       (self.text, in_text))),
                                  next_id=self.next_id)

    def keep_classes(self, classes):
        """Return a memory holding only the items of `classes`."""
        return self._select_classes(classes, keep=True)

    def drop_classes(self, classes):
        """Return a memory without the items of `classes`."""
        return self._select_classes(classes, keep=False)

    def _select_classes(self, classes, keep):
        classes = np.asarray(classes)
        if classes.ndim != 1:
            raise ValueError("classes must be a 1-D list of labels.")
        unknown = np.setdiff1d(classes, self.classes)
        if unknown.size:
            raise ValueError(f"Classes not in the memory: {unknown[:10].tolist()}.")
        banks = []
        for bank in (self.image, self.text):
            mask = np.isin(bank.labels, classes) == keep
            banks.append(bank if mask.all() else bank.take(np.flatnonzero(mask)))
        return Memory._from_banks(*banks, next_id=self.next_id)

    def limit(self, budget):
        """Return a memory of at most `budget` items per modality (class-incremental).

        The budget is split evenly across the classes of each modality
        (``budget // n_classes`` items each); each class keeps its items in
        herding priority order (iCaRL: greedily closest to the class mean),
        recorded in the metadata column ``herding_rank``. A class that already
        has ranks is truncated by them, so shrinking a budget again keeps a
        prefix of the same order; new classes are ranked on arrival.

        Parameters
        ----------
        budget : int
            Largest number of items per modality, e.g. 2000.
        """
        banks = []
        for bank in (self.image, self.text):
            if not len(bank):
                banks.append(bank)
                continue
            classes, codes = np.unique(bank.labels, return_inverse=True)
            per_class = budget // len(classes)
            if per_class < 1:
                raise ValueError(
                    f"budget={budget} is smaller than the number of classes ({len(classes)})."
                )
            ranks = np.full(len(bank), np.inf)
            if "herding_rank" in bank.metadata:
                ranks = bank.metadata["herding_rank"].to_numpy(
                    dtype=np.float64, na_value=np.inf, copy=True
                )
            for c in range(len(classes)):
                rows = np.flatnonzero(codes == c)
                if np.all(np.isfinite(ranks[rows])):
                    # Ranked before: renumber 0.. in that order (removals leave gaps).
                    ranks[rows] = np.argsort(np.argsort(ranks[rows], kind="stable"))
                else:
                    ranks[rows] = np.inf
                    order = herding_order(bank.embeddings[rows], per_class)
                    ranks[rows[order]] = np.arange(len(order))
            keep = np.flatnonzero(ranks < per_class)
            kept = bank.take(keep)
            metadata = kept.metadata.assign(herding_rank=ranks[keep].astype(np.int64))
            banks.append(MemoryBank(kept.embeddings, kept.labels, kept.ids, metadata))
        return Memory._from_banks(*banks, next_id=self.next_id)

    def expand(self, other, *, reassign_ids=False):
        """Return the union of this memory and `other` (class-incremental expansion).

        Parameters
        ----------
        other : Memory
            Items to add, both modalities.
        reassign_ids : bool, default=False
            Give `other`'s items new consecutive ids from :attr:`next_id`
            (images first). Otherwise ids must not clash, and a clash raises a
            ValueError.
        """
        if not isinstance(other, Memory):
            raise TypeError(f"expand() needs a Memory, got {type(other).__name__}.")
        if reassign_ids:
            other = other._renumbered(self.next_id)
        clash = other.ids[self.image.contains(other.ids) | self.text.contains(other.ids)]
        if clash.size:
            raise ValueError(
                f"ids in both memories: {clash[:10].tolist()}; "
                "pass reassign_ids=True to renumber the added items."
            )
        for mine in (self.image, self.text):
            for theirs in (other.image, other.text):
                if len(mine) and len(theirs):
                    _check_compatible(mine, theirs, "the other memory", check_ids=False)
        return Memory._from_banks(self.image.append(other.image), self.text.append(other.text),
                                  next_id=max(self.next_id, other.next_id))

    def _renumbered(self, start):
        n_image = len(self.image)
        image, text = self.image, self.text
        new_image = MemoryBank(
            image.embeddings, image.labels, np.arange(start, start + n_image), image.metadata
        )
        new_text = MemoryBank(
            text.embeddings,
            text.labels,
            np.arange(start + n_image, start + n_image + len(text)),
            text.metadata,
        )
        return Memory._from_banks(new_image, new_text,
                                  next_id=start + n_image + len(text))

    # -- persistence ---------------------------------------------------------------

    def save(self, path):
        """Write the memory to `path` (an ``.npz`` archive, no pickle inside), atomically.

        Embeddings, labels (any numeric or string dtype) and ids are stored as
        plain arrays; metadata as Parquet. :meth:`load` restores the memory
        exactly. The archive is written to a temporary file in the same
        folder, flushed to disk (fsync) and renamed over `path`: a crash or a
        full disk during ``save`` leaves the previous file intact. The
        temporary file names its process, and the next ``save`` or ``load`` of
        `path` deletes those left by processes that died. The header lists
        every member with its SHA-256 digest, checked by :meth:`load`.
        """
        save_banks({m: self.bank(m) for m in MODALITIES}, self.next_id, path)

    @classmethod
    def load(cls, path, *, max_bytes=None):
        """Read a memory written by :meth:`save`, checked as the constructor checks.

        Parameters
        ----------
        path : str or path-like
            The ``.npz`` file.
        max_bytes : int, default=None
            Most bytes the file's arrays (and Parquet metadata) may declare,
            checked from their headers before anything is decompressed or
            allocated. None allows 64 times the file's size plus 256 MiB
            (``save`` writes uncompressed arrays, which declare about their own
            size, and Parquet metadata, which compresses repetitive text such
            as file paths several times over); raise it for files you trust.

        Raises
        ------
        ValueError
            Naming the file and the problem, for any malformed file: not an
            archive, a missing or extra-large array, a wrong header, labels,
            ids or metadata that do not match the embeddings, duplicate or
            negative ids, non-finite embeddings or rows neither of unit norm nor all-zero, a
            ``labels_dtype`` that would change the labels, a member missing
            from or not listed in the header, or one whose content does not
            match its SHA-256 digest in the header; whatever the zip or npy
            layer raised (flags, compression methods, headers).
        """
        path = os.fspath(path)
        remove_stale_tmp(path)
        if max_bytes is None:
            max_bytes = 64 * os.path.getsize(path) + 256 * 2**20
        try:
            banks, next_id = load_banks(path, max_bytes)
            return cls._from_banks(*banks, check=True, next_id=next_id)
        except (FileNotFoundError, PermissionError, IsADirectoryError):
            raise  # not a malformed file: the error already says what is wrong
        except Exception as exc:  # whatever the zip, npy or Parquet layer raises
            problem = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            problem = problem or type(exc).__name__
            raise ValueError(f"Cannot load a Memory from {path}: {problem}") from None


def _new_bank(embeddings, labels, ids, metadata, modality, dim, next_id):
    """Validate and normalise new items of one modality into a bank."""
    emb = check_embeddings(embeddings, name=f"{modality} embeddings", dim=dim)
    n = emb.shape[0]
    if labels is None:
        raise ValueError(f"{modality} labels are missing.")
    labels = check_labels(labels, n, name=f"{modality} labels")
    ids = (
        np.arange(next_id, next_id + n, dtype=np.int64)
        if ids is None
        else check_ids(ids, n, name=f"{modality} ids")
    )
    metadata = _check_metadata(metadata, n, f"{modality} metadata")
    warn_zero_rows(emb, name=f"{modality} embeddings")
    return MemoryBank(l2_normalize(emb), labels, ids, metadata)


def _filled_or_empty(bank, dim, dtype):
    """`bank` if it has items or is already the empty bank of `dim` and `dtype`."""
    if bank is not None and (len(bank) or (
            bank.dim == dim and bank.slot_labels.dtype == dtype and not bank.n_slots)):
        return bank
    return empty_bank(dim, dtype)


def _check_compatible(a, b, what, check_ids=True):
    """Raise a ValueError if banks `a` and `b` cannot live in one memory."""
    if a.dim != b.dim:
        raise ValueError(
            f"Dimension mismatch: {what} have dimension {b.dim}, "
            f"the memory holds {a.dim}-dimensional embeddings."
        )
    if _label_kind(a.slot_labels) != _label_kind(b.slot_labels):
        raise ValueError(
            f"Label type mismatch: {what} have {b.slot_labels.dtype} labels, "
            f"the memory has {a.slot_labels.dtype} labels."
        )
    clash = np.intersect1d(a.ids, b.ids) if check_ids else ()
    if len(clash):
        raise ValueError(f"Duplicate ids between banks: {clash[:10].tolist()}.")
