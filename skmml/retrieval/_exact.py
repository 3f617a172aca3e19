"""Exact nearest-neighbor search and the one order of every search's results.

Exact search over a bank's slots (a BLAS product and a partial sort for a
few queries, FAISS's brute force for more), the tie order (equal
similarities to the lower id), and the self-exclusion of leave-one-out
queries. Every index kind (:mod:`skmml.retrieval`) returns its neighbors in
this order.
"""

import faiss
import numpy as np

from ..memory._bank import is_in

#: Below this many queries, exact search is one multi-threaded BLAS product
#: plus a partial sort: FAISS scans with one thread per query there, which
#: streams a large memory at about half the machine's bandwidth.
SMALL_BATCH = 20

def drop_self(sims, rows, is_self):
    """Drop one column per query: the neighbor that is the query itself.

    `is_self` marks, per (query, neighbor), whether the neighbor is the
    query. As :meth:`sklearn.neighbors.KNeighborsMixin.kneighbors` does with
    ``X=None``, only the first match goes, and where duplicates pushed the
    query out of its own list the last column goes.
    """
    n, k = rows.shape
    keep = ~self_mask(is_self)
    return sims[keep].reshape(n, k - 1), rows[keep].reshape(n, k - 1)


def self_mask(is_self):
    """Per query, the one column :func:`drop_self` drops."""
    is_self = is_self.copy()
    is_self[~is_self.any(axis=1), -1] = True
    return is_self & (np.cumsum(is_self, axis=1) == 1)


def score_error(dim):
    """Bound on the error of a float32 inner product of two unit vectors of `dim`.

    Any summation order, with or without fused multiply-adds, computes
    ``sum(a_i b_i)`` within ``dim * u * sum(|a_i b_i|)`` (u = 2^-24), and
    ``sum(|a_i b_i|) <= |a| |b| ~= 1``; one more ``u`` covers the rounding of
    the stored result, and 1% covers norms a few ulps above one.
    """
    return 1.01 * (dim + 1) * 2.0**-24


def canonical_neighbors(queries, bank, sims, rows, k, exact):
    """The `k` nearest of each query in the project's one order, whatever the search path.

    Neighbors come in decreasing similarity, and equal similarities go to
    the lower memory id. Search paths (BLAS for a few queries, FAISS for
    many, one thread or several) compute similarities that differ in their
    last bits, so they may order near-equal items differently. Here, a query
    whose retrieved similarities (``k`` plus a margin, sorted) include two
    within ``4 eps`` of each other (:func:`score_error`) has those candidates
    re-scored by one fixed kernel and is sorted by (-score, id); other
    candidates, and other queries, are already in the same order on every
    path (their gaps exceed what two paths' errors can invert). For an
    `exact` index, a re-scored query whose k-th score is not above the last
    candidate's bound (``sims[:, -1] + 2 eps``, e.g. many duplicates) is
    settled by a full scan of the memory.

    Parameters
    ----------
    queries : ndarray of shape (n, d), float32, unit rows
    bank : MemoryBank
    sims, rows : ndarrays of shape (n, k + margin)
        A search path's result, nearest first: similarities and slots of
        `bank` (``skmml.memory._bank``), -1 where missing.
    k : int
    exact : bool
        Whether the search path was exhaustive (then the result is certified).

    Returns
    -------
    sims, rows : ndarrays of shape (n, k)
    """
    eps = score_error(queries.shape[1])
    out_sims, out_rows = sims[:, :k].copy(), rows[:, :k].copy()
    if rows.shape[1] < 2:
        return out_sims, out_rows
    found = rows >= 0
    with np.errstate(invalid="ignore"):  # -inf - -inf between missing neighbors
        close = (sims[:, :-1] - sims[:, 1:] <= 4 * eps) & found[:, 1:]
    todo = np.flatnonzero(close.any(axis=1))
    if not todo.size:
        return out_sims, out_rows
    # Re-score only the candidates in a near-tie; the others are more than
    # 4 eps from both neighbors, so no path's rounding can move them.
    involved = np.zeros((todo.size, rows.shape[1]), dtype=bool)
    involved[:, :-1] |= close[todo]
    involved[:, 1:] |= close[todo]
    scores, cand = sims[todo].copy(), rows[todo]
    embeddings = bank.slot_embeddings
    q, j = np.nonzero(involved)
    scores[q, j] = rescore(queries, embeddings, todo[q], cand[q, j])
    top_scores, top_rows = _ordered(scores, cand, bank, k)
    out_sims[todo], out_rows[todo] = top_scores, top_rows
    if exact and rows.shape[1] > k:
        # Certificate: every item outside the candidates scores below the k-th.
        unsure = todo[~(sims[todo, -1] + 2 * eps < top_scores[:, k - 1])]
        for i in unsure:
            scores = embeddings @ queries[i]
            scores[bank.dead_slots] = -np.inf
            candidates = np.flatnonzero(scores >= out_sims[i, k - 1] - 4 * eps)
            scores = np.einsum("d,nd->n", queries[i], embeddings[candidates])
            best_scores, best_rows = _ordered(scores[None, :], candidates[None, :], bank, k)
            out_sims[i], out_rows[i] = best_scores[0], best_rows[0]
    return out_sims, out_rows


