"""ScaNN as an index type (skmml.retrieval._scann): ids, in-place changes, versions, pickling, errors."""

import sys

import joblib
import numpy as np
import pytest

pytest.importorskip("scann")

from skmml import KNNVoteClassifier, Memory  # noqa: E402
from skmml.retrieval import NeighborIndex  # noqa: E402

BRUTE = {"brute_force": True}


def _memory(n=1500, d=24, seed=0):
    rng = np.random.default_rng(seed)
    return Memory(rng.normal(size=(n, d)), rng.integers(0, 4, n))


def _exact_ids(bank, queries, k):
    index = NeighborIndex("flat", params={"screen": "off"}, device="cpu").build(bank)
    return bank.slot_ids[index.search(queries, k)[1]]


def test_ids_stay_right_through_many_additions_and_deletions():
    """ScaNN moves its last point into each deleted position; the id table must follow."""
    rng = np.random.default_rng(1)
    memory = _memory()
    index = NeighborIndex("scann", params=BRUTE).build(memory.image)
    searcher = index.kind_.searcher
    queries = rng.normal(size=(30, 24)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    for step in range(12):
        ids = memory.image.ids
        # Deletions that include the current last points, and points moved before.
        gone = np.unique(np.r_[ids[-3:], rng.choice(ids, 40, replace=False)])
        memory = memory.remove(gone)
        index = index.remove(memory.image, gone)
        memory = memory.add(rng.normal(size=(25, 24)), rng.integers(0, 4, 25))
        index = index.add(memory.image, 25)
        assert index.kind_.searcher is searcher  # changed in place, never rebuilt
        assert np.array_equal(np.sort(searcher.ids), np.sort(memory.image.ids))
        found = memory.image.slot_ids[index.search(queries, 10)[1]]
        np.testing.assert_array_equal(found, _exact_ids(memory.image, queries, 10))


def test_tree_search_finds_the_nearest_items_and_forgets_exactly():
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(20, 32))
    y = rng.integers(0, 20, 4000)
    X = centres[y] + 0.3 * rng.normal(size=(4000, 32))
    clf = KNNVoteClassifier(n_neighbors=10, index="scann",
                            index_params={"num_leaves": 40, "num_leaves_to_search": 8})
    clf.fit(X, y)
    exact = KNNVoteClassifier(n_neighbors=10).fit(X, y)
    Q = centres[y[:200]] + 0.3 * rng.normal(size=(200, 32))
    found, truth = clf.kneighbors(Q)[1], exact.kneighbors(Q)[1]
    recall = np.mean([np.intersect1d(a, b).size / 10 for a, b in zip(found, truth)])
    assert recall > 0.9
    assert np.mean(clf.predict(Q) == exact.predict(Q)) > 0.97
    voters = np.unique(found)[:300]
    clf.forget(voters)
    assert not np.isin(clf.kneighbors(Q)[1], voters).any()
    assert not np.isin(clf.explain(Q[:20])["id"], voters).any()


def test_a_superseded_version_answers_exactly_and_a_branch_rebuilds():
    memory = _memory()
    queries = memory.image.embeddings[:7]
    v0 = NeighborIndex("scann").build(memory.image)
    grown = memory.add(np.ones((1, 24)), [1])
    v1 = v0.add(grown.image, 1)
    assert v1.kind_.searcher is v0.kind_.searcher
    # v0 no longer matches the shared searcher: it searches its own items exactly.
    np.testing.assert_array_equal(memory.image.slot_ids[v0.search(queries, 5)[1]],
                                  _exact_ids(memory.image, queries, 5))
    # A second change from v0 (a branch) cannot reuse the searcher: it rebuilds.
    other = memory.remove([0])
    branch = v0.remove(other.image, np.array([0]))
    assert branch.kind_.searcher is not v0.kind_.searcher
    assert 0 not in other.image.slot_ids[branch.search(queries, 5)[1]]
    assert v1.kind_.searcher.ids.size == 1501  # v1's searcher untouched by the branch


def test_pickle_and_joblib_round_trips_give_identical_predictions(tmp_path):
    memory = _memory()
    clf = KNNVoteClassifier(n_neighbors=7, index="scann").set_memory(memory)
    clf.partial_fit(np.ones((2, 24)), [3, 3])
    clf.forget([5, 6])
    Q = np.random.default_rng(3).normal(size=(50, 24))
    joblib.dump(clf, tmp_path / "clf.joblib")
    loaded = joblib.load(tmp_path / "clf.joblib")
    np.testing.assert_array_equal(loaded.kneighbors(Q)[1], clf.kneighbors(Q)[1])
    np.testing.assert_array_equal(loaded.predict_proba(Q), clf.predict_proba(Q))
    # The loaded copy changes in place too, independently of the original.
    loaded.forget([7])
    assert 7 in clf.memory_.image.ids and 7 not in loaded.memory_.image.ids


def test_readers_see_whole_versions_while_a_writer_changes_the_index(read_while_writing):
    rng = np.random.default_rng(4)
    clf = KNNVoteClassifier(n_neighbors=5, index="scann", index_params=BRUTE)
    clf.fit(rng.normal(size=(1000, 16)), rng.integers(0, 3, 1000))
    Q = rng.normal(size=(9, 16)).astype(np.float32)
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)

    def read():
        index = clf._state.backend.index()  # one published version
        found = index.bank_.slot_ids[index.search(Q, 5)[1]]
        return None if np.array_equal(found, _exact_ids(index.bank_, Q, 5)) else found

    def write(step):
        clf.partial_fit(rng.normal(size=(4, 16)), rng.integers(0, 3, 4))
        clf.forget(clf.memory_.image.ids[step:step + 3])

    assert not read_while_writing(read, write, steps=25)


def test_errors_name_the_problem(monkeypatch):
    bank = _memory(n=100).image
    with pytest.raises(ValueError, match=r"Unknown ScaNN parameter\(s\) \['nprobe'\]"):
        NeighborIndex("scann", params={"nprobe": 4}).build(bank)
    with pytest.raises(ValueError, match="num_leaves=500 exceeds the item count"):
        NeighborIndex("scann", params={"num_leaves": 500}).build(bank)
    with pytest.raises(ValueError, match="num_leaves_to_search=9 exceeds num_leaves=4"):
        NeighborIndex("scann", params={"num_leaves": 4, "num_leaves_to_search": 9}).build(bank)
    with pytest.raises(ValueError, match="reorder must be a positive integer"):
        NeighborIndex("scann", params={"reorder": 0}).build(bank)
    with pytest.raises(ValueError, match="CPU only"):
        NeighborIndex("scann", device="cuda").build(bank)
    monkeypatch.setitem(sys.modules, "scann", None)
    with pytest.raises(ImportError, match=r'pip install "skmml\[scann\]"'):
        NeighborIndex("scann").build(bank)
