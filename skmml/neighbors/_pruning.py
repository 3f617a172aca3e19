"""Memory pruning: find the items that mislead their neighbors.

As in the visual-memory reference code, every memory item queries the memory
(leave-one-out: it never counts as its own neighbor) and each neighbor whose
label differs from the query's is charged one *wrong-neighbor* count.

- Hard pruning excludes items with ``count >= threshold`` from voting.
- Soft pruning multiplies each item's vote by ``1.75 / (1 + count)``.
"""

import numpy as np

from ..backends._base import KeyCounts

PRUNING_MODES = ("hard", "soft")
SOFT_PRUNING_SCALE = 1.75


def wrong_neighbor_counts(backend, n_neighbors, verbose=False):
    """How often each memory item is a neighbor of an item of another class.

    Parameters
    ----------
    backend : LocalBackend or MilvusBackend
        The memory (see :mod:`skmml.backends`); its items query it
        leave-one-out, in batches.
    n_neighbors : int
        Neighbors per leave-one-out query.
    verbose : bool, default=False
        Show a progress bar over the memory-vs-memory search.

    Returns
    -------
    counts : KeyCounts
        Counts by backend key; items not listed count 0.
    """
    parts = []
    for _, query_labels, neighbors in backend.leave_one_out(n_neighbors, verbose):
        wrong = (neighbors.keys >= 0) & (neighbors.labels != query_labels[:, None])
        parts.append(np.unique(neighbors.keys[wrong], return_counts=True))
    return KeyCounts.merged(parts)


def item_weights(counts, mode, threshold):
    """Per-item vote multiplier: 0/1 for hard pruning, ``1.75/(1+count)`` for soft."""
    if mode == "hard":
        return (counts < threshold).astype(np.float64)
    if mode == "soft":
        return SOFT_PRUNING_SCALE / (1.0 + counts)
    raise ValueError(f"Unknown pruning mode {mode!r}; use one of {PRUNING_MODES}.")
