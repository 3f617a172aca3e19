"""Memory beyond one process: in-process FAISS vs Milvus Lite vs a real Milvus server.

One run, clustered synthetic unit vectors (d = 512, 1000 classes, k = 32),
N = 100k and 1M. For each engine, with exact search (FLAT) and one
approximate index, IVF with the same lists and probes everywhere (nlist =
4 sqrt(N), nprobe = 32: FAISS ``IVF{nlist},Flat`` in-process, Milvus
IVF_FLAT):

- insert rate (building the in-RAM memory and index; ``MilvusMemory.from_memory``),
  and for Milvus the index build that follows (flush, then wait until the
  index covers every row: searches are timed only after it),
- batched predict rate (1,000 queries at 100k, 256 at 1M) and single-query
  rate, accuracy on held-out queries of the same clusters, and recall@32 of
  the neighbors against exact search (``faiss.knn``),
- latency of ``forget`` of 1 and of 1,000 items, each followed by the search
  that must not see them (Milvus: Strong consistency, as unlearning needs),
- RSS of the client process (each engine runs in a fresh child process, so
  the figures do not mix); for the server, also the server's RSS per item.

The real server is PyPI's ``milvus`` 2.3.5 standalone, started here in a
network namespace of its own and reached through a forwarder on 127.0.0.1
(``tests/_local_milvus.py``), sharing this machine's cores with the client. Milvus Lite runs
inside the client process, so its RSS includes the engine.

Run: ``python benchmarks/bench_scale.py [--sizes 100000 1000000]``
(``pip install ".[milvus]" milvus==2.3.5``). Baselines are plain FAISS
(``faiss.knn`` and ``IndexIVFFlat``) timed in the same child processes.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

D, K, N_CLASSES = 512, 32, 1000


def clustered(n, seed):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(12345).standard_normal((N_CLASSES, D), dtype=np.float32)
    y = rng.integers(0, N_CLASSES, n)
    X = centres[y] + 3.0 * rng.standard_normal((n, D), dtype=np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X, y


def rss_mib():
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def child(engine, index, n, uri, token):
    """Measure one engine and index at size `n`; print one JSON line."""
    from skmml import KNNVoteClassifier, Memory

    if engine != "faiss":
        import pymilvus  # noqa: F401  (its import is not the memory's footprint)
    base_rss = rss_mib()  # before the data: the in-process engine's memory counts
    X, y = clustered(n, seed=0)
    n_batch = 1000 if n <= 100_000 else 256
    Q, y_q = clustered(n_batch, seed=1)
    import faiss

    exact = faiss.knn(Q, X, K, metric=faiss.METRIC_INNER_PRODUCT)[1]  # ids are rows here
    result = {"engine": engine, "index": index, "n": n}
    nlist = int(4 * np.sqrt(n))
    if engine == "faiss":
        spec = "flat" if index == "flat" else f"IVF{nlist},Flat"
        params = None if index == "flat" else {"nprobe": 32}

        def build(X=X, y=y):
            return KNNVoteClassifier(n_neighbors=K, index=spec, index_params=params,
                                     index_device="cpu").set_memory(Memory(X, y))
        result["insert_s"], clf = timed(build)
    else:
        from skmml import MilvusMemory

        collection = f"bench_{index.lower()}_{n}"
        params = {"nlist": nlist} if index == "IVF_FLAT" else {}
        memory = Memory(X, y)
        result["insert_s"], mm = timed(lambda: MilvusMemory.from_memory(
            memory, uri=uri, collection=collection, token=token, index_type=index,
            index_params=params, search_params={"nprobe": 32} if params else None,
            batch_size=8192, index_wait=None))
        # Searches run once the index covers every row (from_memory's default).
        result["index_s"], _ = timed(lambda: mm.wait_for_index(timeout=7200))
        del memory
        clf = KNNVoteClassifier(n_neighbors=K).set_memory(mm)
    del X
    import gc

    gc.collect()
    result["client_rss_mib"] = rss_mib() - base_rss - Q.nbytes / 2**20
    clf.predict(Q[:8])  # warm up
    t, predicted = timed(lambda: clf.predict(Q))
    result["batched_qps"] = n_batch / t
    result["accuracy"] = float(np.mean(predicted == y_q))
    found = clf.kneighbors(Q)[1]
    result["recall"] = float(np.mean([np.intersect1d(a, b).size / K
                                      for a, b in zip(found, exact)]))
    # Milvus Lite pays about a second per search call at these sizes: fewer calls.
    singles = 3 if engine == "lite" else 20
    t, _ = timed(lambda: [clf.predict(Q[i:i + 1]) for i in range(singles)])
    result["single_qps"] = singles / t
    if engine == "server":
        # What Strong consistency costs a single query: the same with Bounded.
        bounded = KNNVoteClassifier(n_neighbors=K).set_memory(MilvusMemory(
            uri, mm.collection, token=token, consistency="Bounded",
            search_params=mm.search_params))
        t, _ = timed(lambda: [bounded.predict(Q[i:i + 1]) for i in range(singles)])
        result["single_qps_bounded"] = singles / t
    rng = np.random.default_rng(2)
    forgotten = np.empty(0, dtype=np.int64)
    for count in (1, 1000):
        # Forget the items nearest to a query, then search: none may come back.
        probe = Q[count % n_batch:count % n_batch + 1]
        victims = clf.kneighbors(probe, n_neighbors=min(count, K))[1][0]
        if count > K:
            others = np.setdiff1d(np.arange(n), np.concatenate([victims, forgotten]))
            victims = np.concatenate([victims, rng.choice(others, count - victims.size,
                                                          replace=False)])

        def forget_then_search(victims=victims, probe=probe):
            clf.forget(victims)
            return clf.kneighbors(probe)[1]

        t, found = timed(forget_then_search)
        assert not np.isin(found, victims).any(), "a forgotten item came back"
        forgotten = np.concatenate([forgotten, victims])
        result[f"forget_{count}_s"] = t
    if engine == "faiss":
        result.update(faiss_baseline(index, n, Q))
    else:
        mm.close()
    print(json.dumps(result), flush=True)


def faiss_baseline(index, n, Q):
    """Raw FAISS on the same data: the in-process engine's bound."""
    import faiss

    X, _ = clustered(n, seed=0)
    if index == "flat":
        t, _ = timed(lambda: faiss.knn(Q, X, K, metric=faiss.METRIC_INNER_PRODUCT))
    else:
        ivf = faiss.index_factory(D, f"IVF{int(4 * np.sqrt(n))},Flat",
                                  faiss.METRIC_INNER_PRODUCT)
        ivf.train(X)
        ivf.add(X)
        ivf.nprobe = 32
        t, _ = timed(lambda: ivf.search(Q, K))
    return {"raw_faiss_qps": len(Q) / t}


