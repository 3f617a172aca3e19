"""Speed, memory and accuracy of KNNVoteClassifier on a CPU, in one run.

Run from the repository root::

    python benchmarks/bench_knn.py                  # N = 100,000 and 1,000,000
    python benchmarks/bench_knn.py --sizes 100000   # one memory size
    python benchmarks/bench_knn.py --quick          # smoke test, about a minute

What is measured, for memories of N items of d = 512 dimensions in 1000
classes, k = 32 neighbors, rank voting:

1. Machine figures: the CPU and its reduced-precision instruction sets;
   sgemm GFLOP/s (best float32 4096x512 @ 512x4096 product); torch GEMM
   GFLOP/s in float32, bfloat16 and float16; memory read bandwidth (best
   pass over a 1 GiB float32 array, with a multi-threaded matrix-vector
   product and with a single-threaded ``sum(axis=0)``; and half-precision
   matrix-vector products over 512 MiB). The higher float32 bandwidth gives
   the streaming bound of exact single-query search: bandwidth / (N * d * 4
   bytes) queries/s.
2. Queries/s of ``KNNVoteClassifier.predict`` with the exact "flat" index:
   the default (certified screen where measured faster, see
   ``skmml.retrieval._screening``), float32 only (``screen="off"``), and certified bf16
   and fp16 forced; of scikit-learn's ``KNeighborsClassifier(algorithm=
   "brute", metric="cosine").predict``; of a raw ``faiss.IndexFlatIP.search``
   and a raw ScaNN brute-force search alone; for a batch of 4096 queries
   (best of ``--repeats`` rounds after a warm-up call) and for single
   queries in a loop. Ours and raw FAISS are timed in one process,
   interleaved, so that load from other work on the machine hits both alike.
   Above 200,000 items scikit-learn gets a batch of 512 queries and 3 single
   queries, and a certified format the CPU only emulates (its GEMM slower
   than float32) a batch of 256; the table says so. For each skmml variant,
   the number of neighbor rows and predictions (batched, and 20 single
   queries) that differ from float32 search, which must be 0; and each
   method's fraction of its bound.
3. Peak memory of each method (fit, a batched and a single prediction), each
   in its own process: the rise of the peak RSS over the RSS once the data is
   loaded, as a multiple of the raw embedding bytes N * d * 4 (the default
   includes the half-precision copy a screen keeps, 0.5x).
4. Certified search by stage (``bench_stages``), per format (bf16, and
   fp32: the same pipeline with a float32 product, so the overhead can be
   measured on any CPU): seconds of the product alone, the selection, the
   re-rank and the float32 fallback, their sum, and the overhead ratio
   (everything but the product) / (the product), beside raw FAISS in the
   same process; then single queries (median of 50, in interleaved runs of
   10) of raw
   FAISS with one thread and with all threads, and of the exact index with
   ``screen`` off, fp16, bf16 and auto. ``--stages-only`` measures this alone.
5. Approximate indexes: classifier accuracy against batched queries/s for
   exact search, "IVF{nlist},Flat" over an nprobe sweep, "IVF{nlist},SQ8",
   "IVF{nlist},PQ{d/4}x4fs" (fast-scan PQ, d/8 bytes a vector), ScaNN over
   a ``num_leaves_to_search`` sweep and (up to 100,000 items, where its
   build is quick) "HNSW32" over an efSearch sweep, with fit (train + add)
   times and recall of the exact k nearest neighbors; then the fastest
   setting of each index type within one accuracy point of exact search.
   The same on real embeddings:
   Fashion-MNIST EfficientNet-Lite0 features (``mml_data.py``; 16,000 in
   memory, 4,000 queries).

Each measurement runs in a fresh spawned process, so that peaks do not mix
and the parent stays small. The data is synthetic (see the constants below),
generated deterministically from a seed and cached under ``--cache-dir``,
outside the repository (2 GB for N = 1,000,000). The machine is shared and
noisy: the figures that matter are the ratios, all measured in the same run.
A "Summary" block ends the output with each target, the measured figure and
PASS/FAIL.
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
from skmml import KNNVoteClassifier, Memory, NeighborIndex

D = 512
N_CLASSES = 1000
K = 32
N_QUERIES = 4096
SEED = 0
# The data: 100 superclasses of 10 classes, like fine-grained classes in a
# coarse category. Each superclass has a random unit centre and a random
# 32-dimensional subspace; its classes have means in that subspace, and an
# item is normalise(superclass centre + basis @ (class mean + latent noise) +
# isotropic noise). Neighbors are thus local in a low-dimensional space, as
# with real embeddings, and classes of a superclass overlap. Tuned so that
# exact kNN (k=32, rank voting) is neither near 100% nor near chance: 64%
# at 20k items, 72% at 100k, 73% at 300k (1000 queries).
N_SUPERCLASSES = 100
LATENT_DIM = 32
CLASS_SPREAD = 0.07  # std of the class means along each latent axis
ITEM_SPREAD = 0.15  # std of the items around their class mean, per latent axis
AMBIENT_NOISE = 0.5  # norm of the isotropic noise over all d dimensions

# scikit-learn's brute cosine search normalises a copy of the whole memory
# for every chunk of queries; above this size it gets fewer queries.
SKLEARN_FULL_MAX_N = 200_000
SKLEARN_LARGE_BATCH = 512
SKLEARN_LARGE_SINGLE = 3
# HNSW32 takes about 10 s to build at 100k items on 2 cores, minutes at 1M.
HNSW_MAX_N = 100_000
WARMUP_QUERIES = 64

METHODS = {
    "skmml": "skmml KNNVoteClassifier (default)",
    "skmml_fp32": "skmml, screen='off' (float32)",
    "skmml_bf16": "skmml, certified bf16",
    "skmml_fp16": "skmml, certified fp16",
    "faiss": "raw faiss IndexFlatIP.search",
    "scann_bf": "raw ScaNN brute force",
    "sklearn": "sklearn KNeighborsClassifier",
}
#: index_params of each skmml variant.
SCREENS = {"skmml": None, "skmml_fp32": {"screen": "off"}, "skmml_bf16": {"screen": "bf16"},
           "skmml_fp16": {"screen": "fp16"}}
#: A certified format whose GEMM is slower than float32 here gets this batch.
EMULATED_BATCH = 256
TARGETS = {  # what is checked, how, and the goal
    "batched": ("batched predict (default) / raw FAISS search rate", ">=", 2.0),
    "single_gain": ("single-query rate (default) / float32 skmml", ">=", 1.5),
    "identical": ("neighbor rows + predictions differing from float32", "<=", 0),
    "overhead": ("float32 batched predict / raw FAISS search time", "<=", 1.2),
    "single": ("single-query rate (default) / streaming bound", ">=", 0.5),
    "memory": ("peak RSS rise / raw embedding bytes", "<=", 1.5),
    "ann": ("approximate speedup within 1 accuracy point", ">=", 5.0),
}


# -- data ---------------------------------------------------------------------------


def _normalize_rows(x):
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _data_dir(cache_dir):
    name = (
        f"d{D}-c{N_CLASSES}-g{N_SUPERCLASSES}-r{LATENT_DIM}-{CLASS_SPREAD}-"
        f"{ITEM_SPREAD}-{AMBIENT_NOISE}-seed{SEED}"
    )
    return Path(cache_dir).expanduser() / name


def _data_paths(cache_dir, name):
    base = _data_dir(cache_dir) / name
    return base.with_suffix(".X.npy"), base.with_suffix(".y.npy")


def _data_model():
    """Superclass centres and latent bases, and the class means, fixed by SEED."""
    rng = np.random.default_rng([SEED, 0])
    centres = _normalize_rows(rng.standard_normal((N_SUPERCLASSES, D)))
    bases = np.linalg.qr(rng.standard_normal((N_SUPERCLASSES, D, LATENT_DIM)))[0]
    means = CLASS_SPREAD * rng.standard_normal((N_CLASSES, LATENT_DIM))
    return (
        centres.astype(np.float32),
        bases.astype(np.float32),
        means.astype(np.float32),
    )


def _write_items(cache_dir, name, n, rng):
    """Write `n` labelled unit-norm items, one superclass at a time."""
    centres, bases, means = _data_model()
    labels = rng.integers(0, N_CLASSES, n)
    superclass = labels // (N_CLASSES // N_SUPERCLASSES)
    x_path, y_path = _data_paths(cache_dir, name)
    x_path.parent.mkdir(parents=True, exist_ok=True)
    partial = x_path.with_suffix(".partial.npy")
    out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(n, D))
    for g in range(N_SUPERCLASSES):
        rows = np.flatnonzero(superclass == g)
        latent = means[labels[rows]]
        latent += ITEM_SPREAD * rng.standard_normal(latent.shape, dtype=np.float32)
        items = rng.standard_normal((rows.size, D), dtype=np.float32)
        items *= AMBIENT_NOISE / np.sqrt(D)
        items += centres[g]
        items += latent @ bases[g].T
        out[rows] = _normalize_rows(items)
    out.flush()
    del out
    np.save(y_path, labels)
    partial.replace(x_path)  # the embeddings file appears last: the cache is complete


def prepare_data(cache_dir, n):
    """Generate the memory of `n` items and the queries unless cached; seconds taken."""
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
    # ru_maxrss is not used: in a spawned child it also holds the peak of the
    # parent that forked it, whatever the child itself did.
    return _status_bytes("VmHWM")


def run_isolated(fn, *args):
    """Run ``fn(*args)`` in a fresh spawned process and return its result."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


