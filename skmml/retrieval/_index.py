"""NeighborIndex: the one interface over every index kind.

The index is derived state: it is built from a :class:`~skmml.MemoryBank`,
kept in step with it by stable item id, and pickled with the estimators that
hold it (FAISS indexes serialised, ScaNN as its own files). Each kind is one
small class (:mod:`skmml.retrieval._kinds`): exact search, FAISS, ScaNN.
"""

import numpy as np
from tqdm.auto import tqdm

from ._faiss import FaissIndex, wants_gpu
from ._kinds import ExactIndex, IndexSpec
from ._scann import ScannIndex
from ._screening import SCREEN_OPTIONS

#: Most queries per block when a search shows a progress bar.
SEARCH_BLOCK = 16384
#: Fewest queries per block then (smaller blocks would slow FAISS down).
VERBOSE_MIN_BLOCK = 64


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
        "bf16" | "fp32"}``: certified exact search with a reduced-precision
        screen (``skmml.retrieval._screening``); "auto" (the default) screens
        where a one-time measurement found it faster on this machine, "off"
        always searches in float32, "fp32" runs the screen's pipeline with a
        float32 product. The result is the same either way. "scann"
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
    :func:`faiss.knn`, so following an added or forgotten item costs nothing.
    Other indexes are keyed by the bank's stable item ids (IVF indexes
    natively, the others through :class:`faiss.IndexIDMap2`), so adding and
    removing items never renumbers; index types that cannot remove (HNSW) are
    rebuilt from the remaining items instead. GPU indexes cannot hold ids:
    they are addressed by row and rebuilt on removal.

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
        screen = (self.params or {}).get("screen", "auto")
        if "screen" in (self.params or {}) and self.index != "flat":
            raise ValueError(f"Search parameter screen applies to the exact index ('flat') "
                             f"only, not to {self.index!r}.")
        if screen not in SCREEN_OPTIONS:
            raise ValueError(f"screen must be one of {SCREEN_OPTIONS}, got {screen!r}.")
        spec = IndexSpec(self.index, self.params, self.device)
        if self.index == "scann":
            self.kind_ = ScannIndex.build(spec, bank)
        elif self.index == "flat" and not wants_gpu(self.device):
            self.kind_ = ExactIndex.build(spec, bank)
        else:
            self.kind_ = FaissIndex.build(spec, bank, wants_gpu(self.device))
        return self

    def add(self, bank, n_new):
        """A new index of `bank`, whose last `n_new` slots are new items.

        This index is left as it is (searches may be running on it): exact
        search on the CPU just reads the new bank; a FAISS index is cloned
        and the clone gets the new items; a GPU index is rebuilt; a ScaNN
        index upserts them (:mod:`skmml.retrieval._scann`).
        """
        return self._following(self.kind_.added(bank, n_new))

    def remove(self, bank, ids):
        """A new index of `bank`, from which the items `ids` were removed.

        This index is left as it is; see :meth:`add`. Index types that cannot
        remove (HNSW) are rebuilt from the remaining items.
        """
        return self._following(self.kind_.removed(bank, ids))

    def _following(self, kind):
        index = NeighborIndex(self.index, self.params, self.device)
        index.kind_ = kind
        return index

    @property
    def bank_(self):
        """The bank version this index searches."""
        return self.kind_.bank

    # -- searching -------------------------------------------------------------------

    def search(self, queries, k, verbose=False):
        """Return (similarities, slots) of the `k` nearest items of each query.

        `queries` are L2-normalised float32 rows. `slots` index the bank's
        ``slot_*`` arrays (:mod:`skmml.memory._bank`; they equal rows of its
        ``embeddings``, ``ids``, ... while no item is forgotten and not yet
        compacted); an approximate index that finds fewer than `k` items pads
        with slot -1 and similarity -inf. Neighbors come nearest first, and
        equal similarities go to the lower memory id, on every search path
        and for every batch size. With `verbose`, 128 queries or more are
        searched in about 20 blocks under a progress bar (e.g. pruning's
        leave-one-out search).
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
                    sims[block], rows[block] = self.kind_.search(queries[block], k)
                    bar.update(len(queries[block]))
            return sims, rows
        return self.kind_.search(queries, k)

    def __setstate__(self, state):
        self.__dict__.update(state)
        kind = state.get("kind_")
        if isinstance(kind, FaissIndex) and self.index == "flat" and not kind.on_gpu:
            # Exact search on the CPU reads the bank in place: drop the copy.
            self.kind_ = ExactIndex(kind.spec, kind.bank)
