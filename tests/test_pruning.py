import numpy as np
import pytest

from skmml import Memory
from skmml.pruning import item_weights, leave_one_out_neighbors, wrong_neighbor_counts
from skmml.retrieval import NeighborIndex


def _line_bank(xs, labels):
    """Items on a half circle: angle order is neighbour order."""
    angles = np.asarray(xs, dtype=np.float64)
    return Memory(np.c_[np.cos(angles), np.sin(angles)], labels).image


def test_leave_one_out_drops_the_item_itself():
    bank = _line_bank([0.0, 0.1, 0.3, 0.7], [0, 0, 1, 1])
    index = NeighborIndex("flat", device="cpu").build(bank)
    _, rows = leave_one_out_neighbors(index, bank, 2)
    np.testing.assert_array_equal(rows, [[1, 2], [0, 2], [1, 0], [2, 1]])


def test_leave_one_out_with_duplicates_drops_exactly_one_column():
    bank = _line_bank([0.0, 0.0, 0.0, 1.0], [0, 0, 0, 1])
    index = NeighborIndex("flat", device="cpu").build(bank)
    _, rows = leave_one_out_neighbors(index, bank, 2)
    for item, row in enumerate(rows[:3]):
        assert item not in row
        assert set(row) <= {0, 1, 2}


def test_wrong_neighbour_counts_by_hand():
    # Items at angles 0, .1 (class 0) and .3, .7 (class 1). One neighbour each:
    # 0 -> .1, .1 -> 0, .3 -> .1 (wrong: charge item 1), .7 -> .3.
    bank = _line_bank([0.0, 0.1, 0.3, 0.7], [0, 0, 1, 1])
    index = NeighborIndex("flat", device="cpu").build(bank)
    codes = np.array([0, 0, 1, 1])
    np.testing.assert_array_equal(wrong_neighbor_counts(index, bank, codes, 1), [0, 1, 0, 0])
    # Two: 0 -> .1, .3 (wrong); .1 -> 0, .3 (wrong); .3 -> .1, 0 (both wrong);
    # .7 -> .3, .1 (wrong). Item 0 misleads once, items 1 and 2 twice each.
    np.testing.assert_array_equal(wrong_neighbor_counts(index, bank, codes, 2), [1, 2, 2, 0])


def test_item_weights():
    counts = np.array([0, 1, 2, 5])
    np.testing.assert_array_equal(item_weights(counts, "hard", 2), [1, 1, 0, 0])
    np.testing.assert_allclose(item_weights(counts, "soft", 1), 1.75 / (1 + counts))
    with pytest.raises(ValueError, match="pruning mode"):
        item_weights(counts, "medium", 1)
