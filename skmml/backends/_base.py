"""Where a classifier's memory lives: one protocol, implemented by every memory.

Both classifiers talk to their memory only through a *backend*
(:class:`MemoryBackend`), so that neither names an engine:

- :class:`LocalBackend`: an in-RAM :class:`~skmml.Memory` searched by a
  :class:`~skmml.NeighborIndex` per modality (exact, FAISS or ScaNN,
  in-process; the embedded default).
- ``skmml.backends.milvus.MilvusBackend``: a :class:`~skmml.MilvusMemory`, a
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

import numpy as np


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
    def add(self, X, y, ids=None, metadata=None):
        """(backend, ids): image items added; without `ids`, ids from the high-water mark.

        `metadata`: a DataFrame (or dict of columns) with one row per item, or None.
        """

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
