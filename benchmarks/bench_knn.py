"""Speed, memory and accuracy of KNNVoteClassifier on a CPU, in one run.

Run from the repository root::

    python benchmarks/bench_knn.py                  # N = 100,000 and 1,000,000
    python benchmarks/bench_knn.py --sizes 100000   # one memory size
    python benchmarks/bench_knn.py --quick          # smoke test, well under a minute

What is measured, for memories of N items of d = 512 dimensions in 1000
classes, k = 32 neighbours, rank voting:

1. Machine figures: sgemm GFLOP/s (best float32 4096x512 @ 512x4096
   product) and memory read bandwidth (best pass over a 1 GiB float32 array,
   with a multi-threaded matrix-vector product and with a single-threaded
   ``sum(axis=0)``). The higher bandwidth gives the streaming bound of exact
   single-query search: bandwidth / (N * d * 4 bytes) queries/s.
2. Queries/s of ``KNNVoteClassifier.predict`` (exact "flat" index), of
   scikit-learn's ``KNeighborsClassifier(algorithm="brute",
   metric="cosine").predict`` and of a raw ``faiss.IndexFlatIP.search`` alone,
   for a batch of 4096 queries (best of ``--repeats`` after a warm-up call)
   and for single queries in a loop. Above 200,000 items scikit-learn gets
   a batch of 512 queries and 3 single queries; the tables say so.
3. Peak memory of each method (fit + predict): the rise of the process's
   peak RSS over its RSS once the data is loaded, as a multiple of the raw
   embedding bytes N * d * 4.
4. Approximate indexes: classifier accuracy against batched queries/s for
   exact search, "IVF{nlist},Flat" over an nprobe sweep, "IVF{nlist},SQ8" and
   (up to 100,000 items, where its build is quick) "HNSW32" over an efSearch
   sweep, with fit (train + add) times; then the fastest setting within one
   accuracy point of exact search.

Every method runs in its own spawned process so that peaks do not mix; the
machine figures and the data generation run in their own processes too,
since a spawned child inherits its parent's peak RSS in ``ru_maxrss``.
The data is synthetic, generated deterministically from a seed and cached
under ``--cache-dir`` (outside the repository; 2 GB for N = 1,000,000).
The machine is shared and noisy: the figures that matter are the ratios,
all measured in the same run. A "Summary" block ends the output with each
target, the measured figure and PASS/FAIL.
"""

import argparse
import multiprocessing
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import sklearn
from sklearn.neighbors import KNeighborsClassifier

import skmml
from skmml import KNNVoteClassifier

D = 512
N_CLASSES = 1000
K = 32
N_QUERIES = 4096
SEED = 0
# Per-item noise: item = normalise(centre + s * g / sqrt(d)), g ~ N(0, I), with
# s uniform in this range per item (some items are prototypical, some are
# not). Tuned so that exact kNN (k=32, rank voting) is neither near 100% nor
# near chance: 51% at 20k items, 65% at 100k, 73% at 300k (more memory, more
# accuracy, as with real embeddings).
NOISE_RANGE = (2.0, 5.0)
GENERATION_CHUNK = 16384
# scikit-learn's brute cosine search normalises a copy of the whole memory
# for every chunk of queries; above this size it gets fewer queries.
SKLEARN_FULL_MAX_N = 200_000
SKLEARN_LARGE_BATCH = 512
SKLEARN_LARGE_SINGLE = 3
# HNSW32 builds in about a minute at 100k items on 2 cores, far too long at 1M.
HNSW_MAX_N = 100_000
WARMUP_QUERIES = 64

TARGETS = {
    "search_overhead": 1.2,  # batched predict time / raw FAISS search time, at most
    "single_vs_stream": 0.5,  # single-query rate / streaming bound, at least
    "peak_vs_raw": 1.5,  # peak RSS increase / raw embedding bytes, at most
    "ann_speedup": 5.0,  # speedup over exact within one accuracy point, at least
}


