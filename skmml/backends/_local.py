"""The in-RAM memory's backend: each searched modality indexed in-process."""

import faiss
import numpy as np

from ..memory._bank import MODALITIES, concat_banks
from ..retrieval._exact import drop_self
from ..retrieval._index import NeighborIndex
from ._base import KeyCounts, MemoryBackend, Neighbors

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

    def add(self, X, y, ids=None, metadata=None):
        memory = self.memory.add(X, y, ids=ids, metadata=metadata)
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