def run_child(args):
    out = subprocess.run([sys.executable, __file__, "--child", *map(str, args)],
                         capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        print(f"  {args[:3]} failed: {out.stderr[-1500:]}", flush=True)
        return None
    return json.loads(lines[-1])


def report(rows, server_rss):
    print(f"\n{'engine':>8} {'index':>9} {'N':>9} {'insert/s':>10} {'index s':>8} "
          f"{'batch q/s':>10} "
          f"{'1-query q/s':>11} {'accuracy':>8} {'recall':>6} {'forget 1':>9} {'forget 1k':>9} "
          f"{'client RSS':>11}")
    for r in rows:
        print(f"{r['engine']:>8} {r['index']:>9} {r['n']:>9,} {r['n'] / r['insert_s']:>10,.0f} "
              f"{r.get('index_s', 0):>8.1f} {r['batched_qps']:>10,.1f} "
              f"{r['single_qps']:>11,.1f} {r['accuracy']:>8.3f} "
              f"{r['recall']:>6.3f} "
              f"{r['forget_1_s'] * 1e3:>7.0f}ms {r['forget_1000_s'] * 1e3:>7.0f}ms "
              f"{r['client_rss_mib']:>8,.0f}MiB")
    print("\nRatios to in-process FAISS (same N, exact and approximate):")
    by = {(r["engine"], r["index"], r["n"]): r for r in rows}
    for r in rows:
        if r["engine"] == "faiss":
            if "raw_faiss_qps" in r:
                print(f"  faiss {r['index']} N={r['n']:,}: skmml batched predict = "
                      f"{r['batched_qps'] / r['raw_faiss_qps']:.2f}x raw FAISS search")
            continue
        ref = by.get(("faiss", "flat" if r["index"] == "FLAT" else "ivf", r["n"]))
        if ref:
            print(f"  {r['engine']} {r['index']} N={r['n']:,}: insert "
                  f"{ref['insert_s'] / r['insert_s']:.3f}x, batched "
                  f"{r['batched_qps'] / ref['batched_qps']:.3f}x, single "
                  f"{r['single_qps'] / ref['single_qps']:.3f}x, forget-1 latency "
                  f"{r['forget_1_s'] / ref['forget_1_s']:.2f}x, client RSS "
                  f"{r['client_rss_mib'] / max(ref['client_rss_mib'], 1):.3f}x")
    for r in rows:
        if "single_qps_bounded" in r:
            print(f"  server {r['index']} N={r['n']:,}: one query {r['single_qps']:.1f} q/s with "
                  f"Strong consistency, {r['single_qps_bounded']:.1f} q/s with Bounded")
    for n, mib in server_rss.items():
        print(f"  real server RSS at N={n:,} (FLAT and IVF_FLAT collections loaded in turn): "
              f"{mib:,.0f} MiB = {mib * 2**20 / n:,.0f} bytes per item "
              f"(raw vector: {4 * D} bytes)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--child", nargs=5)
    parser.add_argument("--only", nargs="+", metavar="ENGINE:INDEX",
                        help="run only these cells, e.g. faiss:flat server:IVF_FLAT")
    args = parser.parse_args()
    if args.child:
        engine, index, n, uri, token = args.child
        child(engine, index, int(n), uri, token or None)
        return
    import psutil

    # The loopback-only server of the test suite (test infrastructure, not the package).
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from _local_milvus import LocalMilvusServer

    rows, server_rss = [], {}
    with tempfile.TemporaryDirectory() as folder:
        server = LocalMilvusServer(os.path.join(folder, "server")).start()
        server_uri = server.uri
        print(f"Milvus server at {server_uri}, "
              + ("in its own network namespace" if server.isolated else
                 f"in the host's network namespace ({server.why_not_isolated})"), flush=True)
        try:
            for n in args.sizes:
                runs = [("faiss", "flat", ""), ("faiss", "ivf", ""),
                        ("lite", "FLAT", os.path.join(folder, f"lite_flat_{n}.db")),
                        ("lite", "IVF_FLAT", os.path.join(folder, f"lite_ivf_{n}.db")),
                        ("server", "FLAT", server_uri), ("server", "IVF_FLAT", server_uri)]
                for engine, index, uri in runs:
                    if args.only and f"{engine}:{index}" not in args.only:
                        continue
                    print(f"running {engine} {index} N={n:,} ...", flush=True)
                    row = run_child([engine, index, n, uri or "-", ""])
                    if row:
                        rows.append(row)
                        print("  " + json.dumps(row), flush=True)
                    if engine == "server":
                        mib = psutil.Process(server.pid).memory_info().rss / 2**20
                        server_rss[n] = max(server_rss.get(n, 0), mib)
                        _drop(server_uri)
        finally:
            server.stop()
    report(rows, server_rss)


def _drop(uri):
    from pymilvus import MilvusClient

    client = MilvusClient(uri)
    for name in client.list_collections():
        client.drop_collection(name)
    client.close()


if __name__ == "__main__":
    main()
