"""Herding (iCaRL): a priority order of a class's items for a memory budget.

Herding picks, greedily, the item that brings the mean of the items picked so
far closest to the mean of all the class's items (Rebuffi et al., 2017). The
result is a priority order: keeping the first ``m`` items under any budget
``m`` gives the herding choice for that budget, so shrinking a budget later
is a truncation.
"""

import numpy as np


def herding_order(X, n=None):
    """Indices of the rows of `X` in herding priority order.

    Parameters
    ----------
    X : ndarray of shape (n_items, n_features)
        The items of one class.
    n : int, default=None
        Length of the order to compute (the budget); all items by default.

    Returns
    -------
    order : ndarray of shape (min(n, n_items),), int64
    """
    X = np.asarray(X, dtype=np.float64)
    n_items = X.shape[0]
    n = n_items if n is None else min(n, n_items)
    mean = X.mean(axis=0)
    picked = np.zeros(n_items, dtype=bool)
    order = np.empty(n, dtype=np.int64)
    running = np.zeros_like(mean)
    for t in range(n):
        # Distance of the class mean to the mean after adding each candidate.
        gaps = np.linalg.norm(mean - (running + X) / (t + 1), axis=1)
        gaps[picked] = np.inf
        best = int(np.argmin(gaps))
        order[t] = best
        picked[best] = True
        running += X[best]
    return order
