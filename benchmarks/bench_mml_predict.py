"""Prediction cost of MemoryModularClassifier with trained heads, against KNNVoteClassifier.

Two memories, both synthetic and built offline in seconds (``bench_mml.py``
times the same comparison on cached real embeddings, which take 20 minutes
to build):

- "500 x 1280": scikit-learn's digits (10 classes) through random features:
  the standardised 64 pixels times a fixed Gaussian (64, 1280) matrix, a ReLU,
  plus Gaussian noise of standard deviation 0.1. 50 digits per class are the
  memory (500 items), 297 others train the heads, and the remaining 1,000
  are the queries. The shape of ``bench_mml.py``'s Fashion-MNIST memory.
- "6,500 x 384": plain Gaussian clusters, 100 classes with centres drawn from
  N(0, I) in 384 dimensions and items at the centre plus N(0, 3^2 I) noise;
  65 items per class are the memory, 1,000 more items train the heads, and
  2,000 are the queries. The shape of ``bench_mml.py``'s description memory.

The heads are the reference configuration of ``bench_mml.py`` ("MML
reference (default init, last epoch)": ``residual_init="default"``, no
validation, the last epoch kept), trained for 2 epochs, so they are trained
heads (``best_epoch_ = 2``), never the identity. ``KNNVoteClassifier(32)``
searches the same memory with the same neighbor search.

Printed per memory: batched ``predict`` time of all queries (best of 5,
the methods interleaved in each repeat, one process) for MML with float32
heads, MML with bfloat16 heads and KNNVoteClassifier, each as a ratio to
KNN; the number of bfloat16 predictions that differ from float32 ones (and
the largest probability difference); the time to fold the head into the
memory (its cached projections: paid by the first ``predict`` after a change
of memory or weights, reused by the timed calls); and a per-stage profile of MML
``predict`` (torch.profiler over the library's ``skmml.mml.*`` ranges:
the neighbor search, the attention, the MLP, the prototype cosines, and the
rest: input validation, batching, the argmax). Accuracies are printed for
orientation only: two epochs of the reference configuration are not a good
classifier, and that is not what this measures.

Run: ``python benchmarks/bench_mml_predict.py [--repeats 5] [--threads N]``. On a
machine shared with other work, raise ``--repeats``: the best of more
interleaved repeats is less disturbed.
"""

import argparse
import time

import numpy as np
import pandas as pd
import torch
from sklearn.datasets import load_digits
from torch.profiler import ProfilerActivity, profile

from skmml import KNNVoteClassifier, Memory, MemoryModularClassifier
from skmml._machine import bf16_matmul_gain

K = 32
STAGES = ("search", "attention", "mlp", "prototypes")


def digits_memory(d=1280, per_class=50, n_train=297, seed=0):
    """(memory X, y, training X, y, query X, y): digits through random ReLU features."""
    X, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    X = (X - X.mean(axis=0)) / (X.std(axis=0) + 1e-6)
    features = np.maximum(X @ rng.normal(size=(X.shape[1], d)) / np.sqrt(X.shape[1]), 0)
    features = (features + 0.1 * rng.normal(size=features.shape)).astype(np.float32)
    memory = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per_class]
                             for c in np.unique(y)])
    rest = rng.permutation(np.setdiff1d(np.arange(len(y)), memory))
    train, queries = rest[:n_train], rest[n_train:]
    return tuple(a for rows in (memory, train, queries) for a in (features[rows], y[rows]))


