"""ScaNN as an index type of :class:`~skmml.NeighborIndex` (``index="scann"``).

ScaNN (Google's engine, the one the visual-memory paper used) partitions the
memory with a tree, scores the probed leaves with anisotropic hashing, and
re-scores the best candidates exactly. Needs ``pip install "skmml[scann]"``.

Ids: ScaNN addresses points by position, and its ``delete`` moves the last
point into the freed position (its string docids are a Python list over
those positions). :class:`ScannSearcher` keeps its own int64 array, position
-> memory id, and mirrors every move, so searches map positions to the
bank's stable ids in one vectorised lookup.

Versions: one ScaNN searcher is shared by the versions of an index. Only the
newest version may change it in place (``upsert`` for additions, ``delete``
for removals: no rebuild); a change to an older version, e.g. a second
branch from the same memory, rebuilds. A version that a later change has
superseded no longer matches the shared searcher, so a reader still holding
it (a prediction racing a ``partial_fit``) is answered by exact search over
its own items: every read sees one whole memory.
"""

import io
import math
import os
import tarfile
import tempfile
import threading

import numpy as np

from ._exact import exact_search
from ._kinds import IndexKind

#: Build and search parameters of ``index="scann"`` (ScaNN builder names).
PARAMS = ("num_leaves", "num_leaves_to_search", "training_sample_size",
          "dimensions_per_block", "anisotropic_quantization_threshold", "reorder",
          "brute_force")


#: Batches of at least this many queries are searched on all cores.
_PARALLEL_MIN = 512


def _scann():
    try:
        from scann import scann_ops_pybind
    except ImportError:
        raise ImportError('index="scann" needs ScaNN: pip install "skmml[scann]"') from None
    return scann_ops_pybind


