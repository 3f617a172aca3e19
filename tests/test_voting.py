import numpy as np
import pytest

from skmml.neighbors._voting import staged_winners, tally, vote_weights


def _reference_winner(codes, weights):
    """Loop version of the reference rule: the class that first reached the maximum."""
    votes, best, best_code = {}, -np.inf, None
    for code, w in zip(codes, weights):
        votes[code] = votes.get(code, 0.0) + w
        if votes[code] > best:
            best, best_code = votes[code], code
    return best_code


def test_weights_follow_the_reference_formulas():
    sims = np.array([[0.9, 0.5, -0.2]], dtype=np.float32)
    ranks = np.array([[0, 1, 2]])
    s = sims.astype(np.float64)
    d = 1 - s
    np.testing.assert_allclose(vote_weights(sims, ranks, "plurality"), [[1, 1, 1]])
    np.testing.assert_allclose(vote_weights(sims, ranks, "rank"), [[1 / 2, 1 / 3, 1 / 4]])
    np.testing.assert_allclose(vote_weights(sims, ranks, "rank", rank_offset=1.0),
                               [[1, 1 / 2, 1 / 3]])
    np.testing.assert_allclose(vote_weights(sims, ranks, "distance", distance_exponent=3.0),
                               np.exp(-d) ** 3)
    np.testing.assert_allclose(vote_weights(sims, ranks, "softmax", temperature=0.07),
                               np.exp((1 - d) / 0.07))


def test_callable_weights_are_checked():
    sims, ranks = np.ones((2, 3), dtype=np.float32), np.tile(np.arange(3), (2, 1))
    np.testing.assert_allclose(vote_weights(sims, ranks, lambda s, r: s * 2), 2 * np.ones((2, 3)))
    with pytest.raises(ValueError, match="shape"):
        vote_weights(sims, ranks, lambda s, r: s[:, :1])
    with pytest.raises(ValueError, match="negative"):
        vote_weights(sims, ranks, lambda s, r: -s)


def test_softmax_overflow_is_reported():
    with pytest.raises(ValueError, match="temperature"):
        vote_weights(np.ones((1, 2), np.float32), np.zeros((1, 2)), "softmax", temperature=1e-4)


def test_tally_sums_weights_per_class():
    codes = np.array([[0, 2, 0], [1, 1, 1]])
    weights = np.array([[1.0, 2.0, 3.0], [0.5, 0.5, 1.0]])
    np.testing.assert_allclose(tally(codes, weights, 3), [[4, 0, 2], [0, 2, 0]])


def test_tie_goes_to_the_class_that_reached_the_maximum_first():
    # Plurality: A B B A -> after four neighbors A=2, B=2; B reached 2 first.
    codes = np.array([[0, 1, 1, 0]])
    winners = staged_winners(codes, np.ones((1, 4)), np.ones((1, 4), bool))
    np.testing.assert_array_equal(codes[0, winners[0]], [0, 0, 1, 1])
    # Rank: A (1/2) then B at ranks 1 and 4 (1/3 + 1/6 = 1/2): A reached 1/2 first.
    codes = np.array([[0, 1, 2, 3, 1]])
    w = 1.0 / (np.arange(5) + 2.0)[None]
    winners = staged_winners(codes, w, np.ones((1, 5), bool))
    assert codes[0, winners[0, -1]] == 0


def test_non_contributing_neighbors_never_win():
    codes = np.array([[3, 1, 1]])
    contributes = np.array([[False, True, True]])
    winners = staged_winners(codes, np.array([[0.0, 1.0, 1.0]]), contributes)
    np.testing.assert_array_equal(winners, [[-1, 1, 2]])


@pytest.mark.parametrize("voting", ["rank", "plurality", "distance", "softmax"])
def test_staged_winners_match_a_loop_for_every_prefix(voting):
    rng = np.random.default_rng(0)
    n, k = 300, 12
    codes = rng.integers(0, 4, size=(n, k))
    sims = np.sort(rng.uniform(-1, 1, size=(n, k)), axis=1)[:, ::-1].astype(np.float32)
    w = vote_weights(sims, np.tile(np.arange(k), (n, 1)), voting)
    winners = staged_winners(codes, w, np.ones((n, k), bool))
    for q in range(n):
        for j in range(k):
            assert codes[q, winners[q, j]] == _reference_winner(codes[q, : j + 1], w[q, : j + 1])


def test_staged_winners_chunking_gives_the_same_result(monkeypatch):
    import skmml.neighbors._voting as voting

    rng = np.random.default_rng(1)
    codes = rng.integers(0, 3, size=(50, 8))
    w = rng.uniform(size=(50, 8))
    full = staged_winners(codes, w, np.ones((50, 8), bool))
    monkeypatch.setattr(voting, "_CHUNK_ELEMENTS", 64 * 7)
    np.testing.assert_array_equal(staged_winners(codes, w, np.ones((50, 8), bool)), full)


@pytest.mark.parametrize("voting", ["rank", "plurality"])
def test_large_k_sums_position_by_position_with_the_same_winners(monkeypatch, voting):
    import skmml.neighbors._voting as voting_module

    rng = np.random.default_rng(2)
    n, k = 40, 30
    codes = rng.integers(0, 5, size=(n, k))
    w = vote_weights(np.zeros((n, k)), np.tile(np.arange(k), (n, 1)), voting)
    contributes = rng.uniform(size=(n, k)) > 0.1
    pairwise = staged_winners(codes, w, contributes)
    monkeypatch.setattr(voting_module, "_PAIRWISE_MAX_K", 8)
    np.testing.assert_array_equal(staged_winners(codes, w, contributes), pairwise)


def test_staged_winners_work_memory_is_linear_in_k():
    import tracemalloc

    k = 16_000  # the (k, k) mask would need 2.2 GB per query
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 100, size=(2, k))
    w = vote_weights(np.zeros((2, k)), np.tile(np.arange(k), (2, 1)), "rank")
    tracemalloc.start()
    winners = staged_winners(codes, w, np.ones((2, k), bool))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50 * 2**20
    for j in (0, 99, k - 1):
        assert codes[0, winners[0, j]] == _reference_winner(codes[0, : j + 1], w[0, : j + 1])


def test_votes_are_summed_in_neighbor_order_on_both_paths(monkeypatch):
    import skmml.neighbors._voting as voting_module

    # 0.3 vs 0.05 + 0.2 + 0.05: equal in neighbor order (a tie the first
    # class wins), 0.30000000000000004 in another order.
    codes = np.array([[1, 0, 0, 0]])
    w = np.array([[0.3, 0.05, 0.2, 0.05]])
    assert ((0.05 + 0.2) + 0.05) == 0.3
    pairwise = staged_winners(codes, w, np.ones((1, 4), bool))
    monkeypatch.setattr(voting_module, "_PAIRWISE_MAX_K", 2)
    sequential = staged_winners(codes, w, np.ones((1, 4), bool))
    np.testing.assert_array_equal(pairwise, sequential)
    np.testing.assert_array_equal(pairwise, [[0, 0, 0, 0]])