def gaussian_memory(d=384, n_classes=100, per_class=65, n_train=1000, n_queries=2000,
                    sigma=3.0, seed=0):
    """(memory X, y, training X, y, query X, y): Gaussian clusters."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, d))

    def draw(labels):
        return (centres[labels] + sigma * rng.normal(size=(len(labels), d))).astype(np.float32)

    y = np.repeat(np.arange(n_classes), per_class)
    train_y = rng.integers(0, n_classes, n_train)
    query_y = rng.integers(0, n_classes, n_queries)
    return draw(y), y, draw(train_y), train_y, draw(query_y), query_y


def trained_mml(memory, X, y, estimator=MemoryModularClassifier):
    """The reference configuration of bench_mml.py, 2 epochs: trained heads."""
    clf = estimator(n_neighbors=K, residual_init="default", max_epochs=2,
                    validation_fraction=None, random_state=0, heads_device="cpu",
                    memory=memory).fit(X, y)
    assert clf.best_epoch_ == 2
    return clf


def timings(methods, queries, repeats):
    """Best-of-`repeats` seconds of ``predict(queries)`` per method, interleaved."""
    best = dict.fromkeys(methods, np.inf)
    for predict in methods.values():
        predict(queries)  # warm-up: caches, thread pools
    for _ in range(repeats):
        for name, predict in methods.items():
            start = time.perf_counter()
            predict(queries)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def with_precision(clf, precision):
    def predict(X):
        clf.set_params(heads_precision=precision)
        return clf.predict(X)
    return predict


def stage_profile(clf, queries, precision, repeats=3):
    """Milliseconds per stage of a ``predict`` (torch.profiler; the fastest of `repeats` calls)."""
    clf.set_params(heads_precision=precision)
    clf.predict(queries)
    best = None
    for _ in range(repeats):
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            clf.predict(queries)
        total = (time.perf_counter() - start) * 1e3
        times = {e.key: e.cpu_time_total / 1e3 for e in prof.key_averages()}
        row = {stage: times.get(f"skmml.mml.{stage}", 0.0) for stage in STAGES}
        row["other"] = total - sum(row.values())
        row["total"] = total
        if best is None or total < best["total"]:
            best = row
    return best


def run(name, data, repeats, estimator=MemoryModularClassifier):
    X_mem, y_mem, X_fit, y_fit, Q, y_q = data
    memory = Memory(X_mem, y_mem)
    start = time.perf_counter()
    mml = trained_mml(memory, X_fit, y_fit, estimator)
    fit_seconds = time.perf_counter() - start
    knn = KNNVoteClassifier(n_neighbors=K).set_memory(memory)
    print(f"\n=== {name}: {len(X_mem):,} memory items, d = {X_mem.shape[1]}, "
          f"{len(np.unique(y_mem))} classes, {len(Q):,} queries; heads trained on "
          f"{len(X_fit):,} queries in {fit_seconds:.1f} s (best_epoch_ = {mml.best_epoch_}) ===")
    n, d = X_mem.shape
    print(f"Per query: the head's MLP {8 * d * d / 1e6:.2f} M multiply-adds (8 d^2; the query "
          f"and output projections are folded into the memory), the exact search "
          f"{n * d / 1e6:.2f} M (n d)")
    methods = {
        "MML, trained heads, float32": with_precision(mml, "float32"),
        "MML, trained heads, bfloat16": with_precision(mml, "bfloat16"),
        "KNNVoteClassifier": knn.predict,
    }
    best = timings(methods, Q, repeats)
    knn_time = best["KNNVoteClassifier"]
    table = pd.DataFrame([{"method": m, "ms": t * 1e3, "queries/s": len(Q) / t,
                           "time / kNN time": t / knn_time} for m, t in best.items()])
    print(f"Batched predict, best of {repeats} (interleaved):")
    print(table.set_index("method").to_string(float_format=lambda v: f"{v:,.2f}"))

    full = mml.set_params(heads_precision="float32")
    full_pred, full_proba = full.predict(Q), full.predict_proba(Q)
    half = mml.set_params(heads_precision="bfloat16")
    half_pred, half_proba = half.predict(Q), half.predict_proba(Q)
    print(f"bfloat16 predictions != float32: {int(np.sum(half_pred != full_pred))} of "
          f"{len(Q):,} (max |proba difference| {np.abs(half_proba - full_proba).max():.2e}); "
          f"accuracy float32 {np.mean(full_pred == y_q):.3f}, bfloat16 "
          f"{np.mean(half_pred == y_q):.3f}, kNN {knn.score(Q, y_q):.3f}")

    items = torch.from_numpy(memory.image.embeddings)
    head = mml.heads_["image"]
    fold = min(timings({"fold": head.fold_memory}, items, 3).values())
    print(f"Folding the head into the memory (once per memory and weights, on the first "
          f"predict): {fold * 1e3:.1f} ms")

    rows = {}
    for precision in ("float32", "bfloat16"):
        stages = stage_profile(mml, Q, precision)
        rows[precision] = {stage: f"{ms:.1f} ({100 * ms / stages['total']:.0f}%)"
                           for stage, ms in stages.items() if stage != "total"}
        rows[precision]["total"] = f"{stages['total']:.1f}"
    print("MML predict by stage, ms (share of the total), fastest of 3 profiled calls:")
    print(pd.DataFrame(rows).T.to_string())
    mml.set_params(heads_precision="auto")
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; this CPU multiplies "
          f"bfloat16 {bf16_matmul_gain():.2f}x as fast as float32 (heads_precision='auto' "
          f"takes bfloat16 from 1.5x)")
    run("500 x 1280 (digits, random features)", digits_memory(), args.repeats)
    run("6,500 x 384 (Gaussian clusters)", gaussian_memory(), args.repeats)


if __name__ == "__main__":
    main()
