"""Where a classifier's memory lives: one narrow interface, two implementations.

:class:`KNNVoteClassifier` talks to its memory only through a *backend*:

- :class:`LocalBackend`: an in-RAM :class:`~skmml.Memory` searched by a
  :class:`~skmml.NeighborIndex` (FAISS, in-process; the embedded default).
- :class:`~skmml.milvus.MilvusBackend`: a :class:`~skmml.MilvusMemory`, a
  collection served by Milvus (Lite or a server), for memories beyond one
  machine.

A backend is immutable from the classifier's point of view: ``add``,
``expand`` and ``remove`` return the backend to publish next (the in-RAM one
copy-on-write; the Milvus one after writing to the shared collection). Every
search returns :class:`Neighbours`, whose ``keys`` are the backend's own
handles on items (slots of the in-RAM bank, ids in Milvus) for the lookups a
read needs next (metadata, pruning counts).
"""

from collections import namedtuple

import numpy as np

from .retrieval import drop_self

Neighbours = namedtuple("Neighbours", "sims keys ids labels")
Neighbours.__doc__ = """The `k` nearest items of each query, nearest first.

sims : ndarray (n, k), float32
    Cosine similarities; -inf where an approximate index found fewer items.
keys : ndarray (n, k), int64
    The backend's handles on the items; -1 where missing.
ids : ndarray (n, k), int64
    Memory ids; -1 where missing.
labels : ndarray (n, k)
    Class labels (undefined where missing).
"""


class KeyCounts:
    """Wrong-neighbour counts of the items with a non-zero count, by backend key.

    Only items that some leave-one-out query met as a wrong neighbour are
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


class LocalBackend:
    """An in-RAM memory's image items, searched by a FAISS :class:`~skmml.NeighborIndex`.

    Keys are slots of the image bank (:class:`~skmml.MemoryBank`).
    """

    lists_all_items = True

    def __init__(self, memory, index):
        self.memory, self.index = memory, index

    @classmethod
    def build(cls, memory, index):
        """Index `memory`'s image items with `index` (an unbuilt NeighborIndex)."""
        return cls(memory, index.build(_image_bank(memory)))

    @property
    def classes(self):
        return self.memory.image.classes

    @property
    def n_items(self):
        return len(self.memory.image)

    @property
    def n_features(self):
        return self.memory.n_features

    def search(self, queries, k, verbose=False):
        sims, slots = self.index.search(queries, k, verbose=verbose)
        return self._neighbours(sims, slots)

    def _neighbours(self, sims, slots):
        bank = self.memory.image
        found = slots >= 0
        safe = np.where(found, slots, 0)
        return Neighbours(sims, slots, np.where(found, bank.slot_ids[safe], -1),
                          bank.slot_labels[safe])

    def leave_one_out(self, k, verbose=False):
        """Batches of (query keys, query labels, neighbours): every item queries the others."""
        bank = self.memory.image
        sims, slots = self.index.search(bank.embeddings, k + 1, verbose=verbose)
        sims, slots = drop_self(sims, slots, slots == bank.live_slots[:, None])
        yield bank.live_slots, bank.labels, self._neighbours(sims, slots)

    def metadata(self, keys):
        return self.memory.image.metadata_at(keys)

    def items(self, keys=None):
        """(keys, ids, labels) of the items at `keys`, or of every item."""
        bank = self.memory.image
        if keys is None:
            return bank.live_slots, bank.ids, bank.labels
        return keys, bank.slot_ids[keys], bank.slot_labels[keys]

    def add(self, X, y):
        memory = self.memory.add(X, y)
        return LocalBackend(memory, self.index.add(memory.image, X.shape[0]))

    def expand(self, memory, reassign_ids=False):
        new = self.memory.expand(memory, reassign_ids=reassign_ids)
        n_new = len(new.image) - len(self.memory.image)
        return LocalBackend(new, self.index.add(new.image, n_new))

    def n_items_without(self, ids):
        """Image items left after removing `ids`."""
        return self.n_items - int(np.count_nonzero(self.memory.image.contains(ids)))

    def remove(self, ids):
        memory = self.memory.remove(ids)
        bank = _image_bank(memory, "forget() would leave the memory without image items")
        removed = ids[self.memory.image.contains(ids)]
        return LocalBackend(memory, self.index.remove(bank, removed))

    def for_pickle(self, counts):
        """`counts` re-keyed as the pickled bank's slots (its live items, renumbered)."""
        live = self.memory.image.live_slots
        if not self.memory.image.dead_slots.size:
            return counts
        return KeyCounts(np.searchsorted(live, counts.keys), counts.counts)


def _image_bank(memory, message="The memory has no image items to vote with."):
    if not len(memory.image):
        raise ValueError(message)
    return memory.image
