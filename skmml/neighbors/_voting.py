"""Neighbor vote weights and their aggregation into class decisions.

The weights follow the aggregators of the visual-memory reference code
(Geirhos et al., 2024), with 0-based neighbor rank ``i`` and cosine
distance ``d = 1 - s`` for cosine similarity ``s``:

======================  ===========================================
voting                  weight of a neighbor
======================  ===========================================
``"plurality"``         ``1``
``"distance"``          ``exp(-d) ** distance_exponent``
``"rank"``              ``1 / (i + rank_offset)``
``"softmax"``           ``exp((1 - d) / temperature)``
======================  ===========================================

Ties between classes go to the class whose weighted vote reached the
maximum first, scanning neighbors from the nearest: that is, the class whose
last contributing neighbor is nearest.
"""

import numpy as np

VOTING_SCHEMES = ("rank", "softmax", "distance", "plurality")

# Queries per block in staged_winners: bounds its (block, k, k) work arrays.
_CHUNK_ELEMENTS = 2**22
#: Above this many neighbors, staged_winners sums votes position by position
#: (O(k) memory per query) instead of through a (k, k) same-class mask.
_PAIRWISE_MAX_K = 128


def vote_weights(similarities, ranks, voting, *, rank_offset=2.0, temperature=0.07,
                 distance_exponent=1.0):
    """Return the float64 vote weight of each neighbor.

    Parameters
    ----------
    similarities : ndarray of shape (n_queries, k)
        Cosine similarity of each neighbor to its query.
    ranks : ndarray of shape (n_queries, k)
        0-based rank of each neighbor among those that vote.
    voting : {"rank", "softmax", "distance", "plurality"} or callable
        A callable gets ``(similarities, ranks)`` and returns non-negative
        weights of the same shape.
    rank_offset, temperature, distance_exponent : float
        Parameters of the "rank", "softmax" and "distance" schemes.

    Returns
    -------
    weights : ndarray of shape (n_queries, k), float64
    """
    s = similarities.astype(np.float64)
    if callable(voting):
        w = np.asarray(voting(s, ranks), dtype=np.float64)
        if w.shape != s.shape:
            raise ValueError(
                f"The voting callable returned shape {w.shape}, expected {s.shape}."
            )
        if not np.all(w >= 0):
            raise ValueError("The voting callable returned negative or NaN weights.")
        return w
    if voting == "plurality":
        return np.ones_like(s)
    if voting == "rank":
        return 1.0 / (ranks + rank_offset)
    if voting == "distance":
        return np.exp(-(1.0 - s)) ** distance_exponent
    if voting == "softmax":
        with np.errstate(over="ignore"):
            w = np.exp(s / temperature)
        if not np.all(np.isfinite(w[np.isfinite(s)])):
            raise ValueError(
                f"temperature={temperature} is too small: softmax votes overflow float64."
            )
        return w
    raise ValueError(f"Unknown voting scheme {voting!r}; use one of {VOTING_SCHEMES}.")


def tally(codes, weights, n_classes):
    """Sum the weights per class: (n_queries, n_classes) float64 votes.

    `codes` are class indices in ``[0, n_classes)`` of shape (n_queries, k).
    """
    n = codes.shape[0]
    flat = (codes + n_classes * np.arange(n)[:, None]).ravel()
    votes = np.bincount(flat, weights=weights.ravel(), minlength=n * n_classes)
    return votes.reshape(n, n_classes)


def staged_winners(codes, weights, contributes):
    """Winning neighbor position for every prefix of the neighbor list.

    Parameters
    ----------
    codes : ndarray of shape (n_queries, k)
        Class index of each neighbor.
    weights : ndarray of shape (n_queries, k)
        Non-negative vote weight of each neighbor.
    contributes : ndarray of bool of shape (n_queries, k)
        Whether the neighbor votes at all (False for excluded or missing ones).

    Returns
    -------
    winner : ndarray of shape (n_queries, k), int
        ``winner[q, j]`` is the position, among the first ``j + 1``
        neighbors of query ``q``, of the neighbor whose vote brought its
        class to the maximum first; its class wins that prefix. It is -1 when
        no neighbor in the prefix contributes.
    """
    n, k = codes.shape
    if k > _PAIRWISE_MAX_K:
        per_query = k + int(codes.max(initial=0)) + 1
    else:
        per_query = k * k
    chunk = max(1, _CHUNK_ELEMENTS // per_query)
    if n > chunk:
        return np.concatenate([
            staged_winners(codes[i:i + chunk], weights[i:i + chunk], contributes[i:i + chunk])
            for i in range(0, n, chunk)
        ])
    # cumulative[q, j]: vote of neighbor j's class over neighbors 0..j, each
    # class's votes summed in neighbor order (so equal votes compare equal).
    if k > _PAIRWISE_MAX_K:
        # O(k + n_classes) work memory per query: one pass over the positions.
        votes = np.zeros((n, int(codes.max(initial=0)) + 1))
        cumulative = np.empty((n, k))
        rows = np.arange(n)
        for j in range(k):
            votes[rows, codes[:, j]] += weights[:, j]
            cumulative[:, j] = votes[rows, codes[:, j]]
    else:
        # Row j holds neighbor j's class's weights at positions 0..j (zeros
        # elsewhere); a running sum adds them in neighbor order, as the loop
        # above does, so both paths give bit-identical votes.
        same = codes[:, :, None] == codes[:, None, :]
        same &= np.tril(np.ones((k, k), dtype=bool))
        masked = np.where(same, weights[:, None, :].astype(np.float64), 0.0)
        cumulative = np.cumsum(masked, axis=2)[:, np.arange(k), np.arange(k)]
    cumulative[~contributes] = -np.inf
    running = np.maximum.accumulate(cumulative, axis=1)
    before = np.concatenate([np.full((n, 1), -np.inf), running[:, :-1]], axis=1)
    positions = np.where(cumulative > before, np.arange(k), -1)
    return np.maximum.accumulate(positions, axis=1)
