"""FAISS indexes (IVF, HNSW, PQ, scalar-quantised, any factory string), on the CPU or a GPU."""

import math

import faiss
import numpy as np

from ._kinds import IndexKind

#: Index shortcuts; ``{nlist}`` is filled in from the memory size at build time.
INDEX_SHORTCUTS = {
    "ivf": "IVF{nlist},Flat",
    "ivfsq8": "IVF{nlist},SQ8",
    "ivfpq": "IVF{nlist},PQ{m}x8",
    "hnsw": "HNSW32",
}

#: Search parameters applied to each shortcut unless the user sets them.
_DEFAULT_PARAMS = {
    "ivf": {"nprobe": 16},
    "ivfsq8": {"nprobe": 16},
    "ivfpq": {"nprobe": 16},
    "hnsw": {"efSearch": 128},
}


def faiss_has_gpu():
    """True when this FAISS build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def wants_gpu(device):
    """Whether an index of `device` ("auto", "cpu", "cuda") lives on a GPU."""
    if device == "cuda" and not faiss_has_gpu():
        raise ValueError("device='cuda' but FAISS has no GPU support or sees no GPU.")
    return device == "cuda" or (device == "auto" and faiss_has_gpu())


def _factory_string(spec, n, d):
    if spec == "flat":
        return "Flat"
    if spec not in INDEX_SHORTCUTS:
        return spec
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
    m = next(m for m in (d // 4, d // 2, d) if m and d % m == 0)
    return INDEX_SHORTCUTS[spec].format(nlist=nlist, m=m)


class FaissIndex(IndexKind):
    """A FAISS index keyed by the bank's stable item ids, or by row on a GPU.

    IVF indexes hold ids natively, the others through
    :class:`faiss.IndexIDMap2`, so adding and removing items never renumbers;
    index types that cannot remove (HNSW) are rebuilt from the remaining
    items. GPU indexes cannot hold ids: they are addressed by row and rebuilt
    on every change.
    """

    def __init__(self, spec, bank, faiss_index, on_gpu, by_row=None):
        super().__init__(spec, bank)
        self.faiss_index, self.on_gpu = faiss_index, on_gpu
        self.by_row = on_gpu if by_row is None else by_row
        self.exact = spec.index in ("flat", "Flat")
        self._set_search_params()

    @classmethod
    def build(cls, spec, bank, on_gpu):
        factory = _factory_string(spec.index, len(bank), bank.dim)
        try:
            core = faiss.index_factory(bank.dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise ValueError(f"Invalid FAISS index {spec.index!r}: {exc}") from None
        if not core.is_trained:
            try:
                core.train(bank.embeddings)
            except RuntimeError as exc:
                raise ValueError(
                    f"Cannot train FAISS index {spec.index!r} ({factory}) on {len(bank)} "
                    f"items: {exc}"
                ) from None
        if on_gpu:
            index = _to_gpu(core)
            index.add(bank.embeddings)
        else:
            # IVF indexes store ids natively (and an IDMap over them breaks on
            # removal); the others get an IDMap2.
            ivf = faiss.try_extract_index_ivf(core) is not None
            index = core if ivf else faiss.IndexIDMap2(core)
            index.add_with_ids(bank.embeddings, bank.ids)
        return cls(spec, bank, index, on_gpu)

    def added(self, bank, n_new):
        if self.by_row:
            return FaissIndex.build(self.spec, bank, self.on_gpu)
        index = faiss.clone_index(self.faiss_index)
        new = slice(bank.n_slots - n_new, bank.n_slots)  # appended: the last slots
        index.add_with_ids(bank.slot_embeddings[new], bank.slot_ids[new])
        return FaissIndex(self.spec, bank, index, False)

    def removed(self, bank, ids):
        if self.by_row:
            return FaissIndex.build(self.spec, bank, self.on_gpu)
        index = faiss.clone_index(self.faiss_index)
        try:
            removed = index.remove_ids(
                faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64)))
        except RuntimeError:
            return FaissIndex.build(self.spec, bank, False)
        if removed != len(ids):
            raise RuntimeError(f"FAISS removed {removed} of {len(ids)} items.")
        return FaissIndex(self.spec, bank, index, False)

    def raw_search(self, queries, k):
        bank = self.bank
        sims, labels = self.faiss_index.search(queries, k)
        missing = labels < 0
        slots = np.full(labels.shape, -1, dtype=np.int64)
        if self.by_row:
            found = labels[~missing]
            slots[~missing] = bank.live_slots[found] if bank.dead_slots.size else found
        else:
            slots[~missing] = bank.slots_of(labels[~missing])[0]
        sims[missing] = -np.inf
        return sims, slots

    def _set_search_params(self):
        params = dict(_DEFAULT_PARAMS.get(self.spec.index, {}))
        params.update({k: v for k, v in (self.spec.params or {}).items() if k != "screen"})
        space = faiss.GpuParameterSpace() if self.on_gpu else faiss.ParameterSpace()
        for key, value in params.items():
            try:
                space.set_index_parameter(self.faiss_index, key, value)
            except RuntimeError as exc:
                raise ValueError(
                    f"Search parameter {key}={value!r} does not apply to index "
                    f"{self.spec.index!r}: {exc}"
                ) from None

    # -- pickling: FAISS indexes are not picklable; serialise them ---------------------

    def __getstate__(self):
        index = faiss.index_gpu_to_cpu(self.faiss_index) if self.on_gpu else self.faiss_index
        return {"spec": self.spec, "bank": self.bank, "on_gpu": self.on_gpu,
                "by_row": self.by_row, "faiss_index": faiss.serialize_index(index)}

    def __setstate__(self, state):
        # An index saved on a GPU loads on a CPU-only machine, still addressed
        # by row (its ids were not stored), and goes back to a GPU where one is.
        index = faiss.deserialize_index(state["faiss_index"])
        on_gpu = state["on_gpu"] and state["spec"].device != "cpu" and faiss_has_gpu()
        if on_gpu:
            index = _to_gpu(index)
        self.__init__(state["spec"], state["bank"], index, on_gpu, state["by_row"])


_GPU_RESOURCES = []


def _to_gpu(core):
    if not _GPU_RESOURCES:
        _GPU_RESOURCES.append(faiss.StandardGpuResources())
    return faiss.index_cpu_to_gpu(_GPU_RESOURCES[0], 0, core)
