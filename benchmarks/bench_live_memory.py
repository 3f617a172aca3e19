"""What the live memory's guarantees cost: reads, and 1-item updates at scale.

Two measurements, one run, on clustered synthetic unit vectors (d = 512,
1000 classes, k = 32):

1. Single-threaded prediction at N = 100k (1,000 queries batched, and one
   query at a time): run this script against two checkouts of skmml (the
   copy-on-write state of issue 10 and the commit before it) to get the
   overhead of consistent reads; ``--repeats`` alternates nothing itself,
   so run the two alternately, as the closing note of issue 10 did.
2. The cost of a 1-item ``partial_fit`` and a 1-item ``forget`` while the
   estimator serves, for the exact index (N = 100k and 1M) and IVF (100k): the
   exact index's cost is the new memory's arrays (the memory is immutable,
   so a change allocates the new arrays once); an approximate FAISS index is
   cloned and the clone changed, so that reads in flight keep the old one.

Run: ``python benchmarks/bench_live_memory.py [--quick]``.
"""

import argparse
import time

import numpy as np

from skmml import KNNVoteClassifier, Memory

D, K, N_CLASSES = 512, 32, 1000


def clustered(n, rng):
    centres = rng.standard_normal((N_CLASSES, D), dtype=np.float32)
    y = rng.integers(0, N_CLASSES, n)
    X = centres[y] + 2.0 * rng.standard_normal((n, D), dtype=np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X, y


def best_of(repeats, fn):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def read_cost(rng, repeats):
    X, y = clustered(100_000, rng)
    Q, _ = clustered(1000, rng)
    clf = KNNVoteClassifier(n_neighbors=K, index_device="cpu").set_memory(Memory(X, y))
    clf.predict(Q)
    batched = best_of(repeats, lambda: clf.predict(Q))
    single = best_of(repeats, lambda: [clf.predict(Q[i:i + 1]) for i in range(50)]) / 50
    print(f"N = 100k: batched predict of 1,000 queries {batched * 1e3:.1f} ms "
          f"({1000 / batched:,.0f} q/s); one query {single * 1e3:.2f} ms "
          f"({1 / single:,.0f} q/s)")


def update_cost(n, index, rng, repeats):
    X, y = clustered(n, rng)
    clf = KNNVoteClassifier(n_neighbors=K, index=index, index_device="cpu").set_memory(Memory(X, y))
    new, _ = clustered(1, rng)
    embedding_bytes = X.nbytes

    def add_then_forget():
        clf.partial_fit(new, [0])
        added = clf.memory_.image.ids[-1:]
        start = time.perf_counter()
        clf.forget(added)
        return time.perf_counter() - start

    add_times, forget_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        forget_times.append(add_then_forget())
        add_times.append(time.perf_counter() - start - forget_times[-1])
    print(f"N = {n:>9,}, index={index}: 1-item partial_fit {min(add_times) * 1e3:7.1f} ms, "
          f"1-item forget {min(forget_times) * 1e3:7.1f} ms "
          f"(embeddings {embedding_bytes / 2**20:,.0f} MiB)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 100k only")
    parser.add_argument("--reads-only", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    read_cost(rng, args.repeats)
    if args.reads_only:
        return
    update_cost(100_000, "flat", rng, 3)
    update_cost(100_000, "ivf", rng, 3)
    if not args.quick:
        # (IVF at 1M is left out: training its 4,000 lists takes minutes here.)
        update_cost(1_000_000, "flat", rng, 3)


if __name__ == "__main__":
    main()