def _timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def cpu_flags():
    """The CPU's model and its reduced-precision instruction sets (Linux)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine()):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16",
              "amx_tile")
    return model, [f for f in wanted if f in flags]


def measure_machine():
    """GEMM rates (numpy float32; torch float32, bf16, fp16) in GFLOP/s and read
    bandwidths in GB/s (float32, and half-precision matrix-vector), best of a few."""
    import torch

    rng = np.random.default_rng(SEED)
    a = rng.standard_normal((4096, 512), dtype=np.float32)
    b = rng.standard_normal((512, 4096), dtype=np.float32)
    big = np.ones((2**30 // (4 * D), D), dtype=np.float32)  # 1 GiB
    v = np.ones(D, dtype=np.float32)
    a @ b
    gemm_s = min(_timed(np.matmul, a, b)[0] for _ in range(5))
    gemv_s = min(_timed(np.matmul, big, v)[0] for _ in range(5))
    sum_s = min(_timed(big.sum, 0)[0] for _ in range(3))
    out = {
        "sgemm_gflops": 2 * 4096 * 512 * 4096 / gemm_s / 1e9,
        "gemv_gbs": big.nbytes / gemv_s / 1e9,
        "sum_gbs": big.nbytes / sum_s / 1e9,
    }
    # torch GEMMs on 2048 x 512 @ 512 x 2048 (emulated formats take seconds).
    ta, tb = torch.from_numpy(a[:2048]), torch.from_numpy(b[:, :2048].copy())
    half_big = torch.from_numpy(big[: big.shape[0] // 2])  # 512 MiB as float32
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16),
                        ("fp16", torch.float16)):
        x, y = ta.to(dtype), tb.to(dtype)
        x @ y
        seconds = min(_timed(torch.matmul, x, y)[0] for _ in range(3))
        out[f"torch_{name}_gflops"] = 2 * 2048 * 512 * 2048 / seconds / 1e9
        if name != "fp32":
            m, w = half_big.to(dtype), torch.ones(D, dtype=dtype)
            m @ w
            seconds = min(_timed(torch.mv, m, w)[0] for _ in range(5))
            out[f"{name}_gemv_gbs"] = m.numel() * 2 / seconds / 1e9
    return out


# -- exact search: ours, scikit-learn, raw FAISS ---------------------------------------


def _fit(method, X, y, memory=None):
    """Fit `method` on the memory; return its predict (or search) function.

    skmml's variants fit on (X, y), or share `memory` (a Memory of X, y) when
    given, so that several fit in RAM together at N = 1M.
    """
    if method in SCREENS:
        clf = KNNVoteClassifier(
            n_neighbors=K, voting="rank", index="flat", index_device="cpu",
            index_params=SCREENS[method],
        )
        return (clf.fit(X, y) if memory is None else clf.set_memory(memory)).predict
    if method == "scann_bf":
        from scann import scann_ops_pybind

        searcher = scann_ops_pybind.builder(X, K, "dot_product").score_brute_force().build()
        return lambda q: searcher.search_batched(q) if len(q) > 1 else searcher.search(q[0])
    if method == "sklearn":
        clf = KNeighborsClassifier(n_neighbors=K, algorithm="brute", metric="cosine")
        return clf.fit(X, y).predict
    index = faiss.IndexFlatIP(D)
    index.add(X)
    return lambda q: index.search(q, K)


def _workload(method, n, n_queries, n_single, machine=None):
    """(batch size, number of single queries): fewer for scikit-learn on large N, and
    a smaller batch for a certified format that this CPU only emulates."""
    if method == "sklearn" and n > SKLEARN_FULL_MAX_N:
        return min(n_queries, SKLEARN_LARGE_BATCH), min(n_single, SKLEARN_LARGE_SINGLE)
    fmt = method.partition("_")[2]
    if (method in SCREENS and fmt in ("bf16", "fp16") and machine is not None
            and machine[f"torch_{fmt}_gflops"] < machine["torch_fp32_gflops"]):
        return min(n_queries, EMULATED_BATCH), n_single
    return n_queries, n_single


def bench_memory(method, cache_dir, n, n_queries):
    """Fit time and peak RSS rise of one method over fit, a batch and a single query."""
    X, y, Q, _ = load_data(cache_dir, n, _workload(method, n, n_queries, 1)[0])
    # Start the BLAS and OpenMP thread pools before the baseline is taken.
    warm = np.ones((WARMUP_QUERIES, D), dtype=np.float32)
    warm @ warm.T
    faiss.knn(warm, warm, 1, metric=faiss.METRIC_INNER_PRODUCT)
    baseline = rss_bytes()
    fit_s, predict = _timed(_fit, method, X, y)
    predict(Q)
    predict(Q[:1])
    rise = peak_rss_bytes() - baseline
    return {
        "fit s": fit_s,
        "peak rise GB": rise / 1e9,
        "peak rise / raw": rise / X.nbytes,
    }


def bench_speed(methods, cache_dir, n, n_queries, n_single, repeats, machine=None):
    """Batched and single-query rates and accuracy, methods interleaved; for skmml's
    variants, how many neighbor rows and predictions differ from float32 search."""
    from skmml.retrieval import _screening as screening

    X, y, Q, qy = load_data(cache_dir, n, n_queries)
    memory = Memory(X, y) if any(m in SCREENS for m in methods) else None
    predictors = {m: _fit(m, X, y, memory) for m in methods}
    workload = {m: _workload(m, n, n_queries, n_single, machine) for m in methods}
    for predict in predictors.values():
        predict(Q[:WARMUP_QUERIES])
        predict(Q[:1])
    batch_s = dict.fromkeys(methods, np.inf)
    predictions = {}
    for _ in range(repeats):
        for m, predict in predictors.items():
            seconds, predictions[m] = _timed(predict, Q[: workload[m][0]])
            batch_s[m] = min(batch_s[m], seconds)
    single_s = dict.fromkeys(methods, 0.0)
    for i in range(n_single):
        for m, predict in predictors.items():
            if i < workload[m][1]:
                single_s[m] += _timed(predict, Q[i : i + 1])[0]
    rows = {}
    reference = predictors["skmml_fp32"].__self__ if "skmml_fp32" in methods else None
    for m in methods:
        batch, single = workload[m]
        rows[m] = {
            "batch": batch,
            "batch q/s": batch / batch_s[m],
            "single": single,
            "single q/s": single / single_s[m],
            "accuracy %": (
                np.nan if m in ("faiss", "scann_bf")
                else 100 * np.mean(predictions[m] == qy[:batch])
            ),
        }
        if m in SCREENS and reference is not None:
            clf = predictors[m].__self__
            batch_q, single_q = Q[:batch], Q[:min(single, 20)]
            differ = int(np.sum(np.any(clf.kneighbors(batch_q)[1]
                                       != reference.kneighbors(batch_q)[1], axis=1)))
            differ += int(np.sum(predictions[m] != reference.predict(batch_q)))
            # One at a time too: the single-query path may screen differently.
            for q in single_q:
                differ += int(np.any(clf.kneighbors(q[None])[1]
                                     != reference.kneighbors(q[None])[1]))
            rows[m]["differ"] = differ
            rows[m]["screen (1 / batch)"] = "/".join(
                str(screening.screen_format((SCREENS[m] or {}).get("screen", "auto"), nq,
                                            n, D)) for nq in (1, batch))
    return rows


# -- approximate indexes ---------------------------------------------------------------


def _sweeps(n, d):
    """(index, build parameters, search parameter, values) to sweep for `n` items of `d`."""
    nlist = min(1024, 2 ** int(np.log2(n // 39)))  # FAISS wants >= 39 points per list
    leaves = int(np.sqrt(n))
    sweeps = [
        (f"IVF{nlist},Flat", None, "nprobe", (1, 4, 8, 16, 32, 64)),
        (f"IVF{nlist},SQ8", None, "nprobe", (4, 16, 64)),
        # 4-bit fast-scan PQ, d/4 sub-quantisers: d/8 bytes a vector, quick to train.
        (f"IVF{nlist},PQ{d // 4}x4fs", None, "nprobe", (8, 32, 64)),
        ("scann", {"num_leaves": leaves, "reorder": 256}, "num_leaves_to_search",
         sorted({max(1, int(leaves * f)) for f in (0.01, 0.025, 0.05, 0.1, 0.2)})),
    ]
    if n <= HNSW_MAX_N:
        sweeps.append(("HNSW32", None, "efSearch", (16, 64, 256)))
    return sweeps


def load_real(n_queries):
    """Fashion-MNIST EfficientNet-Lite0 features (benchmarks/mml_data.py): 20k items,
    memory and queries split 80/20."""
    import mml_data

    data = mml_data.load_image_features(n_per_class=2000, seed=SEED)
    X, y = data["X"], data["y"]
    cut = len(X) - min(n_queries, len(X) // 5)
    return X[:cut], y[:cut], X[cut:], y[cut:]


def _set_search_params(clf, params):
    # index_params take effect in fit(), and rebuilding an IVF index at 1M
    # items takes minutes. Search parameters need no rebuild, so they are set
    # on the fitted index through skmml's private NeighborIndex (what fit()
    # itself calls); set_params keeps the estimator's repr truthful.
    clf.set_params(index_params=params)
    index = clf._state.backend.index()
    index.params = params
    kind = index.kind_
    kind.spec = kind.spec._replace(params=params)
    if hasattr(kind, "searcher"):  # ScaNN
        kind.searcher.settings.update(params)
    else:
        kind._set_search_params()


def _recall(ids, exact_ids):
    """Fraction of the exact k nearest neighbors that were found."""
    return np.mean((ids[:, :, None] == exact_ids[:, None, :]).any(axis=2))


def bench_ann(cache_dir, n, n_queries, repeats):
    """Accuracy, recall, batched queries/s and fit time of exact and ANN indexes.

    `n` is a memory size of the synthetic data, or "real" for real embeddings.
    """
    X, y, Q, qy = load_real(n_queries) if n == "real" else load_data(cache_dir, n, n_queries)
    n_queries = len(Q)
    rows = []
    exact_ids = None
    for index, build, param, values in [("flat", None, None, (None,)),
                                        *_sweeps(len(X), X.shape[1])]:
        clf = KNNVoteClassifier(n_neighbors=K, voting="rank", index=index, index_device="cpu",
                                index_params=build)
        fit_s, _ = _timed(clf.fit, X, y)
        for value in values:
            if param is not None:
                _set_search_params(clf, {**(build or {}), param: value})
            clf.predict(Q[:WARMUP_QUERIES])
            seconds = np.inf
            for _ in range(repeats):
                elapsed, pred = _timed(clf.predict, Q)
                seconds = min(seconds, elapsed)
            ids = clf.kneighbors(Q, return_distance=False)
            if exact_ids is None:
                exact_ids = ids
            rows.append(
                {
                    "index": "Flat (exact)" if index == "flat" else index,
                    "search params": "-" if param is None else f"{param}={value}",
                    "fit s": fit_s,
                    "batch q/s": n_queries / seconds,
                    "accuracy %": 100 * np.mean(pred == qy),
                    f"recall@{K}": _recall(ids, exact_ids),
                }
            )
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
    return (
        None if candidates.empty else candidates.loc[candidates["batch q/s"].idxmax()]
    )


# -- reporting -------------------------------------------------------------------------


def _check(n, target, op, goal, value, detail):
    """A summary row: the measured value against its goal, PASS or FAIL."""
    ok = value <= goal if op == "<=" else value >= goal
    return n, target, f"{value:.3f}{detail}", f"{op} {goal}", "PASS" if ok else "FAIL"


def _print_table(table, **formats):
    formatters = {col: fmt.format for col, fmt in formats.items() if col in table}
    print(table.to_string(index=False, na_rep="-", formatters=formatters))


def report_ann(ann, what, repeats):
    """Print an approximate-index table, the fastest setting of each index type
    within one accuracy point of exact search, and return the overall fastest."""
    print(f"\nApproximate indexes ({what}, best of {repeats}; fit = train + add):")
    _print_table(
        ann,
        **{
            "fit s": "{:.1f}",
            "batch q/s": "{:,.1f}",
            "accuracy %": "{:.2f}",
            f"recall@{K}": "{:.3f}",
            "speedup": "{:.2f}x",
            "accuracy loss": "{:+.2f}",
        },
    )
    print("Fastest setting of each index type within 1 accuracy point of exact search:")
    for index in ann["index"].iloc[1:].unique():
        best = best_within_one_point(pd.concat([ann.iloc[:1], ann[ann["index"] == index]]))
        print(f"  {index:<18} " + ("none" if best is None else
                                   f"{best['search params']}: {best['speedup']:.2f}x, "
                                   f"recall {best[f'recall@{K}']:.3f}, "
                                   f"{best['accuracy loss']:+.2f} points"))
    best = best_within_one_point(ann)
    if best is None:
        return 0.0, " (no setting within 1 point)"
    detail = f" ({best['index']} {best['search params']}, {best['accuracy loss']:+.2f} points)"
    print(f"Fastest overall: {best['speedup']:.1f}x{detail}")
    return best["speedup"], detail


STAGE_FORMATS = ("bf16", "fp32")


def bench_stages(cache_dir, n, n_queries, repeats):
    """Seconds of each stage of certified search, per format, beside raw FAISS.

    The exact index's own search (``screen="bf16"`` and ``screen="fp32"``,
    the same pipeline with a float32 product) on `n_queries` queries, best
    of `repeats` rounds interleaved with raw ``faiss.IndexFlatIP.search``;
    the neighbors are checked against ``screen="off"``.
    """
    from skmml.retrieval import _screening as screening

    X, _, Q, _ = load_data(cache_dir, n, n_queries)
    bank = Memory(X, np.zeros(n, dtype=np.int64)).image
    raw = faiss.IndexFlatIP(D)
    raw.add(X)
    indexes = {f: NeighborIndex("flat", params={"screen": f}, device="cpu").build(bank)
               for f in (*STAGE_FORMATS, "off")}
    reference = indexes["off"].search(Q, K)[1]
    rows, best_faiss = {}, np.inf
    for f in STAGE_FORMATS:
        indexes[f].search(Q[:WARMUP_QUERIES], K)  # the low-precision copy is built here
    for _ in range(repeats):
        best_faiss = min(best_faiss, _timed(raw.search, Q, K)[0])
        for f in STAGE_FORMATS:
            stages = screening.Stages()
            seconds, (_, slots) = _timed(indexes[f].kind_.search, Q, K, stages)
            if f not in rows or seconds < rows[f]["total s"]:
                product = stages.seconds["product"]
                rest = sum(stages.seconds.values()) - product
                rows[f] = {"format": f, **{f"{k} s": v for k, v in stages.seconds.items()},
                           "sum s": sum(stages.seconds.values()), "total s": seconds,
                           "overhead / product": rest / product,
                           "candidates / query": stages.candidates / max(stages.queries, 1),
                           "fallback queries": stages.fallback,
                           "differing rows": int((slots != reference).any(axis=1).sum())}
    for row in rows.values():
        row["vs raw FAISS"] = best_faiss / row["total s"]
    return pd.DataFrame(rows.values()), best_faiss, _single_queries(bank, X, Q, indexes)


def _single_queries(bank, X, Q, indexes, n=50):
    """Single-query seconds (median over `n` queries, in interleaved runs of 10) of each search.

    Raw FAISS with one thread and with all threads, and the exact index with
    ``screen`` off, fp16, bf16 and the default (auto).
    """
    threads = faiss.omp_get_max_threads()
    raw = faiss.IndexFlatIP(D)
    raw.add(X)

    def faiss_with(n_threads):
        def search(q):
            faiss.omp_set_num_threads(n_threads)
            try:
                return raw.search(q, K)
            finally:
                faiss.omp_set_num_threads(threads)
        return search

    indexes = {**indexes, "fp16": NeighborIndex("flat", params={"screen": "fp16"},
                                                 device="cpu").build(bank),
               "auto": NeighborIndex("flat", device="cpu").build(bank)}
    methods = {"raw FAISS, 1 thread": faiss_with(1),
               f"raw FAISS, {threads} threads": faiss_with(threads),
               **{f"skmml screen={f}": (lambda q, f=f: indexes[f].search(q, K))
                  for f in ("off", "fp16", "bf16", "auto")}}
    for search in methods.values():
        search(Q[:1])  # warm-up (a low-precision copy is built here)
    # Rounds of 10 consecutive queries per method: FAISS's and torch's OpenMP
    # threads spin for a while after a parallel region, which slows the other
    # library's next call, so the first query of each run is not counted.
    times = {name: [] for name in methods}
    for start in range(1, n + 1, 10):
        for name, search in methods.items():
            run = [_timed(search, Q[i:i + 1])[0] for i in range(start, start + 11)]
            times[name] += run[1:]
    best = min(np.median(times[m]) for m in methods if m.startswith("raw FAISS"))
    return pd.DataFrame([{"method": m, "ms / query": 1e3 * np.median(t),
                          "vs best FAISS": best / np.median(t)} for m, t in times.items()])


def report_stages(n, table, best_faiss, single, n_queries):
    """Print the stage tables of `n` items; summary rows for the overhead target."""
    print(f"\nCertified search by stage, {n_queries} queries batched (raw FAISS "
          f"{best_faiss:.3f} s); the overhead is everything but the product:")
    _print_table(table, **{c: "{:.3f}" for c in table.columns
                                                if c.endswith(" s")})
    print("\nSingle queries (median of 50, in interleaved runs of 10):")
    _print_table(single, **{"ms / query": "{:.2f}",
                                                 "vs best FAISS": "{:.2f}"})
    rows = []
    for row in table.to_dict("records"):
        rows.append([n, f"screen overhead / product ({row['format']})",
                     f"{row['overhead / product']:.3f}", "<= 0.25",
                     "PASS" if row["overhead / product"] <= 0.25 else "FAIL"])
        rows.append([n, f"neighbor rows differing from float32 ({row['format']})",
                     str(row["differing rows"]), "0",
                     "PASS" if row["differing rows"] == 0 else "FAIL"])
    return rows


def bench_size(args, n, machine, n_queries, n_single, repeats):
    """Measure and print everything for a memory of `n` items; return summary rows."""
    print(f"\n=== N = {n:,} memory items, d = {D}, {N_CLASSES} classes, k = {K} ===")
    seconds = run_isolated(prepare_data, args.cache_dir, n)
    print(f"data ready in {seconds:.1f} s (cache: {_data_dir(args.cache_dir)})")
    raw_bytes = n * D * 4
    stream_bound = max(machine["gemv_gbs"], machine["sum_gbs"]) * 1e9 / raw_bytes
    print(
        f"raw embeddings {raw_bytes / 1e9:.2f} GB; streaming-bound single-query "
        f"rate {stream_bound:,.1f} q/s; sgemm-bound batched rate "
        f"{machine['sgemm_gflops'] * 1e9 / (2 * n * D):,.0f} q/s",
        flush=True,
    )

    methods = [m for m in METHODS if not (m == "sklearn" and args.skip_sklearn)]
    # Ours and raw FAISS are timed interleaved in one process, so that their
    # ratio is fair on a loaded machine; the certified formats beside float32
    # in a second process (a memory's copies must fit in RAM); scikit-learn in
    # a process of its own, as its BLAS threads, still spinning after a call,
    # would slow FAISS down.
    rows = {}
    groups = (["skmml", "skmml_fp32", "faiss"], ["skmml_bf16", "skmml_fp16", "skmml_fp32"],
              ["scann_bf"], ["sklearn"])
    for group in groups:
        group = [m for m in group if m in methods]
        print(f"  timing {', '.join(METHODS[m] for m in group)} ...", flush=True)
        measured = run_isolated(
            bench_speed, group, args.cache_dir, n, n_queries, n_single, repeats, machine
        )
        rows.update({m: r for m, r in measured.items() if m not in rows})
    for m in methods:
        if m in ("skmml_bf16", "skmml_fp16"):
            continue
        print(f"  peak memory of {METHODS[m]} ...", flush=True)
        rows[m].update(run_isolated(bench_memory, m, args.cache_dir, n, n_queries))
    table = pd.DataFrame([rows[m] for m in methods], index=[METHODS[m] for m in methods])
    table = table.rename_axis("method").reset_index()
    print(
        f"\nExact search (batch q/s: best of {repeats} rounds after a warm-up; "
        "single queries one by one; peak rise over the RSS with the data loaded, "
        "in a separate process per method):"
    )
    _print_table(
        table,
        **{
            "fit s": "{:.2f}",
            "batch q/s": "{:,.1f}",
            "single q/s": "{:,.2f}",
            "accuracy %": "{:.1f}",
            "peak rise GB": "{:.3f}",
            "peak rise / raw": "{:.3f}",
        },
    )
    if "sklearn" in rows and rows["sklearn"]["batch"] != n_queries:
        print(
            f"(scikit-learn above {SKLEARN_FULL_MAX_N:,} items: a batch of "
            f"{SKLEARN_LARGE_BATCH} queries and {SKLEARN_LARGE_SINGLE} single queries; "
            "its accuracy is over those queries.)"
        )

    ours, raw, fp32 = rows["skmml"], rows["faiss"], rows["skmml_fp32"]
    batched = ours["batch q/s"] / raw["batch q/s"]
    single_gain = ours["single q/s"] / fp32["single q/s"]
    overhead = raw["batch q/s"] / fp32["batch q/s"]
    single_ratio = ours["single q/s"] / stream_bound
    differ = sum(r.get("differ", 0) for r in rows.values())
    print(f"\nbatched predict rate (default) / raw FAISS search rate: {batched:.3f}")
    print(f"single-query rate (default) / float32 skmml: {single_gain:.3f}")
    print(f"float32 batched predict time / raw FAISS search time: {overhead:.3f}")
    print(f"neighbor rows and predictions differing from float32 search: {differ}")
    print(
        f"single-query rate / float32 streaming bound: {single_ratio:.3f} "
        f"(raw FAISS: {raw['single q/s'] / stream_bound:.3f})"
    )
    print("\nFraction of each method's bound (batched: its format's GEMM rate; single: "
          "its format's read bandwidth over the memory's bytes in that format):")
    for m, r in rows.items():
        screen = r.get("screen (1 / batch)", "None/None").split("/")
        fmts = {"skmml_bf16": ("bf16", "bf16"), "skmml_fp16": ("fp16", "fp16")}.get(
            m, tuple("fp32" if f == "None" else f for f in screen))
        single_fmt, batch_fmt = fmts
        gflops = (machine["sgemm_gflops"] if batch_fmt == "fp32"
                  else machine[f"torch_{batch_fmt}_gflops"])
        gbs = (max(machine["gemv_gbs"], machine["sum_gbs"]) if single_fmt == "fp32"
               else machine[f"{single_fmt}_gemv_gbs"])
        width = 4 if single_fmt == "fp32" else 2
        print(f"  {METHODS[m]:<36} batched {r['batch q/s'] / (gflops * 1e9 / (2 * n * D)):.3f}"
              f" of {batch_fmt} GEMM, single {r['single q/s'] / (gbs * 1e9 / (n * D * width)):.3f}"
              f" of {single_fmt} bandwidth")
    if "sklearn" in rows:
        sk = rows["sklearn"]
        print(
            f"speedup over scikit-learn: {ours['batch q/s'] / sk['batch q/s']:.1f}x "
            f"batched, {ours['single q/s'] / sk['single q/s']:.1f}x single"
        )

    print("\n  approximate indexes ...", flush=True)
    ann = run_isolated(bench_ann, args.cache_dir, n, n_queries, repeats)
    ann_speedup, ann_detail = report_ann(ann, f"{n_queries} queries batched", repeats)

    measured = {
        "batched": (batched, ""),
        "single_gain": (single_gain, ""),
        "identical": (differ, ""),
        "overhead": (overhead, ""),
        "single": (single_ratio, ""),
        "memory": (ours["peak rise / raw"], ""),
        "ann": (ann_speedup, ann_detail),
    }
    return [_check(n, *TARGETS[key], *value) for key, value in measured.items()]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[100_000, 1_000_000],
        help="memory sizes N (default: 100000 1000000)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: N = 20000, 1024 queries, 20 single queries, 3 repeats",
    )
    parser.add_argument(
        "--skip-sklearn", action="store_true", help="leave scikit-learn out"
    )
    parser.add_argument(
        "--stages-only", action="store_true",
        help="only the stage breakdown of certified search (and the machine figures)",
    )
    parser.add_argument(
        "--skip-real", action="store_true",
        help="leave out the approximate indexes on real embeddings (needs "
             "benchmarks/mml_data.py's Fashion-MNIST features)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="timed rounds of each batched prediction, best kept (default: 2)",
    )
    parser.add_argument(
        "--cache-dir",
        default="~/.cache/skmml/bench",
        help="where generated data is cached (default: ~/.cache/skmml/bench)",
    )
    args = parser.parse_args()
    if args.quick:
        sizes, n_queries, n_single, repeats = [20_000], 1024, 20, 3
    else:
        sizes, n_queries, n_single, repeats = args.sizes, N_QUERIES, 20, args.repeats

    start = time.perf_counter()
    print(
        f"skmml {skmml.__version__}, faiss {faiss.__version__}, "
        f"numpy {np.__version__}, scikit-learn {sklearn.__version__}; "
        f"{platform.machine()}, {multiprocessing.cpu_count()} CPUs, "
        f"FAISS threads {faiss.omp_get_max_threads()}"
    )
    machine = run_isolated(measure_machine)
    print(
        f"sgemm (float32 4096x512 @ 512x4096, best of 5): "
        f"{machine['sgemm_gflops']:.1f} GFLOP/s"
    )
    model, flags = cpu_flags()
    print(f"CPU: {model}; reduced-precision instruction sets: {', '.join(flags) or 'none'}")
    print(
        "torch GEMM (2048x512 @ 512x2048, best of 3): "
        + ", ".join(f"{f} {machine[f'torch_{f}_gflops']:.1f}" for f in ("fp32", "bf16", "fp16"))
        + " GFLOP/s; half-precision matrix-vector read bandwidth: "
        f"bf16 {machine['bf16_gemv_gbs']:.1f}, fp16 {machine['fp16_gemv_gbs']:.1f} GB/s"
    )
    print(
        f"read bandwidth over a 1 GiB float32 array: {machine['gemv_gbs']:.1f} GB/s "
        f"(matrix-vector product, all threads, best of 5), {machine['sum_gbs']:.1f} "
        "GB/s (sum(axis=0), one thread, best of 3); the higher sets the streaming "
        "bound"
    )

    summary = []
    for n in sizes:
        if not args.stages_only:
            summary += bench_size(args, n, machine, n_queries, n_single, repeats)
        else:
            run_isolated(prepare_data, args.cache_dir, n)
        table, best_faiss, single = run_isolated(bench_stages, args.cache_dir, n, n_queries,
                                                 repeats)
        summary += report_stages(n, table, best_faiss, single, n_queries)
    if args.stages_only:
        args.skip_real = True
    if not args.skip_real:
        print("\n=== Real embeddings: Fashion-MNIST, EfficientNet-Lite0 (1280-d), "
              "16,000 in memory ===", flush=True)
        ann = run_isolated(bench_ann, args.cache_dir, "real", n_queries, repeats)
        report_ann(ann, f"{min(n_queries, 4000)} queries batched", repeats)

    print("\n=== Summary ===")
    _print_table(
        pd.DataFrame(summary, columns=["N", "target", "measured", "goal", "result"]),
        N="{:,}",
    )
    print(f"\ntotal time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
