"""A MilvusMemory for the classifiers: the backend protocol over a collection."""

import numpy as np
from tqdm.auto import tqdm

from ...retrieval._exact import self_mask
from .._base import MemoryBackend, Neighbors
from ._schema import MODALITY_CODES, _classes, _labels_array


class MilvusBackend(MemoryBackend):
    """A :class:`MilvusMemory` for the classifiers; keys are ids.

    Writes go to the shared collection and return a new backend whose class
    list follows them. Prediction only: it has no key table, so searches
    return the neighbors' vectors when asked.
    """

    def __init__(self, memory, modalities=("image",)):
        self.memory, self.modalities = memory, modalities
        self.n_features = memory.n_features

    @classmethod
    def build(cls, memory, modalities, unified):
        if unified:
            raise ValueError("unified_memory=True searches one in-RAM bank of both "
                             "modalities; a MilvusMemory is searched per modality.")
        for modality in modalities:
            if not memory.n_items(modality):
                raise ValueError(f"The memory has no {modality} items to retrieve from.")
        return cls(memory, modalities)

    def n_items(self, modality="image"):
        return self.memory.n_items(modality)

    def classes(self, modalities=("image",)):
        counts = self.memory._class_counts()
        return _classes({m: counts[m] for m in modalities}, self.memory._label_kind)

    def search(self, queries, k, modality="image", *, exclude_ids=None, vectors=False,
               verbose=False):
        extra = int(exclude_ids is not None)
        found = self.memory.search(queries, k + extra, modality=modality, vectors=vectors,
                                   verbose=verbose)
        sims, ids, labels = found[:3]
        vecs = found[3] if vectors else None
        if exclude_ids is not None:
            is_self = ids == np.asarray(exclude_ids)[:, None]
            n = ids.shape[0]
            keep = ~self_mask(is_self)
            sims, ids, labels = (a[keep].reshape(n, k) for a in (sims, ids, labels))
            if vecs is not None:
                vecs = vecs[keep].reshape(n, k, -1)
        return Neighbors(sims, ids, ids, labels, vecs)

    def leave_one_out(self, k, verbose=False):
        """Batches of (query keys, query labels, neighbors), streamed from the collection."""
        with tqdm(total=self.n_items(), desc="leave-one-out", unit="item",
                  disable=not verbose) as bar:
            for page in self.memory._scan(["embedding", "label"],
                                          f"modality == {MODALITY_CODES['image']}"):
                ids = np.asarray([row["id"] for row in page], dtype=np.int64)
                queries = np.asarray([row["embedding"] for row in page], dtype=np.float32)
                labels = _labels_array([row["label"] for row in page],
                                       self.memory._label_kind)
                bar.update(len(ids))
                yield ids, labels, self.search(queries, k, exclude_ids=ids)

    def metadata(self, keys, modality="image"):
        return self.memory.metadata(keys)

    def items(self, keys=None):
        if keys is None:
            rows = [row for page in self.memory._scan(
                ["label"], f"modality == {MODALITY_CODES['image']}") for row in page]
            keys = np.asarray([row["id"] for row in rows], dtype=np.int64)
        else:
            rows = self.memory.get(keys, ("label",))
        return keys, np.asarray(keys, dtype=np.int64), _labels_array(
            [row["label"] for row in rows], self.memory._label_kind)

    def class_memories(self, classes):
        return self.memory.class_memories(classes)

    def n_items_without(self, ids):
        rows = self.memory.get(ids, ("modality",))
        gone = np.bincount([row["modality"] for row in rows], minlength=len(MODALITY_CODES))
        return {m: self.memory.n_items(m) - int(gone[code])
                for m, code in MODALITY_CODES.items()}

    def add(self, X, y, ids=None, metadata=None):
        ids = self.memory.add(X, y, ids=ids, metadata=metadata)
        return MilvusBackend(self.memory, self.modalities), ids

    def expand(self, memory, reassign_ids=False):
        ids = self.memory.expand(memory, reassign_ids=reassign_ids)
        return MilvusBackend(self.memory, self.modalities), ids

    def remove(self, ids):
        self.memory.remove(ids)
        return MilvusBackend(self.memory, self.modalities)