def resolve_params(params, n, k_hint=32):
    """ScaNN settings for a memory of `n` items: the user's, defaults for the rest."""
    params = dict(params or {})
    unknown = set(params) - set(PARAMS)
    if unknown:
        raise ValueError(f"Unknown ScaNN parameter(s) {sorted(unknown)}; "
                         f"index='scann' takes {list(PARAMS)}.")
    leaves = params.get("num_leaves", max(1, min(n // 16, int(round(math.sqrt(n))))))
    settings = {
        "brute_force": bool(params.get("brute_force", False)),
        "num_leaves": leaves,
        "num_leaves_to_search": params.get("num_leaves_to_search", max(1, leaves // 10)),
        "training_sample_size": params.get("training_sample_size", min(n, 100_000)),
        "dimensions_per_block": params.get("dimensions_per_block", 2),
        "anisotropic_quantization_threshold": params.get(
            "anisotropic_quantization_threshold", 0.2),
        "reorder": params.get("reorder", max(100, 4 * k_hint)),
    }
    for key in ("num_leaves", "num_leaves_to_search", "training_sample_size",
                "dimensions_per_block", "reorder"):
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"ScaNN parameter {key} must be a positive integer, got "
                             f"{value!r}.")
    if settings["num_leaves_to_search"] > settings["num_leaves"]:
        raise ValueError(f"ScaNN parameter num_leaves_to_search="
                         f"{settings['num_leaves_to_search']} exceeds num_leaves="
                         f"{settings['num_leaves']}.")
    return settings


class ScannSearcher:
    """A ScaNN searcher over a bank, its position -> id table, and a version counter.

    Parameters
    ----------
    settings : dict
        From :func:`resolve_params`.
    """

    def __init__(self, settings):
        self.settings = settings
        self.lock = threading.Lock()
        self.version = 0

    def build(self, bank):
        """Build over the live items of `bank`; return self."""
        sop = _scann()
        s, n = self.settings, len(bank)
        data = np.ascontiguousarray(bank.embeddings, dtype=np.float32)
        builder = sop.builder(data, min(n, 32), "dot_product")
        if s["brute_force"]:
            builder = builder.score_brute_force()
        else:
            if s["num_leaves"] > n:
                raise ValueError(f"Cannot train ScaNN index 'scann' on {n} items: "
                                 f"num_leaves={s['num_leaves']} exceeds the item count.")
            builder = builder.tree(
                num_leaves=s["num_leaves"], num_leaves_to_search=s["num_leaves_to_search"],
                training_sample_size=min(s["training_sample_size"], n),
            ).score_ah(s["dimensions_per_block"],
                       anisotropic_quantization_threshold=s[
                           "anisotropic_quantization_threshold"]).reorder(s["reorder"])
        try:
            self.raw = builder.build().searcher
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"Cannot train ScaNN index 'scann' on {n} items: {exc}") from None
        self.ids = np.array(bank.ids, dtype=np.int64)  # position -> memory id
        return self

    # -- in-place changes (the newest version only) ------------------------------------

    def upsert(self, embeddings, ids):
        positions = self.raw.upsert([None] * len(ids),
                                    np.ascontiguousarray(embeddings, dtype=np.float32), 1)
        self.ids = np.concatenate([self.ids, ids])
        if not np.array_equal(positions, np.arange(len(self.ids) - len(ids), len(self.ids))):
            raise RuntimeError("ScaNN placed new points out of order.")

    def delete(self, ids):
        """Delete the points of `ids`, mirroring ScaNN's move of the last point."""
        positions = np.flatnonzero(np.isin(self.ids, ids))
        # ScaNN deletes in order, each time moving the last point into the
        # freed position, and reads each position as it is at that step.
        table, size = self.ids.copy(), len(self.ids)
        current = {int(table[p]): int(p) for p in positions}  # the doomed points only
        ordered = []
        for doomed in [int(table[p]) for p in positions]:
            p = current.pop(doomed)
            ordered.append(p)
            moved = int(table[size - 1])
            table[p] = moved
            if moved in current:
                current[moved] = p
            size -= 1
        self.raw.delete(ordered)
        self.ids = table[:size]

    # -- searching ------------------------------------------------------------------------

    def search(self, queries, k):
        """(similarities, memory ids) of the `k` best points; -inf / -1 where missing."""
        s = self.settings
        k_eff = min(k, len(self.ids))
        pre = -1 if s["brute_force"] else max(s["reorder"], k_eff)
        leaves = -1 if s["brute_force"] else s["num_leaves_to_search"]
        parallel = len(queries) >= _PARALLEL_MIN  # ScaNN's own threads, 256 queries each
        positions, sims = self.raw.search_batched(
            np.ascontiguousarray(queries, dtype=np.float32), k_eff, pre, leaves, parallel,
            256)
        positions = positions.astype(np.int64)
        missing = np.isnan(sims) | (positions >= len(self.ids))
        ids = np.where(missing, -1, self.ids[np.minimum(positions, len(self.ids) - 1)])
        sims = np.where(missing, -np.inf, sims).astype(np.float32)
        if k_eff < k:
            pad = k - k_eff
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
            sims = np.pad(sims, ((0, 0), (0, pad)), constant_values=-np.inf)
        return sims, ids

    # -- pickling: ScaNN's own files, in a tar archive ---------------------------------

    def __getstate__(self):
        with tempfile.TemporaryDirectory() as folder:
            self.raw.serialize(folder, True)
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as tar:
                for name in sorted(os.listdir(folder)):
                    tar.add(os.path.join(folder, name), arcname=name)
        return {"settings": self.settings, "ids": self.ids, "files": buffer.getvalue()}

    def __setstate__(self, state):
        sop = _scann()
        self.settings, self.ids = state["settings"], state["ids"]
        self.lock, self.version = threading.Lock(), 0
        with tempfile.TemporaryDirectory() as folder:
            with tarfile.open(fileobj=io.BytesIO(state["files"]), mode="r") as tar:
                tar.extractall(folder, filter="data")
            self.raw = sop.load_searcher(folder).searcher


class ScannIndex(IndexKind):
    """ScaNN over one version of a bank: changed in place while it is the newest.

    Versions share one :class:`ScannSearcher`; additions upsert and removals
    delete in place on the newest version, a branch from an older version
    rebuilds, and a superseded version answers by exact search.
    """

    def __init__(self, spec, bank, searcher):
        super().__init__(spec, bank)
        self.searcher, self.version = searcher, searcher.version

    @classmethod
    def build(cls, spec, bank):
        if spec.device == "cuda":
            raise ValueError("index='scann' runs on the CPU only; use device='cpu' or "
                             "'auto', or a FAISS index on the GPU.")
        return cls(spec, bank, ScannSearcher(resolve_params(spec.params, len(bank))).build(bank))

    def _changed(self, bank, change):
        searcher = self.searcher
        with searcher.lock:
            if searcher.version == self.version:
                change(searcher)
                searcher.version += 1
                return ScannIndex(self.spec, bank, searcher)
        return ScannIndex.build(self.spec, bank)  # a branch from an older version

    def added(self, bank, n_new):
        new = slice(bank.n_slots - n_new, bank.n_slots)
        return self._changed(bank, lambda searcher: searcher.upsert(
            bank.slot_embeddings[new], bank.slot_ids[new]))

    def removed(self, bank, ids):
        return self._changed(bank, lambda searcher: searcher.delete(ids))

    def raw_search(self, queries, k):
        with self.searcher.lock:
            current = self.searcher.version == self.version
            if current:
                sims, ids = self.searcher.search(queries, k)
        if not current:  # superseded by a later change: exact over this version
            return exact_search(queries, self.bank, k)
        found = ids >= 0
        slots = np.full(ids.shape, -1, dtype=np.int64)
        slots[found] = self.bank.slots_of(ids[found])[0]
        return sims, slots

    def __getstate__(self):
        with self.searcher.lock:
            current = self.searcher.version == self.version
            searcher = self.searcher.__getstate__() if current else None
        return {"spec": self.spec, "bank": self.bank, "searcher": searcher}

    def __setstate__(self, state):
        if state["searcher"] is None:  # pickled while superseded: rebuild its items
            searcher = ScannSearcher(resolve_params(state["spec"].params, len(state["bank"])))
            searcher.build(state["bank"])
        else:
            searcher = ScannSearcher.__new__(ScannSearcher)
            searcher.__setstate__(state["searcher"])
        self.__init__(state["spec"], state["bank"], searcher)
