import numpy as np
import pytest

from skmml import Memory
from skmml.memory import herding_order


def _brute_force_order(X):
    """Loop version of iCaRL's herding."""
    mean, chosen = X.mean(axis=0), []
    for t in range(len(X)):
        best = min((i for i in range(len(X)) if i not in chosen),
                   key=lambda i: np.linalg.norm(mean - (X[chosen + [i]].sum(axis=0)) / (t + 1)))
        chosen.append(best)
    return chosen


def test_herding_order_matches_the_definition():
    X = np.random.default_rng(0).normal(size=(15, 4))
    np.testing.assert_array_equal(herding_order(X), _brute_force_order(X))
    np.testing.assert_array_equal(herding_order(X, n=5), _brute_force_order(X)[:5])


def test_first_item_is_the_one_closest_to_the_mean():
    X = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [10.0, 10.0]])
    assert herding_order(X, n=1)[0] == 2  # mean is (3.25, 3.25)


def test_limit_splits_the_budget_across_classes_and_keeps_herding_items():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(100, 6)), np.repeat([0, 1, 2, 3], 25)
    memory = Memory(X, y)
    small = memory.limit(40)
    np.testing.assert_array_equal(small.counts()["image"], [10, 10, 10, 10])
    for c in range(4):
        rows = np.flatnonzero(y == c)
        expected_ids = np.sort(rows[herding_order(memory.image.embeddings[rows], 10)])
        np.testing.assert_array_equal(small.image.ids[small.image.labels == c], expected_ids)
    ranks = small.image.metadata["herding_rank"]
    assert ranks.min() == 0 and ranks.max() == 9


def test_shrinking_again_is_a_truncation_and_new_classes_are_ranked_on_arrival():
    rng = np.random.default_rng(1)
    memory = Memory(rng.normal(size=(60, 5)), np.repeat([0, 1], 30))
    direct = memory.limit(10)
    twice = memory.limit(30).limit(10)
    np.testing.assert_array_equal(np.sort(direct.image.ids), np.sort(twice.image.ids))
    new = Memory(rng.normal(size=(30, 5)), np.repeat([2], 30), image_ids=np.arange(100, 130))
    grown = twice.expand(new).limit(12)
    np.testing.assert_array_equal(grown.counts()["image"], [4, 4, 4])
    four_each = memory.limit(8)  # the first 4 of class 0's herding order
    np.testing.assert_array_equal(grown.image.ids[grown.image.labels == 0],
                                  four_each.image.ids[four_each.image.labels == 0])


def test_budget_below_the_number_of_classes_is_an_error():
    with pytest.raises(ValueError, match="smaller than the number of classes"):
        Memory(np.eye(3), [0, 1, 2]).limit(2)


def test_limit_after_removals_still_fills_the_budget():
    rng = np.random.default_rng(2)
    memory = Memory(rng.normal(size=(60, 5)), np.repeat([0, 1], 30)).limit(20)
    first = memory.image.ids[memory.image.metadata["herding_rank"].to_numpy() == 0]
    smaller = memory.remove(first[:1]).limit(10)
    np.testing.assert_array_equal(smaller.counts()["image"], [5, 5])
