"""Where a classifier's memory lives: one protocol, implemented by every memory.

Both classifiers talk to their memory only through a *backend*
(:class:`MemoryBackend`), so that neither names an engine:

- :class:`LocalBackend`: an in-RAM :class:`~skmml.Memory` searched by a
  :class:`~skmml.NeighborIndex` per modality (exact, FAISS or ScaNN,
  in-process; the embedded default).
- ``skmml.milvus.MilvusBackend``: a :class:`~skmml.MilvusMemory`, a
  collection served by Milvus (Lite or a server), for memories beyond one
  machine.

A memory object gives its backend through ``_as_backend`` (see
:func:`as_backend`). **Every backend is immutable from the classifier's point
of view**: ``add``, ``expand`` and ``remove`` return the backend to publish
next, on every backend (the in-RAM one copy-on-write; the Milvus one after
writing to the shared collection). Every search returns :class:`Neighbors`,
whose ``keys`` are the backend's own handles on items (positions in a key
table, :meth:`MemoryBackend.table`, for the in-RAM memory; ids in Milvus) for
the lookups a read needs next (metadata, pruning counts, embeddings).
"""

import abc
from collections import namedtuple

import faiss
import numpy as np

from .bank import concat_banks
from .retrieval import NeighborIndex, drop_self

MODALITIES = ("image", "text")

Neighbors = namedtuple("Neighbors", "sims keys ids labels vectors", defaults=(None,))
Neighbors.__doc__ = """The `k` nearest items of each query, nearest first.

sims : ndarray (n, k), float32
    Cosine similarities; -inf where an approximate index found fewer items.
keys : ndarray (n, k), int64
    The backend's handles on the items; -1 where missing.
ids : ndarray (n, k), int64
    Memory ids; -1 where missing.
labels : ndarray (n, k)
    Class labels (undefined where missing).
vectors : ndarray (n, k, n_features) or None
    The neighbors' embeddings, when the search was asked for them and the
    backend has no key table (:meth:`MemoryBackend.table`).
"""


class MemoryLike(abc.ABC):
    """Any memory a classifier takes: an object that gives a :class:`MemoryBackend`.

    :class:`~skmml.Memory` and :class:`~skmml.MilvusMemory` are memories; a
    new kind of memory is one whose ``_as_backend(index, modalities,
    unified)`` returns a backend that passes ``tests/test_backend_contract.py``.
    """

    @classmethod
    def __subclasshook__(cls, other):
        return True if callable(getattr(other, "_as_backend", None)) else NotImplemented


def as_backend(memory, index, modalities=("image",), unified=False):
    """The backend of `memory` searching `modalities` (an unbuilt NeighborIndex as `index`).

    With `unified`, the modalities are searched as one memory. A TypeError
    names anything that is not a memory.
    """
    check_memory(memory)
    return memory._as_backend(index, tuple(modalities), unified)


def check_memory(memory):
    """Raise a TypeError naming what `memory` is when it is not a memory."""
    if not isinstance(memory, MemoryLike):
        raise TypeError(f"The classifier needs a Memory or a MilvusMemory as its memory, got "
                        f"{type(memory).__name__}.")


class MemoryBackend(abc.ABC):
    """The protocol every memory implements for the classifiers.

    Attributes
    ----------
    memory : Memory or MilvusMemory
        The user's memory object.
    n_features : int
        Embedding dimension.
    modalities : tuple of str
        The modalities searched (each one has items).
    can_train : bool
        Whether MemoryModularClassifier may train over it (an in-RAM memory:
        training searches subsets of classes); such a backend also has
        ``search_within(queries, k, modality, classes, exclude_ids)``.
    unified : bool
        Whether image and text items are searched as one memory.
    lists_all_items : bool
        Whether :meth:`items` with no keys lists every item cheaply.
    """

    can_train = False
    lists_all_items = False
    unified = False

    @abc.abstractmethod
    def n_items(self, modality="image"):
        """Number of items of `modality`."""

    @abc.abstractmethod
    def classes(self, modalities=("image",)):
        """Sorted labels of the classes with an item of one of `modalities`."""

    @abc.abstractmethod
    def search(self, queries, k, modality="image", *, exclude_ids=None, vectors=False,
               verbose=False):
        """:class:`Neighbors`: the `k` nearest items of `modality` of unit `queries`.

        With `exclude_ids` (one id per query), a query never retrieves the
        item with its own id. With `vectors`, a backend without a key table
        returns the neighbors' embeddings.
        """

    def table(self, modality="image"):
        """The MemoryBank whose slots the keys of `modality` index, or None.

        A backend with a table lets a reader cache per-item computations
        (MML's projections) over the whole memory; without one, searches
        return the vectors they found.
        """
        return None

    @abc.abstractmethod
    def metadata(self, keys, modality="image"):
        """Metadata of the items at `keys`, one DataFrame row each."""

    @abc.abstractmethod
    def leave_one_out(self, k, verbose=False):
        """Batches of (query keys, query labels, neighbors): every image item queries the others."""

    @abc.abstractmethod
    def items(self, keys=None):
        """(keys, ids, labels) of the image items at `keys`, or of every one."""

    @abc.abstractmethod
    def class_memories(self, classes):
        """(classes, Memory) pairs holding every item of a few of `classes` at a time."""

    @abc.abstractmethod
    def n_items_without(self, ids):
        """{modality: items left} after removing `ids`; a ValueError names unknown ids."""

    @abc.abstractmethod
    def add(self, X, y, ids=None):
        """(backend, ids): image items added; without `ids`, ids from the high-water mark."""

    @abc.abstractmethod
    def expand(self, memory, reassign_ids=False):
        """(backend, ids): every item of the in-RAM `memory` added."""

    @abc.abstractmethod
    def remove(self, ids):
        """The backend without the items `ids` (sorted unique int64, all present)."""

    def for_pickle(self, counts):
        """Pruning `counts` re-keyed as this backend's keys will be after unpickling."""
        return counts


