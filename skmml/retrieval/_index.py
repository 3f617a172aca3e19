"""Nearest-neighbour retrieval over a memory bank with FAISS.

The index is derived state: it is built from a :class:`~skmml.MemoryBank`,
kept in step with it by stable item id, and (de)serialised with
``faiss.serialize_index`` so that estimators holding one pickle with joblib.
"""

import math

import faiss
import numpy as np
from tqdm.auto import tqdm

from ._exact import SMALL_BATCH, canonical_neighbours, exact_search
from ._scann import ScannSearcher, resolve_params
from ._screening import SCREEN_OPTIONS, certified_search, screen_format

#: Most queries per block when a search shows a progress bar.
SEARCH_BLOCK = 16384
#: Fewest queries per block then (smaller blocks would slow FAISS down).
VERBOSE_MIN_BLOCK = 64

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


def _factory_string(spec, n, d):
    if spec == "flat":
        return "Flat"
    if spec not in INDEX_SHORTCUTS:
        return spec
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
    m = next(m for m in (d // 4, d // 2, d) if m and d % m == 0)
    return INDEX_SHORTCUTS[spec].format(nlist=nlist, m=m)


class NeighborIndex:
    """Inner-product (cosine on normalised vectors) search over a memory bank.

    Parameters
    ----------
    index : str, default="flat"
        "flat" for exact search; "ivf", "ivfsq8", "ivfpq" or "hnsw" for an
        approximate FAISS index sized from the memory; "scann" for ScaNN
        (tree + anisotropic hashing + exact re-ordering; ``pip install
        "skmml[scann]"``, :mod:`skmml.retrieval._scann`); any other string is
        passed to :func:`faiss.index_factory` (e.g. ``"IVF1024,SQ8"``).
    params : dict, default=None
        FAISS search parameters, e.g. ``{"nprobe": 32}`` or
        ``{"efSearch": 256}``, set with :class:`faiss.ParameterSpace`. The
        exact index ("flat") takes ``{"screen": "auto" | "off" | "fp16" |
        "bf16"}``: certified exact search with a reduced-precision screen
        (``skmml.retrieval._screening``); "auto" (the default) screens where a
        one-time measurement found it faster on this machine, "off" always
        searches in float32. The result is the same either way. "scann"
        takes ScaNN's build and search settings: ``num_leaves`` (default
        sqrt(n)), ``num_leaves_to_search`` (num_leaves / 10),
        ``training_sample_size``, ``dimensions_per_block`` (2),
        ``anisotropic_quantization_threshold`` (0.2), ``reorder`` (exactly
        re-scored candidates, 128) and ``brute_force`` (False).
    device : {"auto", "cpu", "cuda"}, default="auto"
        Where the index lives. "auto" uses a GPU when FAISS has GPU support
        and one is present.

    Notes
    -----
    Exact search ("flat") reads the bank's storage in place (no copy) with
    :func:`faiss.knn`, so following an added or forgotten item costs nothing
    (:func:`exact_search`). Other indexes are keyed by the bank's stable item
    ids (IVF indexes natively, the others through :class:`faiss.IndexIDMap2`),
    so adding and removing items never renumbers; index types that cannot remove
    (HNSW) are rebuilt from the remaining items instead. GPU indexes cannot
    hold ids: they are addressed by row and rebuilt on removal.

    Examples
    --------
    >>> import numpy as np
    >>> from skmml import Memory, NeighborIndex
    >>> memory = Memory(np.eye(4), ["a", "b", "c", "d"], image_ids=[10, 11, 12, 13])
    >>> index = NeighborIndex("flat").build(memory.image)
    >>> sims, slots = index.search(np.float32([[0.9, 0.1, 0, 0]]), 2)
    >>> memory.image.slot_ids[slots]
    array([[10, 11]])
    """

    def __init__(self, index="flat", params=None, device="auto"):
        self.index = index
        self.params = params
        self.device = device

    # -- building and updating ---------------------------------------------------

    def build(self, bank):
        """Index all items of `bank`; return self."""
        if not len(bank):
            raise ValueError("Cannot index an empty memory.")
        self._check_screen()
        self.bank_ = bank
        self.scann_ = None
        if self.index == "scann":
            if self.device == "cuda":
                raise ValueError("index='scann' runs on the CPU only; use device='cpu' or "
                                 "'auto', or a FAISS index on the GPU.")
            self.on_gpu_ = self.by_row_ = False
            self.faiss_index_ = None
            self.scann_ = ScannSearcher(resolve_params(self.params, len(bank))).build(bank)
            self.scann_version_ = self.scann_.version
            return self
        self.on_gpu_ = self.by_row_ = self._wants_gpu()
        if self.index == "flat" and not self.on_gpu_:
            self.faiss_index_ = None
            # Decide now (measured once per machine) whether to screen, so
            # that the first query does not pay for the measurement.
            for n_queries in (1, SMALL_BATCH):
                screen_format(self._screen(), n_queries, len(bank), bank.dim)
            return self
        spec = _factory_string(self.index, len(bank), bank.dim)
        try:
            core = faiss.index_factory(bank.dim, spec, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise ValueError(f"Invalid FAISS index {self.index!r}: {exc}") from None
        if not core.is_trained:
            try:
                core.train(bank.embeddings)
            except RuntimeError as exc:
                raise ValueError(
                    f"Cannot train FAISS index {self.index!r} ({spec}) on {len(bank)} items: "
                    f"{exc}"
                ) from None
        if self.on_gpu_:
            self.faiss_index_ = self._to_gpu(core)
            self.faiss_index_.add(bank.embeddings)
        else:
            # IVF indexes store ids natively (and an IDMap over them breaks on
            # removal); the others get an IDMap2.
            ivf = faiss.try_extract_index_ivf(core) is not None
            self.faiss_index_ = core if ivf else faiss.IndexIDMap2(core)
            self.faiss_index_.add_with_ids(bank.embeddings, bank.ids)
        self._set_search_params()
        return self

    def add(self, bank, n_new):
        """A new index of `bank`, whose last `n_new` slots are new items.

        This index is left as it is (searches may be running on it): exact
        search on the CPU just reads the new bank; a FAISS index is cloned
        and the clone gets the new items; a GPU index is rebuilt; a ScaNN
        index upserts them (:mod:`skmml.retrieval._scann`).
        """
        if self.scann_ is not None:
            new = slice(bank.n_slots - n_new, bank.n_slots)
            return self._scann_changed(bank, lambda searcher: searcher.upsert(
                bank.slot_embeddings[new], bank.slot_ids[new]))
        if self.faiss_index_ is None:
            return self._following(bank, None)
        if self.by_row_:
            return self._new().build(bank)
        index = faiss.clone_index(self.faiss_index_)
        new = slice(bank.n_slots - n_new, bank.n_slots)  # appended: the last slots
        index.add_with_ids(bank.slot_embeddings[new], bank.slot_ids[new])
        return self._following(bank, index)

    def remove(self, bank, ids):
        """A new index of `bank`, from which the items `ids` were removed.

        This index is left as it is; see :meth:`add`. Index types that cannot
        remove (HNSW) are rebuilt from the remaining items.
        """
        if self.scann_ is not None:
            return self._scann_changed(bank, lambda searcher: searcher.delete(ids))
        if self.faiss_index_ is None:
            return self._following(bank, None)
        if self.by_row_:
            return self._new().build(bank)
        index = faiss.clone_index(self.faiss_index_)
        try:
            removed = index.remove_ids(
                faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64))
            )
        except RuntimeError:
            return self._new().build(bank)
        if removed != len(ids):
            raise RuntimeError(f"FAISS removed {removed} of {len(ids)} items.")
        return self._following(bank, index)

    def _new(self):
        return NeighborIndex(self.index, self.params, self.device)

    def _scann_changed(self, bank, change):
        """The next version of a ScaNN index: changed in place if this is the newest."""
        searcher = self.scann_
        with searcher.lock:
            if searcher.version == self.scann_version_:
                change(searcher)
                searcher.version += 1
                index = self._following(bank, None)
                index.scann_, index.scann_version_ = searcher, searcher.version
                return index
        return self._new().build(bank)  # a branch from an older version

    def _following(self, bank, faiss_index):
        """A new CPU index object over `bank` with `faiss_index` (None: exact search)."""
        index = self._new()
        index.bank_, index.on_gpu_, index.by_row_ = bank, False, False
        index.faiss_index_, index.scann_ = faiss_index, None
        if faiss_index is not None:
            index._set_search_params()
        return index

    # -- searching -------------------------------------------------------------------

    def search(self, queries, k, verbose=False):
        """Return (similarities, slots) of the `k` nearest items of each query.

        `queries` are L2-normalised float32 rows. `slots` index the bank's
        ``slot_*`` arrays (:mod:`skmml.memory._bank`; they equal rows of its
        ``embeddings``, ``ids``, ... while no item is forgotten and not yet
        compacted); an approximate index that finds fewer than `k` items pads
        with slot -1 and similarity -inf. Neighbours come nearest first, and
        equal similarities go to the lower memory id, on every search path
        and for every batch size (:func:`canonical_neighbours`). With
        `verbose`, 128 queries or more are searched in about 20 blocks under
        a progress bar (e.g. pruning's leave-one-out search).
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n = queries.shape[0]
        if verbose and n >= 2 * VERBOSE_MIN_BLOCK:
            # About 20 updates, in blocks large enough to keep FAISS efficient.
            size = min(SEARCH_BLOCK, max(VERBOSE_MIN_BLOCK, -(-n // 20)))
            sims = np.empty((n, k), dtype=np.float32)
            rows = np.empty((n, k), dtype=np.int64)
            with tqdm(total=n, desc="searching", unit="query") as bar:
                for start in range(0, n, size):
                    block = slice(start, start + size)
                    sims[block], rows[block] = self._search(queries[block], k)
                    bar.update(len(queries[block]))
            return sims, rows
        return self._search(queries, k)

    def _search(self, queries, k):
        fmt = None
        if self.faiss_index_ is None and self.scann_ is None and k < len(self.bank_):
            fmt = screen_format(self._screen(), queries.shape[0], self.bank_.n_slots,
                                queries.shape[1])
        if fmt is None:
            return self._float32_search(queries, k)
        sims, rows, done = certified_search(queries, self.bank_, k, fmt)
        if not done.all():
            rest = np.flatnonzero(~done)
            sims[rest], rows[rest] = self._float32_search(queries[rest], k)
        return sims, rows

    def _float32_search(self, queries, k):
        margin = min(len(self.bank_) - k, max(4, k // 4))
        sims, rows = self._raw_search(queries, k + max(margin, 0))
        return canonical_neighbours(queries, self.bank_, sims, rows, k,
                                    exact=self.index in ("flat", "Flat"))

    def _raw_search(self, queries, k):
        bank = self.bank_
        if self.scann_ is not None:
            with self.scann_.lock:
                current = self.scann_.version == self.scann_version_
                if current:
                    sims, labels = self.scann_.search(queries, k)
            if not current:  # superseded by a later change: exact over this version
                return exact_search(queries, bank, k)
        elif self.faiss_index_ is None:
            return exact_search(queries, bank, k)
        else:
            sims, labels = self.faiss_index_.search(queries, k)
        missing = labels < 0
        slots = np.full(labels.shape, -1, dtype=np.int64)
        if self.by_row_:
            found = labels[~missing]
            slots[~missing] = bank.live_slots[found] if bank.dead_slots.size else found
        else:
            slots[~missing] = bank.slots_of(labels[~missing])[0]
        sims[missing] = -np.inf
        return sims, slots

    # -- helpers ---------------------------------------------------------------------

    def _screen(self):
        return (self.params or {}).get("screen", "auto")

    def _check_screen(self):
        if "screen" not in (self.params or {}):
            return
        if self.index != "flat":
            raise ValueError(f"Search parameter screen applies to the exact index ('flat') "
                             f"only, not to {self.index!r}.")
        if self._screen() not in SCREEN_OPTIONS:
            raise ValueError(f"screen must be one of {SCREEN_OPTIONS}, got "
                             f"{self._screen()!r}.")

    def _wants_gpu(self):
        if self.device == "cuda" and not faiss_has_gpu():
            raise ValueError("device='cuda' but FAISS has no GPU support or sees no GPU.")
        return self.device == "cuda" or (self.device == "auto" and faiss_has_gpu())

    def _to_gpu(self, core):
        self._gpu_resources = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(self._gpu_resources, 0, core)

    def _set_search_params(self):
        params = dict(_DEFAULT_PARAMS.get(self.index, {}))
        params.update({k: v for k, v in (self.params or {}).items() if k != "screen"})
        space = faiss.GpuParameterSpace() if self.on_gpu_ else faiss.ParameterSpace()
        for key, value in params.items():
            try:
                space.set_index_parameter(self.faiss_index_, key, value)
            except RuntimeError as exc:
                raise ValueError(
                    f"Search parameter {key}={value!r} does not apply to index "
                    f"{self.index!r}: {exc}"
                ) from None

    # -- pickling: FAISS indexes are not picklable; serialise them -----------------

    def __getstate__(self):
        state = {k: v for k, v in self.__dict__.items() if k != "_gpu_resources"}
        if getattr(self, "scann_", None) is not None:
            with self.scann_.lock:
                current = self.scann_.version == self.scann_version_
                state["scann_"] = self.scann_.__getstate__() if current else None
        if self.faiss_index_ is not None:
            index = self.faiss_index_
            if self.on_gpu_:
                index = faiss.index_gpu_to_cpu(index)
            state["faiss_index_"] = faiss.serialize_index(index)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__dict__.setdefault("scann_", None)
        if self.index == "scann" and "bank_" in state:
            if state["scann_"] is None:  # pickled while superseded: rebuild its items
                self.scann_ = ScannSearcher(resolve_params(self.params, len(self.bank_)))
                self.scann_.build(self.bank_)
            else:
                self.scann_ = ScannSearcher.__new__(ScannSearcher)
                self.scann_.__setstate__(state["scann_"])
            self.scann_version_ = self.scann_.version
            return
        if self.faiss_index_ is None:
            return
        index = faiss.deserialize_index(self.faiss_index_)
        self.on_gpu_ = self.on_gpu_ and self.device != "cpu" and faiss_has_gpu()
        if self.on_gpu_:
            index = self._to_gpu(index)
        elif self.index == "flat":
            # Exact search on the CPU reads the bank in place: drop the copy.
            self.by_row_, index = False, None
        self.faiss_index_ = index
        if index is not None:
            self._set_search_params()