# -- data ---------------------------------------------------------------------------


def _normalize_rows(x):
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _data_dir(cache_dir):
    lo, hi = NOISE_RANGE
    return Path(cache_dir).expanduser() / f"d{D}-c{N_CLASSES}-noise{lo}-{hi}-seed{SEED}"


def _data_paths(cache_dir, name):
    base = _data_dir(cache_dir) / name
    return base.with_suffix(".X.npy"), base.with_suffix(".y.npy")


def _write_items(cache_dir, name, n, rng):
    """Write `n` labelled unit-norm items in chunks (small temporaries)."""
    centres = _normalize_rows(
        np.random.default_rng([SEED, 0]).standard_normal((N_CLASSES, D), dtype=np.float32)
    )
    labels = rng.integers(0, N_CLASSES, n)
    scale = (rng.uniform(*NOISE_RANGE, n) / np.sqrt(D)).astype(np.float32)
    x_path, y_path = _data_paths(cache_dir, name)
    x_path.parent.mkdir(parents=True, exist_ok=True)
    partial = x_path.with_suffix(".partial.npy")
    out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(n, D))
    for start in range(0, n, GENERATION_CHUNK):
        rows = slice(start, min(start + GENERATION_CHUNK, n))
        chunk = rng.standard_normal((rows.stop - rows.start, D), dtype=np.float32)
        chunk *= scale[rows, None]
        chunk += centres[labels[rows]]
        out[rows] = _normalize_rows(chunk)
    out.flush()
    del out
    np.save(y_path, labels)
    partial.replace(x_path)  # the embeddings file appears last: the cache is complete


def prepare_data(cache_dir, n):
    """Generate the memory of `n` items and the queries unless cached; return seconds."""
    start = time.perf_counter()
    jobs = [(f"memory{n}", n, [SEED, 1, n]), ("queries", N_QUERIES, [SEED, 2])]
    for name, size, seed in jobs:
        if not _data_paths(cache_dir, name)[0].exists():
            _write_items(cache_dir, name, size, np.random.default_rng(seed))
    return time.perf_counter() - start


def load_data(cache_dir, n, n_queries):
    """Memory embeddings and labels, queries and their labels, read from the cache."""
    X, y = (np.load(p) for p in _data_paths(cache_dir, f"memory{n}"))
    Q, qy = (np.load(p)[:n_queries] for p in _data_paths(cache_dir, "queries"))
    return X, y, Q, qy


# -- measuring -------------------------------------------------------------------------


def _status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def rss_bytes():
    return _status_bytes("VmRSS")


def peak_rss_bytes():
    # VmHWM is the peak RSS of this process image. resource.getrusage's
    # ru_maxrss is not used: a spawned child inherits in it the peak of the
    # parent that forked it, whatever the child itself did.
    return _status_bytes("VmHWM")


