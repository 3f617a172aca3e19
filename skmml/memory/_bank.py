"""Memory banks: the items of one modality, stored so that changes cost what they change.

A :class:`MemoryBank` is immutable, but a 1-item change of a million-item bank
must not copy the million items. Versions of a bank therefore share one
append-only :class:`_RowStore`:

- **Adding** writes the new rows into the store's spare capacity, past every
  row that an existing version can see, and the new version sees one prefix
  more. Only the first version to append from a given length may do so (a
  second one, e.g. two additions to the same memory, copies); when capacity
  runs out the store is copied into one an eighth larger, so adding costs
  O(rows added), amortised.
- **Removing** marks rows dead in the new version (a sorted array of *slots*,
  the rows' positions in the store); nothing is moved, so versions that still
  see those rows are untouched. When more than 1/16 of a version's slots are
  dead it is compacted into a new store (O(n), at most once per n/16
  removals).

Searches work on slots (:meth:`MemoryBank.slot_embeddings` with the dead
ones masked) and map them to ids, labels and metadata with the ``slot_*``
accessors. The public per-row arrays (``embeddings``, ``labels``, ``ids``,
``metadata``) list the live items in order; they are views of the store while
no row is dead and are materialised once per version otherwise.
"""

import threading
from functools import cached_property

import numpy as np
import pandas as pd

#: The modalities of a memory, one bank each.
MODALITIES = ("image", "text")
#: A version is compacted when more than 1/_COMPACT_AT of its slots are dead.
_COMPACT_AT = 16
#: Growth of a store that runs out of capacity: an eighth, at least this many rows.
_MIN_GROWTH = 1024


def _readonly(a):
    a = a.view()
    a.flags.writeable = False
    return a


def _increasing_prefix(ids):
    """Length of the longest prefix of `ids` that is strictly increasing."""
    if ids.shape[0] < 2:
        return ids.shape[0]
    bad = np.flatnonzero(ids[1:] <= ids[:-1])
    return int(bad[0]) + 1 if bad.size else ids.shape[0]


class _RowStore:
    """Append-only rows (embeddings, labels, ids, metadata chunks) shared by bank versions.

    Rows below ``length`` are never written again; rows at or above it are
    invisible to every version, so an appender that claimed them (under the
    lock) fills them while readers run.
    """

    def __init__(self, embeddings, labels, ids, metadata, capacity=None):
        n = ids.shape[0]
        if capacity is None or capacity == n:
            self.embeddings, self.labels, self.ids = embeddings, labels, ids
        else:
            self.embeddings = np.empty((capacity, embeddings.shape[1]), dtype=np.float32)
            self.labels = np.empty(capacity, dtype=labels.dtype)
            self.ids = np.empty(capacity, dtype=np.int64)
            self.embeddings[:n], self.labels[:n], self.ids[:n] = embeddings, labels, ids
        self.chunks = [(0, metadata)]  # (first slot, DataFrame of its rows)
        self.length = n
        self.increasing = _increasing_prefix(ids)  # ids[:increasing] strictly increase
        self.lock = threading.Lock()
        # Reduced-precision copies for certified search, by format, built on
        # first use (skmml.retrieval._screening).
        self.low_precision = {}

    @property
    def capacity(self):
        return self.ids.shape[0]

    def claim(self, start, n_rows, labels_dtype):
        """Reserve slots ``start .. start + n_rows`` if no version has gone past `start`."""
        with self.lock:
            if (self.length != start or start + n_rows > self.capacity
                    or np.result_type(self.labels.dtype, labels_dtype) != self.labels.dtype):
                return False
            self.length = start + n_rows
            return True