class KeyCounts:
    """Wrong-neighbor counts of the items with a non-zero count, by backend key.

    Only items that some leave-one-out query met as a wrong neighbor are
    listed (sorted keys); every other item counts 0. Lookups are binary
    searches, so the table is as small as the pruning it records.
    """

    def __init__(self, keys, counts):
        self.keys = np.asarray(keys, dtype=np.int64)
        self.counts = np.asarray(counts, dtype=np.int64)

    def __getitem__(self, keys):
        keys = np.asarray(keys, dtype=np.int64)
        if not self.keys.size:
            return np.zeros(keys.shape, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.keys, keys), self.keys.size - 1)
        return np.where(self.keys[pos] == keys, self.counts[pos], 0)

    @classmethod
    def merged(cls, parts):
        """One table from (keys, counts) pairs whose keys may repeat."""
        parts = list(parts)
        if not parts:
            return cls([], [])
        keys = np.concatenate([k for k, _ in parts])
        counts = np.concatenate([c for _, c in parts])
        unique, inverse = np.unique(keys, return_inverse=True)
        return cls(unique, np.bincount(inverse, weights=counts).astype(np.int64))


_UNIFIED = "image+text"


class LocalBackend(MemoryBackend):
    """An in-RAM memory, each searched modality indexed by a :class:`~skmml.NeighborIndex`.

    Keys are slots of the modality's bank (:class:`~skmml.MemoryBank`), the
    rows of :meth:`table`. With `unified`, image and text items are one bank
    and one index, searched for every modality.
    """

    can_train = True
    lists_all_items = True

    def __init__(self, memory, spec, modalities, unified, indexes, union=None):
        self.memory, self.modalities, self.unified = memory, modalities, unified
        self._spec = (spec.index, spec.params, spec.device)  # building uses fresh copies
        self._indexes, self._union = indexes, union

    @classmethod
    def build(cls, memory, spec, modalities=("image",), unified=False):
        """Index `memory`'s `modalities` with `spec` (an unbuilt NeighborIndex)."""
        if unified:
            union = concat_banks(memory.image, memory.text)
            if not len(union):
                raise ValueError("The memory has no items to retrieve from.")
            return cls(memory, spec, modalities, True, {_UNIFIED: _fresh(spec).build(union)},
                       union)
        indexes = {}
        for modality in modalities:
            bank = memory.bank(modality)
            if not len(bank):
                raise ValueError(f"The memory has no {modality} items to retrieve from.")
            indexes[modality] = _fresh(spec).build(bank)
        return cls(memory, spec, modalities, False, indexes)

    @property
    def n_features(self):
        return self.memory.n_features

    def n_items(self, modality="image"):
        return len(self.memory.bank(modality))

    def classes(self, modalities=("image",)):
        if tuple(modalities) == ("image",):
            return self.memory.image.classes
        return self.memory.classes

    def table(self, modality="image"):
        return self._union if self.unified else self.memory.bank(modality)

    def index(self, modality="image"):
        """The :class:`~skmml.NeighborIndex` that searches `modality`."""
        return self._indexes[_UNIFIED if self.unified else modality]

    def search(self, queries, k, modality="image", *, exclude_ids=None, vectors=False,
               verbose=False):
        extra = int(exclude_ids is not None)
        sims, slots = self.index(modality).search(queries, k + extra, verbose=verbose)
        return self._neighbors(modality, sims, slots, exclude_ids)

    def search_within(self, queries, k, modality, classes, exclude_ids=None):
        """Exact search among the items of `classes` only (MML's training episodes).

        Returns fewer than `k` neighbors when those classes hold fewer items.
        """
        bank = self.table(modality)
        subset = bank.live_slots[np.isin(bank.labels, classes)]
        extra = int(exclude_ids is not None)
        k = min(k, len(subset) - extra)
        if k < 1:
            raise ValueError(f"An episode's {modality} memory is too small to retrieve from.")
        embeddings = np.ascontiguousarray(bank.slot_embeddings[subset])
        sims, local = faiss.knn(queries, embeddings, k + extra,
                                metric=faiss.METRIC_INNER_PRODUCT)
        return self._neighbors(modality, sims, subset[local], exclude_ids)

    def _neighbors(self, modality, sims, slots, exclude_ids=None):
        bank = self.table(modality)
        if exclude_ids is not None:
            found = bank.slot_ids[np.maximum(slots, 0)]
            sims, slots = drop_self(sims, slots, (slots >= 0) & (
                found == np.asarray(exclude_ids)[:, None]))
        found = slots >= 0
        safe = np.where(found, slots, 0)
        return Neighbors(sims, slots, np.where(found, bank.slot_ids[safe], -1),
                         bank.slot_labels[safe])

    def leave_one_out(self, k, verbose=False):
        bank = self.memory.image
        neighbors = self.search(bank.embeddings, k, exclude_ids=bank.ids, verbose=verbose)
        yield bank.live_slots, bank.labels, neighbors

    def metadata(self, keys, modality="image"):
        return self.table(modality).metadata_at(keys)

    def items(self, keys=None):
        bank = self.memory.image
        if keys is None:
            return bank.live_slots, bank.ids, bank.labels
        return keys, bank.slot_ids[keys], bank.slot_labels[keys]

    def class_memories(self, classes):
        yield classes, self.memory

    def n_items_without(self, ids):
        found = {m: self.memory.bank(m).contains(ids) for m in MODALITIES}
        unknown = ids[~(found["image"] | found["text"])]
        if unknown.size:
            raise ValueError(f"Unknown memory ids: {unknown[:10].tolist()}.")
        return {m: self.n_items(m) - int(np.count_nonzero(found[m])) for m in MODALITIES}

    def _following(self, memory, changed):
        """The backend of `memory`, a change of this one's, indexes updated by `changed`.

        `changed(index, old_bank, new_bank)` returns the index of the new bank.
        """
        if self.unified:
            return LocalBackend.build(memory, _fresh(self._spec), self.modalities, True)
        indexes = {}
        for modality, index in self._indexes.items():
            old, new = self.memory.bank(modality), memory.bank(modality)
            if not len(new):
                raise ValueError(f"The change would leave the memory without {modality} "
                                 "items.")
            indexes[modality] = index if new is old else changed(index, old, new)
        return LocalBackend(memory, _fresh(self._spec), self.modalities, False, indexes)

    def add(self, X, y, ids=None):
        memory = self.memory.add(X, y, ids=ids)
        # The ids Memory.add gave, without materialising the bank's id array.
        start = self.memory.next_id
        given = np.arange(start, start + X.shape[0]) if ids is None else np.asarray(ids)
        return self._following(memory, lambda index, old, new: index.add(
            new, len(new) - len(old))), given.astype(np.int64)

    def expand(self, memory, reassign_ids=False):
        new = self.memory.expand(memory, reassign_ids=reassign_ids)
        start = self.memory.next_id
        ids = np.arange(start, start + len(memory)) if reassign_ids else memory.ids
        return self._following(new, lambda index, old, bank: index.add(
            bank, len(bank) - len(old))), ids

    def remove(self, ids):
        memory = self.memory.remove(ids)
        return self._following(memory, lambda index, old, new: index.remove(
            new, ids[old.contains(ids)]))

    def for_pickle(self, counts):
        """`counts` re-keyed as the pickled bank's slots (its live items, renumbered)."""
        live = self.memory.image.live_slots
        if not self.memory.image.dead_slots.size:
            return counts
        return KeyCounts(np.searchsorted(live, counts.keys), counts.counts)


def _fresh(spec):
    """A new unbuilt index like `spec`: a NeighborIndex, or its (index, params, device)."""
    if isinstance(spec, NeighborIndex):
        spec = (spec.index, spec.params, spec.device)
    return NeighborIndex(*spec)