def tie_order(scores, ids):
    """Per row, the order by decreasing score, equal scores by increasing id (-1 last)."""
    return np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), -scores), axis=1)


def _ordered(scores, rows, bank, k):
    """The best `k` of each row by (-score, id); missing rows (-1) last."""
    found = rows >= 0
    scores = np.where(found, scores, -np.inf).astype(np.float32)
    order = tie_order(scores, np.where(found, bank.slot_ids[np.maximum(rows, 0)], -1))[:, :k]
    return (np.take_along_axis(scores, order, axis=1),
            np.where(np.take_along_axis(found, order, axis=1),
                     np.take_along_axis(rows, order, axis=1), -1))


#: Most similarities (queries x slots) one block of :func:`_top_k_blas` holds.
_BLAS_BLOCK = 1 << 25


def _top_k_blas(queries, embeddings, k, dead):
    """Exact top-k inner products by BLAS products, `dead` slots excluded.

    One multi-threaded product per block of queries (at most
    :data:`_BLAS_BLOCK` similarities each) and a partial sort; the output is
    faiss.knn's (similarities nearest first, and slots).
    """
    n = queries.shape[0]
    sims_out = np.empty((n, k), dtype=np.float32)
    slots_out = np.empty((n, k), dtype=np.int64)
    block = max(1, _BLAS_BLOCK // max(embeddings.shape[0], 1))
    for start in range(0, n, block):
        rows = slice(start, start + block)
        sims = queries[rows] @ embeddings.T
        sims[:, dead] = -np.inf
        top = np.argpartition(sims, -k, axis=1)[:, -k:]
        top_sims = np.take_along_axis(sims, top, axis=1)
        order = np.argsort(-top_sims, axis=1, kind="stable")
        sims_out[rows] = np.take_along_axis(top_sims, order, axis=1)
        slots_out[rows] = np.take_along_axis(top, order, axis=1)
    return sims_out, slots_out


def exact_search(queries, bank, k):
    """Exact top-`k` inner products over the live slots of `bank`.

    A few queries go to :func:`_top_k_blas`; more go to ``faiss.knn`` over
    the bank's storage in place, which cannot skip slots: while some are
    dead (forgotten, not yet compacted), it retrieves ``k`` plus a margin,
    drops the dead, and the rare query left with fewer than ``k`` live
    neighbors is searched again by :func:`_top_k_blas`.
    """
    embeddings, dead = bank.slot_embeddings, bank.dead_slots
    if queries.shape[0] < SMALL_BATCH:
        return _top_k_blas(queries, embeddings, k, dead)
    if not dead.size:
        return faiss.knn(queries, embeddings, k, metric=faiss.METRIC_INNER_PRODUCT)
    extra = min(dead.size, max(k, 64))
    sims, slots = faiss.knn(queries, embeddings, k + extra, metric=faiss.METRIC_INNER_PRODUCT)
    live = ~is_in(dead, slots)
    first = np.argsort(~live, axis=1, kind="stable")[:, :k]  # the first k live, in order
    sims = np.take_along_axis(sims, first, axis=1)
    slots = np.take_along_axis(slots, first, axis=1)
    short = np.flatnonzero(live.sum(axis=1) < k)
    if short.size:
        sims[short], slots[short] = _top_k_blas(queries[short], embeddings, k, dead)
    return sims, slots


#: (query, candidate) pairs re-scored at a time.
_RESCORE_BLOCK = 8192


def rescore(queries, embeddings, q, slots):
    """Float32 scores of the (query `q`, item `slots`) pairs, one fixed kernel.

    The kernel of :func:`skmml.retrieval.canonical_neighbors`: a pair's score
    does not depend on the batch it is computed in.
    """
    out = np.empty(q.shape[0], dtype=np.float32)
    for start in range(0, q.shape[0], _RESCORE_BLOCK):
        b = slice(start, start + _RESCORE_BLOCK)
        out[b] = np.einsum("md,md->m", queries[q[b]], embeddings[slots[b]])
    return out