class MemoryBank:
    """The items of one modality: embeddings, labels, ids and metadata, row-aligned.

    A bank is immutable: its arrays are read-only, and every change to a
    :class:`~skmml.Memory` returns new banks that share storage with the old
    ones, so that adding or forgetting a few items costs time proportional
    to those items, not to the bank (see :mod:`skmml.memory._bank`).

    Parameters
    ----------
    embeddings : ndarray of shape (n_items, n_features), float32
        L2-normalised item embeddings.
    labels : ndarray of shape (n_items,)
        Class label of each item.
    ids : ndarray of shape (n_items,), int64
        Stable unique item ids; they never change when other items come or go.
    metadata : pandas.DataFrame with n_items rows
        Per-item metadata (for example file path, source, caption); may have
        no columns.

    Attributes
    ----------
    embeddings, labels, ids, metadata
        The live items, in order (read-only).

    Examples
    --------
    >>> import numpy as np
    >>> from skmml import Memory
    >>> memory = Memory(np.eye(20), np.arange(20) % 2)
    >>> bank = memory.remove([1]).image
    >>> len(bank), bank.n_slots, bank.dead_slots.tolist(), bank.ids[:3].tolist()
    (19, 20, [1], [0, 2, 3])
    >>> np.shares_memory(bank.slot_embeddings, memory.image.embeddings)  # nothing copied
    True
    """

    def __init__(self, embeddings, labels, ids, metadata):
        store = _RowStore(_readonly(embeddings), _readonly(labels), _readonly(ids), metadata)
        self._init(store, ids.shape[0], np.empty(0, dtype=np.int64))

    def _init(self, store, n_slots, dead, class_counts=None):
        self._store, self._n, self._dead = store, n_slots, _readonly(dead)
        if class_counts is not None:
            self.__dict__["_class_counts"] = class_counts

    @classmethod
    def _version(cls, store, n_slots, dead, class_counts=None):
        bank = cls.__new__(cls)
        bank._init(store, n_slots, dead, class_counts)
        return bank

    def __len__(self):
        return self._n - self._dead.shape[0]

    @property
    def dim(self):
        """Embedding dimension, or None for an empty bank of unknown width."""
        return self._store.embeddings.shape[1] or None

    # -- slots: positions in the shared store, as searches return them ---------------

    @property
    def n_slots(self):
        """Slots of this version: its items plus the dead ones not yet compacted."""
        return self._n

    @property
    def dead_slots(self):
        """Sorted slots of removed items still in the store (masked from searches)."""
        return self._dead

    @property
    def slot_embeddings(self):
        """Embeddings by slot, dead slots included (read-only view, no copy)."""
        return _readonly(self._store.embeddings[:self._n])

    @property
    def slot_labels(self):
        """Labels by slot (read-only view)."""
        return _readonly(self._store.labels[:self._n])

    @property
    def slot_ids(self):
        """Ids by slot (read-only view)."""
        return _readonly(self._store.ids[:self._n])

    @cached_property
    def live_slots(self):
        """Slot of each live item, in row order."""
        return _readonly(np.delete(np.arange(self._n), self._dead))

    def metadata_at(self, slots):
        """Metadata rows of `slots`, in that order, with a fresh RangeIndex."""
        slots = np.asarray(slots, dtype=np.int64)
        chunks = self._chunks()
        if all(df.shape[1] == 0 for _, df in chunks):
            return pd.DataFrame(index=pd.RangeIndex(slots.shape[0]))
        if len(chunks) == 1 or not slots.size:
            return chunks[0][1].iloc[slots].reset_index(drop=True)
        starts = np.array([start for start, _ in chunks])
        which = np.searchsorted(starts, slots, side="right") - 1
        pieces, order = [], []
        for c in np.unique(which):
            picked = np.flatnonzero(which == c)
            start, df = chunks[c]
            pieces.append(df.iloc[slots[picked] - start])
            order.append(picked)
        gathered = pd.concat(pieces, ignore_index=True)
        return gathered.iloc[np.argsort(np.concatenate(order), kind="stable")].reset_index(
            drop=True)

    def _chunks(self):
        chunks = [(s, df) for s, df in self._store.chunks if s < self._n or s == 0]
        return [(s, df.iloc[:self._n - s]) if s + len(df) > self._n else (s, df)
                for s, df in chunks]

    # -- the live items, in row order ------------------------------------------------

    @cached_property
    def embeddings(self):
        return self._live(self._store.embeddings)

    @cached_property
    def labels(self):
        return self._live(self._store.labels)

    @cached_property
    def ids(self):
        return self._live(self._store.ids)

    @cached_property
    def metadata(self):
        chunks = self._chunks()
        if len(chunks) == 1:
            frame = chunks[0][1]
        else:
            frame = pd.concat([df for _, df in chunks], ignore_index=True)
        if self._dead.size:
            frame = frame.iloc[self.live_slots].reset_index(drop=True)
        return frame

    def _live(self, array):
        if not self._dead.size:
            return _readonly(array[:self._n])
        return _readonly(np.delete(array[:self._n], self._dead, axis=0))

    # -- classes ---------------------------------------------------------------------

    @cached_property
    def _class_counts(self):
        return np.unique(self.labels, return_counts=True)

    @property
    def classes(self):
        """Sorted unique labels of the live items (kept up to date in O(change))."""
        return self._class_counts[0]

    # -- looking up ids --------------------------------------------------------------

    def slots_of(self, ids):
        """(slots, found): the slot of each id, and whether it is a live item."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(self):
            return np.zeros(ids.shape, dtype=np.int64), np.zeros(ids.shape, dtype=bool)
        if self._store.increasing >= self._n:
            # Ids increase with the slot (ids allocated after the largest):
            # binary search, no sorter to build.
            slot_ids = self._store.ids[:self._n]
            pos = np.minimum(np.searchsorted(slot_ids, ids), self._n - 1)
            found = slot_ids[pos] == ids
            if self._dead.size:
                found &= ~is_in(self._dead, pos)
            return pos, found
        pos = np.minimum(np.searchsorted(self.ids, ids, sorter=self._sorter), len(self) - 1)
        rows = self._sorter[pos]
        found = self.ids[rows] == ids
        return (self.live_slots[rows] if self._dead.size else rows), found

    def contains(self, ids):
        """Boolean mask: which of `ids` are items of this bank."""
        return self.slots_of(ids)[1]

    @property
    def max_id(self):
        """The largest id, or None for an empty bank."""
        if not len(self):
            return None
        if self._store.increasing >= self._n:
            # The last live slot: skip the run of dead slots at the end.
            tail = self._dead[::-1] == self._n - 1 - np.arange(self._dead.shape[0])
            trailing = tail.shape[0] if tail.all() else int(np.argmin(tail))
            return int(self._store.ids[self._n - 1 - trailing])
        return int(self.ids[self._sorter[-1]])

    @cached_property
    def _sorter(self):
        return np.argsort(self.ids, kind="stable")

    # -- new versions ----------------------------------------------------------------

    def take(self, rows):
        """Return a new bank with the items at `rows`, in that order."""
        slots = self.live_slots[rows] if self._dead.size else np.asarray(rows)
        return MemoryBank(
            np.take(self._store.embeddings, slots, axis=0),
            self._store.labels[slots],
            self._store.ids[slots],
            self.metadata_at(slots),
        )

    def compacted(self):
        """This bank without dead slots (itself when it has none)."""
        if not self._dead.size:
            return self
        bank = self.take(np.arange(len(self)))
        if "_class_counts" in self.__dict__:
            bank.__dict__["_class_counts"] = self._class_counts
        return bank

    def append(self, other):
        """A new version with `other`'s items after this bank's (O(len(other)), amortised).

        The caller has checked ids, dimensions and label kinds.
        """
        if not len(self):
            return other
        if not len(other):
            return self
        store, start, m = self._store, self._n, len(other)
        counts = _merged_counts(self.__dict__.get("_class_counts"), other)
        if not store.claim(start, m, other.labels.dtype):
            return self._copied_with(other, counts)
        end = start + m
        store.embeddings[start:end] = other.embeddings
        store.labels[start:end] = other.labels
        store.ids[start:end] = other.ids
        if store.increasing == start and (
                _increasing_prefix(other.ids) == m and other.ids[0] > store.ids[start - 1]):
            store.increasing = end
        store.chunks.append((start, other.metadata))
        return MemoryBank._version(store, end, self._dead, counts)

    def _copied_with(self, other, counts):
        """This bank's live items and `other`'s in a new store with spare capacity."""
        n = len(self) + len(other)
        capacity = n + max(n // 8, _MIN_GROWTH)
        labels = np.concatenate([self.labels, other.labels])
        store = _RowStore(
            np.concatenate([self.embeddings, other.embeddings]), labels,
            np.concatenate([self.ids, other.ids]),
            pd.concat([self.metadata, other.metadata], ignore_index=True), capacity=capacity)
        return MemoryBank._version(store, n, np.empty(0, dtype=np.int64), counts)

    def without(self, ids):
        """A new version without the items `ids` (all of them items of this bank)."""
        slots, found = self.slots_of(ids)
        if not np.all(found):
            raise ValueError(f"Unknown memory ids: {np.asarray(ids)[~found][:10].tolist()}.")
        counts = self.__dict__.get("_class_counts")
        if counts is not None:
            counts = _reduced_counts(counts, self._store.labels[slots])
        dead = np.union1d(self._dead, slots)
        version = MemoryBank._version(self._store, self._n, dead, counts)
        return version.compacted() if dead.size * _COMPACT_AT > self._n else version

    # -- pickling: the live items only -----------------------------------------------

    def __getstate__(self):
        return {"embeddings": np.ascontiguousarray(self.embeddings), "labels": self.labels,
                "ids": self.ids, "metadata": self.metadata}

    def __setstate__(self, state):
        self.__init__(state["embeddings"], state["labels"], state["ids"], state["metadata"])

    def __repr__(self):
        return f"MemoryBank(n_items={len(self)}, n_features={self.dim})"


def is_in(sorted_values, x):
    """Mask: which of `x` are in the sorted array `sorted_values`."""
    pos = np.minimum(np.searchsorted(sorted_values, x), sorted_values.shape[0] - 1)
    return sorted_values[pos] == x


def _merged_counts(counts, other):
    """Class counts after adding `other`'s items, or None when not yet computed."""
    if counts is None:
        return None
    classes, n = counts
    new_classes, new_n = np.unique(other.labels, return_counts=True)
    merged, inverse = np.unique(np.concatenate([classes, new_classes]), return_inverse=True)
    return merged, np.bincount(inverse, weights=np.concatenate([n, new_n])).astype(np.int64)


def _reduced_counts(counts, removed_labels):
    classes, n = counts
    gone, gone_n = np.unique(removed_labels, return_counts=True)
    n = n.copy()
    n[np.searchsorted(classes, gone)] -= gone_n
    keep = n > 0
    return classes[keep], n[keep]


def empty_bank(dim=0, labels_dtype=np.int64):
    return MemoryBank(
        np.empty((0, dim), dtype=np.float32),
        np.empty(0, dtype=labels_dtype),
        np.empty(0, dtype=np.int64),
        pd.DataFrame(index=pd.RangeIndex(0)),
    )


def concat_banks(a, b):
    """Stack two banks into a new store; the caller has checked ids, dimensions and labels."""
    if not len(a):
        return b
    if not len(b):
        return a
    return MemoryBank(
        np.concatenate([a.embeddings, b.embeddings]),
        np.concatenate([a.labels, b.labels]),
        np.concatenate([a.ids, b.ids]),
        pd.concat([a.metadata, b.metadata], ignore_index=True),
    )
