"""A memory held in Milvus: for memories beyond one machine.

:class:`MilvusMemory` is a handle on a Milvus collection (Milvus Lite, a
file-backed embedded engine, or a Milvus server) that holds a memory's items:
one row per item with its id, embedding, label, modality and metadata. The
classifiers search it where it lives through its backend (the protocol of
every memory, :mod:`skmml.backends`):
the client holds no embeddings, only what is small (the class counts, the
connection description, and pruning counts of the items that have one).

Needs ``pip install "skmml[milvus]"`` (pymilvus and milvus-lite).
"""

import functools
import json
import threading
import time
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..._validation import (check_embeddings, check_ids, check_item_ids, check_labels,
                           l2_normalize, warn_zero_rows)
from ...retrieval._exact import tie_order
from ._backend import MilvusBackend
from ._connection import (_call_error, _connect, _disconnect, _pymilvus, _resolve, add_note,
                          grpc_error)
from ._log import _LOG_SUFFIX, COMMITTED, OPEN, CommitLog
from ._schema import (_ALLOCATOR_SUFFIX, _FORMAT, _LAYOUT_KEY, _MAX_MARK_JUMP, CONSISTENCY_LEVELS,
                      INDEX_TYPES, LAYOUT_VERSION, MAX_TOP_K, MODALITY_CODES, _classes,
                      _create_collection, _labels_array, _label_kind, _metadata_frame, _rows)

#: Seconds between looks at the log while a concurrent write of the same ids finishes.
_CLAIM_POLL = 0.05


@functools.cache
def _log_reader():
    """Threads that read commit logs while a search runs (see MilvusMemory._on_snapshot)."""
    return ThreadPoolExecutor(max_workers=4, thread_name_prefix="skmml-milvus-log")

