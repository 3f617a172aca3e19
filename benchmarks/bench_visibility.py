"""What the commit log costs a Milvus memory's searches: with and without the visibility filter.

A :class:`~skmml.MilvusMemory` reads its commit log once per operation and
filters every search on the committed batches (``batch <= head and batch
not in hidden``). This measures, in one run and interleaved, on Milvus Lite
and on the real Milvus 2.3.5 server (``tests/_local_milvus.py``), exact
(FLAT) search of N = 50,000 unit vectors (d = 128, k = 32):

- ``plain``: pymilvus ``search`` filtered on the modality only, which is
  what a memory without a commit log does (the baseline, called directly on
  pymilvus, not through skmml);
- ``filter``: the same call with the visibility filter added (its
  evaluation in the engine);
- ``skmml``: ``MilvusMemory.search``, i.e. one read of the log, then the
  filtered search (the whole cost a user sees).

Each is timed batched (1,000 queries a call) and single-query (50 calls),
once with a clean log and once while another write is open (then the
filter also excludes that batch: ``not in [...]``).

Run: ``python benchmarks/bench_visibility.py`` (``pip install ".[milvus]"
milvus==2.3.5``; the server part is skipped where it cannot start).
"""

import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

N, D, K = 50_000, 128, 32
N_BATCH, N_SINGLE, REPEATS = 1000, 50, 3


def _unit(a):
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def _timed(fn, n_queries):
    start = time.perf_counter()
    fn()
    return n_queries / (time.perf_counter() - start)


def measure(mm, Q, label):
    from skmml.backends.milvus._schema import MODALITY_CODES

    client = mm._client()
    params = {"metric_type": "IP", "params": {}}
    modality = f"modality == {MODALITY_CODES['image']}"

    def raw(queries, where):
        return client.search(mm.collection, data=queries, limit=K, filter=where,
                             output_fields=["id", "label"], search_params=params,
                             consistency_level="Strong")

    visible = mm._log.snapshot().where(modality)
    ways = {
        "plain": lambda q: raw(q, modality),
        "filter": lambda q: raw(q, visible),
        "skmml": lambda q: mm.search(q, K),
    }
    # The filter hides exactly the uncommitted rows; skmml's search is the filtered one.
    ids = {name: np.sort([[h["entity"]["id"] for h in row] for row in raw(Q[:20], where)], 1)
           for name, where in (("plain", modality), ("filter", visible))}
    assert np.array_equal(np.sort(mm.search(Q[:20], K)[1], 1), ids["filter"])
    uncommitted = int((ids["plain"] >= 10**9).sum())
    assert (ids["filter"] < 10**9).all()
    best = {name: [0.0, 0.0] for name in ways}
    for _ in range(REPEATS):
        for name, way in ways.items():  # interleaved
            batched = _timed(lambda: way(Q[:N_BATCH]), N_BATCH)
            single = _timed(lambda: [way(Q[i:i + 1]) for i in range(N_SINGLE)], N_SINGLE)
            best[name] = [max(best[name][0], batched), max(best[name][1], single)]
    print(f"\n{label}  (filter: {visible!r}; uncommitted rows among the plain search's "
          f"neighbors of 20 queries: {uncommitted})")
    print(f"{'':8s} {'batched q/s':>12s} {'ratio':>6s} {'single q/s':>11s} {'ratio':>6s}")
    for name, (batched, single) in best.items():
        print(f"{name:8s} {batched:12.0f} {batched / best['plain'][0]:6.2f} "
              f"{single:11.1f} {single / best['plain'][1]:6.2f}")


def run(uri, token, label):
    from skmml import Memory, MilvusMemory

    rng = np.random.default_rng(0)
    X = _unit(rng.normal(size=(N, D)))
    Q = _unit(rng.normal(size=(N_BATCH, D)))
    mm = MilvusMemory.from_memory(Memory(X, np.arange(N) % 100), uri=uri,
                                  collection="visibility", token=token, timeout=60)
    measure(mm, Q, f"{label}, clean log")
    # Another write open (begun, rows in, not committed), and a later one committed.
    batch = mm._log.begin(1)
    mm._client().insert(mm.collection, [
        {"id": 10**9 + i, "batch": batch, "embedding": Q[i].tolist(), "label": 0,
         "modality": 0, "metadata": {}} for i in range(100)])
    mm.add(X[:10], np.zeros(10, dtype=np.int64))
    measure(mm, Q, f"{label}, one write open")
    mm._log.roll_back(batch)
    mm._client().drop_collection("visibility")
    mm.close()


def main():
    import platform

    flags = ""
    if os.path.exists("/proc/cpuinfo"):
        line = next(x for x in open("/proc/cpuinfo") if x.startswith("flags"))
        flags = " ".join(f for f in line.split() if f.startswith(("avx", "amx", "fma")))
    print(f"N={N} d={D} k={K}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; {flags}")
    folder = tempfile.mkdtemp()
    run(os.path.join(folder, "visibility.db"), None, "Milvus Lite")
    try:
        from _local_milvus import LocalMilvusServer

        server = LocalMilvusServer(os.path.join(folder, "server"), authorization=True).start()
    except Exception as exc:  # no server here
        print(f"\nMilvus server: skipped ({exc})")
        return
    try:
        run(server.uri, server.token, "Milvus server 2.3.5")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
