import numpy as np
import pytest

from skmml import Memory
from skmml.backends import LocalBackend
from skmml.neighbors._pruning import item_weights, wrong_neighbor_counts
from skmml.retrieval import NeighborIndex


def _line_backend(xs, labels):
    """Items on a half circle: angle order is neighbor order."""
    angles = np.asarray(xs, dtype=np.float64)
    memory = Memory(np.c_[np.cos(angles), np.sin(angles)], labels)
    return LocalBackend.build(memory, NeighborIndex("flat", device="cpu"))


def _leave_one_out_ids(backend, k):
    (_, _, neighbors), = backend.leave_one_out(k)
    return neighbors.ids


def test_leave_one_out_drops_the_item_itself():
    backend = _line_backend([0.0, 0.1, 0.3, 0.7], [0, 0, 1, 1])
    np.testing.assert_array_equal(_leave_one_out_ids(backend, 2),
                                  [[1, 2], [0, 2], [1, 0], [2, 1]])


def test_leave_one_out_with_duplicates_drops_exactly_one_column():
    backend = _line_backend([0.0, 0.0, 0.0, 1.0], [0, 0, 0, 1])
    for item, row in enumerate(_leave_one_out_ids(backend, 2)[:3]):
        assert item not in row
        assert set(row) <= {0, 1, 2}


def test_wrong_neighbor_counts_by_hand():
    # Items at angles 0, .1 (class 0) and .3, .7 (class 1). One neighbor each:
    # 0 -> .1, .1 -> 0, .3 -> .1 (wrong: charge item 1), .7 -> .3.
    backend = _line_backend([0.0, 0.1, 0.3, 0.7], [0, 0, 1, 1])
    np.testing.assert_array_equal(wrong_neighbor_counts(backend, 1)[np.arange(4)], [0, 1, 0, 0])
    # Two: 0 -> .1, .3 (wrong); .1 -> 0, .3 (wrong); .3 -> .1, 0 (both wrong);
    # .7 -> .3, .1 (wrong). Item 0 misleads once, items 1 and 2 twice each.
    counts = wrong_neighbor_counts(backend, 2)
    np.testing.assert_array_equal(counts[np.arange(4)], [1, 2, 2, 0])
    np.testing.assert_array_equal(counts.keys, [0, 1, 2])  # only non-zero counts are kept


def test_item_weights():
    counts = np.array([0, 1, 2, 5])
    np.testing.assert_array_equal(item_weights(counts, "hard", 2), [1, 1, 0, 0])
    np.testing.assert_allclose(item_weights(counts, "soft", 1), 1.75 / (1 + counts))
    with pytest.raises(ValueError, match="pruning mode"):
        item_weights(counts, "medium", 1)