class MilvusMemory:
    """A memory held in a Milvus collection: a handle on shared, mutable state.

    Open an existing collection with ``MilvusMemory(uri, collection)``, or
    create one from an in-RAM memory with :meth:`from_memory`. Give it to a
    classifier as its memory (``KNNVoteClassifier().set_memory(mm)``): it
    searches the collection, and ``partial_fit`` / ``forget`` write to it.

    Unlike the immutable :class:`~skmml.Memory`, a ``MilvusMemory`` is shared
    state: every classifier attached to the collection, in this process or
    another, sees every write (``partial_fit`` on any of them changes the
    memory of all of them), and :func:`~sklearn.base.clone`,
    ``copy.deepcopy`` and ``GridSearchCV`` share the handle instead of
    copying a memory. It pickles as its connection description (no token,
    no embeddings) and reconnects when first used after unpickling.

    Parameters
    ----------
    uri : str
        A Milvus Lite path ending in ``.db`` (``"./photos.db"``; embedded,
        one process at a time) or a server URL (``"http://host:19530"``).
    collection : str
        Collection name.
    token : str, default=None
        ``"user:password"`` or an API key for a server with authentication.
        None reads the ``MILVUS_TOKEN`` environment variable. Never pickled
        nor shown.
    search_params : dict, default=None
        Search parameters of the collection's index, e.g. ``{"nprobe": 32}``
        (IVF) or ``{"ef": 128}`` (HNSW).
    consistency : {"Strong", "Bounded", "Session", "Eventually"}, default="Strong"
        Milvus consistency level of every read. "Strong" makes each insert
        and delete visible to the very next search (exact unlearning); the
        others are faster on a server but may answer from a state a few
        seconds old.
    timeout : float, default=10.0
        Seconds each call to the server may take before failing with a
        ConnectionError (connecting, searching, writing).
    batch_size : int, default=4096
        Rows per insert call and per page when streaming the collection.

    Attributes
    ----------
    n_features : int
        Embedding dimension.
    index_type : str
        The collection's index type ("FLAT" for exact search).

    See Also
    --------
    skmml.Memory : the in-RAM memory, immutable.

    Notes
    -----
    **Ids.** Items keep the int64 ids they had in the in-RAM memory. New
    items (``partial_fit``, :meth:`add` without ids) get ids from a
    high-water mark, :attr:`next_id`, as in :class:`~skmml.Memory`: after a
    memory of ``n`` items, the next five get ids ``n .. n + 4``, and a
    forgotten id is never given to another item, also across reconnects.
    The mark lives in the collection: every id ever given has a placeholder
    row, never deleted, in a companion collection
    (``<collection>__skmml_ids``, 16 bytes a row) with a Milvus-generated
    key, and an item's id is the collection's id base (the memory's
    ``next_id`` at creation) plus its key's rank among those keys. Ids
    reserved by concurrent clients of one standalone server (Milvus Lite, or
    a server with one proxy, whose keys become visible in the order it
    generates them) never clash. Explicit ids above the mark move it above
    them (by at most 2**20 ids a call).

    **Writes are all-or-nothing, also across crashes.** Each write (an
    import, :meth:`add`, :meth:`expand`, a ``partial_fit``) tags its rows
    with a batch number and becomes visible by one commit record in a
    companion collection (``<collection>__skmml_log``); every read filters
    on the committed batches, so no reader ever sees part of a write, and a
    write whose client or server died is never seen. Its hidden rows are
    removed by the next write once its writer is known dead, or by
    :meth:`recover`. Of two clients adding the same explicit ids at once,
    exactly one succeeds; the other gets a ValueError naming them. A
    :meth:`remove` is one delete request. Every call passes `timeout` to
    Milvus; a hung or lost server is a ConnectionError.

    **Consistency.** Milvus's default level (Bounded) hides recent inserts
    and deletes from the next search; this handle reads with "Strong" unless
    told otherwise, so a forgotten item never votes again, and a write is
    seen whole (at lower levels a committed write may show partly for a few
    seconds).

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from skmml import KNNVoteClassifier, Memory, MilvusMemory
    >>> rng = np.random.default_rng(0)
    >>> memory = Memory(rng.normal(size=(60, 8)), np.arange(60) % 3)
    >>> path = os.path.join(tempfile.mkdtemp(), "photos.db")
    >>> mm = MilvusMemory.from_memory(memory, uri=path, collection="photos")
    >>> mm
    MilvusMemory(uri='...photos.db', collection='photos', index_type='FLAT')
    >>> clf = KNNVoteClassifier(n_neighbors=5).set_memory(mm)
    >>> clf.predict(memory.image.embeddings[:3])
    array([0, 1, 2])
    >>> clf.forget([0]).kneighbors(memory.image.embeddings[:1], 2)[1]
    array([[44,  4]])
    >>> mm.close()
    """

    def __init__(self, uri, collection, *, token=None, search_params=None,
                 consistency="Strong", timeout=10.0, batch_size=4096):
        if consistency not in CONSISTENCY_LEVELS:
            raise ValueError(f"consistency must be one of {CONSISTENCY_LEVELS}, got "
                             f"{consistency!r}.")
        self.uri = _resolve(uri)
        self.collection = collection
        self.search_params = dict(search_params or {})
        self.consistency = consistency
        self.timeout = timeout
        self.batch_size = batch_size
        self._token = token
        self._lock = threading.RLock()
        self._client_ = None
        self._describe()

    # -- connection ----------------------------------------------------------------------

    def _where(self):
        return f"Milvus collection {self.collection!r} at {self.uri}"

    def _client(self):
        with self._lock:
            if self._client_ is None:
                client = _connect(self.uri, self._token, self.timeout)
                # Closed with the handle, when closed or garbage-collected.
                self._close = weakref.finalize(self, _disconnect, self.uri, client)
                self._client_ = client
            return self._client_

    def _call(self, what, fn, *args, timed=True, **kwargs):
        """Run a client call within the timeout; its failure says what, where and why.

        ConnectionError when the server is unreachable, hung past the timeout
        or died mid-call; ValueError when the collection is gone;
        RuntimeError for anything else the server refused.
        """
        pymilvus = _pymilvus()
        if timed:
            kwargs.setdefault("timeout", self.timeout)
        try:
            return fn(*args, **kwargs)
        except (pymilvus.exceptions.MilvusException, grpc_error()) as exc:
            raise _call_error(self.uri, self.collection, what, exc, self.timeout) from None

    def close(self):
        """Close the connection (it reopens on next use).

        Closing the last handle on a Milvus Lite file in this process
        releases the file, so that another process may open it.
        """
        with self._lock:
            if self._client_ is not None:
                self._close()
                self._client_ = None

    def _describe(self):
        """Check the collection is a skmml memory and read its layout."""
        client = self._client()
        if not self._call("has_collection", client.has_collection, self.collection):
            raise ValueError(
                f"{self._where()} does not exist: create it with "
                "MilvusMemory.from_memory(memory, uri, collection)."
            )
        info = self._call("describe_collection", client.describe_collection, self.collection)
        try:
            layout = json.loads((info.get("properties") or {}).get(_LAYOUT_KEY) or "{}")
        except ValueError:
            layout = {}
        if layout.get("format") != _FORMAT:
            raise ValueError(f"{self._where()} was not created by skmml "
                             "(MilvusMemory.from_memory).")
        if layout.get("version", 1) != LAYOUT_VERSION:
            raise ValueError(
                f"{self._where()} has layout version {layout.get('version', 1)}; this skmml "
                f"reads version {LAYOUT_VERSION} (with a commit log). Re-import it: export "
                "with the skmml that wrote it (MilvusMemory.to_memory().save(path)), then "
                "MilvusMemory.from_memory(Memory.load(path), uri, new_collection).")
        fields = {f["name"]: f for f in info["fields"]}
        self.n_features = int(fields["embedding"]["params"]["dim"])
        self._label_kind = layout["labels"]
        self._id_base = int(layout["id_base"])
        indexes = self._call("describe_index", client.describe_index, self.collection,
                             "embedding")
        metric = (indexes or {}).get("metric_type")
        if metric != "IP":
            raise ValueError(
                f"{self._where()} indexes its embeddings with metric {metric}; skmml needs "
                "IP (inner product of L2-normalised embeddings, i.e. cosine)."
            )
        self.index_type = indexes.get("index_type", "FLAT")
        for name in (self.collection, self.collection + _ALLOCATOR_SUFFIX,
                     self.collection + _LOG_SUFFIX):
            self._call("load_collection", client.load_collection, name)
        self._log = CommitLog(self)
        self._counts = None
        self._snapshot = None

    # -- creating ------------------------------------------------------------------------

    @classmethod
    def from_memory(cls, memory, uri, collection, *, token=None, index_type="FLAT",
                    index_params=None, search_params=None, consistency="Strong",
                    timeout=10.0, batch_size=4096, index_wait=3600.0, verbose=0):
        """Create `collection` at `uri` holding `memory`'s items (both modalities).

        The import is all-or-nothing: if any batch fails, the collection is
        dropped and the error raised. Then the collection is flushed and,
        by default, this waits until its index covers every row: a Milvus
        server builds indexes in the background, and until it has, searches
        scan the unindexed segments by brute force (at 200k x 512 on two
        cores, 256 queries took 25.6 s while an IVF_FLAT build ran and 0.49 s
        once it had finished).

        Parameters
        ----------
        memory : Memory
            The items to import; their ids, labels and metadata are kept.
            Labels must be integers or strings.
        uri, collection, token, search_params, consistency, timeout, batch_size
            As for :class:`MilvusMemory`.
        index_type : str, default="FLAT"
            One of "FLAT" (exact), "IVF_FLAT", "IVF_SQ8", "HNSW", and on a
            server "IVF_PQ" and "DISKANN" (Milvus Lite searches those by
            brute force).
        index_params : dict, default=None
            Build parameters, e.g. ``{"nlist": 1024}`` or ``{"M": 16,
            "efConstruction": 200}``.
        index_wait : float or None, default=3600.0
            Most seconds to wait for the index build; past them a warning
            says how much is indexed, and the memory is returned all the
            same (its answers are right; only slower). None: do not wait.
        verbose : int, default=0
            Show progress bars over the import and the index build.

        Returns
        -------
        MilvusMemory
        """
        from ...memory._memory import Memory

        if not isinstance(memory, Memory):
            raise TypeError(f"from_memory() needs a Memory, got {type(memory).__name__}.")
        if index_type not in INDEX_TYPES:
            raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {index_type!r}.")
        if not len(memory):
            raise ValueError("Cannot create a Milvus memory from an empty Memory.")
        labels_kind = _label_kind(memory.classes)
        pymilvus = _pymilvus()
        uri = _resolve(uri)
        client = _connect(uri, token, timeout)
        names = [collection + suffix for suffix in ("", _ALLOCATOR_SUFFIX, _LOG_SUFFIX)]
        handle = None
        try:
            try:
                if client.has_collection(collection, timeout=timeout):
                    raise ValueError(f"Milvus collection {collection!r} at {uri} already "
                                     "exists: open it with MilvusMemory(uri, collection), or "
                                     "drop it first.")
                _create_collection(client, collection, memory.n_features, labels_kind,
                                   memory.next_id, index_type, index_params or {}, timeout)
            except (pymilvus.exceptions.MilvusException, grpc_error()) as exc:
                raise _call_error(uri, collection, "create the collection", exc,
                                  timeout) from None
            try:
                handle = cls(uri, collection, token=token, search_params=search_params,
                             consistency=consistency, timeout=timeout, batch_size=batch_size)
                handle.expand(memory, verbose=verbose)
            except BaseException as exc:
                try:
                    for name in names:
                        client.drop_collection(name, timeout=timeout)
                except Exception as undo:
                    add_note(exc, f"Dropping the half-imported collection failed too ({undo}); "
                                 "nothing of it is visible (the import never committed).")
                if handle is not None:
                    handle.close()
                raise
        finally:
            _disconnect(uri, client)  # after the handle opened: Lite stays up
        memory = handle
        if index_wait is not None:
            memory.wait_for_index(index_wait, verbose=verbose)
        return memory

    def wait_for_index(self, timeout=3600.0, verbose=0):
        """Flush the collection and wait until its index covers every row.

        Returns True when it does; after `timeout` seconds, warns with the
        indexed fraction and returns False.
        """
        client = self._client()
        self._call("flush", client.flush, self.collection, timeout=self.timeout)
        deadline = time.monotonic() + timeout
        with tqdm(desc="indexing", unit="item", disable=not verbose) as bar:
            while True:
                info = self._call("describe_index", client.describe_index, self.collection,
                                  "embedding")
                done, total = int(info.get("indexed_rows", 0)), int(info.get("total_rows", 0))
                bar.total = total
                bar.update(min(done, total) - bar.n)
                if done >= total:
                    return True
                if time.monotonic() > deadline:
                    warnings.warn(
                        f"The {self.index_type} index of {self._where()} covers {done} of "
                        f"{total} rows after {timeout} s; searches scan the rest by brute "
                        "force until the server's build finishes.", stacklevel=2)
                    return False
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    # -- what it holds -------------------------------------------------------------------

    def counts(self):
        """Number of image and text items per class, as a DataFrame.

        Read from the collection once per handle (a scan of the label
        field), then kept up to date by this handle's writes; writes of other
        clients show after :meth:`refresh`.
        """
        counts = self._class_counts()
        table = pd.DataFrame({m: pd.Series(c, dtype=np.int64) for m, c in counts.items()})
        table = table.fillna(0).astype(np.int64).sort_index()
        table.index.name = "class"
        return table

    @property
    def classes(self):
        """Sorted labels of the classes with at least one item."""
        return _classes(self._class_counts(), self._label_kind)

    @property
    def next_id(self):
        """The id that the next item added without an id gets (a high-water mark).

        Read from the collection: every client sees the same mark.
        """
        return self._id_base + self._count(self.collection + _ALLOCATOR_SUFFIX)

    def _count(self, name, where=""):
        """Rows of collection `name` matching `where`, counted by Milvus."""
        rows = self._call("count", self._client().query, name, filter=where,
                          output_fields=["count(*)"], consistency_level="Strong")
        return int(rows[0]["count(*)"])

    def n_items(self, modality="image"):
        """Number of items of `modality`."""
        return int(sum(self._class_counts()[modality].values()))

    def __len__(self):
        return self.n_items("image") + self.n_items("text")

    def refresh(self):
        """Forget cached class counts (re-read on next use): after other clients' writes."""
        with self._lock:
            self._counts = None
        return self

    def _class_counts(self):
        with self._lock:
            if self._counts is None:
                counts = {m: {} for m in MODALITY_CODES}
                names = {code: m for m, code in MODALITY_CODES.items()}
                for batch in self._scan(["label", "modality"]):
                    for row in batch:
                        bucket = counts[names[row["modality"]]]
                        bucket[row["label"]] = bucket.get(row["label"], 0) + 1
                self._counts = counts
            return self._counts

    def _scan(self, fields, where=""):
        """Pages of the visible rows (dicts with `fields` and "id") matching `where`.

        Streamed from one snapshot of the commit log.
        """
        return self._scan_collection(self.collection, ["id", *fields],
                                     self._log.snapshot().where(where))

    def _scan_collection(self, name, fields, where=""):
        client = self._client()
        iterator = self._call("query_iterator", client.query_iterator, name,
                              batch_size=self.batch_size, filter=where,
                              output_fields=list(fields))
        try:
            while True:
                page = self._call("query_iterator.next", iterator.next, timed=False)
                if not page:
                    return
                yield page
        finally:
            try:
                iterator.close()
            except Exception:  # the server went away: nothing to close
                pass

    def to_memory(self):
        """Export every item to an in-RAM :class:`~skmml.Memory` (for memories that fit)."""
        rows = [row for page in self._scan(["embedding", "label", "modality", "metadata"])
                for row in page]
        return self._memory_of(rows)

    def _memory_of(self, rows):
        """An in-RAM Memory of `rows` (dicts from the collection), ordered by id per modality."""
        from ...memory._memory import Memory

        given = {}
        for modality, code in MODALITY_CODES.items():
            mine = sorted((r for r in rows if r["modality"] == code), key=lambda r: r["id"])
            if not mine:
                continue
            given[f"{modality}_embeddings"] = np.asarray([r["embedding"] for r in mine],
                                                         dtype=np.float32)
            given[f"{modality}_labels"] = _labels_array([r["label"] for r in mine],
                                                        self._label_kind)
            given[f"{modality}_ids"] = np.asarray([r["id"] for r in mine], dtype=np.int64)
            if "metadata" in mine[0]:
                given[f"{modality}_metadata"] = _metadata_frame(mine)
        return Memory(given.pop("image_embeddings", None), given.pop("image_labels", None),
                      **given)

    def class_memories(self, classes, max_items=None):
        """(classes, Memory) pairs holding every item of a few of `classes` at a time.

        Streams the collection one group of classes at a time (about
        `max_items` items per group, ``4 * batch_size`` by default; a class is
        never split), items ordered by id within each modality, so that
        per-class statistics (MML's prototypes) never need the whole memory
        in RAM.
        """
        counts = self.counts()
        max_items = max_items or 4 * self.batch_size
        group, size = [], 0
        groups = []
        for label in classes:
            n = int(counts.loc[label].sum()) if label in counts.index else 0
            if group and size + n > max_items:
                groups.append(group)
                group, size = [], 0
            group.append(label)
            size += n
        if group:
            groups.append(group)
        for group in groups:
            values = [label.item() if hasattr(label, "item") else label for label in group]
            rows = [row for page in self._scan(["embedding", "label", "modality"],
                                               f"label in {json.dumps(values)}")
                    for row in page]
            yield np.asarray(group), self._memory_of(rows)

    # -- searching -----------------------------------------------------------------------

    def search(self, queries, k, modality="image", *, vectors=False, verbose=False):
        """The `k` nearest items of `modality` of each query (L2-normalised rows).

        Returns
        -------
        sims, ids : ndarrays of shape (n_queries, k)
            Similarities (-inf where fewer than `k` were found) and ids (-1).
        labels : ndarray of shape (n_queries, k)
        vectors : ndarray of shape (n_queries, k, n_features)
            Only with ``vectors=True``: the neighbors' embeddings.
        """
        if k > MAX_TOP_K:
            raise ValueError(f"n_neighbors={k} is above Milvus's largest top-k ({MAX_TOP_K}).")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.shape[1] != self.n_features:
            raise ValueError(f"Dimension mismatch: queries have dimension {queries.shape[1]}, "
                             f"{self._where()} holds {self.n_features}-dimensional embeddings.")
        n = queries.shape[0]
        fields = ["id", "label", "embedding"] if vectors else ["id", "label"]
        client = self._client()
        params = {"metric_type": "IP", "params": self.search_params}
        block = max(1, min(1024, (1 << 20) // max(k, 1)))

        def run(snapshot):
            sims = np.full((n, k), -np.inf, dtype=np.float32)
            ids = np.full((n, k), -1, dtype=np.int64)
            labels = np.empty((n, k), dtype=object)
            out = np.zeros((n, k, self.n_features), dtype=np.float32) if vectors else None
            where = snapshot.where(f"modality == {MODALITY_CODES[modality]}")
            with tqdm(total=n, desc="searching", unit="query", disable=not verbose) as bar:
                for start in range(0, n, block):
                    hits = self._call(
                        "search", client.search, self.collection,
                        data=queries[start:start + block], limit=k,
                        filter=where, output_fields=fields,
                        search_params=params, consistency_level=self.consistency)
                    for i, row in enumerate(hits, start):
                        for j, hit in enumerate(row):
                            sims[i, j], ids[i, j] = hit["distance"], hit["entity"]["id"]
                            labels[i, j] = hit["entity"]["label"]
                            if vectors:
                                out[i, j] = hit["entity"]["embedding"]
                    bar.update(len(hits))
            return sims, ids, labels, out

        sims, ids, labels, out = self._on_snapshot(run)
        order = tie_order(sims, ids)  # equal similarities: the lower id first
        sims = np.take_along_axis(sims, order, axis=1)
        ids = np.take_along_axis(ids, order, axis=1)
        labels = _labels_array(np.take_along_axis(labels, order, axis=1), self._label_kind,
                               missing=ids < 0)
        if vectors:
            return sims, ids, labels, out[np.arange(n)[:, None], order]
        return sims, ids, labels

    def _on_snapshot(self, run):
        """``run(snapshot)`` on the memory's current snapshot, in about one round trip.

        Runs on the snapshot this handle saw last while the log is read
        again; if the log changed meanwhile, runs again on the new one. When
        the two agree, the answer is exactly that of the snapshot just read:
        a batch committed or rolled back before the read would have changed it.
        """
        cached = self._snapshot
        if cached is None:
            snapshot = self._log.snapshot()
            result = run(snapshot)
        else:
            reading = _log_reader().submit(self._log.snapshot)
            result = run(cached)  # if it fails, the read finishes on its own
            snapshot = reading.result()
            if snapshot != cached:
                result = run(snapshot)
        self._snapshot = snapshot
        return result

    def get(self, ids, fields=("label", "metadata")):
        """Rows of the items `ids`, in that order (a ValueError names unknown ids)."""
        ids = np.asarray(ids, dtype=np.int64)
        found = self._rows_by_id(ids, fields)
        missing = [int(i) for i in np.unique(ids) if int(i) not in found]
        if missing:
            raise ValueError(f"Unknown memory ids: {missing[:10]}.")
        return [found[int(i)] for i in ids]

    def metadata(self, ids):
        """The metadata of the items `ids`, one row each, as a DataFrame."""
        if not len(ids):
            return pd.DataFrame(index=pd.RangeIndex(0))
        return _metadata_frame(self.get(ids, ("metadata",)))

    def _rows_by_id(self, ids, fields):
        """{id: row} of those of `ids` that are in the collection."""
        unique = np.unique(np.asarray(ids, dtype=np.int64))
        client, found = self._client(), {}
        snapshot = self._log.snapshot()
        for start in range(0, unique.size, self.batch_size):
            chunk = unique[start:start + self.batch_size].tolist()
            for row in self._call("query", client.query, self.collection,
                                  filter=snapshot.where(f"id in {chunk}"),
                                  output_fields=["id", *fields],
                                  consistency_level=self.consistency):
                found[row["id"]] = row
        return found

    # -- writing -------------------------------------------------------------------------

    def add(self, embeddings, labels, *, ids=None, metadata=None, modality="image"):
        """Insert items as one write; return their ids.

        All-or-nothing: no reader sees the items before the write commits,
        and a failed or interrupted write is never seen (see Notes of
        :class:`MilvusMemory`). Without `ids`, new ids are reserved so that no
        other client gets them; explicit ids held by an item, or being added
        by another client at the same moment, raise a ValueError naming them
        (exactly one of two clients adding the same ids succeeds).
        """
        part = self._part(embeddings, labels, ids, metadata, modality)
        return self._write([part])

    def _part(self, embeddings, labels, ids, metadata, modality):
        """One modality's validated items: (modality, ids or None, embeddings, labels, metadata)."""
        if modality not in MODALITY_CODES:
            raise ValueError(f"modality must be 'image' or 'text', got {modality!r}.")
        emb = check_embeddings(embeddings, name=f"{modality} embeddings", dim=self.n_features)
        n = emb.shape[0]
        labels = check_labels(labels, n, name=f"{modality} labels")
        kind = _label_kind(labels)
        if kind != self._label_kind:
            raise ValueError(f"Label type mismatch: the new items have {labels.dtype} labels, "
                             f"{self._where()} holds {self._label_kind} labels.")
        warn_zero_rows(emb, name=f"{modality} embeddings")
        if metadata is None:
            metadata = pd.DataFrame(index=pd.RangeIndex(n))
        metadata = pd.DataFrame(metadata).reset_index(drop=True)
        if len(metadata) != n:
            raise ValueError(f"metadata has {len(metadata)} rows but there are {n} embeddings.")
        if ids is not None:
            ids = check_ids(ids, n, name=f"{modality} ids")
        return modality, ids, l2_normalize(emb), labels, metadata

    def _write(self, parts, verbose=0):
        """Insert `parts` (see :meth:`_part`) as one batch of the commit log; return the ids."""
        given = [p[1] for p in parts if p[1] is not None]
        explicit = np.concatenate(given) if given else np.empty(0, dtype=np.int64)
        if np.unique(explicit).size != explicit.size:
            raise ValueError("ids must be unique.")
        n_rows = sum(len(p[2]) for p in parts)
        with self._lock:
            clash = self._existing(explicit)
            if clash.size:
                raise ValueError(f"ids already in the memory: {clash[:10].tolist()}.")
            if explicit.size:
                self._raise_mark(int(explicit.max()) + 1)
            ids = [p[1] if p[1] is not None else self._reserve_ids(len(p[2])) for p in parts]
            n_calls = sum(-(-len(i) // self.batch_size) for i in ids)
            batch = self._log.begin(n_calls + 2 * (-(-explicit.size // self.batch_size)))
            settled, committing = True, False
            try:
                with tqdm(total=n_rows, desc="writing", unit="item", disable=not verbose) as bar:
                    for (modality, _, emb, labels, metadata), part_ids in zip(parts, ids):
                        rows = _rows(part_ids, emb, labels, modality, metadata, batch)
                        for start in range(0, len(rows), self.batch_size):
                            chunk = rows[start:start + self.batch_size]
                            settled = False
                            self._call("insert", self._client().insert, self.collection, chunk)
                            settled = True
                            bar.update(len(chunk))
                if explicit.size:
                    self._claim(explicit, batch)
                committing = True
                self._log.commit(batch)
            except BaseException as exc:
                self._counts = None
                if not committing:
                    try:
                        self._log.roll_back(batch, settled=settled)
                    except Exception as undo:
                        add_note(exc, 
                            f"Rolling the write back failed too ({undo}): its rows stay "
                            "hidden (the write never committed); the next write or "
                            "recover() deletes them.")
                raise
            if self._counts is not None:
                for (modality, _, _, labels, _) in parts:
                    bucket = self._counts[modality]
                    for label, count in zip(*np.unique(labels, return_counts=True)):
                        bucket[label.item()] = bucket.get(label.item(), 0) + int(count)
        return np.concatenate(ids) if ids else np.empty(0, dtype=np.int64)

    def _claim(self, ids, batch):
        """Make sure no other write holds `ids`: of two writes adding the same ids, one wins.

        Called after this batch's rows are in, before it commits. A write
        that sees another's rows with the same ids loses if that write
        committed or is older (a smaller batch number), and waits while it is
        newer: a newer write either saw this one's rows (and loses) or
        commits first (and this one loses). Reads are linearizable ("Strong"),
        so at least one of two such writes sees the other.
        """
        client = self._client()
        give_up = time.monotonic() + max(10 * self.timeout, 60.0)
        while True:
            records = self._log.records()  # before the rows: see _Records.state
            rivals = {}
            for start in range(0, ids.size, self.batch_size):
                chunk = ids[start:start + self.batch_size].tolist()
                for row in self._call("query", client.query, self.collection,
                                      filter=f"id in {chunk} and batch != {batch}",
                                      output_fields=["id", "batch"],
                                      consistency_level="Strong"):
                    rivals.setdefault(row["batch"], []).append(row["id"])
            if not rivals:
                return
            states = {b: records.state(b) for b in rivals}
            held = sorted(i for b, s in states.items() if s == COMMITTED for i in rivals[b])
            if held:
                raise ValueError(f"ids already in the memory: {held[:10]}.")
            older = sorted(i for b, s in states.items() if s == OPEN and b < batch
                           for i in rivals[b])
            if older:
                raise ValueError("ids being added by another client at the same time: "
                                 f"{older[:10]}.")
            if not any(s == OPEN for s in states.values()):
                return
            if time.monotonic() > give_up:
                raise ValueError("ids being added by another client that has not finished "
                                 f"since {max(10 * self.timeout, 60.0)} s: "
                                 f"{sorted(i for r in rivals.values() for i in r)[:10]}.")
            self._log._roll_back_dead(records, force=False)
            time.sleep(_CLAIM_POLL)

    def remove(self, ids):
        """Delete the items `ids` with one delete request; return self.

        Ids are integers (a TypeError otherwise); a ValueError names unknown
        ids, and nothing is deleted then. Exact and immediate: the next
        search of any client no longer finds them. Two clients removing the
        same ids at once both succeed, with the same end state.
        """
        ids = check_item_ids(ids)
        with self._lock:
            rows = self.get(ids, ("label", "modality"))
            try:
                self._call("delete", self._client().delete, self.collection,
                           filter=f"id in {np.unique(ids).tolist()}")
            except BaseException:
                self._counts = None
                raise
            if self._counts is not None:
                names = {code: m for m, code in MODALITY_CODES.items()}
                for row in rows:
                    bucket = self._counts[names[row["modality"]]]
                    bucket[row["label"]] -= 1
                    if not bucket[row["label"]]:
                        del bucket[row["label"]]
        return self

    def recover(self, force=False):
        """Roll back the writes of clients that died, and delete their hidden rows.

        A write's rows are never visible before it commits, so a crashed
        write is already invisible; this also deletes its rows. Every write
        does it first for the writers it knows are dead: those of this
        machine whose process is gone (and, for Milvus Lite, of any other
        process), and those past their lease (a deadline set by the writer).

        Parameters
        ----------
        force : bool, default=False
            Also roll back the open writes of other clients that may still be
            running: only when none is.

        Returns
        -------
        dict
            ``{"rolled_back": [...], "rows_removed": n}``: the writes rolled
            back now (their batch numbers) and the hidden rows deleted.
        """
        with self._lock:
            rolled, removed = self._log.recover(force=force)
            self._counts = None
        return {"rolled_back": [int(b) for b in rolled], "rows_removed": int(removed)}

    def _existing(self, ids):
        if not len(ids):
            return np.empty(0, dtype=np.int64)
        return np.asarray(sorted(self._rows_by_id(ids, [])), dtype=np.int64)

    def _reserve_ids(self, n):
        """The next `n` ids of the high-water mark; no other client can get them.

        Each id has a placeholder row with a Milvus-generated key, kept for
        good; the id is the id base plus the key's rank among all keys (see
        Notes of :class:`MilvusMemory`).
        """
        if not n:
            return np.empty(0, dtype=np.int64)
        client = self._client()
        name = self.collection + _ALLOCATOR_SUFFIX
        keys = []
        for start in range(0, n, self.batch_size):
            size = min(self.batch_size, n - start)
            result = self._call("reserve ids", client.insert, name, [{"slot": [0.0, 1.0]}] * size)
            keys.extend(result["ids"])
        keys = np.sort(np.asarray(keys, dtype=np.int64))
        first, last = int(keys[0]), int(keys[-1])
        ranks = self._count(name, f"id < {first}") + np.arange(n)
        if self._count(name, f"id >= {first} and id <= {last}") != n:
            # Another client's keys fall between ours: rank ours among them.
            span = np.sort(np.asarray([row["id"] for page in self._scan_collection(
                name, ["id"], f"id >= {first} and id <= {last}") for row in page],
                dtype=np.int64))
            ranks = ranks[0] + np.searchsorted(span, keys)
        if self._id_base + int(ranks[-1]) < self._id_base:
            raise OverflowError(f"Ids of {self._where()} overflow int64.")
        return self._id_base + ranks

    def _raise_mark(self, above):
        """Move the high-water mark to at least `above` (explicit ids past it)."""
        gap = above - self.next_id
        if gap > _MAX_MARK_JUMP:
            raise ValueError(
                f"ids up to {above - 1} are more than {_MAX_MARK_JUMP} above the next id of "
                f"{self._where()} ({above - gap}): give ids below {above - gap + _MAX_MARK_JUMP}"
                ", or none (new ids are then reserved).")
        if gap > 0:
            self._reserve_ids(gap)

    def expand(self, memory, *, reassign_ids=False, verbose=0):
        """Insert every item of the in-RAM `memory` (both modalities) as one write.

        Returns their ids. Ids are kept (a clash is a ValueError, and nothing
        is inserted), or with `reassign_ids` new ones are reserved (images
        first).
        """
        parts = [self._part(bank.embeddings, bank.labels, None if reassign_ids else bank.ids,
                            bank.metadata, modality)
                 for modality in MODALITY_CODES if len(bank := memory.bank(modality))]
        try:
            return self._write(parts, verbose=verbose)
        except ValueError as exc:
            if not reassign_ids and "already in the memory" in str(exc):
                raise ValueError(f"{exc} Pass reassign_ids=True to renumber the added "
                                 "items.") from None
            raise

    # -- the classifiers' interface ------------------------------------------------------

    def _as_backend(self, index, modalities, unified):
        """The classifiers' view of this collection (see :mod:`skmml.backends`).

        `index` does not apply: the collection has its own index.
        """
        return MilvusBackend.build(self, modalities, unified)

    def __repr__(self):
        return (f"MilvusMemory(uri={self.uri!r}, collection={self.collection!r}, "
                f"index_type={self.index_type!r})")

    # -- sharing and pickling: a handle, never a copy ------------------------------------

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __getstate__(self):
        return {"uri": self.uri, "collection": self.collection,
                "search_params": self.search_params, "consistency": self.consistency,
                "timeout": self.timeout, "batch_size": self.batch_size}

    def __setstate__(self, state):
        # Connects on first use, not here: a process that only passes the
        # estimator along (a Dask scheduler) needs neither server nor token.
        self.__dict__.update(state)
        self._token, self._lock, self._client_ = None, threading.RLock(), None

    _DESCRIBED = frozenset({"n_features", "index_type", "_label_kind", "_id_base", "_counts",
                            "_log", "_snapshot"})

    def __getattr__(self, name):
        # Only reached for attributes not yet set: the layout of an unpickled handle.
        if name in MilvusMemory._DESCRIBED and "_lock" in self.__dict__:
            self._describe()
            return self.__dict__[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