def best_time(fn, repeats):
    """Best wall time of `repeats` calls of `fn` and the result of the last."""
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def run_isolated(fn, *args):
    """Run ``fn(*args)`` in a fresh spawned process and return its result."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


def measure_machine():
    """sgemm GFLOP/s and read bandwidth in GB/s, best of a few repeats."""
    rng = np.random.default_rng(SEED)
    a = rng.standard_normal((4096, 512), dtype=np.float32)
    b = rng.standard_normal((512, 4096), dtype=np.float32)
    a @ b
    gemm_s, _ = best_time(lambda: a @ b, 5)
    big = np.ones((2**30 // (4 * D), D), dtype=np.float32)  # 1 GiB
    v = np.ones(D, dtype=np.float32)
    gemv_s, _ = best_time(lambda: big @ v, 5)
    sum_s, _ = best_time(lambda: big.sum(axis=0), 3)
    return {
        "sgemm_gflops": 2 * 4096 * 512 * 4096 / gemm_s / 1e9,
        "gemv_gbs": big.nbytes / gemv_s / 1e9,
        "sum_gbs": big.nbytes / sum_s / 1e9,
    }


def _warm_up_libraries():
    """Start the BLAS and OpenMP thread pools before the RSS baseline is taken."""
    x = np.ones((64, D), dtype=np.float32)
    x @ x.T
    faiss.knn(x, x, 1, metric=faiss.METRIC_INNER_PRODUCT)


# -- exact search: ours, scikit-learn, raw FAISS -----------------------------------------

METHODS = {
    "skmml": "skmml KNNVoteClassifier",
    "faiss": "raw faiss IndexFlatIP.search",
    "sklearn": "sklearn KNeighborsClassifier",
}


def _fit(method, X, y):
    """Fit `method`; return its predict (or search) function."""
    if method == "skmml":
        clf = KNNVoteClassifier(n_neighbors=K, voting="rank", index="flat", device="cpu")
        return clf.fit(X, y).predict
    if method == "sklearn":
        clf = KNeighborsClassifier(n_neighbors=K, algorithm="brute", metric="cosine")
        return clf.fit(X, y).predict
    index = faiss.IndexFlatIP(D)
    index.add(X)
    return lambda q: index.search(q, K)


def bench_method(method, cache_dir, n, n_queries, n_single, repeats):
    """Fit, batched and single-query timings, accuracy and peak memory of one method."""
    if method == "sklearn" and n > SKLEARN_FULL_MAX_N:
        n_queries, n_single = SKLEARN_LARGE_BATCH, SKLEARN_LARGE_SINGLE
    X, y, Q, qy = load_data(cache_dir, n, n_queries)
    _warm_up_libraries()
    baseline = rss_bytes()

    start = time.perf_counter()
    predict = _fit(method, X, y)
    fit_s = time.perf_counter() - start

    predict(Q[:WARMUP_QUERIES])
    batch_s, out = best_time(lambda: predict(Q), repeats)
    predict(Q[:1])
    start = time.perf_counter()
    for i in range(n_single):
        predict(Q[i:i + 1])
    single_s = time.perf_counter() - start

    peak = peak_rss_bytes()
    return {
        "method": METHODS[method],
        "fit s": fit_s,
        "batch": n_queries,
        "batch q/s": n_queries / batch_s,
        "single": n_single,
        "single q/s": n_single / single_s,
        "accuracy %": np.nan if method == "faiss" else 100 * np.mean(out == qy),
        "baseline RSS GB": baseline / 1e9,
        "peak rise GB": (peak - baseline) / 1e9,
        "peak rise / raw": (peak - baseline) / X.nbytes,
    }


# -- approximate indexes ---------------------------------------------------------------


def _sweeps(n):
    """(index, search parameter, values) to sweep for a memory of `n` items."""
    nlist = min(1024, 2 ** int(np.log2(n // 39)))  # FAISS wants >= 39 points per list
    sweeps = [
        (f"IVF{nlist},Flat", "nprobe", (1, 4, 8, 16, 32, 64)),
        (f"IVF{nlist},SQ8", "nprobe", (4, 16, 64)),
    ]
    if n <= HNSW_MAX_N:
        sweeps.append(("HNSW32", "efSearch", (16, 64, 256)))
    return sweeps


def _set_search_params(clf, params):
    # index_params take effect in fit(), and rebuilding an IVF index at 1M
    # items takes minutes. Search parameters need no rebuild, so they are set
    # on the fitted index through skmml's private NeighborIndex (what fit()
    # itself calls); set_params keeps the estimator's repr truthful.
    clf.set_params(index_params=params)
    clf._index.params = params
    clf._index._set_search_params()


def bench_ann(cache_dir, n, n_queries, repeats):
    """Accuracy, batched queries/s and fit time of exact and approximate indexes."""
    X, y, Q, qy = load_data(cache_dir, n, n_queries)

    def measure(clf):
        clf.predict(Q[:WARMUP_QUERIES])
        seconds, pred = best_time(lambda: clf.predict(Q), repeats)
        return n_queries / seconds, 100 * np.mean(pred == qy)

    rows = []
    for index, param, values in [("flat", None, (None,)), *_sweeps(n)]:
        clf = KNNVoteClassifier(n_neighbors=K, voting="rank", index=index, device="cpu")
        start = time.perf_counter()
        clf.fit(X, y)
        fit_s = time.perf_counter() - start
        for value in values:
            if param is not None:
                _set_search_params(clf, {param: value})
            qps, accuracy = measure(clf)
            rows.append({
                "index": "Flat (exact)" if index == "flat" else index,
                "search params": "-" if param is None else f"{param}={value}",
                "fit s": fit_s,
                "batch q/s": qps,
                "accuracy %": accuracy,
            })
        del clf
    table = pd.DataFrame(rows)
    exact = table.iloc[0]
    table["speedup"] = table["batch q/s"] / exact["batch q/s"]
    table["accuracy loss"] = exact["accuracy %"] - table["accuracy %"]
    return table


def best_within_one_point(table):
    """The approximate setting with the highest throughput losing at most 1 point."""
    candidates = table.iloc[1:]
    candidates = candidates[candidates["accuracy loss"] <= 1.0]
    return None if candidates.empty else candidates.loc[candidates["batch q/s"].idxmax()]


# -- reporting -------------------------------------------------------------------------


def _pass(ok):
    return "PASS" if ok else "FAIL"


def _print_table(table, **formats):
    formatters = {col: f.format for col, f in formats.items() if col in table}
    print(table.to_string(index=False, na_rep="-", formatters=formatters))


def bench_size(args, n, machine, n_queries, n_single, repeats, summary):
    print(f"\n=== N = {n:,} memory items, d = {D}, {N_CLASSES} classes, k = {K} ===")
    seconds = run_isolated(prepare_data, args.cache_dir, n)
    print(f"data ready in {seconds:.1f} s (cache: {_data_dir(args.cache_dir)})")
    raw_bytes = n * D * 4
    bandwidth = max(machine["gemv_gbs"], machine["sum_gbs"]) * 1e9
    stream_bound = bandwidth / raw_bytes
    print(f"raw embeddings {raw_bytes / 1e9:.2f} GB; streaming-bound single-query "
          f"rate {stream_bound:,.1f} q/s; sgemm-bound batched rate "
          f"{machine['sgemm_gflops'] * 1e9 / (2 * n * D):,.0f} q/s")

    methods = [m for m in METHODS if not (m == "sklearn" and args.skip_sklearn)]
    rows = {}
    for method in methods:
        print(f"  measuring {METHODS[method]} ...", flush=True)
        rows[method] = run_isolated(
            bench_method, method, args.cache_dir, n, n_queries, n_single, repeats
        )
    table = pd.DataFrame(rows.values())
    print(f"\nExact search (batched: best of {repeats} after a warm-up; single queries "
          "one by one in a loop; peak rise over the RSS with the data loaded, "
          "fit + predict):")
    _print_table(
        table, **{"fit s": "{:.2f}", "batch q/s": "{:,.1f}", "single q/s": "{:,.1f}",
                  "accuracy %": "{:.1f}", "baseline RSS GB": "{:.2f}",
                  "peak rise GB": "{:.3f}", "peak rise / raw": "{:.3f}"}
    )
    if "sklearn" in rows and rows["sklearn"]["batch"] != n_queries:
        print(f"(scikit-learn above {SKLEARN_FULL_MAX_N:,} items: a batch of "
              f"{SKLEARN_LARGE_BATCH} queries and {SKLEARN_LARGE_SINGLE} single queries.)")

    ours, raw = rows["skmml"], rows["faiss"]
    overhead = raw["batch q/s"] / ours["batch q/s"]
    single_ratio = ours["single q/s"] / stream_bound
    print(f"\nbatched predict time / raw FAISS search time: {overhead:.3f}")
    print(f"single-query rate / streaming bound: {single_ratio:.3f} "
          f"(raw FAISS: {raw['single q/s'] / stream_bound:.3f})")
    if "sklearn" in rows:
        sk = rows["sklearn"]
        print(f"speedup over scikit-learn: {ours['batch q/s'] / sk['batch q/s']:.1f}x "
              f"batched, {ours['single q/s'] / sk['single q/s']:.1f}x single")

    print("\n  measuring approximate indexes ...", flush=True)
    ann = run_isolated(bench_ann, args.cache_dir, n, n_queries, repeats)
    print(f"\nApproximate indexes ({n_queries} queries batched; fit = train + add):")
    _print_table(
        ann, **{"fit s": "{:.1f}", "batch q/s": "{:,.1f}", "accuracy %": "{:.2f}",
                "speedup": "{:.2f}x", "accuracy loss": "{:+.2f}"}
    )
    best = best_within_one_point(ann)
    if best is None:
        print("No approximate setting is within 1 accuracy point of exact search.")
        ann_text, ann_ok = "none within 1 point", False
    else:
        ann_text = (f"{best['speedup']:.1f}x ({best['index']} {best['search params']}, "
                    f"{best['accuracy loss']:+.2f} points)")
        ann_ok = best["speedup"] >= TARGETS["ann_speedup"]
        print(f"Fastest within 1 accuracy point of exact: {ann_text}")

    summary.extend([
        (n, "batched predict / raw FAISS search time",
         f"{overhead:.3f}", f"<= {TARGETS['search_overhead']}",
         _pass(overhead <= TARGETS["search_overhead"])),
        (n, "single-query rate / streaming bound",
         f"{single_ratio:.3f}", f">= {TARGETS['single_vs_stream']}",
         _pass(single_ratio >= TARGETS["single_vs_stream"])),
        (n, "peak RSS rise / raw embedding bytes",
         f"{ours['peak rise / raw']:.3f}", f"<= {TARGETS['peak_vs_raw']}",
         _pass(ours["peak rise / raw"] <= TARGETS["peak_vs_raw"])),
        (n, "approximate speedup within 1 accuracy point",
         ann_text, f">= {TARGETS['ann_speedup']}x", _pass(ann_ok)),
    ])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000],
                        help="memory sizes N (default: 100000 1000000)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: N = 20000, 1024 queries, 5 single queries")
    parser.add_argument("--skip-sklearn", action="store_true",
                        help="leave scikit-learn out")
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed runs of each batched prediction, best kept (default: 2)")
    parser.add_argument("--cache-dir", default="~/.cache/skmml/bench",
                        help="where generated data is cached (default: ~/.cache/skmml/bench)")
    args = parser.parse_args()
    if args.quick:
        sizes, n_queries, n_single, repeats = [20_000], 1024, 5, 1
    else:
        sizes, n_queries, n_single, repeats = args.sizes, N_QUERIES, 20, args.repeats

    start = time.perf_counter()
    print(f"skmml {skmml.__version__}, faiss {faiss.__version__}, numpy {np.__version__}, "
          f"scikit-learn {sklearn.__version__}; {platform.processor() or platform.machine()}, "
          f"{multiprocessing.cpu_count()} CPUs, FAISS threads {faiss.omp_get_max_threads()}")
    machine = run_isolated(measure_machine)
    print(f"sgemm (float32 4096x512 @ 512x4096, best of 5): {machine['sgemm_gflops']:.1f} GFLOP/s")
    print(f"read bandwidth over a 1 GiB float32 array: {machine['gemv_gbs']:.1f} GB/s "
          f"(matrix-vector product, all threads, best of 5), {machine['sum_gbs']:.1f} GB/s "
          "(sum(axis=0), one thread, best of 3); the higher is the streaming bound")

    summary = []
    for n in sizes:
        bench_size(args, n, machine, n_queries, n_single, repeats, summary)

    print("\n=== Summary ===")
    _print_table(pd.DataFrame(summary, columns=["N", "target", "measured", "goal", "result"]),
                 N="{:,}")
    print(f"\ntotal time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
