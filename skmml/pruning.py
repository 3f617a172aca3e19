"""Memory pruning: find the items that mislead their neighbours.

As in the visual-memory reference code, every memory item queries the memory
(leave-one-out: it never counts as its own neighbour) and each neighbour whose
label differs from the query's is charged one *wrong-neighbour* count.

- Hard pruning excludes items with ``count >= threshold`` from voting.
- Soft pruning multiplies each item's vote by ``1.75 / (1 + count)``.
"""

import numpy as np

from .retrieval import drop_self

PRUNING_MODES = ("hard", "soft")
SOFT_PRUNING_SCALE = 1.75


def leave_one_out_neighbors(index, bank, n_neighbors, verbose=False):
    """Slots of the `n_neighbors` nearest other items of every item of `bank`.

    Searches ``n_neighbors + 1`` and drops the item itself (see
    :func:`~skmml.retrieval.drop_self`).

    Returns
    -------
    similarities, slots : ndarrays of shape (n_items, n_neighbors)
        One row per item, in row order; slots as :meth:`NeighborIndex.search`
        returns them.
    """
    sims, slots = index.search(bank.embeddings, n_neighbors + 1, verbose=verbose)
    return drop_self(sims, slots, slots == bank.live_slots[:, None])


def wrong_neighbor_counts(index, bank, codes, n_neighbors, verbose=False):
    """How often each item of `bank` is a neighbour of an item of another class.

    Parameters
    ----------
    index : NeighborIndex
        Index over `bank`.
    bank : MemoryBank
        The memory items.
    codes : ndarray of shape (n_slots,)
        Class index of each slot of `bank`.
    n_neighbors : int
        Neighbours per leave-one-out query.
    verbose : bool, default=False
        Show a progress bar over the memory-vs-memory search.

    Returns
    -------
    counts : ndarray of shape (n_slots,), int64
        Per slot (0 for dead slots).
    """
    _, slots = leave_one_out_neighbors(index, bank, n_neighbors, verbose)
    found = slots >= 0
    wrong = found & (codes[np.where(found, slots, 0)] != codes[bank.live_slots][:, None])
    return np.bincount(slots[wrong], minlength=bank.n_slots).astype(np.int64)


def item_weights(counts, mode, threshold):
    """Per-item vote multiplier: 0/1 for hard pruning, ``1.75/(1+count)`` for soft."""
    if mode == "hard":
        return (counts < threshold).astype(np.float64)
    if mode == "soft":
        return SOFT_PRUNING_SCALE / (1.0 + counts)
    raise ValueError(f"Unknown pruning mode {mode!r}; use one of {PRUNING_MODES}.")
