"""What the live memory's guarantees cost: reads, and 1-item updates at scale.

Two measurements, one run, on clustered synthetic unit vectors (d = 512,
1000 classes, k = 32):

1. Single-threaded prediction at N = 100k (1,000 queries batched, and one
   query at a time): run this script against two checkouts of skmml (the
   copy-on-write state of issue 10 and the commit before it) to get the
   overhead of consistent reads; ``--repeats`` alternates nothing itself,
   so run the two alternately, as the closing note of issue 10 did.
2. The cost of a 1-item ``partial_fit`` and a 1-item ``forget`` while the
   estimator serves, for the exact index (N = 100k and 1M) and IVF (100k).
   The exact index follows the memory's storage (``skmml.memory._bank``): an
   addition writes into spare capacity shared by the memory's versions (the
   first one after ``fit`` copies the memory once into a store with room),
   a removal marks a slot dead, so both cost what they change; the script
   also prints the amortised cost of compacting dead slots and what dead
   slots cost a batched predict. An approximate FAISS index is cloned and the
   clone changed, so that reads in flight keep the old one: O(N).

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
    """1-item partial_fit and forget while serving: median of `repeats` calls each."""
    X, y = clustered(n, rng)
    clf = KNNVoteClassifier(n_neighbors=K, index=index, index_device="cpu").set_memory(Memory(X, y))
    new, _ = clustered(repeats, rng)
    start = time.perf_counter()
    clf.partial_fit(new[:1], [0])
    first = time.perf_counter() - start
    add_times, forget_times = [], []
    for i in range(1, repeats):
        start = time.perf_counter()
        clf.partial_fit(new[i:i + 1], [0])
        add_times.append(time.perf_counter() - start)
    victims = rng.choice(clf.memory_.image.ids, size=repeats, replace=False)
    for victim in victims:
        start = time.perf_counter()
        clf.forget([victim])
        forget_times.append(time.perf_counter() - start)
    print(f"N = {n:>9,}, index={index}: 1-item partial_fit {np.median(add_times) * 1e3:8.3f} ms "
          f"(the first: {first * 1e3:7.1f} ms), 1-item forget "
          f"{np.median(forget_times) * 1e3:8.3f} ms  (medians of {repeats - 1} and {repeats}; "
          f"embeddings {X.nbytes / 2**20:,.0f} MiB)")
    return clf


def exact_index_amortised(clf, rng):
    """What the exact index's O(change) updates cost on top: compaction, and dead slots."""
    bank = clf.memory_.image
    n = len(bank)
    Q, _ = clustered(1000, rng)
    clf.predict(Q)
    before = best_of(3, lambda: clf.predict(Q))
    dead = bank.n_slots // 16 - bank.dead_slots.size  # just below the compaction point
    clf.forget(rng.choice(bank.ids, size=dead, replace=False))
    with_dead = best_of(3, lambda: clf.predict(Q))
    victim = clf.memory_.image.ids[:1]
    start = time.perf_counter()
    clf.forget(victim)  # past 1/16 dead: compacts
    compaction = time.perf_counter() - start
    assert not clf.memory_.image.dead_slots.size
    print(f"N = {n:>9,}, exact: compaction {compaction * 1e3:,.0f} ms once per "
          f"{n // 16:,} forgotten items = {compaction / (n // 16) * 1e6:.1f} us per item, "
          f"amortised; batched predict with 1/16 of the slots dead: "
          f"{with_dead / before:.2f}x the time without")


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
    exact_index_amortised(update_cost(100_000, "flat", rng, 101), rng)
    update_cost(100_000, "ivf", rng, 5)
    if not args.quick:
        # (IVF at 1M is left out: training its 4,000 lists takes minutes here.)
        exact_index_amortised(update_cost(1_000_000, "flat", rng, 101), rng)


if __name__ == "__main__":
    main()
